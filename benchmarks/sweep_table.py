"""Summarise a flagship sweep written by scripts/sweep.sh: one row per run, as Markdown and JSON.

    python benchmarks/sweep_table.py SWEEP_DIR [--json OUT.json] [--md OUT.md]

Columns come from each run's files: the training config and step count (the exported model.json, in SWEEP_DIR/repo),
the metrics of `disco eval --scale 0.25` (run/eval/metrics.json) and the default quality level of `disco rd`
(run/rd.json: bytes per code with the 4-byte header, payload bits without it, foreground IoU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _setting(cfg: dict[str, Any]) -> str:
    loss = cfg["loss"]
    obj = loss["objective"]
    if obj == "betatcvae":
        return f"beta={loss['beta']:g}"
    if obj == "factorvae":
        return f"gamma={loss['gamma']:g}"
    if obj == "annealed":
        return f"C={loss['c_max']:g}, gamma={loss['gamma']:g}"
    if obj.startswith("dipvae"):
        return f"lambda_od={loss['lambda_od']:g}"
    return f"beta={loss['beta']:g}"


def row(run: Path) -> dict[str, Any] | None:
    metrics_path, rd_path = run / "eval" / "metrics.json", run / "rd.json"
    if not (metrics_path.exists() and rd_path.exists()):
        return None
    m = json.loads(metrics_path.read_text())
    rd = json.loads(rd_path.read_text())
    point = next(p for p in rd["points"] if p["default"])
    model = json.loads(next((run.parent / "repo" / run.name).glob("*/model.json")).read_text())
    training = model["training"]  # the checkpoint's own step count, also for a copy taken mid-run
    cfg = training["config"]
    return {
        "run": run.name, "objective": cfg["loss"]["objective"], "setting": _setting(cfg), "seed": cfg["seed"],
        "steps": training["steps"], "train_s": training["wall_s"],
        "mig": round(m["mig"], 3), "dci_disentanglement": round(m["dci"]["disentanglement"], 3),
        "factor_vae_score": round(m["factor_vae_score"], 3), "recon_nats": round(m["recon_nats"], 1),
        "active_dims": len(m["active_dims"]), "factors": ",".join(m["factor_names"].values()),
        "bytes_per_image": point["bytes_per_image"], "payload_bits": round(point["payload_bits_per_image"], 1),
        "iou": point["iou"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    a = p.parse_args()
    rows = [r for run in sorted(a.sweep_dir.iterdir()) if run.is_dir() and run.name != "repo" and (r := row(run))]
    cols = ["run", "objective", "setting", "seed", "steps", "mig", "dci_disentanglement", "factor_vae_score",
            "recon_nats", "bytes_per_image", "payload_bits", "iou", "active_dims", "factors"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.md:
        a.md.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
