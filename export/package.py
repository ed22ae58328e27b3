"""`disco export`: a training checkpoint -> a verified model repository entry.

 ckpt.pt --torch.onnx--> encoder.onnx (image -> mu, logvar), decoder.onnx (z -> probs)
         --posterior statistics on dSprites--> active dims, per-dim steps, symbol ranges
         --held-out IoU per quality level--> the default level
         --> model.json (shapes, factors, codec tables, fingerprint, training record)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from disco.export.data.ground_truth import Dataset, make_dataset
from disco.export.models.burgess import VAE
from disco.export.train import TrainConfig, load_checkpoint
from disco.service import container
from disco.service.codec import Codec
from disco.service.entropy import table_from_counts
from disco.service.fidelity import brightest, foreground_iou
from disco.service.repository import SCHEMA, check_version, fingerprint, load_entry, sha256_file
from disco.service.runtime import OnnxModel

OPSET = 17
# Quality levels: the quantizer step of each active dim is this multiple of its median posterior std.
# A step of one posterior std spends about log2(range / sigma) bits per dim.
# Quantizer steps in posterior standard deviations, coarse to fine. Ids travel in the code (4 bits) and never
# change meaning: "min" and "lower" came later, so that a model whose coarse levels lose little IoU can default
# to them (the default is the coarsest within MAX_IOU_LOSS of the unquantized means: default_level).
LEVELS = (("min", 4, 4.0), ("lower", 5, 3.0), ("low", 0, 2.0), ("medium", 1, 1.0), ("high", 2, 0.5), ("max", 3, 0.25))
MAX_IOU_LOSS = 0.01  # the default level is the coarsest that costs at most this much IoU


class _Decoder(nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))  # (N, C, H, W) probabilities


def export_onnx(model: VAE, folder: Path, meta: dict[str, str]) -> None:
    """Write encoder.onnx and decoder.onnx with a dynamic batch axis and no sampling node."""
    model = model.eval()
    a = model.cfg
    x = torch.zeros(2, a.channels, a.image_size, a.image_size)
    z = torch.zeros(2, a.latent_dim)
    # The TorchScript exporter (dynamo=False) needs no onnxscript and writes a small static graph that
    # ONNX Runtime runs as is; torch >= 2.9 marks it deprecated, which we acknowledge here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        _export_pair(model, x, z, folder)
    for name in ("encoder.onnx", "decoder.onnx"):
        m = onnx.load(folder / name)
        onnx.helper.set_model_props(m, meta)
        onnx.checker.check_model(m)
        onnx.save(m, folder / name)


def unique_id(folder: Path, tables: dict[str, Any], repository: Path, meta: dict[str, str]) -> bytes:
    """The fingerprint of folder's decoder and tables, its first byte (a code's model id) made unique in the
    repository: while another fingerprint there has it, a salt in decoder.onnx's metadata (which no computation
    reads) changes the bytes the fingerprint hashes. Ids that collide cost about one code in 65,536 of each version
    (one that passes both checksums and decodes under both is refused as ambiguous: Pipeline.route)."""
    taken: set[bytes] = set()
    for other in repository.glob("*/*/model.json"):
        if other.parent.resolve() != folder.resolve():
            try:
                fp = bytes.fromhex(json.loads(other.read_text())["fingerprint"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a model the server would serve
            if len(fp) == 32:  # nor is one whose fingerprint is not a sha-256
                taken.add(fp)
    path = folder / "decoder.onnx"
    fp = fingerprint(path.read_bytes(), tables)
    for salt in range(1, 4096):  # 256 ids: a free one is found within a few tries unless nearly all are taken
        if not any(t[0] == fp[0] and t != fp for t in taken):  # the same fingerprint decodes alike: no collision
            return fp
        m = onnx.load(path)
        onnx.helper.set_model_props(m, {**meta, "disco.id_salt": str(salt)})
        onnx.save(m, path)
        fp = fingerprint(path.read_bytes(), tables)
    raise ValueError(f"no free model id in {repository}: {len({t[0] for t in taken})} of 256 are taken")


def _export_pair(model: VAE, x: torch.Tensor, z: torch.Tensor, folder: Path) -> None:
    torch.onnx.export(model.encoder, (x,), folder / "encoder.onnx", input_names=["image"],
                      output_names=["mu", "logvar"], opset_version=OPSET, dynamo=False,
                      dynamic_axes={"image": {0: "n"}, "mu": {0: "n"}, "logvar": {0: "n"}})
    torch.onnx.export(_Decoder(model), (z,), folder / "decoder.onnx", input_names=["z"], output_names=["probs"],
                      opset_version=OPSET, dynamo=False, dynamic_axes={"z": {0: "n"}, "probs": {0: "n"}})


@torch.no_grad()
def posterior_stats(model: VAE, data: Dataset, n: int, seed: int) -> dict[str, np.ndarray]:
    """mu, sigma and per-dim KL (nats) on n training-distribution images."""
    imgs = data.sample(n, np.random.default_rng(seed))
    mus, logvars = [], []
    for i in range(0, n, 1000):
        x = torch.from_numpy(imgs[i : i + 1000])
        mu, logvar = model.encoder(x)
        mus.append(mu.numpy())
        logvars.append(logvar.numpy())
    mu, logvar = np.concatenate(mus).astype(np.float64), np.concatenate(logvars).astype(np.float64)
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).mean(0)
    return {"mu": mu, "sigma": np.exp(0.5 * logvar), "kl": kl}


def codec_tables(stats: dict[str, np.ndarray], kl_threshold: float) -> dict[str, Any]:
    active = [int(d) for d in np.flatnonzero(stats["kl"] > kl_threshold)]
    mu = stats["mu"]
    qualities = []
    for name, qid, mult in LEVELS:
        dims = []
        for d in active:
            center = float(np.mean(mu[:, d]))
            step = float(mult * np.median(stats["sigma"][:, d]))
            lo, hi = np.quantile(mu[:, d], [1e-4, 1 - 1e-4])
            center, step = round(center, 6), round(step, 6)  # the values stored are the values used
            smin, smax = math.floor((lo - center) / step) - 1, math.ceil((hi - center) / step) + 1
            symbols = np.rint((mu[:, d] - center) / step).astype(np.int64)
            inside = (symbols >= smin) & (symbols <= smax)
            counts = np.bincount(symbols[inside] - smin, minlength=smax - smin + 1)
            dims.append({"dim": d, "center": center, "step": step, "min_symbol": smin, "max_symbol": smax,
                         "bits": max(1, math.ceil(math.log2(smax - smin + 1))),
                         "freq": table_from_counts(counts, escapes=int((~inside).sum()))})
        qualities.append({"name": name, "id": qid, "default": False, "dims": dims})
    fill = [round(float(np.mean(mu[:, d])), 6) for d in range(mu.shape[1])]
    return {"format": container.FORMAT_ENTROPY, "active_dims": active, "fill": fill, "qualities": qualities}


def held_out_iou(folder: Path, tables: dict[str, Any], latent_dim: int, data: Dataset, n: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Per-image IoU on held-out images for the unquantized means and for each quality level (via ONNX Runtime)."""
    rt = OnnxModel(folder)
    x = data.sample(n, np.random.default_rng(seed))  # (N, C, H, W) in [0, 1]
    mu, _ = rt.encode(x)

    def iou(z: np.ndarray) -> np.ndarray:
        return foreground_iou(brightest(x, 1), brightest(rt.decode(z), 1))

    out = {"unquantized": iou(mu)}
    for q in tables["qualities"]:
        trial = {**tables, "qualities": [{**q, "default": True}]}
        codec = Codec.from_json(trial, b"\0" * 32, latent_dim)
        level = codec.quality()
        z = codec.dequantize(codec.quantize(mu, level), level)
        out[q["name"]] = iou(z)
    return out


def default_level(iou: dict[str, np.ndarray], qualities: list[dict[str, Any]]) -> dict[str, Any]:
    """The coarsest level whose IoU loss is at most MAX_IOU_LOSS including its sampling error: the mean paired
    loss plus two standard errors (a one-sided bound at about 97.5%), so that other images agree with the choice."""
    for q in qualities:  # LEVELS run from coarse to fine
        loss = iou["unquantized"] - iou[q["name"]]
        if loss.mean() + 2 * loss.std(ddof=1) / np.sqrt(len(loss)) <= MAX_IOU_LOSS:
            return q
    return qualities[-1]


# The flags of each objective's own settings (ObjectiveConfig fields), for the recorded command.
_OBJECTIVE_FLAGS = {"annealed": ("gamma", "c_max", "anneal_steps"), "factorvae": ("gamma",),
                    "betatcvae": ("alpha", "gamma", "estimator"), "dipvae1": ("lambda_od", "lambda_d"),
                    "dipvae2": ("lambda_od", "lambda_d")}


def train_command(cfg: TrainConfig) -> str:
    """The `disco train` command line of a config (the run folder written as RUN)."""
    loss, a = cfg.loss, cfg.arch
    flags = [f"--dataset {cfg.dataset}"] + ([f"--folder {cfg.folder}"] if cfg.folder else [])
    flags += [f"--objective {loss.objective}", f"--beta {loss.beta:g}"]
    flags += [f"--{k.replace('_', '-')} {getattr(loss, k)}" for k in _OBJECTIVE_FLAGS.get(loss.objective, ())]
    flags += [f"--arch {a.name}", f"--channels {a.channels}", f"--latent-dim {a.latent_dim}",
              f"--steps {cfg.steps}", f"--batch-size {cfg.batch_size}", f"--lr {cfg.lr:g}", f"--seed {cfg.seed}",
              f"--threads {cfg.threads}"]
    return "disco train " + " ".join(flags) + " --out RUN"


def training_record(cfg: TrainConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    # The steps actually trained: a run stopped early (or resumed with more steps) is recorded as what it is.
    # No schedule depends on --steps once anneal_steps is explicit, so this command reproduces the checkpoint.
    command = train_command(dataclasses.replace(cfg, steps=int(ckpt["step"])))
    return {"command": command, "config": ckpt["config"], "steps": int(ckpt["step"]),
            "wall_s": round(float(ckpt["wall_s"]), 1),
            "final_losses": {k: round(float(v), 3) for k, v in ckpt["losses"].items()},
            "machine": "2-core x86_64 CPU, no GPU (torch CPU build)"}


def export(ckpt_path: Path, repository: Path, name: str, version: str, kl_threshold: float = 0.1,
           n_stats: int = 50_000, n_eval: int = 2_000, description: str = "", held_out: str = "") -> Path:
    """held_out names the dataset of the quality levels' IoU (default: the training dataset; a folder has no
    held-out images, so a model trained on a folder of color-dSprites is best judged on fresh color_dsprites)."""
    check_version(version)  # before any work: the server would refuse the folder
    final = repository / name / version
    if final.exists():  # a review: a failed export deleted the version it was given; a good one replaced it in place
        raise ValueError(f"{final} exists: a version is never replaced (the codes it made would no longer decode); "
                         "export a new version number")
    cfg, model, ckpt = load_checkpoint(ckpt_path)
    data = make_dataset(cfg.dataset, cfg.folder, cfg.arch.image_size, cfg.arch.channels)
    held_out_data = make_dataset(held_out, "", cfg.arch.image_size, cfg.arch.channels) if held_out else data
    # Written under a hidden folder of the model's, as <name>/.export-X/<name>/<version> (deeper than a serving
    # repository looks, and named as the version so that the server's own check runs there), then renamed into place
    # whole: a server polling the repository never sees a version half written, and the rename stays on one file
    # system even where <name> is a link to another
    made = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=final.parent))
    lock = os.open(staging / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held while this export lives: its folder is not abandoned
        except OSError as exc:  # a file system without locks: the export goes on, and its folder is judged by age
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        folder = staging / name / version
        folder.mkdir(parents=True)
        _write_version(folder, cfg, model, ckpt, ckpt_path, repository, name, version, data, held_out_data,
                       kl_threshold, n_stats, n_eval, description, held_out)
        try:
            os.rename(folder, final)
        except OSError as exc:  # a version exported meanwhile by another run: not replaced
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ValueError(f"{final} exists (exported meanwhile): a version is never replaced") from exc
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):  # only if empty: another run may have written a version there
                final.parent.rmdir()
        raise
    finally:
        os.close(lock)
    shutil.rmtree(staging, ignore_errors=True)
    return final


_STAGING_GRACE_S = 60.0


def _remove_abandoned_staging(folder: Path) -> None:
    """The staging folders of exports that were killed, which would stay forever. One is abandoned when its lock can
    be taken: a live export holds it, whatever its process id or PID namespace (a review: a process-id check
    removed the folder of an export running in another container on a shared repository)."""
    for old in folder.glob(".export-*"):
        try:
            if time.time() - old.stat().st_mtime < _STAGING_GRACE_S:  # just made: its lock may not be taken yet
                continue
            fd = os.open(old / ".lock", os.O_WRONLY)
        except FileNotFoundError:  # killed before it made its lock, long ago
            shutil.rmtree(old, ignore_errors=True)
            continue
        except OSError:  # not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: in use (or a file system that keeps no locks, where a slow export looks alike)
            continue
        else:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)


def _write_version(folder: Path, cfg: TrainConfig, model: VAE, ckpt: dict[str, Any], ckpt_path: Path,
                   repository: Path, name: str, version: str, data: Dataset, held_out_data: Dataset,
                   kl_threshold: float, n_stats: int, n_eval: int, description: str, held_out: str) -> None:
    export_onnx(model, folder, {"disco.name": name, "disco.version": version,
                                "disco.latent_dim": str(cfg.arch.latent_dim)})
    stats = posterior_stats(model, data, n_stats, seed=12345)
    tables = codec_tables(stats, kl_threshold)
    if not tables["active_dims"]:
        raise ValueError(f"no latent dim of {ckpt_path} carries more than {kl_threshold} nats (largest: "
                         f"{float(stats['kl'].max()):.3g}): the model encodes nothing yet; train longer or lower "
                         "--kl-threshold")
    iou = held_out_iou(folder, tables, cfg.arch.latent_dim, held_out_data, n_eval, seed=67890)
    default_level(iou, tables["qualities"])["default"] = True
    fp = unique_id(folder, tables, repository, {"disco.name": name, "disco.version": version,
                                                "disco.latent_dim": str(cfg.arch.latent_dim)})
    a = cfg.arch
    meta = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "description": description or f"{cfg.objective} (beta={cfg.beta}) on {cfg.dataset}",
        "input": {"height": a.image_size, "width": a.image_size, "channels": a.channels},
        "latent_dim": a.latent_dim,
        "decoder_output": "probabilities",
        "factors": [{"dim": d, "name": f"z{d}", "kl_nats": round(float(stats["kl"][d]), 4),
                     "min": round(float(stats["mu"][:, d].min()), 4), "max": round(float(stats["mu"][:, d].max()), 4)}
                    for d in tables["active_dims"]],
        "kl_nats_per_dim": [round(float(k), 4) for k in stats["kl"]],
        "codec": tables,
        "evaluation": {"held_out_images": n_eval, "held_out_dataset": held_out or cfg.dataset,
                       "iou": {k: round(float(v.mean()), 4) for k, v in iou.items()}},
        "fingerprint": fp.hex(),
        "files": {f: sha256_file(folder / f) for f in ("encoder.onnx", "decoder.onnx")},
        "training": training_record(cfg, ckpt),
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    load_entry(folder)  # the server's own check must pass before we call it done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco export", description="Write a model repository entry from a checkpoint.")
    p.add_argument("checkpoint", type=Path, help="ckpt.pt written by disco train")
    p.add_argument("--repository", type=Path, required=True, help="repository root")
    p.add_argument("--name", default="dsprites")
    p.add_argument("--version", default="1")
    p.add_argument("--kl-threshold", type=float, default=0.1, help="nats; dims below it are not sent")
    p.add_argument("--n-stats", type=int, default=50_000, help="images for the posterior statistics")
    p.add_argument("--n-eval", type=int, default=2_000, help="held-out images for the quality levels")
    p.add_argument("--held-out", default="", help="dataset of those images (default: the training dataset)")
    p.add_argument("--description", default="", help="model.json description (default: objective and dataset)")
    a = p.parse_args(argv)
    if not a.checkpoint.is_file():
        p.error(f"checkpoint {a.checkpoint} does not exist")
    try:
        folder = export(a.checkpoint, a.repository, a.name, a.version, a.kl_threshold, a.n_stats, a.n_eval,
                        a.description, a.held_out)
    except (ValueError, OSError) as exc:  # OSError: a repository that cannot be written, a full disk
        p.error(str(exc))
    meta = json.loads((folder / "model.json").read_text())
    print(f"wrote {folder}: active dims {meta['codec']['active_dims']}, iou {meta['evaluation']['iou']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
