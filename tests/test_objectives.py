"""The objectives against independent formulas, a short training run of each, DDP gradients, datasets."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from disco.export import train as train_mod  # noqa: E402
from disco.export.data.ground_truth import DSpritesData, ImageFolder, make_dataset  # noqa: E402
from disco.export.losses import OBJECTIVES, Objective, ObjectiveConfig, reconstruction, tc_decomposition  # noqa: E402
from disco.export.models.burgess import VAE, ArchConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fixed_batch(b: int = 6, d: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, d, generator=g, dtype=torch.float64)
    logvar = torch.randn(b, d, generator=g, dtype=torch.float64) * 0.5 - 1
    z = mu + torch.randn(b, d, generator=g, dtype=torch.float64) * (0.5 * logvar).exp()
    return {"mu": mu, "logvar": logvar, "z": z}


def log_normal_np(x: float, m: float, lv: float) -> float:
    return -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_decomposition_matches_an_explicit_loop(estimator: str) -> None:
    t = fixed_batch()
    mu, lv, z = (t[k].numpy() for k in ("mu", "logvar", "z"))
    b, d, n = mu.shape[0], mu.shape[1], 1000
    if estimator == "mws":
        w = np.full((b, b), 1.0 / b)
    else:  # Chen et al. 2018, appendix C.2: weight 1/N on x_i itself, (N-M)/(NM) on one stratum element, 1/M else
        m = b - 1
        w = np.full((b, b), 1.0 / m)
        for i in range(b):
            w[i, i] = 1.0 / n
            w[i, (i + 1) % b] = (n - m) / (n * m)
    log_qz, log_prod, log_qzx, log_pz = [], [], [], []
    for i in range(b):
        per = np.array([[log_normal_np(z[i, k], mu[j, k], lv[j, k]) for k in range(d)] for j in range(b)])
        log_qz.append(math.log(sum(w[i, j] * math.exp(per[j].sum()) for j in range(b))))
        log_prod.append(sum(math.log(sum(w[i, j] * math.exp(per[j, k]) for j in range(b))) for k in range(d)))
        log_qzx.append(sum(log_normal_np(z[i, k], mu[i, k], lv[i, k]) for k in range(d)))
        log_pz.append(sum(log_normal_np(z[i, k], 0.0, 0.0) for k in range(d)))
    want = {"mi": np.mean(np.array(log_qzx) - log_qz), "tc": np.mean(np.array(log_qz) - log_prod),
            "dim_kl": np.mean(np.array(log_prod) - log_pz)}
    got = tc_decomposition(t["z"], t["mu"], t["logvar"], n, estimator)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-9, abs=1e-9), k


def terms(name: str, **kw: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    t = fixed_batch(b=4, d=3)
    x = (torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    out = {**t, "logits": torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
    obj = Objective(ObjectiveConfig(objective=name, **kw), 3).double()  # type: ignore[arg-type]
    return {k: v.detach() for k, v in obj(out, x, 250).items()}, out, x


def test_recon_and_kl_by_hand() -> None:
    got, out, x = terms("vae")
    p = 1 / (1 + np.exp(-out["logits"].numpy()))
    bce = -(x.numpy() * np.log(p) + (1 - x.numpy()) * np.log(1 - p)).sum() / 4
    mu, lv = out["mu"].numpy(), out["logvar"].numpy()
    kl = (0.5 * (mu**2 + np.exp(lv) - 1 - lv)).sum() / 4
    assert float(got["recon"]) == pytest.approx(bce) and float(got["kl"]) == pytest.approx(kl)
    assert float(got["loss"]) == pytest.approx(bce + kl)
    l2 = float(reconstruction(out["logits"], x, "gaussian"))
    assert l2 == pytest.approx(((p - x.numpy()) ** 2).sum() / 4)


def test_betavae_and_annealed_capacity() -> None:
    got, _, _ = terms("betavae", beta=4.0)
    assert float(got["loss"]) == pytest.approx(float(got["recon"] + 4 * got["kl"]))
    got, _, _ = terms("annealed", gamma=1000.0, c_max=25.0, anneal_steps=1000)
    capacity = 25.0 * 250 / 1000  # C ramps linearly; the fixture is at step 250
    assert float(got["capacity"]) == pytest.approx(capacity)
    assert float(got["loss"]) == pytest.approx(float(got["recon"]) + 1000 * abs(float(got["kl"]) - capacity))


def test_betatcvae_weights_its_terms() -> None:
    got, _, _ = terms("betatcvae", alpha=1.0, beta=6.0, gamma=1.0)
    assert float(got["loss"]) == pytest.approx(float(got["recon"] + got["mi"] + 6 * got["tc"] + got["dim_kl"]))


@pytest.mark.parametrize("name, factor", [("dipvae1", 10.0), ("dipvae2", 1.0)])
def test_dip_penalty_by_hand(name: str, factor: float) -> None:
    got, out, _ = terms(name, lambda_od=2.0)
    mu = out["mu"].numpy()
    cov = np.cov(mu.T, bias=True)
    if name == "dipvae2":
        cov = cov + np.diag(np.exp(out["logvar"].numpy()).mean(0))
    off = cov - np.diag(np.diag(cov))
    want = 2.0 * (off**2).sum() + 2.0 * factor * ((np.diag(cov) - 1) ** 2).sum()
    assert float(got["dip"]) == pytest.approx(want)


def test_factorvae_tc_and_the_two_optimisers_stay_apart() -> None:
    torch.manual_seed(0)
    model = VAE(ArchConfig(latent_dim=4))
    obj = Objective(ObjectiveConfig(objective="factorvae", gamma=10.0), 4)
    x = (torch.rand(8, 1, 64, 64) > 0.9).float()
    out = model(x)
    t = obj(out, x, 0)
    logits = obj.discriminator(out["z"])  # type: ignore[misc]
    assert float(t["tc"].detach()) == pytest.approx(float((logits[:, 0] - logits[:, 1]).mean().detach()), rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    disc_before = [p.detach().clone() for p in obj.discriminator.parameters()]  # type: ignore[union-attr]
    opt.zero_grad()
    t["loss"].backward()
    opt.step()  # the VAE step: the discriminator must not move
    assert all(torch.equal(a, b) for a, b in zip(disc_before, obj.discriminator.parameters()))  # type: ignore[union-attr]
    enc_before = [p.detach().clone() for p in model.encoder.parameters()]
    for p in model.parameters():
        p.grad = None
    dloss = obj.discriminator_loss(out["z"])
    dloss.backward()  # the discriminator's loss must not reach the encoder
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(enc_before, model.encoder.parameters()))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_200_steps_and_lowers_its_loss(objective: str, tmp_path: Path) -> None:
    extra = {"betatcvae": ["--beta", "6"], "annealed": ["--c-max", "5"],
             "factorvae": ["--gamma", "10"], "dipvae1": ["--lambda-od", "2"], "dipvae2": ["--lambda-od", "2"]}
    assert train_mod.main(["--objective", objective, "--steps", "200", "--batch-size", "16", "--log-every", "10",
                           "--ckpt-every", "200", "--threads", "1", "--lr", "1e-3", "--out", str(tmp_path),
                           *extra.get(objective, [])]) == 0
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines]
    assert all(np.isfinite(losses)) and len(losses) == 20
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    for f in ("loss_curve.png", "recon_0000200.png", "traversal_0000200.png"):
        assert (tmp_path / f).stat().st_size > 500


def test_two_process_torchrun_gradients_equal_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(ROOT / "tests" / "ddp_gradcheck.py"), str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["max_abs_grad"] > 0
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs_grad"])


def test_torchrun_trains_factorvae_with_ddp(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "disco.export.train", "--objective", "factorvae",
                        "--steps", "6", "--batch-size", "8", "--threads", "1", "--log-every", "2", "--ckpt-every", "6",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(s)["step"] for s in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_sigterm_stops_a_run_whole(tmp_path: Path) -> None:
    """A run stopped at a time budget keeps its last step: checkpoint, pictures and loss curve, exit status 0."""
    import signal
    import time

    import torch

    proc = subprocess.Popen([sys.executable, "-m", "disco.export.train", "--steps", "100000", "--batch-size", "8",
                             "--threads", "1", "--log-every", "1", "--ckpt-every", "100000", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "training never logged"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == last >= 3
    assert (tmp_path / "loss_curve.png").exists() and (tmp_path / f"recon_{last:07d}.png").exists()


def test_dataset_variants_and_factor_sampler() -> None:
    rng = np.random.default_rng(0)
    for name, channels in (("dsprites", 1), ("color_dsprites", 3), ("noisy_dsprites", 3)):
        data = make_dataset(name)
        f = data.sample_factors(5, rng)  # type: ignore[attr-defined]
        assert f.shape == (5, 5) and (f < np.array(data.factor_sizes)).all()  # type: ignore[attr-defined]
        x = data.images(f, rng)  # type: ignore[attr-defined]
        assert x.shape == (5, channels, 64, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    plain = DSpritesData().images(f, rng)
    colour = DSpritesData("color").images(f, rng)
    assert ((colour > 0) == (plain > 0)).all()  # colour only paints the sprite
    assert DSpritesData().factor_names == ("shape", "scale", "orientation", "posX", "posY")


def test_image_folder_resizes_and_crops(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (120, 80), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (50, 200), 128).save(tmp_path / "b.jpg")
    rgb = ImageFolder(str(tmp_path), 32, 3).sample(4, np.random.default_rng(0))
    gray = ImageFolder(str(tmp_path), 64, 1).sample(4, np.random.default_rng(0))
    assert rgb.shape == (4, 3, 32, 32) and gray.shape == (4, 1, 64, 64)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "empty")).sample(1, np.random.default_rng(0))


@pytest.mark.parametrize("arch, size, channels", [("burgess", 64, 1), ("burgess", 32, 3), ("dlib", 64, 3)])
def test_architectures(arch: str, size: int, channels: int) -> None:
    model = VAE(ArchConfig(name=arch, image_size=size, channels=channels, latent_dim=6))
    out = model(torch.rand(2, channels, size, size))
    assert out["mu"].shape == (2, 6) and out["logits"].shape == (2, channels, size, size)
