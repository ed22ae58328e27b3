"""The servicer's handlers in a warm loop, in process, without gRPC: what a request costs with hot caches.

    python benchmarks/handler_speed.py --json benchmarks/results/handler_speed.json

Set beside `disco bench`'s server-side breakdown at concurrency 1 (handler and compute time per request inside a
real server, one request at a time), the difference is what a request pays for running cold, after the server waited
for it (benchmarks/idle_penalty.py measures what a pause or an evicted cache costs a run). (At higher concurrency the
in-server handler time also holds the time other requests run.) The `*_without_ort_us` rows run the same
handlers with each ONNX Runtime run replaced by its outputs: the Python a request costs beside the compute. Each
figure is the best of 5 means over 2,000 calls, in microseconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from disco.client.bench import sprites
from disco.service.config import ServeConfig
from disco.service.metrics import Metrics
from disco.service.repository import EMBEDDED, Repository
from disco.service.server import build_pipeline
from disco.service.servicer import CodecServicer
from disco.v1 import codec_pb2 as pb


class _Context:
    """The two ServicerContext methods the handlers call."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(details)


async def best_us(f: Callable[[], Awaitable[Any]], repeats: int = 5, number: int = 2000) -> float:
    for _ in range(50):
        await f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            await f()
        best = min(best, (time.perf_counter() - t0) / number)
    return round(best * 1e6, 1)


async def measure() -> dict[str, float]:
    cfg, metrics = ServeConfig(), Metrics()
    executor = ThreadPoolExecutor(cfg.worker_threads())
    pipeline = build_pipeline(cfg, Repository.load(EMBEDDED), executor, metrics)
    await pipeline.warm_up()
    s, ctx = CodecServicer(pipeline, cfg, metrics), _Context()
    x = sprites(1)
    compress = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                      dtype=pb.DTYPE_UINT8)))
    decompress = pb.DecompressRequest(codes=(await s.Compress(compress, ctx)).codes)
    e = pipeline.entry()
    loaded = await pipeline.load(e)
    runtime = loaded.runtime
    h, w, c = e.input_shape
    image, z = np.zeros((1, c, h, w), np.float32), np.zeros((1, e.codec.latent_dim), np.float32)

    async def encode() -> None:
        runtime.encode(image)

    async def decode() -> None:
        runtime.decode(z)

    rows = {
        "noop_handler_us": await best_us(lambda: s.NoOp(pb.NoOpRequest(payload=compress.SerializeToString()), ctx)),
        "compress_handler_us": await best_us(lambda: s.Compress(compress, ctx)),
        "ort_encode_1_us": await best_us(encode),
        "decompress_handler_us": await best_us(lambda: s.Decompress(decompress, ctx)),
        "ort_decode_1_us": await best_us(decode),
    }
    # The same handlers with each ONNX Runtime run replaced by its outputs for this request, computed once: what
    # a request costs the event loop in Python (parsing, codec, batcher, metrics, response) beside the compute.
    encoded, decoded = runtime.encode(image), (runtime.decode(z),)
    loaded.encoder._run, loaded.decoder._run = (lambda x: encoded), (lambda z: decoded)
    rows["compress_handler_without_ort_us"] = await best_us(lambda: s.Compress(compress, ctx))
    rows["decompress_handler_without_ort_us"] = await best_us(lambda: s.Decompress(decompress, ctx))
    await pipeline.close()
    executor.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = asyncio.run(measure())
    print(json.dumps(rows, indent=1))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
