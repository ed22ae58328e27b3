"""Training writes self-describing checkpoints; export writes ONNX that matches torch and a verified entry."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from disco.export import train as train_mod  # noqa: E402
from disco.export.losses import Objective, ObjectiveConfig, kl_per_dim  # noqa: E402
from disco.export.models.burgess import VAE, ArchConfig  # noqa: E402
from disco.service.repository import load_entry  # noqa: E402
from disco.service.runtime import OnnxModel  # noqa: E402


def test_kl_matches_the_closed_form_by_hand() -> None:
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, np.log(4.0)]])
    # KL(N(1,1)||N(0,1)) = 0.5; KL(N(0,4)||N(0,1)) = 0.5 * (4 - 1 - ln 4)
    np.testing.assert_allclose(kl_per_dim(mu, logvar).numpy(), [0.5, 0.5 * (3 - np.log(4))], rtol=1e-6)


def test_beta_vae_loss_is_recon_plus_beta_kl() -> None:
    model = VAE(ArchConfig()).train()
    x = torch.randint(0, 2, (4, 1, 64, 64)).float()
    t = Objective(ObjectiveConfig(objective="betavae", beta=4.0), 10)(model(x), x, 0)
    torch.testing.assert_close(t["loss"], t["recon"] + 4.0 * t["kl"])


def test_checkpoint_records_its_config_and_resume_continues(tmp_path: Path, capsys) -> None:
    cfg = train_mod.TrainConfig(steps=4, batch_size=8, ckpt_every=2, log_every=2, threads=1,
                                loss=ObjectiveConfig(objective="betavae", beta=3.0))
    ckpt = train_mod.train(cfg, tmp_path)
    loaded_cfg, model, raw = train_mod.load_checkpoint(ckpt)  # torch.load(weights_only=True) inside
    assert loaded_cfg == cfg and raw["step"] == 4
    # Resumed with other settings (as `disco train --resume` without the first run's flags gives): the run goes on
    # with its own (a review: it went on as another objective, silently); the command line sets its length
    longer = dataclasses.replace(cfg, steps=6, seed=5, loss=ObjectiveConfig(objective="betatcvae", beta=9.0))
    train_mod.train(longer, tmp_path, resume=True)
    resumed, _, raw = train_mod.load_checkpoint(ckpt)
    assert raw["step"] == 6 and resumed == dataclasses.replace(cfg, steps=6)
    assert ("with its own settings, not the command line's, for: seed, loss.objective, loss.beta"
            in capsys.readouterr().err)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


@pytest.mark.parametrize("objective", ["betavae", "factorvae"])
def test_a_resumed_run_is_the_run_it_continues(tmp_path: Path, objective: str) -> None:
    """Two steps, then two more resumed, give the weights four straight steps give (a review: the sampling noise was
    seeded once at the start, so a resumed run drew other samples, and drifted, from its first step on)."""
    cfg = train_mod.TrainConfig(steps=4, batch_size=8, ckpt_every=2, log_every=2, threads=1,
                                loss=ObjectiveConfig(objective=objective))
    straight = train_mod.train(cfg, tmp_path / "straight")
    train_mod.train(dataclasses.replace(cfg, steps=2), tmp_path / "halves")
    resumed = train_mod.train(cfg, tmp_path / "halves", resume=True)
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["step"] == b["step"] == 4
    for part in ("model", "objective"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_train_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    assert train_mod.main(["--steps", "3", "--batch-size", "4", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ckpt.pt").exists()


def test_onnx_matches_torch_within_1e_4(tiny_repo: Path) -> None:
    folder = tiny_repo / "tiny" / "1"
    ckpt = tiny_repo.parent / "run" / "ckpt.pt"  # the run the tiny entry was exported from
    _, model, _ = train_mod.load_checkpoint(ckpt)
    model.eval()
    rt = OnnxModel(folder)
    x = torch.rand(16, 1, 64, 64)
    z = torch.randn(16, 10)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        probs = torch.sigmoid(model.decoder(z))
    mu_o, logvar_o = rt.encode(x.numpy())
    assert np.abs(mu_o - mu.numpy()).max() <= 1e-4
    assert np.abs(logvar_o - logvar.numpy()).max() <= 1e-4
    assert np.abs(rt.decode(z.numpy()) - probs.numpy()).max() <= 1e-4


def test_encoder_has_no_sampling_node(tiny_repo: Path) -> None:
    for name in ("encoder.onnx", "decoder.onnx"):
        ops = {n.op_type for n in onnx.load(tiny_repo / "tiny" / "1" / name).graph.node}
        assert not ops & {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}


def test_model_json_describes_the_model(tiny_repo: Path) -> None:
    meta = json.loads((tiny_repo / "tiny" / "1" / "model.json").read_text())
    assert meta["input"] == {"height": 64, "width": 64, "channels": 1}
    assert meta["latent_dim"] == 10 and len(meta["kl_nats_per_dim"]) == 10
    assert meta["codec"]["active_dims"] == [f["dim"] for f in meta["factors"]]
    assert sum(q["default"] for q in meta["codec"]["qualities"]) == 1
    assert meta["training"]["steps"] == 20 and "disco train" in meta["training"]["command"]
    assert len(bytes.fromhex(meta["fingerprint"])) == 32


def test_a_tampered_entry_does_not_verify(tiny_repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["codec"]["qualities"][0]["dims"][0]["step"] *= 2  # same decoder, different tables
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        load_entry(copy)
    (copy / "decoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="sha-256"):
        load_entry(copy)
    del meta["files"]["encoder.onnx"]  # an encoder the server would run unverified
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lists no sha-256 for \['encoder.onnx'\]"):
        load_entry(copy)


@pytest.mark.parametrize("flags", [
    "--objective betatcvae --beta 6 --estimator mss --steps 500",
    "--objective factorvae --gamma 30 --seed 1",
    "--objective annealed --c-max 25 --anneal-steps 2000 --gamma 1000",
    "--objective dipvae2 --lambda-od 5",
    "--dataset folder --folder IMGS --objective betatcvae --beta 4 --latent-dim 8",
])
def test_recorded_train_command_rebuilds_the_config(flags: str, tmp_path: Path) -> None:
    from PIL import Image

    from disco.export.losses import DSPRITES_SIZE
    from disco.export.package import train_command
    from disco.export.train import parse_args

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    cfg, _, _ = parse_args([*flags.replace("IMGS", str(tmp_path)).split(), "--out", "RUN"])
    again, _, _ = parse_args(train_command(cfg).split()[2:])
    assert again == cfg
    # beta-TCVAE's estimators are told how many images the data holds: dSprites' grid here, a folder's
    # count when train() loads it (tests/test_rd.py)
    assert cfg.loss.dataset_size == DSPRITES_SIZE


def test_train_refuses_a_folder_that_is_not_there(tmp_path: Path, capsys) -> None:
    from disco.export.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset", "folder", "--folder", str(tmp_path / "nope"), "--out", "RUN"])
    assert f"no images (.png, .jpg, .jpeg, .webp, .bmp) under {tmp_path / 'nope'}" in capsys.readouterr().err


def test_a_model_that_encodes_nothing_is_refused_by_name(tiny_repo: Path, tmp_path: Path, capsys) -> None:
    from disco.export import package

    ckpt = tiny_repo.parent / "run" / "ckpt.pt"
    with pytest.raises(SystemExit):
        package.main([str(ckpt), "--repository", str(tmp_path), "--kl-threshold", "1e9", "--n-stats", "256"])
    assert "carries more than 1000000000.0 nats" in capsys.readouterr().err
    assert not (tmp_path / "dsprites" / "1").exists()
    assert list(tmp_path.iterdir()) == []  # nor its staging folder


def test_export_never_replaces_a_version_and_writes_it_whole(tiny_repo: Path, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: an export that failed into an existing version deleted that version (its ONNX files, model.json,
    metrics); one that succeeded replaced it in place, so the codes it had made no longer decoded."""
    import hashlib

    from disco.export import package
    from disco.service.repository import EMBEDDED

    ckpt = tiny_repo.parent / "run" / "ckpt.pt"
    shutil.copytree(EMBEDDED / "dsprites" / "4", tmp_path / "dsprites" / "4")
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "dsprites" / "4").iterdir()}
    for extra in (["--kl-threshold", "1e9"], []):  # one that would fail, one that would succeed
        with pytest.raises(SystemExit):
            package.main([str(ckpt), "--repository", str(tmp_path), "--version", "4", "--n-stats", "256", *extra])
        assert "dsprites/4 exists: a version is never replaced" in capsys.readouterr().err
    after = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "dsprites" / "4").iterdir()}
    assert after == before
    # Staging folders: one a killed export left (its lock free), one of an export that runs on (its lock held, from
    # another container, say: a process-id check removed it, a review), one just made (no lock yet)
    import errno
    import fcntl
    import os

    for kind in ("killed", "killed-early", "running", "new"):
        (tmp_path / "dsprites" / f".export-{kind}" / "dsprites" / "5").mkdir(parents=True)
        if kind in ("killed", "running"):
            (tmp_path / "dsprites" / f".export-{kind}" / ".lock").touch()
        if kind != "new":
            os.utime(tmp_path / "dsprites" / f".export-{kind}", (0, 0))  # made long ago
    held = os.open(tmp_path / "dsprites" / ".export-running" / ".lock", os.O_WRONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    assert package.main([str(ckpt), "--repository", str(tmp_path), "--version", "5", "--n-stats", "256",
                         "--n-eval", "32", "--kl-threshold", "0"]) == 0
    os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsprites"]  # its own staging folder gone, and the killed one
    assert sorted(p.name for p in (tmp_path / "dsprites").iterdir()) == [".export-new", ".export-running", "4", "5"]
    for kind in ("new", "running"):
        shutil.rmtree(tmp_path / "dsprites" / f".export-{kind}")
    with monkeypatch.context() as m:  # a file system that keeps no locks: the export goes on without one
        m.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks available")))
        assert package.main([str(ckpt), "--repository", str(tmp_path), "--version", "7", "--n-stats", "256",
                             "--n-eval", "32", "--kl-threshold", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "dsprites").iterdir()) == ["4", "5", "7"]
    shutil.rmtree(tmp_path / "dsprites" / "7")
    assert (tmp_path / "dsprites" / "5" / "model.json").is_file()
    # Another run that exported the same version meanwhile: refused by name, not a traceback, nothing replaced

    def meanwhile(folder: Path, *args: Any) -> None:
        (tmp_path / "dsprites" / "6").mkdir()
        (tmp_path / "dsprites" / "6" / "model.json").write_text("{}")

    monkeypatch.setattr(package, "_write_version", meanwhile)
    with pytest.raises(SystemExit):
        package.main([str(ckpt), "--repository", str(tmp_path), "--version", "6", "--n-stats", "256"])
    assert "dsprites/6 exists (exported meanwhile): a version is never replaced" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "dsprites").iterdir()) == ["4", "5", "6"]
    assert (tmp_path / "dsprites" / "6" / "model.json").read_text() == "{}"


def test_the_default_level_is_the_coarsest_whose_loss_is_within_bounds_with_its_sampling_error() -> None:
    from disco.export.package import MAX_IOU_LOSS, default_level

    rng = np.random.default_rng(0)
    base = rng.uniform(0.8, 1.0, 2000)
    levels = [{"name": n} for n in ("coarse", "middle", "fine")]
    iou = {"unquantized": base,
           "coarse": base - 0.02,  # loses twice the limit
           "middle": base - MAX_IOU_LOSS + 0.0005 + rng.normal(0, 0.05, 2000),  # within it on average, not surely
           "fine": base - 0.002 + rng.normal(0, 0.005, 2000)}
    assert (iou["unquantized"] - iou["middle"]).mean() <= MAX_IOU_LOSS  # the old rule would have taken "middle"
    assert default_level(iou, levels)["name"] == "fine"
    iou["middle"] = base - 0.005
    assert default_level(iou, levels)["name"] == "middle"
    iou["fine"] = iou["middle"] = iou["coarse"]
    assert default_level(iou, levels)["name"] == "fine"  # none within: the finest


def test_train_threads_default_to_this_processs_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from disco.export.train import threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads_per_process() == 4  # one process: every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, two ranks on this node
    assert threads_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads_per_process() == 1


def test_export_picks_a_model_id_no_other_fingerprint_in_the_repository_has(tiny_repo: Path, tmp_path: Path) -> None:
    """A code's model id is its fingerprint's first byte: two versions sharing one cost about 1 code in 65,536 each
    (refused as ambiguous). The exporter salts decoder.onnx's metadata until the id is free; the graph is unchanged.
    Here every id but one is taken (by model.json files that name a fingerprint), and not the one it would have."""
    import onnxruntime as ort

    from disco.export.package import export

    ckpt = next((tiny_repo.parent / "run").glob("*.pt"))
    plain = export(ckpt, tmp_path / "alone", "tiny", "3", kl_threshold=0.0, n_stats=512, n_eval=64)
    natural = bytes.fromhex(json.loads((plain / "model.json").read_text())["fingerprint"])[0]
    free = (natural + 1) % 256
    repo = tmp_path / "repo"
    for i in set(range(256)) - {free}:
        (repo / "other" / str(i + 1)).mkdir(parents=True)
        (repo / "other" / str(i + 1) / "model.json").write_text(json.dumps({"fingerprint": f"{i:02x}" + "ab" * 31}))
    for k, stray in enumerate(("", "ab", 7, None)):  # model.json files no server would serve: not in the way
        (repo / "stray" / str(k + 1)).mkdir(parents=True)
        (repo / "stray" / str(k + 1) / "model.json").write_text(json.dumps({"fingerprint": stray}))
    salted = export(ckpt, repo, "tiny", "3", kl_threshold=0.0, n_stats=512, n_eval=64)
    meta = json.loads((salted / "model.json").read_text())
    assert bytes.fromhex(meta["fingerprint"])[0] == free
    assert load_entry(salted).fingerprint.hex() == meta["fingerprint"]
    props = {p.key: p.value for p in onnx.load(salted / "decoder.onnx").metadata_props}
    assert props["disco.version"] == "3" and int(props["disco.id_salt"]) >= 1
    z = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    run = [ort.InferenceSession(str(f / "decoder.onnx")).run(None, {"z": z})[0] for f in (plain, salted)]
    np.testing.assert_array_equal(run[0], run[1])
