"""``MoELayer``: the fused MoE as an ``nn.Module``, with an optional shared expert."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashfusemoe.config import FLOAT_DTYPES, LayerConfig, check_bool, check_finite, signature_with_options
from flashfusemoe.functional import make_aux, moe_outputs, update_expert_bias
from flashfusemoe.kernels.activation import ACT_TORCH


def glu_mlp(x, w_up, w_down, activation: str):
    """Dense GLU MLP: x [N, D], w_up [2F, D], w_down [D, F] -> [N, D]."""
    gate, up = F.linear(x, w_up).chunk(2, dim=-1)
    return F.linear(ACT_TORCH[activation](gate) * up, w_down)


def init_uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def routing_stats(tokens_per_expert: torch.Tensor, dropped_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loads [E], their coefficient of variation and the dropped count, as device tensors."""
    loads = tokens_per_expert.double()
    return {
        "tokens_per_expert": tokens_per_expert,
        "load_cv": loads.std(correction=0) / loads.mean().clamp_min(1e-12),
        "dropped_tokens": dropped_tokens,
    }


class MoELayer(nn.Module):
    """Top-k routed GLU experts (+ optional shared expert) on the fused kernels.

    ``d_model``, ``ffn_dim``, ``num_experts``, the shared expert and the expert bias: see
    ``LayerConfig``; ``top_k`` and the other options: ``MoEOptions``' fields.
    Parameters: ``router_weight [E, D]``, ``w_up [E, 2F, D]``, ``w_down [E, D, F]``; with shared
    experts ``shared_w_up [2Fs, D]``, ``shared_w_down [D, Fs]`` and, with ``shared_expert_gate``,
    ``shared_gate_weight [1, D]``. ``use_expert_bias`` adds an fp32 buffer ``expert_bias [E]``
    (selection only, no gradient; ``update_expert_bias(rate)`` moves it towards balanced loads).

    ``forward(x, return_aux=False)`` returns ``out`` or ``(out, aux)``. ``last_routing_stats``
    gives the last call's ``tokens_per_expert [E]``, ``load_cv`` and ``dropped_tokens`` as device
    tensors; with ``accumulate_routing_stats = True`` the buffers ``accumulated_loads`` and
    ``accumulated_dropped`` keep running sums. Neither syncs with the host.

    ``ep_group``: a ``torch.distributed`` process group of size W for expert parallelism. The
    layer then holds only this rank's experts (``w_up [E/W, 2F, D]``, ``w_down [E/W, D, F]``, rank
    r owning experts ``r*E/W .. (r+1)*E/W - 1``; its ``state_dict`` is that shard), takes this
    rank's tokens, and its aux and routing stats describe the whole group's batch
    (``flashfusemoe.parallel``).
    """

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, top_k: int, *,
                 use_expert_bias: bool = False, num_shared_experts: int = 0,
                 shared_ffn_dim: int | None = None, shared_expert_gate: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 ep_group: Any = None, **options: Any) -> None:
        super().__init__()
        self.config = LayerConfig.from_kwargs(
            d_model, ffn_dim, num_experts, top_k, "MoELayer", use_expert_bias=use_expert_bias,
            num_shared_experts=num_shared_experts, shared_ffn_dim=shared_ffn_dim,
            shared_expert_gate=shared_expert_gate, **options)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be None or one of {FLOAT_DTYPES}, got {dtype!r}")
        self.options = self.config.options
        self.d_model, self.ffn_dim, self.num_experts = d_model, ffn_dim, num_experts
        self.ep_group, num_local = ep_group, num_experts
        if ep_group is not None:
            from flashfusemoe.parallel import local_experts

            _, num_local = local_experts(num_experts, ep_group)
        kw = {"device": device, "dtype": dtype}
        self.router_weight = nn.Parameter(torch.empty(num_experts, d_model, **kw))
        self.w_up = nn.Parameter(torch.empty(num_local, 2 * ffn_dim, d_model, **kw))
        self.w_down = nn.Parameter(torch.empty(num_local, d_model, ffn_dim, **kw))
        if use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.shared_ffn_dim = self.config.resolved_shared_ffn_dim
        if self.shared_ffn_dim:
            self.shared_w_up = nn.Parameter(torch.empty(2 * self.shared_ffn_dim, d_model, **kw))
            self.shared_w_down = nn.Parameter(torch.empty(d_model, self.shared_ffn_dim, **kw))
        self.shared_gate_weight = nn.Parameter(torch.empty(1, d_model, **kw)) if shared_expert_gate else None
        # Routing statistics: the last call's, and running sums when accumulate_routing_stats is on.
        self._last_loads = self._last_dropped = None
        self.accumulate_routing_stats = False
        self.register_buffer("accumulated_loads", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("accumulated_dropped", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        self.reset_parameters()

    __init__ = signature_with_options(__init__)

    def reset_parameters(self) -> None:
        init_uniform_(self.router_weight, self.d_model)
        init_uniform_(self.w_up, self.d_model)
        init_uniform_(self.w_down, self.ffn_dim)
        if self.shared_ffn_dim:
            init_uniform_(self.shared_w_up, self.d_model)
            init_uniform_(self.shared_w_down, self.shared_ffn_dim)
        if self.shared_gate_weight is not None:
            init_uniform_(self.shared_gate_weight, self.d_model)

    def forward(self, x: torch.Tensor, return_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_bool("return_aux", return_aux)
        if self.ep_group is not None:
            return self._forward_ep(x, return_aux)
        out, outputs = moe_outputs(x, self.router_weight, self.w_up, self.w_down, self.options,
                                   expert_bias=self.expert_bias)
        self._last_loads = outputs.tokens_per_expert.detach()
        self._last_dropped = outputs.dropped_tokens.detach()
        out = self._finish(x, out)
        return (out, make_aux(outputs, self.options)) if return_aux else out

    def _finish(self, x, out):
        """Accumulates the routing stats and adds the shared expert."""
        if self.accumulate_routing_stats:
            self.accumulated_loads += self._last_loads
            self.accumulated_dropped += self._last_dropped
        if self.shared_ffn_dim:
            shared = glu_mlp(x, self.shared_w_up, self.shared_w_down, self.options.activation)
            if self.shared_gate_weight is not None:
                shared = shared * torch.sigmoid(F.linear(x, self.shared_gate_weight))
            out = out + shared
        return out

    def _forward_ep(self, x, return_aux: bool):
        from flashfusemoe import parallel

        out, logits, state = parallel.ep_moe_outputs(x, self.router_weight, self.w_up, self.w_down,
                                                     self.options, expert_bias=self.expert_bias,
                                                     group=self.ep_group)
        self._last_loads, self._last_dropped = state.tokens_per_expert, state.dropped
        out = self._finish(x, out)
        return (out, parallel.ep_aux(logits, state, self.options.score_func)) if return_aux else out

    @property
    def last_routing_stats(self) -> dict[str, torch.Tensor]:
        """Routing of the last call, as device tensors (reading them is what syncs, not the step)."""
        if self._last_loads is None:
            return {}
        return routing_stats(self._last_loads, self._last_dropped)

    def reset_accumulated_routing_stats(self) -> None:
        self.accumulated_loads.zero_()
        self.accumulated_dropped.zero_()

    def update_expert_bias(self, rate: float, *, group: Any = None) -> None:
        """One step of aux-loss-free balancing (``flashfusemoe.update_expert_bias``) on the loads
        since the last update: the running sums when ``accumulate_routing_stats`` is on (then
        reset), else the last call's. ``group``: a process group whose ranks see different tokens
        (data parallel); their loads are summed first, so every rank makes the same update (with
        ``ep_group`` alone the loads already are the EP group's). No host sync; call it under the
        same conditions on every rank of ``group``, e.g. after each optimizer step."""
        if self.expert_bias is None:
            raise ValueError("update_expert_bias needs the layer built with use_expert_bias=True")
        check_finite("rate", rate)
        loads = self.accumulated_loads if self.accumulate_routing_stats else self._last_loads
        if loads is None:
            raise ValueError("update_expert_bias: no loads yet (no forward call since the layer was built; "
                             "or set accumulate_routing_stats = True)")
        if group is not None:
            import torch.distributed as dist

            loads = loads.clone()  # summed in place
            dist.all_reduce(loads, group=group)
        update_expert_bias(self.expert_bias, loads, rate)
        if self.accumulate_routing_stats:
            self.reset_accumulated_routing_stats()

    def extra_repr(self) -> str:
        o = self.options
        return (f"d_model={self.d_model}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={o.top_k}, activation={o.activation}, score_func={o.score_func}, "
                f"shared_ffn_dim={self.shared_ffn_dim}")


def expert_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys of the expert weights of every ``MoELayer`` in ``model``."""
    return [f"{name}.{k}" if name else k for name, m in model.named_modules() if isinstance(m, MoELayer)
            for k in ("w_up", "w_down")]
