"""FastLaunch: which launches reuse a compiled kernel, and that reuse changes no result.

The CPU tests drive the dispatch logic with a stand-in for Triton's JIT function; the GPU test
launches a real kernel through both paths.
"""

import ctypes
import threading
import types

import pytest
import torch

from flashfusemoe import kernels
from flashfusemoe.kernels import activation, launch, permute, routing
from flashfusemoe.kernels.launch import FastLaunch


class FakeJit:
    """Records Triton-path launches; each returns a compiled kernel that records direct launches."""

    def __init__(self):
        self.params = [types.SimpleNamespace(name=n, default=d) for n, d in
                       (("src", None), ("n", None), ("BLOCK", None), ("FLAG", False))]
        self.jit_launches = []
        self.direct_launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_launches.append((grid, args, kwargs))
            return types.SimpleNamespace(run=lambda *a: self.direct_launches.append(a), function="fn",
                                         packed_metadata="meta")
        return run


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(FastLaunch, "enabled", True)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    jit = FakeJit()
    return jit, FastLaunch(jit)


def test_repeat_launch_calls_the_compiled_launcher(fake):
    jit, kernel = fake
    src = torch.zeros(64)
    kernel[(3,)](src, 32, BLOCK=16)
    assert len(jit.jit_launches) == 1 and not jit.direct_launches
    second = torch.ones(64)
    kernel[(5, 2)](second, 32, BLOCK=16)  # same key: another aligned fp32 tensor
    assert len(jit.jit_launches) == 1
    # grid padded to 3-D, XLA/torch's current stream, no launch metadata or hooks, then every
    # parameter in order: the positional ones (tensors as raw pointers), the constexpr, the
    # trailing default.
    assert jit.direct_launches == [
        (5, 2, 1, 1234, "fn", "meta", None, None, None, second.data_ptr(), 32, 16, False)
    ]


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int is 1", "int not multiple of 16",
                                    "another multiple of 16", "int64 width", "bool for int",
                                    "float for int", "constexpr", "launch option", "None"])
def test_a_new_specialization_goes_through_triton(fake, change):
    jit, kernel = fake
    src = torch.zeros(64, dtype=torch.float16)
    kernel[(1,)](src, 32, BLOCK=16)
    args, kwargs = [src, 32], {"BLOCK": 16}
    if change == "misaligned":
        args[0] = src[1:]  # 2 bytes off a 16-byte boundary
    elif change == "dtype":
        args[0] = src.view(torch.bfloat16)
    elif change == "int is 1":
        args[1] = 1
    elif change == "int not multiple of 16":
        args[1] = 33
    elif change == "another multiple of 16":  # keys hold ints by value
        args[1] = 48
    elif change == "int64 width":
        args[1] = 2**31 + 16
    elif change == "bool for int":  # True == 1 and 1.0 == 1 in Python, but Triton types them apart
        kernel[(1,)](src, 1, BLOCK=16)
        assert len(jit.jit_launches) == 2
        args[1] = True
    elif change == "float for int":
        kernel[(1,)](src, 1, BLOCK=16)
        assert len(jit.jit_launches) == 2
        args[1] = 1.0
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "launch option":
        kwargs["num_warps"] = 8
    else:
        args[0] = None
    before = len(jit.jit_launches)
    kernel[(1,)](*args, **kwargs)
    assert len(jit.jit_launches) == before + 1 and not jit.direct_launches
    kernel[(1,)](*args, **kwargs)  # and that specialization is kept
    assert len(jit.jit_launches) == before + 1 and len(jit.direct_launches) == 1


def test_other_devices_compile_their_own(fake, monkeypatch):
    jit, kernel = fake
    src = torch.zeros(16)
    kernel[(1,)](src, 16, BLOCK=16)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1, raising=False)
    kernel[(1,)](src, 16, BLOCK=16)
    assert len(jit.jit_launches) == 2 and not jit.direct_launches


def test_triton_path_while_off_or_hooked(fake, monkeypatch):
    jit, kernel = fake
    src = torch.zeros(16)
    monkeypatch.setattr(FastLaunch, "enabled", False)
    for _ in range(2):
        kernel[(1,)](src, 16, BLOCK=16)
    assert len(jit.jit_launches) == 2 and not kernel.compiled
    monkeypatch.setattr(FastLaunch, "enabled", True)
    kernel[(1,)](src, 16, BLOCK=16)
    monkeypatch.setattr(launch, "_hooks_installed", lambda: True)
    kernel[(1,)](src, 16, BLOCK=16)
    assert len(jit.jit_launches) == 4 and not jit.direct_launches


def test_specialization_table_is_bounded(fake, monkeypatch):
    jit, kernel = fake
    monkeypatch.setattr(launch, "_MAX_SPECIALIZATIONS", 3)
    src = torch.zeros(16)
    for n in range(5):
        kernel[(1,)](src, n, BLOCK=16)
    assert len(jit.jit_launches) == 5 and 1 <= len(kernel.compiled) <= 3
    kernel[(1,)](src, 4, BLOCK=16)  # the newest entry survives the clear
    assert len(jit.jit_launches) == 5 and len(jit.direct_launches) == 1


class FakeCLauncher:
    """Stands in for Triton's compiled C launcher (an object without ``__code__``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _fake_compiled(launch, **sizes):
    run = types.SimpleNamespace(launch=launch, launch_cooperative_grid=False, launch_pdl=True,
                                global_scratch_size=sizes.get("scratch", 0), profile_scratch_size=0)
    return types.SimpleNamespace(run=run, function="fn", packed_metadata="meta")


def _descriptor_wrapper(launcher, tensordesc_meta):
    """The shape of Triton 3.6's wrapper: a closure over the launcher and the descriptors' metadata."""
    def inner(*args):
        return launcher, tensordesc_meta
    return inner


def test_direct_launcher_calls_the_c_launcher_with_triton_s_leading_arguments():
    c = FakeCLauncher()
    direct = launch._direct_launcher(_fake_compiled(c), [])
    direct((3, 2, 1), 1234, [111, 32], (16, False))
    # grid, stream, function, cooperative, pdl, no scratch, metadata, no launch metadata or hooks
    assert c.calls == [(3, 2, 1, 1234, "fn", False, True, None, None, "meta", None, None, None,
                        111, 32, 16, False)]


def test_direct_launcher_encodes_each_descriptor_once(monkeypatch):
    from triton.tools.tensor_descriptor import TensorDescriptor

    encoded = []

    def fake_encode(desc, meta):
        encoded.append((desc.base.data_ptr(), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(launch, "_make_tensordesc_arg", fake_encode)
    c = FakeCLauncher()
    direct = launch._direct_launcher(_fake_compiled(_descriptor_wrapper(c, ["m0", "m1"])), [1, 3])
    w, other = torch.zeros(64, 32), torch.zeros(64, 32)
    a = TensorDescriptor(w, [64, 32], [32, 1], [16, 16])
    b = TensorDescriptor(w, [32, 64], [64, 1], [16, 16])  # same address, another shape: another map
    direct((1, 1, 1), 0, [7, a, 8, b], ())
    assert c.calls[-1][13:] == (7, "map2", 64, 32, 32, 1, 8, "map1", 32, 64, 64, 1)
    direct((1, 1, 1), 0, [7, a, 8, b], ())  # both maps reused
    assert len(encoded) == 2 and c.calls[-1] == c.calls[-2]
    direct((1, 1, 1), 0, [7, TensorDescriptor(other, [64, 32], [32, 1], [16, 16]), 8, b], ())
    assert len(encoded) == 3 and encoded[-1] == (other.data_ptr(), "m0")
    assert c.calls[-1][14] == "map3"


@pytest.mark.parametrize("case", ["scratch", "descriptor count", "metadata missing", "no launcher"])
def test_direct_launcher_declines_what_it_cannot_launch(case):
    c = FakeCLauncher()
    if case == "scratch":
        compiled = _fake_compiled(c, scratch=128)
        positions = []
    elif case == "descriptor count":
        compiled = _fake_compiled(_descriptor_wrapper(c, ["m0"]))
        positions = [0, 2]
    elif case == "metadata missing":  # descriptors lowered without TMA
        compiled = _fake_compiled(_descriptor_wrapper(c, [None]))
        positions = [0]
    else:
        compiled = _fake_compiled(_descriptor_wrapper(None, ["m0"]))
        positions = [0]
    assert launch._direct_launcher(compiled, positions) is None


def test_direct_launch_is_taken_and_can_be_turned_off(fake, monkeypatch):
    jit, kernel = fake
    c = FakeCLauncher()
    monkeypatch.setattr(launch, "_direct_launcher", lambda compiled, positions: launch._DirectLauncher(
        _fake_compiled(c), c, [], []))
    src = torch.zeros(16)
    for _ in range(2):
        kernel[(1,)](src, 16, BLOCK=16)
    assert len(c.calls) == 1 and not jit.direct_launches
    monkeypatch.setattr(FastLaunch, "direct", False)
    kernel[(1,)](src, 16, BLOCK=16)
    assert len(c.calls) == 1 and len(jit.direct_launches) == 1


def test_every_launched_kernel_is_wrapped():
    """Each module's kernels go through FastLaunch (helpers called inside kernels stay plain)."""
    from aot_specs import SPECS

    for module_name, specs in SPECS.items():
        for kernel, *_ in specs():
            assert isinstance(kernel, FastLaunch), (module_name, kernel)


@pytest.mark.gpu
def test_fast_and_triton_launches_agree(monkeypatch):
    """combine_rows through both paths, over changing alignments, sizes and weights."""
    torch.manual_seed(0)
    cases = []
    for n, d, offset in ((37, 64, 0), (64, 48, 1), (37, 64, 0), (1, 16, 3), (64, 48, 1)):
        rows = torch.randn(n * 2 * d + offset, device="cuda", dtype=torch.bfloat16)[offset:].view(n * 2, d)
        assign = torch.randperm(n * 2, device="cuda").to(torch.int32)
        weights = torch.rand(n, 2, device="cuda")
        cases.append((rows, assign, weights))
    for enabled in (True, False):
        monkeypatch.setattr(FastLaunch, "enabled", enabled)
        results = [permute.combine_rows(r, a, 2, weights=w) for r, a, w in cases * 2]
        if enabled:
            fast = results
            assert permute._combine_rows_kernel.compiled, "no launch reused a compiled kernel"
    for got, want in zip(fast, results):
        assert torch.equal(got, want)


@pytest.mark.skipif(not kernels.INTERPRET, reason="the interpreter's patching is what races")
def test_interpreted_launches_from_two_threads():
    """The interpreter patches triton.language for the duration of a kernel; without
    INTERPRETER_LOCK a second thread's kernel (a JAX callback on an XLA thread, say) sees it
    restored mid-run and fails. Unlocked (a mutation check by hand), it failed in 4 of 5 runs."""
    x = torch.randn(64, 16, dtype=torch.float64)
    r = torch.randn(8, 16, dtype=torch.float64)
    h = torch.randn(64, 32)
    errors = []

    def launch_many(fn):
        try:
            for _ in range(400):
                fn()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [
        threading.Thread(target=launch_many, args=(fn,))
        for fn in (lambda: routing.route_forward(x, r, None, 2, "softmax", True, None, None, 1.0),
                   lambda: activation.glu_forward(h, "swiglu"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["gathered", "fused_dgrad", "grouped"])
def test_launch_paths_agree_through_a_whole_step(monkeypatch, gemm):
    """A bf16 fwd+bwd (TMA-descriptor kernels on sm90) gives bitwise the same output and gradients
    through Triton's dispatch, FastLaunch with Triton's launcher, and FastLaunch's direct call of
    the C launcher, over fresh inputs (new addresses, so new descriptors) on each path."""
    import flashfusemoe

    N, D, F, E, K = 256, 128, 128, 4, 2

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * s[-1] ** -0.5).to(  # noqa: E731
            torch.bfloat16).requires_grad_(True)
        return mk(N, D), mk(E, D), mk(E, 2 * F, D), mk(E, D, F), torch.randn(N, D, device="cuda", generator=g)

    results = {}
    for path in ("triton", "fast", "direct", "direct"):
        monkeypatch.setattr(FastLaunch, "enabled", path != "triton")
        monkeypatch.setattr(FastLaunch, "direct", path == "direct")
        for seed in (0, 1, 0):
            x, wr, wu, wd, dy = inputs(seed)
            out = flashfusemoe.fused_moe(x, wr, wu, wd, K, gemm=gemm)
            grads = torch.autograd.grad(out, (x, wr, wu, wd), dy.to(out.dtype))
            got = [out.detach(), *grads]
            want = results.setdefault(seed, got)
            for name, a, b in zip(("out", "dx", "dw_router", "dw_up", "dw_down"), got, want):
                assert torch.equal(a, b), (path, seed, name)
    from flashfusemoe.kernels import gathered_gemm, grouped_gemm

    modules = (gathered_gemm, grouped_gemm)
    kernels = [k for m in modules for k in vars(m).values() if isinstance(k, FastLaunch)]
    directs = [e[2] for k in kernels for e in k.compiled.values() if e[2] is not None]
    assert directs, "no kernel was launched directly"
    if torch.cuda.get_device_capability()[0] >= 9 and gemm != "grouped":
        assert any(d.descs and d.desc_cache for d in directs), "no descriptor took the direct launcher"


@pytest.mark.gpu
def test_launch_on_a_thread_without_a_cuda_context():
    """A thread whose first CUDA work is a launch of a kernel loaded on another thread (torch's
    autograd worker after the JAX bridge ran every kernel first, say) has no current CUDA context;
    the launch makes the primary one current before encoding a new TMA descriptor there."""
    from flashfusemoe.kernels import gathered_gemm

    N, D, F, E, K = 64, 128, 128, 4, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    weights = [(torch.randn(E, D, F, device="cuda", generator=g) * D**-0.5).bfloat16() for _ in range(2)]
    ids = torch.rand(N, E, device="cuda", generator=g).topk(K, dim=1).indices.to(torch.int32)
    _, r2a, ends, _, _ = permute.expert_layout(ids, E)
    outs = [torch.empty(r2a.numel(), F, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    gathered_gemm.gathered_mm(src, weights[0], r2a, ends, K, out=outs[0])  # compiled, loaded, cached here
    torch.cuda.synchronize()
    driver = launch._libcuda()
    seen = {}

    def on_new_thread():
        ctx = ctypes.c_void_p()
        driver.cuCtxGetCurrent(ctypes.byref(ctx))
        seen["context before"] = ctx.value
        try:  # a new weight address: its descriptor is encoded on this thread
            gathered_gemm.gathered_mm(src, weights[1], r2a, ends, K, out=outs[1])
        except Exception as e:  # noqa: BLE001 (reported below)
            seen["error"] = e

    thread = threading.Thread(target=on_new_thread)
    thread.start()
    thread.join()
    assert seen["context before"] is None, "the new thread already had a CUDA context: nothing tested"
    assert "error" not in seen, seen.get("error")
    torch.cuda.synchronize()
    ref = gathered_gemm.gathered_mm(src, weights[1], r2a, ends, K)
    assert torch.equal(outs[1], ref)


class FakeDriver:
    """The four CUDA driver calls ``launch._ensure_context`` makes; ``current`` is the context."""

    def __init__(self, current=None):
        self.current, self.calls = current, []

    def cuCtxGetCurrent(self, ptr):  # noqa: N802 (the driver's names)
        self.calls.append("get")
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_void_p))[0] = self.current
        return 0

    def cuDeviceGet(self, ptr, ordinal):  # noqa: N802
        self.calls.append(("device", ordinal))
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int))[0] = 100 + ordinal
        return 0

    def cuDevicePrimaryCtxRetain(self, ptr, handle):  # noqa: N802
        self.calls.append(("retain", handle.value))
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_void_p))[0] = 0xC0FFEE
        return 0

    def cuCtxSetCurrent(self, ctx):  # noqa: N802
        self.calls.append(("set", ctx.value))
        self.current = ctx.value
        return 0


def test_ensure_context_sets_the_primary_context_once_per_thread_and_device(monkeypatch):
    driver = FakeDriver()
    monkeypatch.setattr(launch, "_libcuda", lambda: driver)

    def on_new_thread(devices):
        for device in devices:
            launch._ensure_context(device)

    thread = threading.Thread(target=on_new_thread, args=([0, 0, 1],))
    thread.start()
    thread.join()
    # device 0: no context, so the primary one is retained and made current; again: nothing; device
    # 1: a context is current by then, so it is left alone
    assert driver.calls == ["get", ("device", 0), ("retain", 100), ("set", 0xC0FFEE), "get"]
    driver.calls.clear()
    thread = threading.Thread(target=on_new_thread, args=([0],))  # another thread checks again
    thread.start()
    thread.join()
    assert driver.calls == ["get"]


def test_ensure_context_without_a_driver(monkeypatch):
    """Where the driver library cannot be loaded the check does nothing (and raises nothing)."""
    monkeypatch.setattr(launch, "_libcuda", lambda: None)
    outcome = []

    def on_new_thread():
        try:
            launch._ensure_context(0)
            outcome.append("returned")
        except Exception as e:  # noqa: BLE001 (reported below)
            outcome.append(e)

    thread = threading.Thread(target=on_new_thread)
    thread.start()
    thread.join()
    assert outcome == ["returned"]
