"""Round-trip held-out dSprites through a running server: bytes per code, foreground IoU, pixel accuracy.

    disco serve &                       # the embedded default model
    python benchmarks/roundtrip.py --n 256 --json benchmarks/results/roundtrip.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from disco.client import Client
from disco.export.data.dsprites import DSprites  # numpy only: no torch behind it
from disco.service.fidelity import foreground_iou, pixel_accuracy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=7, help="held-out sample (training draws from seed 0 streams)")
    p.add_argument("--quality", default="")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    imgs, _ = DSprites().sample(a.n, np.random.default_rng([a.seed, 10**9]))
    x = (imgs * 255)[..., None]  # uint8 (N, 64, 64, 1), pixels 0 or 255
    with Client(a.target) as c:
        t0 = time.perf_counter()
        codes = c.compress(x, quality=a.quality)
        t1 = time.perf_counter()
        out = c.decompress(codes)
        t2 = time.perf_counter()
        info = c.model(codes[0].model, codes[0].version)
    sizes = np.array([len(code) for code in codes])
    result = {
        "model": f"{codes[0].model}/{codes[0].version}",
        "fingerprint": info.fingerprint[:16],
        "quality": a.quality or next(q.name for q in info.qualities if q.is_default),
        "images": a.n,
        "bytes_per_code_with_header": float(sizes.mean()),
        "raw_bytes_per_image_packed_bits": 64 * 64 / 8,
        "iou_mean": round(float(foreground_iou(x, out).mean()), 4),
        "pixel_accuracy_mean": round(float(pixel_accuracy(x, out).mean()), 4),
        "all_black_pixel_accuracy": round(float(pixel_accuracy(x, np.zeros_like(x)).mean()), 4),
        "compress_s": round(t1 - t0, 3),
        "decompress_s": round(t2 - t1, 3),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
