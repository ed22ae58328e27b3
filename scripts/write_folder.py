"""Write a ground-truth dataset as a user would hand it over: a folder tree of PNG files, no factors.

    python scripts/write_folder.py OUT --dataset color_dsprites --n 60000

The RGB default model is trained from such a folder (`disco train --dataset folder --folder OUT`), so the
training path a user takes is the one the shipped model took. Images are drawn with the generator
[seed, 2 * 10**9], apart from the streams `disco train`, `disco eval` and `disco rd` draw.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from disco.export.data.ground_truth import make_dataset
from disco.service.images import to_uint8

DATASETS = ("dsprites", "color_dsprites", "noisy_dsprites")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dataset", choices=DATASETS, default="color_dsprites")
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    data = make_dataset(a.dataset)
    rng = np.random.default_rng([a.seed, 2 * 10**9])
    done = 0
    while done < a.n:
        x = data.sample(min(4096, a.n - done), rng)
        pixels = to_uint8(x)
        for i, img in enumerate(pixels, start=done):
            shard = a.out / f"{i // 1000:03d}"
            shard.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img if img.shape[-1] == 3 else img[..., 0]).save(shard / f"{i:06d}.png")
        done += len(pixels)
    print(f"wrote {a.n} {a.dataset} images under {a.out}")


if __name__ == "__main__":
    main()
