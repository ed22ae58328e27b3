"""The serving core without gRPC: images -> codes -> images for every model in a repository.

    Compress:   pixels -> images.from_* -> OnnxModel.encode -> Codec.encode -> codes
    Decompress: codes -> container.parse -> route by model id + checksum -> Codec.decode
                      -> OnnxModel.decode -> images.to_uint8
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from disco.service import container
from disco.service.errors import CorruptCode, InvalidCode
from disco.service.repository import ModelEntry, Repository
from disco.service.runtime import OnnxModel, RuntimeOptions


@dataclass(frozen=True)
class Factors:
    names: list[str]
    dims: list[int]
    mean: np.ndarray  # (N, D)
    std: np.ndarray  # (N, D)


class Pipeline:
    def __init__(self, repo: Repository, opts: RuntimeOptions = RuntimeOptions(), default_model: str = "") -> None:
        self.repo = repo
        self.default_model = default_model or repo.names()[0]
        self._runtimes = {(e.name, e.version): OnnxModel(e.path, opts) for e in repo.entries()}

    def entry(self, name: str = "", version: str = "") -> ModelEntry:
        return self.repo.get(name or self.default_model, version)

    def runtime(self, e: ModelEntry) -> OnnxModel:
        return self._runtimes[(e.name, e.version)]

    def warm_up(self) -> None:
        for e in self.repo.entries():
            h, w, c = e.input_shape
            self.compress(e, np.zeros((1, c, h, w), np.float32))
            self.runtime(e).decode(np.zeros((1, e.codec.latent_dim), np.float32))

    def compress(self, e: ModelEntry, x: np.ndarray, quality: str = "") -> list[bytes]:
        """x float32 (N, C, H, W) in [0, 1] -> one code per image."""
        q = e.codec.quality(quality)  # fail on a bad quality before any compute
        mu, _ = self.runtime(e).encode(x)
        return e.codec.encode(mu, q.name)

    def encode(self, e: ModelEntry, x: np.ndarray) -> Factors:
        mu, logvar = self.runtime(e).encode(x)
        dims = [int(f["dim"]) for f in e.factors]
        return Factors([f["name"] for f in e.factors], dims, mu[:, dims], np.exp(0.5 * logvar[:, dims]))

    def route(self, code: bytes, index: int) -> ModelEntry:
        """The model version a code belongs to: its model id narrows, its keyed checksum decides."""
        try:
            header = container.parse(code)
        except InvalidCode as exc:
            raise type(exc)(f"code {index}: {exc}") from exc
        candidates = self.repo.by_model_id(header.model_id)
        for e in candidates:
            if container.verify(code, e.fingerprint):
                return e
        if not candidates:
            have = ", ".join(f"{e.name}/{e.version} (0x{e.fingerprint[0]:02x})" for e in self.repo.entries())
            raise InvalidCode(f"code {index} was made by model id 0x{header.model_id:02x}, which this server lacks; it has {have}")
        names = ", ".join(f"{e.name}/{e.version}" for e in candidates)
        raise CorruptCode(f"code {index}: checksum mismatch under model id 0x{header.model_id:02x} ({names}): "
                          "the code is corrupted, truncated or was made by another model")

    def decompress(self, codes: list[bytes]) -> tuple[np.ndarray, list[ModelEntry]]:
        """Codes (of any models) -> probabilities, one (C, H, W) array per code, and each code's model."""
        if not codes:
            raise InvalidCode("no codes given, expected at least one")
        entries = [self.route(c, i) for i, c in enumerate(codes)]
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, e in enumerate(entries):
            groups[(e.name, e.version)].append(i)
        shapes = {entries[idx[0]].input_shape for idx in groups.values()}
        if len(shapes) > 1:
            raise InvalidCode(f"codes decode to different image shapes {sorted(shapes)}; send them in separate requests")
        h, w, c = shapes.pop()
        out = np.empty((len(codes), c, h, w), dtype=np.float32)
        for idx in groups.values():
            e = entries[idx[0]]
            try:
                z = e.codec.decode([codes[i] for i in idx])
            except InvalidCode as exc:
                raise type(exc)(f"{exc} (model {e.name}/{e.version})") from exc
            out[idx] = self.runtime(e).decode(z)
        return out, entries
