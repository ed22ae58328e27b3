"""What one bulk request of image files costs every other call: NoOp latency while it runs, against a spawned server.

    python benchmarks/loop_stall.py --json benchmarks/results/loop_stall.json

A prober sends NoOp calls one after another (the same single-image payload `disco bench` uses) while one request
of `--n` PNG files runs: a Compress of the files, or a Decompress of their codes answered as PNG. Reading and
writing image files is Pillow's work; on the server's event loop it holds up every call behind it (health checks
included), on a thread it does not. Each case runs `--rounds` times; the prober's latencies are reported per case,
beside the prober alone (idle).
"""
from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import grpc
import numpy as np
from PIL import Image

from disco.client.bench import sprites
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc
from spawned import against_spawned, arguments, report


def png_files(n: int) -> list[bytes]:
    out = []
    for a in sprites(n):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def probe_while(stub: codec_pb2_grpc.CodecStub, bulk: Any) -> dict[str, float]:
    """NoOp latencies (ms) while `bulk` (an awaitable call, or None: idle for 0.5 s) runs."""
    one = sprites(1)
    noop = pb.NoOpRequest(payload=pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
        data=one.tobytes(), shape=list(one.shape), dtype=pb.DTYPE_UINT8))).SerializeToString())
    task = asyncio.ensure_future(bulk if bulk is not None else asyncio.sleep(0.5))
    await asyncio.sleep(0.005)  # the bulk call on its way first
    latencies = []
    t_bulk = time.perf_counter()
    while not task.done():
        t0 = time.perf_counter()
        await stub.NoOp(noop, timeout=30)
        latencies.append((time.perf_counter() - t0) * 1000)
    await task
    ms = np.array(latencies)
    return {"bulk_ms": round((time.perf_counter() - t_bulk) * 1000, 1), "probes": len(ms),
            "probe_p50_ms": round(float(np.percentile(ms, 50)), 2), "probe_p99_ms": round(float(np.percentile(ms, 99)), 2),
            "probe_max_ms": round(float(ms.max()), 2)}


async def measure(target: str, n: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    files = png_files(n)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        compress = pb.CompressRequest(images=pb.Images(files=pb.EncodedImages(files=files)))
        codes = (await stub.Compress(compress, timeout=60)).codes
        decompress = pb.DecompressRequest(codes=codes, format=pb.IMAGE_FORMAT_PNG)
        await stub.Decompress(decompress, timeout=60)  # warm
        out: dict[str, list[dict[str, float]]] = {"idle": [], f"compress_{n}_png": [], f"decompress_{n}_to_png": []}
        for _ in range(rounds):
            out["idle"].append(await probe_while(stub, None))
            out[f"compress_{n}_png"].append(await probe_while(stub, stub.Compress(compress, timeout=60)))
            out[f"decompress_{n}_to_png"].append(await probe_while(stub, stub.Decompress(decompress, timeout=60)))
    return out


def main(argv: list[str] | None = None) -> None:
    a = arguments(__doc__, 4096, "image files in the bulk request", argv)
    cases = against_spawned(a.server_args.split(), lambda target: asyncio.run(measure(target, a.n, a.rounds)))
    report({"n": a.n, "server_args": a.server_args, "cases": cases}, a.json)


if __name__ == "__main__":
    main()
