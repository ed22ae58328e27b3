"""Production behaviour against the real server: deadlines and cancellation in the queue, a full
queue, hot reload under load, old codes after a new version ships, drain on SIGTERM, metrics."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest

from disco.client import Client, RetryPolicy
from disco.client.errors import InvalidArgument, Unavailable
from disco.service.repository import EMBEDDED, Repository
from disco.client.bench import free_port
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from conftest import ServerThread, serve


# The encoder batcher of the embedded default model (its latest version).
ENCODER = f"dsprites/{Repository.load(EMBEDDED).get('dsprites').version}/encode"


def rows_computed(s: ServerThread, batcher: str = ENCODER) -> float:
    return s.running.metrics.registry.get_sample_value("disco_batch_size_sum", {"batcher": batcher}) or 0.0


def tensor(a: np.ndarray) -> pb.Images:
    return pb.Images(tensor=pb.Tensor(data=a.tobytes(), shape=list(a.shape), dtype=pb.DTYPE_UINT8))


@pytest.fixture(scope="module")
def busy_server():
    """One ONNX Runtime run at a time, so a big request holds the queue long enough to observe."""
    s = serve(max_batch=32, batch_workers=1, workers=1, max_queue=16384, max_images_per_request=16384)
    yield s
    s.stop()


HOG = 12_000  # images that keep the single ONNX Runtime worker busy for about a second


def wait_until_queued(s: ServerThread, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not s.running.metrics.registry.get_sample_value("disco_queue_depth", {"batcher": ENCODER}):
        assert time.monotonic() < deadline, "the big request never reached the queue"
        time.sleep(0.005)


def big(sprites, n: int) -> np.ndarray:
    return np.concatenate([sprites[0]] * (n // len(sprites[0]) + 1))[:n]


def start_hog(stub, s: ServerThread, sprites) -> grpc.Future:  # noqa: ANN001
    """A big Compress that keeps the single ONNX Runtime worker busy; returns once it is queued."""
    hog = stub.Compress.future(pb.CompressRequest(images=tensor(big(sprites, HOG))), timeout=60)
    wait_until_queued(s)
    return hog


def test_deadline_passing_in_the_queue_is_dropped_before_compute(busy_server: ServerThread, sprites) -> None:
    with grpc.insecure_channel(busy_server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        before = rows_computed(busy_server)
        counted = busy_server.running.metrics.registry.get_sample_value

        def late() -> float:
            return counted("disco_requests_total", {"method": "Compress", "code": "DEADLINE_EXCEEDED"}) or 0

        late_before = late()
        hog = start_hog(stub, busy_server, sprites)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compress(pb.CompressRequest(images=tensor(sprites[0][:7])), timeout=0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(hog.result().codes) == HOG
    time.sleep(0.1)
    assert rows_computed(busy_server) - before == HOG  # the 7 late images never reached ONNX Runtime
    assert late() == late_before + 1  # counted as what the caller heard, not as CANCELLED


def test_cancelled_call_is_dropped_before_compute(busy_server: ServerThread, sprites) -> None:
    with grpc.insecure_channel(busy_server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        before = rows_computed(busy_server)
        hog = start_hog(stub, busy_server, sprites)
        gone = stub.Compress.future(pb.CompressRequest(images=tensor(sprites[0][:5])), timeout=60)
        time.sleep(0.1)
        assert gone.cancel()
        assert len(hog.result().codes) == HOG
    time.sleep(0.2)
    assert rows_computed(busy_server) - before == HOG
    cancelled = busy_server.running.metrics.registry.get_sample_value(
        "disco_requests_total", {"method": "Compress", "code": "CANCELLED"})
    assert cancelled and cancelled >= 1


def test_full_queue_answers_resource_exhausted(busy_server: ServerThread, sprites, monkeypatch) -> None:  # noqa: ANN001
    """...before the refused request's pixels are made: 4096 RGB images are 192 MiB of float32, and a burst of
    refused retries made them over and over (a server under a 2 GiB limit was killed for it)."""
    from disco.service import images

    made: list[int] = []
    from_raw = images.from_raw
    def spy(*args: Any) -> np.ndarray:  # the pixels made: a refusal (room) comes before from_raw allocates them
        x = from_raw(*args)
        made.append(len(x))
        return x

    monkeypatch.setattr(images, "from_raw", spy)
    with grpc.insecure_channel(busy_server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        hog = start_hog(stub, busy_server, sprites)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compress(pb.CompressRequest(images=tensor(big(sprites, 6000))), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details() and "limit of 16384" in info.value.details()
        assert made == [HOG], made  # the hog's, not the refused request's
        # A request that can never succeed hears why (INVALID_ARGUMENT), not the full queue's retryable answer
        many = tensor(big(sprites, 6000))
        bad = [stub.Compress.future(pb.CompressRequest(images=many, quality="nonsense"), timeout=10),
               stub.Traverse.future(pb.TraverseRequest(images=many, edits=[pb.FactorEdit(factor="nope", set=0.0)]),
                                    timeout=10),
               stub.Compress.future(pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
                   data=b"0123456789", shape=[17, 64, 64, 1], dtype=pb.DTYPE_UINT8)), model=pb.ModelRef(version="2")),
                   timeout=10)]
        for call in bad:
            assert call.exception().code() == grpc.StatusCode.INVALID_ARGUMENT, call.exception().details()
        assert ("dsprites", "2") not in busy_server.running.servicer.pipeline._loaded  # nothing loaded to refuse it
        hog.result()
        assert len(stub.Compress(pb.CompressRequest(images=tensor(sprites[0][:4])), timeout=10).codes) == 4


def test_two_requests_of_the_largest_size_at_once_are_both_served(server: ServerThread, sprites) -> None:
    """With the default settings, one request of --max-images-per-request images filled the queue, and a second
    bulk caller at the same moment was refused RESOURCE_EXHAUSTED though the server was far from overloaded."""
    n = server.running.cfg.max_images_per_request
    request = pb.CompressRequest(images=tensor(big(sprites, n)))
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        calls = [stub.Compress.future(request, timeout=60) for _ in range(2)]
        assert [len(c.result().codes) for c in calls] == [n, n]


@pytest.fixture()
def two_versions(tmp_path: Path, tiny_repo: Path) -> tuple[Path, Path]:
    """A repository with the embedded dsprites/1, and a staged dsprites/2 (the tiny model) to ship later."""
    from disco.export.package import export

    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    staged = tmp_path / "staged"
    export(tiny_repo.parent / "run" / "ckpt.pt", staged, "dsprites", "2", kl_threshold=0.0, n_stats=512, n_eval=64)
    return repo, staged / "dsprites" / "2"


@pytest.mark.parametrize("max_old_versions", [None, 0])
def test_hot_reload_under_load_fails_nothing_and_old_codes_still_decode(two_versions, sprites,
                                                                        max_old_versions: int | None) -> None:
    """With --max-old-versions 0 the new snapshot does not adopt version 1's sessions: the old snapshot's drain
    closes them under the calls still on them (a review: by default every version is adopted, so a reload that
    closed the old snapshot without draining it failed nothing here)."""
    repo, v2 = two_versions
    s = serve(repo, reload_interval_s=0.1, **({} if max_old_versions is None else {"max_old_versions": max_old_versions}))
    failures: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()
    try:
        with Client(s.target) as c:
            old_code = c.compress(sprites[0][:1])[0]
            assert old_code.version == "1"
            old_pixels = c.decompress([old_code])

            def load() -> None:
                while not stop.is_set():
                    try:
                        versions.update(code.version for code in c.compress(sprites[0][:16]))
                        c.decompress([old_code])
                    except BaseException as exc:  # noqa: BLE001 - every failure counts
                        failures.append(exc)

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            shutil.copytree(v2, repo / "dsprites" / "2")  # ship a new version while under load
            deadline = time.monotonic() + 20
            while "2" not in versions and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join()
            assert not failures, failures[:3]
            assert versions == {"1", "2"}
            assert c.compress(sprites[0][:1])[0].version == "2"  # Compress uses the latest version
            np.testing.assert_array_equal(c.decompress([old_code]), old_pixels)  # routed to version 1
            assert {m.version for m in c.models()} == {"1", "2"}
    finally:
        stop.set()
        s.stop()


def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(tmp_path: Path, sprites) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo, reload_interval_s=0.1)
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "3")
        (repo / "dsprites" / "3" / "decoder.onnx").write_bytes(b"corrupt")
        (repo / "other" / "1").mkdir(parents=True)
        (repo / "other" / "1" / "model.json").write_text('{"schema": 1, "files": []}')  # malformed, not just wrong
        time.sleep(0.5)
        with Client(s.target) as c:
            assert c.compress(sprites[0][:1])[0].version == "1"
            assert [m.version for m in c.models()] == ["1"]
            assert (s.running.metrics.registry.get_sample_value("disco_model_load_failures_total") or 0) == 2
            staged = repo.parent / "v4"
            shutil.copytree(EMBEDDED / "dsprites" / "1", staged)
            meta = json.loads((staged / "model.json").read_text())
            (staged / "model.json").write_text(json.dumps({**meta, "version": "4"}))
            staged.rename(repo / "dsprites" / "4")  # polling goes on after the refusals
            deadline = time.monotonic() + 10
            while [m.version for m in c.models()] != ["1", "4"]:
                assert time.monotonic() < deadline, "the poll loop stopped after a refused version"
                time.sleep(0.05)
    finally:
        s.stop()


def test_a_served_version_broken_in_place_keeps_serving_as_it_was_verified(tmp_path: Path, sprites, caplog) -> None:
    """A version that fails verification on a reload while it is served (its file changed in place) keeps
    serving what was loaded, refused once in the log and the metrics, and old codes still route to it; a served
    version not loaded yet is not loaded from the changed bytes: its calls fail, none decodes with them."""
    repo = tmp_path / "repo"
    for v in ("2", "3", "4"):
        shutil.copytree(EMBEDDED / "dsprites" / v, repo / "dsprites" / v)
    s = serve(repo, reload_interval_s=0.1, max_old_versions=0)
    try:
        with Client(s.target) as c:
            code = c.compress(sprites[0][:1])[0]
            want = c.decompress([code])
            assert code.version == "4"
            with open(repo / "dsprites" / "4" / "decoder.onnx", "ab") as f:  # the served latest, changed in place
                f.write(b"\0")
            with open(repo / "dsprites" / "2" / "decoder.onnx", "ab") as f:  # an old version, never loaded
                f.write(b"\0")
            time.sleep(1.0)  # about ten polls
            assert [m.version for m in c.models()] == ["2", "3", "4"]
            assert c.compress(sprites[0][:1])[0] == code  # the same version, the same code
            np.testing.assert_array_equal(c.decompress([code]), want)
            old = c.compress(sprites[0][:1], version="3")[0]  # loads dsprites/3, which verifies
            assert len(c.decompress([old])) == 1
            with pytest.raises(Unavailable, match="dsprites/2 could not be loaded: ValueError: .* changed on disk since"):
                c.compress(sprites[0][:1], version="2")  # its decoder changed on disk: refused, not run
        # the two refusals, and each failed load of dsprites/2 (tried again after each poll, so once per SDK retry here)
        loads = [r for r in caplog.records if r.getMessage().startswith("could not load dsprites/2")]
        assert s.running.metrics.registry.get_sample_value("disco_model_load_failures_total") == 2 + len(loads) > 2
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing model")]
        assert len(refusals) == 2 and all("still serving it as verified before" in r for r in refusals), refusals
        assert not [r for r in caplog.records if r.exc_info]  # a reason, not a traceback
        assert any(r.getMessage().startswith("could not load dsprites/2") and "changed on disk since it was verified"
                   in r.getMessage() for r in caplog.records)
    finally:
        s.stop()


def dsprites_repo(tmp_path: Path, *versions: str) -> Path:
    """A repository of the embedded dsprites versions given, under tmp_path/repo."""
    repo = tmp_path / "repo"
    for v in versions:
        shutil.copytree(EMBEDDED / "dsprites" / v, repo / "dsprites" / v)
    return repo


def add_version(repo: Path, name: str, src: str, version: str, edit: Callable[[Path, dict], None]) -> None:
    """A copy of repo/name/src as a new version, its model.json (and files, through `edit`) changed; its
    hashes are updated so that it verifies. Moved into place whole, as a deployment would."""
    tmp = repo / name / f".{version}.tmp"
    shutil.copytree(repo / name / src, tmp)
    meta = json.loads((tmp / "model.json").read_text())
    meta["version"] = version
    edit(tmp, meta)
    meta["files"] = {f: hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in meta["files"]}
    (tmp / "model.json").write_text(json.dumps(meta))
    tmp.rename(repo / name / version)


def test_a_version_that_verifies_but_does_not_load_is_refused_alone(tmp_path: Path, sprites, caplog) -> None:
    """A version whose encoder ONNX Runtime cannot parse (its hashes updated, so it verifies), and one whose
    model.json has a factor of the wrong type, are each refused with a log line naming them, at a reload and
    at start; the versions beside them load and serve, and a poll does not load the refused one again."""
    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
    s = serve(repo, reload_interval_s=0.1)
    try:
        with Client(s.target) as c:
            add_version(repo, "dsprites", "4", "5", lambda d, m: (d / "encoder.onnx").write_bytes(b"not onnx"))
            add_version(repo, "dsprites", "4", "6", lambda d, m: m["factors"][0].update(min="abc"))
            add_version(repo, "color_dsprites", "1", "2", lambda d, m: None)  # a good one beside them
            deadline = time.monotonic() + 30
            while "color_dsprites/2" not in [f"{m.name}/{m.version}" for m in c.models()]:
                assert time.monotonic() < deadline, "the good version never loaded"
                time.sleep(0.05)
            loads = s.running.metrics.registry.get_sample_value("disco_model_loads_total")
            time.sleep(1.0)  # about ten more polls, none of which loads anything again
            assert s.running.metrics.registry.get_sample_value("disco_model_loads_total") == loads
            assert sorted(f"{m.name}/{m.version}" for m in c.models()) == ["color_dsprites/1", "color_dsprites/2", "dsprites/4"]
            assert c.compress(sprites[0][:1], model="dsprites")[0].version == "4"
        messages = [r.getMessage() for r in caplog.records]
        refused = [m for m in messages if m.startswith("refusing model")]
        assert len(refused) == 2, refused  # once each, not on every poll
        assert any("dsprites/5" in m and "could not be loaded" in m for m in refused), refused
        assert any("dsprites/6" in m and "factor 0" in m for m in refused), refused
        assert s.running.metrics.registry.get_sample_value("disco_model_load_failures_total") == 2
        # dsprites/4 and color_dsprites/1 at start, color_dsprites/2 once (not again in the pass after a refusal)
        assert s.running.metrics.registry.get_sample_value("disco_model_loads_total") == 3
    finally:
        s.stop()
    caplog.clear()
    s = serve(repo)  # the same repository at start
    try:
        with Client(s.target) as c:
            assert sorted(f"{m.name}/{m.version}" for m in c.models()) == ["color_dsprites/1", "color_dsprites/2", "dsprites/4"]
        # color_dsprites/2 loaded in the pass that refused dsprites/5, and kept; then dsprites/4: two loads, not three
        assert s.running.metrics.registry.get_sample_value("disco_model_loads_total") == 2
        assert any("dsprites/5" in r.getMessage() and "could not be loaded" in r.getMessage() for r in caplog.records)
    finally:
        s.stop()


def test_a_reload_whose_served_stand_in_fails_too_ends(tmp_path: Path, caplog) -> None:
    """dsprites/4 withdrawn and dsprites/3 (served, not loaded) changed in place into a version that verifies but
    does not load: the changed one is refused, the served one standing in for it fails too (its files changed),
    and the reload ends (it had tried the two in turn forever), each refusal logged once."""
    repo = tmp_path / "repo"
    for v in ("3", "4"):
        shutil.copytree(EMBEDDED / "dsprites" / v, repo / "dsprites" / v)
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
    s = serve(repo)  # reloads only when asked
    try:
        shutil.rmtree(repo / "dsprites" / "4")
        d = repo / "dsprites" / "3"
        (d / "encoder.onnx").write_bytes(b"not onnx")
        meta = json.loads((d / "model.json").read_text())
        meta["files"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in meta["files"]}
        (d / "model.json").write_text(json.dumps(meta))
        assert s.run(s.running.reload(), timeout=30)
        assert [f"{e.name}/{e.version}" for e in s.running.servicer.pipeline.repo.entries()] == ["color_dsprites/1"]
        assert not s.run(s.running.reload(), timeout=30)  # nothing new: nothing tried again
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing model")]
        assert len(refused) == 2 and all("dsprites/3" in m for m in refused), refused
        info = [(m.labels["name"], m.labels["version"]) for f in s.running.metrics.registry.collect()
                if f.name == "disco_model" for m in f.samples]
        assert info == [("color_dsprites", "1")]  # the withdrawn versions are no longer reported as served
    finally:
        s.stop()


def output_of(proc: subprocess.Popen[str]) -> str:
    """What a server process printed; killed first if it is still running (a test that failed)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    if proc.stdout:
        proc.stdout.close()
    return out


def wait_serving(c: Client, seconds: float = 60, before_each: Callable[[], None] = lambda: None) -> None:
    """Until a server process that is starting answers SERVING; before_each runs before every try."""
    deadline = time.monotonic() + seconds
    while True:
        before_each()
        try:
            if c.health(timeout=0.5):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)


def test_sighup_reloads_and_retries_the_versions_that_did_not_load(tmp_path: Path, sprites) -> None:
    """A real server process that does not poll: new versions wait for SIGHUP; a version that verified but did not
    load stays refused through a plain reload, and each SIGHUP tries it once more (a failure outside its files may
    be over), counted as one more load failure, while the rest serve on."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--repository", str(repo), "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def failures() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        return float(next(line for line in text.splitlines() if line.startswith("disco_model_load_failures_total ")).split()[-1])

    def served(c: Client) -> list[str]:
        return sorted(f"{m.name}/{m.version}" for m in c.models())

    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            wait_serving(c)
            add_version(repo, "dsprites", "4", "5", lambda d, m: None)
            add_version(repo, "dsprites", "4", "6", lambda d, m: (d / "encoder.onnx").write_bytes(b"not onnx"))
            time.sleep(0.5)
            assert served(c) == ["dsprites/4"]  # no polling: nothing changes until asked
            for signals in (1, 2, 3):
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30
                # the first reload refuses version 6 and serves 5 (after the refusal); each later SIGHUP tries 6 again
                while failures() < signals or served(c) != ["dsprites/4", "dsprites/5"]:
                    assert time.monotonic() < deadline, f"SIGHUP {signals}: {failures()} failures, serving {served(c)}"
                    time.sleep(0.05)
                assert c.compress(sprites[0][:1])[0].version == "5"
            time.sleep(0.5)
            assert failures() == 3  # three signals, three attempts, no more
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        out = output_of(proc)
    assert out.count("refusing model") == 3 and "dsprites/6" in out, out[-3000:]
    assert out.count("retrying 1 version(s) that did not load before") == 2, out[-3000:]


def test_a_retry_loads_a_refused_version_that_is_no_longer_the_latest(tmp_path: Path, caplog) -> None:
    """dsprites/5 did not load, then dsprites/6 shipped: a retry (SIGHUP) loads 5 before it could serve (old codes
    would route to it), finds it fails again and leaves it refused, rather than serving it unloaded."""
    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    s = serve(repo)
    try:
        add_version(repo, "dsprites", "4", "5", lambda d, m: (d / "encoder.onnx").write_bytes(b"not onnx"))
        assert not s.run(s.running.reload(), timeout=30)  # 5 refused: still 4 alone
        add_version(repo, "dsprites", "4", "6", lambda d, m: None)
        assert s.run(s.running.reload(), timeout=30)
        served = lambda: [f"{e.name}/{e.version}" for e in s.running.servicer.pipeline.repo.entries()]  # noqa: E731
        assert served() == ["dsprites/4", "dsprites/6"]
        failures = lambda: s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")  # noqa: E731
        assert failures() == 1
        s.run(s.running.reload(retry=True), timeout=30)
        assert served() == ["dsprites/4", "dsprites/6"] and failures() == 2  # tried, failed, refused again
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing model")]
        assert len(refused) == 2 and all("dsprites/5" in m for m in refused), refused
    finally:
        s.stop()


def test_a_withdrawn_version_leaves_the_metrics(tmp_path: Path, sprites) -> None:
    """Once a reload withdraws a model, its per-batcher series (queue depth, queue and compute time, batch sizes)
    and its disco_model_info go: a server that ships versions for months does not export all it ever loaded."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
    s = serve(repo)

    def labelled(model: str) -> set[str]:
        return {f"{f.name}{{{m.labels.get('batcher') or m.labels.get('name')}}}"
                for f in s.running.metrics.registry.collect() for m in f.samples
                if f.name in ("disco_queue_depth", "disco_queue_duration_seconds", "disco_compute_duration_seconds",
                              "disco_batch_size", "disco_model")
                and (m.labels.get("batcher", "").startswith(model + "/") or m.labels.get("name") == model)}

    try:
        with Client(s.target) as c:
            c.decompress(c.compress(sprites[0][:2], model="dsprites"))
            c.compress(np.zeros((1, 64, 64, 3), np.uint8), model="color_dsprites")
            assert len(labelled("dsprites")) == 9  # 4 metrics x (encode, decode), and model info
            color = labelled("color_dsprites")
            shutil.rmtree(repo / "dsprites")
            assert s.run(s.running.reload(), timeout=30)
            deadline = time.monotonic() + 10
            while labelled("dsprites"):  # the old snapshot drains, then closes its batchers
                assert time.monotonic() < deadline, labelled("dsprites")
                time.sleep(0.05)
            assert labelled("color_dsprites") == color  # what still serves keeps its series
            # A version that fails in its warm-up runs (a gray encoder where model.json says RGB) hands back the
            # batchers it had made: none of its name stays counted open, so its series would go when it is gone
            add_version(repo, "color_dsprites", "1", "2",
                        lambda d, m: shutil.copy(EMBEDDED / "dsprites" / "4" / "encoder.onnx", d / "encoder.onnx"))
            assert not s.run(s.running.reload(), timeout=30)
            assert s.running.metrics.registry.get_sample_value("disco_model_load_failures_total") == 1
            assert not [n for n in s.running.metrics._batchers if n.startswith("color_dsprites/2/")]
    finally:
        s.stop()


def test_a_close_cut_short_by_shutdown_hands_back_both_batchers_series(tmp_path: Path) -> None:
    """A shutdown that cancels a version's close while its encoder drains (the decoder's close not begun) still
    hands back the decoder's metrics series: its count of open batchers used to stay up for good."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    s = serve(repo)
    try:
        pipeline = s.running.servicer.pipeline
        m = pipeline._loaded.pop(("dsprites", "4"))  # closed here, not again at the stop
        names = (m.encoder.name, m.decoder.name)
        assert all(s.running.metrics._batchers[n] == 1 for n in names)
        m.encoder._running += 1  # a batch in flight: the encoder's drain waits for it

        async def cut_short() -> None:
            task = asyncio.create_task(pipeline._close_loaded(m, drain=True))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        s.run(cut_short(), timeout=10)
        m.encoder._running -= 1
        assert [s.running.metrics._batchers[n] for n in names] == [0, 0]
    finally:
        s.stop()


def _handles_sighup(pid: int) -> bool:
    """Whether the process ignores or catches SIGHUP yet (/proc/PID/status: SigIgn, SigCgt), rather than dying of it."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    except OSError:
        return False
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & (1 << (signal.SIGHUP - 1)))


def test_sighup_while_starting_neither_kills_the_server_nor_is_lost() -> None:
    """SIGHUP every 20 ms, from the moment the parent of a --processes 2 server handles it until both processes
    serve: neither the parent nor a child that is still importing or warming up dies of it, and a process that was
    warming up reloads once it is up (the repository may have changed since it was read). The signals come from a
    thread of their own: sent between the client's calls, they left gaps (a spread waits up to 5 s) in which a
    process could warm up without one."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--processes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done, sent = threading.Event(), []

    def hups() -> None:
        while proc.poll() is None and not done.wait(0.02):
            proc.send_signal(signal.SIGHUP)
            sent.append(signal.SIGHUP)

    try:
        deadline = time.monotonic() + 30
        while not _handles_sighup(proc.pid):  # before that, Python itself is still starting
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        sender = threading.Thread(target=hups)
        sender.start()
        try:
            with Client(f"127.0.0.1:{port}", timeout=5, connections=2) as c:
                wait_serving(c, 90)
                deadline = time.monotonic() + 60
                while len(set(c.spread())) < 2:  # a connection on each process (ListModels answers while warming)
                    assert proc.poll() is None, f"the server died after {len(sent)} SIGHUPs"
                    assert time.monotonic() < deadline, "the second process did not come up"
                    time.sleep(0.05)
                wait_serving(c, 90)  # then both SERVING: warmed up, their SIGHUP handlers in place
        finally:
            done.set()
            sender.join()
        assert proc.poll() is None, f"the server died after {len(sent)} SIGHUPs"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        out = output_of(proc)
    assert out.count("SIGHUP while starting: reloading") == 2, out[-3000:]  # each process, once


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (/proc/PID/stat: the field after the state is the parent's id)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_the_watchdog_counts_no_silence_while_it_did_not_run_itself() -> None:
    """A whole server paused (Ctrl-Z, a frozen cgroup) for longer than --watchdog-s and resumed: its processes
    were killed as hung before they could write again. A gap in the watchdog's own looks resets the count."""
    from disco.service.server import _Watchdog

    wd = _Watchdog(2)
    fd = wd.pipe()
    writer = os.dup(fd)
    wd.started()
    try:
        os.write(writer, b".")
        assert wd.hung(100.0) == [] and wd.hung(100.5) == []
        assert wd.hung(140.0) == []  # the watchdog itself did not run for 39.5 s: not this process's silence
        # silent 0.5 s before the gap and 1.5 s after it: not yet over 2 s
        assert [t for t in (140.5, 141.0, 141.5) if wd.hung(t)] == []
        assert wd.hung(142.0) == [0]  # then silent for over 2 s, the gap left out
        os.write(writer, b".")
        assert wd.hung(143.0) == []
    finally:
        os.close(writer)
        wd.close()


def test_a_hung_process_of_a_reuseport_server_is_killed_and_the_others_stop() -> None:
    """`disco serve --processes 2 --watchdog-s 2`: both processes run well past the limit while their event loops
    run; one stopped (SIGSTOP: alive, holding its share of the port, answering nothing) is killed once it has been
    silent for 2 s, and the others stop as when a process dies, so that a supervisor restarts the whole. Without the
    watchdog the server went on with one process answering none of the calls the kernel gave it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--processes", "2", "--max-batch", "4", "--watchdog-s", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[int] = []
    try:
        with Client(f"127.0.0.1:{port}", timeout=5, connections=2) as c:
            wait_serving(c, 90)
            deadline = time.monotonic() + 60
            while len(set(c.spread())) < 2:  # both processes up
                assert proc.poll() is None and time.monotonic() < deadline, "the second process did not come up"
                time.sleep(0.05)
            wait_serving(c, 90)
        time.sleep(5)  # past the limit: a process that runs is not taken for hung
        assert proc.poll() is None
        children = _children(proc.pid)
        assert len(children) == 2, children
        os.kill(children[0], signal.SIGSTOP)
        stopped = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        for pid in children:  # a stopped process left behind would hold the output pipe open for good
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out = output_of(proc)
    assert code == 128 + signal.SIGKILL, out[-3000:]  # the killed process's status, as a shell reports it
    assert f"server process {children[0]} has not run its event loop for over 2 s (hung): killing it" in out, out[-3000:]
    # silent for 2 s since its last beat, up to a second before it was stopped
    assert "stopping the others" in out and 0.9 < took < 30, (took, out[-3000:])
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


def test_health_is_not_serving_while_warming_and_through_the_drain_delay(sprites) -> None:
    """A real server process: health answers NOT_SERVING between start and the end of warm-up; after SIGTERM
    with --drain-delay-s, NOT_SERVING while calls are still answered, then the drain and a clean exit."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", str(metrics_port), "--drain-delay-s", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    scraped_while_warming = False  # /metrics came up only with SERVING: warm-up's memory and failures went unseen
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status() -> str:
                try:
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(
                        health.Check(health_pb2.HealthCheckRequest(service="disco.v1.Codec"), timeout=1).status)
                except grpc.RpcError as exc:
                    return exc.code().name

            deadline = time.monotonic() + 60
            while not seen or seen[-1] != "SERVING":
                assert time.monotonic() < deadline, seen[-5:]
                if not seen or status() != seen[-1]:
                    seen.append(status())
                if seen[-1] == "NOT_SERVING" and not scraped_while_warming:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as r:
                            scraped_while_warming = b"process_resident_memory_bytes" in r.read()
                    except OSError:
                        pass
                    scraped_while_warming = scraped_while_warming and status() == "NOT_SERVING"  # still warming
                time.sleep(0.005)
            assert "NOT_SERVING" in seen, seen  # warming: up, but not serving yet
            assert scraped_while_warming
            stub = codec_pb2_grpc.CodecStub(ch)
            request = pb.CompressRequest(images=tensor(sprites[0][:2]))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 1.5
            while status() != "NOT_SERVING":
                assert time.monotonic() < deadline, "health did not turn NOT_SERVING after SIGTERM"
                time.sleep(0.01)
            assert len(stub.Compress(request, timeout=5).codes) == 2  # still answered during the delay
        assert proc.wait(timeout=30) == 0
    finally:
        out = output_of(proc)
    assert "still serving for 2.0 s before draining" in out and "stopped" in out


def test_an_open_health_watch_ends_with_the_drain_instead_of_holding_it() -> None:
    """gRPC's client-side health checking keeps a Watch open on every connection. The stock servicer never ended
    one, so an idle server with a Watch open waited out all of --grace-s (20 s in deploy/k8s) on SIGTERM and the
    watcher saw UNAVAILABLE; now the Watch sends NOT_SERVING and ends with OK, and the server exits at once."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--max-batch", "4", "--grace-s", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            wait_serving(c, 90)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="disco.v1.Codec"),
                                                          timeout=60)
            first = next(watch)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            seen = [health_pb2.HealthCheckResponse.ServingStatus.Name(r.status) for r in watch]  # until it ends
            assert watch.code() == grpc.StatusCode.OK, watch.details()
            code = proc.wait(timeout=60)
            took = time.monotonic() - t0
    finally:
        out = output_of(proc)
    assert seen == ["NOT_SERVING"] and code == 0, (seen, out[-2000:])
    assert took < 10, (took, out[-2000:])  # not the 30 s grace


def test_sigterm_while_the_models_warm_stops_the_server(tmp_path: Path) -> None:
    """Signal handlers were set only once the server was up: as a container's PID 1, which ignores a signal that has
    no handler, a SIGTERM while warming was lost and the server came up anyway. (Not PID 1 here, the default action
    would kill it by the signal: the exit status tells the two apart.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = dsprites_repo(tmp_path, "4")
    (repo / "dsprites" / "serving.json").write_text('{"max_batch": 1024}')  # warming 1..1024 takes a long while
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--repository", str(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:  # up, and warming
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the server did not start listening"
                    time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        out = output_of(proc)
    assert "asked to stop while starting: stopped" in out and "serving dsprites/4" not in out, out[-2000:]


# `disco serve`, its import of the server slowed for 2 s in the way onnxruntime's native module import behaves: an
# exception raised in it comes out as ImportError
_SLOW_SERVER_IMPORT = """
import importlib.abc, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "disco.service.server":
            try:
                time.sleep(2)
            except BaseException as exc:
                raise ImportError("initialization failed") from exc
        return None
sys.meta_path.insert(0, Slow())
from disco.client.cli import main
raise SystemExit(main())
"""


@pytest.mark.parametrize("stderr", ["open", "closed"])  # closed: the handler's message failed, and it raised
def test_disco_serve_handles_sigterm_while_it_imports(stderr: str) -> None:
    """As a container's PID 1, which ignores a signal it has no handler for, a SIGTERM that reached `disco serve`
    while it imported the server was lost, and the server came up (scripts/pid1_sigterm.sh). The command now sets a
    handler before that import, one that ends the process rather than raise into what it interrupts (inside
    onnxruntime's import that became an ImportError and exit status 1). Not PID 1 here: the SIGTERM is sent as soon
    as /proc says the process catches it, which it did only once the server had set its own (exit status 0), and the
    exit tells the cases apart."""
    code = ("import os; os.close(2)\n" if stderr == "closed" else "") + _SLOW_SERVER_IMPORT
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            caught = int(next(line for line in lines if line.startswith("SigCgt:")).split()[1], 16)
            if caught >> (signal.SIGTERM - 1) & 1:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "disco serve never caught SIGTERM"
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        out = output_of(proc)
    assert status == 143 and out == ("disco serve: terminated\n" if stderr == "open" else ""), (status, out[-2000:])


def test_the_processes_of_a_killed_processes_server_drain_and_exit() -> None:
    """--processes N: a parent killed by a signal it cannot forward (SIGKILL) left its processes serving the port on
    their own; each now watches it and drains once it is gone."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--processes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[int] = []

    def alive() -> list[int]:
        return [pid for pid in children if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            wait_serving(c)
        children += [int(pid) for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], text=True,
                                                       capture_output=True, check=True).stdout.split()]
        assert len(children) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while alive():
            assert time.monotonic() < deadline, "the processes outlived their parent"
            time.sleep(0.1)
    finally:
        for pid in alive():  # a failed test leaves none behind
            os.kill(pid, signal.SIGKILL)
        out = output_of(proc)
    assert out.count("that started this process is gone: draining") == 2, out[-2000:]


def test_sigterm_drains_in_flight_calls_then_exits(sprites) -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", str(metrics_port), "--grace-s", "20", "--workers", "1",
                             "--batch-workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60, max_batch=4096) as c:  # one RPC per call
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if c.health(timeout=1):
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(0.1)
            results: list[int] = []
            errors: list[BaseException] = []

            def call() -> None:
                try:
                    results.append(len(c.compress(big(sprites, 1000))))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            def calls_seen() -> tuple[float, float]:
                """Compress calls in flight and answered, from the server's metrics."""
                try:  # /metrics starts just after health reports SERVING
                    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
                except OSError:
                    return 0.0, 0.0
                flying = [line for line in text.splitlines() if line.startswith("disco_requests_in_flight ")]
                done = [line for line in text.splitlines()
                        if line.startswith("disco_requests_total{") and 'method="Compress"' in line]
                return float(flying[0].split()[-1]), sum(float(line.split()[-1]) for line in done)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while sum(calls_seen()) < 4:  # every call has reached the server (a fixed sleep was not always enough)
                assert time.monotonic() < deadline, f"the calls did not reach the server: {calls_seen()}"
                time.sleep(0.01)
            assert calls_seen()[0] >= 1, "every call finished before SIGTERM: make them bigger"
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join()
            assert not errors and results == [1000] * 4
        assert proc.wait(timeout=30) == 0
    finally:
        out = output_of(proc)
    assert "draining" in out and "stopped" in out


def test_a_burst_waits_for_the_server_up_to_the_pending_limit(sprites) -> None:
    """Calls the busy event loop has not picked up wait in gRPC core: up to --max-pending-rpcs (default 4096) all
    are answered; past a small limit gRPC core refuses some (gRPC's own default drops at random past 1,000)."""
    import asyncio

    from disco.client.load import burst

    x = sprites[0][:1]
    request = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                    dtype=pb.DTYPE_UINT8)))

    for limit, refused in ((0, False), (100, True)):
        s = serve(**({"max_pending_rpcs": limit} if limit else {}))
        try:
            answers = asyncio.run(burst(s.target, request, 1500))
        finally:
            s.stop()
        assert (answers.get("OK", 0) < 1500) is refused, answers
        assert set(answers) <= {"OK", "CANCELLED"}, answers


def test_the_sdk_retries_calls_an_overloaded_server_shed_when_asked_to(sprites) -> None:
    """Past --max-pending-rpcs gRPC core answers CANCELLED; RetryPolicy(on_resource_exhausted=True) retries it."""
    from disco.client import AsyncClient, RetryPolicy, ServerError

    x = sprites[0][:1]

    async def flood(policy: RetryPolicy) -> list[BaseException | None]:
        async with AsyncClient(s.target, retry=policy, timeout=60) as c:
            results = await asyncio.gather(*(c.compress(x) for _ in range(1500)), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    s = serve(max_pending_rpcs=100)
    try:
        shed = [e for e in asyncio.run(flood(RetryPolicy())) if e is not None]
        assert shed and all(isinstance(e, ServerError) and "CANCELLED" in str(e) for e in shed), shed[:3]
        retried = asyncio.run(flood(RetryPolicy(on_resource_exhausted=True, max_attempts=100, base_s=0.05, cap_s=1.0)))
        assert not [e for e in retried if e is not None]
    finally:
        s.stop()


def test_metrics_endpoint_speaks_prometheus(sprites) -> None:
    port = free_port()
    s = serve(metrics_port=port)
    try:
        with Client(s.target) as c:
            c.decompress(c.compress(sprites[0][:10]))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        # bound where gRPC is (127.0.0.1 here), not on every interface: a server kept to loopback keeps its metrics there
        assert s.running.metrics._http.server_address[:2] == ("127.0.0.1", port)
        for name in ("disco_requests_total", "disco_request_duration_seconds_bucket", "disco_queue_duration_seconds",
                     "disco_compute_duration_seconds", "disco_batch_size_bucket", "disco_queue_depth",
                     "disco_requests_in_flight", "disco_request_bytes_total", "disco_response_bytes_total",
                     "disco_code_bytes_per_image_bucket", "disco_model_info", "disco_model_load_failures_total",
                     "process_resident_memory_bytes", "disco_event_loop_cpu_seconds_total"):
            assert name in text, name
        assert 'disco_requests_total{code="OK",method="Compress"} 1.0' in text
        # images and code sizes are counted per model version (the embedded default is dsprites/4)
        e = Repository.load(EMBEDDED).get("dsprites")
        for method in ("Compress", "Decompress"):
            assert f'disco_images_total{{method="{method}",model="dsprites",version="{e.version}"}} 10.0' in text
        assert f'disco_code_bytes_per_image_count{{model="dsprites",version="{e.version}"}} 1.0' in text
    finally:
        s.stop()


def test_images_of_a_call_that_fails_its_last_check_are_not_counted(server: ServerThread, sprites,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Compress and Decompress counted their images (and Compress its code size) before the handler's last check,
    the deadline once the answer is ready: a call that then failed DEADLINE_EXCEEDED had its images counted as
    compressed. The check is made to fail here (the deadline passing between compute and answer is a race)."""
    from disco.service import servicer

    get = server.running.metrics.registry.get_sample_value
    e = Repository.load(EMBEDDED).get("dsprites")

    def counts() -> tuple[float, ...]:
        return tuple(get(*sample) or 0.0 for sample in (
            ("disco_images_total", {"method": "Compress", "model": "dsprites", "version": e.version}),
            ("disco_images_total", {"method": "Decompress", "model": "dsprites", "version": e.version}),
            ("disco_code_bytes_per_image_count", {"model": "dsprites", "version": e.version}),
            ("disco_requests_total", {"method": "Compress", "code": "DEADLINE_EXCEEDED"}),
            ("disco_requests_total", {"method": "Decompress", "code": "DEADLINE_EXCEEDED"})))

    with grpc.insecure_channel(server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        codes = stub.Compress(pb.CompressRequest(images=tensor(sprites[0][:3])), timeout=10).codes
        before = counts()
        checked = servicer._past_deadline
        monkeypatch.setattr(servicer, "_past_deadline", lambda context, slack=servicer._DEADLINE_SLACK_S:
                            slack == 0 or checked(context, slack))  # slack 0: the check once the answer is ready
        for call in (lambda: stub.Compress(pb.CompressRequest(images=tensor(sprites[0][:3])), timeout=10),
                     lambda: stub.Decompress(pb.DecompressRequest(codes=codes), timeout=10)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert counts() == before[:3] + (before[3] + 1, before[4] + 1)
        monkeypatch.undo()
        stub.Decompress(pb.DecompressRequest(codes=codes), timeout=10)
        assert counts() == (before[0], before[1] + 3, before[2], before[3] + 1, before[4] + 1)  # counted again


def test_streams_are_counted_once_each_by_how_they_ended(server: ServerThread, sprites) -> None:
    """disco_streams_total{method, code}: a stream that finished, one a bad message ended, one its caller
    cancelled and one whose deadline passed; each of their messages is counted as a Compress too."""
    counted = server.running.metrics.registry.get_sample_value

    def streams(code: str) -> float:
        return counted("disco_streams_total", {"method": "CompressStream", "code": code}) or 0.0

    before = {code: streams(code) for code in ("OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED")}
    messages = counted("disco_requests_total", {"method": "Compress", "code": "OK"}) or 0.0
    good = pb.CompressRequest(images=tensor(sprites[0][:1]))

    def slow() -> Iterator[pb.CompressRequest]:
        yield good
        time.sleep(2)  # the stream stays open, its caller neither sending nor finishing
        yield good

    with grpc.insecure_channel(server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        assert len(list(stub.CompressStream(iter([good, good]), timeout=10))) == 2
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.CompressStream(iter([good, pb.CompressRequest()]), timeout=10))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        call = stub.CompressStream(slow(), timeout=10)  # cancelled while its caller holds the next message back
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as late:
            list(stub.CompressStream(slow(), timeout=0.5))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted_since() -> dict[str, float]:
        return {code: streams(code) - before[code] for code in before}

    deadline = time.monotonic() + 10  # the server counts a stream its caller left once it sees the end
    while sum(counted_since().values()) < 4:
        assert time.monotonic() < deadline, counted_since()
        time.sleep(0.01)
    got = counted_since()
    assert got["INVALID_ARGUMENT"] == 1 and got["DEADLINE_EXCEEDED"] == 1, got
    # The cancelled one counts once, as CANCELLED, or as OK where the server saw only its requests end (grpc.aio
    # gives a handler no other sign of a caller that cancelled while holding its next message back).
    assert got["OK"] + got["CANCELLED"] == 2 and got["OK"] >= 1, got
    time.sleep(0.2)
    assert counted_since() == got  # once each
    assert (counted("disco_requests_total", {"method": "Compress", "code": "OK"}) or 0) >= messages + 5


def test_streams_whose_callers_left_are_not_counted_ok(server: ServerThread, sprites) -> None:
    """A review: a stream whose caller's deadline passed while the server waited for its next message was counted
    OK, 5 times in 10: the server's deadline comes later than the caller's by the grpc-timeout header's rounding
    (9 ms at 1-3 s), and its requests just end."""
    counted = server.running.metrics.registry.get_sample_value

    def streams() -> dict[str, float]:
        return {code: counted("disco_streams_total", {"method": "CompressStream", "code": code}) or 0.0
                for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")}

    good = pb.CompressRequest(images=tensor(sprites[0][:1]))

    def held() -> Iterator[pb.CompressRequest]:
        yield good
        time.sleep(2.5)  # the caller neither sends nor finishes
        yield good

    before, seen = streams(), []
    with grpc.insecure_channel(server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        grpc.channel_ready_future(ch).result(10)

        def late(timeout: float) -> None:
            try:
                list(stub.CompressStream(held(), timeout=timeout))
            except grpc.RpcError as exc:
                seen.append(exc.code().name)

        callers = [threading.Thread(target=late, args=(1.0 + 0.1 * k,)) for k in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(10)
    assert seen == ["DEADLINE_EXCEEDED"] * 8
    deadline = time.monotonic() + 10
    while sum(streams().values()) - sum(before.values()) < 8:
        assert time.monotonic() < deadline, streams()
        time.sleep(0.01)
    time.sleep(0.2)
    got = {code: n - before[code] for code, n in streams().items()}
    assert got == {"OK": 0, "CANCELLED": 0, "DEADLINE_EXCEEDED": 8}, got


def test_streams_that_finish_just_before_their_deadline_are_counted_ok(server: ServerThread) -> None:
    """A stream answered in time is OK, close to its deadline too: with the 20 ms slack the in-flight checks use,
    every stream of 15-20 ms was counted DEADLINE_EXCEEDED while its caller saw OK (the slack is now 5 ms and a
    hundredth of the timeout, for the caller's deadline passing as the server waits for a message:
    test_streams_whose_callers_left_are_not_counted_ok)."""
    counted = server.running.metrics.registry.get_sample_value

    def streams(code: str) -> float:
        return counted("disco_streams_total", {"method": "CompressStream", "code": code}) or 0.0

    before = streams("OK")
    seen = {"OK": 0, "DEADLINE_EXCEEDED": 0}
    with grpc.insecure_channel(server.target) as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        grpc.channel_ready_future(ch).result(10)
        for _ in range(20):
            try:
                list(stub.CompressStream(iter([]), timeout=0.02))
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
    assert seen["OK"] >= 10, seen  # the caller saw its streams end in time
    time.sleep(0.2)  # counted as gRPC ends each call
    # a stream may end in time for the server and late for its caller (their clocks run apart): a little slack
    assert streams("OK") - before >= seen["OK"] - 2, (streams("OK") - before, seen)


def test_concurrent_single_image_requests_batch_on_the_event_loop(sprites) -> None:
    """Single images from 16 concurrent callers share ONNX Runtime runs, and each still gets its own code."""
    s = serve()
    images = sprites[0][:16]

    async def load() -> list[list[bytes]]:
        async with grpc.aio.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)

            async def caller(k: int) -> list[bytes]:
                return [(await stub.Compress(pb.CompressRequest(images=tensor(images[k : k + 1])))).codes[0]
                        for _ in range(20)]

            return await asyncio.gather(*(caller(k) for k in range(16)))

    def sample(name: str, **labels: str) -> float:
        return s.running.metrics.registry.get_sample_value(name, {"batcher": ENCODER, **labels}) or 0.0

    try:
        runs_before, alone_before = sample("disco_batch_size_count"), sample("disco_batch_size_bucket", le="1.0")
        answers = asyncio.run(load())
        runs = sample("disco_batch_size_count") - runs_before
        alone = sample("disco_batch_size_bucket", le="1.0") - alone_before
        with Client(s.target) as c:
            alone_codes = [code.data for code in c.compress(images)]  # the same images, in one request
        rows = sample("disco_batch_size_sum")  # read while it serves: a stopped server's batchers take their series
    finally:
        s.stop()
    assert rows >= 320 and runs < 320  # fewer runs than requests
    assert runs > alone  # some runs held several requests
    for k, codes in enumerate(answers):  # a caller's rows are its own, whichever run computed them
        assert set(codes) == {alone_codes[k]}


def test_event_loop_cpu_counts_the_loop_thread_and_no_other() -> None:
    from disco.service.metrics import LoopCpuCollector

    def loop_cpu() -> float:
        return s.running.metrics.registry.get_sample_value("disco_event_loop_cpu_seconds_total")

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def spin_on_loop() -> None:
        spin(0.3)

    s = serve()
    try:
        before = loop_cpu()
        s.run(spin_on_loop())  # the server's event loop busy for 0.3 s of CPU
        on_loop = loop_cpu() - before
        spin(0.3)  # this (the test's) thread busy
        elsewhere = loop_cpu() - before - on_loop
    finally:
        s.stop()
    assert 0.25 <= on_loop <= 0.45, on_loop  # /proc counts in ticks of 10 ms
    assert elsewhere < 0.1, elsewhere
    # A thread that has ended is not reported (rather than a stale or another thread's figure).
    gone = LoopCpuCollector()
    t = threading.Thread(target=gone.watch)
    t.start()
    t.join()  # returns a moment before the kernel drops the thread (and its /proc entry) under load
    deadline = time.monotonic() + 10
    while list(gone.collect()):
        assert time.monotonic() < deadline, "an ended thread is still reported"
        time.sleep(0.01)


def test_each_model_has_a_health_name_that_follows_reloads(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo, reload_interval_s=0.1)
    try:
        with grpc.insecure_channel(s.target) as ch:
            h = health_pb2_grpc.HealthStub(ch)

            def status(model: str) -> str:
                try:
                    r = h.Check(health_pb2.HealthCheckRequest(service=f"disco.v1.Codec/{model}"), timeout=10)
                except grpc.RpcError as exc:
                    return exc.code().name
                return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

            def wait_for(model: str, want: str) -> None:
                deadline = time.monotonic() + 20
                while status(model) != want:
                    assert time.monotonic() < deadline, f"{model}: {status(model)}, expected {want}"
                    time.sleep(0.05)

            assert status("dsprites") == "SERVING" and status("color_dsprites") == "NOT_FOUND"
            shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")  # a model ships
            wait_for("color_dsprites", "SERVING")
            shutil.rmtree(repo / "color_dsprites")  # and is withdrawn
            wait_for("color_dsprites", "NOT_SERVING")
            assert status("dsprites") == "SERVING"
            s.run(s.running.set_health(False))  # as while draining: every name
            assert status("dsprites") == "NOT_SERVING"
    finally:
        s.stop()


def test_a_reload_loads_only_what_changed(tmp_path: Path, sprites) -> None:
    repo = tmp_path / "repo"
    for name, version in (("dsprites", "1"), ("color_dsprites", "1")):
        shutil.copytree(EMBEDDED / name / version, repo / name / version)
    s = serve(repo, reload_interval_s=0.1, max_batch=4, default_model="dsprites")
    registry = s.running.metrics.registry
    loads = lambda: registry.get_sample_value("disco_model_loads_total")  # noqa: E731
    reloads = lambda: registry.get_sample_value("disco_repository_reloads_total") or 0  # noqa: E731

    def wait_for_reload(n: int) -> None:
        deadline = time.monotonic() + 20
        while reloads() < n:
            assert time.monotonic() < deadline, "the change was never reloaded"
            time.sleep(0.05)

    try:
        with Client(s.target) as c:
            old_code = c.compress(sprites[0][:1])[0]
            assert old_code.version == "1" and loads() == 2
            shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")  # a new version of one model
            wait_for_reload(1)
            assert loads() == 3  # dsprites/2 only: color_dsprites/1 and dsprites/1 kept their warm sessions
            assert c.compress(sprites[0][:1])[0].version == "2"
            c.decompress([old_code])  # dsprites/1, kept loaded as an older version: no load
            assert loads() == 3
            (repo / "color_dsprites" / "serving.json").write_text('{"max_batch": 2}')  # one model's settings change
            wait_for_reload(2)
            assert loads() == 4  # color_dsprites/1 again, with its new settings; the dsprites versions kept
            assert sorted(s.running.servicer.pipeline.loaded()) == ["color_dsprites/1", "dsprites/1", "dsprites/2"]
            meta_file = repo / "dsprites" / "2" / "model.json"  # a version's metadata edited in place
            meta = json.loads(meta_file.read_text())
            meta["description"] = "edited in place"
            meta_file.write_text(json.dumps(meta))
            wait_for_reload(3)
            assert c.model("dsprites", "2").description == "edited in place" and loads() == 5
    finally:
        s.stop()


def hold_warm_up(monkeypatch: pytest.MonkeyPatch, version: str) -> tuple[threading.Event, threading.Event]:
    """From now on, hold the first warm-up of any model's `version` (on a loader thread) until `release` is set, or
    until its pipeline closes (warm_up looks between batch sizes): (started, release)."""
    from disco.service import pipeline

    started, release = threading.Event(), threading.Event()
    warm_up = pipeline._Loaded.warm_up

    def held(self, e, max_batch, abandoned=lambda: False):  # noqa: ANN001, ANN202
        if e.version == version and not started.is_set():
            started.set()
            while not release.wait(0.01) and not abandoned():
                pass
        return warm_up(self, e, max_batch, abandoned)

    monkeypatch.setattr(pipeline._Loaded, "warm_up", held)
    return started, release


def test_a_reload_warms_its_new_version_beside_the_requests_not_before_them(tmp_path: Path, sprites,
                                                                            monkeypatch) -> None:
    """A review: with --workers 1 (the manifests' setting) a reload warmed its new version on the one thread that
    requests run on, and requests of more than 4 images waited out the whole warm-up (14 s at --max-batch 256), past
    their deadlines. Here the warm-up is held until a 16-image request has been answered."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo, workers=1)
    started, release = hold_warm_up(monkeypatch, "2")
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")

        async def start() -> asyncio.Task[bool]:
            return asyncio.create_task(s.running.reload())

        reload = s.run(start())
        assert started.wait(20), "the reload never reached its warm-up"
        with Client(s.target) as c:
            codes = c.compress(sprites[0][:16], timeout=5)  # run on the worker thread, while the warm-up holds its own
            assert not reload.done() and [x.version for x in codes] == ["1"] * 16
            release.set()
            deadline = time.monotonic() + 30
            while not reload.done():
                assert time.monotonic() < deadline, "the reload never finished"
                time.sleep(0.01)
            assert reload.result() is True and c.compress(sprites[0][:1])[0].version == "2"
    finally:
        release.set()
        s.stop()


def test_a_replica_that_has_not_polled_yet_decodes_a_new_versions_code(tmp_path: Path, sprites, monkeypatch) -> None:
    """A review: replicas read a shared repository each on its own poll, and for up to --reload-interval-s after a
    version shipped, one that had not polled yet refused its codes with INVALID_ARGUMENT ("names model id ..., which
    this server lacks"), which no client retries. A code of a version not served here now has the repository read
    again, once in a while (a corrupted code cannot keep it being read), where the server polls: at 0, only SIGHUP
    reloads (a later review: a client's code swapped in a version copied in for a later SIGHUP)."""
    from disco.service.pipeline import Pipeline

    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    a, b = serve(repo, reload_interval_s=3600), serve(repo, reload_interval_s=3600)  # no poll comes in this test
    manual = serve(repo)  # --reload-interval-s 0: SIGHUP only
    reads: list[Path] = []
    load, forget = Repository.load, []

    def counted(root: Path, *args: Any, **kwargs: Any) -> Repository:
        reads.append(root)
        return load(root, *args, **kwargs)

    monkeypatch.setattr(Repository, "load", counted)
    monkeypatch.setattr(Pipeline, "forget_failed_loads", lambda self: forget.append(self))
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")
        assert a.run(a.running.reload()) is True
        with Client(a.target) as ca, Client(b.target) as cb, Client(manual.target) as cm:
            new = ca.compress(sprites[0][:2])
            assert {c.version for c in new} == {"2"}
            reads.clear()
            forget.clear()
            back = cb.decompress(new)  # b reads the repository again, finds dsprites/2, and decodes
            assert back.shape == (2, 64, 64, 1) and len(reads) == 1
            assert np.array_equal(back, ca.decompress(new))
            assert forget == []  # a read for a code does not retry the versions that failed to load: a poll does
            junk = bytes(new[0])[:1] + bytes([bytes(new[0])[1] ^ 0xFF]) + bytes(new[0])[2:]  # another model id
            with pytest.raises(InvalidArgument, match="which this server lacks"):
                cb.decompress([junk])  # within 5 s of the last: not read again
            assert len(reads) == 1
            with pytest.raises(InvalidArgument, match="which this server lacks"):
                cm.decompress(new)  # the operator's server: it waits for its SIGHUP
            assert len(reads) == 1
    finally:
        a.stop()
        b.stop()
        manual.stop()


def test_a_code_met_while_a_reload_warms_its_version_decodes_once_it_is_swapped_in(tmp_path: Path, sprites,
                                                                                  monkeypatch) -> None:
    """A review: a code of dsprites/2 arrived while the server's own reload (a poll's) warmed dsprites/2. It failed on
    the old snapshot and waited for that reload; the reload it then ran itself changed nothing, and the call was
    refused ("which this server lacks") by a server serving dsprites/2. A call reruns whenever the snapshot it ran
    on has been replaced."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    a, b = serve(), serve(repo, reload_interval_s=3600)  # a: the embedded models, whose dsprites/2 makes the codes
    with Client(a.target) as ca:
        new = ca.compress(sprites[0][:2], model="dsprites", version="2")  # (a loads its old dsprites/2 for it)
    started, release = hold_warm_up(monkeypatch, "2")
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")

        async def start() -> asyncio.Task[bool]:
            return asyncio.create_task(b.running.reload())  # what a poll does

        reload = b.run(start())
        assert started.wait(20)
        out: dict[str, Any] = {}

        def call() -> None:
            with Client(b.target) as cb:
                out["images"] = cb.decompress(new, timeout=30)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 20
        while b.running._refreshing is None:  # the call met the old snapshot and waits for a reload of its own
            assert time.monotonic() < deadline, "the call never asked for a reload"
            time.sleep(0.005)
        junk = bytes(new[0])[:1] + bytes([bytes(new[0])[1] ^ 0xFF]) + bytes(new[0])[2:]
        with Client(b.target, retry=RetryPolicy(max_attempts=1)) as cb:  # it waits for that reload too, but answers before its deadline (a
            # later review: DEADLINE_EXCEEDED after 2 s), UNAVAILABLE while the reload may still bring its version (and
            # another review: a version being loaded that moment was refused INVALID_ARGUMENT, which no client retries)
            with pytest.raises(Unavailable, match="which this server lacks .*; the repository is being read again, "
                                                  "which may bring it: retry"):
                cb.decompress([junk], timeout=1)
        release.set()
        caller.join(60)
        assert reload.done() and reload.result() is True
        assert out["images"].shape == (2, 64, 64, 1)
    finally:
        release.set()
        a.stop()
        b.stop()


def test_a_call_waiting_for_a_read_when_the_drain_begins_is_told_to_retry(tmp_path: Path, sprites,
                                                                          monkeypatch) -> None:
    """A review: SIGTERM cancelled the reload a code's call waited for, and the call was refused INVALID_ARGUMENT at
    once, for a version the repository held: it is UNAVAILABLE, which clients retry on another replica."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    a, b = serve(), serve(repo, reload_interval_s=3600)
    with Client(a.target) as ca:
        new = ca.compress(sprites[0][:2], model="dsprites", version="2")  # (a loads its old dsprites/2 for it)
    started, release = hold_warm_up(monkeypatch, "2")  # until the drain abandons it
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")
        out: dict[str, Any] = {}

        def call() -> None:
            with Client(b.target, retry=RetryPolicy(max_attempts=1)) as cb:
                try:
                    cb.decompress(new, timeout=30)
                except Exception as exc:  # noqa: BLE001 - what the caller heard, asserted below
                    out["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        assert started.wait(20)  # the call's read is warming dsprites/2
        b.run(b.running.stop(5))
        caller.join(30)
        assert isinstance(out.get("error"), Unavailable) and "this server is draining: retry" in str(out["error"])
    finally:
        release.set()
        a.stop()


def test_a_read_for_a_code_that_brings_a_version_has_every_process_reload(tmp_path: Path, sprites) -> None:
    """A review: under --processes 2 one process read the repository for a code and served the new latest version,
    while the other served the old one until its next poll (an hour there): unnamed Compress calls on one port made
    codes of either version. A read that brings a new snapshot sends the --processes parent SIGHUP, which it forwards
    to every process. (Here the parent is a process that reports the SIGHUP.)"""
    parent = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGHUP, lambda *_: (print('SIGHUP', flush=True), sys.exit(0)))\n"
                               "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    a, b = serve(), serve(repo, reload_interval_s=3600, parent_pid=parent.pid)
    try:
        with Client(a.target) as ca, Client(b.target) as cb:
            new = ca.compress(sprites[0][:1], model="dsprites", version="2")
            shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")
            assert cb.decompress(new).shape == (1, 64, 64, 1)
        assert parent.wait(10) == 0 and parent.stdout.read().strip() == "SIGHUP"
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()
        a.stop()
        b.stop()


def test_a_code_met_while_the_server_starts_leaves_the_start_alone(tmp_path: Path, sprites, monkeypatch) -> None:
    """A review: a code of a version not served arrived while the start warmed its models; the reload it asked for
    swapped in a new snapshot and closed the one the start was warming, and the start failed ("Abandoned")."""
    from disco.service.config import ServeConfig
    from disco.service.server import create_server

    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    a = serve()
    first, release = hold_warm_up(monkeypatch, "1")  # the start's first warm-up, below (a has warmed everything)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    try:
        with Client(a.target) as ca:
            new = ca.compress(sprites[0][:2], model="dsprites", version="2")
        starting = asyncio.run_coroutine_threadsafe(
            create_server(ServeConfig(repository=str(repo), host="127.0.0.1", port=port, metrics_port=0,
                                      reload_interval_s=3600)), loop)
        assert first.wait(30)
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")  # shipped meanwhile
        with Client(f"127.0.0.1:{port}", retry=None) as cb:
            with pytest.raises(InvalidArgument, match="which this server lacks"):
                cb.decompress(new, timeout=10)  # the start is not disturbed: the next poll brings dsprites/2
        release.set()
        b = starting.result(60)
        assert [f"{e.name}/{e.version}" for e in b.servicer.pipeline.repo.entries()] == ["dsprites/1"]
        asyncio.run_coroutine_threadsafe(b.stop(0), loop).result(60)
    finally:
        release.set()
        a.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_reload_the_message_limit_cannot_serve_is_refused(tmp_path: Path, caplog) -> None:
    """A review: --max-message-bytes is checked against the models at start (check_message_limit); a reload that
    brought a model with larger images was swapped in, and every call to it failed while health said SERVING."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo, max_message_bytes=8000)  # dsprites' 64x64 grey images fit; color_dsprites' need 14,792 bytes
    try:
        shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
        caplog.set_level(logging.ERROR)
        assert s.run(s.running.reload()) is False
        assert "--max-message-bytes 8000 is too small for the models served: one image of color_dsprites/1" in caplog.text
        assert s.running.servicer.pipeline.repo.names() == ["dsprites"]
    finally:
        s.stop()


def test_a_reload_cancelled_mid_warm_up_leaves_nothing_loaded_behind(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo)
    registry = s.running.metrics.registry
    try:
        shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")

        async def start() -> asyncio.Task[bool]:
            return asyncio.create_task(s.running.reload())

        async def cancel(task: asyncio.Task[bool]) -> None:  # as stop() does to a reload in progress
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # until it has ended: the load it waits for too

        reload = s.run(start())
        old = s.running.servicer.pipeline
        deadline = time.monotonic() + 10
        while not old._handed:  # the new snapshot has adopted dsprites/1 and is loading dsprites/2 (half a second)
            assert time.monotonic() < deadline, "the reload never reached its warm-up"
            time.sleep(0.005)
        s.run(cancel(reload), timeout=30)  # (a fixed pause here left the task pending at exit on a slow machine)
        assert reload.cancelled()
        assert s.running.servicer.pipeline.loaded() == ["dsprites/1"]  # the old snapshot kept its version
    finally:
        s.stop()
    assert registry.get_sample_value("disco_loaded_versions") == 0


def test_a_version_whose_onnx_outputs_disagree_with_its_model_json_is_refused_at_load(tmp_path: Path, caplog) -> None:
    """dsprites/5 verifies (hashes and fingerprint updated) but runs color_dsprites' 3-channel decoder while its
    model.json says 64x64x1: it used to be served, its codes decoding to images of another shape than ListModels
    gave (and, decoded beside dsprites/4's, failing the request with INTERNAL). Warm-up now checks every output."""
    from disco.service.repository import fingerprint

    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")

    def other_decoder(d: Path, m: dict) -> None:
        shutil.copy(EMBEDDED / "color_dsprites" / "1" / "decoder.onnx", d / "decoder.onnx")
        m["fingerprint"] = fingerprint((d / "decoder.onnx").read_bytes(), m["codec"]).hex()

    add_version(repo, "dsprites", "4", "5", other_decoder)
    assert [e.version for e in Repository.load(repo).entries()] == ["4", "5"]  # it verifies
    s = serve(repo)
    try:
        with Client(s.target) as c:
            assert [f"{m.name}/{m.version}" for m in c.models()] == ["dsprites/4"]
        assert any("dsprites/5" in r.getMessage() and "decoder probs is [1, 3, 64, 64] for a batch of 1, but model.json "
                   "(latent_dim 10, input 64x64x1) needs [1, 1, 64, 64]" in r.getMessage() for r in caplog.records)
    finally:
        s.stop()


def test_versions_sharing_a_fingerprint_route_codes_to_the_newest(tmp_path: Path, sprites) -> None:
    """dsprites/5 keeps dsprites/4's decoder and tables (here: only its description differs), so both verify its
    codes. Decompress used to name (and load) the oldest, and a Traverse naming the version Compress had named
    was refused as naming another model."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    add_version(repo, "dsprites", "4", "5", lambda d, m: m.update(description="dsprites/4, described anew"))
    # the same decoder under a name sorted after it (a canary copy): newest means within a name, not across names
    shutil.copytree(repo / "dsprites" / "5", repo / "dsprites_canary" / "1")
    meta = json.loads((repo / "dsprites_canary" / "1" / "model.json").read_text())
    (repo / "dsprites_canary" / "1" / "model.json").write_text(json.dumps({**meta, "name": "dsprites_canary", "version": "1"}))
    s = serve(repo, default_model="dsprites")
    try:
        with Client(s.target) as c:
            code = c.compress(sprites[0][:1])[0]
            assert code.version == "5"
            with grpc.insecure_channel(s.target) as ch:
                stub = codec_pb2_grpc.CodecStub(ch)
                r = stub.Decompress(pb.DecompressRequest(codes=[code.data]))
                assert [(m.name, m.version) for m in r.models] == [("dsprites", "5")]
                assert "dsprites/4" not in s.running.servicer.pipeline.loaded()  # the latest of each name only
                for version in ("5", "4"):  # either names a decoder that decodes this code alike
                    t = stub.Traverse(pb.TraverseRequest(code=code.data, model=pb.ModelRef(name="dsprites", version=version)))
                    assert t.images.tensor.data == r.images.tensor.data
    finally:
        s.stop()


def test_a_server_binds_a_bare_ipv6_host() -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    s = serve(host="::1")  # "could not bind ::1:0" before: gRPC read the last group as the port
    try:
        with Client(f"[::1]:{s.running.port}") as c:
            assert c.models()
    finally:
        s.stop()


def test_connection_recycling_has_its_own_grace_not_the_drains(sprites) -> None:
    """--grace-s (SIGTERM) also set how long calls on a recycled connection could run: with 0, a 3 s stream on a
    connection 1 s old ended UNAVAILABLE "max connection age"."""
    s = serve(max_connection_age_s=1.0, grace_s=0.0)
    try:
        def slowly() -> Iterator[pb.CompressRequest]:
            x = sprites[0][:1]
            for _ in range(30):
                time.sleep(0.1)
                yield pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                          dtype=pb.DTYPE_UINT8)))

        with grpc.insecure_channel(s.target) as ch:
            assert len(list(codec_pb2_grpc.CodecStub(ch).CompressStream(slowly(), timeout=30))) == 30
    finally:
        s.stop()


def test_a_withdrawn_versions_series_go_once_its_calls_end(tmp_path: Path, sprites) -> None:
    """disco_images_total and disco_code_bytes_per_image of a version no longer in the repository stayed for good."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
    s = serve(repo)

    def series(model: str) -> set[str]:
        return {smp.name for f in s.running.metrics.registry.collect() for smp in f.samples
                if smp.labels.get("model") == model or smp.labels.get("batcher", "").startswith(model + "/")}

    try:
        with Client(s.target) as c:
            c.decompress(c.compress(sprites[0][:2], model="dsprites"))
            assert {"disco_images_total", "disco_code_bytes_per_image_count"} <= series("dsprites")
            shutil.rmtree(repo / "dsprites")
            assert s.run(s.running.reload()) is True
            deadline = time.monotonic() + 10
            while series("dsprites"):  # the old snapshot drains, then closes
                assert time.monotonic() < deadline, series("dsprites")
                time.sleep(0.05)
            c.compress(sprites[0][:1].repeat(3, axis=-1), model="color_dsprites")
            assert "disco_images_total" in series("color_dsprites")  # the one still served keeps its own
            assert not [k for k in s.running.metrics._children if "dsprites" in k[1]]

            # Withdrawn while a call still holds its snapshot, then back before that call ends: the series it has
            # again are not the withdrawn one's to remove (they were, when the old snapshot drained)
            shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
            assert s.run(s.running.reload()) is True
            c.compress(sprites[0][:1], model="dsprites")
            held = s.running.servicer.pipeline.in_use()
            held.__enter__()  # a long call on this snapshot
            shutil.move(repo / "dsprites", tmp_path / "parked")
            assert s.run(s.running.reload()) is True
            shutil.move(tmp_path / "parked", repo / "dsprites")
            assert s.run(s.running.reload()) is True
            c.compress(sprites[0][:2], model="dsprites")
            held.__exit__(None, None, None)  # the call ends: the withdrawing snapshot drains and retires
            time.sleep(1.0)
            count = {"method": "Compress", "model": "dsprites", "version": "4"}
            assert s.running.metrics.registry.get_sample_value("disco_images_total", count) == 3
    finally:
        s.stop()


def test_reloads_that_change_nothing_do_not_pile_up(tmp_path: Path) -> None:
    """One task per SIGHUP was kept for good when the reload changed nothing."""
    s = serve()
    try:
        async def hups() -> int:
            for _ in range(20):
                s.running.reload_soon()
                await asyncio.sleep(0.05)
            return len(s.running._tasks)

        assert s.run(hups()) <= 3

        async def hup_while_draining() -> list[asyncio.Task]:
            stopping = asyncio.ensure_future(s.running.stop(1.0))
            await asyncio.sleep(0)  # stop() has begun: it cancelled the tasks it had
            s.running.reload_soon()  # a reload now would run against a closing pipeline and a shut executor
            await stopping
            return [t for t in s.running._tasks if not t.cancelled()]

        assert all(t.done() for t in s.run(hup_while_draining()))
    finally:
        s.stop()


def test_processes_refuse_a_port_another_server_listens_on(caplog) -> None:
    """The children bind with SO_REUSEPORT, so a server left on the port (bound the same way) was joined silently."""
    from disco.service.server import main, port_taken

    s = serve(port=0, reuse_port=True)
    try:
        port = s.running.port
        assert port_taken("127.0.0.1", port) is not None
        assert main(["--host", "127.0.0.1", "--port", str(port), "--processes", "2", "--metrics-port", "0"]) == 2
        assert any("another server listens there" in r.getMessage() for r in caplog.records)
    finally:
        s.stop()
    assert port_taken("127.0.0.1", port) is None
    caplog.clear()  # an address not of this machine is not "another server"
    assert main(["--host", "192.0.2.1", "--port", str(port), "--processes", "2", "--metrics-port", "0"]) == 2
    assert [r.getMessage() for r in caplog.records if "could not bind" in r.getMessage()
            and "Cannot assign requested address" in r.getMessage() and "another server" not in r.getMessage()]


def test_calls_whose_deadline_passes_as_they_are_answered_are_counted_so_and_log_nothing(sprites, caplog) -> None:
    """Deadlines close to the queue's wait: the handler answered (or aborted) after gRPC core had ended the call.
    gRPC logged an ERROR with a traceback for each, and the server counted such calls OK while the client saw
    DEADLINE_EXCEEDED (42 of 1,283 in the chaos review's run)."""
    s = serve(max_delay_ms=20.0)  # a part waits about 20 ms in the queue before a worker takes it
    x = sprites[0][:8]
    request = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                   dtype=pb.DTYPE_UINT8)))
    seen: dict[str, int] = {}

    async def load() -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            await stub.Compress(request, timeout=10)
            seen.clear()
            stop = time.monotonic() + 3

            async def caller(i: int) -> None:
                while time.monotonic() < stop:
                    try:
                        await stub.Compress(request, timeout=0.015 + 0.005 * i)  # 15-40 ms, around the queue's wait
                        seen["OK"] = seen.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as exc:
                        seen[exc.code().name] = seen.get(exc.code().name, 0) + 1

            await asyncio.gather(*(caller(i) for i in range(6)))
        await asyncio.sleep(0.5)

    try:
        asyncio.run(load())
        ok_before = 1  # the first call, before the race
        counted_ok = s.running.metrics.registry.get_sample_value("disco_requests_total", {"method": "Compress", "code": "OK"})
        n = sum(seen.values())
        assert seen.get("OK", 0) > 0 and seen.get("DEADLINE_EXCEEDED", 0) > 0, seen  # both sides of the race
        # An answer sent a moment before the client's own timer fires is OK here and DEADLINE_EXCEEDED there (2 in
        # 1,204 on an idle machine, more on a loaded one): a loose bound. test_an_answer_ready_after_the_deadline_*
        # checks the rule itself.
        assert counted_ok - ok_before - seen["OK"] <= max(5, 0.1 * n), (counted_ok - ok_before, seen)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    finally:
        s.stop()


async def stop_and_reload(r, stop_first: bool) -> list:  # noqa: ANN001
    """Running.stop() and Running.reload(), the second begun 50 ms after the first: their results, in that order."""
    first = asyncio.ensure_future(r.stop(1.0) if stop_first else r.reload())
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(r.reload() if stop_first else r.stop(1.0))
    return list(await asyncio.gather(first, second))


def test_stop_closes_what_a_reload_left_draining_and_a_reload_it_meets(tmp_path: Path, sprites) -> None:
    """stop() cancelled the task retiring the old snapshot and closed nothing of it (its batcher workers stayed
    pending, its sessions loaded); a reload begun after stop() failed on the shut executor (an ERROR and a load
    failure), and one begun before swapped in a pipeline that stop() never closed."""
    def repo_of(versions: tuple[str, ...]) -> Path:
        root = tmp_path / "-".join(versions)
        for v in versions:
            shutil.copytree(EMBEDDED / "dsprites" / v, root / "dsprites" / v)
        return root

    def left(s: ServerThread) -> list[str]:
        async def tasks() -> list[str]:
            return [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()
                    and t.get_name().startswith("batcher-")]
        return s.run(tasks())

    repo = repo_of(("3", "4"))
    s = serve(repo, max_delay_ms=3000)  # a call waits 3 s in the queue: the old snapshot cannot drain before stop()
    try:
        x = sprites[0][:8]
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            waiting = stub.Compress.future(pb.CompressRequest(
                images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8))), timeout=10)
            time.sleep(0.2)
            shutil.rmtree(repo / "dsprites" / "4")
            assert s.run(s.running.reload()) is True
            s.run(s.running.stop(0.5))
            with pytest.raises(grpc.RpcError):
                waiting.result()
        assert left(s) == [] and s.running.metrics.registry.get_sample_value("disco_loaded_versions") == 0
    finally:
        s.stop()

    for stop_first in (True, False):
        repo = repo_of(("2", "3")) if stop_first else repo_of(("1", "2"))
        s = serve(repo)
        shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")  # a reload has something to load
        try:
            results = s.run(stop_and_reload(s.running, stop_first))
            assert results[1 if stop_first else 0] is (False if stop_first else True), results
            assert left(s) == [] and s.running.metrics.registry.get_sample_value("disco_loaded_versions") == 0
            assert not s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")
        finally:
            s.stop()


def test_a_shutdown_abandons_the_warm_up_of_a_reload_under_way(tmp_path: Path, caplog) -> None:
    """SIGTERM while a reload warmed a version waited for the whole warm-up (every batch size up to max_batch),
    well past --grace-s; the warm-up now stops between sizes once its pipeline closes, and nothing counts it as a
    load failure or remembers it against the version."""
    caplog.set_level(logging.INFO)
    repo = dsprites_repo(tmp_path, "4")
    s = serve(repo)
    try:
        (repo / "dsprites" / "serving.json").write_text('{"max_batch": 1024}')  # a warm-up of minutes, here

        async def reload_then_stop() -> None:
            s.running.reload_soon()
            await asyncio.sleep(1.0)  # the reload is warming the changed version
            await s.running.stop(0)

        s.run(reload_then_stop(), timeout=30)  # without the abandon: until the 1,024 sizes were warmed
        assert not s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")
        assert s.running.metrics.registry.get_sample_value("disco_loaded_versions") == 0
        assert "could not load" not in caplog.text and "refus" not in caplog.text
    finally:
        s.stop()


def test_a_served_version_the_scan_cannot_read_keeps_serving_and_one_removed_is_withdrawn(tmp_path: Path,
                                                                                          caplog) -> None:
    """A served version whose model.json went missing, or whose folder is a symbolic link that no longer leads
    anywhere, was withdrawn without a word: its codes stopped decoding. It is now refused (logged once, counted) and
    served as verified before; a folder removed is withdrawn."""
    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "3", repo / "dsprites" / "3")
    shutil.copytree(EMBEDDED / "dsprites" / "4", tmp_path / "v4")
    (repo / "dsprites" / "4").symlink_to(tmp_path / "v4")
    s = serve(repo)
    served = lambda: [f"{e.name}/{e.version}" for e in s.running.servicer.pipeline.repo.entries()]  # noqa: E731
    failures = lambda: s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")  # noqa: E731
    try:
        assert served() == ["dsprites/3", "dsprites/4"]
        (repo / "dsprites" / "3" / "model.json").unlink()
        (tmp_path / "v4").rename(tmp_path / "v4-moved")  # the link leads nowhere
        for _ in range(2):  # the second reload meets the same: logged and counted once
            s.run(s.running.reload(), timeout=30)
            assert served() == ["dsprites/3", "dsprites/4"]
        assert failures() == 2
        assert caplog.text.count("refusing model") == 2, caplog.text  # once each, over two reloads
        assert "its folder is a broken symbolic link; still serving it as verified before" in caplog.text
        shutil.rmtree(repo / "dsprites" / "3")  # removed: withdrawn
        s.run(s.running.reload(), timeout=30)
        assert served() == ["dsprites/4"]
    finally:
        s.stop()
    # The model's folder a link that leads nowhere (another volume gone): kept as well, not withdrawn
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", tmp_path / "color" / "1")
    (repo / "color_dsprites").symlink_to(tmp_path / "color")
    s = serve(repo)
    try:
        (tmp_path / "color").rename(tmp_path / "color-moved")
        s.run(s.running.reload(), timeout=30)
        assert "color_dsprites/1" in served()
        assert "its model's folder is a broken symbolic link; still serving it as verified before" in caplog.text
    finally:
        s.stop()


def test_a_repository_with_nothing_loadable_is_refused_and_its_refusals_logged_once(tmp_path: Path, caplog) -> None:
    """With every served version removed and only a broken one left, each poll logged the broken version again."""
    caplog.set_level(logging.INFO)
    repo = dsprites_repo(tmp_path, "4")
    s = serve(repo)
    try:
        add_version(repo, "dsprites", "4", "5", lambda d, m: m["factors"][0].update(min="low"))
        shutil.rmtree(repo / "dsprites" / "4")
        for _ in range(3):
            assert s.run(s.running.reload(), timeout=30) is False  # the old snapshot serves on
        assert caplog.text.count("refusing model") == 1, caplog.text
        assert caplog.text.count("reload refused, still serving the old snapshot") == 1, caplog.text
    finally:
        s.stop()


def test_a_version_replaced_in_place_by_another_decoder_is_warned_about(tmp_path: Path, caplog) -> None:
    """Codes the old files made no longer decode: the operator hears it, not only 'reloaded'."""
    caplog.set_level(logging.INFO)
    repo = dsprites_repo(tmp_path, "4")
    shutil.copytree(EMBEDDED / "dsprites" / "3", repo / "dsprites" / ".3.tmp")
    s = serve(repo)
    try:
        was = s.running.servicer.pipeline.repo.get("dsprites").fingerprint.hex()[:12]
        add_version(repo, "dsprites", ".3.tmp", "4.new", lambda d, m: m.update(version="4"))
        shutil.rmtree(repo / "dsprites" / "4")
        (repo / "dsprites" / "4.new").rename(repo / "dsprites" / "4")
        assert s.run(s.running.reload(), timeout=30) is True
        now = s.running.servicer.pipeline.repo.get("dsprites").fingerprint.hex()[:12]
        assert now != was
        assert f"dsprites/4 was replaced in place by a different decoder or codec tables (fingerprint {now}, was {was})" \
            in caplog.text
    finally:
        s.stop()


def test_the_decode_cache_gauge_reads_the_serving_snapshots_cache(tmp_path: Path, sprites) -> None:
    """Every reload attempt built a cache that set disco_decode_cache_bytes to 0, also one refused, while the
    serving snapshot's cache stayed full and answered from it; and a replaced snapshot's cache, filled by a call
    finishing on it, set it to its own size."""
    repo = dsprites_repo(tmp_path, "4")
    s = serve(repo, decode_cache_mb=8)
    gauge = lambda: s.running.metrics.registry.get_sample_value("disco_decode_cache_bytes")  # noqa: E731
    try:
        with Client(s.target) as c:
            c.decompress(c.compress(sprites[0][:3]))
        held = gauge()
        assert held and held > 0
        add_version(repo, "dsprites", "4", "5", lambda d, m: (d / "encoder.onnx").write_bytes(b"not onnx"))
        assert s.run(s.running.reload(), timeout=30) is False  # 5 does not load: refused, the old snapshot serves
        assert gauge() == held
        # A reload that succeeds: the gauge reads the new snapshot's cache, which starts empty, and a call still
        # finishing on the replaced snapshot (its cache filled after the swap) no longer sets it to the old size.
        old = s.running.servicer.pipeline
        shutil.rmtree(repo / "dsprites" / "5")
        add_version(repo, "dsprites", "4", "5", lambda d, m: None)
        assert s.run(s.running.reload(), timeout=30) is True and gauge() == 0
        assert old.cache is not None
        old.cache.put(b"late", np.zeros((1, 1, 64, 64), np.float32), old.entry())
        assert gauge() == 0
        with Client(s.target) as c:
            c.decompress(c.compress(sprites[0][:3]))
        assert gauge() > 0  # three images, now in the serving snapshot's cache
    finally:
        s.stop()


def test_a_bad_serving_json_does_not_make_known_refusals_count_again(tmp_path: Path, caplog) -> None:
    """A serving.json that does not parse is refused before any version is read: it knows of no refusal, and
    recording that as 'none' made a broken version, unchanged, logged and counted anew once it was fixed."""
    caplog.set_level(logging.INFO)
    repo = dsprites_repo(tmp_path, "4")
    s = serve(repo)
    failures = lambda: s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")  # noqa: E731
    try:
        add_version(repo, "dsprites", "4", "5", lambda d, m: m["factors"][0].update(min="low"))
        assert s.run(s.running.reload(), timeout=30) is False and failures() == 1
        (repo / "dsprites" / "serving.json").write_text("{not json")
        assert s.run(s.running.reload(), timeout=30) is False and failures() == 2  # the serving.json, once
        (repo / "dsprites" / "serving.json").unlink()
        assert s.run(s.running.reload(), timeout=30) is False and failures() == 2  # 5 is known: not again
        assert caplog.text.count("refusing model") == 1, caplog.text
    finally:
        s.stop()



def test_the_metrics_server_serves_both_address_families_and_stops_at_once() -> None:
    """A review: closing /metrics waited out socketserver's 0.5 s poll on the event loop, so every exit took up to
    half a second past --grace-s (with --grace-s 1 an idle server exited after 0.74 s with metrics, 0.11 s without).
    Closed right after it starts, the old server waited that whole poll."""
    from disco.service.metrics import Metrics

    hosts = ["127.0.0.1"] + (["::1"] if socket.has_ipv6 else [])
    for host in hosts:
        m = Metrics()
        m.requests.labels("Compress", "OK").inc()
        port = free_port()
        m.serve(port, f"[{host}]" if ":" in host else host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'disco_requests_total{code="OK",method="Compress"} 1.0' in text
        t0 = time.perf_counter()
        m.close()
        took = time.perf_counter() - t0
        assert took < 0.3, took  # at most the 20 ms poll, where the old one waited up to 500 ms
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
