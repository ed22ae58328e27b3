"""Objectives of the VAE family, registered by name. Each returns its named terms (per-image means, nats).

    vae        Kingma & Welling 2014                     recon + KL
    betavae    Higgins et al. 2017                       recon + beta KL
    annealed   Burgess et al. 2018                       recon + gamma |KL - C|, C ramps 0 -> c_max
    factorvae  Kim & Mnih 2018                           recon + KL + gamma TC, TC from a discriminator
    betatcvae  Chen et al. 2018                          recon + alpha MI + beta TC + gamma dimKL (MWS or MSS)
    dipvae1/2  Kumar et al. 2018                         recon + KL + lambda_od offdiag(C)^2 + lambda_d (diag(C)-1)^2
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DSPRITES_SIZE = 737_280


@dataclass(frozen=True)
class ObjectiveConfig:
    objective: str = "betavae"  # a name from OBJECTIVES
    likelihood: str = "bernoulli"  # "bernoulli" (logits) or "gaussian" (squared error of sigmoid(logits))
    beta: float = 4.0  # betavae weight on KL; betatcvae weight on TC
    gamma: float = 1.0  # annealed: capacity weight; factorvae: TC weight; btcvae: dimKL weight (see GAMMA_DEFAULTS)
    alpha: float = 1.0  # betatcvae weight on the index-code mutual information
    c_max: float = 25.0  # annealed: final capacity in nats
    anneal_steps: int = 100_000  # annealed: steps over which C ramps from 0 to c_max
    estimator: str = "mws"  # betatcvae: "mws" (minibatch weighted) or "mss" (minibatch stratified)
    dataset_size: int = DSPRITES_SIZE  # betatcvae: N in the estimators of log q(z)
    lambda_od: float = 10.0  # dipvae: off-diagonal covariance weight
    lambda_d: float = 0.0  # dipvae: diagonal weight; 0 takes disentanglement_lib's rule: 10 x lambda_od (I), 1 x (II)


def reconstruction(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x | z) summed over pixels, mean over the batch."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    if likelihood == "gaussian":  # disentanglement_lib's l2 loss: a Gaussian with variance 1/2, constants dropped
        return (torch.sigmoid(logits) - x).pow(2).sum() / x.shape[0]
    raise ValueError(f"likelihood {likelihood!r} is unknown, expected 'bernoulli' or 'gaussian'")


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dim, averaged over the batch: (B, z) -> (z,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(0)


def _base(out: dict[str, torch.Tensor], x: torch.Tensor, cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    recon = reconstruction(out["logits"], x, cfg.likelihood)
    kl_dims = kl_per_dim(out["mu"], out["logvar"])
    return {"recon": recon, "kl": kl_dims.sum(), "kl_per_dim": kl_dims.detach()}


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(logvar))."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp())


def log_importance_weights(batch: int, dataset_size: int) -> torch.Tensor:
    """Minibatch stratified sampling (Chen et al. 2018, appendix C.2) as (B, B) log weights.

    For sample i: weight 1/N on its own x_i, (N - M) / (N M) on one other element (the stratum's
    remainder, here x_{i+1 mod B}), 1/M on the other M - 1, with M = B - 1. Every row follows this
    rule; the authors' code gives one row the stratum weight twice, which we do not copy.
    """
    if batch < 3:
        raise ValueError(f"minibatch stratified sampling needs a batch of 3 or more per process, got {batch}")
    m = batch - 1
    w = torch.full((batch, batch), 1.0 / m, dtype=torch.float64)
    idx = torch.arange(batch)
    w[idx, idx] = 1.0 / dataset_size
    w[idx, (idx + 1) % batch] = (dataset_size - m) / (dataset_size * m)
    return w.log()


def tc_decomposition(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int,
                     estimator: str) -> dict[str, torch.Tensor]:
    """KL = MI + TC + dimKL, with log q(z) and log prod_j q(z_j) estimated on the minibatch."""
    b = z.shape[0]
    log_qz_x = log_normal(z, mu, logvar).sum(1)  # (B,)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)  # (B,)
    mat = log_normal(z[:, None], mu[None], logvar[None])  # (B, B, D): log q(z_i,d | x_j)
    if estimator == "mws":
        # Weights 1/M: each row sums to 1 as in MSS, so the logged terms are in nats. The authors' code
        # uses 1/(NM), which shifts MI, TC and dimKL by constants of log N (the gradients are the same).
        log_w = torch.full((b, b), -math.log(b), device=z.device, dtype=z.dtype)
    elif estimator == "mss":
        log_w = log_importance_weights(b, dataset_size).to(device=z.device, dtype=z.dtype)
    else:
        raise ValueError(f"estimator {estimator!r} is unknown, expected 'mws' or 'mss'")
    log_qz = torch.logsumexp(log_w + mat.sum(2), dim=1)  # (B,)
    log_prod_qz = torch.logsumexp(log_w[..., None] + mat, dim=1).sum(1)  # (B,)
    return {"mi": (log_qz_x - log_qz).mean(), "tc": (log_qz - log_prod_qz).mean(),
            "dim_kl": (log_prod_qz - log_pz).mean()}


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each latent dim shuffled independently across the batch: samples of prod_j q(z_j) (Kim & Mnih 2018)."""
    return torch.stack([col[torch.randperm(len(col), device=z.device)] for col in z.T], dim=1)


class Discriminator(nn.Module):
    """FactorVAE's discriminator: 6 x 1000 LeakyReLU(0.2) layers, 2 logits (q(z) vs prod_j q(z_j))."""

    def __init__(self, latent_dim: int, width: int = 1000, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LeakyReLU(0.2)]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Objective(nn.Module):
    """An objective by name; FactorVAE's discriminator lives here, trained by `discriminator_loss`."""

    def __init__(self, cfg: ObjectiveConfig, latent_dim: int) -> None:
        super().__init__()
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective {cfg.objective!r} is unknown, expected one of {sorted(OBJECTIVES)}")
        self.cfg = cfg
        self.discriminator = Discriminator(latent_dim) if cfg.objective == "factorvae" else None

    def forward(self, out: dict[str, torch.Tensor], x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        c, t = self.cfg, _base(out, x, self.cfg)
        name = c.objective
        if name == "vae":
            t["loss"] = t["recon"] + t["kl"]
        elif name == "betavae":
            t["loss"] = t["recon"] + c.beta * t["kl"]
        elif name == "annealed":
            capacity = torch.tensor(min(c.c_max, c.c_max * step / max(c.anneal_steps, 1)))
            t["capacity"] = capacity
            t["loss"] = t["recon"] + c.gamma * (t["kl"] - capacity).abs()
        elif name == "factorvae":
            assert self.discriminator is not None
            logits = self.discriminator(out["z"])
            t["tc"] = (logits[:, 0] - logits[:, 1]).mean()  # log D/(1-D): density-ratio estimate of TC
            t["loss"] = t["recon"] + t["kl"] + c.gamma * t["tc"]
        elif name == "betatcvae":
            t.update(tc_decomposition(out["z"], out["mu"], out["logvar"], c.dataset_size, c.estimator))
            t["loss"] = t["recon"] + c.alpha * t["mi"] + c.beta * t["tc"] + c.gamma * t["dim_kl"]
        else:  # dipvae1 / dipvae2
            mu = out["mu"]
            centred = mu - mu.mean(0, keepdim=True)
            cov = centred.T @ centred / mu.shape[0]  # Cov_p(x)[mu(x)]
            if name == "dipvae2":
                cov = cov + torch.diag(out["logvar"].exp().mean(0))  # + E_p(x)[Cov_q(z|x)]
            diag = torch.diagonal(cov)
            off = cov - torch.diag(diag)
            lambda_d = c.lambda_d or (10 * c.lambda_od if name == "dipvae1" else c.lambda_od)
            t["dip"] = c.lambda_od * off.pow(2).sum() + lambda_d * (diag - 1).pow(2).sum()
            t["loss"] = t["recon"] + t["kl"] + t["dip"]
        return t

    def discriminator_loss(self, z: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """Cross-entropy of the discriminator on q(z) (class 0) vs permuted codes (class 1).

        z is detached here, so this loss never reaches the encoder; the VAE's optimizer does not hold the
        discriminator's parameters, so the VAE's TC term never trains it (disentangling-vae #77).
        """
        net = net if net is not None else self.discriminator
        assert net is not None
        z = z.detach()
        logits = net(torch.cat([z, permute_dims(z)]))  # one forward: what DistributedDataParallel expects
        labels = torch.cat([torch.zeros(len(z)), torch.ones(len(z))]).long().to(z.device)
        return F.cross_entropy(logits, labels)


# The CLI's gamma when none is given: Burgess et al. 2018 and disentanglement_lib use 1000 for the capacity;
# disentanglement_lib sweeps FactorVAE's gamma over 10..100 (disentangling-vae uses 6.4); beta-TCVAE's is 1.
GAMMA_DEFAULTS = {"annealed": 1000.0, "factorvae": 10.0}

OBJECTIVES = ("vae", "betavae", "annealed", "factorvae", "betatcvae", "dipvae1", "dipvae2")
