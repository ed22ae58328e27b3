"""`disco rd`: rate-distortion of a repository entry on held-out dSprites, beside classical codecs.

For every quality level: bytes per image (header included), payload bits, the empirical entropy of the
symbols, pixel accuracy, foreground IoU (and IoU of the unquantized means), PSNR; the same images
through PNG (1-bit), WebP lossless, zlib of packed bits and JPEG q90; and the information bound
log2(3 * 6 * 40 * 32 * 32) = 19.49 bits of the dSprites grid.

RGB models are measured on color-dSprites (each sprite one colour from U(0.5, 1)^3): the foreground is
where the brightest channel passes the middle, PSNR covers every channel, the classical codecs see the
RGB image (zlib of the raw bytes instead of packed bits), and the bound counts the grid, not the colour.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from disco.export.data.dsprites import FACTOR_SIZES  # numpy only
from disco.export.data.ground_truth import make_dataset  # numpy only
from disco.service import container, images
from disco.service.fidelity import brightest, foreground_iou, pixel_accuracy
from disco.service.repository import EMBEDDED, Repository
from disco.service.runtime import OnnxModel

INFO_BOUND_BITS = math.log2(int(np.prod(FACTOR_SIZES)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """Sum over dims of the empirical entropy of each dim's symbols (bits per image)."""
    total = 0.0
    for col in symbols.T:
        _, counts = np.unique(col, return_counts=True)
        p = counts / counts.sum()
        total += float(-(p * np.log2(p)).sum())
    return total


def baselines(ref: np.ndarray) -> dict[str, float]:
    """Mean bytes per image of classical codecs on uint8 (N, 64, 64, C) images: binary sprites (C = 1)
    go through 1-bit PNG and zlib of packed bits, RGB ones through RGB PNG and zlib of the raw bytes."""
    rgb = ref.shape[-1] == 3
    zlib_key = "zlib_raw" if rgb else "zlib_packbits"
    sizes: dict[str, list[int]] = {"png": [], "webp_lossless": [], zlib_key: [], "jpeg_q90": []}
    for img in ref:
        im = Image.fromarray(img if rgb else img[..., 0])
        codecs: tuple[tuple[str, Image.Image, dict[str, Any]], ...] = (
                            ("png", im if rgb else im.convert("1"), {"format": "PNG", "optimize": True}),
                            ("webp_lossless", im, {"format": "WEBP", "lossless": True, "method": 6}),
                            ("jpeg_q90", im, {"format": "JPEG", "quality": 90}))
        for key, pic, kw in codecs:
            buf = io.BytesIO()
            pic.save(buf, **kw)
            sizes[key].append(len(buf.getvalue()))
        raw = img.tobytes() if rgb else np.packbits(img >= 128).tobytes()
        sizes[zlib_key].append(len(zlib.compress(raw, 9)))
    return {k: round(float(np.mean(v)), 2) for k, v in sizes.items()}


def foreground(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, H, W), what IoU and pixel accuracy binarise."""
    return brightest(pixels, channel_axis=-1)


def rate_distortion(repo_root: Path, model: str, version: str, n: int, seed: int,
                    dataset: str = "") -> dict[str, Any]:
    entry = Repository.load(repo_root).get(model, version)
    channels = entry.input_shape[2]
    dataset = dataset or ("dsprites" if channels == 1 else "color_dsprites")
    if dataset not in ("dsprites", "color_dsprites"):  # sprites on black: what the foreground IoU measures
        raise ValueError(f"dataset {dataset!r} is not one of ['color_dsprites', 'dsprites']")
    data = make_dataset(dataset)
    if data.channels != channels:
        raise ValueError(f"{entry.name}/{entry.version} takes {channels}-channel images, {dataset} has {data.channels}")
    rt = OnnxModel(entry.path, sha256=entry.meta["files"])  # the bytes that were verified, as serving runs them
    x = data.sample(n, np.random.default_rng([seed, 10**9]))  # (N, C, 64, 64); independent of training streams
    ref = images.to_uint8(x)  # uint8 (N, 64, 64, C)
    mu, _ = rt.encode(x)

    def pixels(z: np.ndarray) -> np.ndarray:
        return images.to_uint8(rt.decode(z))

    iou_unq = float(foreground_iou(foreground(ref), foreground(pixels(mu))).mean())
    points = []
    for q in entry.codec.qualities:
        codes = entry.codec.encode(mu, q.name)
        symbols, _ = entry.codec.symbols(codes)
        out = pixels(entry.codec.decode(codes))
        batch = entry.codec.encode_batch(mu, q.name) if q.tables else b""
        points.append({
            "quality": q.name,
            "default": q.is_default,
            "bytes_per_image": round(float(np.mean([len(c) for c in codes])), 3),
            "payload_bits_per_image": round(float(np.mean([8 * (len(c) - container.OVERHEAD_BYTES) for c in codes])), 3),
            "entropy_bits_per_image": round(empirical_entropy_bits(symbols), 3),
            "batch_bytes_per_image": round(len(batch) / n, 3) if batch else None,
            "pixel_accuracy": round(float(pixel_accuracy(foreground(ref), foreground(out)).mean()), 5),
            "iou": round(float(foreground_iou(foreground(ref), foreground(out)).mean()), 4),
            "iou_unquantized": round(iou_unq, 4),
            "psnr": round(psnr(ref, out), 3),
        })
    return {"model": f"{entry.name}/{entry.version}", "fingerprint": entry.fingerprint.hex(), "dataset": dataset,
            "images": n, "points": points, "baselines": baselines(ref), "info_bound_bits": round(INFO_BOUND_BITS, 3)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    pts = result["points"]
    ax.plot([8 * p["bytes_per_image"] for p in pts], [p["iou"] for p in pts], "o-", label="DisCo code (header incl.)")
    batched = [p for p in pts if p["batch_bytes_per_image"]]
    ax.plot([8 * p["batch_bytes_per_image"] for p in batched], [p["iou"] for p in batched], "s-", ms=4,
            label="DisCo batch container, per image")
    for p in pts:
        if p["default"]:
            ax.annotate(f"default ({p['quality']}): {p['bytes_per_image']:.1f} B", (8 * p["bytes_per_image"], p["iou"]),
                        textcoords="offset points", xytext=(6, -14), fontsize=8)
    ax.axhline(pts[0]["iou_unquantized"], ls=":", c="gray", label="unquantized means")
    ax.axvline(result["info_bound_bits"], ls="--", c="k", label=f"dSprites grid bound {result['info_bound_bits']:.1f} bits"
               + (" (colour not counted)" if result["dataset"] != "dsprites" else ""))
    for name, size in result["baselines"].items():
        ax.axvline(8 * size, ls="-.", lw=0.8, c="tab:red" if name != "jpeg_q90" else "tab:orange")
        ax.text(8 * size, 0.02, f" {name} (lossless)" if name != "jpeg_q90" else " jpeg_q90", rotation=90, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bits per image")
    ax.set_ylabel("foreground IoU")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result['model']}: rate vs IoU on {result['images']} held-out {result['dataset']}")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco rd", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dsprites")
    p.add_argument("--version", default="", help="default: the latest")
    p.add_argument("--repository", type=Path, default=EMBEDDED, help="default: the embedded models")
    p.add_argument("--n", type=int, default=2000, help="held-out images")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dataset", default="", help="dsprites or color_dsprites (default: by the model's channels)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="bits vs IoU PNG (default: beside --json); needs matplotlib")
    a = p.parse_args(argv)
    try:
        r = rate_distortion(a.repository, a.model, a.version, a.n, a.seed, a.dataset)
    except (ValueError, LookupError) as exc:  # LookupError: NotFound, a model or version the repository lacks
        p.error(str(exc))
    print(f"{r['model']} on {r['images']} held-out images; bound {r['info_bound_bits']} bits")
    print(f"{'quality':>9} {'bytes':>6} {'payload':>8} {'entropy':>8} {'batch B':>8} {'IoU':>6} {'IoU(mu)':>8} {'pix acc':>8} {'PSNR':>6}")
    for pt in r["points"]:
        print(f"{pt['quality'] + ('*' if pt['default'] else ''):>9} {pt['bytes_per_image']:6.2f} "
              f"{pt['payload_bits_per_image']:8.2f} {pt['entropy_bits_per_image']:8.2f} "
              f"{pt['batch_bytes_per_image'] or 0:8.2f} {pt['iou']:6.3f} {pt['iou_unquantized']:8.3f} "
              f"{pt['pixel_accuracy']:8.4f} {pt['psnr']:6.2f}")
    print("baselines (bytes per image): " + ", ".join(f"{k} {v}" for k, v in r["baselines"].items()))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    plot_path = a.plot or (a.json.with_suffix(".png") if a.json else None)
    if plot_path:
        try:
            plot(r, plot_path)
        except ImportError:
            print("no matplotlib: skipped the plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
