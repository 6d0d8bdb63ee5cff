"""What ``aot_compile.py`` compiles: ``(kernel, signature, constexprs, options)`` for every launched
kernel, ``options`` the launch's ``num_warps`` / ``num_stages`` / ``maxnreg`` where they are not Triton's
defaults (they set the shared memory the check in ``aot_compile.py`` sees).

Signatures are derived from each kernel's own parameters (``spec``): parameters given a value in
``constexprs`` are compile-time constants, ``*_ptr`` parameters point to the case's dtype, the rest
are ``i32``; ``types`` overrides single parameters.
"""

import inspect

import torch
import triton

from flashfusemoe.kernels import (
    activation,
    compute_dtype,
    grouped_gemm,
    next_power_of_2,
    permute,
    routing,
    row_blocks,
)

TRITON_DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int32: "i32"}
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def jit_function(kernel) -> triton.runtime.jit.JITFunction:
    """The ``JITFunction`` under ``FastLaunch`` (and ``autotune``/``heuristics``) wrappers."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _parameters(kernel) -> list[tuple[str, bool]]:
    """``(name, is_constexpr)`` of each parameter (under the interpreter, from the Python function)."""
    fn = kernel
    while hasattr(fn, "fn") and not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    if isinstance(fn, triton.runtime.jit.JITFunction):
        return [(p.name, p.is_constexpr) for p in fn.params]
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(fn).parameters.items()]


def launch_options(cfg: dict) -> dict:
    """The launch options in a wrapper's configuration dict."""
    return {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}


def spec(kernel, constexprs: dict, dtype: torch.dtype = torch.bfloat16, options: dict | None = None,
         **types) -> tuple:
    """``(kernel, signature, constexprs, options)``, the signature derived from the kernel's parameters."""
    signature = {}
    for name, is_constexpr in _parameters(kernel):
        if name in types:
            signature[name] = types[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif is_constexpr:
            raise ValueError(f"{kernel}: constexpr {name} has no value")
        elif name.endswith("_ptr"):
            signature[name] = "*" + TRITON_DTYPES[dtype]
        else:
            signature[name] = "i32"
    return kernel, signature, constexprs, options or {}


def _permute() -> list:
    specs = []
    for has_keep in (False, True):
        for padded in (False, True):
            specs.append(
                spec(
                    permute._expert_layout_kernel,
                    {"HAS_KEEP": has_keep, "PADDED": padded, "E_BLOCK": 64, "BLOCK": permute._LAYOUT_BLOCK},
                    torch.int32,
                    keep_ptr="*u8" if has_keep else "*i32",
                )
            )
    for dtype in FLOATS:
        block_r, block_d = row_blocks(4096, permute._GATHER_ELEMS, 256)
        block_n, block_s = row_blocks(4096, permute._SCATTER_ELEMS, 256)
        for two in (False, True):
            specs.append(
                spec(
                    permute._gather_rows_kernel,
                    {"TWO": two, "BLOCK_R": block_r, "BLOCK_D": block_d},
                    dtype,
                    row_to_assign_ptr="*i32",
                )
            )
            specs.append(
                spec(
                    permute._scatter_rows_kernel,
                    {"TWO": two, "BLOCK_N": block_n, "BLOCK_D": block_s},
                    dtype,
                    assign_to_row_ptr="*i32",
                )
            )
        acc = TRITON_DTYPES[compute_dtype(dtype)]
        sixteen = dtype in (torch.bfloat16, torch.float16)
        # The wrapper's own tiles (combine_blocks); narrow rows too where the router term's dot
        # stages its operands in shared memory (fp32 and fp64: largest).
        cases = [(4096, has_w, has_router) for has_w in (True, False) for has_router in (False, True)]
        if not sixteen:
            cases += [(d, has_w, True) for d in (1, 24) for has_w in (True, False)]
        for d, has_w, has_router in cases:
            block_n, block_d, block_e, warps = permute.combine_blocks(d, 128 if has_router else 0,
                                                                     dtype == torch.float64)
            consts = {
                "K": 8,
                "HAS_W": has_w,
                "HAS_ROUTER": has_router,
                "FP64": dtype == torch.float64,
                "ROUTER_TF32": sixteen,
                "ROUTER_16BIT": has_router and sixteen,
                "BLOCK_N": block_n,
                "BLOCK_D": block_d,
                "BLOCK_E": block_e,
            }
            specs.append(
                spec(
                    permute._combine_rows_kernel,
                    consts,
                    dtype,
                    {"num_warps": warps},
                    assign_to_row_ptr="*i32",
                    weights_ptr="*" + (acc if has_w else TRITON_DTYPES[dtype]),
                    logit_grad_ptr="*" + (acc if has_router and not sixteen else TRITON_DTYPES[dtype]),
                )
            )
    for dtype, num_experts, k in ((torch.bfloat16, 8, 2), (torch.float32, 128, 8), (torch.float64, 64, 6)):
        consts = {
            "K": k,
            "BLOCKS_PER_PROGRAM": 2,
            "BLOCK_N": 16,
            "BLOCK_K": next_power_of_2(k),
            "BLOCK_E": num_experts,
            "BLOCK_D": 64,
            "TABLE_ROWS": 64,
        }
        specs.append(
            spec(
                permute._layout_gather_kernel,
                consts,
                torch.int32,
                x_ptr="*" + TRITON_DTYPES[dtype],
                x_sorted_ptr="*" + TRITON_DTYPES[dtype],
            )
        )
    for dtype, weight_dtype in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        consts = {"FP64": weight_dtype == torch.float64, "BLOCK": 1024, "BLOCK_D": 64, "BLOCK_E": 64}
        specs.append(
            spec(
                permute._capacity_drop_kernel,
                consts,
                torch.int32,
                weights_ptr="*" + TRITON_DTYPES[weight_dtype],
                x_sorted_ptr="*" + TRITON_DTYPES[dtype],
            )
        )
    return specs


def _activation() -> list:
    specs = []
    for dtype in FLOATS:
        fp64 = dtype == torch.float64
        acc = "*" + TRITON_DTYPES[compute_dtype(dtype)]
        for code, _ in enumerate(activation.ACTIVATIONS):
            block_r, block_f = row_blocks(1024, 4096, 128)
            for copy_h in (False, True):
                specs.append(
                    spec(
                        activation._glu_forward_kernel,
                        {"ACT": code, "FP64": fp64, "COPY_H": copy_h, "BLOCK_R": block_r, "BLOCK_F": block_f},
                        dtype,
                    )
                )
            block_r, block_f = row_blocks(1024, 2048, 128)
            specs.append(
                spec(
                    activation._glu_backward_kernel,
                    {"ACT": code, "FP64": fp64, "BLOCK_R": block_r, "BLOCK_F": block_f},
                    dtype,
                    row_to_assign_ptr="*i32",
                    weights_ptr=acc,
                    grad_w_row_ptr=acc,
                )
            )
    return specs


def _routing() -> list:
    specs = []
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        acc = "*" + TRITON_DTYPES[compute_dtype(dtype)]
        route = {name: acc for name in ("bias_ptr", "logits_ptr", "weights_ptr")}
        # (sigmoid, bias, groups): softmax plain (Mixtral/Qwen), sigmoid + bias + groups (DeepSeek-V3).
        for sigmoid, bias, n_group, topk_group, num_experts, k in (
            (False, False, 0, 0, 64, 8),
            (True, True, 8, 4, 256, 8),
            (True, False, 0, 0, 16, 2),
            (False, True, 4, 2, 12, 3),
        ):
            block_e = routing._block_e(num_experts)
            cfg = routing._fwd_config(0, block_e, dtype, False)
            consts = {
                "K": k,
                "COUNTS": not bias,
                "SIGMOID": sigmoid,
                "HAS_BIAS": bias,
                "N_GROUP": n_group,
                "TOPK_GROUP": topk_group,
                "NORM": True,
                "DOT_IEEE": dtype != torch.bfloat16,
                "PACKED": compute_dtype(dtype) == torch.float32,
                "BLOCK_N": cfg["BLOCK_N"],
                "BLOCK_D": cfg["BLOCK_D"],
                "BLOCK_E": block_e,
                "BLOCK_K": next_power_of_2(k),
                "BLOCK_G": next_power_of_2(max(n_group, 1)),
            }
            specs.append(
                spec(
                    routing._route_fwd_kernel,
                    consts,
                    dtype,
                    launch_options(cfg),
                    ids_ptr="*i32",
                    counts_ptr="*i32",
                    scale="fp64",
                    **route,
                )
            )
        for sigmoid, norm, ext, num_experts, k in ((False, True, True, 64, 8), (True, False, False, 256, 8)):
            block_e = routing._block_e(num_experts)
            consts = {
                "K": k,
                "SIGMOID": sigmoid,
                "NORM": norm,
                "HAS_EXT": ext,
                "BLOCK_N": routing._block_n(0, block_e, False, 4096),
                "BLOCK_E": block_e,
                "BLOCK_K": next_power_of_2(k),
            }
            specs.append(
                spec(
                    routing._route_bwd_kernel,
                    consts,
                    dtype,
                    ids_ptr="*i32",
                    assign_to_row_ptr="*i32",
                    logits_ptr=acc,
                    grad_w_row_ptr=acc,
                    grad_ext_ptr=acc,
                    scale="fp64",
                )
            )
    return specs


def _grouped_gemm() -> list:
    specs = []
    for dtype in FLOATS:
        cfg = grouped_gemm._config(dtype, interpret=False)
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        for unit_stride in ("stride_bk", "stride_bn"):  # trans_b=True / trans_b=False
            consts = {"stride_ak": 1, "stride_on": 1, unit_stride: 1, **blocks, "BLOCK_E": 64}
            specs.append(spec(grouped_gemm._grouped_mm_kernel, consts, dtype, launch_options(cfg),
                              ends_ptr="*i32"))
        consts = {"stride_am": 1, "stride_bn": 1, "stride_on": 1, **blocks}
        specs.append(spec(grouped_gemm._grouped_wgrad_kernel, consts, dtype, launch_options(cfg),
                          ends_ptr="*i32"))
        for n in (256, 1408) if dtype in (torch.bfloat16, torch.float16) else ():  # both tile shapes
            cfg = grouped_gemm._tma_config(n, interpret=False)
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            name = TRITON_DTYPES[dtype]
            for out_t in (name, "fp32"):  # fp32: the gradient of float32 master weights
                specs.append(
                    spec(
                        grouped_gemm._grouped_wgrad_tma_kernel,
                        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                        dtype,
                        launch_options(cfg),
                        ends_ptr="*i32",
                        out_ptr=f"*{out_t}",
                        a_desc=f"tensordesc<{name}[{bk}, {bm}]>",
                        b_desc=f"tensordesc<{name}[{bk}, {bn}]>",
                    )
                )
    return specs


# module name -> its specs, one entry per module of flashfusemoe.kernels that launches kernels
def _gathered_gemm() -> list:
    from test_gathered_gemm import aot_specs  # (kept beside the kernels' tests)

    return aot_specs()


SPECS = {"permute": _permute, "activation": _activation, "routing": _routing, "grouped_gemm": _grouped_gemm,
         "gathered_gemm": _gathered_gemm}


def launched_kernels(module) -> list:
    """The module's ``FastLaunch`` kernels (helpers called inside kernels are plain ``@triton.jit``)."""
    from flashfusemoe.kernels.launch import FastLaunch

    return [v for v in vars(module).values() if isinstance(v, FastLaunch)]
