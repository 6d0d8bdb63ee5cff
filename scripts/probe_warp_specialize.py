"""Does Triton's automatic warp specialization (``tl.range(..., warp_specialize=True)``) compile and
help on this GPU? A dense bf16 matmul with TMA-descriptor loads, with and without it, against cuBLAS.

    PYTHONPATH=. python scripts/probe_warp_specialize.py   # a CUDA GPU, sm90+
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = ((8192, 8192, 8192), (131072, 1536, 2048))
TILES = ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 4, 3))  # BM, BN, BK, warps, stages


@triton.jit
def _matmul_kernel(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   WARP_SPECIALIZE: tl.constexpr, GROUP: tl.constexpr):
    """``c = a @ b.T``, one tile per program, grouped tile order."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = pid // (GROUP * num_n) * GROUP
    group_size = min(num_m - first_m, GROUP)
    pm = first_m + (pid % (GROUP * num_n)) % group_size
    pn = (pid % (GROUP * num_n)) // group_size
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WARP_SPECIALIZE):
        acc = tl.dot(a_desc.load([pm * BM, k * BK]), b_desc.load([pn * BN, k * BK]).T, acc)
    c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


def time_tile(a, b, want, tile, ws: bool) -> str:
    """One tile configuration with or without warp specialization: time and error, or the failure."""
    (M, K), N = a.shape, b.shape[0]
    BM, BN, BK, warps, stages = tile
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    descs = (TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK]),
             TensorDescriptor.from_tensor(c, [BM, BN]))
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)

    def run():
        _matmul_kernel[grid](*descs, M, N, K, BM, BN, BK, ws, 8, num_warps=warps, num_stages=stages)

    try:
        run()
    except Exception as exc:  # a compile failure is a result here
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    err = float((c.float() - want).abs().max())
    ms = triton.testing.do_bench(run, warmup=20, rep=100)
    return f"{ms * 1e3:.0f} us, {2 * M * N * K / ms / 1e9:.0f} TFLOP/s, max error {err:.2g}"


def main():
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA GPU")
    for M, N, K in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ b.T, warmup=20, rep=100)  # noqa: B023 (called at once)
        tflops = 2 * M * N * K / ms / 1e9
        print(f"== M={M} N={N} K={K}: cuBLAS {ms * 1e3:.0f} us, {tflops:.0f} TFLOP/s", flush=True)
        want = a.float() @ b.float().T
        for tile in TILES:
            for ws in (False, True):
                BM, BN, BK, warps, stages = tile
                result = time_tile(a, b, want, tile, ws)
                print(f"  {BM}x{BN}x{BK}, {warps} warps, {stages} stages, warp_specialize={ws}: {result}",
                      flush=True)


if __name__ == "__main__":
    main()
