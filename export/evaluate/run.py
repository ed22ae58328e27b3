"""`disco eval`: the field's metrics and pictures for a training run (torch) or a repository entry (ONNX).

    MODEL_OR_RUN: a run folder (ckpt.pt), a repository entry folder (model.json), or a model name
    of the embedded repository (e.g. dsprites). Both paths feed the same numpy metrics, with the same
    seeds, so a run and its export score the same (up to float differences of the two runtimes).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from disco.export.data.ground_truth import DSpritesData
from disco.export.evaluate import metrics as M
from disco.export.evaluate import pictures
from disco.export.evaluate.naming import apply_names, name_dims


@dataclass
class Representation:
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> mu, logvar
    decode: Callable[[np.ndarray], np.ndarray]  # z -> probabilities
    latent_dim: int
    dataset: str
    meta_path: Path | None  # model.json of a repository entry


def load(target: str) -> Representation:
    path = Path(target)
    if (path / "ckpt.pt").exists() or path.suffix == ".pt":
        import torch

        from disco.export.train import load_checkpoint

        cfg, model, _ = load_checkpoint(path if path.suffix == ".pt" else path / "ckpt.pt")
        model.eval()

        @torch.no_grad()
        def enc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mu, logvar = model.encoder(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return mu.numpy(), logvar.numpy()

        @torch.no_grad()
        def dec(z: np.ndarray) -> np.ndarray:
            return torch.sigmoid(model.decoder(torch.from_numpy(np.asarray(z, np.float32)))).numpy()

        return Representation(enc, dec, cfg.arch.latent_dim, cfg.dataset, None)
    from disco.service.repository import EMBEDDED, load_entry
    from disco.service.runtime import OnnxModel

    if not (path / "model.json").exists():
        versions = sorted((EMBEDDED / target).glob("*/model.json"), key=lambda p: p.parent.name)
        if not versions:
            raise SystemExit(f"disco eval: {target} is not a run folder, a repository entry or an embedded model")
        path = versions[-1].parent
    entry = load_entry(path)
    rt = OnnxModel(path)
    training = entry.meta.get("training", {}).get("config", {})
    return Representation(lambda x: rt.encode(np.ascontiguousarray(x, dtype=np.float32)), rt.decode,
                          entry.codec.latent_dim, training.get("dataset", "dsprites"), path / "model.json")


def evaluate(rep: Representation, out: Path, dataset: str, sizes: dict[str, int], seed: int = 0,
             write_names: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    variant = {"dsprites": "plain", "color_dsprites": "color", "noisy_dsprites": "noisy"}[dataset]
    data = DSpritesData(variant)
    encode = lambda x: rep.encode(x)[0]  # noqa: E731 - the representation is the posterior mean
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    stages = ["sample", "mig", "dci", "sap", "modularity", "factor_vae", "beta_vae", "pictures"]
    bar = tqdm(stages, desc="eval")

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        bar.update(1)
        return value

    rng = lambda k: np.random.default_rng([seed, k])  # noqa: E731 - one stream per metric, as in disentanglement_lib
    mig_pts, train_pts, test_pts = timed("sample", lambda: (
        M.sample(data, encode, sizes["mig"], rng(1)), M.sample(data, encode, sizes["train"], rng(2)),
        M.sample(data, encode, sizes["test"], rng(3))))
    mig = timed("mig", lambda: M.mig(*mig_pts))
    dci = timed("dci", lambda: M.dci(train_pts, test_pts, seed))
    sap = timed("sap", lambda: M.sap(train_pts, test_pts))
    mod = timed("modularity", lambda: M.modularity_explicitness(train_pts, test_pts))
    fvae = timed("factor_vae", lambda: M.factor_vae_score(data, encode, rng(4), sizes["fvae_train"], sizes["fvae_eval"]))
    bvae = timed("beta_vae", lambda: M.beta_vae_score(data, encode, rng(5), sizes["bvae_train"], sizes["bvae_eval"]))

    # Reconstruction and KL on held-out images.
    x = data.images(data.sample_factors(2000, rng(6)), rng(6))
    mu, logvar = rep.encode(x)
    p = np.clip(rep.decode(mu), 1e-6, 1 - 1e-6)
    recon = float(-(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=(1, 2, 3)).mean())
    kl = (0.5 * (mu**2 + np.exp(logvar) - 1 - logvar)).mean(0)
    active = [int(d) for d in np.flatnonzero(kl > 0.1)]
    mi = np.array(mig["mi_matrix"])
    h = np.array([M.mutual_info_score(mig_pts[1][:, k], mig_pts[1][:, k]) for k in range(mi.shape[1])])
    names = name_dims(mi, data.factor_names, h, active)

    def draw() -> None:
        labels = [names.get(d, f"z{d}") for d in range(rep.latent_dim)]
        shown = active or [int(d) for d in np.argsort(-kl)[:3]]  # a collapsed model still gets a picture
        ranges = [(float(np.quantile(mig_pts[0][:, d], 0.02)), float(np.quantile(mig_pts[0][:, d], 0.98))) for d in shown]
        pictures.traversal(rep.decode, mu, shown, [labels[d] for d in shown], ranges, out / "traversal.png")
        pictures.reconstructions(x[:10], rep.decode(mu[:10]), out / "reconstructions.png")
        pictures.kl_bars(kl, labels, out / "kl_per_dim.png")
        pictures.mi_heatmap(mi, labels, data.factor_names, out / "mi_heatmap.png")

    timed("pictures", draw)
    bar.close()
    result = {
        "mig": mig["mig"],
        "dci": {k: dci[k] for k in ("disentanglement", "completeness", "informativeness")},
        "sap": sap["sap"],
        "factor_vae_score": fvae["factor_vae_score"],
        "beta_vae_score": bvae["beta_vae_score"],
        "modularity": mod["modularity"],
        "explicitness": mod["explicitness"],
        "gaussian_total_correlation": M.gaussian_total_correlation(mig_pts[0]),
        "code_mutual_information": M.code_mutual_information(mig_pts[0]),
        "recon_nats": recon,
        "kl_nats_per_dim": [float(v) for v in kl],
        "active_dims": active,
        "factor_names": {str(d): names[d] for d in active},
        "mig_per_factor": dict(zip(data.factor_names, mig["per_factor"])),
        "mi_matrix": mig["mi_matrix"],
        "dataset": dataset,
        "protocol": {"seed": seed, **sizes, "bins": 20,
                     "source": "disentanglement_lib (Locatello et al. 2019) protocols; codes are posterior means"},
        "seconds": timings,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    if write_names and rep.meta_path is not None:
        meta = json.loads(rep.meta_path.read_text())
        rep.meta_path.write_text(json.dumps(apply_names(meta, names), indent=1) + "\n")
    return result


FULL = {"mig": 10_000, "train": 10_000, "test": 5_000, "fvae_train": 10_000, "fvae_eval": 5_000,
        "bvae_train": 10_000, "bvae_eval": 5_000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco eval", description="Disentanglement metrics and pictures.")
    p.add_argument("model_or_run", help="run folder, repository entry folder, or embedded model name")
    p.add_argument("--dataset", default="", help="default: the model's training dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every sample size of the protocol (1 = disentanglement_lib's sizes)")
    p.add_argument("--write-names", action="store_true", help="store the factor names in the entry's model.json")
    a = p.parse_args(argv)
    rep = load(a.model_or_run)
    sizes = {k: max(8, int(v * a.scale)) for k, v in FULL.items()}
    r = evaluate(rep, a.out, a.dataset or rep.dataset, sizes, a.seed, a.write_names)
    print(json.dumps({k: r[k] for k in ("mig", "dci", "sap", "factor_vae_score", "beta_vae_score", "modularity",
                                        "explicitness", "recon_nats", "active_dims", "factor_names", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
