"""`disco rd` writes the rate-distortion JSON with every key the README and the issue name."""
from __future__ import annotations

import json
from pathlib import Path

from disco.client import cli


def test_rd_writes_points_baselines_and_the_bound(tmp_path: Path) -> None:
    out = tmp_path / "rd.json"
    assert cli.main(["rd", "--n", "64", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert abs(r["info_bound_bits"] - 19.49) < 0.01
    assert set(r["baselines"]) == {"png", "webp_lossless", "zlib_packbits", "jpeg_q90"}
    assert sum(p["default"] for p in r["points"]) == 1
    for p in r["points"]:
        assert {"quality", "default", "bytes_per_image", "payload_bits_per_image", "entropy_bits_per_image",
                "pixel_accuracy", "iou", "iou_unquantized", "psnr"} <= set(p)
        assert abs(p["bytes_per_image"] - (4 + p["payload_bits_per_image"] / 8)) < 0.01
    assert (tmp_path / "rd.png").stat().st_size > 10_000
