"""Gathered expert GEMMs (flashfusemoe.kernels.gathered_gemm) against the passes they replace.

    PYTHONPATH=. python scripts/bench_gathered.py [--sweep] [--shapes fine seed ...] [--act swiglu]

bf16 on one CUDA device, random top-k routing. Per shape and kernel: the current sequence
(permute gather + grouped_gemm (torch._grouped_mm / TMA) + activation), the new kernel, both
with ``triton.testing.do_bench`` (median ms), the new kernel's useful TFLOP/s, and the relative
error of the new result against the current path's (||new - cur|| / ||cur||). ``dgrad_mm`` is
``gathered_mm`` + ``activation.glu_backward`` (the gathered GEMM without the fused epilogue). The
backward summary names the fastest mix of current and new passes (the current ones need the
x/dy scatter). ``--sweep`` then times tile configurations of each new kernel at the fine, seed
and mid shapes (stops after ``--budget`` seconds in all).
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
    "mixtral": (16384, 4096, 14336, 8, 2),  # --dgrad only (benchmarks.hf's Mixtral-shaped layer)
}
# --dgrad: sorted_dgrad_glu (dy laid out, TMA rows) tiles against grouped_mm + glu_backward
DGRAD_SORTED = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SPLIT=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5, EPI_SPLIT=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, EPI_SPLIT=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, EPI_SPLIT=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, EPI_SPLIT=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=1, N_ACC=2),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SPLIT=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4, EPI_SPLIT=1),
    # two or more CTAs per SM (registers capped, <= ~110 KB of shared memory): one CTA's epilogue
    # overlaps another's main loop
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SPLIT=2, maxnreg=128),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2, EPI_SPLIT=2, maxnreg=128),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4, EPI_SPLIT=2, maxnreg=128),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=2, maxnreg=128),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SPLIT=4, maxnreg=128),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, EPI_SPLIT=2, maxnreg=168),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, EPI_SPLIT=1, maxnreg=168),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, EPI_SPLIT=2, maxnreg=128),
]
SWEEP = {
    "up": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=6),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    ],
    "dgrad": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=2),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5, EPI_SPLIT=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, EPI_SPLIT=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=2, N_ACC=2),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4, EPI_SPLIT=1),
        # two CTAs per SM (<= ~110 KB shared memory each): one's epilogue overlaps the other's loop
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, EPI_SPLIT=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3, EPI_SPLIT=4),
    ],
    "mm": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    ],
    "wgrad": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=6),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=6),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=5, IDX64=True),
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

    def scatter2():
        return permute.scatter_rows(s["x"], s["a2r"], K, second=s["dy"])

    def scatter1():
        return permute.scatter_rows(s["dy"], s["a2r"], K)

    xs, dys = scatter2()
    a, h = fwd()

    def dgrad():
        da = grouped_gemm.grouped_mm(dys, s["w_down"], s["ends"], False)
        return activation.glu_backward(h, da, act, s["r2a"], s["tw"])

    dh, aw, gw = dgrad()

    def mm():
        return grouped_gemm.grouped_mm(dys, s["w_down"], s["ends"], False)

    def wgrad_down():
        return grouped_gemm.grouped_mm_weight_grad(dys, aw, s["ends"])

    def wgrad_up():
        return grouped_gemm.grouped_mm_weight_grad(dh, xs, s["ends"])

    return dict(
        fwd=fwd,
        mm=mm,
        scatter2=scatter2,
        scatter1=scatter1,
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

    def dgrad_mm():
        da = gathered_gemm.gathered_mm(s["dy"], s["w_down"], s["r2a"], s["ends"], K, config=cfg.get("mm"))
        return activation.glu_backward(h, da, act, s["r2a"], s["tw"])

    dh, aw, gw = dgrad()
    dh2, aw2, gw2 = dgrad_mm()

    def mm():
        return gathered_gemm.gathered_mm(s["dy"], s["w_down"], s["r2a"], s["ends"], K, config=cfg.get("mm"))

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
        dgrad_mm=dgrad_mm,
        mm=mm,
        wgrad_down=wgrad_down,
        wgrad_up=wgrad_up,
        res=dict(a=a, h=h, dh=dh, aw=aw, gw=gw, dh2=dh2, aw2=aw2, gw2=gw2, gwd=wgrad_down(), gwu=wgrad_up()),
    )


def dgrad_sweep(shapes, act, budget, t_start):
    """``sorted_dgrad_glu`` over ``DGRAD_SORTED`` against the unfused pair on the same scattered dy."""
    print("\ndgrad: grouped_mm + glu_backward (cur) | gathered_dgrad_glu (gth) | sorted_dgrad_glu tiles, ms")
    for name in shapes:
        if not _dgrad_shape(name, act, budget, t_start):
            print("(budget reached, sweep stopped)")
            return
        _empty_cache()


def _dgrad_shape(name, act, budget, t_start) -> bool:
    shape = SHAPES[name]
    s = setup(shape, act)
    K, w_down, r2a, ends, tw = s["K"], s["w_down"], s["r2a"], s["ends"], s["tw"]
    dys = permute.scatter_rows(s["dy"], s["a2r"], K)
    h = grouped_gemm.grouped_mm(permute.gather_rows(s["x"], r2a, K), s["w_up"], ends, True)

    def cur():
        da = grouped_gemm.grouped_mm(dys, w_down, ends, False)
        return activation.glu_backward(h, da, act, r2a, tw)

    ref = cur()
    fl = flops(shape)["dgrad"]
    t_mm = bench(lambda: grouped_gemm.grouped_mm(dys, w_down, ends, False))
    t_cur = bench(cur)
    t_gth = bench(lambda: gathered_gemm.gathered_dgrad_glu(s["dy"], w_down, h, r2a, ends, tw, K, act))
    print(f"{name:7} cur {t_cur:.3f} (da alone {t_mm:.3f}, {fl / t_mm / 1e9:.0f} TF/s)  gth {t_gth:.3f}")
    for cfg in DGRAD_SORTED:
        if time.time() - t_start > budget:
            return False

        run_cfg = {"maxnreg": None, **cfg}  # (the fixed configuration caps the registers)

        def fn(run_cfg=run_cfg):
            return gathered_gemm.sorted_dgrad_glu(dys, w_down, h, r2a, ends, tw, K, act, config=run_cfg)

        try:
            got = fn()
            t = bench(fn)
            err = " ".join(f"{k} {rel_err(g, r):.1e}" for k, g, r in zip(("dh", "aw", "gw"), got, ref))
            desc = f"{t:.3f} ({t_cur / t:.2f}x cur, {fl / t / 1e9:.0f} TF/s) {err}"
        except Exception as exc:  # a config that does not fit (shared memory, registers)
            desc = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        print(f"{name:7} sorted {cfg}: {desc}")
        sys.stdout.flush()
    return True


def best_backward(t):
    """The fastest mix of current and new backward passes (ms, description): the current passes
    need the scatter of dy (dgrad, wgrad_down) and of x (wgrad_up)."""
    best = None
    for dg in ("cur", "new", "mm"):
        for wd in ("cur", "new"):
            for wu in ("cur", "new"):
                need = (dg == "cur" or wd == "cur") + (wu == "cur")
                scatter = (0.0, t["scatter1"], t["scatter2"])[need]
                dg_t = {"cur": t["dgrad_cur"], "new": t["dgrad_new"], "mm": t["dgrad_mm"]}[dg]
                total = scatter + dg_t + t[f"wgrad_down_{wd}"] + t[f"wgrad_up_{wu}"]
                desc = f"dgrad {dg}, wgrad_down {wd}, wgrad_up {wu}, scatter of {need} source(s)"
                if best is None or total < best[0]:
                    best = (total, desc)
    return best


def flops(shape):
    N, D, F, E, K = shape
    R = N * K
    return dict(
        fwd=2 * R * D * 2 * F,
        dgrad=2 * R * D * F,
        mm=2 * R * D * F,
        wgrad_down=2 * R * D * F,
        wgrad_up=2 * R * 2 * F * D,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["fine", "mid", "sonic", "seed"], choices=list(SHAPES))
    parser.add_argument("--act", default="swiglu", choices=activation.ACTIVATIONS)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--dgrad", action="store_true", help="only the sorted_dgrad_glu tile sweep")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for the whole run incl. sweep")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        for k, (N, D, F, E, K) in list(SHAPES.items()):
            SHAPES[k] = (N // 512, D // 16, F // 16, min(E, 16), K)
        DGRAD_SORTED[:] = [{"EPI_SPLIT": c["EPI_SPLIT"]} for c in DGRAD_SORTED[:2]] + [{"maxnreg": 128}]
        for kind in SWEEP:
            SWEEP[kind] = [
                {k: v for k, v in c.items() if k in ("tma", "EPI_SPLIT", "IDX64", "N_ACC")}
                for c in SWEEP[kind][-2:]
            ]
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
    if args.dgrad:
        dgrad_sweep(args.shapes, args.act, args.budget, t_start)
        print(f"total {time.time() - t_start:.0f} s")
        return
    for name in args.shapes:
        shape = SHAPES[name]
        s = setup(shape, args.act)
        cur, nw = current(s), new(s)
        fl = flops(shape)
        cr, nr = cur["res"], nw["res"]
        t = {k: bench(cur[k]) for k in ("scatter1", "scatter2")}
        rows = [
            ("fwd", "fwd", f"a {rel_err(nr['a'], cr['a']):.1e} h {rel_err(nr['h'], cr['h']):.1e}"),
            (
                "dgrad",
                "dgrad",
                f"dh {rel_err(nr['dh'], cr['dh']):.1e} aw {rel_err(nr['aw'], cr['aw']):.1e} "
                f"gw {rel_err(nr['gw'], cr['gw']):.1e}",
            ),
            (
                "dgrad_mm",
                "dgrad",
                f"dh {rel_err(nr['dh2'], cr['dh']):.1e} aw {rel_err(nr['aw2'], cr['aw']):.1e} "
                f"gw {rel_err(nr['gw2'], cr['gw']):.1e}",
            ),
            ("mm", "mm", "(da alone: gathered_mm vs grouped_mm on scattered dy)"),
            ("wgrad_down", "wgrad_down", f"{rel_err(nr['gwd'], cr['gwd']):.1e}"),
            ("wgrad_up", "wgrad_up", f"{rel_err(nr['gwu'], cr['gwu']):.1e}"),
        ]
        for p, cur_p, err in rows:
            tc = t.get(f"{cur_p}_cur") or bench(cur[cur_p])
            tn = bench(nw[p])
            t[f"{cur_p}_cur"], t[f"{p}_new" if p != "dgrad_mm" else "dgrad_mm"] = tc, tn
            print(f"{name:6} {p:11} {tc:10.3f} {tn:8.3f} {tc / tn:7.2f} {fl[cur_p] / tn / 1e9:8.1f}  {err}")
        print(f"{name:6} {'scatter x,dy':11} {t['scatter2']:10.3f}   (one source: {t['scatter1']:.3f})")
        bwd_cur = t["scatter2"] + t["dgrad_cur"] + t["wgrad_down_cur"] + t["wgrad_up_cur"]
        bwd_new = t["dgrad_new"] + t["wgrad_down_new"] + t["wgrad_up_new"]
        best, desc = best_backward(t)
        print(f"{name:6} fwd part    current {t['fwd_cur']:.3f}  new {t['fwd_new']:.3f}")
        print(
            f"{name:6} bwd part    current {bwd_cur:.3f}  all new {bwd_new:.3f}  best mix {best:.3f} ({desc})"
        )
        sys.stdout.flush()
        del s, cur, nw
        _empty_cache()

    if args.sweep:
        print("\nsweep (new kernels, ms)")
        for name in ("fine", "seed", "mid"):
            shape = SHAPES[name]
            s = setup(shape, args.act)
            fl = flops(shape)
            fl["dgrad_mm"] = fl["dgrad"]
            for kind, passes in (
                ("up", ("fwd",)),
                ("dgrad", ("dgrad",)),
                ("mm", ("dgrad_mm",)),
                ("wgrad", ("wgrad_down", "wgrad_up")),
            ):
                default = gathered_gemm._config(
                    "wgrad_a" if kind == "wgrad" else kind, torch.bfloat16, shape[2]
                )
                print(f"{name:6} {kind:6} default {default}")
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
