"""Pictures of a representation: traversals, reconstructions, per-dim KL, mutual-information heat map."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def traversal(decode: Callable[[np.ndarray], np.ndarray], mu: np.ndarray, dims: list[int], labels: list[str],
              ranges: list[tuple[float, float]], path: Path, steps: int = 9) -> None:
    """One row per active dim, swept over its range around the first image's code, labelled by factor."""
    plt = _plt()
    fig, axes = plt.subplots(len(dims), steps, figsize=(steps * 0.9, len(dims) * 0.95 + 0.3), squeeze=False)
    for r, (d, label, (lo, hi)) in enumerate(zip(dims, labels, ranges)):
        z = np.repeat(mu[:1], steps, axis=0).astype(np.float32)
        z[:, d] = np.linspace(lo, hi, steps)
        imgs = decode(z)  # (steps, C, H, W)
        for c in range(steps):
            ax = axes[r, c]
            img = imgs[c].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{label}\n(z{d})", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("latent traversals: each row sweeps one active dim over its range", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reconstructions(x: np.ndarray, x_hat: np.ndarray, path: Path) -> None:
    plt = _plt()
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(n * 0.9, 2.1), squeeze=False)
    for row, (batch, title) in enumerate(((x, "input"), (x_hat, "reconstruction"))):
        for c in range(n):
            img = batch[c].transpose(1, 2, 0)
            axes[row, c].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[row, c].set_xticks([])
            axes[row, c].set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kl_bars(kl: np.ndarray, labels: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar(range(len(kl)), kl)
    ax.set_xticks(range(len(kl)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean KL (nats)")
    ax.set_title("KL per latent dim")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mi_heatmap(mi: np.ndarray, dim_labels: list[str], factor_names: tuple[str, ...], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(factor_names) + 2, 0.4 * len(dim_labels) + 1.2))
    im = ax.imshow(mi, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(factor_names)), factor_names, rotation=30, ha="right")
    ax.set_yticks(range(len(dim_labels)), dim_labels)
    for (i, j), v in np.ndenumerate(mi):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < mi.max() / 2 else "k")
    fig.colorbar(im, label="mutual information (nats)")
    ax.set_title("I(latent; factor)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
