"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch
from moe_cases import random_moe, rel_err

import flashfusemoe
from flashfusemoe import ops
from flashfusemoe.config import MoEOptions
from flashfusemoe.core import Plan


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_opcheck(gemm):
    x, r, u, d = (t.requires_grad_(True) for t in random_moe(N=8, D=16, F=8, E=4))
    options = MoEOptions(top_k=2)
    args = (x, r, u, d, None, *ops._config_args(options, Plan(gemm, 8 if gemm == "bmm" else 0)), False)
    torch.library.opcheck(ops.moe_forward, args)


def test_opcheck_float32_weights_with_16bit_x():
    """Autocast's case: float32 expert weights cast inside the op, float32 weight gradients out."""
    x, r, u, d = random_moe(N=8, D=16, F=8, E=4)
    x, r = x.half().requires_grad_(True), r.half().requires_grad_(True)
    u, d = u.float().requires_grad_(True), d.float().requires_grad_(True)
    args = (x, r, u, d, None, *ops._config_args(MoEOptions(top_k=2), Plan("grouped")), False)
    torch.library.opcheck(ops.moe_forward, args)


def test_compile_autocast_float32_weights_matches_eager():
    torch._dynamo.reset()
    layer = flashfusemoe.MoELayer(16, 8, 4, 2)
    x = torch.randn(12, 16)

    def grads(fn):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = fn(x).float().square().mean()
        return torch.autograd.grad(loss, list(layer.parameters()))

    eager = grads(layer)
    compiled = grads(torch.compile(layer, backend="aot_eager", fullgraph=True))
    for ge, gc in zip(eager, compiled, strict=True):
        assert gc.dtype == ge.dtype == torch.float32
        assert torch.equal(gc, ge)


class TinyModel(torch.nn.Module):
    def __init__(self, D, gemm):
        super().__init__()
        self.proj = torch.nn.Linear(D, D, dtype=torch.float64)
        self.moe = flashfusemoe.MoELayer(D, 8, 4, 2, gemm=gemm, num_shared_experts=1, dtype=torch.float64)

    def forward(self, x):
        out, aux = self.moe(torch.tanh(self.proj(x)), return_aux=True)
        return (out ** 2).mean() + 0.01 * aux["load_balance_loss"] + 0.001 * aux["z_loss"]


@pytest.mark.parametrize("gemm", ["grouped", "gathered", "fused_dgrad", "bmm"])
def test_compile_fullgraph_matches_eager(gemm):
    torch._dynamo.reset()
    model = TinyModel(16, gemm)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    loss_eager = model(x)
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(loss_compiled, list(model.parameters()))
    assert rel_err(loss_compiled.detach(), loss_eager.detach()) < 1e-12
    for ge, gc in zip(grads_eager, grads_compiled):
        assert rel_err(gc, ge) < 1e-9


def test_op_names_follow_their_schemas():
    """torch.compile's caches know a custom op by name only: a changed schema must change the name."""
    one, two = "(Tensor x) -> Tensor", "(Tensor x) -> (Tensor, Tensor)"
    assert ops.op_name("moe_forward", one) != ops.op_name("moe_forward", two)
    assert ops.FORWARD_OP == ops.op_name("moe_forward", ops._FORWARD_SCHEMA, ops._BACKWARD_SCHEMA)
    assert ops.moe_forward._opoverload._schema.name == ops.FORWARD_OP


def test_plan_num_rows():
    assert Plan("grouped").num_rows(10, 2, 4) == 20
    assert Plan("bmm", 7).num_rows(10, 2, 4) == 28
