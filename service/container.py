"""The factor-code container: a 2-byte header, the payload, a 2-byte keyed checksum.

      byte 0            byte 1         bytes 2 .. n-3        bytes n-2, n-1
 +---------+---------+-----------+-----------------------+-------------------+
 | version | quality |  model id |        payload        |  checksum (u16 LE)|
 | 4 bits  | 4 bits  |  u8       |  format-specific      |                   |
 +---------+---------+-----------+-----------------------+-------------------+
   high      low       fingerprint[0]                       blake2b(bytes 0..n-3,
   nibble    nibble                                          key=fingerprint, 2 bytes)

- version: the container/payload format; 0 is never valid (an all-zero code fails loudly).
  1 = fixed-width packed symbols (this module's `pack_fixed`); later formats take new numbers.
- quality: the id of a quality level in the model's model.json (ids are stored, never list positions).
- model id: the first byte of the model's 32-byte fingerprint. It only narrows the search; the
  checksum, keyed with the full fingerprint, is what proves that the code and the model belong together.
  So 4 bytes of overhead catch both corruption and a wrong model (a random error slips past with
  probability 2^-16).
- The payload's length is the code's length minus 4: codes are always framed by their carrier
  (a protobuf `bytes`, a file), so no length field is spent.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from disco.service.errors import CorruptCode, InvalidCode

HEADER_BYTES = 2
CHECKSUM_BYTES = 2
OVERHEAD_BYTES = HEADER_BYTES + CHECKSUM_BYTES
FORMAT_FIXED = 1
KNOWN_FORMATS = (FORMAT_FIXED,)


@dataclass(frozen=True)
class Header:
    version: int
    quality: int
    model_id: int
    payload: bytes


def checksum(fingerprint: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=fingerprint, digest_size=CHECKSUM_BYTES).digest()


def wrap(version: int, quality: int, fingerprint: bytes, payload: bytes) -> bytes:
    if not (1 <= version <= 15 and 0 <= quality <= 15):
        raise ValueError(f"version {version} / quality {quality} do not fit a nibble (1..15 / 0..15)")
    body = bytes([(version << 4) | quality, fingerprint[0]]) + payload
    return body + checksum(fingerprint, body)


def parse(code: bytes) -> Header:
    """Read a code's header without any model. Raises InvalidCode when it cannot be a code."""
    if not isinstance(code, (bytes, bytearray, memoryview)):
        raise InvalidCode(f"a code must be bytes, got {type(code).__name__}")
    code = bytes(code)
    if len(code) < OVERHEAD_BYTES:
        raise InvalidCode(f"code is {len(code)} bytes, shorter than the {OVERHEAD_BYTES}-byte header and checksum")
    version, quality = code[0] >> 4, code[0] & 0x0F
    if version not in KNOWN_FORMATS:
        raise InvalidCode(f"code format version {version} is unknown, expected one of {list(KNOWN_FORMATS)}")
    return Header(version, quality, code[1], code[HEADER_BYTES:-CHECKSUM_BYTES])


def verify(code: bytes, fingerprint: bytes) -> bool:
    """True when the code's checksum matches under this model's fingerprint."""
    code = bytes(code)
    return checksum(fingerprint, code[:-CHECKSUM_BYTES]) == code[-CHECKSUM_BYTES:]


def unwrap(code: bytes, fingerprint: bytes) -> Header:
    header = parse(code)
    if header.model_id != fingerprint[0] or not verify(code, fingerprint):
        raise CorruptCode(
            f"code checksum mismatch under model {fingerprint[:4].hex()}...: the code is corrupted "
            "or was made by another model"
        )
    return header


def pack_fixed(symbols: np.ndarray, bits: np.ndarray) -> list[bytes]:
    """Pack unsigned symbols (N, D) into N byte strings, dim d taking bits[d] bits, MSB first, zero padded."""
    n, d = symbols.shape
    total = int(bits.sum())
    # One bit column per (dim, bit), most significant bit first.
    shifts = np.concatenate([np.arange(b - 1, -1, -1) for b in bits]) if total else np.zeros(0, int)
    owners = np.repeat(np.arange(d), bits)
    bit_matrix = ((symbols[:, owners] >> shifts[None, :]) & 1).astype(np.uint8)  # (N, total)
    packed = np.packbits(bit_matrix, axis=1)  # (N, ceil(total / 8)), zero padded
    return [row.tobytes() for row in packed]


def unpack_fixed(payloads: list[bytes], bits: np.ndarray) -> np.ndarray:
    """Inverse of pack_fixed. Raises InvalidCode on a wrong length or nonzero padding."""
    total = int(bits.sum())
    nbytes = (total + 7) // 8
    for p in payloads:
        if len(p) != nbytes:
            raise InvalidCode(f"payload is {len(p)} bytes, the quality level expects {nbytes}")
    raw = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(len(payloads), nbytes)
    bit_matrix = np.unpackbits(raw, axis=1).astype(np.int64)  # (N, 8 * nbytes)
    if bit_matrix[:, total:].any():
        raise InvalidCode("payload padding bits are not zero")
    out = np.zeros((len(payloads), len(bits)), dtype=np.int64)
    col = 0
    for d, b in enumerate(bits):
        for _ in range(b):
            out[:, d] = (out[:, d] << 1) | bit_matrix[:, col]
            col += 1
    return out
