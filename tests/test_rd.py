"""`disco rd` writes the rate-distortion JSON with every key the README and the issue name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.parametrize("args, named", [(["--model", "nope"], "model 'nope'"), (["--version", "9"], "no version '9'")])
def test_rd_names_a_model_or_version_the_repository_lacks(args: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:  # was a traceback (NotFound is a LookupError, not a ValueError)
        cli.main(["rd", "--n", "8", *args])
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_rgb_model_from_a_folder_exports_and_measures_on_color_dsprites(tmp_path: Path, capsys) -> None:
    """The user's path for RGB: a folder of PNGs -> disco train -> disco export -> disco rd on color-dSprites."""
    pytest.importorskip("torch")
    from disco.export.data.ground_truth import DSpritesData
    from disco.export.models.burgess import ArchConfig
    from disco.export.package import export
    from disco.export.train import TrainConfig, train

    folder = tmp_path / "images" / "shard0"
    folder.mkdir(parents=True)
    x = DSpritesData("color").sample(32, np.random.default_rng(3))
    for i, img in enumerate(np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    cfg = TrainConfig(dataset="folder", folder=str(tmp_path / "images"), steps=10, batch_size=8, ckpt_every=10,
                      threads=1, arch=ArchConfig(channels=3))
    ckpt = train(cfg, tmp_path / "run")
    import torch  # beta-TCVAE's N is the folder's image count, counted once when the images load
    assert torch.load(ckpt, weights_only=True)["config"]["loss"]["dataset_size"] == 32
    entry = export(ckpt, tmp_path / "repo", "rgb", "1", kl_threshold=0.0, n_stats=128, n_eval=32,
                   held_out="color_dsprites")
    meta = json.loads((entry / "model.json").read_text())
    assert meta["input"]["channels"] == 3 and meta["evaluation"]["held_out_dataset"] == "color_dsprites"
    assert "--dataset folder --folder " in meta["training"]["command"]

    out = tmp_path / "rd.json"
    assert cli.main(["rd", "--repository", str(tmp_path / "repo"), "--model", "rgb", "--n", "32",
                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dataset"] == "color_dsprites"
    assert set(r["baselines"]) == {"png", "webp_lossless", "zlib_raw", "jpeg_q90"}
    assert r["baselines"]["png"] > 100  # RGB sprites, not 1-bit ones
    assert all(0.0 <= p["iou"] <= 1.0 for p in r["points"])

    with pytest.raises(SystemExit):  # a grey dataset for an RGB model is refused by name
        cli.main(["rd", "--repository", str(tmp_path / "repo"), "--model", "rgb", "--dataset", "dsprites"])
    assert "takes 3-channel images, dsprites has 1" in capsys.readouterr().err
