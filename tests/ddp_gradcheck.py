"""Run under `torchrun --nproc_per_node 2`: DDP-averaged gradients on 2 shards == one process on the whole batch.

Writes OUT (argv[1]) with the largest absolute difference, from rank 0. The forward pass uses the
posterior means (eval mode), so both computations see the same numbers without sharing random noise.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from disco.export.data.ground_truth import make_dataset
from disco.export.losses import Objective, ObjectiveConfig
from disco.export.models.burgess import VAE, ArchConfig
from disco.export.train import TrainConfig, batch_at, init_distributed, Dist


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    d = init_distributed()
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=16)
    data = make_dataset("dsprites")
    objective = Objective(ObjectiveConfig(objective="betavae", beta=4.0), 10)
    model = VAE(ArchConfig()).eval()  # same initial weights on every rank (seeded)
    ddp = DDP(model)
    x = batch_at(cfg, data, step=3, d=d)
    objective(ddp(x), x, 3)["loss"].backward()
    shared = grads(model)
    if d.rank == 0:
        whole = torch.cat([batch_at(cfg, data, step=3, d=Dist(rank=r, world=d.world)) for r in range(d.world)])
        single = VAE(ArchConfig()).eval()
        single.load_state_dict(model.state_dict())
        objective(single(whole), whole, 3)["loss"].backward()
        diff = (grads(single) - shared).abs().max().item()
        scale = grads(single).abs().max().item()
        with open(sys.argv[1], "w") as f:
            json.dump({"max_abs_diff": diff, "max_abs_grad": scale, "world": d.world}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
