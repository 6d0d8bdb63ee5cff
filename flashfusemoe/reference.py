"""Unfused PyTorch MoE: the ground truth of the tests and the baseline of the benchmarks.

Plain torch, differentiable by autograd, any float dtype, any device. It follows
``docs/design.md`` "Routing semantics" and shares no code with the fused kernels. It validates
nothing: the fused public API does.
"""

import math

import torch
import torch.nn.functional as F


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(g)
    if activation == "geglu":
        return F.gelu(g)  # exact erf form
    if activation == "relu2":
        return F.relu(g) ** 2
    raise ValueError(f"unknown activation {activation!r}")


def _glu_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str) -> torch.Tensor:
    """``[M, D] -> [M, D]``: ``w_down @ (act(w_up[:F] @ x) * (w_up[F:] @ x))`` in ``x``'s dtype."""
    f = w_up.shape[0] // 2
    h = x @ w_up.T
    return (_act(h[:, :f], activation) * h[:, f:]) @ w_down.T


def _route(
    logits: torch.Tensor,
    top_k: int,
    score_func: str,
    norm_topk_prob: bool,
    expert_bias: torch.Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[N, E]`` -> ``(scores [N, E], topk_ids [N, K] int64, topk_weights [N, K])``."""
    n, e = logits.shape
    if score_func == "softmax":
        scores = logits.softmax(-1)
    elif score_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown score_func {score_func!r}")

    sel = scores.detach()
    if expert_bias is not None:
        sel = sel + expert_bias.detach().to(sel.dtype)
    if n_group is not None:
        per_group = e // n_group
        grouped = sel.view(n, n_group, per_group).sort(dim=-1, descending=True).values
        group_scores = grouped[..., : min(2, per_group)].sum(-1)  # [N, G]
        kept_groups = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        group_mask = torch.zeros(n, n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, kept_groups, True)
        sel = sel.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), -math.inf)

    # A stable descending sort gives ties to the lower expert index (torch.topk does not promise it).
    topk_ids = sel.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return scores, topk_ids, weights * routed_scaling_factor


def _capacity_keep(
    topk_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity_factor: float
) -> torch.Tensor:
    """``[N, K]`` bool: assignments kept when each expert takes at most ``C`` of them.

    ``C = ceil(capacity_factor * N * K / E)``; an overflowing expert keeps its ``C`` highest
    weights, ties to the lower token.
    """
    n, k = topk_ids.shape
    cap = math.ceil(capacity_factor * n * k / num_experts)
    flat_ids, flat_w = topk_ids.reshape(-1), weights.detach().reshape(-1)
    keep = torch.ones(n * k, dtype=torch.bool, device=topk_ids.device)
    for e in range(num_experts):
        assigns = (flat_ids == e).nonzero().squeeze(1)  # ascending, i.e. token order
        if assigns.numel() > cap:
            order = flat_w[assigns].sort(descending=True, stable=True).indices
            keep[assigns[order[cap:]]] = False
    return keep.view(n, k)


def moe_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    *,
    activation: str = "swiglu",
    score_func: str = "softmax",
    norm_topk_prob: bool = True,
    expert_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    capacity_factor: float | None = None,
    shared_w_up: torch.Tensor | None = None,
    shared_w_down: torch.Tensor | None = None,
    shared_gate_weight: torch.Tensor | None = None,
    return_aux: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Top-k routed GLU MoE, one expert at a time.

    Shapes: ``x [..., D]``, ``router_weight [E, D]``, ``w_up [E, 2F, D]`` (rows ``0:F`` gate,
    ``F:2F`` up), ``w_down [E, D, F]``; optional shared expert ``shared_w_up [2Fs, D]``,
    ``shared_w_down [D, Fs]`` and its gate ``shared_gate_weight [1, D]`` (shared output scaled
    by ``sigmoid(x @ shared_gate_weight.T)``).

    Routing runs in fp64 for fp64 input, else fp32; expert GEMMs run in ``x``'s dtype; the
    output is accumulated in fp32 for 16-bit input (else in ``x``'s dtype) and returned in
    ``x``'s dtype and shape.

    Returns ``out``, or ``(out, aux)`` with ``return_aux``: ``aux`` holds ``load_balance_loss``
    and ``z_loss`` (routing-dtype scalars, differentiable through the router),
    ``tokens_per_expert`` (``[E]`` int64, before capacity) and ``dropped_tokens`` (int64 scalar).
    """
    shape, d = x.shape, x.shape[-1]
    x2 = x.reshape(-1, d)
    n, e = x2.shape[0], router_weight.shape[0]
    route_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    logits = x2.to(route_dtype) @ router_weight.to(route_dtype).T
    scores, topk_ids, weights = _route(
        logits, top_k, score_func, norm_topk_prob, expert_bias, n_group, topk_group, routed_scaling_factor
    )
    if capacity_factor is None:
        keep = torch.ones_like(topk_ids, dtype=torch.bool)
    else:
        keep = _capacity_keep(topk_ids, weights, e, capacity_factor)

    out = torch.zeros(n, d, dtype=acc_dtype, device=x.device)
    for ex in range(e):
        tokens, slots = ((topk_ids == ex) & keep).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = _glu_mlp(x2[tokens], w_up[ex], w_down[ex], activation)
        out = out.index_add(0, tokens, y.to(acc_dtype) * weights[tokens, slots].unsqueeze(1).to(acc_dtype))

    if shared_w_up is not None:
        shared = _glu_mlp(x2, shared_w_up, shared_w_down, activation).to(acc_dtype)
        if shared_gate_weight is not None:
            shared = shared * torch.sigmoid(x2.to(acc_dtype) @ shared_gate_weight.to(acc_dtype).T)
        out = out + shared
    out = out.to(x.dtype).reshape(shape)
    if not return_aux:
        return out

    tokens_per_expert = torch.bincount(topk_ids.reshape(-1), minlength=e)
    if score_func == "softmax":
        probs = scores
    else:
        probs = scores / scores.sum(-1, keepdim=True)
    aux = {
        "load_balance_loss": e * ((tokens_per_expert.to(route_dtype) / n) * probs.mean(0)).sum(),
        "z_loss": (torch.logsumexp(logits, -1) ** 2).mean(),
        "tokens_per_expert": tokens_per_expert,
        "dropped_tokens": (~keep).sum(),
    }
    return out, aux
