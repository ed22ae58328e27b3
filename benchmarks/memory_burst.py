"""Peak memory under a burst of the largest requests: is deploy/k8s's memory limit enough?

    python benchmarks/memory_burst.py --n 6 --rounds 2 --json benchmarks/results/memory_burst.json

Spawns a server with the Deployment's settings (one worker thread, as its 1-CPU request sets; the defaults for
--max-queue and --max-images-per-request), then sends --n concurrent Compress calls of --max-images-per-request
RGB images each (color_dsprites: 48 MiB on the wire, 192 MiB as float32) from an AsyncClient that retries the
RESOURCE_EXHAUSTED of a full queue, as the README advises bulk callers to. Reports the server's resident memory
after warm-up and its peak (VmHWM, /proc) after each round.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from disco.client import AsyncClient, RetryPolicy
from disco.client.bench import spawn
from spawned import arguments, report


def memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


async def burst(target: str, n: int, images: np.ndarray) -> dict[str, Any]:
    retry = RetryPolicy(on_resource_exhausted=True, max_attempts=100)
    async with AsyncClient(target, timeout=300, max_batch=len(images), retry=retry) as c:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(c.compress(images, model="color_dsprites") for _ in range(n)),
                                       return_exceptions=True)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "answers": [type(a).__name__ if isinstance(a, BaseException) else len(a) for a in answers]}


def main(argv: list[str] | None = None) -> None:
    a = arguments(__doc__, 6, "concurrent requests of the largest size", argv)
    proc, target, _ = spawn(["--workers", "1", *a.server_args.split()])
    try:
        from disco.service.config import ServeConfig

        size = ServeConfig.from_args(a.server_args.split()).max_images_per_request
        images = np.random.default_rng(0).integers(0, 256, (size, 64, 64, 3), dtype=np.uint8)
        result: dict[str, Any] = {"images_per_request": size, "requests": a.n, "idle_kib": memory_kib(proc.pid),
                                  "rounds": []}
        for _ in range(a.rounds):
            r = asyncio.run(burst(target, a.n, images))
            result["rounds"].append({**r, **memory_kib(proc.pid)})
    finally:
        proc.terminate()
        proc.wait(30)
    result["peak_mib"] = round(max(r["VmHWM"] for r in result["rounds"]) / 1024, 1)
    report(result, a.json)


if __name__ == "__main__":
    main()
