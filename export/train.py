"""`disco train`: fit a VAE-family model; checkpoints that describe themselves; scales out with torchrun.

    dataset.sample (per step, per rank) -> VAE -> Objective terms -> Adam -> ckpt.pt every K steps
                                                  \\-> FactorVAE: discriminator step on detached codes
    log.jsonl (every term), reconstructions and traversals at checkpoints, loss curve at the end

The data stream is a pure function of (seed, step, rank), so `--resume` continues the exact run.
Under `torchrun --nproc_per_node N` the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on GPU) and each rank draws its own shard of the global batch. Terms estimated from the batch
itself (beta-TCVAE's log q(z), DIP-VAE's covariance, FactorVAE's permutations) see each rank's shard,
as in a single process with batch B / N: keep the per-rank batch at 64 or more for those objectives.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from disco.export.data.ground_truth import Dataset, ImageFolder, make_dataset
from disco.export.losses import GAMMA_DEFAULTS, OBJECTIVES, Objective, ObjectiveConfig
from disco.export.models.burgess import VAE, ArchConfig
from disco.service.config import available_cores


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "dsprites"  # dsprites, color_dsprites, noisy_dsprites or folder
    folder: str = ""  # images for dataset "folder"
    steps: int = 30_000  # optimiser steps
    batch_size: int = 64  # global batch (split across ranks); disentanglement_lib and disentangling-vae use 64
    lr: float = 5e-4  # Adam; disentangling-vae's dSprites preset (disentanglement_lib uses 1e-4)
    disc_lr: float = 1e-4  # FactorVAE discriminator Adam, betas (0.5, 0.9) (Kim & Mnih 2018)
    seed: int = 0  # data order and initial weights
    threads: int = 0  # torch intra-op threads per process; 0: this node's usable cores split over its processes
    # (torchrun's LOCAL_WORLD_SIZE), so that two ranks on two cores do not run four threads
    ckpt_every: int = 1000  # steps between checkpoints (and pictures)
    log_every: int = 100  # steps between log.jsonl lines
    loss: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)

    @property
    def objective(self) -> str:
        return self.loss.objective

    @property
    def beta(self) -> float:
        return self.loss.beta


def _config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    raw = dict(raw)
    loss = raw.pop("loss", None) or {"objective": raw.get("objective", "betavae"), "beta": raw.get("beta", 4.0)}
    arch = ArchConfig(**raw.pop("arch"))
    top = {f.name for f in fields(TrainConfig)} - {"loss", "arch"}
    return TrainConfig(**{k: v for k, v in raw.items() if k in top}, loss=ObjectiveConfig(**loss), arch=arch)


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, VAE, dict[str, Any]]:
    """Rebuild the model of a checkpoint from the config it carries (torch.load with weights_only=True)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = _config_from_dict(ckpt["config"])
    model = VAE(cfg.arch)
    model.load_state_dict(ckpt["model"])
    return cfg, model, ckpt


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


def threads_per_process() -> int:
    """This process's share of the cores it may run on (its affinity mask), among the processes torchrun started
    on this node."""
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def batch_at(cfg: TrainConfig, data: Dataset, step: int, d: Dist = Dist()) -> torch.Tensor:
    """This rank's share of the global batch of a step: (B / world, C, H, W) in [0, 1]."""
    if cfg.batch_size % d.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {d.world} processes")
    x = data.sample(cfg.batch_size // d.world, np.random.default_rng([cfg.seed, step, d.rank]))
    return torch.from_numpy(x).to(d.device)


# What a resumed run takes from its command line; everything else is the checkpoint's, or the run would not go on
# as it was (a review: `--resume` without the first run's flags turned a beta-TCVAE run into a beta-VAE one, silently)
_RESUME_FROM_FLAGS = ("steps", "threads", "ckpt_every", "log_every")


def resumed_config(saved: dict[str, Any], cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's config with this command's run length and logging (and image folder, if given: a run
    resumed from elsewhere finds it), and the settings in which the command line differed from it (taken from the
    checkpoint)."""
    kept = replace(_config_from_dict(saved), **{k: getattr(cfg, k) for k in _RESUME_FROM_FLAGS},
                   **({"folder": cfg.folder} if cfg.folder else {}))  # the images, where they are now

    def flat(c: TrainConfig) -> dict[str, Any]:  # "loss.beta": 4.0, ...
        return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in asdict(c).items()
                for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)])}

    mine, theirs = flat(cfg), flat(kept)
    derived = ("loss.anneal_steps", "loss.dataset_size")  # defaults from --steps and the folder: not a flag's mismatch
    return kept, [k for k in theirs if mine[k] != theirs[k] and k not in derived]


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> Path:
    d = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    state: dict[str, Any] | None = None
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=d.device, weights_only=True)
        cfg, differ = resumed_config(state["config"], cfg)
        if differ and d.rank == 0:
            print(f"resuming {ckpt_path} with its own settings, not the command line's, for: {', '.join(differ)}",
                  file=sys.stderr)
    torch.set_num_threads(cfg.threads or threads_per_process())
    torch.manual_seed(cfg.seed)
    data = make_dataset(cfg.dataset, cfg.folder, cfg.arch.image_size, cfg.arch.channels)
    if isinstance(data, ImageFolder):  # beta-TCVAE's estimators of log q(z) need the size of the dataset
        # sampled from (Chen et al. 2018, eq. 5-6); the default is dSprites' (every other dataset is a variant)
        if state is not None and cfg.loss.dataset_size != len(data) and d.rank == 0:
            print(f"resuming with {len(data)} images in {cfg.folder}, where the run had {cfg.loss.dataset_size}: its "
                  "data stream changes from here", file=sys.stderr)
        cfg = replace(cfg, loss=replace(cfg.loss, dataset_size=len(data)))
    model = VAE(cfg.arch).to(d.device)
    objective = Objective(cfg.loss, cfg.arch.latent_dim).to(d.device)
    step, wall = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if "objective" in state:  # the first checkpoints had none (no objective held parameters then)
            objective.load_state_dict(state["objective"])
        step, wall = int(state["step"]), float(state["wall_s"])
    ids = [d.device.index] if d.device.type == "cuda" else None
    net = DDP(model, device_ids=ids) if d.world > 1 else model
    disc = objective.discriminator
    disc_net = DDP(disc, device_ids=ids) if (disc is not None and d.world > 1) else disc
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if disc_opt is not None and state.get("disc_optimizer"):
            disc_opt.load_state_dict(state["disc_optimizer"])

    def save(terms: dict[str, float]) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "objective": objective.state_dict(),
                    "optimizer": opt.state_dict(), "disc_optimizer": disc_opt.state_dict() if disc_opt else {},
                    "step": step, "wall_s": wall, "losses": terms}, tmp)
        tmp.replace(ckpt_path)  # a stop mid-write never leaves a broken checkpoint

    # SIGTERM (a single process; torchrun's ranks would stop at different steps) ends the run after the
    # current step with a checkpoint, pictures and the loss curve, so a run stopped at a time budget is whole.
    stop = threading.Event()
    previous = None
    if d.world == 1 and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    model.train()
    running: dict[str, float] = {}
    history: list[dict[str, float]] = []
    t0 = time.perf_counter() - wall
    log = open(out / "log.jsonl", "a") if d.main else None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.objective}", disable=not d.main)
    try:
        while step < cfg.steps and not stop.is_set():
            # Same initial weights everywhere (seeded above; DDP also broadcasts rank 0's), then per-rank noise,
            # seeded at every step as the data stream is, so a resumed run draws what the run would have (a review:
            # seeded once at the start, it drew other reparameterisation samples from the resume on)
            torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + d.rank)
            x = batch_at(cfg, data, step, d)
            result = net(x)
            terms = objective(result, x, step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            if disc_opt is not None and disc_net is not None:
                disc_opt.zero_grad(set_to_none=True)  # drops what the VAE's TC term left on the discriminator
                dloss = objective.discriminator_loss(result["z"], disc_net)
                dloss.backward()
                disc_opt.step()
                terms["disc_loss"] = dloss.detach()
            step += 1
            keys = [k for k, v in terms.items() if v.dim() == 0]
            values = torch.stack([terms[k].detach().float() for k in keys])
            if d.world > 1:  # log (and check) the global batch's terms, the same numbers on every rank
                dist.all_reduce(values)
                values /= d.world
            scalars = dict(zip(keys, values.tolist()))
            for k, v in scalars.items():
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
            bar.update(1)
            bar.set_postfix({k: f"{running[k]:.2f}" for k in ("loss", "recon", "kl") if k in running})
            wall = time.perf_counter() - t0
            if not np.isfinite(scalars["loss"]):
                raise FloatingPointError(f"loss became {scalars['loss']} at step {step}: {scalars}")
            if log is not None and step % cfg.log_every == 0:
                line = {"step": step, "wall_s": round(wall, 1), **{k: round(v, 5) for k, v in scalars.items()},
                        "kl_per_dim": [round(v, 4) for v in terms["kl_per_dim"].tolist()]}
                history.append(line)
                log.write(json.dumps(line) + "\n")
                log.flush()
            if d.main and (step % cfg.ckpt_every == 0 or step == cfg.steps or stop.is_set()):
                save(running)
                pictures(model, data, out, step, cfg.seed)
                model.train()
    finally:
        bar.close()
        if log is not None:
            log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if d.main:
        loss_curve(out)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


@torch.no_grad()
def pictures(model: VAE, data: Dataset, out: Path, step: int, seed: int) -> None:
    """recon_<step>.png (inputs above reconstructions) and traversal_<step>.png (one row per latent dim)."""
    from PIL import Image

    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(data.sample(8, np.random.default_rng([seed, 10**9]))).to(device)
    res = model(x)
    recon = torch.sigmoid(res["logits"])
    z = res["mu"][:1].repeat(11, 1)
    rows = []
    for k in range(z.shape[1]):
        zk = z.clone()
        zk[:, k] = torch.linspace(-2.5, 2.5, 11)
        rows.append(torch.sigmoid(model.decoder(zk)))

    def grid(batch_rows: list[torch.Tensor]) -> Image.Image:
        tiles = [torch.cat(list(r), dim=2) for r in batch_rows]  # (C, H, n*W)
        img = (torch.cat(tiles, dim=1).clamp(0, 1) * 255).byte().cpu().numpy()  # (C, rows*H, n*W)
        return Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))

    grid([x, recon]).save(out / f"recon_{step:07d}.png")
    grid(rows).save(out / f"traversal_{step:07d}.png")


def loss_curve(out: Path) -> None:
    """loss_curve.png from log.jsonl: every logged term against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines() if s.strip()]
    if not lines:
        return
    keys = [k for k in lines[-1] if k not in ("step", "wall_s", "kl_per_dim")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([ln["step"] for ln in lines if k in ln], [ln[k] for ln in lines if k in ln])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    """`disco train` flags -> (config, run folder, resume)."""
    t, o, a = TrainConfig(), ObjectiveConfig(), ArchConfig()
    p = argparse.ArgumentParser(prog="disco train", description="Train a disentangled VAE (torchrun for several processes).")
    p.add_argument("--dataset", default=t.dataset, choices=["dsprites", "color_dsprites", "noisy_dsprites", "folder"])
    p.add_argument("--folder", default="", help="image folder for --dataset folder")
    p.add_argument("--objective", default=o.objective, choices=OBJECTIVES)
    p.add_argument("--likelihood", default=o.likelihood, choices=["bernoulli", "gaussian"])
    p.add_argument("--beta", type=float, default=o.beta)
    p.add_argument("--gamma", type=float, default=None,
                   help="annealed: capacity weight (default 1000); factorvae: TC weight (default 10); betatcvae: dimKL (1)")
    p.add_argument("--alpha", type=float, default=o.alpha)
    p.add_argument("--c-max", type=float, default=o.c_max)
    p.add_argument("--anneal-steps", type=int, default=None, help="annealed: steps of the capacity ramp (default steps / 3)")
    p.add_argument("--estimator", default=o.estimator, choices=["mws", "mss"])
    p.add_argument("--lambda-od", type=float, default=o.lambda_od)
    p.add_argument("--lambda-d", type=float, default=o.lambda_d)
    p.add_argument("--arch", default=a.name, choices=["burgess", "dlib"])
    p.add_argument("--latent-dim", type=int, default=a.latent_dim)
    p.add_argument("--image-size", type=int, default=a.image_size, choices=[32, 64])
    p.add_argument("--channels", type=int, default=0, help="default: the dataset's (folder: 3)")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--disc-lr", type=float, default=t.disc_lr)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--threads", type=int, default=t.threads,
                   help="torch threads per process; 0: the usable cores split over this node's processes")
    p.add_argument("--ckpt-every", type=int, default=t.ckpt_every)
    p.add_argument("--log-every", type=int, default=t.log_every)
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, log.jsonl, pictures")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt, with its own settings (only "
                   "--steps, --threads, --ckpt-every and --log-every are taken from the command line)")
    args = p.parse_args(argv)
    channels = args.channels or (1 if args.dataset == "dsprites" else 3)
    if args.dataset == "folder":
        if not args.folder:
            p.error("dataset 'folder' needs --folder PATH")
        try:
            ImageFolder(args.folder).check()
        except ValueError as exc:
            p.error(str(exc))
    cfg = TrainConfig(
        dataset=args.dataset, folder=str(Path(args.folder).resolve()) if args.folder else "",  # found from anywhere
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        disc_lr=args.disc_lr, seed=args.seed, threads=args.threads, ckpt_every=args.ckpt_every, log_every=args.log_every,
        loss=ObjectiveConfig(objective=args.objective, likelihood=args.likelihood, beta=args.beta,
                             gamma=args.gamma if args.gamma is not None else GAMMA_DEFAULTS.get(args.objective, 1.0),
                             alpha=args.alpha, c_max=args.c_max,
                             anneal_steps=args.anneal_steps if args.anneal_steps is not None else max(1, args.steps // 3),
                             estimator=args.estimator, lambda_od=args.lambda_od,
                             lambda_d=args.lambda_d),
        arch=ArchConfig(name=args.arch, channels=channels, image_size=args.image_size, latent_dim=args.latent_dim))
    return cfg, Path(args.out), args.resume


def main(argv: list[str] | None = None) -> int:
    cfg, out, resume = parse_args(argv)
    path = train(cfg, out, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
