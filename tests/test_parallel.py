"""Expert parallelism over gloo: W = 2 and 4 spawned CPU ranks against the single-process layer.

Every rank draws the same full problem (weights, every rank's tokens, output gradients), runs the
EP layer on its tokens with its experts, and compares with the single-process layer on the
concatenated batch with the full weights: ``out``, ``x``'s gradient, its experts' gradients, and
the router (and shared expert) gradients summed over ranks, for the loss
``sum_r (out_r * g_r).sum() + aux terms``. float64 runs the torch path; float32 runs the Triton
kernels under the interpreter (``TRITON_INTERPRET=1``, which the children inherit). The cases of
one (W, dtype) run in one spawn to save process start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fast_interpreter import install as install_fast_interpreter
from moe_cases import case_rng, draw_options

import flashfusemoe
from flashfusemoe import parallel
from flashfusemoe.reference import moe_reference

D, F = 8, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init(rank: int, W: int, port: int):
    install_fast_interpreter()  # (a spawned rank does not run conftest)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))


def spawn(fn, W: int, *args, interpret: bool):
    """Runs ``fn(rank, W, port, *args)`` on W spawned gloo ranks (raises if any rank raised)."""
    with _env(TRITON_INTERPRET="1" if interpret else None):
        mp.start_processes(fn, args=(W, _free_port(), *args), nprocs=W, start_method="spawn")


# ---------------------------------------------------------------------------------------------
# One case, on one rank
# ---------------------------------------------------------------------------------------------


def _problem(case: dict, W: int, seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    E = case["E"]
    ns = case["ns"]
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    p = {
        "x": rnd(sum(ns), D),
        "router_weight": rnd(E, D) * 0.7,
        "w_up": rnd(E, 2 * F, D) / D**0.5,
        "w_down": rnd(E, D, F) / F**0.5,
        "g": rnd(sum(ns), D),
    }
    if case.get("identical_tokens"):  # every weight ties: capacity keeps the lowest global tokens.
        # Quarter-integer x and router weights make every logit exact, so the ties hold whatever
        # order a kernel sums in (the interpreter's dot rounds identical rows differently).
        p["x"] = ((p["x"][:1] * 4).round() / 4).expand_as(p["x"]).clone()
        p["router_weight"] = (p["router_weight"] * 4).round() / 4
    if case.get("shared"):
        p["shared_w_up"] = rnd(2 * F, D) / D**0.5
        p["shared_w_down"] = rnd(D, F) / F**0.5
        p["shared_gate_weight"] = rnd(1, D)
    if case.get("bias") is not None:
        p["expert_bias"] = case["bias"].float()
    elif case.get("sigmoid_bias"):
        p["expert_bias"] = torch.randn(E, generator=g).float() * 0.1
    return p


def _layer_kwargs(case: dict) -> dict:
    kw = dict(case.get("kw", {}))
    if case.get("shared"):
        kw.update(num_shared_experts=1, shared_expert_gate=True)
    if case.get("bias") is not None or case.get("sigmoid_bias"):
        kw["use_expert_bias"] = True
    return kw


def _loss(out, aux, g, case):
    loss = (out * g).sum()
    if case.get("aux"):
        loss = loss + 0.3 * aux["load_balance_loss"] + 0.7 * aux["z_loss"]
    return loss


def _run_case(rank: int, W: int, case: dict, seed: int, dtype) -> None:
    group = dist.group.WORLD
    p = _problem(case, W, seed, dtype)
    E, K = case["E"], case["K"]
    ns = case["ns"]
    lo, hi = sum(ns[:rank]), sum(ns[: rank + 1])
    El = E // W
    want_aux = bool(case.get("aux"))
    kw = _layer_kwargs(case)

    # Reference on the concatenated batch with the full weights: float64, the single-process layer;
    # float32 (the kernels, interpreted), the independent float64 loop of flashfusemoe.reference.
    ref = flashfusemoe.MoELayer(D, F, E, K, dtype=dtype, **kw)
    ref.load_state_dict({k: v for k, v in p.items() if k not in ("x", "g")}, strict=True)
    x_ref = p["x"].clone().requires_grad_(True)
    if dtype == torch.float64:
        res = ref(x_ref, return_aux=True)
    else:
        ref = ref.double()
        x_ref = p["x"].double().requires_grad_(True)
        o = ref.options
        shared = {n: getattr(ref, n) for n in ("shared_w_up", "shared_w_down", "shared_gate_weight")
                  if getattr(ref, n, None) is not None}
        res = moe_reference(x_ref, ref.router_weight, ref.w_up, ref.w_down, K, activation=o.activation,
                            score_func=o.score_func, norm_topk_prob=o.norm_topk_prob,
                            expert_bias=ref.expert_bias,
                            n_group=o.n_group, topk_group=o.topk_group,
                            routed_scaling_factor=o.routed_scaling_factor, capacity_factor=o.capacity_factor,
                            return_aux=True, **shared)
    _loss(res[0], res[1], p["g"].to(x_ref.dtype), case).backward()

    # EP layer: this rank's shard of the same state dict.
    ep = flashfusemoe.MoELayer(D, F, E, K, dtype=dtype, ep_group=group, **kw)
    full = ref.state_dict()
    ep.load_state_dict(parallel.shard_state_dict(full, rank, W))
    x = p["x"][lo:hi].clone().requires_grad_(True)
    call = torch.compile(ep, backend="aot_eager", fullgraph=True) if case.get("compile") else ep
    out, aux = call(x, return_aux=True)
    _loss(out, aux, p["g"][lo:hi], case).backward()

    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    name = case["name"]

    close = lambda a, b, what: torch.testing.assert_close(  # noqa: E731
        a, b.to(a.dtype), **tol, msg=lambda m: f"[{name}] rank {rank} {what}: {m}")
    close(out.detach(), res[0].detach()[lo:hi], "out")
    close(x.grad, x_ref.grad[lo:hi], "grad x")
    close(ep.w_up.grad, ref.w_up.grad[rank * El:(rank + 1) * El], "grad w_up")
    close(ep.w_down.grad, ref.w_down.grad[rank * El:(rank + 1) * El], "grad w_down")
    summed = [n for n, _ in ep.named_parameters() if n not in ("w_up", "w_down")]
    for n in summed:
        grad = dict(ep.named_parameters())[n].grad.clone()
        dist.all_reduce(grad, group=group)
        close(grad, dict(ref.named_parameters())[n].grad, f"grad {n} (summed over ranks)")
    assert torch.equal(aux["tokens_per_expert"].long(), res[1]["tokens_per_expert"].long()), name
    assert int(aux["dropped_tokens"]) == int(res[1]["dropped_tokens"]), name
    for key in ("load_balance_loss", "z_loss"):
        share = aux[key].detach().clone().reshape(1)
        dist.all_reduce(share, group=group)
        close(share[0], res[1][key].detach(), f"{key} (summed over ranks)")
    if case.get("kw", {}).get("capacity_factor") and not case.get("random"):  # the designed cases drop
        assert int(res[1]["dropped_tokens"]) > 0, name
    if want_aux and "expect_empty_rank" in case:  # the adversarial case really is adversarial
        loads = res[1]["tokens_per_expert"].view(W, El).sum(1)
        assert int(loads[case["expect_empty_rank"]]) == 0, loads
    gathered = parallel.gather_state_dict(ep.state_dict(), group)
    for k, v in full.items():  # noqa: B007
        assert torch.equal(gathered[k], v), k


def _cases_worker(rank: int, W: int, port: int, cases: list, seed: int, dtype_name: str,
                  bad_inputs: bool = False):
    _init(rank, W, port)
    try:
        if bad_inputs:
            _bad_inputs(rank)
            _expert_bias_update_sums_the_group(rank, W)
        dtype = getattr(torch, dtype_name)
        for i, case in enumerate(cases):
            try:
                _run_case(rank, W, case, seed + 1000 * i, dtype)
            except Exception as e:
                raise AssertionError(f"case {case['name']} (seed {seed + 1000 * i}):\n"
                                     f"{traceback.format_exc()}") from e
    finally:
        dist.destroy_process_group()


def _expert_bias_update_sums_the_group(rank: int, W: int) -> None:
    """Data-parallel replicas: ``update_expert_bias(rate, group=...)`` steps every rank's bias by
    the loads of all ranks' tokens. Rank r's tokens all pick expert r, so each rank alone would
    step differently from the group."""
    E = 2 * W
    layer = flashfusemoe.MoELayer(D, F, E, 1, use_expert_bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.router_weight.zero_()
        layer.router_weight[rank, 0] = 1.0
    x = torch.zeros(3 + rank, D, dtype=torch.float64)
    x[:, 0] = 1.0
    layer(x)
    loads = layer.last_routing_stats["tokens_per_expert"]
    assert loads.tolist() == [3 + rank if e == rank else 0 for e in range(E)], loads
    every = [torch.zeros_like(loads) for _ in range(W)]
    dist.all_gather(every, loads)
    total = sum(every)
    layer.update_expert_bias(0.25, group=dist.group.WORLD)
    expected = flashfusemoe.update_expert_bias(torch.zeros(E), total, 0.25)
    assert torch.equal(layer.expert_bias, expected), (rank, layer.expert_bias, expected)
    assert not torch.equal(expected, flashfusemoe.update_expert_bias(torch.zeros(E), loads, 0.25))


def _bias_to_rank(E: int, W: int, target: int) -> torch.Tensor:
    """A selection bias that sends every token to rank ``target``'s experts."""
    bias = torch.zeros(E)
    El = E // W
    bias[target * El:(target + 1) * El] = 100.0
    return bias


def _cases(W: int, full: bool) -> list:
    n = 6
    cases = [
        dict(name="top1", E=2 * W, K=1, ns=[n] * W, aux=True),
        dict(name="top2 uneven N", E=2 * W, K=2, ns=[n + r for r in range(W)], aux=True),
        dict(name="capacity", E=2 * W, K=2, ns=[n] * W, aux=True, kw=dict(capacity_factor=0.75)),
        dict(name="rank with N=0", E=2 * W, K=2, ns=[n] * (W - 1) + [0], aux=True),
        dict(name="capacity, identical tokens (ties across ranks)", E=2 * W, K=2, ns=[n] * W, aux=True,
             identical_tokens=True, kw=dict(capacity_factor=1.0)),
        dict(name="all tokens to rank 0's experts, rank W-1 receives none", E=2 * W, K=2, ns=[n] * W,
             aux=True, bias=_bias_to_rank(2 * W, W, 0), expect_empty_rank=W - 1),
    ]
    if full:
        cases += [
            dict(name="top4", E=4 * W, K=4, ns=[n] * W, aux=True),
            dict(name="shared expert", E=2 * W, K=2, ns=[n] * W, aux=True, shared=True),
            dict(name="sigmoid, bias, groups", E=4 * W, K=3, ns=[n] * W, aux=True, sigmoid_bias=True,
                 kw=dict(score_func="sigmoid", n_group=W, topk_group=2 if W > 2 else 1,
                         routed_scaling_factor=2.5)),
            dict(name="capacity tight, top1", E=2 * W, K=1, ns=[n] * W, aux=True,
                 kw=dict(capacity_factor=0.5)),
            dict(name="capacity under torch.compile(fullgraph=True)", E=2 * W, K=2, ns=[n] * W, aux=True,
                 kw=dict(capacity_factor=0.75), compile=True),
            dict(name="dropless under torch.compile(fullgraph=True), uneven N", E=2 * W, K=2,
                 ns=[n + 2 * r for r in range(W)], aux=True, compile=True),
            dict(name="capacity, all to rank 0", E=2 * W, K=2, ns=[n] * W, aux=True,
                 bias=_bias_to_rank(2 * W, W, 0), kw=dict(capacity_factor=1.0)),
            dict(name="all ranks N=0 but one", E=2 * W, K=2, ns=[0] * (W - 1) + [3], aux=True),
            dict(name="every rank N=0", E=2 * W, K=2, ns=[0] * W, aux=True),
            dict(name="bmm experts, recompute", E=2 * W, K=2, ns=[n] * W, aux=True,
                 kw=dict(gemm="bmm", recompute=True)),
        ]
    return cases


def _random_cases(W: int, count: int) -> list:
    """``count`` draws of ``moe_cases.draw_options`` on E = W, 2W or 3W experts, with a shared
    expert or not and per-rank token counts down to 0 (equal counts in capacity mode)."""
    cases = []
    for i in range(count):
        rng = case_rng(i)
        E = W * rng.choice([1, 2, 3])
        K = rng.randint(1, E)
        kw = draw_options(rng, E, K)
        bias = kw.pop("expert_bias", None)
        if "capacity_factor" in kw:
            ns = [rng.choice([3, 7])] * W
        else:  # (not all 0: the float32 run's reference has nothing to differentiate then)
            ns = [rng.choice([0, 3, 7]) for _ in range(W - 1)] + [rng.choice([3, 7])]
            rng.shuffle(ns)
        cases.append(dict(name=f"random {i}: E={E} K={K} ns={ns} {kw} bias={bias is not None}", E=E, K=K,
                          ns=ns, aux=True, kw=kw, bias=bias, shared=rng.random() < 0.3, random=True))
    return cases


@pytest.mark.parametrize("W", [2, 4])
def test_ep_matches_single_process_float64(W):
    """W=2 also runs the bad inputs (each must raise on every rank, before or at the first collective)."""
    spawn(_cases_worker, W, _cases(W, full=W == 2) + _random_cases(W, 2), torch.initial_seed() % (1 << 30),
          "float64", W == 2, interpret=False)


def test_ep_matches_reference_kernels_float32():
    """The Triton kernels (interpreted) on W=2 ranks; W=4 runs the same code on the torch path above."""
    seed = torch.initial_seed() % (1 << 30)
    spawn(_cases_worker, 2, _cases(2, full=False) + _random_cases(2, 1), seed, "float32", interpret=True)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _expect(exc, match: str, fn):
    with pytest.raises(exc, match=match):
        fn()


def _bad_inputs(rank: int):
    """Each bad input raises on every rank (W=2), before or at the first collective."""
    group = dist.group.WORLD
    f64 = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    x = f64(4, D)
    rw = f64(4, D)
    up, down = f64(2, 2 * F, D), f64(2, D, F)
    run = lambda rw=rw, up=up, down=down, **kw: flashfusemoe.fused_moe(  # noqa: E731
        x, rw, up, down, 2, ep_group=group, **kw)
    _expect(ValueError, r"E=5 experts.*W=2.*divisible", lambda: run(rw=f64(5, D)))
    _expect(ValueError, r"w_up must hold this rank's E/W=4/2=2 experts", lambda: run(
        up=f64(4, 2 * F, D)))
    _expect(ValueError, r"w_down must hold this rank's experts as \[E/W=2", lambda: run(
        down=f64(4, D, F)))
    _expect(ValueError, r"num_experts=3 must be divisible by the ep_group size W=2",
            lambda: flashfusemoe.MoELayer(D, F, 3, 1, ep_group=group))
    _expect(TypeError, r"ep_group must be a torch.distributed.ProcessGroup", lambda: flashfusemoe.fused_moe(
        x, rw, up, down, 2, ep_group="world"))
    _expect(ValueError, r"max_tokens_per_expert=8 is not supported with ep_group",
            lambda: run(gemm="bmm", max_tokens_per_expert=8))
    # Rank 1 has a router of 8 experts (and 4 local ones, consistent for itself): the group disagrees.
    if rank == 1:
        bad = dict(rw=f64(8, D), up=f64(4, 2 * F, D),
                   down=f64(4, D, F))
    else:
        bad = {}
    _expect(ValueError, r"rank \d disagrees with this rank on E: it has \d, this rank \d", lambda: run(**bad))
    # Capacity mode needs the same N on every rank.
    xc = f64(4 + rank, D)
    _expect(ValueError, r"disagrees with this rank on N \(capacity mode\)", lambda: flashfusemoe.fused_moe(
        xc, rw, up, down, 2, ep_group=group, capacity_factor=1.0))


def test_shard_state_dict():
    layer = flashfusemoe.MoELayer(D, F, 4, 1)
    with pytest.raises(ValueError, match="w_up has 4 experts, not divisible by world_size=3"):
        parallel.shard_state_dict(layer.state_dict(), 0, 3)
    model = torch.nn.ModuleDict({"a": flashfusemoe.MoELayer(D, F, 4, 1), "b": torch.nn.Linear(D, D),
                                 "c": flashfusemoe.MoELayer(D, F, 6, 1)})
    keys = flashfusemoe.layer.expert_keys(model)
    assert keys == ["a.w_up", "a.w_down", "c.w_up", "c.w_down"]
    full = model.state_dict()
    shard = parallel.shard_state_dict(full, 1, 2, keys=keys)
    assert torch.equal(shard["a.w_up"], full["a.w_up"][2:])
    assert torch.equal(shard["c.w_down"], full["c.w_down"][3:])
    assert shard["b.weight"] is full["b.weight"] and shard.keys() == full.keys()
    with pytest.raises(ValueError, match=r"state_dict has no expert weights \['w_up', 'w_down'\]"):
        parallel.shard_state_dict(full, 0, 2)


# ---------------------------------------------------------------------------------------------
# One rank, in process (gloo on CPU, NCCL on a GPU): the plain layer, and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_group(device):
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_ep_one_rank_equals_layer_and_compiles(one_rank_group, device, capacity_factor, dtype):
    """W=1: the EP layer is the plain layer (out and every gradient), also under
    torch.compile(fullgraph=True). bfloat16 (GPU: the interpreter's 16-bit dots are unreliable):
    each expert row is rounded before the K-sum."""
    E, K = 4, 2
    kw = dict(capacity_factor=capacity_factor, num_shared_experts=1, device=device, dtype=dtype)
    plain = flashfusemoe.MoELayer(D, F, E, K, **kw)
    ep = flashfusemoe.MoELayer(D, F, E, K, ep_group=one_rank_group, **kw)
    ep.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, D, device=device, dtype=dtype)
    g = torch.randn(2, 5, D, device=device, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    def run(layer, compiled=False):
        model = torch.nn.Sequential(torch.nn.LayerNorm(D, device=device, dtype=dtype), layer)
        model[0].weight.data.copy_(torch.linspace(0.5, 1.5, D))
        if compiled:
            backend = "inductor" if device == "cuda" else "aot_eager"
            model = torch.compile(model, backend=backend, fullgraph=True)
        for p in layer.parameters():
            p.grad = None
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        (out * g).sum().backward()
        return [out.detach(), xr.grad, *(p.grad.clone() for p in layer.parameters())]

    want = run(plain)
    for compiled in (False, True):
        for a, b in zip(run(ep, compiled), want):
            torch.testing.assert_close(a, b, **tol)
