"""The code container and fixed-width packing: round trips, and every malformed code refused."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.service import container
from disco.service.errors import CorruptCode, InvalidCode

FP = hashlib.sha256(b"model a").digest()
OTHER = hashlib.sha256(b"model b").digest()


def test_wrap_parse_round_trip_and_overhead() -> None:
    code = container.wrap(1, 3, FP, b"\x01\x02\x03")
    assert len(code) == 3 + container.OVERHEAD_BYTES == 7
    h = container.unwrap(code, FP)
    assert (h.version, h.quality, h.model_id, h.payload) == (1, 3, FP[0], b"\x01\x02\x03")


def test_wrong_model_and_corruption_fail_the_checksum() -> None:
    code = container.wrap(1, 0, FP, b"\xab\xcd")
    with pytest.raises(CorruptCode):
        container.unwrap(code, OTHER)
    for i in range(len(code) * 8):
        flipped = bytearray(code)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(InvalidCode):  # CorruptCode, or an unknown version for the version bits
            container.unwrap(bytes(flipped), FP)


@pytest.mark.parametrize("bad, match", [(b"", "0 bytes"), (b"\x10\x00\x00", "3 bytes"),
                                        (b"\x00\x00\x00\x00", "version 0"), (b"\xf0\x00\x00\x00", "version 15")])
def test_malformed_codes_name_the_problem(bad: bytes, match: str) -> None:
    with pytest.raises(InvalidCode, match=match):
        container.parse(bad)


def test_non_bytes_code_is_refused() -> None:
    with pytest.raises(InvalidCode, match="must be bytes"):
        container.parse("abcd")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=0, max_size=8), st.integers(1, 20), st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits: list[int], n: int, seed: int) -> None:
    b = np.array(bits, dtype=np.int64)
    rng = np.random.default_rng(seed)
    symbols = np.stack([rng.integers(0, 2**k, n) for k in bits], axis=1) if bits else np.zeros((n, 0), np.int64)
    payloads = container.pack_fixed(symbols, b)
    assert all(len(p) == (int(b.sum()) + 7) // 8 for p in payloads)
    np.testing.assert_array_equal(container.unpack_fixed(payloads, b), symbols)


def test_unpack_refuses_wrong_length_and_nonzero_padding() -> None:
    bits = np.array([3, 2])  # 5 bits -> 1 byte, 3 padding bits
    with pytest.raises(InvalidCode, match="2 bytes"):
        container.unpack_fixed([b"\x00\x00"], bits)
    with pytest.raises(InvalidCode, match="padding"):
        container.unpack_fixed([b"\x01"], bits)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=16))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        container.unwrap(data, FP)
    except InvalidCode:
        pass
