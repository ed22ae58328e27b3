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
from disco.service.errors import CorruptCode, InvalidCode, InvalidInput
from disco.service.repository import ModelEntry, Repository
from disco.service.runtime import OnnxModel, RuntimeOptions


@dataclass(frozen=True)
class Edit:
    factor: str
    op: str  # "set" (absolute latent value) or "shift" (added to the encoded value)
    value: float


@dataclass(frozen=True)
class Sweep:
    factor: str
    start: float
    stop: float
    steps: int


MAX_SWEEP_STEPS = 64


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

    def compress(self, e: ModelEntry, x: np.ndarray, quality: str = "", batch: bool = False) -> list[bytes]:
        """x float32 (N, C, H, W) in [0, 1] -> one code per image, or one batch container."""
        q = e.codec.quality(quality)  # fail on a bad quality before any compute
        mu, _ = self.runtime(e).encode(x)
        return [e.codec.encode_batch(mu, q.name)] if batch else e.codec.encode(mu, q.name)

    def encode(self, e: ModelEntry, x: np.ndarray) -> Factors:
        mu, logvar = self.runtime(e).encode(x)
        dims = [int(f["dim"]) for f in e.factors]
        return Factors([f["name"] for f in e.factors], dims, mu[:, dims], np.exp(0.5 * logvar[:, dims]))

    def latents_of_codes(self, codes: list[bytes]) -> tuple[np.ndarray, ModelEntry]:
        """Codes of one model -> their dequantized latents (N, z)."""
        entries = [self.route(c, i) for i, c in enumerate(codes)]
        if len({(e.name, e.version) for e in entries}) > 1:
            raise InvalidCode("codes come from different models; traverse one model at a time")
        e = entries[0]
        parts = []
        for code in codes:
            if container.is_batch(code):
                symbols, q = e.codec.batch_symbols(code)
                parts.append(e.codec.dequantize(symbols, q))
            else:
                parts.append(e.codec.decode([code]))
        return np.concatenate(parts), e

    def traverse(self, e: ModelEntry, z: np.ndarray, edits: list[Edit], sweep: Sweep | None) -> np.ndarray:
        """Latents (N, z) -> edited (and swept) images: (N, C, H, W), or (N * steps, ...) image-major.

        Values are in latent units and must lie in the factor's range on the training data (model.json
        factors[].min/max); values outside are refused rather than clamped, so a caller never gets an
        image of a value they did not ask for.
        """
        by_name = {f["name"]: f for f in e.factors}

        def factor(name: str, value: float | None = None) -> int:
            if name not in by_name:
                raise InvalidInput(f"factor {name!r} is not a factor of {e.name}/{e.version}, which has {sorted(by_name)}")
            f = by_name[name]
            # Compared in float32, the precision the proto carries the values (and the range) in.
            if value is not None and not (np.float32(f["min"]) <= np.float32(value) <= np.float32(f["max"])):
                raise InvalidInput(f"value {value:g} for factor {name!r} is outside its range [{f['min']:g}, {f['max']:g}]")
            return int(f["dim"])

        z = z.astype(np.float32).copy()
        for ed in edits:
            if ed.op == "set":
                z[:, factor(ed.factor, ed.value)] = ed.value
            elif ed.op == "shift":
                z[:, factor(ed.factor)] += ed.value
            else:
                raise InvalidInput(f"edit of factor {ed.factor!r} has no operation: set 'set' or 'shift'")
        if sweep is not None:
            if not 1 <= sweep.steps <= MAX_SWEEP_STEPS:
                raise InvalidInput(f"sweep steps {sweep.steps} is outside 1..{MAX_SWEEP_STEPS}")
            d = factor(sweep.factor, sweep.start)
            factor(sweep.factor, sweep.stop)
            z = np.repeat(z, sweep.steps, axis=0)  # image-major: all steps of image 0, then image 1, ...
            z[:, d] = np.tile(np.linspace(sweep.start, sweep.stop, sweep.steps, dtype=np.float32), len(z) // sweep.steps)
        return self.runtime(e).decode(z)

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
        """Codes (single or batch, of any models) -> probabilities (N, C, H, W) and each image's model.

        A batch container expands in place into its codes; each model's latents run through its
        decoder once.
        """
        if not codes:
            raise InvalidCode("no codes given, expected at least one")
        entries = [self.route(c, i) for i, c in enumerate(codes)]
        shapes = {e.input_shape for e in entries}
        if len(shapes) > 1:
            raise InvalidCode(f"codes decode to different image shapes {sorted(shapes)}; send them in separate requests")
        latents: list[np.ndarray] = []
        for i, (code, e) in enumerate(zip(codes, entries)):
            try:
                if container.is_batch(code):
                    symbols, q = e.codec.batch_symbols(code)
                    latents.append(e.codec.dequantize(symbols, q))
                else:
                    latents.append(e.codec.decode([code]))
            except InvalidCode as exc:
                raise type(exc)(f"code {i} (model {e.name}/{e.version}): {exc}") from exc
        per_image = [e for e, z in zip(entries, latents) for _ in range(len(z))]
        z_all = np.concatenate(latents)
        h, w, c = shapes.pop()
        out = np.empty((len(z_all), c, h, w), dtype=np.float32)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for row, e in enumerate(per_image):
            groups[(e.name, e.version)].append(row)
        for rows in groups.values():
            out[rows] = self.runtime(per_image[rows[0]]).decode(z_all[rows])
        return out, per_image
