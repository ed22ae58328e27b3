"""What old codes cost a server: resident memory as Decompress loads older model versions, under --max-old-versions.

    python benchmarks/old_versions.py --json benchmarks/results/old_versions.json

For each bound, a real `disco serve` (embedded models: dsprites/4 and color_dsprites/1 latest, dsprites/1-3 older)
gets codes made by dsprites/1, 2, 3, 1, 2, 3, ... one Decompress at a time. Recorded after each (and a second's
pause): the server's resident memory, the versions it holds loaded (disco_loaded_versions) and how long that Decompress took (a first
use of a version loads and warms it; a version unloaded earlier pays that again).
"""
from __future__ import annotations

import argparse
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from disco.client import Client
from disco.client.bench import rss_bytes, spawn, sprites

OLD = ("1", "2", "3")
SETTLE_S = 1.0


def gauge(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def run(bound: int, rounds: int) -> dict[str, Any]:
    proc, target, urls = spawn(["--max-old-versions", str(bound)])
    try:
        with Client(target, timeout=120) as c:
            start = rss_bytes(proc.pid)
            codes = {v: c.compress(sprites(4), model="dsprites", version=v) for v in OLD}  # loads each once
            steps = []
            for _ in range(rounds):
                for v in OLD:
                    t0 = time.perf_counter()
                    c.decompress(codes[v])
                    ms = (time.perf_counter() - t0) * 1000
                    time.sleep(SETTLE_S)  # an unloaded version drains and is freed after the answer
                    steps.append({"version": v, "decompress_ms": round(ms, 1), "rss_mib": round(rss_bytes(proc.pid) / 2**20, 1),
                                  "loaded_versions": int(gauge(urls[0], "disco_loaded_versions"))})
            unloads = int(gauge(urls[0], "disco_model_unloads_total"))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"max_old_versions": bound, "rss_start_mib": round(start / 2**20, 1), "steps": steps, "unloads": unloads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bounds", default="0,1,3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="")
    a = p.parse_args()
    results = [run(int(b), a.rounds) for b in a.bounds.split(",")]
    for r in results:
        print(f"--max-old-versions {r['max_old_versions']}: start {r['rss_start_mib']} MiB, {r['unloads']} unloads")
        print("  version  decompress ms  RSS MiB  loaded")
        for s in r["steps"]:
            print(f"  {s['version']:>7}  {s['decompress_ms']:>13}  {s['rss_mib']:>7}  {s['loaded_versions']:>6}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
