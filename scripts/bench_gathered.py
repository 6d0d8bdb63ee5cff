"""Gathered expert GEMMs (flashfusemoe.kernels.gathered_gemm) against the passes they replace.

    PYTHONPATH=. python scripts/bench_gathered.py [--sweep] [--shapes fine seed ...] [--act swiglu]

bf16 on one CUDA device, random top-k routing. Per shape and kernel: the current sequence
(permute gather + grouped_gemm (torch._grouped_mm / TMA) + activation), the new kernel, both
with ``triton.testing.do_bench`` (median ms), the new kernel's useful TFLOP/s, and the relative
error of the new result against the current path's (||new - cur|| / ||cur||). ``--sweep`` then
times a few tile configurations of each new kernel at the fine and seed shapes (stops after
``--budget`` seconds in all).
"""

import argparse
import sys
import time

import torch
import triton

from flashfusemoe.kernels import activation, gathered_gemm, grouped_gemm, permute

SHAPES = {  # N, D, F, E, K
    "fine": (24576, 1536, 256, 128, 8),
    "mid": (16384, 2048, 1408, 64, 6),
    "sonic": (32768, 4096, 2048, 64, 4),
    "seed": (8192, 1024, 1536, 8, 2),
}
SWEEP = {
    "up": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, tma=False),
    ],
    "dgrad": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, tma=False),
    ],
    "wgrad": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=5),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, tma=False),
    ],
}


DEVICE = "cuda"


def bench(fn) -> float:
    if DEVICE != "cuda":  # --smoke: one timed call under the interpreter
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rel_err(new, cur) -> float:
    new, cur = new.float(), cur.float()
    return ((new - cur).norm() / cur.norm().clamp_min(1e-30)).item()


def setup(shape, act):
    N, D, F, E, K = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(N, D, device=DEVICE, generator=g).bfloat16()
    dy = torch.randn(N, D, device=DEVICE, generator=g).bfloat16()
    w_up = (torch.randn(E, 2 * F, D, device=DEVICE, generator=g) * D**-0.5).bfloat16()
    w_down = (torch.randn(E, D, F, device=DEVICE, generator=g) * F**-0.5).bfloat16()
    topk_ids = torch.rand(N, E, device=DEVICE, generator=g).topk(K, dim=1).indices.to(torch.int32)
    tw = torch.softmax(torch.randn(N, K, device=DEVICE, generator=g), dim=1)
    a2r, r2a, ends, _, _ = permute.expert_layout(topk_ids, E)
    return dict(x=x, dy=dy, w_up=w_up, w_down=w_down, tw=tw, a2r=a2r, r2a=r2a, ends=ends, K=K, act=act)


def current(s):
    """The current pass sequence; returns callables and their results."""
    K, act = s["K"], s["act"]

    def fwd():
        xs = permute.gather_rows(s["x"], s["r2a"], K)
        h = grouped_gemm.grouped_mm(xs, s["w_up"], s["ends"], True)
        return activation.glu_forward(h, act), h

    def gather_xdy():
        return permute.scatter_rows(s["x"], s["a2r"], K, second=s["dy"])

    xs, dys = gather_xdy()
    a, h = fwd()

    def dgrad():
        da = grouped_mm_nn(dys)
        return activation.glu_backward(h, da, act, s["r2a"], s["tw"])

    def grouped_mm_nn(dy_sorted):
        return grouped_gemm.grouped_mm(dy_sorted, s["w_down"], s["ends"], False)

    dh, aw, gw = dgrad()

    def wgrad_down():
        return grouped_gemm.grouped_mm_weight_grad(dys, aw, s["ends"])

    def wgrad_up():
        return grouped_gemm.grouped_mm_weight_grad(dh, xs, s["ends"])

    return dict(
        fwd=fwd,
        gather_xdy=gather_xdy,
        dgrad=dgrad,
        wgrad_down=wgrad_down,
        wgrad_up=wgrad_up,
        res=dict(a=a, h=h, dh=dh, aw=aw, gw=gw, gwd=wgrad_down(), gwu=wgrad_up()),
    )


def new(s, cfg=None):
    K, act = s["K"], s["act"]
    cfg = cfg or {}

    def fwd():
        return gathered_gemm.up_proj_glu(s["x"], s["w_up"], s["r2a"], s["ends"], K, act, config=cfg.get("up"))

    a, h = fwd()

    def dgrad():
        return gathered_gemm.gathered_dgrad_glu(
            s["dy"], s["w_down"], h, s["r2a"], s["ends"], s["tw"], K, act, config=cfg.get("dgrad")
        )

    dh, aw, gw = dgrad()

    def wgrad_down():
        return gathered_gemm.gathered_weight_grad(
            s["dy"], aw, s["r2a"], s["ends"], K, "a", config=cfg.get("wgrad")
        )

    def wgrad_up():
        return gathered_gemm.gathered_weight_grad(
            dh, s["x"], s["r2a"], s["ends"], K, "b", config=cfg.get("wgrad")
        )

    return dict(
        fwd=fwd,
        dgrad=dgrad,
        wgrad_down=wgrad_down,
        wgrad_up=wgrad_up,
        res=dict(a=a, h=h, dh=dh, aw=aw, gw=gw, gwd=wgrad_down(), gwu=wgrad_up()),
    )


def flops(shape):
    N, D, F, E, K = shape
    R = N * K
    return dict(
        fwd=2 * R * D * 2 * F, dgrad=2 * R * D * F, wgrad_down=2 * R * D * F, wgrad_up=2 * R * 2 * F * D
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--act", default="swiglu", choices=activation.ACTIVATIONS)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for the whole run incl. sweep")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        for k, (N, D, F, E, K) in list(SHAPES.items()):
            SHAPES[k] = (N // 512, D // 16, F // 16, min(E, 16), K)
        for kind in SWEEP:
            SWEEP[kind] = [{k: v for k, v in c.items() if k == "tma"} for c in SWEEP[kind][-2:]]
    t_start = time.time()
    print(
        f"device {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"act {args.act}, bf16, random routing"
    )
    print(
        f"{'shape':6} {'pass':11} {'current ms':>10} {'new ms':>8} {'speedup':>7} {'new TF/s':>8}  "
        "rel err (new vs current)"
    )
    for name in args.shapes:
        shape = SHAPES[name]
        s = setup(shape, args.act)
        cur, nw = current(s), new(s)
        fl = flops(shape)
        cr, nr = cur["res"], nw["res"]
        t_gather = bench(cur["gather_xdy"])
        rows = [
            (
                "fwd",
                bench(cur["fwd"]),
                bench(nw["fwd"]),
                f"a {rel_err(nr['a'], cr['a']):.1e} h {rel_err(nr['h'], cr['h']):.1e}",
            ),
            (
                "dgrad",
                bench(cur["dgrad"]),
                bench(nw["dgrad"]),
                f"dh {rel_err(nr['dh'], cr['dh']):.1e} aw {rel_err(nr['aw'], cr['aw']):.1e} "
                f"gw {rel_err(nr['gw'], cr['gw']):.1e}",
            ),
            (
                "wgrad_down",
                bench(cur["wgrad_down"]),
                bench(nw["wgrad_down"]),
                f"{rel_err(nr['gwd'], cr['gwd']):.1e}",
            ),
            (
                "wgrad_up",
                bench(cur["wgrad_up"]),
                bench(nw["wgrad_up"]),
                f"{rel_err(nr['gwu'], cr['gwu']):.1e}",
            ),
        ]
        tot_c = tot_n = 0.0
        for p, tc, tn, err in rows:
            tot_c += tc
            tot_n += tn
            print(f"{name:6} {p:11} {tc:10.3f} {tn:8.3f} {tc / tn:7.2f} {fl[p] / tn / 1e9:8.1f}  {err}")
        print(
            f"{name:6} {'x,dy gather':11} {t_gather:10.3f} {'-':>8}  "
            "(bwd scatter_rows, removed by the new path)"
        )
        tot_c += t_gather
        print(f"{name:6} {'TOTAL':11} {tot_c:10.3f} {tot_n:8.3f} {tot_c / tot_n:7.2f}")
        sys.stdout.flush()
        del s, cur, nw
        _empty_cache()

    if args.sweep:
        print("\nsweep (new kernels, ms; the first config of each kind is the default)")
        for name in ("fine", "seed", "mid"):
            shape = SHAPES[name]
            s = setup(shape, args.act)
            fl = flops(shape)
            for kind, passes in (
                ("up", ("fwd",)),
                ("dgrad", ("dgrad",)),
                ("wgrad", ("wgrad_down", "wgrad_up")),
            ):
                for cfg in SWEEP[kind]:
                    if time.time() - t_start > args.budget:
                        print("(budget reached, sweep stopped)")
                        return
                    try:
                        nw = new(s, {kind: cfg})
                        times = [bench(nw[p]) for p in passes]
                        desc = " ".join(
                            f"{p} {t:.3f} ({fl[p] / t / 1e9:.0f} TF/s)" for p, t in zip(passes, times)
                        )
                    except Exception as exc:  # a config that does not fit (shared memory, registers)
                        desc = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    print(f"{name:6} {kind:6} {cfg}: {desc}")
                    sys.stdout.flush()
            del s
            _empty_cache()
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
