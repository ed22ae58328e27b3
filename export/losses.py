"""Objectives of the VAE family; each returns its named terms (per-image means, in nats)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dim, averaged over the batch: (B, z) -> (z,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(0)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) under a Bernoulli likelihood on logits, summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def beta_vae(out: dict[str, torch.Tensor], x: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """beta-VAE (Higgins et al. 2017): recon + beta * KL. beta = 1 is the plain VAE (Kingma & Welling 2014)."""
    recon = bernoulli_nll(out["logits"], x)
    kl_dims = kl_per_dim(out["mu"], out["logvar"])
    kl = kl_dims.sum()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "kl_per_dim": kl_dims.detach()}
