"""`disco eval` scores a training run (torch) and its exported entry (ONNX) the same, writes every key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")

from disco.client import cli  # noqa: E402

KEYS = {"mig", "dci", "sap", "factor_vae_score", "beta_vae_score", "modularity", "explicitness", "recon_nats",
        "kl_nats_per_dim", "active_dims", "factor_names"}


def test_run_and_export_give_the_same_numbers(tiny_repo: Path, tmp_path: Path) -> None:
    entry = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", entry)
    for src, out in ((tiny_repo.parent / "run", tmp_path / "torch"), (entry, tmp_path / "onnx")):
        assert cli.main(["eval", str(src), "--dataset", "dsprites", "--out", str(out), "--scale", "0.02"]) == 0
    a = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    b = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert KEYS <= set(a) and set(a["dci"]) == {"disentanglement", "completeness", "informativeness"}
    for k in ("mig", "sap", "factor_vae_score", "beta_vae_score", "modularity", "explicitness", "recon_nats"):
        assert a[k] == pytest.approx(b[k], abs=0.02), k
    for f in ("traversal.png", "reconstructions.png", "kl_per_dim.png", "mi_heatmap.png"):
        assert (tmp_path / "onnx" / f).stat().st_size > 1000


def test_write_names_updates_model_json(tiny_repo: Path, tmp_path: Path) -> None:
    entry = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", entry)
    assert cli.main(["eval", str(entry), "--dataset", "dsprites", "--out", str(tmp_path / "o"), "--scale", "0.02",
                     "--write-names"]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    meta = json.loads((entry / "model.json").read_text())
    named = {str(f["dim"]): f["name"] for f in meta["factors"]}
    for dim, name in metrics["factor_names"].items():
        assert named[dim] == name
    from disco.service.repository import load_entry

    load_entry(entry)  # names are not part of the fingerprint: the entry still verifies
