"""The disentanglement_lib conv encoder and deconv decoder (Locatello et al. 2019, methods/shared/architectures.py).

 x (B, C, 64, 64) -> conv 32 4x4 s2 -> conv 32 4x4 s2 -> conv 64 2x2 s2 -> conv 64 2x2 s2 ("same", ReLU)
                  -> FC 256 -> mu (B, z), logvar (B, z)
 z -> FC 256 -> FC 1024 -> (B, 64, 4, 4) -> convT 64 -> convT 32 -> convT 32 -> convT C (4x4, s2) -> logits
"""
from __future__ import annotations

import torch
from torch import nn

from disco.export.models.burgess import ArchConfig


class Encoder(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        if cfg.image_size != 64:
            raise ValueError(f"the disentanglement_lib encoder takes 64x64 images, not {cfg.image_size}")
        self.conv = nn.Sequential(
            nn.Conv2d(cfg.channels, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 32, 32)
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 2, 2), nn.ReLU(),  # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 2, 2), nn.ReLU(),  # (B, 64, 4, 4)
        )
        self.fc = nn.Sequential(nn.Linear(64 * 4 * 4, 256), nn.ReLU())
        self.mu = nn.Linear(256, cfg.latent_dim)
        self.logvar = nn.Linear(256, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.conv(x).flatten(1))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 8, 8)
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 16, 16)
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 32, 32)
            nn.ConvTranspose2d(32, cfg.channels, 4, 2, 1),  # (B, C, 64, 64) logits
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, 64, 4, 4))
