"""Datasets for training and evaluation, registered by name.

Ground-truth datasets (dSprites and its variants) also expose their factors, a sampler of factors and
a renderer of images given factors, which the disentanglement metrics need:

    factor_names, factor_sizes           the latent factors (dSprites: shape, scale, orientation, posX, posY)
    sample_factors(n, rng) -> (n, K)     factor classes drawn uniformly
    images(factors, rng) -> (n, C, H, W) float32 in [0, 1]; nuisances (colour, noise) drawn from rng

Variants follow disentanglement_lib (Locatello et al. 2019, data/ground_truth/dsprites.py):
color_dsprites paints each sprite one colour drawn from U(0.5, 1)^3; noisy_dsprites puts the white
sprite on a background of U(0, 1)^3 noise. An ImageFolder serves a user's own images (no factors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from disco.export.data.dsprites import FACTOR_NAMES, FACTOR_SIZES, render


class Dataset(Protocol):
    channels: int
    image_size: int

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n training images, float32 (n, C, H, W) in [0, 1]."""
        ...


@dataclass(frozen=True)
class DSpritesData:
    """dSprites without its constant colour factor; variant is "plain", "color" or "noisy"."""

    variant: str = "plain"
    image_size: int = 64
    factor_names: tuple[str, ...] = FACTOR_NAMES[1:]
    factor_sizes: tuple[int, ...] = FACTOR_SIZES[1:]

    @property
    def channels(self) -> int:
        return 1 if self.variant == "plain" else 3

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.integers(0, k, n) for k in self.factor_sizes], axis=1)

    def images(self, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        full = np.concatenate([np.zeros((len(factors), 1), np.int64), factors], axis=1)
        x = render(full).astype(np.float32)[:, None]  # (N, 1, 64, 64)
        if self.variant == "color":
            return x * rng.uniform(0.5, 1.0, (len(x), 3, 1, 1)).astype(np.float32)
        if self.variant == "noisy":
            return np.minimum(x + rng.uniform(0.0, 1.0, (len(x), 3, 64, 64)).astype(np.float32), 1.0)
        return x

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.images(self.sample_factors(n, rng), rng)


@dataclass(frozen=True)
class ImageFolder:
    """A user's images, any size: resized so the short side is image_size, centre-cropped, L or RGB."""

    root: str
    image_size: int = 64
    channels: int = 3
    _cache: list[np.ndarray] = field(default_factory=list, compare=False, repr=False)

    SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def files(self) -> list[Path]:
        files = sorted(self._images())
        if not files:
            raise self._none()
        return files

    def check(self) -> None:
        """Raise ValueError unless the folder holds an image (stops at the first: a big folder is listed once, by files())."""
        if next(self._images(), None) is None:
            raise self._none()

    def _images(self) -> Iterator[Path]:
        return (p for p in Path(self.root).rglob("*") if p.suffix.lower() in self.SUFFIXES)

    def _none(self) -> ValueError:
        return ValueError(f"no images ({', '.join(self.SUFFIXES)}) under {self.root}")

    def _load(self) -> np.ndarray:
        if not self._cache:
            from PIL import Image

            arrays = []
            for f in self.files():
                with Image.open(f) as im:
                    im = im.convert("L" if self.channels == 1 else "RGB")
                    s = self.image_size / min(im.size)
                    im = im.resize((max(self.image_size, round(im.width * s)), max(self.image_size, round(im.height * s))),
                                   Image.BILINEAR)
                    left, top = (im.width - self.image_size) // 2, (im.height - self.image_size) // 2
                    im = im.crop((left, top, left + self.image_size, top + self.image_size))
                    a = np.asarray(im, dtype=np.float32) / 255.0
                    arrays.append(a[None] if self.channels == 1 else a.transpose(2, 0, 1))
            self._cache.append(np.stack(arrays))
        return self._cache[0]

    def __len__(self) -> int:
        return len(self._load())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        data = self._load()
        return data[rng.integers(0, len(data), n)]


def make_dataset(name: str, folder: str = "", image_size: int = 64, channels: int = 3) -> Dataset:
    """The registry: dsprites, color_dsprites, noisy_dsprites, folder."""
    if name == "dsprites":
        return DSpritesData("plain")
    if name in ("color_dsprites", "noisy_dsprites"):
        return DSpritesData(name.split("_")[0])
    if name == "folder":
        if not folder:
            raise ValueError("dataset 'folder' needs --folder PATH")
        return ImageFolder(folder, image_size, channels)
    raise ValueError(f"dataset {name!r} is unknown, expected dsprites, color_dsprites, noisy_dsprites or folder")
