"""What the SDK returns: codes, images, factor values and code headers."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Code:
    """One factor code (or one batch container) and the model that made it. `bytes(code)` is the code."""

    data: bytes
    model: str = ""
    version: str = ""

    def __bytes__(self) -> bytes:
        return self.data

    def __len__(self) -> int:
        return len(self.data)


class Images(np.ndarray):
    """uint8 images (N, H, W, C): a numpy array with a `save` helper."""

    def save(self, path: str | Path, prefix: str = "image") -> list[Path]:
        """One image to `path`, a file name with an image format's extension ('out.png'), or each image to
        `path/<prefix>-<i>.png`, a folder: any other name, one ending in '/' or an existing folder, whatever the
        number of images ('run.v2' is a folder). Missing parent folders are made."""
        folder = isinstance(path, str) and path.endswith(("/", os.sep))  # Path() drops the slash that says so
        path = Path(path)
        arrays = np.asarray(self)
        if arrays.ndim == 2 or (arrays.ndim == 3 and arrays.shape[-1] in (1, 3, 4)):  # one image: e.g. images[0]
            arrays = (arrays[..., None] if arrays.ndim == 2 else arrays)[None]
        if folder or path.is_dir() or path.suffix.lower() not in Image.registered_extensions():
            path.mkdir(parents=True, exist_ok=True)
            targets = [path / f"{prefix}-{i:05d}.png" for i in range(len(arrays))]
        elif len(arrays) == 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            targets = [path]
        else:  # 'out.png' is a file name, never a folder
            raise ValueError(f"{len(arrays)} images cannot be saved to one file {str(path)!r}: give a folder, "
                             "or save each image (images[i].save(...))")
        for img, target in zip(arrays, targets):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(target)
        return targets


def as_images(a: np.ndarray) -> Images:
    return np.asarray(a, dtype=np.uint8).view(Images)


@dataclass(frozen=True)
class FactorValue:
    mean: float  # posterior mean, in latent units
    std: float  # posterior standard deviation
    dim: int  # latent dimension that carries the factor


class Factors(Mapping[str, FactorValue]):
    """One image's factor values by name, e.g. `factors["posX"].mean`."""

    def __init__(self, values: dict[str, FactorValue]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> FactorValue:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def means(self) -> dict[str, float]:
        return {k: v.mean for k, v in self._values.items()}

    def __repr__(self) -> str:
        return "Factors(" + ", ".join(f"{k}={v.mean:.3f}±{v.std:.3f}" for k, v in self._values.items()) + ")"


@dataclass(frozen=True)
class CodeInfo:
    """What a code's header says, read offline (see `disco.client.inspect`)."""

    format: int  # 1 fixed-width, 2 entropy-coded, 3 batch container
    quality_id: int  # the model's quality level id
    model_id: int  # first byte of the model's fingerprint (the checksum binds the full fingerprint)
    size: int  # bytes, header and checksum included
    payload_bytes: int
    count: int  # codes held: 1, or the batch's count
