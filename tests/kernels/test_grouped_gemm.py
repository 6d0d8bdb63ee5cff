"""Grouped GEMMs over expert-sorted rows: Triton kernels (plain and TMA), torch loop,
torch._grouped_mm.

References are float64 computations that do not slice by expert: the forward gathers each
row's expert weight (``b[expert_of_row]``), the weight gradient contracts with a one-hot
expert matrix.
"""

import pytest
import torch

import flashfusemoe.kernels.grouped_gemm as gg

# Tolerances (|out - ref| <= atol + rtol * |ref|; inputs ~N(0, 1), contractions of <= ~100 terms):
# - fp64: fp64 accumulation, error ~ n * 2^-53 * sum|terms| < 1e-13.
# - fp32: IEEE fp32 accumulation, error ~ sqrt(n) * 2^-24 * |partial sums| ~ 1e-6; TF32 inputs
#   (Triton's default) would give ~1e-3, far outside.
# - fp16: fp32 accumulation then one rounding to fp16 (2^-11 relative), 2^-10 leaves slack.
# - bf16: fp32 accumulation then one rounding to bf16: 2^-8 relative, 2^-7 when the
#   interpreter truncates; atol covers fp32 accumulation error on results near zero.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2**-10, atol=1e-3),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["triton", "loop"]
# Not multiples of the interpreter's 32-wide blocks, and > 32 so the K loop runs twice.
K_DIM, N_DIM = 40, 48


def _counts(layout: str) -> list[int]:
    """Rows per expert for a named layout, drawn fresh each test."""
    if layout == "uneven":
        E = 6
        counts = torch.randint(1, 80, (E,))
        perm = torch.randperm(E)
        counts[perm[:2]] = 0
        counts[perm[2]] = 1
        counts[perm[3]] = torch.randint(65, 100, ()).item()  # > 2 interpreter tiles
        return counts.tolist()
    if layout == "one_expert":
        counts = [0] * 5
        counts[torch.randint(0, 5, ()).item()] = torch.randint(33, 90, ()).item()
        return counts
    if layout == "single":
        return [torch.randint(33, 90, ()).item()]
    if layout == "all_empty":
        return [0] * 4
    raise ValueError(layout)


def _pad_rows(layout: str) -> int:
    """Unused rows past ends[-1]; the "single" layout covers ends[-1] == R."""
    return 0 if layout == "single" else torch.randint(1, 10, ()).item()


def _rows(counts, pad, width, dtype, device):
    """``[sum(counts) + pad, width]`` random rows, the unused tail set to NaN."""
    x = torch.randn(sum(counts) + pad, width, dtype=torch.float64)
    x[sum(counts) :] = float("nan")
    return x.to(dtype).to(device)


def _ends(counts, device):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def _expert_of_row(counts):
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))


def _ref_mm(a, b, counts, trans_b):
    eid = _expert_of_row(counts)
    a64 = a[: len(eid)].double().cpu()
    w = b.double().cpu()[eid]
    return torch.einsum("rk,rnk->rn" if trans_b else "rk,rkn->rn", a64, w)


def _ref_wgrad(a, b, counts):
    eid = _expert_of_row(counts)
    onehot = torch.nn.functional.one_hot(eid, len(counts)).double()
    return torch.einsum("re,rm,rn->emn", onehot, a[: len(eid)].double().cpu(), b[: len(eid)].double().cpu())


def _weights(E, trans_b, dtype, device, k=K_DIM, n=N_DIM):
    shape = (E, n, k) if trans_b else (E, k, n)
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)


def _check_mm(out, a, b, counts, trans_b):
    valid = sum(counts)
    got = out[:valid].double().cpu()
    assert out.shape == (a.shape[0], b.shape[1] if trans_b else b.shape[2])
    assert out.dtype == a.dtype
    assert torch.isfinite(got).all(), "garbage rows leaked into valid rows"
    torch.testing.assert_close(got, _ref_mm(a, b, counts, trans_b), **TOL[a.dtype])


def _check_wgrad(out, a, b, counts):
    assert out.shape == (len(counts), a.shape[1], b.shape[1])
    assert out.dtype == a.dtype
    got = out.double().cpu()
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(got[e], torch.zeros_like(got[e])), f"expert {e} is empty: expected exact zeros"
    torch.testing.assert_close(got, _ref_wgrad(a, b, counts), **TOL[a.dtype])


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) and loop paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_mm_dtypes(backend, trans_b, dtype, device):
    counts = _counts("uneven")
    a = _rows(counts, _pad_rows("uneven"), K_DIM, dtype, device)
    b = _weights(len(counts), trans_b, dtype, device)
    out = gg.grouped_mm(a, b, _ends(counts, device), trans_b, backend=backend)
    _check_mm(out, a, b, counts, trans_b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_dtypes(backend, dtype, device):
    counts = _counts("uneven")
    pad = _pad_rows("uneven")
    a = _rows(counts, pad, K_DIM, dtype, device)
    b = _rows(counts, pad, N_DIM, dtype, device)
    out = gg.grouped_mm_weight_grad(a, b, _ends(counts, device), backend=backend)
    _check_wgrad(out, a, b, counts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["one_expert", "single", "all_empty"])
def test_grouped_mm_layouts(backend, layout, device):
    counts = _counts(layout)
    a = _rows(counts, _pad_rows(layout), K_DIM, torch.float32, device)
    b = _weights(len(counts), True, torch.float32, device)
    out = gg.grouped_mm(a, b, _ends(counts, device), True, backend=backend)
    _check_mm(out, a, b, counts, True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["one_expert", "single", "all_empty"])
def test_weight_grad_layouts(backend, layout, device):
    counts = _counts(layout)
    pad = _pad_rows(layout)
    a = _rows(counts, pad, K_DIM, torch.float32, device)
    b = _rows(counts, pad, N_DIM, torch.float32, device)
    out = gg.grouped_mm_weight_grad(a, b, _ends(counts, device), backend=backend)
    _check_wgrad(out, a, b, counts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("trans_b", [True, False])
def test_grouped_mm_strided_views(backend, trans_b, device):
    """Operands that are views with non-default strides (the kernels take strides)."""
    counts = _counts("uneven")
    R = sum(counts) + _pad_rows("uneven")
    E = len(counts)
    wide = torch.randn(R, K_DIM + 7, dtype=torch.float64).to(device)
    a = wide[:, 3 : 3 + K_DIM]
    a[sum(counts) :] = float("nan")
    # b in the other memory order: its contiguous dim is the one trans_b does not expect.
    b = torch.randn(E, *((K_DIM, N_DIM) if trans_b else (N_DIM, K_DIM)), dtype=torch.float64)
    b = b.to(device).transpose(1, 2)
    out = gg.grouped_mm(a, b, _ends(counts, device), trans_b, backend=backend)
    _check_mm(out, a, b, counts, trans_b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_grad_strided_views(backend, device):
    counts = _counts("uneven")
    R = sum(counts) + _pad_rows("uneven")
    a = torch.randn(K_DIM, R, dtype=torch.float64).to(device).T  # column-major [R, M]
    b = torch.randn(R, N_DIM + 5, dtype=torch.float64).to(device)[:, 5:]
    a[sum(counts) :] = float("nan")
    b[sum(counts) :] = float("nan")
    out = gg.grouped_mm_weight_grad(a, b, _ends(counts, device), backend=backend)
    _check_wgrad(out, a, b, counts)


def test_triton_tiles_never_span_experts(device):
    """Every row of an expert whose count is not a tile multiple uses its own expert's weight.

    Expert weights differ by a constant, so a tile spanning two experts would be off by that
    constant on the rows of the second expert.
    """
    counts = [33, 31, 1, 0, 64, 2]
    E = len(counts)
    ends = _ends(counts, device)
    a = torch.ones(sum(counts), 16, dtype=torch.float64, device=device)
    b = torch.arange(E, dtype=torch.float64, device=device)[:, None, None].expand(E, 32, 16).contiguous()
    out = gg.grouped_mm(a, b, ends, True, backend="triton")
    expected = 16.0 * _expert_of_row(counts).double()[:, None].expand(-1, 32)
    assert torch.equal(out.cpu(), expected)


# ---------------------------------------------------------------------------------------------
# TMA weight-gradient kernel (16-bit; the interpreter on CPU)
# ---------------------------------------------------------------------------------------------

TMA_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("layout", ["uneven", "one_expert", "single", "all_empty"])
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
def test_tma_weight_grad(dtype, layout, device):
    """Whole row chunks through the descriptors, the partial last chunk masked; NaN rows past
    ``ends[-1]`` and neighbouring experts' rows never enter a sum."""
    counts = _counts(layout)
    pad = _pad_rows(layout)
    a = _rows(counts, pad, K_DIM, dtype, device)
    b = _rows(counts, pad, N_DIM, dtype, device)
    assert gg._can_use_tma_wgrad(a, b, _ends(counts, device))
    out = gg.grouped_mm_weight_grad(a, b, _ends(counts, device), backend="tma")
    _check_wgrad(out, a, b, counts)


def _uneven_weight_grad(backend, dtype, device):
    """``(a, b, ends, a.T @ b per expert)`` for the uneven expert counts, by ``backend``."""
    counts = _counts("uneven")
    pad = _pad_rows("uneven")
    a = _rows(counts, pad, K_DIM, dtype, device)
    b = _rows(counts, pad, N_DIM, dtype, device)
    ends = _ends(counts, device)
    return a, b, ends, gg.grouped_mm_weight_grad(a, b, ends, backend=backend)


@pytest.mark.parametrize("backend", ["tma", "triton", "loop"])
def test_weight_grad_into_a_buffer(backend, device):
    a, b, ends, want = _uneven_weight_grad(backend, torch.bfloat16, device)
    buf = torch.full_like(want, float("nan"))
    got = gg.grouped_mm_weight_grad(a, b, ends, backend=backend, out=buf)
    assert got is buf
    assert torch.equal(buf, want)
    for bad in (buf[:, :, :-1], buf.double(), buf.transpose(1, 2).contiguous().transpose(1, 2)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            gg.grouped_mm_weight_grad(a, b, ends, backend=backend, out=bad)


@pytest.mark.parametrize("backend", ["tma", "triton", "loop"])
def test_weight_grad_into_a_float32_buffer(backend, device):
    """The gradient of float32 master weights from fp16 operands: the kernels store their float32
    accumulator (which rounds to their fp16 result); the loop's fp16 result is copied."""
    a, b, ends, want = _uneven_weight_grad(backend, torch.float16, device)
    wide = torch.full(want.shape, float("nan"), device=device)
    assert gg.grouped_mm_weight_grad(a, b, ends, backend=backend, out=wide) is wide
    assert torch.equal(wide.half(), want)
    assert torch.equal(wide, want.float()) == (backend == "loop")


def test_tma_weight_grad_refuses_layouts_it_cannot_read(device):
    counts = [5, 3]
    ends = _ends(counts, device)
    a = torch.randn(8, 48, dtype=torch.bfloat16, device=device)
    assert gg._can_use_tma_wgrad(a, a, ends)
    assert not gg._can_use_tma_wgrad(a.float(), a.float(), ends)  # 32-bit
    assert not gg._can_use_tma_wgrad(a, a.half(), ends)  # mixed dtypes
    assert not gg._can_use_tma_wgrad(a[:, 1:41], a[:, :40], ends)  # data 2 bytes off 16
    rows88 = torch.randn(8, 44, dtype=torch.bfloat16, device=device)
    assert not gg._can_use_tma_wgrad(rows88, rows88, ends)  # 88-byte row stride
    assert gg._can_use_tma_wgrad(a[:, :44], a[:, :40], ends)  # 96-byte rows of a wider tensor
    colmajor = torch.randn(48, 8, dtype=torch.bfloat16, device=device).T
    assert not gg._can_use_tma_wgrad(colmajor, a, ends)
    assert not gg._can_use_tma_wgrad(a, a, ends.long())
    with pytest.raises(ValueError, match="TMA"):
        gg.grouped_mm_weight_grad(colmajor, a, ends, backend="tma")
    with pytest.raises(ValueError, match="weight gradients only"):
        gg.grouped_mm(a, torch.randn(2, 16, 48, dtype=torch.bfloat16, device=device), ends, True,
                      backend="tma")
    # auto falls back for what TMA cannot read, with the same result as the plain kernel
    want = gg.grouped_mm_weight_grad(colmajor, a, ends, backend="loop")
    torch.testing.assert_close(gg.grouped_mm_weight_grad(colmajor, a, ends), want, **TOL[torch.bfloat16])


def test_auto_weight_grad_sends_large_problems_to_cutlass(monkeypatch, device):
    """Where torch._grouped_mm can run too, "auto" keeps the TMA kernel up to _TMA_MAX_FLOPS."""
    counts = [3, 0, 5]
    a = torch.randn(10, 16, dtype=torch.bfloat16, device=device)
    ends = _ends(counts, device)
    monkeypatch.setattr(gg, "_torch_ok", lambda *args: True)
    monkeypatch.setattr(gg, "_grouped_mm_weight_grad_torch", gg._grouped_mm_weight_grad_loop)
    tma = _spy(monkeypatch, "_grouped_mm_weight_grad_tma")
    torch_path = _spy(monkeypatch, "_grouped_mm_weight_grad_torch")
    flops = 2 * a.shape[0] * a.shape[1] * a.shape[1]
    for limit, want in ((flops, "tma"), (flops - 1, "torch")):
        monkeypatch.setattr(gg, "_TMA_MAX_FLOPS", limit)
        tma.clear(), torch_path.clear()
        _check_wgrad(gg.grouped_mm_weight_grad(a, a, ends), a, a, counts)
        assert (len(tma), len(torch_path)) == ((1, 0) if want == "tma" else (0, 1)), limit
    # forced, the TMA kernel runs whatever the size
    _check_wgrad(gg.grouped_mm_weight_grad(a, a, ends, backend="tma"), a, a, counts)
    assert len(tma) == 1
    # and so it does for a caller's buffer (written in place, not copied from CUTLASS's result)
    tma.clear(), torch_path.clear()
    out = torch.full((3, 16, 16), float("nan"), dtype=torch.bfloat16, device=device)
    got = gg.grouped_mm_weight_grad(a, a, ends, out=out)
    assert got is out and (len(tma), len(torch_path)) == (1, 0)
    _check_wgrad(got, a, a, counts)


def test_auto_weight_grad_prefers_tma_for_16_bit(monkeypatch, device):
    counts = [3, 0, 5]
    a = torch.randn(10, 16, dtype=torch.bfloat16, device=device)
    ends = _ends(counts, device)
    tma = _spy(monkeypatch, "_grouped_mm_weight_grad_tma")
    _check_wgrad(gg.grouped_mm_weight_grad(a, a, ends), a, a, counts)
    assert tma == ["_grouped_mm_weight_grad_tma"]
    loop = _spy(monkeypatch, "_grouped_mm_weight_grad_loop")
    _check_wgrad(gg.grouped_mm_weight_grad(a, a, ends, backend="loop"), a, a, counts)
    assert tma == ["_grouped_mm_weight_grad_tma"] and loop == ["_grouped_mm_weight_grad_loop"]


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    calls = []
    real = getattr(gg, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(gg, name, wrapper)
    return calls


def _small_inputs(device, dtype=torch.float32):
    counts = [3, 0, 5]
    a = torch.randn(sum(counts) + 2, 16, dtype=dtype, device=device)
    b = torch.randn(3, 16, 16, dtype=dtype, device=device)
    return a, b, _ends(counts, device), counts


@pytest.mark.parametrize("triton_on", [True, False])
def test_auto_dispatch_follows_use_triton(monkeypatch, triton_on, device):
    a, b, ends, counts = _small_inputs(device)
    monkeypatch.setattr(gg, "use_triton", lambda t: triton_on)
    mm_triton, mm_loop = _spy(monkeypatch, "_grouped_mm_triton"), _spy(monkeypatch, "_grouped_mm_loop")
    wg_triton = _spy(monkeypatch, "_grouped_mm_weight_grad_triton")
    wg_loop = _spy(monkeypatch, "_grouped_mm_weight_grad_loop")
    out = gg.grouped_mm(a, b, ends, True)
    wg = gg.grouped_mm_weight_grad(a, a, ends)
    assert (len(mm_triton), len(mm_loop)) == ((1, 0) if triton_on else (0, 1))
    assert (len(wg_triton), len(wg_loop)) == ((1, 0) if triton_on else (0, 1))
    _check_mm(out, a, b, counts, True)
    _check_wgrad(wg, a, a, counts)


def test_backend_argument(monkeypatch):
    a, b, ends, counts = _small_inputs("cpu")
    calls = _spy(monkeypatch, "_grouped_mm_loop")
    _check_mm(gg.grouped_mm(a, b, ends, True, backend="loop"), a, b, counts, True)
    assert calls == ["_grouped_mm_loop"]


def test_backend_errors(monkeypatch):
    a, b, ends, _ = _small_inputs("cpu")
    with pytest.raises(ValueError, match="backend"):
        gg.grouped_mm(a, b, ends, True, backend="cublas")
    with pytest.raises(ValueError, match="_grouped_mm"):
        gg.grouped_mm_weight_grad(a, a, ends, backend="torch")
    monkeypatch.setattr(gg, "use_triton", lambda t: False)
    with pytest.raises(ValueError, match="Triton"):
        gg.grouped_mm(a, b, ends, True, backend="triton")


def test_torch_grouped_mm_not_used_on_cpu():
    a, b, ends, _ = _small_inputs("cpu", torch.bfloat16)
    for op in ("nt", "nn", "wgrad"):
        assert not gg._can_use_torch_grouped_mm(a, a if op == "wgrad" else b, ends, op)


# ---------------------------------------------------------------------------------------------
# GPU: torch._grouped_mm path, empty groups, no host synchronisation
# ---------------------------------------------------------------------------------------------


def _needs_fast_grouped_mm():
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's CUTLASS path needs sm90/sm100")


def _gpu_problem(trans_b, E=8, k=256, n=128):
    counts = torch.randint(0, 300, (E,))
    counts[torch.randperm(E)[:2]] = 0
    counts = counts.tolist()
    pad = 24
    a = _rows(counts, pad, k, torch.bfloat16, "cuda")
    b = _weights(E, trans_b, torch.bfloat16, "cuda", k=k, n=n)
    return a, b, _ends(counts, "cuda"), counts


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [True, False])
def test_gpu_torch_grouped_mm(trans_b):
    _needs_fast_grouped_mm()
    a, b, ends, counts = _gpu_problem(trans_b)
    assert gg._can_use_torch_grouped_mm(a, b, ends, "nt" if trans_b else "nn")
    out = gg.grouped_mm(a, b, ends, trans_b, backend="torch")
    _check_mm(out, a, b, counts, trans_b)


@pytest.mark.gpu
def test_gpu_torch_weight_grad():
    _needs_fast_grouped_mm()
    a, _, ends, counts = _gpu_problem(True, k=128)
    b = torch.randn_like(a)
    b[sum(counts) :] = float("nan")
    assert gg._can_use_torch_grouped_mm(a, b, ends, "wgrad")
    out = gg.grouped_mm_weight_grad(a, b, ends, backend="torch")
    _check_wgrad(out, a, b, counts)


@pytest.mark.gpu
def test_gpu_raw_torch_grouped_mm_empty_groups_are_zero():
    """Raw ``torch._grouped_mm`` 2d x 2d writes exact zeros for empty groups.

    ``grouped_mm_weight_grad`` relies on this on sm90 (it masks empty groups elsewhere). The
    output block is recycled from a NaN-filled one so that unwritten memory would show.
    """
    _needs_fast_grouped_mm()
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("grouped_mm_weight_grad masks empty groups off sm90")
    counts = [64, 0, 40, 0, 0, 24]
    E, M, N = len(counts), 128, 64
    ends = _ends(counts, "cuda")
    a = torch.randn(sum(counts) + 8, M, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(sum(counts) + 8, N, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        poison = torch.full((E, M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        del poison
        out = torch._grouped_mm(a.t(), b, offs=ends)
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.equal(out[e], torch.zeros_like(out[e]))
        torch.testing.assert_close(out.double().cpu(), _ref_wgrad(a, b, counts), **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_no_host_sync(backend):
    if backend == "torch":
        _needs_fast_grouped_mm()
    a, b, ends, _ = _gpu_problem(True)
    w = torch.randn_like(a)
    gg.grouped_mm(a, b, ends, True, backend=backend)  # warm-up (compilation)
    gg.grouped_mm_weight_grad(a, w, ends, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gg.grouped_mm(a, b, ends, True, backend=backend)
        gg.grouped_mm_weight_grad(a, w, ends, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_triton_larger(dtype):
    """GPU block sizes (several tiles per expert, several K steps) for every dtype."""
    counts = torch.randint(0, 300, (8,))
    counts[torch.randperm(8)[:2]] = 0
    counts = counts.tolist()
    ends = _ends(counts, "cuda")
    a = _rows(counts, 17, 200, dtype, "cuda")
    b = _weights(8, True, dtype, "cuda", k=200, n=136)
    _check_mm(gg.grouped_mm(a, b, ends, True, backend="triton"), a, b, counts, True)
    g = _rows(counts, 17, 136, dtype, "cuda")
    _check_wgrad(gg.grouped_mm_weight_grad(g, a, ends, backend="triton"), g, a, counts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
def test_gpu_tma_weight_grad(dtype):
    """GPU tiles (128 x 256, 64-row chunks): several chunks per expert, partial last chunks,
    empty experts, NaN rows past the end; and no host synchronisation."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90+")
    counts = torch.randint(0, 300, (8,))
    counts[torch.randperm(8)[:2]] = 0
    counts[2] = 64 * 3  # whole chunks only
    counts = counts.tolist()
    ends = _ends(counts, "cuda")
    a = _rows(counts, 17, 200, dtype, "cuda")
    g = _rows(counts, 17, 264, dtype, "cuda")
    assert gg._can_use_tma_wgrad(g, a, ends)
    _check_wgrad(gg.grouped_mm_weight_grad(g, a, ends, backend="tma"), g, a, counts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gg.grouped_mm_weight_grad(g, a, ends, backend="tma")
    finally:
        torch.cuda.set_sync_debug_mode("default")
