"""Why a lone request runs slower in the server than in a warm loop: what a pause before an ONNX Runtime run costs.

    python benchmarks/idle_penalty.py --json benchmarks/results/idle_penalty.json

One single-image encode or decode of the embedded default model (the server's session settings), timed after
each kind of gap; the gaps take turns in blocks of n / rounds runs, so that the machine's drift hits them alike:
- none: back to back;
- sleep N us: the thread sleeps, so the core may go idle (as the server's event loop does between requests at
  concurrency 1, when it waits in epoll for the next one);
- spin N us: the thread stays busy on the CPU for as long, touching little memory;
- thrash N MB: the thread reads N MB first: 4 MB evicts the core's L1 and L2 caches (1 MiB per core on the AMD
  VM this ran on first, 2 MiB on the Intel one), 64 MB much of the last-level cache as well.
Medians over `--n` runs per gap, in microseconds.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from disco.service.repository import EMBEDDED, EMBEDDED_DEFAULT, Repository
from disco.service.runtime import OnnxModel


def gaps(spin_us: list[int], sleep_us: list[int], thrash_mb: list[int]) -> dict[str, Callable[[], None]]:
    def sleep(us: int) -> Callable[[], None]:
        return lambda: time.sleep(us * 1e-6)

    def spin(us: int) -> Callable[[], None]:
        def f() -> None:
            end = time.perf_counter() + us * 1e-6
            while time.perf_counter() < end:
                pass
        return f

    def thrash(mb: int) -> Callable[[], None]:
        junk = np.ones(mb * 2**20 // 8)
        return lambda: float(junk.sum())

    out: dict[str, Callable[[], None]] = {"none": lambda: None}
    out.update({f"spin {us} us": spin(us) for us in spin_us})
    out.update({f"sleep {us} us": sleep(us) for us in sleep_us})
    out.update({f"thrash {mb} MB": thrash(mb) for mb in thrash_mb})
    return out


def measure(run: Callable[[], object], kinds: dict[str, Callable[[], None]], n: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for k, gap in kinds.items():
            for _ in range(n // rounds):
                gap()
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1e6, 1) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="runs per gap")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    e = Repository.load(EMBEDDED).get(EMBEDDED_DEFAULT)
    model = OnnxModel(e.path)
    h, w, c = e.input_shape
    x, z = np.random.rand(1, c, h, w).astype(np.float32), np.zeros((1, e.codec.latent_dim), np.float32)
    kinds = gaps(spin_us=[300, 1000], sleep_us=[100, 300, 1000, 3000], thrash_mb=[4, 64])
    for _ in range(200):
        model.encode(x), model.decode(z)
    result = {"model": f"{e.name}/{e.version}", "runs_per_gap": a.n,
              "encode_us": measure(lambda: model.encode(x), kinds, a.n, a.rounds),
              "decode_us": measure(lambda: model.decode(z), kinds, a.n, a.rounds)}
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
