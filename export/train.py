"""`disco train`: fit a VAE-family model on dSprites, with checkpoints that describe themselves.

    data (rendered per step) -> model -> objective -> Adam -> ckpt.pt every K steps (+ log.jsonl)

The data stream is a pure function of (seed, step), so `--resume` continues the exact run.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from disco.export.data.dsprites import DSprites
from disco.export.losses import beta_vae
from disco.export.models.burgess import VAE, ArchConfig


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "dsprites"  # the only dataset of the slice
    objective: str = "betavae"  # beta-VAE; beta = 1 is the plain VAE
    beta: float = 4.0  # Higgins et al. 2017 use 4 on dSprites
    steps: int = 30_000  # optimiser steps
    batch_size: int = 64  # disentanglement_lib and disentangling-vae use 64
    lr: float = 5e-4  # disentangling-vae's dSprites preset
    seed: int = 0  # data order and initial weights
    threads: int = 2  # torch intra-op threads
    ckpt_every: int = 1000  # steps between checkpoints
    log_every: int = 100  # steps between log.jsonl lines
    arch: ArchConfig = field(default_factory=ArchConfig)


def batch_at(cfg: TrainConfig, step: int) -> torch.Tensor:
    """The training batch of a step: (B, 1, 64, 64) float in {0, 1}."""
    imgs, _ = DSprites().sample(cfg.batch_size, np.random.default_rng([cfg.seed, step]))
    return torch.from_numpy(imgs).float().unsqueeze(1)


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, VAE, dict]:
    """Rebuild the model of a checkpoint from the config it carries."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    raw = dict(ckpt["config"])
    cfg = TrainConfig(**{**raw, "arch": ArchConfig(**raw["arch"])})
    model = VAE(cfg.arch)
    model.load_state_dict(ckpt["model"])
    return cfg, model, ckpt


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = VAE(cfg.arch)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, wall = 0, 0.0
    if resume and ckpt_path.exists():
        _, model, ckpt = load_checkpoint(ckpt_path)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        opt.load_state_dict(ckpt["optimizer"])
        step, wall = int(ckpt["step"]), float(ckpt["wall_s"])
        torch.manual_seed(cfg.seed + step)

    def save(terms: dict[str, float]) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "wall_s": wall, "losses": terms}, tmp)
        tmp.replace(ckpt_path)  # a stop mid-write never leaves a broken checkpoint

    model.train()
    running: dict[str, float] = {}
    t0 = time.perf_counter() - wall
    with open(out / "log.jsonl", "a") as log, tqdm(total=cfg.steps, initial=step, desc="train") as bar:
        while step < cfg.steps:
            x = batch_at(cfg, step)
            terms = beta_vae(model(x), x, cfg.beta)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            for k in ("loss", "recon", "kl"):
                running[k] = 0.98 * running.get(k, terms[k].item()) + 0.02 * terms[k].item()
            bar.update(1)
            bar.set_postfix({k: f"{v:.2f}" for k, v in running.items()})
            wall = time.perf_counter() - t0
            if step % cfg.log_every == 0:
                kl_dims = [round(v, 4) for v in terms["kl_per_dim"].tolist()]
                log.write(json.dumps({"step": step, "wall_s": round(wall, 1), **{k: round(v, 4) for k, v in running.items()},
                                      "kl_per_dim": kl_dims}) + "\n")
                log.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(running)
    return ckpt_path


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="disco train", description="Train a beta-VAE on procedural dSprites.")
    p.add_argument("--dataset", default=d.dataset, choices=["dsprites"])
    p.add_argument("--objective", default=d.objective, choices=["betavae", "vae"])
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--latent-dim", type=int, default=d.arch.latent_dim)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a = p.parse_args(argv)
    cfg = TrainConfig(dataset=a.dataset, objective=a.objective, beta=1.0 if a.objective == "vae" else a.beta,
                      steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
                      ckpt_every=a.ckpt_every, log_every=a.log_every, arch=ArchConfig(latent_dim=a.latent_dim))
    path = train(cfg, Path(a.out), resume=a.resume)
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
