"""Entropy coding of quantized factor symbols under integer frequency tables.

Two coders share the same tables (stored in model.json, so no float network is involved in decoding):

- `encode_exact` / `decode_exact`, for one code: arithmetic coding in exact integer arithmetic
  (Python ints), emitting the fewest whole bytes whose value falls inside the final interval. A code
  costs ceil(-log2 P(symbols) / 8) bytes at most: no flush, no word padding. A word-based coder
  (rANS or a range coder writing 32-bit words) spends 4-8 bytes on a 20-bit message, more than the payload.
  Since the payload's length is known from the framing, the decoder needs no terminator.
- `encode_many` / `decode_many`: the same exact coder over many single codes at once, in int64 numpy
  arithmetic while the coding grid fits (byte for byte the output of encode_exact / decode_exact).
- `encode_batch` / `decode_batch`, for many codes under one header: constriction's range coder
  (bamler-lab/constriction, pinned to 0.5.x, whose releases keep the compressed format), which gets within
  a fraction of a percent of the entropy on long messages where the exact coder's big integers grow too large.

Out-of-range symbols never fail: each table ends with an escape symbol, followed by the symbol's signed
offset coded uniformly over 16 bits (values beyond +-32767 steps are clipped: far outside any posterior).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

PRECISION = 16  # every table's frequencies sum to 2**PRECISION
TOTAL = 1 << PRECISION
ESCAPE_BITS = 16
ESCAPE_OFFSET = 1 << (ESCAPE_BITS - 1)


@dataclass(frozen=True)
class FreqTable:
    """Integer frequencies of symbols min_symbol..max_symbol, then one escape; they sum to TOTAL."""

    min_symbol: int
    freq: np.ndarray  # (K + 1,) int64, all >= 1; the last entry is the escape
    cum: np.ndarray  # (K + 2,) int64 cumulative, cum[0] = 0, cum[-1] = TOTAL
    # The same as Python ints, for the one-code coder: indexing and bisecting a list is several times
    # cheaper than a numpy scalar lookup, and the exact coder works in Python ints anyway.
    freq_list: list[int] = field(init=False, repr=False, compare=False)
    cum_list: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "freq_list", self.freq.tolist())
        object.__setattr__(self, "cum_list", self.cum.tolist())

    @classmethod
    def from_freq(cls, min_symbol: int, freq: list[int]) -> FreqTable:
        f = np.asarray(freq, dtype=np.int64)
        if f.ndim != 1 or len(f) < 2 or f.min() < 1 or int(f.sum()) != TOTAL:
            raise ValueError(f"a frequency table needs >= 2 entries, all >= 1, summing to {TOTAL}")
        return cls(int(min_symbol), f, np.concatenate([[0], np.cumsum(f)]))

    @property
    def escape(self) -> int:
        return len(self.freq) - 1

    def index(self, symbol: int) -> int:
        i = symbol - self.min_symbol
        return i if 0 <= i < self.escape else self.escape

    def bits(self, symbol: int) -> float:
        """Ideal code length of a symbol in bits (escape included)."""
        i = self.index(symbol)
        return PRECISION - float(np.log2(self.freq[i])) + (ESCAPE_BITS if i == self.escape else 0)


def table_from_counts(counts: np.ndarray, escapes: int = 0) -> list[int]:
    """Integer frequencies summing to TOTAL from in-range symbol counts and the number of escapes.

    Additive smoothing (half a count per symbol, the Krichevsky-Trofimov estimator) keeps unseen
    in-range symbols cheap; the remainder of the integer rounding goes to the most frequent symbols.
    """
    weights = np.append(counts.astype(np.float64), escapes) + 0.5
    free = TOTAL - len(weights)  # one count each is reserved so that no frequency is zero
    if free < 0:
        raise ValueError(f"{len(weights)} symbols do not fit a {PRECISION}-bit table")
    share = np.floor(weights / weights.sum() * free).astype(np.int64)
    rest = free - int(share.sum())
    order = np.argsort(-weights, kind="stable")
    share[order[:rest]] += 1
    freq = share + 1
    assert int(freq.sum()) == TOTAL
    return [int(v) for v in freq]


# --- one code: exact arithmetic coding with whole-byte output ---------------------------------------

def _steps(symbols: list[int], tables: list[FreqTable]) -> list[tuple[int, int, int]]:
    """(cumulative, frequency, total) of every coding step, escapes expanded."""
    out = []
    for s, t in zip(symbols, tables):
        i = t.index(s)
        out.append((t.cum_list[i], t.freq_list[i], TOTAL))
        if i == t.escape:
            raw = int(np.clip(s - t.min_symbol + ESCAPE_OFFSET, 0, (1 << ESCAPE_BITS) - 1))
            out.append((raw, 1, 1 << ESCAPE_BITS))
    return out


def encode_exact(symbols: list[int], tables: list[FreqTable]) -> bytes:
    """Symbols (one per table) -> the shortest byte string that identifies them."""
    low, width, scale = 0, 1, 1  # the interval [low / scale, (low + width) / scale)
    for c, f, t in _steps(symbols, tables):
        low, width, scale = low * t + width * c, width * f, scale * t
    nbytes = 0
    while True:
        unit = 1 << (8 * nbytes)
        v = -(-low * unit // scale)  # ceil(low * unit / scale): the smallest point not below low
        if v * scale < (low + width) * unit:
            return v.to_bytes(nbytes, "big")
        nbytes += 1


def decode_exact(payload: bytes, tables: list[FreqTable]) -> list[int]:
    """Inverse of encode_exact. Any payload decodes to some symbols: the checksum guards integrity."""
    unit = 1 << (8 * len(payload))
    v = int.from_bytes(payload, "big")
    low, width, scale = 0, 1, 1
    out = []
    for tab in tables:
        # Where the point v / unit lies inside the current interval, in units of 1 / TOTAL.
        target = ((v * scale - low * unit) * TOTAL) // (width * unit)
        i = min(max(bisect.bisect_right(tab.cum_list, target) - 1, 0), tab.escape)
        low, width, scale = low * TOTAL + width * tab.cum_list[i], width * tab.freq_list[i], scale * TOTAL
        if i != tab.escape:
            out.append(tab.min_symbol + i)
            continue
        t = 1 << ESCAPE_BITS
        raw = min(max(((v * scale - low * unit) * t) // (width * unit), 0), t - 1)
        low, width, scale = low * t + width * raw, width, scale * t
        out.append(raw - ESCAPE_OFFSET + tab.min_symbol)
    return out


# --- many single codes at once: the exact coder, vectorised ------------------------------------------
# Every table sums to 2**PRECISION, so after D steps the interval lies on the grid 2**-(PRECISION * D):
#   low = sum_j cum_j * prod_{i<j} f_i * 2**(PRECISION * (D - 1 - j)),   width = prod_j f_j.
# While that grid (and a payload's bits) fits in 64 bits (D <= 4), uint64 arithmetic computes exactly what the
# Python-int coder does: every quantity stays below 2**64, and the interval's top is kept inclusive
# (low + width - 1) so that it never overflows. Codes with an escaped symbol, payloads longer than 8 bytes
# (only corrupted ones) and models with more dims take the exact path.
MAX_GRID_BITS = 64
_U = np.uint64


def _vectorisable(n_dims: int) -> bool:
    return 0 < PRECISION * n_dims <= MAX_GRID_BITS


def encode_many(symbols: np.ndarray, tables: list[FreqTable]) -> list[bytes]:
    """Symbols (N, D) -> N payloads, each equal to encode_exact(row, tables)."""
    n, d = symbols.shape
    if n < 2 or not _vectorisable(d):
        return [encode_exact(row, tables) for row in symbols.tolist()]
    grid = PRECISION * d
    idx = symbols - np.array([t.min_symbol for t in tables])
    escaped = ((idx < 0) | (idx >= np.array([t.escape for t in tables]))).any(axis=1)
    idx[escaped] = 0  # placeholder: these rows are coded exactly below
    low, width = np.zeros(n, _U), np.ones(n, _U)
    for j, t in enumerate(tables):
        low += (t.cum[idx[:, j]].astype(_U) * width) << _U(grid - PRECISION * (j + 1))
        width *= t.freq[idx[:, j]].astype(_U)
    top = low + (width - _U(1))  # the interval is [low, top]
    nbytes, value = np.full(n, -1, np.int64), np.zeros(n, _U)
    for k in range(grid // 8 + 1):  # the fewest bytes k whose value v has v * 2**(grid - 8k) in [low, top]
        shift = grid - 8 * k
        if shift == 64:  # no bytes: the value 0, which lies inside only when low is 0
            v, fits = np.zeros(n, _U), low == 0
        else:
            v = (low >> _U(shift)) + ((low & _U((1 << shift) - 1)) != 0).astype(_U)  # ceil(low / 2**shift)
            fits = v <= (top >> _U(shift))
        fits &= nbytes < 0
        nbytes[fits], value[fits] = k, v[fits]
        if (nbytes >= 0).all():
            break
    raw = value.astype(">u8").tobytes()
    out = [raw[8 * r + 8 - k: 8 * r + 8] for r, k in enumerate(nbytes.tolist())]
    for r in np.flatnonzero(escaped).tolist():
        out[r] = encode_exact(symbols[r].tolist(), tables)
    return out


def decode_many(payloads: list[bytes], tables: list[FreqTable]) -> np.ndarray:
    """N payloads -> symbols (N, D), each row equal to decode_exact(payload, tables)."""
    n, d = len(payloads), len(tables)
    lengths = np.array([len(p) for p in payloads], dtype=np.int64)
    grid = PRECISION * d
    if n < 2 or not _vectorisable(d) or lengths.max() * 8 > MAX_GRID_BITS:
        return np.array([decode_exact(p, tables) for p in payloads], dtype=np.int64).reshape(n, d)
    v = np.frombuffer(b"".join(p.rjust(8, b"\0") for p in payloads), dtype=">u8").astype(_U)
    fine = np.maximum(grid, 8 * lengths)  # the point v / 2**(8 len) on the grid 2**-fine (<= 64 bits), exactly
    point = v << (fine - 8 * lengths).astype(_U)
    low, width = np.zeros(n, _U), np.ones(n, _U)
    out = np.empty((n, d), np.int64)
    escaped = np.zeros(n, bool)
    for j, t in enumerate(tables):
        unit = width << (fine - PRECISION * (j + 1)).astype(_U)  # 1 / TOTAL of the current interval
        target = (point - low) // unit  # in [0, TOTAL): the point never leaves the interval
        i = np.clip(np.searchsorted(t.cum.astype(_U), target, side="right") - 1, 0, t.escape)
        low += t.cum[i].astype(_U) * unit
        width *= t.freq[i].astype(_U)
        out[:, j] = t.min_symbol + i
        escaped |= i == t.escape
    for r in np.flatnonzero(escaped).tolist():
        out[r] = decode_exact(payloads[r], tables)
    return out


# --- many codes under one header: constriction's range coder -----------------------------------------

def _models(tables: list[FreqTable]) -> list[object]:
    import constriction

    # freq / 2**16 is exact in float64, so constriction's fixed-point model is the integer table itself.
    return [constriction.stream.model.Categorical(t.freq / TOTAL, perfect=False) for t in tables]


def _escape_model() -> object:
    import constriction

    return constriction.stream.model.Categorical(np.full(256, 1 / 256), perfect=False)


def encode_batch(symbols: np.ndarray, tables: list[FreqTable]) -> bytes:
    """Symbols (N, D) -> one range-coded stream (little-endian 32-bit words)."""
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    models, esc = _models(tables), _escape_model()
    for row in symbols:
        for s, t, m in zip(row, tables, models):
            i = t.index(int(s))
            enc.encode(np.array([i], dtype=np.int32), m)
            if i == t.escape:
                raw = int(np.clip(int(s) - t.min_symbol + ESCAPE_OFFSET, 0, (1 << ESCAPE_BITS) - 1))
                enc.encode(np.array([raw >> 8, raw & 0xFF], dtype=np.int32), esc)
    return enc.get_compressed().astype("<u4").tobytes()


def decode_batch(stream: bytes, n: int, tables: list[FreqTable]) -> np.ndarray:
    import constriction

    if len(stream) % 4:
        raise ValueError(f"batch stream is {len(stream)} bytes, not a whole number of 32-bit words")
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, dtype="<u4").astype(np.uint32))
    models, esc = _models(tables), _escape_model()
    out = np.zeros((n, len(tables)), dtype=np.int64)
    try:
        for r in range(n):
            for d, (t, m) in enumerate(zip(tables, models)):
                i = int(dec.decode(m, 1)[0])
                if i == t.escape:
                    hi, lo = (int(v) for v in dec.decode(esc, 2))
                    out[r, d] = ((hi << 8) | lo) - ESCAPE_OFFSET + t.min_symbol
                else:
                    out[r, d] = t.min_symbol + i
    except Exception as exc:  # constriction raises AssertionError on data its model cannot have produced
        raise ValueError(f"batch stream is not a valid encoding of {n} codes: {exc}") from exc
    if not dec.maybe_exhausted():
        raise ValueError(f"batch stream holds more data than {n} codes")
    return out
