"""Entropy coding of quantized factor symbols under integer frequency tables.

Two coders share the same tables (stored in model.json, so no float network is involved in decoding):

- `encode_exact` / `decode_exact`, for one code: arithmetic coding in exact integer arithmetic
  (Python ints), emitting the fewest whole bytes whose value falls inside the final interval. A code
  costs ceil(-log2 P(symbols) / 8) bytes at most: no flush, no word padding. A word-based coder
  (rANS or a range coder writing 32-bit words) spends 4-8 bytes on a 20-bit message, more than the payload.
  Since the payload's length is known from the framing, the decoder needs no terminator.
- `encode_many` / `decode_many`: the same exact coder over many single codes at once; decoding runs in
  uint64 numpy arithmetic while the coding grid fits (symbol for symbol the output of decode_exact).
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
    escape: int = field(init=False, repr=False, compare=False)  # the escape's index, len(freq) - 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "freq_list", self.freq.tolist())
        object.__setattr__(self, "cum_list", self.cum.tolist())
        object.__setattr__(self, "escape", len(self.freq) - 1)

    @classmethod
    def from_freq(cls, min_symbol: int, freq: list[int]) -> FreqTable:
        # integers (not bools or floats) from 1 to TOTAL, checked before numpy would overflow on a huge one
        if not (isinstance(freq, list) and len(freq) >= 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= TOTAL for v in freq)):
            raise ValueError(f"a frequency table needs >= 2 integer entries, each from 1 to {TOTAL}, summing to {TOTAL}")
        f = np.asarray(freq, dtype=np.int64)
        if int(f.sum()) != TOTAL:
            raise ValueError(f"a frequency table needs >= 2 integer entries, each from 1 to {TOTAL}, summing to {TOTAL} "
                             f"(these sum to {int(f.sum())})")
        return cls(int(min_symbol), f, np.concatenate([[0], np.cumsum(f)]))

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

def encode_exact(symbols: list[int], tables: list[FreqTable]) -> bytes:
    """Symbols (one per table) -> the shortest byte string that identifies them."""
    # Every step's total is a power of two, so the interval [low, low + width) lives on the grid 2**-bits.
    low, width, bits = 0, 1, 0
    for s, t in zip(symbols, tables):
        i = s - t.min_symbol
        if 0 <= i < t.escape:
            low = (low << PRECISION) + width * t.cum_list[i]
            width *= t.freq_list[i]
            bits += PRECISION
            continue
        # The escape, then the offset uniform over 2**ESCAPE_BITS (frequency 1: the width is unchanged).
        low = (low << PRECISION) + width * t.cum_list[t.escape]
        width *= t.freq_list[t.escape]
        low = (low << ESCAPE_BITS) + width * min(max(i + ESCAPE_OFFSET, 0), (1 << ESCAPE_BITS) - 1)
        bits += PRECISION + ESCAPE_BITS
    return _fewest_bytes(low, low + width - 1, bits)


def _fewest_bytes(low: int, top: int, bits: int) -> bytes:
    """The fewest bytes v (k of them) with v * 2**(bits - 8k) in [low, top]: the smallest such v for that k.
    Needs 0 <= low <= top < 2**bits and bits a multiple of 8 (here always of 16)."""
    if low == 0:
        return b""
    # Numbers in [low, top] agree above bit h, the highest bit where low - 1 and top differ, so the most
    # trailing zeros any of them has is h (top with its bits below h cleared). k bytes work iff bits - 8k <= h.
    h = ((low - 1) ^ top).bit_length() - 1
    k = -(-(bits - h) // 8)
    shift = bits - 8 * k
    return ((low + (1 << shift) - 1) >> shift).to_bytes(k, "big")  # ceil(low / 2**shift)


def decode_exact(payload: bytes, tables: list[FreqTable]) -> list[int]:
    """Inverse of encode_exact. Any payload decodes to some symbols: the checksum guards integrity."""
    n = 8 * len(payload)
    # The point v / 2**n, tracked as its offset r from the interval's low end on the grid 2**-(bits + n):
    # then a step's target is r * TOTAL // (width * 2**n), and no number grows beyond bits + n + 16 bits.
    # The point never leaves the interval (0 <= r < unit), so the clamps below only mirror the textbook coder.
    r, width = int.from_bytes(payload, "big"), 1
    out = []
    for tab in tables:
        unit = width << n
        r <<= PRECISION
        i = min(max(bisect.bisect_right(tab.cum_list, r // unit) - 1, 0), tab.escape)
        r -= unit * tab.cum_list[i]
        width *= tab.freq_list[i]
        if i != tab.escape:
            out.append(tab.min_symbol + i)
            continue
        unit = width << n
        r <<= ESCAPE_BITS
        raw = min(max(r // unit, 0), (1 << ESCAPE_BITS) - 1)
        r -= unit * raw
        out.append(raw - ESCAPE_OFFSET + tab.min_symbol)
    return out


# --- many single codes at once ---------------------------------------------------------------------
# Every table sums to 2**PRECISION, so after D steps the interval lies on the grid 2**-(PRECISION * D).
# While that grid (and a payload's bits) fits in 64 bits (D <= 4), decoding in uint64 arithmetic computes exactly
# what decode_exact does, every quantity staying below 2**64, at under half its cost per code. Codes with an
# escaped symbol, payloads longer than 8 bytes (only corrupted ones) and models with more dims take the exact path.
MAX_GRID_BITS = 64
_U = np.uint64


def _vectorisable(n_dims: int) -> bool:
    return 0 < PRECISION * n_dims <= MAX_GRID_BITS


def encode_many(symbols: np.ndarray, tables: list[FreqTable]) -> list[bytes]:
    """Symbols (N, D) -> N payloads: encode_exact of each row (as fast per code as uint64 numpy arithmetic)."""
    return [encode_exact(row, tables) for row in symbols.tolist()]


def decode_many(payloads: list[bytes], tables: list[FreqTable]) -> np.ndarray:
    """N payloads -> symbols (N, D), each row equal to decode_exact(payload, tables)."""
    n, d = len(payloads), len(tables)
    lengths = np.array([len(p) for p in payloads], dtype=np.int64)
    grid = PRECISION * d
    if n < 2 or not _vectorisable(d) or int(np.max(lengths)) * 8 > MAX_GRID_BITS:
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
    for row in symbols.tolist():
        for s, t, m in zip(row, tables, models):
            i = t.index(s)
            enc.encode(i, m)  # one symbol at a time, as a scalar: an array per symbol cost 6x the time
            if i == t.escape:
                raw = min(max(s - t.min_symbol + ESCAPE_OFFSET, 0), (1 << ESCAPE_BITS) - 1)
                enc.encode(raw >> 8, esc)
                enc.encode(raw & 0xFF, esc)
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
                i = int(dec.decode(m))
                if i == t.escape:
                    hi = int(dec.decode(esc))
                    out[r, d] = ((hi << 8) | int(dec.decode(esc))) - ESCAPE_OFFSET + t.min_symbol
                else:
                    out[r, d] = t.min_symbol + i
    except Exception as exc:  # constriction raises AssertionError on data its model cannot have produced
        raise ValueError(f"batch stream is not a valid encoding of {n} codes: {exc}") from exc
    if not dec.maybe_exhausted():
        raise ValueError(f"batch stream holds more data than {n} codes")
    return out
