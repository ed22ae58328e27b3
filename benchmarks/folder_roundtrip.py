"""A folder of dSprites PNGs through `disco compress` and `disco decompress` on a running server.

    disco serve &
    python benchmarks/folder_roundtrip.py --n 1000 --json benchmarks/results/folder_roundtrip.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from disco.client import cli
from disco.export.data.dsprites import DSprites
from disco.service.fidelity import foreground_iou


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    imgs, _ = DSprites().sample(a.n, np.random.default_rng([99, 10**9]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, img in enumerate(imgs):  # a nested tree, as a user's folder would be
            sub = root / "in" / f"shard{i % 10}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img * 255).convert("1").save(sub / f"{i:05d}.png")
        lines = {}
        for cmd, src, dst in (("compress", "in", "codes"), ("decompress", "codes", "out")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = cli.main([cmd, str(root / src), "-o", str(root / dst), "--target", a.target,
                               "--concurrency", str(a.concurrency)])
            assert rc == 0, f"disco {cmd} failed"
            lines[cmd] = out.getvalue().strip().splitlines()[-1]
            print(lines[cmd])
        pngs = sorted((root / "in").rglob("*.png"))
        ref = np.stack([np.asarray(Image.open(f).convert("L")) for f in pngs])
        got = np.stack([np.asarray(Image.open(root / "out" / f.relative_to(root / "in"))) for f in pngs])
        codes = sorted((root / "codes").rglob("*.dsc"))
        result = {"images": a.n, "summary": lines, "iou_mean": round(float(foreground_iou(ref, got).mean()), 4),
                  "png_bytes_per_image": round(sum(f.stat().st_size for f in pngs) / a.n, 2),
                  "code_bytes_per_image": round(sum(f.stat().st_size for f in codes) / a.n, 3)}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
