"""Factor codes: quantize the active latent means under the model's tables and frame them.

 mu (N, z) --pick active dims--> (N, D) --(mu - center) / step, round, clip--> symbols (N, D)
   --pack, fixed width--> payload --container.wrap--> code bytes

Everything here is integer or table-driven: no network runs at decode time, so a code decodes to
the same symbols on every platform. The tables come from model.json (written by disco export).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from disco.service import container
from disco.service.errors import InvalidCode, InvalidInput


@dataclass(frozen=True)
class Quality:
    """One quality level: a per-dim uniform quantizer with a symbol range and a bit width."""

    name: str
    id: int
    is_default: bool
    center: np.ndarray  # (D,) float64, latent value of symbol 0
    step: np.ndarray  # (D,) float64
    min_symbol: np.ndarray  # (D,) int64
    max_symbol: np.ndarray  # (D,) int64
    bits: np.ndarray  # (D,) int64

    @property
    def payload_bits(self) -> int:
        return int(self.bits.sum())

    @classmethod
    def from_json(cls, q: dict[str, Any]) -> Quality:
        dims = q["dims"]
        return cls(
            name=q["name"], id=int(q["id"]), is_default=bool(q.get("default", False)),
            center=np.array([d["center"] for d in dims], dtype=np.float64),
            step=np.array([d["step"] for d in dims], dtype=np.float64),
            min_symbol=np.array([d["min_symbol"] for d in dims], dtype=np.int64),
            max_symbol=np.array([d["max_symbol"] for d in dims], dtype=np.int64),
            bits=np.array([d["bits"] for d in dims], dtype=np.int64),
        )


@dataclass(frozen=True)
class Codec:
    """The codec of one model version: which dims are sent, how, and what fills the others."""

    fingerprint: bytes  # 32 bytes
    latent_dim: int
    active: np.ndarray  # (D,) int64 latent dims that are sent
    fill: np.ndarray  # (latent_dim,) float64 value decoded for dims that are not sent
    qualities: tuple[Quality, ...]

    @classmethod
    def from_json(cls, codec: dict[str, Any], fingerprint: bytes, latent_dim: int) -> Codec:
        if codec["format"] != container.FORMAT_FIXED:
            raise ValueError(f"codec format {codec['format']} is unknown, expected {container.FORMAT_FIXED}")
        qualities = tuple(Quality.from_json(q) for q in codec["qualities"])
        if sum(q.is_default for q in qualities) != 1:
            raise ValueError("model.json must mark exactly one quality level as default")
        return cls(fingerprint, latent_dim, np.array(codec["active_dims"], dtype=np.int64),
                   np.array(codec["fill"], dtype=np.float64), qualities)

    def quality(self, name: str = "") -> Quality:
        for q in self.qualities:
            if (q.name == name) if name else q.is_default:
                return q
        raise InvalidInput(f"quality {name!r} is unknown, expected one of {[q.name for q in self.qualities]}")

    def quality_by_id(self, qid: int) -> Quality:
        for q in self.qualities:
            if q.id == qid:
                return q
        raise InvalidCode(f"code quality id {qid} is unknown to this model, expected one of {[q.id for q in self.qualities]}")

    def quantize(self, mu: np.ndarray, q: Quality) -> np.ndarray:
        """Latent means (N, z) -> unsigned symbols (N, D) (offset by min_symbol)."""
        s = np.rint((mu[:, self.active].astype(np.float64) - q.center) / q.step).astype(np.int64)
        return np.clip(s, q.min_symbol, q.max_symbol) - q.min_symbol

    def dequantize(self, symbols: np.ndarray, q: Quality) -> np.ndarray:
        """Unsigned symbols (N, D) -> latents (N, z) for the decoder."""
        z = np.tile(self.fill, (symbols.shape[0], 1))
        z[:, self.active] = q.center + (symbols + q.min_symbol) * q.step
        return z.astype(np.float32)

    def encode(self, mu: np.ndarray, quality: str = "") -> list[bytes]:
        q = self.quality(quality)
        payloads = container.pack_fixed(self.quantize(mu, q), q.bits)
        return [container.wrap(container.FORMAT_FIXED, q.id, self.fingerprint, p) for p in payloads]

    def symbols(self, codes: list[bytes]) -> tuple[np.ndarray, list[Quality]]:
        """Codes of this model -> unsigned symbols (N, D) and the quality of each. Verifies every code."""
        headers = [container.unwrap(c, self.fingerprint) for c in codes]
        out = np.zeros((len(codes), len(self.active)), dtype=np.int64)
        levels = []
        for i, h in enumerate(headers):
            q = self.quality_by_id(h.quality)
            s = container.unpack_fixed([h.payload], q.bits)
            if (s > q.max_symbol - q.min_symbol).any():
                raise InvalidCode(f"code {i} holds a symbol outside the quality level's range")
            out[i], levels = s[0], levels + [q]
        return out, levels

    def decode(self, codes: list[bytes]) -> np.ndarray:
        """Codes -> latents (N, z) ready for the decoder network."""
        symbols, levels = self.symbols(codes)
        z = np.zeros((len(codes), self.latent_dim), dtype=np.float32)
        for q in {q.id: q for q in levels}.values():
            rows = np.array([lv.id == q.id for lv in levels])
            z[rows] = self.dequantize(symbols[rows], q)
        return z
