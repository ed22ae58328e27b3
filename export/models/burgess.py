"""The Burgess et al. 2018 ("Understanding disentangling in beta-VAE", appendix A.1) encoder and decoder.

 x (B, C, 64, 64) -> 4 x [conv 32, 4x4, stride 2, pad 1, ReLU] -> (B, 32, 4, 4) -> FC 256 -> FC 256
                  -> two heads: mu (B, z), logvar (B, z)
 z (B, z) -> FC 256 -> FC 256 -> FC 512 -> (B, 32, 4, 4) -> 4 x [convT 32, 4x4, stride 2] -> logits (B, C, 64, 64)

The decoder returns Bernoulli logits; sigmoid(logits) is the pixel probability.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchConfig:
    name: str = "burgess"  # "burgess" (Burgess et al. 2018) or "dlib" (disentanglement_lib conv/deconv)
    channels: int = 1  # 1 for dSprites, 3 for RGB
    image_size: int = 64  # 64 (four conv stages); 32 drops one stage
    latent_dim: int = 10  # Burgess et al. use 10
    hidden: int = 256  # width of the fully connected layers
    conv: int = 32  # channels of every conv layer


def _stages(image_size: int) -> int:
    if image_size not in (32, 64):
        raise ValueError(f"image_size {image_size} is not supported, expected 32 or 64")
    return 4 if image_size == 64 else 3


class Encoder(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.channels
        for _ in range(_stages(cfg.image_size)):
            layers += [nn.Conv2d(c_in, cfg.conv, 4, stride=2, padding=1), nn.ReLU()]
            c_in = cfg.conv
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(cfg.conv * 4 * 4, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU()
        )
        self.mu = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.hidden, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.conv(x).flatten(1))  # (B, hidden)
        return self.mu(h), self.logvar(h)  # (B, z), (B, z)


class Decoder(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.conv_ch = cfg.conv
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.conv * 4 * 4), nn.ReLU(),
        )
        n = _stages(cfg.image_size)
        layers: list[nn.Module] = []
        for i in range(n):
            last = i == n - 1
            layers.append(nn.ConvTranspose2d(cfg.conv, cfg.channels if last else cfg.conv, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.conv_ch, 4, 4)  # (B, 32, 4, 4)
        return self.deconv(h)  # logits (B, C, H, W)


class VAE(nn.Module):
    """Encoder + decoder of the architecture cfg.name; forward samples z in training, uses mu in eval."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.name == "burgess":
            self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        elif cfg.name == "dlib":
            from disco.export.models import dlib

            self.encoder, self.decoder = dlib.Encoder(cfg), dlib.Decoder(cfg)
        else:
            raise ValueError(f"architecture {cfg.name!r} is unknown, expected 'burgess' or 'dlib'")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return {"mu": mu, "logvar": logvar, "z": z, "logits": self.decoder(z)}
