"""The entropy coders: exact round trips, byte-granular output, escapes, and any payload decodes safely."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_coder
from disco.service import entropy
from disco.service.entropy import TOTAL, FreqTable, table_from_counts


def tables_from(seed: int, sizes: list[int], min_symbol: int = -4) -> list[FreqTable]:
    rng = np.random.default_rng(seed)
    return [FreqTable.from_freq(min_symbol, table_from_counts(rng.integers(0, 500, k) ** 2, escapes=int(rng.integers(0, 3))))
            for k in sizes]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.integers(1, 60), min_size=1, max_size=8), st.data())
def test_exact_coder_round_trips_within_a_byte_of_the_ideal(seed: int, sizes: list[int], data: st.DataObject) -> None:
    tables = tables_from(seed, sizes)
    symbols = [data.draw(st.integers(-40000, 40000) | st.integers(-6, k)) for k in sizes]
    expect = [int(np.clip(s, -entropy.ESCAPE_OFFSET + t.min_symbol, entropy.ESCAPE_OFFSET - 1 + t.min_symbol))
              if t.index(s) == t.escape else s for s, t in zip(symbols, tables)]
    payload = entropy.encode_exact(symbols, tables)
    assert entropy.decode_exact(payload, tables) == expect
    ideal = sum(t.bits(s) for s, t in zip(symbols, tables))
    assert len(payload) <= math.ceil(ideal / 8 - 1e-9)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.integers(1, 60), min_size=1, max_size=8), st.data())
def test_exact_coder_matches_the_textbook_coder(seed: int, sizes: list[int], data: st.DataObject) -> None:
    """The shift-and-closed-form coder writes and reads exactly what the textbook one does (tests/reference_coder.py),
    for any symbols (escapes included) and any payload."""
    tables = tables_from(seed, sizes)
    symbols = [data.draw(st.integers(-40000, 40000) | st.integers(-6, k)) for k in sizes]
    payload = entropy.encode_exact(symbols, tables)
    assert payload == reference_coder.encode(symbols, tables)
    for p in (payload, data.draw(st.binary(max_size=14))):
        assert entropy.decode_exact(p, tables) == reference_coder.decode(p, tables)


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 12), st.data())
def test_fewest_bytes_matches_the_textbook_search(words: int, data: st.DataObject) -> None:
    """The closed form against trying 0, 1, 2, ... bytes, on any interval of a 16-bit-multiple grid (edges included)."""
    bits = 16 * words
    edge = st.sampled_from([0, 1, 2**bits - 2, 2**bits - 1])
    low = data.draw(st.integers(0, 2**bits - 1) | edge)
    top = data.draw(st.integers(low, 2**bits - 1) | st.just(low) | st.just(2**bits - 1))
    assert entropy._fewest_bytes(low, top, bits) == reference_coder.shortest(low, top - low + 1, 2**bits)


def test_escapes_cost_the_table_entry_plus_16_bits() -> None:
    (t,) = tables_from(0, [10])
    assert t.bits(1000) == pytest.approx(entropy.PRECISION - math.log2(t.freq[-1]) + 16)
    assert entropy.decode_exact(entropy.encode_exact([1000], [t]), [t]) == [1000]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12), st.integers(0, 1000))
def test_any_payload_decodes_to_symbols_without_error(payload: bytes, seed: int) -> None:
    tables = tables_from(seed, [7, 30, 3])
    out = entropy.decode_exact(payload, tables)
    assert len(out) == 3 and all(isinstance(v, int) for v in out)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.integers(1, 300), min_size=1, max_size=5), st.data())
def test_batch_calls_match_the_exact_coder(seed: int, sizes: list[int], data: st.DataObject) -> None:
    """encode_many / decode_many give encode_exact's payloads and decode_exact's symbols for any bytes.
    Up to 4 dims decode in uint64, 5 by the fallback; escapes and long payloads mix into the batch."""
    tables = tables_from(seed, sizes)
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(2, 40))
    symbols = rng.integers(-8, max(sizes) + 4, size=(n, len(sizes)))
    symbols[rng.random(n) < 0.1, 0] = 5000  # escapes
    payloads = entropy.encode_many(symbols, tables)
    assert payloads == [entropy.encode_exact(row, tables) for row in symbols.tolist()]
    noise = [data.draw(st.binary(max_size=9)) for _ in range(data.draw(st.integers(0, 10)))]
    mixed = payloads + noise
    expect = np.array([entropy.decode_exact(p, tables) for p in mixed]).reshape(len(mixed), len(tables))
    assert (entropy.decode_many(mixed, tables) == expect).all()


def test_table_from_counts_sums_to_total_and_keeps_every_symbol() -> None:
    counts = np.array([0, 0, 10_000_000, 5, 0])
    freq = table_from_counts(counts, escapes=0)
    assert sum(freq) == TOTAL and min(freq) >= 1 and len(freq) == 6
    assert freq[2] > TOTAL * 0.99
    with pytest.raises(ValueError, match="summing"):
        FreqTable.from_freq(0, [1, 2, 3])


def test_batch_stream_round_trips_near_the_entropy() -> None:
    rng = np.random.default_rng(3)
    tables = tables_from(5, [12, 20, 8, 30])
    probs = [t.freq[:-1] / t.freq[:-1].sum() for t in tables]
    n = 3000
    symbols = np.stack([rng.choice(len(p), n, p=p) + t.min_symbol for p, t in zip(probs, tables)], axis=1)
    symbols[0, 1] = 500  # one escape
    stream = entropy.encode_batch(symbols, tables)
    np.testing.assert_array_equal(entropy.decode_batch(stream, n, tables), symbols)
    ideal = sum(t.bits(int(s)) for row in symbols for s, t in zip(row, tables))
    assert len(stream) * 8 <= ideal * 1.01 + 64
