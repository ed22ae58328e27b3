"""Factor codes: quantize the active latent means under the model's tables, entropy-code, frame.

 mu (N, z) --active dims--> (N, D) --round((mu - center) / step)--> symbols (N, D), signed integers
   format 2: entropy.encode_exact under the integer tables --> payload --container.wrap--> code
   format 1: clip to [min_symbol, max_symbol], fixed-width pack (the slice's format, still decoded)
   batch:    entropy.encode_batch of all rows --> container.wrap_batch --> one blob

Everything here is integer or table-driven: no network runs before the decoder, so a code decodes to
the same symbols on every platform. The tables come from model.json (written by disco export).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from disco.service import container, entropy
from disco.service.errors import CorruptCode, InvalidCode, InvalidInput, shown



def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A JSON number that is finite as a float (an int past float's range, which JSON allows, is not: every use
    would overflow; compared, not converted, since float() would raise on it)."""
    return _is_int(v) and abs(v) <= sys.float_info.max or isinstance(v, float) and math.isfinite(v)


def shown_number(v: Any) -> str:
    """A model.json value for a message: a huge integer's digits cut short."""
    text = repr(v)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def _check_dim(quality: str, i: int, d: dict[str, Any]) -> None:
    """One dim's quantizer: a finite center, a finite step above 0 (symbol = round((mu - center) / step)), and a
    symbol range that its fixed width and the entropy coder's escape can both hold."""
    where = f"quality {quality!r} dim {i}"
    for key in ("center", "step"):
        v = d[key]
        if not is_number(v):
            raise ValueError(f"{where}: {key} {shown_number(v)}, expected a finite number")
    if d["step"] <= 0:
        raise ValueError(f"{where}: step {d['step']!r}, expected a number above 0")
    lo, hi, bits = d["min_symbol"], d["max_symbol"], d["bits"]
    if not (_is_int(lo) and _is_int(hi) and lo <= hi and hi - lo < entropy.ESCAPE_OFFSET
            and -entropy.ESCAPE_OFFSET <= lo):  # within what an escape carries (and an int64 holds)
        raise ValueError(f"{where}: symbols {shown_number(lo)}..{shown_number(hi)}, expected integers min <= max "
                         f"(min at least {-entropy.ESCAPE_OFFSET}), fewer than "
                         f"{entropy.ESCAPE_OFFSET} apart")
    if not (_is_int(bits) and 1 <= bits <= 32 and hi - lo < 1 << bits):
        raise ValueError(f"{where}: bits {bits!r}, expected an integer from 1 to 32 that holds {hi - lo + 1} symbols")


@dataclass(frozen=True)
class Quality:
    """One quality level: a per-dim uniform quantizer, its symbol range and its entropy tables."""

    name: str
    id: int
    is_default: bool
    center: np.ndarray  # (D,) float64, latent value of symbol 0
    step: np.ndarray  # (D,) float64
    min_symbol: np.ndarray  # (D,) int64, range of the fixed-width format and of the tables
    max_symbol: np.ndarray  # (D,) int64
    bits: np.ndarray  # (D,) int64, fixed-width format
    tables: tuple[entropy.FreqTable, ...]  # (D,), empty for a format-1-only model

    @property
    def max_payload_bytes(self) -> int:
        """The longest format-2 payload: every symbol escaped (encode_exact writes at most this many bits)."""
        return -(-len(self.tables) * (entropy.PRECISION + entropy.ESCAPE_BITS) // 8)

    @property
    def payload_bits(self) -> int:
        return int(self.bits.sum())

    @classmethod
    def from_json(cls, q: dict[str, Any]) -> Quality:
        """One quality level of model.json; raises ValueError naming the first number it could not serve with."""
        name, dims = q["name"], q["dims"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"quality name {name!r}, expected a non-empty string")
        if not _is_int(q["id"]):  # a string or a bool was read as a number
            raise ValueError(f"quality {name!r}: id {shown_number(q['id'])}, expected an integer from 0 to 15")
        if not isinstance(q.get("default", False), bool):  # bool("no") is True
            raise ValueError(f"quality {name!r}: default {q['default']!r}, expected true or false")
        for i, d in enumerate(dims):
            _check_dim(name, i, d)
        tables = []
        for i, d in enumerate(dims):
            if "freq" in d:
                try:
                    tables.append(entropy.FreqTable.from_freq(d["min_symbol"], d["freq"]))
                except ValueError as exc:
                    raise ValueError(f"quality {name!r} dim {i}: {exc}") from exc
        if tables and len(tables) != len(dims):
            raise ValueError(f"quality {q['name']!r}: some dims have frequency tables and some do not")
        return cls(
            name=q["name"], id=int(q["id"]), is_default=bool(q.get("default", False)),
            center=np.array([d["center"] for d in dims], dtype=np.float64),
            step=np.array([d["step"] for d in dims], dtype=np.float64),
            min_symbol=np.array([d["min_symbol"] for d in dims], dtype=np.int64),
            max_symbol=np.array([d["max_symbol"] for d in dims], dtype=np.int64),
            bits=np.array([d["bits"] for d in dims], dtype=np.int64),
            tables=tuple(tables),
        )


@dataclass(frozen=True)
class Codec:
    """The codec of one model version: which dims are sent, how, and what fills the others."""

    fingerprint: bytes  # 32 bytes
    latent_dim: int
    format: int  # the format Compress writes: container.FORMAT_ENTROPY or FORMAT_FIXED
    active: np.ndarray  # (D,) int64 latent dims that are sent
    fill: np.ndarray  # (latent_dim,) float64 value decoded for dims that are not sent
    qualities: tuple[Quality, ...]

    @classmethod
    def from_json(cls, codec: dict[str, Any], fingerprint: bytes, latent_dim: int) -> Codec:
        fmt = codec["format"]
        if not _is_int(fmt) or fmt not in (container.FORMAT_FIXED, container.FORMAT_ENTROPY):  # true was format 1
            raise ValueError(f"codec format {shown_number(fmt)} is unknown, expected 1 or 2")
        qualities = tuple(Quality.from_json(q) for q in codec["qualities"])
        dims = codec["active_dims"]
        if not (isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < latent_dim
                                               for d in dims) and len(set(dims)) == len(dims)):
            # floats were truncated and repeats served: a code then carried one dim twice and another not at all
            raise ValueError(f"codec active_dims {dims!r}, expected distinct integer dims in 0..{latent_dim - 1}")
        active = np.array(dims, dtype=np.int64)
        ids, names = [q.id for q in qualities], [q.name for q in qualities]
        if len(set(names)) != len(names):
            raise ValueError(f"quality names {names} repeat, expected each once (a request names its quality)")
        fill = codec["fill"]
        if not all(map(is_number, fill)):
            raise ValueError(f"codec fill {fill!r}, expected finite numbers (the value of each dim that is not sent)")
        marked = [q.name for q in qualities if q.is_default]
        if len(marked) != 1:
            raise ValueError(f"model.json must mark exactly one quality level as default; it marks {marked or 'none'}")
        if len(set(ids)) != len(ids) or not all(0 <= i <= 15 for i in ids):
            raise ValueError(f"quality ids {ids} must be unique and within 0..15 (they travel in 4 bits)")
        if any(len(q.step) != len(active) for q in qualities):
            raise ValueError(f"every quality level needs one quantizer per active dim ({len(active)})")
        if len(active) and (np.min(active) < 0 or np.max(active) >= latent_dim) or len(codec["fill"]) != latent_dim:
            raise ValueError(f"active dims {active.tolist()} and fill must fit the latent size {latent_dim}")
        if fmt == container.FORMAT_ENTROPY and not all(q.tables for q in qualities):
            raise ValueError("codec format 2 needs frequency tables ('freq') for every quality level")
        return cls(fingerprint, latent_dim, fmt, active, np.array(codec["fill"], dtype=np.float64), qualities)

    def quality(self, name: str = "") -> Quality:
        for q in self.qualities:
            if (q.name == name) if name else q.is_default:
                return q
        raise InvalidInput(f"quality {shown(name)} is unknown, expected one of {[q.name for q in self.qualities]}")

    def quality_by_id(self, qid: int) -> Quality:
        for q in self.qualities:
            if q.id == qid:
                return q
        raise InvalidCode(f"code quality id {qid} is unknown to this model, expected one of {[q.id for q in self.qualities]}")

    def quantize(self, mu: np.ndarray, q: Quality) -> np.ndarray:
        """Latent means (N, z) -> signed symbols (N, D)."""
        s = np.rint((mu[:, self.active].astype(np.float64) - q.center) / q.step)
        # the range an escaped symbol can carry (entropy.encode_exact): beyond it a symbol would be clipped again there
        return np.clip(s, q.min_symbol - entropy.ESCAPE_OFFSET, q.min_symbol + entropy.ESCAPE_OFFSET - 1).astype(np.int64)

    def dequantize(self, symbols: np.ndarray, q: Quality) -> np.ndarray:
        """Signed symbols (N, D) -> latents (N, z) for the decoder."""
        z = np.tile(self.fill, (symbols.shape[0], 1))
        z[:, self.active] = q.center + symbols * q.step
        return z.astype(np.float32)

    def encode(self, mu: np.ndarray, quality: str = "") -> list[bytes]:
        """Latent means (N, z) -> one code per row."""
        q = self.quality(quality)
        s = self.quantize(mu, q)
        if self.format == container.FORMAT_FIXED:
            s = np.clip(s, q.min_symbol, q.max_symbol) - q.min_symbol
            payloads = container.pack_fixed(s, q.bits)
        else:
            payloads = entropy.encode_many(s, list(q.tables))
        return [container.wrap(self.format, q.id, self.fingerprint, p) for p in payloads]

    def encode_batch(self, mu: np.ndarray, quality: str = "") -> bytes:
        """Latent means (N, z) -> one batch container."""
        q = self.quality(quality)
        if not q.tables:
            raise InvalidInput("this model has no entropy tables (codec format 1): batch codes need format 2")
        stream = entropy.encode_batch(self.quantize(mu, q), list(q.tables))
        return container.wrap_batch(q.id, self.fingerprint, len(mu), stream)

    def symbols(self, codes: list[bytes], verified: bool = False,
                label: Callable[[int], str] | None = None) -> tuple[np.ndarray, list[Quality]]:
        """Single codes of this model -> signed symbols (N, D) and each code's quality.

        Verifies every code's checksum, unless the caller already has (`verified`: the router did).
        Codes of one quality and format decode together (entropy.decode_many). An error names the
        code by label(i), which is only called then (default: "code i: " when there are several).
        """
        if label is None:
            label = (lambda i: f"code {i}: ") if len(codes) > 1 else (lambda i: "")
        out = np.zeros((len(codes), len(self.active)), dtype=np.int64)
        levels: list[Quality] = []
        groups: dict[tuple[int, int], list[int]] = {}
        payloads: list[bytes] = []
        for i, code in enumerate(codes):
            try:
                h = container.parse(code) if verified else container.unwrap(code, self.fingerprint)
                if h.version == container.FORMAT_BATCH:
                    raise InvalidCode("a batch container holds many codes; decode it with the batch reader")
                q = self.quality_by_id(h.quality)
                if h.version == container.FORMAT_ENTROPY and not q.tables:
                    raise InvalidCode("it is entropy-coded (format 2) but this model has no tables")
                if h.version == container.FORMAT_ENTROPY and len(h.payload) > q.max_payload_bytes:
                    raise InvalidCode(f"its payload is {len(h.payload)} bytes; a code of this model at quality "
                                      f"{q.name!r} holds at most {q.max_payload_bytes}")
            except InvalidCode as exc:
                raise type(exc)(f"{label(i)}{exc}") from exc
            levels.append(q)
            payloads.append(h.payload)
            groups.setdefault((h.version, q.id), []).append(i)
        for (version, _), rows in groups.items():
            q = levels[rows[0]]
            if version == container.FORMAT_FIXED:  # the slice's format: one by one, for exact error messages
                for r in rows:
                    try:
                        s = container.unpack_fixed([payloads[r]], q.bits)[0]
                        if (s > q.max_symbol - q.min_symbol).any():
                            raise InvalidCode("it holds a symbol outside the quality level's range")
                    except InvalidCode as exc:
                        raise type(exc)(f"{label(r)}{exc}") from exc
                    out[r] = s + q.min_symbol
            else:
                tables = list(q.tables)
                symbols = entropy.decode_many([payloads[r] for r in rows], tables)
                # Any payload decodes to some symbols. Only the one encode_exact writes for them is a code: bytes
                # added to or altered in a code (with its checksum recomputed) are refused, not decoded.
                for r, canonical in zip(rows, entropy.encode_many(symbols, tables)):
                    if canonical != payloads[r]:
                        raise InvalidCode(f"{label(r)}its payload is not the encoding of the symbols it decodes "
                                          "to: bytes were added or altered")
                out[rows] = symbols
        return out, levels

    def batch_symbols(self, blob: bytes) -> tuple[np.ndarray, Quality]:
        b = container.parse_batch(blob)
        if b.model_id != self.fingerprint[0] or not container.verify(blob, self.fingerprint):
            raise CorruptCode("batch checksum mismatch: the batch is corrupted or was made by another model")
        q = self.quality_by_id(b.quality)
        if not q.tables:
            raise InvalidCode("batch codes need entropy tables, which this model lacks")
        # Every code costs at least the bits of its likeliest symbols: a count the stream cannot hold is absurd.
        min_bits = sum(entropy.PRECISION - float(np.log2(t.freq.max())) for t in q.tables)
        if min_bits > 0 and b.count * min_bits > 8 * len(b.stream) + 64:
            most = int((8 * len(b.stream) + 64) / min_bits)
            raise InvalidCode(f"batch declares {b.count} codes, but its {len(b.stream)}-byte stream holds at most {most}")
        tables = list(q.tables)
        try:
            symbols = entropy.decode_batch(b.stream, b.count, tables)
        except ValueError as exc:  # malformed, short or overlong stream
            raise InvalidCode(str(exc)) from exc
        if entropy.encode_batch(symbols, tables) != b.stream:  # as for single codes: only the one encoding
            raise InvalidCode("batch stream is not the encoding of the codes it decodes to: bytes were added or altered")
        return symbols, q

    def decode(self, codes: list[bytes], verified: bool = False,
               label: Callable[[int], str] | None = None) -> np.ndarray:
        """Codes -> latents (N, z) ready for the decoder network."""
        symbols, levels = self.symbols(codes, verified, label)
        z = np.zeros((len(codes), self.latent_dim), dtype=np.float32)
        for q in {q.id: q for q in levels}.values():
            rows = np.array([lv.id == q.id for lv in levels])
            z[rows] = self.dequantize(symbols[rows], q)
        return z
