"""The codec under the model's tables: golden codes, every format, corruption, batch limits, determinism."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.service import container
from disco.service.codec import Codec
from disco.service.errors import CorruptCode, InvalidCode
from disco.service.repository import load_entry

GOLDEN = json.loads((Path(__file__).parent / "expected" / "golden_codes.json").read_text())


@pytest.fixture(scope="module")
def golden_codec() -> Codec:
    return Codec.from_json(GOLDEN["codec"], bytes.fromhex(GOLDEN["fingerprint"]), GOLDEN["latent_dim"])


def test_golden_codes_decode_to_the_same_symbols(golden_codec: Codec) -> None:
    formats = set()
    for case in GOLDEN["cases"]:
        symbols, levels = golden_codec.symbols([bytes.fromhex(case["code"])])
        assert symbols[0].tolist() == case["symbols"], case
        assert levels[0].name == case["quality"]
        formats.add(case["format"])
    assert formats == {container.FORMAT_FIXED, container.FORMAT_ENTROPY}  # v1 codes still decode
    b = GOLDEN["batch"]
    symbols, q = golden_codec.batch_symbols(bytes.fromhex(b["code"]))
    assert symbols.tolist() == b["symbols"] and q.name == b["quality"]


def test_golden_codes_are_reproduced_by_todays_encoder(golden_codec: Codec) -> None:
    for case in GOLDEN["cases"]:
        if case["format"] != container.FORMAT_ENTROPY:
            continue
        q = golden_codec.quality(case["quality"])
        z = golden_codec.dequantize(np.array([case["symbols"]]), q)
        assert golden_codec.encode(z, q.name)[0].hex() == case["code"]


def test_every_single_bit_flip_is_refused(golden_codec: Codec) -> None:
    codes = [bytes.fromhex(c["code"]) for c in GOLDEN["cases"][:40]]
    for code in codes:
        for i in range(len(code) * 8):
            bad = bytearray(code)
            bad[i // 8] ^= 1 << (i % 8)
            with pytest.raises(InvalidCode):
                golden_codec.symbols([bytes(bad)])


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(GOLDEN["cases"]) - 1), st.binary(max_size=24), st.integers(0, 2**32))
def test_random_and_mutated_codes_raise_typed_errors_only(golden_codec: Codec, i: int, noise: bytes, seed: int) -> None:
    code = bytearray.fromhex(GOLDEN["cases"][i]["code"])
    r = random.Random(seed)
    mutation = r.choice(["truncate", "extend", "overwrite", "random"])
    if mutation == "truncate":
        code = code[: r.randrange(len(code))]
    elif mutation == "extend":
        code += noise
    elif mutation == "overwrite" and noise:
        pos = r.randrange(len(code))
        code[pos : pos + len(noise)] = noise
    else:
        code = bytearray(noise)
    try:
        golden_codec.symbols([bytes(code)])
    except InvalidCode:
        pass  # CorruptCode is a subclass: both are the typed refusal we want


def test_wrong_model_is_refused(golden_codec: Codec) -> None:
    other = Codec.from_json(GOLDEN["codec"], bytes(32), GOLDEN["latent_dim"])
    with pytest.raises(CorruptCode):
        other.symbols([bytes.fromhex(GOLDEN["cases"][0]["code"])])


def test_absurd_batch_count_is_refused_before_decoding(golden_codec: Codec) -> None:
    fp = golden_codec.fingerprint
    for count in (container.MAX_BATCH + 1, 2**34):
        varint = bytearray()
        n = count
        while True:
            varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                break
        body = bytes([0x30 | 0, fp[0]]) + bytes(varint) + b"\0" * 8
        blob = body + container.checksum(fp, body, container.BATCH_CHECKSUM_BYTES)
        with pytest.raises(InvalidCode, match="batch"):
            golden_codec.batch_symbols(blob)


def test_batch_that_claims_more_codes_than_it_holds(golden_codec: Codec) -> None:
    fp = golden_codec.fingerprint
    body = bytes([0x30 | golden_codec.quality().id, fp[0], 0x7F])  # 127 codes, empty stream
    blob = body + container.checksum(fp, body, container.BATCH_CHECKSUM_BYTES)
    with pytest.raises(InvalidCode, match="declares 127 codes, but its 0-byte stream holds at most"):
        golden_codec.batch_symbols(blob)


def test_providers_that_are_not_there_fall_back_to_cpu_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from disco.service.repository import EMBEDDED
    from disco.service.runtime import OnnxModel, RuntimeOptions

    rt = OnnxModel(EMBEDDED / "dsprites" / "1", RuntimeOptions(providers=("cuda", "cpu")))
    if "CUDAExecutionProvider" in rt.providers:
        pytest.skip("CUDA is here: nothing falls back")
    assert rt.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in r.getMessage() and "not available here" in r.getMessage()
               for r in caplog.records)


def test_a_provider_listed_but_failing_falls_back_to_cpu_with_a_log_line(caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA listed as available but not running the session: ONNX Runtime falls back to CPU; the runtime says so,
    and I/O binding (auto: on CUDA only) stays off. Simulated: the listing is faked, and this CPU build drops the
    provider with a Python warning (a CUDA build without a GPU logs from C++ instead); the runtime's check is the
    same either way, the session's providers against the first asked for."""
    import onnxruntime as ort

    from disco.service.repository import EMBEDDED
    from disco.service.runtime import OnnxModel, RuntimeOptions

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is here: nothing falls back")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # ONNX Runtime's own word, as it drops CUDA
        rt = OnnxModel(EMBEDDED / "dsprites" / "1", RuntimeOptions(providers=("cuda", "cpu")))
    assert rt.providers == ["CPUExecutionProvider"] and not rt.io_binding
    said = [r.getMessage() for r in caplog.records if "not the CUDAExecutionProvider asked for first" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in caplog.records]  # the encoder's session and the decoder's


def test_symbols_do_not_depend_on_threads_batch_size_or_io_binding() -> None:
    from disco.export.data.dsprites import DSprites
    from disco.service.repository import EMBEDDED
    from disco.service.runtime import OnnxModel, RuntimeOptions

    entry = load_entry(EMBEDDED / "dsprites" / "1")
    x = DSprites().sample(64, np.random.default_rng(11))[0][:, None].astype(np.float32)
    results = []
    decoded = []
    for threads, inter, io_binding in ((1, 1, "off"), (2, 1, "off"), (1, 1, "on"), (1, 2, "off")):
        rt = OnnxModel(entry.path, RuntimeOptions(intra_op_threads=threads, inter_op_threads=inter, io_binding=io_binding))
        assert rt.io_binding == (io_binding == "on")
        assert rt.encoder.get_session_options().inter_op_num_threads == inter
        for pool in ("intra", "inter"):  # spinning threads starve the gRPC threads; the inter-op pool spun
            assert rt.decoder.get_session_options().get_session_config_entry(f"session.{pool}_op.allow_spinning") == "0"
        batched = entry.codec.encode(rt.encode(x)[0])
        single = [entry.codec.encode(rt.encode(x[i : i + 1])[0])[0] for i in range(64)]
        results += [batched, single]
        decoded.append(rt.decode(entry.codec.decode(batched)))
    assert all(r == results[0] for r in results)
    assert all(np.array_equal(d, decoded[0]) for d in decoded)


def test_garbage_or_short_batch_streams_are_typed_errors(golden_codec: Codec) -> None:
    fp = golden_codec.fingerprint
    q = golden_codec.quality()
    for count, stream in ((3, b"\xff" * 8), (2, b"\x00" * 64), (1, bytes(range(200, 240)))):
        body = bytes([0x30 | q.id, fp[0], count]) + stream
        blob = body + container.checksum(fp, body, container.BATCH_CHECKSUM_BYTES)
        try:
            golden_codec.batch_symbols(blob)
        except InvalidCode:
            continue
        raise AssertionError(f"a forged stream of {len(stream)} bytes for {count} codes decoded silently")


def test_model_json_with_duplicate_or_wide_quality_ids_is_refused() -> None:
    tables = json.loads(json.dumps(GOLDEN["codec"]))
    tables["qualities"][1]["id"] = tables["qualities"][0]["id"]
    with pytest.raises(ValueError, match="unique"):
        Codec.from_json(tables, bytes(32), GOLDEN["latent_dim"])
    tables["qualities"][1]["id"] = 16
    with pytest.raises(ValueError, match="0..15"):
        Codec.from_json(tables, bytes(32), GOLDEN["latent_dim"])


@pytest.mark.parametrize("change, match", [
    (lambda c: c["qualities"][0]["dims"][0].update(step=0.0), "dim 0: step 0.0, expected a number above 0"),
    (lambda c: c["qualities"][0]["dims"][1].update(center=float("inf")), "dim 1: center inf, expected a finite number"),
    (lambda c: c["qualities"][0]["dims"][0].update(min_symbol=3, max_symbol=2), "symbols 3..2"),
    (lambda c: c["qualities"][0]["dims"][0].update(bits=1), "bits 1, expected an integer from 1 to 32 that holds"),
    (lambda c: c["qualities"][0].update(name=7), "quality name 7, expected a non-empty string"),
    (lambda c: c["qualities"][1].update(name=c["qualities"][0]["name"]), "repeat"),
    (lambda c: c["fill"].__setitem__(0, float("nan")), "codec fill"),
    # floats were truncated and repeats served, a dim sent twice and another never
    (lambda c: c.update(active_dims=[d + 0.9 for d in c["active_dims"]]), "distinct integer dims in 0..9"),
    (lambda c: c.update(active_dims=[c["active_dims"][0]] * len(c["active_dims"])), "distinct integer dims"),
    (lambda c: c.update(active_dims=[0, 1, 2, 3, 10]), "codec active_dims [0, 1, 2, 3, 10]"),
    # JSON integers of any size: each one past float's range overflowed later (ListModels answered INTERNAL for every
    # model, a huge frequency was "Python int too large to convert to C long"); wrong types were read as others
    (lambda c: c["qualities"][0]["dims"][0].update(step=10**400), "dim 0: step 100000000000...(401 characters), expected"),
    (lambda c: c["fill"].__setitem__(0, -10**400), "codec fill"),
    (lambda c: c["qualities"][0]["dims"][0]["freq"].__setitem__(0, 10**30), "quality 'low' dim 0: a frequency table needs"),
    (lambda c: c["qualities"][0]["dims"][0]["freq"].__setitem__(0, 1.0), "each from 1 to 65536"),
    (lambda c: c["qualities"][0]["dims"][0].update(min_symbol=-10**30), "symbols -10000000000..."),
    (lambda c: c["qualities"][1].update(id="1"), "id '1', expected an integer from 0 to 15"),
    (lambda c: c["qualities"][1].update(id=True), "id True, expected an integer"),
    (lambda c: c["qualities"][0].update(default="no"), "default 'no', expected true or false"),
    (lambda c: c.update(format=True), "codec format True is unknown, expected 1 or 2"),
    (lambda c: [q.update(default=True) for q in c["qualities"][:2]], "exactly one quality level as default; it marks"),
])
def test_model_json_codec_numbers_that_would_serve_wrong_images_are_refused(change, match: str) -> None:
    """A NaN center decoded every image black, a step of 0 gave every image one code, an integer quality name
    broke ListModels for the whole server: each is refused when the version loads."""
    tables = json.loads(json.dumps(GOLDEN["codec"]))
    change(tables)
    with pytest.raises(ValueError, match=re.escape(match)):
        Codec.from_json(tables, bytes(32), GOLDEN["latent_dim"])


def test_model_json_with_nan_is_refused_as_it_parses(tmp_path: Path) -> None:
    import shutil

    from disco.service.repository import EMBEDDED

    copy = tmp_path / "dsprites" / "4"
    shutil.copytree(EMBEDDED / "dsprites" / "4", copy)
    text = (copy / "model.json").read_text()
    at = text.index('"center": ') + len('"center": ')
    (copy / "model.json").write_text(text[:at] + "NaN," + text[at:].split(",", 1)[1])  # the first center
    with pytest.raises(ValueError, match=r"model.json does not parse: NaN is not a finite number"):
        load_entry(copy)


def test_quantize_clips_to_what_an_escape_carries(golden_codec: Codec) -> None:
    """A symbol beyond the escape's 16-bit range used to be clipped a second time by the coder: the code then
    held another value than quantize() gave. Now both agree, single codes and batch containers alike."""
    q = golden_codec.quality()
    mu = np.zeros((2, GOLDEN["latent_dim"]))
    mu[0, golden_codec.active] = 1e9
    mu[1, golden_codec.active] = -1e9
    s = golden_codec.quantize(mu, q)
    assert (s[0] == q.min_symbol + 32767).all() and (s[1] == q.min_symbol - 32768).all()
    assert np.array_equal(golden_codec.symbols(golden_codec.encode(mu))[0], s)
    assert np.array_equal(golden_codec.batch_symbols(golden_codec.encode_batch(mu))[0], s)


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_pixels_become_the_float32_values_a_division_by_255_gives(channels: int) -> None:
    """The one-pass conversion must not move a code: same values as astype(float32) / 255, laid out NCHW."""
    from disco.service import images

    x = np.random.default_rng(channels).integers(0, 256, size=(5, 64, 64, channels), dtype=np.uint8)
    out = images.from_raw(x.tobytes(), x.shape, "uint8", (64, 64, channels))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out, (x.astype(np.float32) / 255.0).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_probabilities_become_the_pixels_rint_of_clip_times_255_gives(channels: int) -> None:
    from disco.service import images

    p = np.random.default_rng(channels).normal(0.5, 0.6, size=(4, channels, 64, 64)).astype(np.float32)
    p[0, 0, 0, :5] = [0.5 / 255, 1.5 / 255, 1.0, np.nextafter(np.float32(1), np.float32(2)), np.float32(-0.0)]
    out = images.to_uint8(p)
    assert out.shape == (4, 64, 64, channels) and out.flags.c_contiguous
    assert np.array_equal(out, np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1))


def test_a_server_asked_for_cuda_that_runs_on_cpu_counts_each_version_that_fell_back(server) -> None:
    """The fallback to CPU had only a log line: a GPU pod serving on its CPU showed nothing on its metrics."""
    import onnxruntime as ort

    from conftest import serve

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is here: nothing falls back")

    def count(s, name: str) -> float | None:  # noqa: ANN001
        return s.running.metrics.registry.get_sample_value(name)

    assert count(server, "disco_provider_fallbacks_total") == 0  # asked for CPU, runs on CPU
    s = serve(providers="cuda,cpu")
    try:
        loads = count(s, "disco_model_loads_total")
        assert loads and count(s, "disco_provider_fallbacks_total") == loads
    finally:
        s.stop()
