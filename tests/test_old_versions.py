"""Older versions loaded for old codes stay within --max-old-versions: the least recently used is unloaded, after
draining, and loaded again when a code asks for it; no request fails on the way."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from disco.client import Client
from disco.service.metrics import Metrics
from disco.service.pipeline import Pipeline
from disco.service.repository import EMBEDDED, Repository
from disco.service.batcher import BatchConfig

from conftest import serve

LATEST = ["color_dsprites/1", "dsprites/4"]  # the embedded models' latest versions, always loaded


def test_the_least_recently_used_older_version_is_unloaded_first() -> None:
    repo = Repository.load(EMBEDDED)
    metrics = Metrics()

    async def scenario(executor: ThreadPoolExecutor) -> None:
        p = Pipeline(repo, executor, batching=BatchConfig(max_batch=2), default_model="dsprites",
                     metrics=metrics, max_old_versions=2)
        await p.warm_up()
        assert sorted(p.loaded()) == LATEST
        v1 = await p.load(repo.get("dsprites", "1"))
        await p.load(repo.get("dsprites", "2"))
        assert await p.load(repo.get("dsprites", "1")) is v1  # a hit: dsprites/1 is now the most recently used
        await p.load(repo.get("dsprites", "3"))  # a third older version: dsprites/2, the least recently used, goes
        assert [k for k in p.loaded() if k not in LATEST] == ["dsprites/1", "dsprites/3"]
        for e in p.latest():  # the latest versions stay, however long unused
            assert f"{e.name}/{e.version}" in p.loaded()
        v2 = await p.load(repo.get("dsprites", "2"))  # loaded again, as a new instance; dsprites/1 goes now
        assert [k for k in p.loaded() if k not in LATEST] == ["dsprites/3", "dsprites/2"]
        assert v1.unloaded and not v2.unloaded
        (probs,) = await v2.decoder.submit(np.zeros((1, repo.get("dsprites", "2").codec.latent_dim), np.float32))
        assert probs.shape == (1, 1, 64, 64)
        await p.close()

    with ThreadPoolExecutor(2) as executor:
        asyncio.run(scenario(executor))
    assert metrics.registry.get_sample_value("disco_model_unloads_total") == 2
    assert metrics.registry.get_sample_value("disco_loaded_versions") == 0  # all closed with the pipeline


def test_a_version_still_loading_when_the_pipeline_closes_is_closed_too() -> None:
    """A caller that goes away (deadline, cancel) leaves its version loading; a hot reload then closes the pipeline."""
    repo, metrics = Repository.load(EMBEDDED), Metrics()

    async def scenario(executor: ThreadPoolExecutor) -> list[str]:
        p = Pipeline(repo, executor, batching=BatchConfig(max_batch=8), default_model="dsprites", metrics=metrics)
        await p.warm_up()

        async def call() -> None:
            with p.in_use():
                await p.load(repo.get("dsprites", "1"))

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await p.close()
        await asyncio.sleep(1.5)  # longer than a load takes here: a build left running would have finished
        return p.loaded()

    with ThreadPoolExecutor(2) as executor:
        assert asyncio.run(scenario(executor)) == []
    assert metrics.registry.get_sample_value("disco_loaded_versions") == 0


def decoded_offline(code: bytes, version: str, decoder: str = "") -> np.ndarray:
    """A batch container's images as version `version` of the embedded dsprites decodes them, without a server: its
    own codec, and its own decoder, or another version's (`decoder`). A review: expected images that a server made
    could not catch a server that decoded old codes with a wrong version, consistently."""
    from disco.service.images import to_uint8
    from disco.service.runtime import OnnxModel

    repo = Repository.load(EMBEDDED)
    e = repo.get("dsprites", version)
    symbols, quality = e.codec.batch_symbols(code)
    return to_uint8(OnnxModel(repo.get("dsprites", decoder or version).path).decode(e.codec.dequantize(symbols, quality)))


@pytest.fixture(scope="module")
def old_codes(sprites):
    """A batch container of 8 images from each of dsprites/1, 2 and 3 (8 rows: more than runs inline, so an unload
    meets queued work), and their images as each version decodes them offline."""
    s = serve(max_batch=4)
    try:
        with Client(s.target) as c:
            codes = [c.compress(sprites[0][8 * i : 8 * i + 8], model="dsprites", version=v, batch=True)[0]
                     for i, v in enumerate("123")]
    finally:
        s.stop()
    expected = [decoded_offline(code.data, v) for code, v in zip(codes, "123")]
    for j, v in enumerate("123"):  # another version's decoder makes other images of a code's latents: a mix-up shows
        for other in "1234".replace(v, ""):
            assert not np.array_equal(decoded_offline(codes[j].data, v, decoder=other), expected[j])
    return codes, expected


def test_old_codes_decode_while_versions_churn_under_a_bound_of_one(old_codes) -> None:
    codes, expected = old_codes
    s = serve(max_batch=4, max_old_versions=1)
    failures: list[BaseException] = []
    try:
        with Client(s.target, timeout=60) as c:

            def load(k: int) -> None:
                for i in range(6):
                    order = [(k + i + j) % 3 for j in range(3)]  # every request names all three older versions
                    try:
                        got = c.decompress([codes[j] for j in order])
                        np.testing.assert_array_equal(got, np.concatenate([expected[j] for j in order]))
                    except BaseException as exc:  # noqa: BLE001 - every failure counts
                        failures.append(exc)

            threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not failures, failures[:3]
            registry = s.running.metrics.registry
            assert registry.get_sample_value("disco_model_unloads_total") >= 2
            deadline = time.monotonic() + 10  # unloads drain, then close
            while registry.get_sample_value("disco_loaded_versions") != 3:
                assert time.monotonic() < deadline, registry.get_sample_value("disco_loaded_versions")
                time.sleep(0.02)
            old = [k for k in s.running.servicer.pipeline.loaded() if k not in LATEST]
            assert len(old) == 1 and old[0] in {"dsprites/1", "dsprites/2", "dsprites/3"}
            np.testing.assert_array_equal(c.decompress(codes), np.concatenate(expected))  # and once more, settled
    finally:
        s.stop()


def test_a_replacing_pipeline_adopts_unchanged_versions_and_can_hand_them_back() -> None:
    repo, metrics = Repository.load(EMBEDDED), Metrics()
    latest = repo.get("dsprites")

    async def scenario(executor: ThreadPoolExecutor) -> None:
        old = Pipeline(repo, executor, batching=BatchConfig(max_batch=2), default_model="dsprites", metrics=metrics)
        await old.warm_up()
        before = await old.load(latest)
        new = Pipeline(Repository.load(EMBEDDED), executor, batching=BatchConfig(max_batch=2), default_model="dsprites",
                       metrics=metrics)
        assert sorted(new.adopt(old)) == LATEST and old.loaded() == []
        assert await new.load(new.repo.get("dsprites")) is before  # the same warm sessions
        assert new.loaded()[-1] == "dsprites/4"
        assert await old.load(repo.get("color_dsprites")) is not None  # a call still on the old pipeline uses them too,
        assert new.loaded()[-1] == "color_dsprites/1"  # and the new pipeline's LRU order hears of it
        assert await old.load(latest) is before
        loads = metrics.registry.get_sample_value("disco_model_loads_total")
        await new.warm_up()
        assert metrics.registry.get_sample_value("disco_model_loads_total") == loads  # nothing loaded again
        new.hand_back(old)  # as when the new pipeline's warm-up fails
        assert sorted(old.loaded()) == LATEST and new.loaded() == []
        assert await old.load(latest) is before
        await new.close()
        await old.close()

    with ThreadPoolExecutor(2) as executor:
        asyncio.run(scenario(executor))
    assert metrics.registry.get_sample_value("disco_loaded_versions") == 0


def test_adoption_takes_only_what_the_new_pipeline_keeps(tmp_path) -> None:
    """The old pipeline serves until the swap: the new one's warm-up must not unload a version it still uses."""
    import shutil

    root = tmp_path / "repo"
    for name, version in (("dsprites", "1"), ("dsprites", "2"), ("color_dsprites", "1")):
        shutil.copytree(EMBEDDED / name / version, root / name / version)
    metrics = Metrics()
    count = lambda name: metrics.registry.get_sample_value(name) or 0.0  # noqa: E731

    async def scenario(executor: ThreadPoolExecutor) -> None:
        batching = BatchConfig(max_batch=2)
        old = Pipeline(Repository.load(root), executor, batching=batching, default_model="dsprites", metrics=metrics,
                       max_old_versions=1)
        await old.warm_up()  # dsprites/2 (its latest) and color_dsprites/1
        await old.load(old.repo.get("dsprites", "1"))  # an old code came by: dsprites/1, kept (bound 1)
        shutil.copytree(EMBEDDED / "dsprites" / "3", root / "dsprites" / "3")  # a new version ships
        new = Pipeline(Repository.load(root), executor, batching=batching, default_model="dsprites", metrics=metrics,
                       max_old_versions=1)
        # In the new snapshot dsprites/2 and dsprites/1 are both older versions; the bound keeps the more recently
        # used one, so dsprites/2 stays with the old pipeline, which still serves it as its latest.
        assert sorted(new.adopt(old)) == ["color_dsprites/1", "dsprites/1"] and old.loaded() == ["dsprites/2"]
        loads = count("disco_model_loads_total")
        await new.warm_up()  # loads dsprites/3
        assert count("disco_model_loads_total") == loads + 1 and count("disco_model_unloads_total") == 0
        await old.load(old.repo.get("dsprites"))  # the old pipeline's latest, still loaded: no load
        assert count("disco_model_loads_total") == loads + 1
        await old.close()
        await new.close()

    with ThreadPoolExecutor(2) as executor:
        asyncio.run(scenario(executor))
    assert count("disco_loaded_versions") == 0


def _served_with_3_unloaded(tmp_path, sprites):  # noqa: ANN001, ANN202
    """dsprites 2, 3 and 4 served with --max-old-versions 0, and codes of 3 and of 2: 2 loaded last, so 3 is in the
    served snapshot but not loaded. Returns the repository, the server and the codes (3's, 2's)."""
    import shutil

    repo = tmp_path / "repo"
    for v in ("2", "3", "4"):
        shutil.copytree(EMBEDDED / "dsprites" / v, repo / "dsprites" / v)
    s = serve(repo, max_old_versions=0)
    try:
        with Client(s.target) as c:
            codes = tuple(c.compress(sprites[0][:2], version=v) for v in ("3", "2"))
    except BaseException:
        s.stop()
        raise
    return repo, s, codes


def test_a_version_whose_files_go_before_it_loads_answers_unavailable(tmp_path, sprites, caplog) -> None:
    """dsprites/3 is in the served snapshot but not loaded (unloaded for another old version); its folder is then
    removed, or its encoder changed in place, before a reload sees it. Its codes get UNAVAILABLE saying why, logged
    once, not INTERNAL with a traceback per request, and not loaded again for every retry; the reload then follows
    the repository."""
    import shutil

    import grpc

    from disco.v1 import codec_pb2 as pb
    from disco.v1 import codec_pb2_grpc

    repo, s, (three, two) = _served_with_3_unloaded(tmp_path, sprites)
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            encoder = repo / "dsprites" / "3" / "encoder.onnx"
            encoder.write_bytes(encoder.read_bytes() + b"\0")  # changed in place, its hashes not
            for _ in range(2):  # asked twice, logged once
                with pytest.raises(grpc.RpcError) as info:
                    stub.Decompress(pb.DecompressRequest(codes=[three[0].data]), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                assert "model dsprites/3 could not be loaded: ValueError" in info.value.details()
                assert "changed on disk since it was verified" in info.value.details()
            failures = lambda: s.running.metrics.registry.get_sample_value("disco_model_load_failures_total")  # noqa: E731
            assert failures() == 1  # counted once, as it is logged: no reload saw the change
            s.running.servicer.pipeline.forget_failed_loads()  # as a SIGHUP does: tried again, for a new reason
            shutil.rmtree(repo / "dsprites" / "3")
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=[three[0].data]), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "its files are gone" in info.value.details() and "or remove its folder to withdraw it" in info.value.details()
            assert failures() == 2
            assert len(stub.Decompress(pb.DecompressRequest(codes=[two[0].data]), timeout=30).images.tensor.data) == 4096
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("could not load dsprites/3")]
        assert len(warned) == 2, warned  # once per attempt to load it, not per request
        assert s.run(s.running.reload(), timeout=30)  # the reload withdraws it
        assert [e.version for e in s.running.servicer.pipeline.repo.entries()] == ["2", "4"]
    finally:
        s.stop()


def test_no_memory_to_load_a_version_is_resource_exhausted_and_not_held_against_it(tmp_path, sprites,
                                                                                   monkeypatch) -> None:
    """A MemoryError loading an older version for its codes answered INTERNAL, with a traceback logged. It is the
    machine's state: RESOURCE_EXHAUSTED, and the next request loads the version once memory is back."""
    import grpc

    from disco.service import pipeline
    from disco.v1 import codec_pb2 as pb
    from disco.v1 import codec_pb2_grpc

    _, s, (three, _) = _served_with_3_unloaded(tmp_path, sprites)
    try:
        loaded = pipeline._Loaded

        def no_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise MemoryError()

        monkeypatch.setattr(pipeline, "_Loaded", no_memory)
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=[three[0].data]), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of memory loading model dsprites/3" in info.value.details()
            monkeypatch.setattr(pipeline, "_Loaded", loaded)
            assert len(stub.Decompress(pb.DecompressRequest(codes=[three[0].data]), timeout=30).images.tensor.data) == 4096
    finally:
        s.stop()


def test_a_code_that_passes_the_checksums_of_two_versions_is_routed_by_its_decode_or_refused(tmp_path, caplog) -> None:
    """Versions of different fingerprints can share the 1-byte model id; about one code in 65,536 then passes both
    16-bit checksums. dsprites/5 here is dsprites/4 with an unused fill value nudged until its id is dsprites/3's
    (0x39); the codes are dsprites/3 codes found to pass dsprites/5's checksum too, by encoding random latents at
    every quality and keeping those that verify under dsprites/5 (a reviewer's search). One also decodes canonically
    under dsprites/5, which decoded it silently into another image (606 pixels differed): it is refused as
    ambiguous. The other decodes only under dsprites/3, where it belongs (it was refused as "bytes were altered")."""
    import copy
    import json
    import shutil

    import grpc

    from disco.service import container
    from disco.service.repository import fingerprint, load_entry
    from disco.v1 import codec_pb2 as pb
    from disco.v1 import codec_pb2_grpc

    repo = tmp_path / "repo"
    for v in ("3", "4"):
        shutil.copytree(EMBEDDED / "dsprites" / v, repo / "dsprites" / v)
    meta = json.loads((repo / "dsprites" / "4" / "model.json").read_text())
    decoder = (repo / "dsprites" / "4" / "decoder.onnx").read_bytes()
    three = load_entry(repo / "dsprites" / "3")
    unused = next(d for d in range(meta["latent_dim"]) if d not in meta["codec"]["active_dims"])
    for k in range(1, 5000):
        codec = copy.deepcopy(meta["codec"])
        codec["fill"][unused] = round(codec["fill"][unused] + k * 1e-6, 6)
        fp = fingerprint(decoder, codec)
        if fp[0] == three.fingerprint[0]:
            break
    shutil.copytree(repo / "dsprites" / "4", repo / "dsprites" / "5")
    (repo / "dsprites" / "5" / "model.json").write_text(json.dumps({**meta, "codec": codec, "version": "5",
                                                                   "fingerprint": fp.hex()}))
    assert load_entry(repo / "dsprites" / "5").fingerprint == fp
    both, only_three = bytes.fromhex("2139eb771dff19f762"), bytes.fromhex("233936986236ae99a37a")
    for code in (both, only_three):
        assert container.verify(code, three.fingerprint) and container.verify(code, fp)
    shutil.copytree(EMBEDDED / "dsprites" / "3", tmp_path / "alone" / "dsprites" / "3")
    alone = serve(tmp_path / "alone")  # what dsprites/3 makes of it
    try:
        with grpc.insecure_channel(alone.target) as ch:
            truth = codec_pb2_grpc.CodecStub(ch).Decompress(pb.DecompressRequest(codes=[only_three]), timeout=30)
    finally:
        alone.stop()
    s = serve(repo)
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            r = stub.Decompress(pb.DecompressRequest(codes=[only_three]), timeout=30)
            assert [m.version for m in r.models] == ["3"]
            assert r.images.tensor.data == truth.images.tensor.data
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=[both]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("code 0 passes the checksums of dsprites/5 and dsprites/3, whose model ids collide (0x39), and "
                    "decodes under each") in info.value.details()
        assert any("dsprites/3 and dsprites/5 share a model id" in r.getMessage() for r in caplog.records)
    finally:
        s.stop()
