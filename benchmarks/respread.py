"""How a client's connections stay spread over the processes of a `--processes 2` server that recycles them.

    python benchmarks/respread.py --json benchmarks/results/respread.json

One server with two processes on a port that recycles each connection after `--age-s` seconds (its
`--max-connection-age-s`; gRPC adds up to 10% of jitter), so that a run of a minute sees what a 300 s default
does over hours: each replacement connection is hashed to a process afresh by the kernel. For each `respread_s`
(0: spread only at the start, as the SDK did before; then the SDK's re-spread), a Client with 4 connections
carries single-image Compress calls from 4 threads for `--seconds`, while a sampler asks every `--sample-s`
which process each connection reaches (ListModels over it). Reported: the share of samples in which the
connections were spread 2:2, the mean share of the connections held by the busier process (0.5 is even), the
calls answered and the calls that failed. The settings alternate over `--rounds`.
"""
from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from disco.client import Client
from disco.client.bench import sprites
from disco.v1 import codec_pb2, codec_pb2_grpc
from spawned import against_spawned, report


def run(target: str, respread_s: float, seconds: float, sample_s: float) -> dict[str, Any]:
    x = sprites(1)
    calls, failures = [0], Counter[str]()
    stop = threading.Event()
    with Client(target, connections=4, respread_s=respread_s) as c:
        def load() -> None:
            while not stop.is_set():
                try:
                    c.compress(x)
                    calls[0] += 1
                except Exception as exc:  # noqa: BLE001 - counted by kind
                    failures[str(exc)[:80]] += 1

        def where(channel: Any) -> str:
            return codec_pb2_grpc.CodecStub(channel).ListModels(codec_pb2.ListModelsRequest(), timeout=5).server_instance

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        busiest: list[float] = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            time.sleep(sample_s)
            counts = Counter(where(ch) for ch in list(c._channels))
            busiest.append(max(counts.values()) / 4)
        stop.set()
        for t in threads:
            t.join()
    return {"respread_s": respread_s, "samples": len(busiest),
            "even_share": round(sum(b == 0.5 for b in busiest) / len(busiest), 3),
            "mean_busiest_share": round(sum(busiest) / len(busiest), 3),
            "calls": calls[0], "failures": dict(failures)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--age-s", type=float, default=5.0)
    p.add_argument("--respread-s", default="0,0.5")  # 1:10 of the age, as the defaults (30 s, 300 s)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    # calls on a recycled connection get 1 s (as when --grace-s set this grace too, which respread.json was run with)
    server = ["--processes", "2", "--max-connection-age-s", str(a.age_s), "--max-connection-age-grace-s", "1",
              "--grace-s", "1"]
    rows = against_spawned(server, lambda target: [run(target, float(r), a.seconds, a.sample_s)
                                                   for _ in range(a.rounds) for r in a.respread_s.split(",")])
    report({"age_s": a.age_s, "seconds": a.seconds, "sample_s": a.sample_s, "rounds": rows}, a.json)


if __name__ == "__main__":
    main()
