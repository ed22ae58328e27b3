"""Per-model serving settings (<root>/<name>/serving.json), like Triton's per-model config: they override the
server's batching flags for that model only, are checked strictly, and a hot reload applies them."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from disco.client import Client
from disco.service.repository import EMBEDDED, Repository, check_meta, load_serving
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from conftest import serve


@pytest.mark.parametrize(("text", "message"), [
    ('{"max_batch": 8, "max_delay_ms": 0.5}', None),
    ('{"max_bach": 8}', "unknown settings ['max_bach']"),
    ('{"max_batch": 0}', "max_batch is 0, expected an integer from 1 to 1024"),
    ('{"max_batch": 2.5}', "max_batch is 2.5, expected an integer from 1 to 1024"),
    ('{"max_batch": 100000000}', "max_batch is 100000000, expected an integer from 1 to 1024"),
    ('{"max_batch": 1e400}', "max_batch is inf, expected an integer"),
    ('{"max_batch": 1' + 400 * "0" + '}', "expected an integer from 1 to 1024"),
    ('{"batch_workers": true}', "batch_workers is True, expected an integer from 1 to 64"),
    ('{"max_delay_ms": -1}', "max_delay_ms is -1, expected a number from 0 to 1000"),
    ('{"gather_turns": 2000}', "gather_turns is 2000, expected an integer from 0 to 1024"),
    ('{"max_delay_ms": NaN}', "does not parse: NaN is not a number a setting can take"),
    ('{"max_delay_ms": Infinity}', "does not parse: Infinity is not a number"),
    ('[8]', "holds list, expected an object"),
    ('{"max_batch": 8', "does not parse"),
])
def test_serving_json_is_checked_by_name(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "serving.json"
    path.write_text(text)
    (tmp_path / "latin1.json").write_bytes(b'{"max_batch": "\xe9"}')
    with pytest.raises(ValueError, match="does not parse"):  # not UTF-8
        load_serving(tmp_path / "latin1.json")
    if message is None:
        assert load_serving(path) == {"max_batch": 8, "max_delay_ms": 0.5}
        return
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_serving(path)


def repo_with(tmp_path: Path, serving: dict | None) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED / "dsprites" / "4", repo / "dsprites" / "4")
    shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")
    if serving is not None:
        (repo / "dsprites" / "serving.json").write_text(json.dumps(serving))
    return repo


def batch_runs(s, batcher: str) -> tuple[float, float]:  # noqa: ANN001
    get = s.running.metrics.registry.get_sample_value
    labels = {"batcher": batcher}
    return get("disco_batch_size_count", labels) or 0.0, get("disco_batch_size_sum", labels) or 0.0


def test_every_setting_reaches_the_models_batchers(tmp_path: Path) -> None:
    from disco.service.batcher import BatchConfig
    from disco.service.pipeline import batching_for

    settings = {"max_batch": 8, "max_queue": 100, "max_delay_ms": 2.0, "batch_workers": 3, "gather_turns": 0}
    e = Repository.load(repo_with(tmp_path, settings)).get("dsprites")
    got = batching_for(e, BatchConfig())
    assert (got.max_batch, got.max_queue, got.max_delay_s, got.workers, got.gather_turns) == (8, 100, 0.002, 3, 0)
    assert batching_for(Repository.load(EMBEDDED).get("dsprites"), BatchConfig(gather_turns=7)).gather_turns == 7


def test_a_models_settings_override_the_servers_for_it_alone(tmp_path: Path, sprites) -> None:
    s = serve(repo_with(tmp_path, {"max_batch": 8}), max_batch=64)
    try:
        with Client(s.target) as c:
            c.compress(sprites[0][:20], model="dsprites")  # runs of at most 8 rows
            c.compress(sprites[0][:20].repeat(3, axis=-1), model="color_dsprites")  # the server's 64
        assert batch_runs(s, "dsprites/4/encode") == (3.0, 20.0)  # 8 + 8 + 4
        assert batch_runs(s, "color_dsprites/1/encode") == (1.0, 20.0)
    finally:
        s.stop()


def test_a_models_smaller_queue_lowers_the_image_limit_listmodels_states(tmp_path: Path, sprites) -> None:
    """A serving.json queue below --max-images-per-request: ListModels stated the server's 4096 and the SDK sent
    requests that could never fit the queue; it states the smaller limit, which the SDK then cuts to."""
    s = serve(repo_with(tmp_path, {"max_queue": 100}))
    try:
        with grpc.insecure_channel(s.target) as ch:
            listed = codec_pb2_grpc.CodecStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert listed.max_images_per_request == 100
        with Client(s.target) as c:
            assert len(c.compress(sprites[0][:250], model="dsprites")) == 250  # cut to requests of 100
        assert batch_runs(s, "dsprites/4/encode")[1] == 250.0
    finally:
        s.stop()


def test_reload_applies_changed_settings_and_refuses_bad_ones(tmp_path: Path, sprites) -> None:
    repo = repo_with(tmp_path, None)
    s = serve(repo)
    try:
        assert Repository.load(repo).get("dsprites").serving == {}
        (repo / "dsprites" / "serving.json").write_text('{"max_batch": 5}')
        assert s.run(s.running.reload()) is True  # same versions, new settings: a new snapshot
        with Client(s.target) as c:
            c.compress(sprites[0][:12], model="dsprites")
            assert batch_runs(s, "dsprites/4/encode") == (3.0, 12.0)  # 5 + 5 + 2
            (repo / "dsprites" / "serving.json").write_text('{"max_batch": "lots"}')
            assert s.run(s.running.reload()) is False  # refused with a log line: the old snapshot keeps serving
            assert s.run(s.running.reload()) is False  # the same refusal again: counted once (below)
            c.compress(sprites[0][:12], model="dsprites")
            assert batch_runs(s, "dsprites/4/encode") == (6.0, 24.0)
            assert [m.name for m in c.models()] == ["color_dsprites", "dsprites"]
        assert (s.running.metrics.registry.get_sample_value("disco_model_load_failures_total") or 0) == 1
    finally:
        s.stop()


def test_a_bad_serving_json_stops_the_server_from_starting(tmp_path: Path) -> None:
    repo = repo_with(tmp_path, {"max_batch": 0})
    r = subprocess.run([sys.executable, "-m", "disco.service.server", "--repository", str(repo), "--port", "0",
                        "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr  # a message, no traceback
    assert "serving.json: max_batch is 0, expected an integer from 1 to 1024" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", str(port),
                            "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"could not bind 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port", "0",
                            "--metrics-port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"could not serve metrics on port {port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(description=5), "description 5"),
    (lambda m: m.update(factors=None), "factors None"),
    (lambda m: m["factors"][1].update(dim=99), "factor 1"),
    (lambda m: m["factors"][0].pop("name"), "factor 0"),
    (lambda m: m["factors"][0].update(max=float("nan")), "factor 0"),
    (lambda m: m["factors"][0].update(min=9, max=1), "factor 0"),
    (lambda m: m["factors"][1].update(name=m["factors"][0]["name"]), "factor names repeat"),
    (lambda m: m["input"].update(height="64x"), "input"),
    (lambda m: m.update(latent_dim=True), "latent_dim True"),
    (lambda m: m.update(latent_dim=10**6), "latent_dim 1000000, expected at most 4096"),
    # warm-up would ask for 37 GiB: the memory error was the machine's, and refused every reload of every model
    (lambda m: m["input"].update(height=100000, width=100000), "input 100000x100000x1 (HxWxC), expected at most 4096x4096x4"),
    (lambda m: m["input"].update(channels=5), "expected at most 4096x4096x4"),
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "files"),
    (lambda m: m.pop("fingerprint"), "lacks ['fingerprint']"),
])
def test_model_json_fields_are_checked_before_a_version_is_served(edit, says: str) -> None:
    """A model.json field of the wrong type or range refuses its version at load (naming the field), instead of
    failing requests later (ListModels answered INTERNAL for a factor whose min was a string)."""
    folder = EMBEDDED / "dsprites" / "4"
    meta = json.loads((folder / "model.json").read_text())
    check_meta(folder, meta)  # as shipped
    edit(meta)
    with pytest.raises(ValueError) as info:
        check_meta(folder, meta)
    assert "model.json" in str(info.value) and says in str(info.value), str(info.value)


def test_a_codec_field_missing_is_named(tmp_path: Path) -> None:
    """A bare 'format' (the KeyError's text) told the operator nothing."""
    from disco.service.repository import fingerprint, load_entry

    folder = tmp_path / "dsprites" / "4"
    shutil.copytree(EMBEDDED / "dsprites" / "4", folder)
    meta = json.loads((folder / "model.json").read_text())
    del meta["codec"]["format"]
    meta["fingerprint"] = fingerprint((folder / "decoder.onnx").read_bytes(), meta["codec"]).hex()  # it verifies
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.json: the codec \(or one of its qualities\) lacks the field 'format'"):
        load_entry(folder)


def test_version_folders_are_numbers(tmp_path: Path) -> None:
    """"0005", "abc" and "²" are refused, naming the folder; "5" beside them serves; a hidden folder (a version
    being staged) is skipped, neither served nor refused."""
    for v in ("5", "0005", "abc", "²", ".6.tmp"):
        folder = tmp_path / "dsprites" / v
        shutil.copytree(EMBEDDED / "dsprites" / "4", folder)
        meta = json.loads((folder / "model.json").read_text())
        meta["version"] = v
        (folder / "model.json").write_text(json.dumps(meta))
    repo = Repository.load(tmp_path)
    assert [e.version for e in repo.entries()] == ["5"]
    assert sorted(Path(f).name for f in repo.refused) == ["0005", "abc", "²"]
    assert all("is not a version number" in why for why in repo.refused.values())


def test_a_version_folder_without_model_json_is_refused_by_name_once(tmp_path: Path, caplog) -> None:
    """A review: a folder dsprites/8 holding the ONNX files but no model.json was ignored without a word (one with a
    bad model.json is refused with a log line). A folder whose name is no version number, or hidden, is not a
    version being shipped: left alone."""
    import logging

    shutil.copytree(EMBEDDED / "dsprites" / "4", tmp_path / "dsprites" / "4")
    for name in ("8", "notes", ".9.tmp"):
        (tmp_path / "dsprites" / name).mkdir()
        shutil.copy(EMBEDDED / "dsprites" / "4" / "encoder.onnx", tmp_path / "dsprites" / name)
    caplog.set_level(logging.INFO)
    first = Repository.load(tmp_path)
    again = Repository.load(tmp_path, served=first, reported=first.refused)  # a poll: nothing new to say
    assert [e.version for e in again.entries()] == ["4"]
    assert list(again.refused) == [str(tmp_path / "dsprites" / "8")]
    assert "it has no model.json" in again.refused[str(tmp_path / "dsprites" / "8")]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing model")]
    assert len(said) == 1 and f"{tmp_path / 'dsprites' / '8'}: it has no model.json" in said[0], said


def test_a_poll_hashes_only_the_files_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every poll verifies every version again; a file's hash is kept while its stat is unchanged, and a file changed
    in place (same size, other bytes) is read again and refused."""
    import os

    from disco.service import repository

    for v in ("3", "4"):
        shutil.copytree(EMBEDDED / "dsprites" / v, tmp_path / "dsprites" / v)
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.suffix == ".onnx":
            opened.append(f"{self.parent.name}/{self.name}")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    first = Repository.load(tmp_path)
    assert sorted(opened) == sorted(f"{v}/{f}" for v in ("3", "4") for f in ("decoder.onnx", "decoder.onnx", "encoder.onnx"))
    opened.clear()
    Repository.load(tmp_path, served=first)  # files changed less than 2 s ago: a later write in the same tick of a
    assert len(opened) == 6  # coarse file system clock would keep their stat, so their hashes are not kept yet

    class Later:  # 10 s on
        @staticmethod
        def time() -> float:
            return __import__("time").time() + 10

    monkeypatch.setattr(repository, "time", Later)
    first = Repository.load(tmp_path, served=first)
    opened.clear()
    again = Repository.load(tmp_path, served=first)
    assert opened == [] and [e.version for e in again.entries()] == ["3", "4"]
    encoder = tmp_path / "dsprites" / "4" / "encoder.onnx"
    data = bytearray(encoder.read_bytes())
    data[-1] ^= 1  # same size, other bytes
    stat = encoder.stat()
    encoder.write_bytes(bytes(data))
    os.utime(encoder, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its modification time put back
    opened.clear()
    fresh = Repository.load(tmp_path)
    assert opened == ["4/encoder.onnx"]
    assert str(tmp_path / "dsprites" / "4") in fresh.refused and "sha-256" in fresh.refused[str(tmp_path / "dsprites" / "4")]
    assert len(repository._HASHES) <= 4097


def test_large_requests_are_refused_before_their_pixels_when_the_queue_cannot_take_them(tmp_path: Path, sprites,
                                                                                        monkeypatch) -> None:
    """A version not loaded yet has no queue to look at, so a request its serving.json queue could never hold made
    its pixels and loaded the version before it was refused. And several large requests arriving together all
    passed the room check at an empty queue and all made their pixels (each 4096 RGB images: 192 MiB of float32)
    before the first of them queued: the room is now held until they can queue, through the read of their files
    (kept until the reading thread ends, should the caller leave) and the load of an old version."""
    import asyncio
    import io
    import threading
    import time

    from PIL import Image

    from disco.service import images
    from disco.service.pipeline import Pipeline

    repo = repo_with(tmp_path, {"max_queue": 100})
    shutil.copytree(EMBEDDED / "dsprites" / "3", repo / "dsprites" / "3")  # an old version, loaded on demand
    made: list[int] = []
    reading, loading = threading.Event(), threading.Event()
    read_s = [1.0]
    from_raw, from_files, build = images.from_raw, images.from_files, Pipeline._build

    def spy_raw(*args: Any) -> np.ndarray:  # the pixels made: a refusal (room) comes before from_raw allocates them
        x = from_raw(*args)
        made.append(len(x))
        return x

    def slow_files(*args: Any) -> np.ndarray:  # each read takes long enough for the next request to arrive
        made.append(len(args[0]))
        reading.set()
        time.sleep(read_s[0])
        return from_files(*args)

    async def slow_build(self: Pipeline, *args: Any) -> Any:  # and so does the load of an old version
        loading.set()
        await asyncio.sleep(1.0)
        return await build(self, *args)

    monkeypatch.setattr(images, "from_raw", spy_raw)
    monkeypatch.setattr(images, "from_files", slow_files)
    monkeypatch.setattr(Pipeline, "_build", slow_build)
    s = serve(repo, batch_workers=1)  # one run per batcher at a time: a busy worker leaves requests queued
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            x = sprites[0][:1].repeat(150, axis=0)
            with pytest.raises(grpc.RpcError) as info:
                stub.Compress(pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
                    data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8)),
                    model=pb.ModelRef(name="dsprites", version="3")), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "can never fit the dsprites/3/encode queue of 100" in info.value.details()
            assert made == [] and "dsprites/3" not in s.running.servicer.pipeline.loaded()

            buf = io.BytesIO()
            Image.new("L", (64, 64), 200).save(buf, format="PNG")
            files = pb.CompressRequest(images=pb.Images(files=pb.EncodedImages(files=[buf.getvalue()] * 60)),
                                       model=pb.ModelRef(name="dsprites"))

            def refused(request: pb.CompressRequest) -> str:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Compress(request, timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
                return info.value.details()

            first = stub.Compress.future(files, timeout=30)
            assert reading.wait(10)
            # 60 being read + 60 more > 100
            assert "0 images queued and 60 on their way in, 60 more would pass the limit of 100" in refused(files)
            assert len(first.result().codes) == 60
            assert made == [60]  # the refused request read nothing
            assert len(stub.Compress(files, timeout=30).codes) == 60  # the room is let go once they queue

            made.clear()
            reading.clear()
            gone = stub.Compress.future(files, timeout=30)
            assert reading.wait(10)
            gone.cancel()  # its thread reads on: the room stays taken until it ends
            time.sleep(0.2)
            assert "60 on their way in" in refused(files)
            time.sleep(1.2)
            assert len(stub.Compress(files, timeout=30).codes) == 60
            assert made == [60, 60]

            read_s[0] = 0.0
            made.clear()
            old = pb.CompressRequest(images=files.images, model=pb.ModelRef(name="dsprites", version="3"))
            first = stub.Compress.future(old, timeout=30)  # read at once, then dsprites/3 loads for a second
            assert loading.wait(10)
            time.sleep(0.2)
            assert "0 images queued and 60 on their way in, 60 more would pass the limit of 100" in refused(old)
            assert len(first.result().codes) == 60
            assert made == [60]

            read_s[0] = 3.0
            reading.clear()
            first = stub.Compress.future(files, timeout=30)
            assert reading.wait(10)
            shutil.copytree(EMBEDDED / "dsprites" / "2", repo / "dsprites" / "2")
            assert s.run(s.running.reload()) is True  # a new snapshot, handed dsprites/4's queue: so is the count
            assert "60 on their way in" in refused(files)
            assert len(first.result().codes) == 60

            # Small requests keep to the room too: they filled the queue while the large one read, and it was then
            # refused as it queued, its pixels made.
            encoder = s.running.servicer.pipeline._loaded[("dsprites", "4")].encoder
            run = encoder._run
            encoder._run = lambda x: (time.sleep(2.0), run(x))[1]  # one slow run keeps the worker busy
            small = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
                data=sprites[0][:16].tobytes(), shape=[16, 64, 64, 1], dtype=pb.DTYPE_UINT8)),
                model=pb.ModelRef(name="dsprites"))
            x = sprites[0][:40]  # more than a small request: run on a worker thread, not on the event loop
            busy = stub.Compress.future(pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
                data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8)), model=small.model), timeout=30)
            time.sleep(0.3)
            read_s[0] = 1.0
            reading.clear()
            first = stub.Compress.future(files, timeout=30)
            assert reading.wait(10)
            smalls = [stub.Compress.future(small, timeout=30) for _ in range(4)]
            assert len(first.result().codes) == 60
            outcomes = [c.exception() for c in smalls]
            assert any(o is not None and "on their way in" in o.details() for o in outcomes), outcomes
            assert len(busy.result().codes) == 40

            # A version replaced in place (here its serving.json) has a new queue, with room of its own: the room
            # a request holds in the old one is not counted in it (the count was kept by name and version).
            read_s[0] = 8.0
            reading.clear()
            first = stub.Compress.future(files, timeout=30)
            assert reading.wait(10)
            (repo / "dsprites" / "serving.json").write_text(json.dumps({"max_queue": 110}))
            assert s.run(s.running.reload()) is True
            assert not first.done()  # still reading: its 60 are held in the old queue
            read_s[0] = 0.0
            assert len(stub.Compress(files, timeout=30).codes) == 60  # 60 + 60 > 110, had they shared a count
            assert len(first.result().codes) == 60
    finally:
        s.stop()
