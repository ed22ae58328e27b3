"""Training throughput (images/s) of every objective on this machine, eager and torch.compile side by side.

    python benchmarks/train_speed.py --steps 60 --json benchmarks/results/train_speed.json

Each measurement runs the real step (data render, forward, objective, backward, Adam; FactorVAE's
discriminator step too) after warm-up steps, at batch 64 on procedural dSprites.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from disco.export.data.ground_truth import make_dataset
from disco.export.losses import OBJECTIVES, Objective, ObjectiveConfig
from disco.export.models.burgess import VAE, ArchConfig


def images_per_s(objective: str, steps: int, batch: int, compiled: bool, warmup: int) -> float:
    torch.manual_seed(0)
    data = make_dataset("dsprites")
    model = VAE(ArchConfig())
    obj = Objective(ObjectiveConfig(objective=objective), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    disc_opt = torch.optim.Adam(obj.discriminator.parameters(), lr=1e-4) if obj.discriminator is not None else None
    forward = torch.compile(model) if compiled else model
    rng = np.random.default_rng(0)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = torch.from_numpy(data.sample(batch, rng))
        out = forward(x)
        terms = obj(out, x, i)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if disc_opt is not None:
            disc_opt.zero_grad(set_to_none=True)
            obj.discriminator_loss(out["z"]).backward()
            disc_opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", default="betavae", help="objectives also measured with torch.compile ('' for none)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in OBJECTIVES:
        row = {"objective": name, "eager_images_per_s": round(images_per_s(name, a.steps, a.batch, False, a.warmup), 1)}
        if name in a.compile.split(","):
            row["compiled_images_per_s"] = round(images_per_s(name, a.steps, a.batch, True, a.warmup), 1)
            row["compile_speedup"] = round(row["compiled_images_per_s"] / row["eager_images_per_s"], 3)
        rows.append(row)
        print(row, flush=True)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "batch": a.batch, "steps": a.steps, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
