"""Procedural dSprites: the full 737,280-image grid rendered on demand, in the original index order.

Specification (deepmind/dsprites-dataset README and reloading notebook): 64x64 binary images; factors
color (1), shape {square, ellipse, heart}, scale linspace(0.5, 1, 6), orientation linspace(0, 2pi, 40)
(0 and 2pi both included, so classes 0 and 39 draw the same image), posX and posY linspace(0, 1, 32);
posY varies fastest, index = classes . [737280, 245760, 40960, 1024, 32, 1].

What the specification leaves open, decided here:
- The originals were drawn by LOVE2D at 64x64 without supersampling; we also test each pixel centre
  once (hard, aliased edges), so the images are binary like the originals.
- Sprite centres span the central half of the canvas, 0.25 + 0.5 * pos (the notebook says pixels fall
  mainly in the centre half); a scale-1 square is 0.30 of the canvas wide (19 px).
- The heart's geometry was never published. We draw the classic algebraic heart
  (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, point down at orientation 0. It is not the original heart.
- x grows to the right and y grows downwards in the image (row index), as in the original arrays.

Rendering is vectorised over a batch (an implicit inside-test per pixel), some 20k images/s on one
core here, so training never waits for data and no 377 MB cache is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
SHAPE_NAMES = ("square", "ellipse", "heart")
IMAGE_SIZE = 64

_BASES = np.array([int(np.prod(FACTOR_SIZES[i + 1 :])) for i in range(len(FACTOR_SIZES))], dtype=np.int64)
_VALUES = (
    np.array([1.0]),
    np.array([1.0, 2.0, 3.0]),
    np.linspace(0.5, 1.0, 6),
    np.linspace(0.0, 2.0 * np.pi, 40),
    np.linspace(0.0, 1.0, 32),
    np.linspace(0.0, 1.0, 32),
)
_HALF_SIDE = 0.15  # half the side of a scale-1 square, as a fraction of the canvas
_PIXEL_CENTRES = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE


def render(classes: np.ndarray) -> np.ndarray:
    """Draw images for factor classes (N, 6) -> uint8 (N, 64, 64) with values 0 or 1."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, len(FACTOR_SIZES))
    shape = classes[:, 1]
    scale = _VALUES[2][classes[:, 2]].astype(np.float32)
    theta = _VALUES[3][classes[:, 3]].astype(np.float32)
    cx = (0.25 + 0.5 * _VALUES[4][classes[:, 4]]).astype(np.float32)
    cy = (0.25 + 0.5 * _VALUES[5][classes[:, 5]]).astype(np.float32)

    dx = _PIXEL_CENTRES[None, None, :] - cx[:, None, None]  # (N, 1, W)
    dy = _PIXEL_CENTRES[None, :, None] - cy[:, None, None]  # (N, H, 1)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    size = (_HALF_SIDE * scale)[:, None, None]
    # Rotate the pixel offsets by -theta into the sprite's own frame; y up in that frame.
    u = (cos * dx - sin * dy) / size  # (N, H, W)
    v = -(sin * dx + cos * dy) / size

    out = np.zeros(u.shape, dtype=bool)
    sq = shape == 0
    out[sq] = np.maximum(np.abs(u[sq]), np.abs(v[sq])) <= 1.0
    el = shape == 1
    out[el] = (u[el] / 1.35) ** 2 + (v[el] / 0.7) ** 2 <= 1.0
    he = shape == 2
    # The algebraic heart spans about x in [-1.14, 1.14], y in [-1, 1.25]; shrink it to the square's box.
    x, y = u[he] * 0.95, v[he] * 0.95 + 0.1
    out[he] = (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    return out.astype(np.uint8)


@dataclass(frozen=True)
class DSprites:
    """The dSprites grid. Indices follow the original .npz order; images are rendered on request."""

    factor_names: tuple[str, ...] = FACTOR_NAMES
    factor_sizes: tuple[int, ...] = FACTOR_SIZES

    def __len__(self) -> int:
        return int(np.prod(self.factor_sizes))

    def classes(self, index: np.ndarray) -> np.ndarray:
        """latents_classes for indices: (N,) -> int64 (N, 6)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"dSprites index out of range [0, {len(self)}): {index.min()}..{index.max()}")
        return (index[:, None] // _BASES[None, :]) % np.array(self.factor_sizes)[None, :]

    def values(self, index: np.ndarray) -> np.ndarray:
        """latents_values for indices: (N,) -> float64 (N, 6)."""
        c = self.classes(index)
        return np.stack([_VALUES[k][c[:, k]] for k in range(len(self.factor_sizes))], axis=1)

    def index(self, classes: np.ndarray) -> np.ndarray:
        """Inverse of `classes`: (N, 6) -> (N,)."""
        return np.asarray(classes, dtype=np.int64) @ _BASES

    def images(self, index: np.ndarray) -> np.ndarray:
        """imgs for indices: (N,) -> uint8 (N, 64, 64) in {0, 1}."""
        return render(self.classes(index))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n images drawn uniformly from the grid, with their classes."""
        index = rng.integers(0, len(self), size=n)
        classes = self.classes(index)
        return render(classes), classes


def sample_sheet(path: str, rows: int = 8, cols: int = 12, seed: int = 0) -> None:
    """Write a PNG grid of random sprites (one per cell, 1 px grey borders)."""
    from PIL import Image

    imgs, _ = DSprites().sample(rows * cols, np.random.default_rng(seed))
    sheet = np.full((rows * 65 + 1, cols * 65 + 1), 96, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        sheet[1 + r * 65 : 1 + r * 65 + 64, 1 + c * 65 : 1 + c * 65 + 64] = img * 255
    Image.fromarray(sheet).save(path)


if __name__ == "__main__":
    import sys

    sample_sheet(sys.argv[1] if len(sys.argv) > 1 else "dsprites_sheet.png")
