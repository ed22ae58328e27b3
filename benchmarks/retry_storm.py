"""A retry storm: N concurrent SDK calls that retry the calls an overloaded server sheds, with and without the
client's retry budget (RetryPolicy.budget_tokens, gRPC's retry throttling).

    python benchmarks/retry_storm.py --json benchmarks/results/retry_storm.json

One server (`--server-args`, by default `--max-pending-rpcs 100`: gRPC core refuses calls beyond 100 waiting with
CANCELLED), and for each budget an AsyncClient sends `--n` single-image Compress calls at once with
RetryPolicy(on_resource_exhausted=True, max_attempts, base_s, cap_s). Reported per round: seconds until every call
ended, calls answered OK, failures by error, and refused attempts (each one the server paid for). Budgets alternate
over `--rounds`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disco.client import AsyncClient, RetryPolicy
from disco.client.bench import spawn, sprites

REFUSED = [0]  # attempts that failed: the client draws a backoff once per failed attempt (checked below)


@dataclass(frozen=True, kw_only=True)
class _Counted(RetryPolicy):
    def backoff(self, attempt: int) -> float:
        REFUSED[0] += 1
        return super().backoff(attempt)


async def storm(target: str, n: int, policy: RetryPolicy) -> dict[str, Any]:
    x = sprites(1)
    REFUSED[0] = 0
    async with AsyncClient(target, retry=policy, timeout=120) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(c.compress(x) for _ in range(n)), return_exceptions=True)
        seconds = time.perf_counter() - t0
    failed = Counter(f"{type(r).__name__}: {getattr(r, 'code', '')}" for r in results if isinstance(r, BaseException))
    if REFUSED[0] < sum(failed.values()):  # every failed call had a failed attempt: the count has lost its hook
        raise RuntimeError(f"{REFUSED[0]} refused attempts counted for {sum(failed.values())} failed calls")
    return {"seconds": round(seconds, 2), "ok": n - sum(failed.values()), "failed": dict(failed),
            "refused_attempts": REFUSED[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1500, help="concurrent calls per storm")
    p.add_argument("--max-attempts", type=int, default=100)
    p.add_argument("--base-s", type=float, default=0.01)
    p.add_argument("--cap-s", type=float, default=1.0)
    p.add_argument("--budgets", default="0,10,100", help="RetryPolicy.budget_tokens values, comma-separated (0: off)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--server-args", default="--max-pending-rpcs 100")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    budgets = [float(b) for b in a.budgets.split(",")]
    proc, target, _ = spawn(a.server_args.split())
    runs: list[dict[str, Any]] = []
    try:
        for r in range(a.rounds):
            for budget in budgets:
                policy = _Counted(on_resource_exhausted=True, max_attempts=a.max_attempts, base_s=a.base_s,
                                  cap_s=a.cap_s, budget_tokens=budget)
                runs.append({"round": r, "budget_tokens": budget, **asyncio.run(storm(target, a.n, policy))})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"n": a.n, "max_attempts": a.max_attempts, "base_s": a.base_s, "cap_s": a.cap_s,
              "server_args": a.server_args, "runs": runs}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
