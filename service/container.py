"""The factor-code containers: one code (2-byte header, payload, 2-byte keyed checksum), or a batch.

      byte 0            byte 1         bytes 2 .. n-3        bytes n-2, n-1
 +---------+---------+-----------+-----------------------+-------------------+
 | version | quality |  model id |        payload        |  checksum (u16 LE)|
 | 4 bits  | 4 bits  |  u8       |  format-specific      |                   |
 +---------+---------+-----------+-----------------------+-------------------+
   high      low       fingerprint[0]                       blake2b(bytes 0..n-3,
   nibble    nibble                                          key=fingerprint, 2 bytes)

- version: the container/payload format; 0 is never valid (an all-zero code fails loudly).
  1 = fixed-width packed symbols (`pack_fixed`), the slice's format, still decoded;
  2 = symbols arithmetic-coded under the model's integer tables (`entropy.encode_exact`);
  3 = a batch (below).
- quality: the id of a quality level in the model's model.json (ids are stored, never list positions).
- model id: the first byte of the model's 32-byte fingerprint. It only narrows the search; the
  checksum, keyed with the full fingerprint, is what proves that the code and the model belong together.
  So 4 bytes of overhead catch both corruption and a wrong model (a random error slips past with
  probability 2^-16).
- The payload's length is the code's length minus 4: codes are always framed by their carrier
  (a protobuf `bytes`, a file), so no length field is spent.

A batch shares one header across N codes of one model and quality:

      byte 0       byte 1      LEB128        stream                      last 4 bytes
 +-----+---------+----------+---------+---------------------------+---------------------+
 |  3  | quality | model id |    N    | range-coded symbols of all | checksum (u32 LE)   |
 +-----+---------+----------+---------+ N codes (entropy.encode_batch), 32-bit LE words  |
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
FORMAT_ENTROPY = 2
FORMAT_BATCH = 3
KNOWN_FORMATS = (FORMAT_FIXED, FORMAT_ENTROPY, FORMAT_BATCH)
BATCH_CHECKSUM_BYTES = 4
MAX_BATCH = 1 << 20  # codes in one batch container; a larger declared count is refused before decoding


@dataclass(frozen=True)
class Header:
    version: int
    quality: int
    model_id: int
    payload: bytes


@dataclass(frozen=True)
class Batch:
    quality: int
    model_id: int
    count: int
    stream: bytes


def checksum(fingerprint: bytes, body: bytes, size: int = CHECKSUM_BYTES) -> bytes:
    return hashlib.blake2b(body, key=fingerprint, digest_size=size).digest()


def wrap(version: int, quality: int, fingerprint: bytes, payload: bytes) -> bytes:
    if version == FORMAT_BATCH or not (1 <= version <= 15 and 0 <= quality <= 15):
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


def is_batch(code: bytes) -> bool:
    return len(code) > 0 and code[0] >> 4 == FORMAT_BATCH


def verify(code: bytes, fingerprint: bytes) -> bool:
    """True when the code's (or batch's) checksum matches under this model's fingerprint."""
    code = bytes(code)
    size = BATCH_CHECKSUM_BYTES if is_batch(code) else CHECKSUM_BYTES
    return len(code) > size and checksum(fingerprint, code[:-size], size) == code[-size:]


def count(code: bytes) -> int:
    """Images a code stands for, from its header alone: 1, or a batch container's declared count."""
    return parse_batch(code).count if is_batch(code) else 1


def wrap_batch(quality: int, fingerprint: bytes, count: int, stream: bytes) -> bytes:
    if not (0 <= quality <= 15 and 0 < count <= MAX_BATCH):
        raise ValueError(f"batch of {count} codes at quality {quality} does not fit (1..{MAX_BATCH}, 0..15)")
    n, varint = count, bytearray()
    while True:  # LEB128: 7 bits a byte, low bits first
        varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    body = bytes([(FORMAT_BATCH << 4) | quality, fingerprint[0]]) + bytes(varint) + stream
    return body + checksum(fingerprint, body, BATCH_CHECKSUM_BYTES)


def parse_batch(code: bytes) -> Batch:
    """Read a batch header without any model; refuses absurd counts before anything is decoded."""
    code = bytes(code)
    if not is_batch(code) or len(code) < HEADER_BYTES + 1 + BATCH_CHECKSUM_BYTES:
        raise InvalidCode(f"not a batch container ({len(code)} bytes, first byte {code[:1].hex() or 'none'})")
    count, shift, pos = 0, 0, HEADER_BYTES
    while True:
        if pos >= len(code) - BATCH_CHECKSUM_BYTES or shift > 28:
            raise InvalidCode("batch count is not a valid LEB128 number")
        byte = code[pos]
        count |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            if byte == 0 and shift > 7:  # a trailing zero group: the same count in more bytes than wrap_batch writes
                raise InvalidCode("batch count is not in its shortest LEB128 form")
            break
    if not 0 < count <= MAX_BATCH:
        raise InvalidCode(f"batch declares {count} codes, expected 1..{MAX_BATCH}")
    return Batch(code[0] & 0x0F, code[1], count, code[pos:-BATCH_CHECKSUM_BYTES])


def unwrap(code: bytes, fingerprint: bytes) -> Header:
    header = parse(code)
    if header.version == FORMAT_BATCH:
        raise InvalidCode("a batch container holds many codes; decode it with the batch reader")
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
