"""The JAX half of the main demo (``make demo`` runs it after ``flashfusemoe.demo``).

    python -m jax_bridge.demo            # seed shape in bf16 on a GPU, the demo's small f32 shape on CPU
    python -m jax_bridge.demo --shape 48 16 24 4 2 --gemm bmm

One problem through torch-native ``flashfusemoe.fused_moe``, the JAX bridge and both references
(``jax_bridge.compare``): the bridge must be bit-identical to torch-native and near both
references. Exit status 1 when a bound breaks.
"""

from __future__ import annotations

import argparse
import sys

from flashfusemoe.config import GEMMS
from jax_bridge import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_bridge.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, metavar=("N", "D", "F", "E", "K"), default=None,
                        help="default: flashfusemoe.demo's (the seed shape on a GPU, a small one on CPU)")
    parser.add_argument("--gemm", default="grouped", choices=GEMMS,
                        help="'auto' resolves by one shape rule, in torch and JAX alike")
    args = parser.parse_args(argv)
    print("JAX bridge: one problem through torch-native, the bridge and both references")
    compare_args = ["--gemm", args.gemm]
    if args.shape is not None:
        compare_args += ["--shape", *map(str, args.shape)]
    if compare.main(compare_args):
        print("FAILED: the JAX bridge comparison broke a bound", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
