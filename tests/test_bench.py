"""`disco bench` measures a server beside its limits and writes the JSON the README's table comes from."""
from __future__ import annotations

import json
from pathlib import Path

from disco.client import cli

from conftest import ServerThread


def test_bench_cases_carry_latencies_and_their_limits(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--target", server.target, "--duration", "0.3", "--warmup", "0.1",
                     "--batch-images", "8", "--batched-concurrency", "2", "--single-concurrency", "1,4",
                     "--json", str(out), "--csv", str(tmp_path / "bench.csv")]) == 0
    r = json.loads(out.read_text())
    assert len(r["cases"]) == 6  # 2 directions x (1 batched + 2 single) cases
    for c in r["cases"]:
        assert {"direction", "images_per_request", "concurrency", "p50_ms", "p99_ms", "ratio"} <= set(c)
        assert c["requests"] > 0 and c["p99_ms"] >= c["p50_ms"] > 0
        if c["images_per_request"] > 1:
            assert c["service_images_per_s"] > 0 and c["raw_ort_images_per_s"] > 0
        else:
            assert c["service_requests_per_s"] > 0 and c["noop_requests_per_s"] > 0
    assert (tmp_path / "bench.csv").read_text().count("\n") == 7
