"""``core.forward``/``core.backward`` with destinations: results written in place change nothing.

The JAX bridge passes its output buffers, so the core writes ``out``, ``h``, the routing outputs,
the layout maps and every gradient straight into them (bf16 weight gradients through the TMA
kernel, fp32 ones copied).
"""

import pytest
import torch

from flashfusemoe import core
from flashfusemoe.config import MoEOptions
from flashfusemoe.functional import make_plan
from tests.moe_cases import random_moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_into_writes_in_place_and_changes_nothing(device, gemm, dtype):
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=dtype, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm)
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    grad_out = torch.randn_like(x)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)
    grads = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                          plan)

    results = (*outputs, *residuals)
    into = [torch.full_like(r, -7) for r in results]  # every buffer garbage-filled
    n_out = len(core.Outputs._fields)
    outputs2, residuals2, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan,
                                           outputs_into=core.Outputs(*into[:n_out]),
                                           residuals_into=core.Residuals(*into[n_out:]))
    in_place = {i for i, r in enumerate((*outputs2, *residuals2)) if r.data_ptr() == into[i].data_ptr()}
    # out, h, and the routing outputs on every path; the dropless layout's maps too
    assert in_place >= ({0, 1, 4, 5, 9} | ({2, 3, 6, 7, 8} if gemm != "bmm" else set()))
    for got, want in zip((*outputs2, *residuals2), results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    into = [torch.full_like(g, float("nan")) for g in grads]
    grads2 = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                           plan, into=core.Grads(*into))
    assert all(got is dst for got, dst in zip(grads2, into, strict=True))
    for got, want in zip(grads2, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_destination_that_does_not_fit_raises(device):
    x, router_weight, w_up, w_down = random_moe(12, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm="grouped")
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    wrong_dtype = core.Outputs(out=torch.empty(12, 16, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"must be a contiguous \(12, 16\) torch.float32"):
        core.forward(x, router_weight, w_up, w_down, None, opts, plan, outputs_into=wrong_dtype)
    not_contiguous = core.Residuals(h=torch.empty(16, 24, device=device).t())  # [24, 16], strided
    with pytest.raises(ValueError, match="h_copy must be a contiguous"):
        core.forward(x, router_weight, w_up, w_down, None, opts, plan, residuals_into=not_contiguous)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)
    with pytest.raises(ValueError, match="Grads.router_weight must be a contiguous"):
        core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, torch.randn_like(x), None,
                      opts, plan, into=core.Grads(router_weight=torch.empty(4, 17, device=device)))


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad"])
def test_recompute_gives_bitwise_the_same_gradients(device, gemm):
    """The backward's recompute of h runs the forward's own kernel, so nothing changes by a bit."""
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=torch.float32, device=device)
    grad_out = torch.randn_like(x)
    grads = []
    for recompute in (False, True):
        opts = MoEOptions(top_k=2, gemm=gemm, recompute=recompute)
        plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
        outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)
        assert residuals.h.shape[0] == (0 if recompute else 80)
        grads.append(core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None,
                                   opts, plan))
    for name, without, with_ in zip(core.Grads._fields, *grads, strict=True):
        assert torch.equal(without, with_), f"{gemm}: grad of {name} changed with recompute=True"


@pytest.mark.parametrize("recompute", [False, True])
def test_gathered_backward_lays_out_no_rows(device, monkeypatch, recompute):
    """``gemm="gathered"``: the backward reads x and dy by token index; no [N*K, D] copy is made."""
    from flashfusemoe.kernels import permute

    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm="gathered", recompute=recompute)
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan)

    def no_copy(*args, **kwargs):
        raise AssertionError("the gathered backward laid out token rows")

    monkeypatch.setattr(permute, "scatter_rows", no_copy)
    monkeypatch.setattr(permute, "gather_rows", no_copy)
    grad_out = torch.randn_like(x)
    grads = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                          plan)
    assert all(torch.isfinite(g).all() for g in grads)


def _within(t, buffer) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buffer.nbytes


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_scratch_lives_in_the_w_up_gradient_destination(device, monkeypatch, gemm):
    """A caller's w_up-gradient buffer (the JAX bridge's) holds ``a * w`` and the laid-out dy until
    the gradient overwrites it: two [N*K, *] allocations less. The results are those computed
    without it. (E * 2F * D = 8192 holds both for the R = 48 rows of the dropless layout and the
    padded layout's 96.)"""
    from flashfusemoe.kernels import activation, gathered_gemm, permute

    x, router_weight, w_up, w_down = random_moe(24, 32, 32, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm)
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    grad_out = torch.randn_like(x)
    outputs, residuals, plan = core.forward(x, router_weight, w_up, w_down, None, opts, plan, allow_grow=True)
    want = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts,
                         plan)
    row_copies, a_weighted = [], []
    for name in ("scatter_rows", "gather_rows"):
        copy = getattr(permute, name)

        def spy(*args, copy=copy, out=None, **kwargs):
            row_copies.append(out)
            return copy(*args, out=out, **kwargs)

        monkeypatch.setattr(permute, name, spy)
    for module, name in ((activation, "glu_backward"), (gathered_gemm, "sorted_dgrad_glu")):
        glu = getattr(module, name)

        def glu_spy(*args, glu=glu, a_weighted_out=None, **kwargs):
            a_weighted.append(a_weighted_out)
            return glu(*args, a_weighted_out=a_weighted_out, **kwargs)

        monkeypatch.setattr(module, name, glu_spy)
    into = core.Grads(w_up=torch.full_like(w_up, float("nan")))
    got = core.backward(x, router_weight, w_up, w_down, outputs.logits, residuals, grad_out, None, opts, plan,
                        into=into)
    assert got.w_up is into.w_up
    assert len(a_weighted) == 1 and _within(a_weighted[0], into.w_up)
    if gemm == "gathered":
        assert row_copies == []
    else:  # dy, then x laid out on its own
        assert len(row_copies) == 2 and _within(row_copies[0], into.w_up) and row_copies[1] is None
    for name, a, b in zip(core.Grads._fields, got, want, strict=True):
        assert torch.equal(a, b), name


def test_scratch_in_places_views_end_to_end_or_the_largest_alone():
    buffer = torch.empty(64, dtype=torch.float32)  # 256 bytes
    small, large = ((3,), torch.float32), ((8, 4), torch.float32)  # 12 and 128 bytes
    a, b = core._scratch_in(buffer, small, large)
    assert a.data_ptr() == buffer.data_ptr() and b.data_ptr() == buffer.data_ptr() + 16  # 16-byte aligned
    assert a.shape == (3,) and b.shape == (8, 4) and b.dtype == torch.float32
    a, b = core._scratch_in(buffer, ((70,), torch.float32), ((40,), torch.float64))  # 280, 320: neither fits
    assert a is None and b is None
    a, b = core._scratch_in(buffer, ((60,), torch.float32), ((30,), torch.float32))  # 240 + 120: one fits
    assert a is not None and a.data_ptr() == buffer.data_ptr() and b is None
    assert core._scratch_in(None, small) == [None]
    assert core._scratch_in(buffer[::2], small) == [None]  # not contiguous


@pytest.mark.parametrize("gemm", ["gathered", "fused_dgrad"])
@pytest.mark.parametrize("recompute", [False, True])
def test_up_projection_reads_x_by_token_index(device, monkeypatch, gemm, recompute):
    """``"gathered"`` and ``"fused_dgrad"``: the forward lays out no x rows (the layout kernel gets
    a zero-width x) and runs no separate GLU; ``h`` is written straight into its destination."""
    from flashfusemoe.kernels import activation, permute

    widths = []
    layout_and_gather = permute.layout_and_gather

    def spy(x, *args, **kwargs):
        widths.append(x.shape[1])
        return layout_and_gather(x, *args, **kwargs)

    def no_call(*args, **kwargs):
        raise AssertionError("a row copy or a separate GLU ran in the forward")

    monkeypatch.setattr(permute, "layout_and_gather", spy)
    for name in ("scatter_rows", "gather_rows"):
        monkeypatch.setattr(permute, name, no_call)
    monkeypatch.setattr(activation, "glu_forward", no_call)
    x, router_weight, w_up, w_down = random_moe(40, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm, recompute=recompute)
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    h_into = None if recompute else torch.full((80, 16), float("nan"), device=device)
    outputs, residuals, _ = core.forward(x, router_weight, w_up, w_down, None, opts, plan,
                                         residuals_into=core.Residuals(h=h_into))
    assert widths == [0]
    if not recompute:
        assert residuals.h is h_into and torch.isfinite(h_into).all()
    assert torch.isfinite(outputs.out).all()


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_forward_frees_the_laid_out_rows_before_the_glu(device, monkeypatch, gemm):
    """The laid-out x [N*K, D] is freed once the up-projection's GEMM is enqueued: it is gone when
    the GLU runs (so it, h and a are never alive together)."""
    import weakref

    from flashfusemoe.kernels import activation, permute

    refs, alive_at_glu = [], []
    for name in ("layout_and_gather", "gather_rows"):
        copy = getattr(permute, name)

        def spy(*args, copy=copy, **kwargs):
            result = copy(*args, **kwargs)
            refs.append(weakref.ref(result[0] if isinstance(result, tuple) else result))
            return result

        monkeypatch.setattr(permute, name, spy)
    glu_forward = activation.glu_forward

    def glu_spy(*args, **kwargs):
        alive_at_glu.append([ref() is not None for ref in refs])
        return glu_forward(*args, **kwargs)

    monkeypatch.setattr(activation, "glu_forward", glu_spy)
    x, router_weight, w_up, w_down = random_moe(24, 16, 8, 4, dtype=torch.float32, device=device)
    opts = MoEOptions(top_k=2, gemm=gemm)
    plan = make_plan(opts, x.shape[0], router_weight.shape[0], x.shape[1], w_down.shape[2])
    core.forward(x, router_weight, w_up, w_down, None, opts, plan, allow_grow=True)
    assert len(refs) == 1 and alive_at_glu == [[False]]
