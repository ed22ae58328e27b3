"""The exact arithmetic coder written the textbook way, as the oracle for service/entropy.py.

The interval is kept as [low / scale, (low + width) / scale) with an explicit scale, and the fewest bytes
are found by trying 0, 1, 2, ... bytes in turn. entropy.encode_exact / decode_exact compute the same
bytes and symbols with shifts and a closed form (tests/test_entropy.py checks that they agree;
benchmarks/codec_speed.py times both).
"""
from __future__ import annotations

import bisect

from disco.service.entropy import ESCAPE_BITS, ESCAPE_OFFSET, TOTAL, FreqTable


def encode(symbols: list[int], tables: list[FreqTable]) -> bytes:
    steps = []  # (cumulative, frequency, total) of every coding step, escapes expanded
    for s, t in zip(symbols, tables):
        i = t.index(s)
        steps.append((t.cum_list[i], t.freq_list[i], TOTAL))
        if i == t.escape:
            steps.append((min(max(s - t.min_symbol + ESCAPE_OFFSET, 0), (1 << ESCAPE_BITS) - 1), 1, 1 << ESCAPE_BITS))
    low, width, scale = 0, 1, 1
    for c, f, total in steps:
        low, width, scale = low * total + width * c, width * f, scale * total
    return shortest(low, width, scale)


def shortest(low: int, width: int, scale: int) -> bytes:
    """The fewest bytes whose value, read as a fraction, lies in [low / scale, (low + width) / scale)."""
    nbytes = 0
    while True:
        unit = 1 << (8 * nbytes)
        v = -(-low * unit // scale)  # the smallest point on the byte grid not below low
        if v * scale < (low + width) * unit:
            return v.to_bytes(nbytes, "big")
        nbytes += 1


def decode(payload: bytes, tables: list[FreqTable]) -> list[int]:
    unit = 1 << (8 * len(payload))
    v = int.from_bytes(payload, "big")
    low, width, scale = 0, 1, 1
    out = []
    for tab in tables:
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
