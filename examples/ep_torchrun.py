"""Expert parallelism with torchrun: each rank holds E/W experts and its own tokens.

    torchrun --nproc-per-node 2 examples/ep_torchrun.py      # gloo on CPU, NCCL on GPUs

The non-expert parameters (router, shared expert) are replicated and trained data-parallel by
DDP; the expert weights are excluded from DDP, since each rank holds different experts and the
layer already gives them their complete gradient.
"""

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flashfusemoe
from flashfusemoe.parallel import gather_state_dict, shard_state_dict

D, F, K = 64, 128, 2


def main(steps: int = 3) -> list[float]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        losses = train(steps, torch.device("cuda" if cuda else "cpu"))
        # Free the training state's reference cycles while the group is alive: a gloo group torn
        # down in interpreter shutdown can abort the process (seen under load).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return losses


def train(steps: int, device: torch.device) -> list[float]:
    rank, W = dist.get_rank(), dist.get_world_size()
    E = 4 * W
    torch.manual_seed(0)  # the same full layer on every rank; each keeps its shard
    full = flashfusemoe.MoELayer(D, F, E, K, num_shared_experts=1)
    layer = flashfusemoe.MoELayer(D, F, E, K, num_shared_experts=1, ep_group=dist.group.WORLD, device=device)
    layer.load_state_dict(shard_state_dict(full.state_dict(), rank, W))

    # DDP all-reduces (averages) the replicated parameters only. It averages where the layer's
    # expert gradients are sums over the group's tokens: scale those by 1/W to match.
    DDP._set_params_and_buffers_to_ignore_for_model(layer, ["w_up", "w_down"])
    model = DDP(layer)
    for p in (layer.w_up, layer.w_down):
        p.register_hook(lambda g: g / W)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    losses = []
    torch.manual_seed(100 + rank)  # each rank its own tokens
    for step in range(steps):
        x = torch.randn(32, D, device=device)
        out, aux = model(x, return_aux=True)
        loss = out.square().mean() + 0.01 * aux["load_balance_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step}  loss {loss.item():.5f}  loads {aux['tokens_per_expert'].tolist()}")
    full_state = gather_state_dict(layer.state_dict(), dist.group.WORLD)  # collective: every rank
    if rank == 0:
        print("gathered w_up:", tuple(full_state["w_up"].shape))
    return losses


if __name__ == "__main__":
    main()
