"""A burst: N single-image Compress calls sent at once, against a spawned server; how many were answered, how.

    python benchmarks/burst.py --n 3000 --server-args "--max-pending-rpcs 0" --json benchmarks/results/burst_grpc_default.json

While the server's event loop works through them, the calls wait in gRPC core, which refuses new calls beyond its
pending limit (`disco serve --max-pending-rpcs`; 0 keeps gRPC's default, random drops from 1,000 pending on and all
past 3,000) with a bare CANCELLED. Each run spawns its own server and sends `--rounds` bursts, one after another.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from disco.client.bench import requests_for, resolve_inputs
from disco.client.load import burst
from spawned import against_spawned, arguments, report


async def timed_burst(target: str, n: int) -> dict[str, Any]:
    request = requests_for(target, resolve_inputs(target, "", None, 1), "compress", 1)
    t0 = time.perf_counter()
    answers = await burst(target, request, n)
    return {"seconds": round(time.perf_counter() - t0, 3), "answers": answers}


def main(argv: list[str] | None = None) -> None:
    a = arguments(__doc__, 3000, "calls per burst", argv)
    bursts = against_spawned(a.server_args.split(),
                             lambda target: [asyncio.run(timed_burst(target, a.n)) for _ in range(a.rounds)])
    report({"n": a.n, "server_args": a.server_args, "bursts": bursts}, a.json)


if __name__ == "__main__":
    main()
