"""`disco bench` measures a server beside its limits and writes the JSON the README's table comes from."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from disco.client import cli

from conftest import ServerThread, serve


def test_bench_cases_carry_latencies_and_their_limits(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--target", server.target, "--duration", "0.3", "--warmup", "0.1",
                     "--batch-images", "8", "--batched-concurrency", "2", "--single-concurrency", "1,4",
                     "--json", str(out), "--csv", str(tmp_path / "bench.csv")]) == 0
    r = json.loads(out.read_text())
    assert len(r["cases"]) == 6  # 2 directions x (1 batched + 2 single) cases
    for c in r["cases"]:
        assert {"direction", "images_per_request", "concurrency", "p50_ms", "p99_ms", "ratio"} <= set(c)
        assert c["requests"] > 0 and c["p99_ms"] >= c["p50_ms"] > 0 and c["rounds"] == 3
        assert len(c["round_ratios"]) == 3 and all(x > 0 for x in c["round_ratios"]) and "stable" not in c
        if c["images_per_request"] > 1:
            assert c["service_images_per_s"] > 0 and c["raw_ort_images_per_s"] > 0
        else:
            assert c["service_requests_per_s"] > 0 and c["noop_requests_per_s"] > 0
    assert all(c["kind"] == "closed" for c in r["cases"]) and r["rate_cases"] == []
    assert (tmp_path / "bench.csv").read_text().count("\n") == 7
    assert r["model"] == "dsprites/4"  # the target's default model, named as the target resolves it


def test_bench_takes_a_list_of_addresses_as_the_sdk_does(server: ServerThread, tmp_path: Path) -> None:
    both = f"{server.target},{server.target}"  # round_robin over the list, here twice the same server
    assert cli.main(["bench", "--target", both, "--duration", "0.2", "--warmup", "0.05", "--rounds", "1",
                     "--batch-images", "0", "--single-concurrency", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert all(c["requests"] > 0 for c in json.loads((tmp_path / "b.json").read_text())["cases"])


def test_bench_measures_a_server_behind_tls_and_a_token(tmp_path: Path, capsys) -> None:
    from certs import make_certs

    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    s = serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), auth_token="sesame")
    base = ["bench", "--target", f"localhost:{s.running.port}", "--duration", "0.2", "--warmup", "0.05", "--rounds",
            "1", "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress"]
    try:
        assert cli.main(base + ["--tls-ca", str(certs / "ca.pem"), "--token", "sesame", "--json",
                                str(tmp_path / "b.json")]) == 0
        (case,) = json.loads((tmp_path / "b.json").read_text())["cases"]
        assert case["requests"] > 0 and case["noop_requests_per_s"] > 0
        with pytest.raises(SystemExit, match="UNAUTHENTICATED"):  # the token is what let it in
            cli.main(base + ["--tls-ca", str(certs / "ca.pem")])
    finally:
        s.stop()
    from disco.client import InsecureTokenWarning

    with pytest.warns(InsecureTokenWarning, match="plaintext"), pytest.raises(SystemExit):  # warned as the SDK warns
        cli.main(["bench", "--target", "[2001:db8::1]:1", "--token", "t", "--batch-images", "0"])  # (nobody there)
    with pytest.raises(SystemExit):  # a spawned server serves plaintext: TLS flags need a --target
        cli.main(["bench", "--tls-ca", str(certs / "ca.pem")])
    assert "are for a running --target" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a missing file is named before anything runs (was a FileNotFoundError traceback)
        cli.main(base + ["--tls-ca", str(tmp_path / "nowhere.pem")])
    assert "No such file or directory" in capsys.readouterr().err


def test_bench_runs_any_model_of_the_target_on_images_from_a_folder(server: ServerThread, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(folder / f"{i}.png")
    images = lambda: server.running.metrics.registry.get_sample_value(  # noqa: E731
        "disco_images_total", {"method": "Compress", "model": "color_dsprites", "version": "1"}) or 0.0
    before, out = images(), tmp_path / "bench.json"
    args = ["bench", "--target", server.target, "--model", "color_dsprites", "--images", str(folder), "--duration", "0.3",
            "--warmup", "0.1", "--batch-images", "4", "--batched-concurrency", "1", "--single-concurrency", "1",
            "--directions", "compress", "--json", str(out)]
    assert cli.main(args) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "color_dsprites/1" and r["images"] == str(folder)
    batched, single = r["cases"]
    assert batched["raw_ort_images_per_s"] > 0 and single["noop_requests_per_s"] > 0
    assert images() - before >= 4 * batched["requests"] + single["requests"]  # the requests went to color_dsprites
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "small.png")
    with pytest.raises(SystemExit, match="small.png is 32x32 .HxW., the model expects 64x64"):
        cli.main(args)
    (folder / "small.png").write_bytes(b"junk")  # was a traceback (UnidentifiedImageError)
    with pytest.raises(SystemExit, match="small.png is not a readable image: cannot identify image file"):
        cli.main(args)
    with pytest.raises(SystemExit, match="cannot run model nope: NOT_FOUND: .*nope"):  # as the target words it
        cli.main(["bench", "--target", server.target, "--model", "nope", "--duration", "0.1"])


def test_stability_adds_rounds_until_the_last_three_agree(server: ServerThread, tmp_path: Path, capsys) -> None:
    from disco.client.bench import stable

    assert stable([0.1, 0.60, 0.62, 0.61], 5) and not stable([0.60, 0.70, 0.61], 5) and not stable([0.6, 0.6], 50)
    out = tmp_path / "bench.json"
    base = ["bench", "--target", server.target, "--duration", "0.2", "--warmup", "0.05", "--batch-images", "0",
            "--single-concurrency", "1", "--directions", "compress", "--rounds", "1", "--json", str(out)]
    assert cli.main(base + ["--stability", "1000", "--max-rounds", "5"]) == 0  # any three agree within 1000%
    (case,) = json.loads(out.read_text())["cases"]
    assert case["rounds"] == 3 and len(case["round_ratios"]) == 3 and case["stable"] is True
    assert cli.main(base + ["--stability", "1e-9", "--max-rounds", "4"]) == 0  # never: stops at the most rounds
    (case,) = json.loads(out.read_text())["cases"]
    assert case["rounds"] == 4 and case["stable"] is False
    assert "/4!" in capsys.readouterr().out  # the table marks a case that never settled
    for bad in (["--stability", "5", "--count", "10"], ["--stability", "5", "--max-rounds", "2"], ["--stability", "-1"],
                ["--stability", "nan"], ["--connections", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(base + bad)
    assert "--connections -1: expected 0 (one per server process) or more" in capsys.readouterr().err
    assert cli.main(base) == 0  # --connections 0 (the default): one per process, here one
    (case,) = json.loads(out.read_text())["cases"]
    assert case["connections"] == 1


@pytest.mark.parametrize("bad, message", [
    (["--duration", "0"], "--duration 0.0: expected a finite number of seconds, above 0"),
    (["--duration", "nan"], "--duration nan: expected a finite number"),  # it hung
    (["--warmup", "-1"], "--warmup -1.0: expected a finite number of seconds, at least 0"),
    (["--single-concurrency", "0"], "every concurrency level must be at least 1"),
    (["--batched-concurrency", "x"], "--batched-concurrency 'x': expected whole numbers of callers"),
    (["--directions", "Compress"], "--directions 'Compress': expected compress, decompress or both"),  # it ran Decompress
    (["--memory-s", "10"], "--memory-s 10.0: expected 0 (no soak) or at least 30 s"),
    (["--batch-images", "0", "--single-concurrency", ""], "no case to measure"),
    (["--json", "."], "--json .: is a folder"),  # found before the run, not after it
    (["--csv", "/proc/no/such/x.csv"], "--csv /proc/no/such/x.csv: cannot be written"),  # it lost the run's results
    (["--count", "-5"], "--count -5: expected 0 (time windows) or a number of requests"),
    (["--count", "9", "--duration", "-1"], "--duration -1.0: expected a finite number of seconds, at least 0"),
    (["--json", "-", "--csv", "-"], "--json - and --csv -: standard output can take one of them"),
    (["--batch-images", "1"], "--batch-images 1: expected 0 (no batched cases) or at least 2"),  # none, unsaid
    # the spawned server listened there, and the bench waited 2 minutes for it on the ports it had chosen
    (["--server-args", "--max-batch 8 --port 5000"], "--server-args: --port: the bench "
     "sets the spawned server's --health-port, --host, --metrics-host, --metrics-port, --port itself"),
    (["--server-args", "--max-batch 8 --health-port=8081"], "--server-args: --health-port: the bench sets the spawned server's"),
    (["--server-args", "--metrics-port=9000 --host 0.0.0.0"], "--server-args: --metrics-port, --host: the bench sets"),
    # no value of --server-args is echoed, whichever check refuses it (a token would reach the logs)
    (["--server-args", "--port 5000 --auth-token s3cret"], "--server-args: --auth-token: a spawned server serves"),
    # the bench's calls are plaintext without a token: every one would be refused
    (["--server-args", "--tls-cert a.pem --auth-token=s3cret --auth-token-file t"], "--server-args: --tls-cert, "
     "--auth-token, --auth-token-file: a spawned server serves plaintext without auth"),  # the token not echoed
    # fewer requests per window than callers: callers sent nothing, and a raw ONNX Runtime window could read 0
    (["--count", "20", "--batch-images", "0", "--single-concurrency", "1,8"], "--count 20: 6 requests per window "
     "(--rounds 3) is fewer than the 8 callers of the largest concurrency; expected at least 24"),
])
def test_bench_flags_are_checked_before_anything_runs(bad: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--target", "127.0.0.1:1", *bad])
    err = capsys.readouterr().err
    assert message in err and "s3cret" not in err


def test_a_spawned_server_ignores_inherited_tls_and_auth_settings(monkeypatch, capsys) -> None:  # noqa: ANN001
    """A shell that exported the server's DISCO_AUTH_TOKEN (or TLS files) gave them to the server the bench spawned,
    which then refused every plaintext, tokenless call of the bench's; one that exported the clients' DISCO_TOKEN
    was refused ("--token is for a running --target")."""
    from disco.client.bench import spawned_env

    assert spawned_env({"DISCO_AUTH_TOKEN": "t", "DISCO_TLS_CERT": "c", "DISCO_TLS_CLIENT_CA": "ca",
                        "DISCO_MAX_BATCH": "8", "PATH": "/bin"}) == {"DISCO_MAX_BATCH": "8", "PATH": "/bin"}
    monkeypatch.setenv("DISCO_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("DISCO_TOKEN", "s3cret")  # the clients' token, for the servers they reach: not a spawned one
    for given in (["--token", "t"], ["--tok", "t"]):  # an abbreviation too: it was dropped without a word
        with pytest.raises(SystemExit):
            cli.main(["bench", *given, "--duration", "0.1"])
        assert "--tls-* and --token are for a running --target" in capsys.readouterr().err
    assert cli.main(["bench", "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress",
                     "--duration", "0.3", "--warmup", "0", "--rounds", "1"]) == 0
    assert "compress" in capsys.readouterr().out


def test_a_spawned_server_ignores_inherited_ports_and_per_process_settings(monkeypatch, capsys) -> None:  # noqa: ANN001
    """A shell that exported a server's DISCO_HEALTH_PORT gave it to the server the bench spawned, whose bind then
    failed while that server held the port; a stale DISCO_PARENT_PID (a setting a --processes server gives its
    processes) made it drain at once; a DISCO_PORT the bench would override, but that does not parse, ended the
    run."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("DISCO_HEALTH_PORT", str(taken.getsockname()[1]))
        monkeypatch.setenv("DISCO_PARENT_PID", "1")  # not this test's process: a server so told drains
        monkeypatch.setenv("DISCO_PORT", "abc")
        assert cli.main(["bench", "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress",
                         "--duration", "0.3", "--warmup", "0", "--rounds", "1"]) == 0
    assert "compress" in capsys.readouterr().out


def test_bench_names_a_request_the_server_refused(tmp_path: Path, capsys) -> None:
    s = serve(max_images_per_request=8)
    try:
        with pytest.raises(SystemExit, match="1"):
            cli.main(["bench", "--target", s.target, "--batch-images", "16", "--single-concurrency", "",
                      "--duration", "0.2", "--warmup", "0", "--rounds", "1", "--csv", str(tmp_path / "new" / "b.csv")])
        assert "a request failed: INVALID_ARGUMENT: request carries 16 images, the limit is 8" in \
            capsys.readouterr().err
        assert cli.main(["bench", "--target", s.target, "--batch-images", "0", "--single-concurrency", "1",
                         "--directions", "compress", "--duration", "0.2", "--warmup", "0", "--rounds", "1",
                         "--csv", str(tmp_path / "new" / "b.csv")]) == 0
        assert len((tmp_path / "new" / "b.csv").read_text().splitlines()) == 2  # its folder made: a header and one case
    finally:
        s.stop()


def test_count_windows_measure_that_many_requests(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # --duration is not read with --count: 0 is taken (it was refused)
    assert cli.main(["bench", "--target", server.target, "--count", "91", "--duration", "0", "--warmup", "0.1",
                     "--batch-images", "4",
                     "--batched-concurrency", "2", "--single-concurrency", "3", "--directions", "compress",
                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["count"] == 91 and r["duration_s"] is None  # recorded what shaped the windows (it said 0.0)
    batched, single = r["cases"]
    for c in (batched, single):  # rounds of 31, 30 and 30 (callers stop starting once a window's count is reached)
        assert c["requests"] == 91 and c["window_s"] > 0
    # window_s is rounded to the microsecond, the rates to a tenth (abs)
    assert single["service_requests_per_s"] == pytest.approx(91 / single["window_s"], rel=1e-3, abs=0.051)
    assert batched["service_images_per_s"] == pytest.approx(4 * 91 / batched["window_s"], rel=1e-3, abs=0.051)
    assert single["noop_requests_per_s"] > 0 and batched["raw_ort_images_per_s"] > 0


def test_count_windows_keep_to_what_the_callers_can_send_without_a_warmup(server: ServerThread, tmp_path: Path) -> None:
    """--count with --warmup 0: a window timed from callers that started together to its count-th start lasted
    about 0 s (32 callers at p50 26 ms read 32,010 req/s). Now a window opens once every caller has had an answer,
    and a count window is the callers' busy time: never more requests per second than the callers over their mean
    latency (Little's law)."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--target", server.target, "--count", "32", "--warmup", "0", "--rounds", "1",
                     "--batch-images", "0", "--single-concurrency", "32", "--directions", "compress",
                     "--json", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["requests"] == 32
    # the rates are rounded to a tenth, the mean latencies to 0.1 us
    assert case["service_requests_per_s"] <= 1.01 * 32 / (case["mean_ms"] / 1000)
    assert case["noop_requests_per_s"] <= 1.01 * 32 / (case["noop_mean_ms"] / 1000)


def test_a_window_faster_than_its_callers_or_empty_is_refused() -> None:
    from disco.client.bench import window_problem
    from disco.client.load import Load

    # 32 callers at 26 ms send at most 1,231 requests/s: 32 requests in 1 ms is a timing error
    assert "32000 requests/s, more than 32 callers" in window_problem(Load([0.026] * 32, 0.001), 32)
    assert window_problem(Load([0.026] * 32, 0.026), 32) == ""
    assert window_problem(Load([], 0.3), 1) == "it timed no request and counted no error"
    assert window_problem(Load([], 0.3, errors={"RESOURCE_EXHAUSTED": 3}), 0) == ""  # overload is a result
    assert window_problem(Load([0.001] * 10, 0.001), 0) == ""  # an open loop sends whatever the answers


def test_a_window_opens_once_every_caller_has_had_an_answer(tmp_path: Path) -> None:
    """An old version loads on its first request (about a second): the window opened after the warm-up's time
    while that call still ran, timed no request, and was reported (service 0, ratio 0, p50 null) with exit 0."""
    s = serve()  # a fresh server: dsprites/2 not loaded yet
    try:
        out = tmp_path / "bench.json"
        assert cli.main(["bench", "--target", s.target, "--model", "dsprites/2", "--duration", "0.1", "--warmup",
                         "0.05", "--rounds", "1", "--batch-images", "0", "--single-concurrency", "4",
                         "--directions", "compress", "--json", str(out)]) == 0
    finally:
        s.stop()
    (case,) = json.loads(out.read_text())["cases"]
    assert case["requests"] > 0 and case["p50_ms"] > 0 and case["service_requests_per_s"] > 0


def test_a_window_that_timed_no_request_fails_the_run(server: ServerThread, tmp_path: Path, capsys) -> None:
    """One send a second, a window of 0.2 s: nothing was sent in it. It was reported (0 requests, p50 null) with
    exit 0; now the run fails there, and the cases before it are written."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--target", server.target, "--duration", "0.2", "--warmup", "0.05", "--rounds", "1",
                     "--batch-images", "0", "--single-concurrency", "1", "--request-rate", "1",
                     "--directions", "compress", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["failed"] == ("a Compress window at 1 requests/s cannot be reported: it timed no request and counted "
                           "no error")
    assert [c["concurrency"] for c in r["cases"]] == [1] and r["cases"][0]["requests"] > 0
    assert "the run stopped there, after 1 case(s)" in capsys.readouterr().err


def test_json_to_standard_output_and_no_nan_in_it(server: ServerThread, capsys) -> None:
    """`--json -` wrote a file named '-', then the JSON after the table on standard output, which a JSON reader
    refused; a figure with nothing to measure was NaN, which JSON parsers refuse. The table now goes to standard
    error when standard output takes the JSON or the CSV."""
    from disco.client.bench import finite

    assert finite({"a": float("nan"), "b": [float("inf"), 1.5], "c": "x"}) == {"a": None, "b": [None, 1.5], "c": "x"}
    base = ["bench", "--target", server.target, "--count", "20", "--warmup", "0.05", "--batch-images", "0",
            "--single-concurrency", "1", "--directions", "compress", "--rounds", "1"]
    assert cli.main(base + ["--json", "-"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # nothing else
    assert result["cases"][0]["requests"] == 20 and not Path("-").exists()
    assert "p50 ms" in printed.err  # the table
    assert cli.main(base + ["--csv", "-"]) == 0
    printed = capsys.readouterr()
    assert len(printed.out.splitlines()) == 2 and "direction" in printed.out.splitlines()[0] and "p50 ms" in printed.err


def test_a_spawned_server_that_does_not_start_is_named_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"did not become ready:\n.*no loadable model"):
        cli.main(["bench", "--repository", str(tmp_path), "--duration", "0.1"])


def test_open_loop_sends_at_the_rate_asked(server: ServerThread, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--target", server.target, "--duration", "1", "--warmup", "0.1", "--batch-images", "0",
                     "--single-concurrency", "", "--request-rate", "200", "--request-distribution", "poisson",
                     "--json", str(out), "--csv", str(tmp_path / "bench.csv")]) == 0
    r = json.loads(out.read_text())
    # Open-loop cases were in `cases` beside the closed-loop ones, without their limit, ratio and target, and with
    # `concurrency` meaning the most calls in flight: each kind has its list now, and says its kind.
    cases = r["rate_cases"]
    assert r["cases"] == [] and [c["direction"] for c in cases] == ["compress", "decompress"]
    for c in cases:
        # A poisson schedule of 200/s for 1 s: about 200 sends (the bounds hold with near certainty), all answered.
        assert c["kind"] == "open" and "concurrency" not in c
        assert c["request_rate"] == 200 and c["distribution"] == "poisson" and not c["errors"]
        assert 140 <= c["requests"] <= 260 and c["p99_ms"] >= c["p50_ms"] > 0
        assert c["peak_in_flight"] >= 1 and c["send_lag_p99_ms"] >= 0
    import csv

    rows = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    assert [row["kind"] for row in rows] == ["open", "open"]
    assert "open loop, single-image requests sent at a rate (poisson gaps)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--target", server.target, "--request-rate", "0"])
    assert "every rate must be above 0" in capsys.readouterr().err


def test_an_open_loop_count_window_reads_the_rate_it_sent(server: ServerThread, tmp_path: Path) -> None:
    """A review: n sends span n gaps of the schedule, but the window was timed to the last send, n - 1 gaps: 3 sends
    at 10 per second read as 14.6 per second, more than was sent. And --count below --rounds was refused for an open
    loop, which sends the whole count in no rounds."""
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--target", server.target, "--batch-images", "0", "--single-concurrency", "",
                     "--request-rate", "10", "--count", "2", "--directions", "compress", "--warmup", "0.05",
                     "--json", str(out)]) == 0
    (case,) = json.loads(out.read_text())["rate_cases"]
    assert case["requests"] == 2 and 0.2 <= case["window_s"] < 0.5, case
    assert 4 < case["service_requests_per_s"] <= 10.0, case


def test_bench_breaks_each_case_down_from_the_server_metrics(tmp_path: Path) -> None:
    from disco.client.bench import free_port

    port = free_port()
    s = serve(metrics_port=port)
    try:
        out = tmp_path / "bench.json"
        assert cli.main(["bench", "--target", s.target, "--metrics-url", f"http://127.0.0.1:{port}/metrics",
                         "--duration", "0.3", "--rounds", "1", "--warmup", "0.1", "--batch-images", "8",
                         "--batched-concurrency", "2",
                         "--single-concurrency", "1", "--directions", "decompress", "--json", str(out)]) == 0
    finally:
        s.stop()
    batched, single = json.loads(out.read_text())["cases"]
    for c in (batched, single):
        # The handler holds the compute; a batch never has fewer rows than one request's share.
        assert 0 < c["server_compute_ms"] <= c["server_handler_ms"] <= c["mean_ms"]
        assert c["mean_batch_rows"] >= 1
    assert batched["mean_batch_rows"] >= 8  # 8-image requests, each one run at least
    for c in (batched, single):  # a quiet target: every request the server counted was the bench's
        assert "other_requests" not in c and "noop_other_requests" not in c
    # Present and sane, not compared: which handler was faster in a 0.3 s window is a timing, not a property.
    assert single["noop_handler_ms"] > 0
    assert 0 < single["ideal_ratio"] <= 1
    # CPU accounting (this server runs in the test's process, so its CPU holds the load generator's as well).
    for c in (batched, single):
        assert c["server_cpu_ms"] > 0 and c["client_cpu_ms"] > 0 and c["cores_used"] > 0
    assert single["noop_server_cpu_ms"] > 0 and 0 < single["cpu_ceiling_ratio"] < 1
    assert "cpu_bound_ratio" not in single  # a --target's cores are not known to be this machine's
    # The event loop's thread: part of the process's CPU, never more than one core (10 ms ticks of slack).
    for c in (batched, single):
        assert 0 < c["server_loop_ms"] and 0 < c["loop_cores"] <= 1.1
    assert single["noop_server_loop_ms"] > 0 and 0 < single["noop_loop_cores"] <= 1.1


def test_a_spawned_server_is_bounded_on_every_core_the_load_generator_shares(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Without --target the bench spawns the server on this machine: beside the ceiling (the NoOp's CPU plus the
    compute's, on the cores the NoOp kept busy) it reports the bound on all of them, which the NoOp leaves partly idle."""
    from disco.service.config import available_cores

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--duration", "0.3", "--rounds", "1", "--warmup", "0.1", "--batch-images", "0",
                     "--single-concurrency", "1", "--directions", "compress", "--json", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    cores = available_cores()
    assert case["cpu_bound_ratio"] == pytest.approx(case["cpu_ceiling_ratio"] * cores / case["noop_cores_used"], rel=0.01)
    if cores > 1:  # one caller at a time keeps fewer than all the cores busy
        assert case["cpu_bound_ratio"] > case["cpu_ceiling_ratio"]
    printed = capsys.readouterr().out
    assert " bound " in printed and f"{case['cpu_bound_ratio']:.2f}" in printed.split("where the time goes")[1]


def test_bench_says_when_the_target_served_requests_it_did_not_send(tmp_path: Path, capsys) -> None:
    from disco.client import Client
    from disco.client.bench import free_port, sprites

    port = free_port()
    s = serve(metrics_port=port)
    stop = threading.Event()

    def other_traffic() -> None:
        with Client(s.target) as c:
            codes = c.compress(sprites(1))
            while not stop.is_set():
                c.decompress(codes)

    t = threading.Thread(target=other_traffic)
    t.start()
    try:
        out = tmp_path / "bench.json"
        assert cli.main(["bench", "--target", s.target, "--metrics-url", f"http://127.0.0.1:{port}/metrics",
                         "--duration", "0.5", "--rounds", "1", "--warmup", "0.1", "--batch-images", "0",
                         "--single-concurrency", "1", "--directions", "compress,decompress", "--json", str(out)]) == 0
    finally:
        stop.set()
        t.join()
        s.stop()
    compress, decompress = json.loads(out.read_text())["cases"]
    assert "other_requests" not in compress and decompress["other_requests"] > 10
    assert "note: during the decompress case at concurrency 1 the target answered" in capsys.readouterr().out


def test_breakdown_takes_means_between_two_scrapes_of_one_direction() -> None:
    from disco.client.bench import breakdown, parse_metrics

    def exposition(requests: int, handler_s: float, extra_model: bool) -> str:
        lines = [
            f'disco_request_duration_seconds_count{{method="Decompress"}} {requests}',
            f'disco_request_duration_seconds_sum{{method="Decompress"}} {handler_s}',
            'disco_request_duration_seconds_count{method="NoOp"} 5',
            'disco_request_duration_seconds_sum{method="NoOp"} 0.5',
            'disco_compute_duration_seconds_count{batcher="a/1/decode"} 2',
            'disco_compute_duration_seconds_sum{batcher="a/1/decode"} 0.2',
            'disco_compute_duration_seconds_sum{batcher="a/1/encode"} 9.0',
            'disco_queue_duration_seconds_count{batcher="a/1/decode"} 4',
            'disco_queue_duration_seconds_sum{batcher="a/1/decode"} 0.04',
            'disco_batch_size_count{batcher="a/1/decode"} 2',
            'disco_batch_size_sum{batcher="a/1/decode"} 10',
            f'process_cpu_seconds_total {2 * handler_s}',
            f'disco_event_loop_cpu_seconds_total {handler_s}',
        ]
        if extra_model:  # a version loaded between the scrapes: absent before, counted from zero
            lines += ['disco_compute_duration_seconds_sum{batcher="a/2/decode"} 0.3',
                      'disco_batch_size_count{batcher="a/2/decode"} 1', 'disco_batch_size_sum{batcher="a/2/decode"} 6']
        return "\n".join(lines) + "\n"

    before = parse_metrics(exposition(10, 1.0, extra_model=False))
    after = parse_metrics(exposition(20, 3.0, extra_model=True))
    b = breakdown(before, after, "Decompress", "decompress")
    only_a1 = breakdown(before, after, "Decompress", "decompress", model="a/1")
    assert only_a1["server_compute_ms"] == 0.0 and math.isnan(only_a1["mean_batch_rows"])  # a/2's runs are not a/1's
    after_xa = parse_metrics(exposition(20, 3.0, extra_model=False) + 'disco_batch_size_count{batcher="xa/1/decode"} 3\n')
    assert math.isnan(breakdown(before, after_xa, "Decompress", "decompress", model="a/1")["mean_batch_rows"])
    # 10 more requests took 2 s in the handler; the decoders computed 0.3 s more (the new version); 1 run of 6 rows
    assert (b["server_handler_ms"], b["server_compute_ms"], b["mean_batch_rows"]) == (200.0, 30.0, 6.0)
    assert b["server_cpu_ms"] == 400.0  # 4 s more of process CPU over the 10 requests
    assert b["server_loop_ms"] == 200.0  # 2 s of it on the event loop's thread
    assert math.isnan(b["server_queue_ms_per_part"])  # no part queued between the scrapes
    assert breakdown(before, before, "Decompress", "decompress") == {}  # no request between the scrapes


def test_bench_and_sdk_spread_connections_over_the_processes_of_a_reuseport_server(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`disco serve --processes 2`: two processes on one port. --connections lets the bench load both (spread
    evenly: ListModels says which process a connection reached), and its breakdown sums both processes' metrics
    and says how the calls split; Client(connections=N) reaches both as well."""
    from disco.client import AsyncClient, Client
    from disco.client.bench import parse_metrics, spawn, sprites
    from disco.client.load import Endpoint
    from disco.v1 import codec_pb2, codec_pb2_grpc

    proc, target, urls = spawn(["--processes", "2", "--max-batch", "4"])  # ready on both processes

    def served() -> list[float]:
        counts = []
        for url in urls:
            with urllib.request.urlopen(url, timeout=5) as r:
                counts.append(parse_metrics(r.read().decode()).get(("disco_request_duration_seconds_count", "Compress"), 0))
        return counts

    async def spread(n: int) -> list[tuple[str, int]]:
        chans = await Endpoint(target).spread(n)
        try:
            return [((r := await codec_pb2_grpc.CodecStub(ch).ListModels(codec_pb2.ListModelsRequest())).server_instance,
                     r.server_processes) for ch in chans]
        finally:
            for ch in chans:
                await ch.close()

    try:
        assert len(urls) == 2
        for _ in range(3):  # unspread, 4 connections would land 2:2 only 3 times in 8
            at = asyncio.run(spread(4))
            assert sorted(Counter(i for i, _ in at).values()) == [2, 2] and {n for _, n in at} == {2}, at
        out = tmp_path / "bench.json"
        assert cli.main(["bench", "--target", target, "--metrics-url", ",".join(urls), "--connections", "16",
                         "--duration", "0.5", "--rounds", "1", "--warmup", "0.2", "--batch-images", "0",
                         "--single-concurrency", "16",
                         "--directions", "compress", "--json", str(out)]) == 0
        (case,) = json.loads(out.read_text())["cases"]
        assert case["requests"] > 0 and 0 < case["server_compute_ms"] <= case["server_handler_ms"]
        # 16 connections hashed over 2 sockets all land on one with probability 2**-15.
        by_bench = served()
        assert all(n > 0 for n in by_bench), by_bench
        for key in ("process_shares", "noop_process_shares"):  # each process's share of the window's calls
            assert len(case[key]) == 2 and all(x > 0 for x in case[key]) and sum(case[key]) == pytest.approx(1, abs=0.01)
        shares = " / ".join(f"{x:.2f}" for x in case["process_shares"])
        assert f"server processes answered {shares} of its requests" in capsys.readouterr().out
        with pytest.raises(SystemExit):  # a review: one process's /metrics of two gave half a breakdown, no word said
            cli.main(["bench", "--target", target, "--metrics-url", urls[0], "--duration", "0.5", "--rounds", "1",
                      "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress"])
        assert "--metrics-url names 1 /metrics, and the target runs 2 processes" in capsys.readouterr().err
        with Client(target, connections=16) as c:  # one request per connection, round robin
            assert sorted(Counter(c.spread()).values()) == [8, 8]  # spread as it started: each process has 8
            assert c.health()  # asked over all 16 connections, so of both processes
            x = sprites(1)
            for _ in range(16):
                assert len(c.compress(x)) == 1
        by_sdk = [after - before for before, after in zip(by_bench, served())]
        assert by_sdk == [8, 8], by_sdk
        # Without --connections the bench opens one per process: both processes serve.
        assert cli.main(["bench", "--target", target, "--metrics-url", ",".join(urls), "--duration", "0.3", "--rounds", "1",
                         "--warmup", "0.1", "--batch-images", "0", "--single-concurrency", "4", "--directions", "compress",
                         "--json", str(out)]) == 0
        (case,) = json.loads(out.read_text())["cases"]
        assert case["connections"] == 2 and all(x > 0 for x in case["process_shares"]), case

        async def async_spread() -> list[str]:
            async with AsyncClient(target, connections=4) as ac:
                return await ac.spread()

        assert sorted(Counter(asyncio.run(async_spread())).values()) == [2, 2]
        # An open-loop case has a rate, not a concurrency: its note raised KeyError, and the run wrote nothing
        assert cli.main(["bench", "--target", target, "--metrics-url", ",".join(urls), "--duration", "0.5",
                         "--warmup", "0.1", "--batch-images", "0", "--single-concurrency", "", "--request-rate", "50",
                         "--directions", "compress", "--json", str(out)]) == 0
        (rate,) = json.loads(out.read_text())["rate_cases"]
        assert len(rate["process_shares"]) == 2
        assert "compress case with 1 images per request at 50 requests/s: server processes answered" in \
            capsys.readouterr().out
    finally:
        proc.terminate()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0  # SIGTERM reaches both processes, which drain and exit cleanly


def test_connections_are_replaced_until_they_spread_evenly_over_the_processes() -> None:
    from disco.client._transport import to_replace

    assert to_replace([("a", 2), ("a", 2), ("b", 2), ("b", 2)]) is None
    assert to_replace([("a", 2), ("b", 2), ("a", 2)]) is None  # 3 over 2: one more on one is even enough
    assert to_replace([("a", 2), ("b", 2), ("b", 2), ("b", 2)]) == 1  # one on the busiest process
    assert to_replace([("a", 3), ("a", 3)]) == 0  # the third process is unseen, but two connections can reach two
    assert to_replace([("a", 3), ("b", 3)]) is None
    assert to_replace([("a", 1), ("a", 1)]) is None and to_replace([("", 0), ("", 0)]) is None  # one process, or unsaid


def test_a_clients_first_spread_keeps_within_its_timeout() -> None:
    """A server that accepts connections and never answers (a hung process): the constructor's spread waited its
    whole 5 s whatever the client's timeout."""
    import socket

    from disco.client import AsyncClient, Client

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        target = f"127.0.0.1:{hung.getsockname()[1]}"
        t0 = time.monotonic()
        Client(target, connections=2, timeout=0.5).close()
        assert time.monotonic() - t0 < 3

        async def enter() -> None:
            async with AsyncClient(target, connections=2, timeout=0.5):
                pass

        t0 = time.monotonic()
        asyncio.run(enter())
        assert time.monotonic() - t0 < 3


def test_clients_spread_their_connections_again_while_calls_run_and_none_fails() -> None:
    """The server recycles connections (--max-connection-age-s) and the kernel hashes each new one to a process
    afresh, so a spread made at the start does not last. Client and AsyncClient spread again every respread_s,
    in the background, while calls run on every connection; a replaced connection closes only once the calls
    begun on it are over, so none of them fails. Here one connection is moved to the busier process (3:1), as
    a recycle may move it, and each client must bring its connections back to 2:2 under load."""
    from disco.client import AsyncClient, Client
    from disco.client._transport import async_channel, sync_channel
    from disco.client.bench import spawn, sprites
    from disco.v1 import codec_pb2, codec_pb2_grpc

    proc, target, _ = spawn(["--processes", "2", "--max-batch", "4"])
    x = sprites(1)

    def at(channel: Any) -> str:
        return codec_pb2_grpc.CodecStub(channel).ListModels(codec_pb2.ListModelsRequest(), timeout=5).server_instance

    try:
        with Client(target, connections=4, respread_s=0.2) as c:
            with c._spreading:  # no re-spread meanwhile
                where = [at(ch) for ch in c._channels]
                assert sorted(Counter(where).values()) == [2, 2], where  # spread as the client started
                ch = sync_channel(c._channel_config)  # lands on a process that holds two already
                k = next(i for i, w in enumerate(where) if w != at(ch))  # in place of one on the other
                old, c._channels[k] = c._channels[k], ch
                c._stubs[k] = codec_pb2_grpc.CodecStub(ch)
                old.close()
                assert sorted(Counter(at(ch) for ch in c._channels).values()) == [1, 3]
            errors: list[BaseException] = []
            calls = [0]
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        c.decompress(c.compress(x))
                        calls[0] += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is reported below
                        errors.append(exc)

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + 20
                while sorted(Counter(at(ch) for ch in c._channels).values()) != [2, 2]:
                    assert time.monotonic() < deadline, "the client did not spread its connections again"
                    time.sleep(0.1)
                time.sleep(0.5)  # more calls across the re-spread connections
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert not errors and calls[0] > 0, (errors[:3], calls)

        async def async_client() -> None:
            async def at_async(channel: Any) -> str:
                r = await codec_pb2_grpc.CodecStub(channel).ListModels(codec_pb2.ListModelsRequest(), timeout=5)
                return r.server_instance

            async with AsyncClient(target, connections=4, respread_s=0.2) as ac:
                async with ac._spreading:
                    where = [await at_async(ch) for ch in ac._channels]
                    assert sorted(Counter(where).values()) == [2, 2], where
                    ch = async_channel(ac._channel_config)
                    landed = await at_async(ch)
                    k = next(i for i, w in enumerate(where) if w != landed)
                    old, ac._channels[k] = ac._channels[k], ch
                    ac._stubs[k] = codec_pb2_grpc.CodecStub(ch)
                    await old.close()

                async def load(until: float) -> int:
                    n = 0
                    while time.monotonic() < until:
                        await ac.decompress(await ac.compress(x))
                        n += 1
                    return n

                deadline = time.monotonic() + 20
                while sorted(Counter([await at_async(ch) for ch in ac._channels]).values()) != [2, 2]:
                    assert time.monotonic() < deadline, "the async client did not spread its connections again"
                    assert sum(await asyncio.gather(*(load(time.monotonic() + 0.3) for _ in range(4)))) > 0
                assert sum(await asyncio.gather(*(load(time.monotonic() + 0.5) for _ in range(4)))) > 0

        asyncio.run(async_client())
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_reuseport_process_that_fails_stops_the_others() -> None:
    """`disco serve --processes 2` whose second process cannot start (its metrics port is taken): the first
    stops too and the command exits non-zero, instead of serving half the port with ListModels counting two."""
    import socket

    from disco.client.bench import free_port, free_ports

    port, metrics = free_port(), free_ports(2)  # metrics + 1 was free a moment ago too
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", metrics + 1))  # process 1's metrics port
        taken.listen()
    except OSError:
        taken.close()  # left to the garbage collector, its ResourceWarning failed a later test (filterwarnings=error)
        pytest.skip(f"port {metrics + 1} is in use")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--processes", "2", "--host", "127.0.0.1",
                                 "--port", str(port), "--metrics-port", str(metrics), "--max-batch", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    finally:
        taken.close()
    assert proc.returncode != 0, out
    assert f"could not serve metrics on port {metrics + 1}" in out and "stopping the others" in out, out


def test_a_failed_request_keeps_the_cases_measured_before_it(tmp_path: Path, capsys, monkeypatch) -> None:
    """A request that fails ends the run, but the cases measured before it are printed and written, the run marked
    failed (exit 1): one failure lost a long run's results."""
    from disco.client import bench

    s = serve()
    measure = bench.run_case

    def then_stop(*args: Any) -> dict[str, Any]:  # the server goes away once the first case is measured
        case = measure(*args)
        s.stop()
        return case

    monkeypatch.setattr(bench, "run_case", then_stop)
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--target", s.target, "--batch-images", "0", "--single-concurrency", "1,2",
                     "--directions", "compress", "--duration", "0.2", "--warmup", "0.05", "--rounds", "1",
                     "--json", str(out), "--csv", str(tmp_path / "b.csv")]) == 1
    err = capsys.readouterr().err
    assert "a request failed: UNAVAILABLE" in err and "after 1 case(s)" in err, err
    r = json.loads(out.read_text())
    assert [c["concurrency"] for c in r["cases"]] == [1] and r["cases"][0]["requests"] > 0
    assert r["failed"].startswith("a request failed: UNAVAILABLE")
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 2


def test_the_noop_moves_the_same_bytes_each_way_as_the_call_it_is_measured_beside(server: ServerThread) -> None:
    """A single-image Decompress answers a 4 KiB image; its NoOp once carried the codes and answered nothing, so
    the ratio set the service's 4 KiB answers against none. Now each NoOp carries the measured request and
    answers as many bytes as that call did; a size past the message limit is refused before it is made."""
    import grpc

    from disco.client.bench import Inputs, noop_request, requests_for, resolve_inputs
    from disco.v1 import codec_pb2 as pb
    from disco.v1 import codec_pb2_grpc

    inputs: Inputs = resolve_inputs(server.target, "", None, 1)
    with grpc.insecure_channel(server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        for method in ("Compress", "Decompress"):
            req = requests_for(server.target, inputs, method.lower(), 1)
            answer = getattr(stub, method)(req, timeout=10)
            noop = noop_request(server.target, method, req)
            assert noop.payload == req.SerializeToString() and noop.response_bytes == answer.ByteSize()
            assert abs(stub.NoOp(noop, timeout=10).ByteSize() - answer.ByteSize()) <= 4  # the field's tag and length
        assert answer.ByteSize() > 4096  # Decompress's: the image
        # a few bytes asking the server to hold many: bounded by one image of the largest model and 1 MiB
        assert stub.NoOp(pb.NoOpRequest(response_bytes=2**20 + 64 * 64 * 3), timeout=10).payload == bytes(2**20 + 12288)
        for n in (2**20 + 64 * 64 * 3 + 1, 2**32 - 1):
            with pytest.raises(grpc.RpcError) as info:
                stub.NoOp(pb.NoOpRequest(response_bytes=n), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"response_bytes {n} is more" in info.value.details()


def test_a_server_that_dies_during_an_open_loop_fails_the_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """The open loop counted every error code as a result: a server that died during it was reported as a case
    with UNAVAILABLE errors, exit 0. Only overload (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is a result now; any
    other code ends the run failed, with the cases before it written."""
    from disco.client import bench

    s = serve()
    measure = bench.run_case
    stopping: list[threading.Timer] = []

    def then_stop(*args: Any) -> dict[str, Any]:  # the server goes away during the open loop's window
        case = measure(*args)
        stopping.append(threading.Timer(0.3, s.stop))
        stopping[0].start()
        return case

    monkeypatch.setattr(bench, "run_case", then_stop)
    out = tmp_path / "b.json"
    try:
        assert cli.main(["bench", "--target", s.target, "--batch-images", "0", "--single-concurrency", "1",
                         "--request-rate", "200", "--directions", "compress", "--duration", "1", "--warmup", "0.05",
                         "--rounds", "1", "--json", str(out)]) == 1
    finally:
        for t in stopping:
            t.join()
    err = capsys.readouterr().err
    assert "a request failed: UNAVAILABLE" in err and "after 1 case(s)" in err, err
    r = json.loads(out.read_text())
    assert r["failed"].startswith("a request failed: UNAVAILABLE")
    assert [c["concurrency"] for c in r["cases"]] == [1] and r["rate_cases"] == []


def test_a_metrics_url_that_is_not_a_disco_servers_is_named_before_the_run(server: ServerThread, capsys) -> None:
    """--metrics-url at the gRPC port, or at an HTML page: a traceback (http.client.BadStatusLine, the parser's
    ValueError) at the first window's scrape, which lost the cases measured before it. Now each URL is read once
    before the run and named with what was expected; a scrape that fails later drops only the breakdown."""
    import http.server

    from disco.client.bench import scrape

    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b"# TYPE other_total counter\nother_total 1\n" if self.path == "/other" else \
                b"<!DOCTYPE html>\n<html><body>hello</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    www = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    t = threading.Thread(target=www.serve_forever, daemon=True)
    t.start()
    pages = f"http://127.0.0.1:{www.server_address[1]}"
    try:
        for url, why in ((f"http://{server.target}/metrics", "did not answer as an HTTP/1.1 server"),
                         (f"{pages}/", "is not Prometheus text"),
                         (f"{pages}/other", "serves Prometheus metrics, but not a disco server's")):
            if "/other" not in url:
                assert scrape([url]) is None  # was the traceback
                assert f"no server-side breakdown: {url} {why}" in capsys.readouterr().err
            with pytest.raises(SystemExit):
                cli.main(["bench", "--target", server.target, "--metrics-url", url, "--duration", "0.1",
                          "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress"])
            err = capsys.readouterr().err
            assert f"--metrics-url: {url} {why}" in err and "expected the /metrics of each process" in err, err
    finally:
        www.shutdown()
        www.server_close()
        t.join()


def test_outputs_are_written_whole_and_only_by_a_run_that_reports(server: ServerThread, tmp_path: Path) -> None:
    """The flag check made the --json and --csv files (open(path, "a")), so a run that failed before its first
    case left them empty; and they were written in place, so a reader could see half of one, and a write that
    failed lost the old one. Now nothing is made before the results, which replace the old file whole."""
    json_out, csv_out = tmp_path / "new" / "b.json", tmp_path / "b.csv"
    with pytest.raises(SystemExit, match="cannot run model nope"):  # fails before its first case
        cli.main(["bench", "--target", server.target, "--model", "nope", "--json", str(json_out), "--csv", str(csv_out)])
    assert not json_out.exists() and not json_out.parent.exists() and not csv_out.exists()
    csv_out.write_text("old results\n")
    with open(csv_out) as reader:  # a reader of the old file
        assert cli.main(["bench", "--target", server.target, "--duration", "0.1", "--warmup", "0.05", "--rounds", "1",
                         "--batch-images", "0", "--single-concurrency", "1", "--directions", "compress",
                         "--json", str(json_out), "--csv", str(csv_out)]) == 0
        assert reader.read() == "old results\n"  # still the old file, whole: the new one was renamed over it
    assert "direction" in csv_out.read_text().splitlines()[0] and json.loads(json_out.read_text())["cases"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.csv", "b.json", "new"]  # no part file left


def test_bench_help_says_what_each_flag_does(capsys) -> None:
    """--directions, --csv and --json had no help; --warmup said 'before each window', though later rounds warm
    up for at most 0.2 s."""
    with pytest.raises(SystemExit, match="0"):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "the methods measured: compress, decompress or both" in text
    assert "later rounds warm up for the least of it and 0.2 s" in text and "before each window" not in text
    for flag in ("--csv", "--json"):
        assert f"{flag} {flag.upper()[2:]} also write" in text
    assert "('-': standard output, the table then going to standard error)" in text


def test_outputs_to_a_pipe_or_through_a_link_are_written_where_they_point(tmp_path: Path) -> None:
    """Written beside and renamed over, a named pipe's reader got nothing (the pipe became a file), a link became a
    file of its own (its target kept the old results), and a shell's >(...) (/dev/fd/N) was refused."""
    import os

    from disco.client.bench import unwritable, write

    target, link, fifo = tmp_path / "target.json", tmp_path / "link.json", tmp_path / "fifo"
    target.write_text("old")
    link.symlink_to(target)
    assert unwritable(link) == "" and unwritable(fifo) == ""
    write(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write(fifo, "piped")
    reader.join(10)
    assert got == ["piped"] and fifo.is_fifo()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "cannot be resolved" in unwritable(loop)
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    with open(log, "a") as appended:  # `>> log.txt`, handed on as /dev/fd/N: written through, not replaced
        write(Path(f"/dev/fd/{appended.fileno()}"), "later\n")
    assert log.read_text() == "earlier\nlater\n"
    r, w = os.pipe()  # what bash's >(...) hands over: /dev/fd/N
    try:
        assert unwritable(Path(f"/dev/fd/{w}")) == ""
        write(Path(f"/dev/fd/{w}"), "fd")
        assert os.read(r, 10) == b"fd"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("when", ["warming", "running"])
def test_sigterm_to_the_bench_alone_stops_the_server_it_spawned(when: str) -> None:
    """A review: `kill <bench pid>` ended the bench (status 143) and left its spawned server serving, orphaned, on its
    ports (Ctrl-C and `timeout` reach the whole process group; a lone SIGTERM had no handler to run the cleanup).
    Sent while the server warms up, or during a window."""
    import signal

    bench = subprocess.Popen([sys.executable, "-m", "disco.client.cli", "bench", "--batch-images", "0",
                              "--single-concurrency", "1", "--directions", "compress", "--duration", "30",
                              "--warmup", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    deadline = time.monotonic() + 60
    try:
        while not children.read_text().split():
            assert time.monotonic() < deadline and bench.poll() is None
            time.sleep(0.05)
        (server,) = map(int, children.read_text().split())
        time.sleep(0.3 if when == "warming" else 8)  # the embedded models warm up in about 2 s here
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
        assert bench.returncode == 143, err.decode()[-2000:]
        assert b"disco bench: terminated" in err
        assert not Path(f"/proc/{server}").exists() or "zombie" in Path(f"/proc/{server}/status").read_text()
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
