"""Per-request CPU work outside ONNX Runtime, old way against new, side by side in one run.

    python benchmarks/codec_speed.py --json benchmarks/results/codec_speed.json

- entropy coding of 64 single codes of the default model, the textbook way and ours, with the same bytes and symbols
  (tests/test_entropy.py): the textbook exact coder (tests/reference_coder.py) per code, entropy.encode_exact /
  decode_exact per code (encode_many is exactly that loop), and decode_many (in uint64 up to 4 dims); and the
  codec's checked decode of single codes and of a batch container (which re-encodes what it read);
- uint8 (64, 64, 64, 1) -> float32 NCHW: astype(float32) / 255 then a transposed copy, against images.from_raw's
  single pass (identical values, tests/test_codec.py), with the minor page faults of each per call: the two-pass
  way allocates three 1 MiB temporaries a call, which glibc returns to the OS and the next call faults back in,
  and that, more than the arithmetic, is its cost.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from disco.client.bench import sprites
from disco.service import container, entropy, images
from disco.service.repository import EMBEDDED, Repository

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference_coder  # noqa: E402  (the oracle of the tests)


def best_us(f: Callable[[], object], repeats: int = 7, number: int = 50) -> float:
    """Best of `repeats` means over `number` calls, in microseconds (the least disturbed on a shared machine)."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            f()
        best = min(best, (time.perf_counter() - t0) / number)
    return round(best * 1e6, 1)


def minor_faults(f: Callable[[], object], number: int = 50) -> float:
    """Minor page faults per call (this process's, so nothing else may run meanwhile)."""
    f()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(number):
        f()
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / number, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    e = Repository.load(EMBEDDED).get("dsprites")
    q = e.codec.quality()
    tables = list(q.tables)
    x8 = sprites(64)
    symbols = e.codec.quantize(np.random.default_rng(0).normal(size=(64, e.codec.latent_dim)), q)
    payloads = entropy.encode_many(symbols, tables)
    codes = [container.wrap(container.FORMAT_ENTROPY, q.id, e.fingerprint, p) for p in payloads]
    stream = entropy.encode_batch(symbols, tables)
    batch = container.wrap_batch(q.id, e.fingerprint, 64, stream)
    shape = x8.shape

    def two_pass() -> np.ndarray:
        return (np.frombuffer(x8.tobytes(), np.uint8).reshape(shape).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()

    def one_pass() -> np.ndarray:
        return images.from_raw(x8.tobytes(), shape, "uint8", e.input_shape)

    rows = {
        "encode_64_codes_textbook_us": best_us(lambda: [reference_coder.encode(r, tables) for r in symbols.tolist()]),
        "encode_64_codes_exact_us": best_us(lambda: [entropy.encode_exact(r, tables) for r in symbols.tolist()]),
        "decode_64_codes_textbook_us": best_us(lambda: [reference_coder.decode(p, tables) for p in payloads]),
        "decode_64_codes_exact_us": best_us(lambda: [entropy.decode_exact(p, tables) for p in payloads]),
        "decode_64_codes_many_us": best_us(lambda: entropy.decode_many(payloads, tables)),
        # What a Decompress pays around them: codec.symbols on 64 single codes and codec.batch_symbols on one batch
        # container of the same 64, both with the check that the bytes are the one encoding of what they decode to
        # (a re-encode), beside the bare batch decode.
        "codec_symbols_64_checked_us": best_us(lambda: e.codec.symbols(codes, verified=True)),
        "batch_decode_64_us": best_us(lambda: entropy.decode_batch(stream, 64, tables)),
        "batch_symbols_64_checked_us": best_us(lambda: e.codec.batch_symbols(batch)),
        "uint8_to_float_64_two_pass_us": best_us(two_pass),
        "uint8_to_float_64_one_pass_us": best_us(one_pass),
    }
    for k in ("encode_64_codes", "decode_64_codes", "uint8_to_float_64"):
        old, *new = [v for n, v in rows.items() if n.startswith(k)]  # the first is the old way
        rows[f"{k}_speedup"] = round(old / min(new), 1)
    rows["uint8_to_float_64_two_pass_minor_faults"] = minor_faults(two_pass)
    rows["uint8_to_float_64_one_pass_minor_faults"] = minor_faults(one_pass)
    print(json.dumps(rows, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"model": f"{e.name}/{e.version}", **rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
