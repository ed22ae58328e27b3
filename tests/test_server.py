"""The real server, on an ephemeral port, with the embedded default model: round trips, health,
reflection, model listing, and every bad input of the slice answered with the right status."""
from __future__ import annotations

import asyncio
import io
import struct
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from disco.client import Client
from disco.service import container, images
from disco.service.config import ServeConfig
from disco.service.errors import InvalidInput
from disco.service.fidelity import foreground_iou
from disco.service.repository import EMBEDDED, Repository
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from conftest import ServerThread, serve


@pytest.fixture(scope="module")
def stub(server: ServerThread):
    with grpc.insecure_channel(server.target) as ch:
        yield codec_pb2_grpc.CodecStub(ch)


def tensor(a: np.ndarray, dtype: int = pb.DTYPE_UINT8, shape: list[int] | None = None) -> pb.Images:
    return pb.Images(tensor=pb.Tensor(data=a.tobytes(), shape=list(a.shape) if shape is None else shape, dtype=dtype))


def compress(stub, images: pb.Images, **kw) -> pb.CompressResponse:
    return stub.Compress(pb.CompressRequest(images=images, **kw), timeout=30)


def decompress(stub, codes: list[bytes]) -> np.ndarray:
    r = stub.Decompress(pb.DecompressRequest(codes=codes), timeout=30)
    return np.frombuffer(r.images.tensor.data, np.uint8).reshape(tuple(r.images.tensor.shape))


def assert_status(fn, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in info.value.details(), info.value.details()


def test_a_message_limit_too_small_for_the_models_stops_the_start() -> None:
    """A review: --max-message-bytes 1024 passed the flag's check; the server said SERVING and answered every call
    with an error (ListModels' own answer did not fit), INVALID_ARGUMENT, blaming the caller."""
    from disco.service.repository import RepositoryError
    from disco.service.server import create_server

    cfg = ServeConfig(host="127.0.0.1", port=0, metrics_port=0, max_message_bytes=4096)
    with pytest.raises(RepositoryError, match=r"--max-message-bytes 4096 is too small for the models served: one "
                                              r"image of color_dsprites/1 in a request and its answer take 14792 bytes"):
        asyncio.run(create_server(cfg))
    s = serve(max_message_bytes=14792)  # the least that serves them, through the SDK too (its share of a request)
    try:
        with Client(s.target) as c:
            rgb = np.zeros((1, 64, 64, 3), np.uint8)
            assert len(c.compress(rgb, model="color_dsprites")) == 1
            assert c.decompress(c.compress(rgb, model="color_dsprites")).shape == (1, 64, 64, 3)
    finally:
        s.stop()


def test_health_is_serving(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "disco.v1.Codec", "disco.v1.Codec/dsprites", "disco.v1.Codec/color_dsprites"):
            resp = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:  # a model the server lacks is unknown to health too
            h.Check(health_pb2.HealthCheckRequest(service="disco.v1.Codec/nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # A long name is cut in the message: quoted whole, it passed gRPC's metadata limit and the caller got
        # RESOURCE_EXHAUSTED (a review: 20,000 characters)
        assert_status(lambda: h.Check(health_pb2.HealthCheckRequest(service="x" * 20_000), timeout=10),
                      grpc.StatusCode.NOT_FOUND, "no health status for service 'xxx", "(20000 characters)")


def test_reflection_lists_the_codec_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"disco.v1.Codec", "grpc.health.v1.Health"} <= names


def test_list_and_get_model(stub) -> None:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    embedded = Repository.load(EMBEDDED).entries()
    assert [(m.name, m.version) for m in models] == [(e.name, e.version) for e in embedded]
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert listed.server_processes == 1 and len(listed.server_instance) == 16  # one process, which says who it is
    m = stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name="dsprites")), timeout=10)
    assert list(m.input_shape) == [64, 64, 1] and m.latent_dim == 10 and len(m.fingerprint) == 64
    assert sum(q.is_default for q in m.qualities) == 1 and m.factors


def test_round_trip_of_256_sprites(stub, sprites) -> None:
    imgs, _ = sprites
    resp = compress(stub, tensor(imgs))
    assert resp.model.name == "dsprites" and len(resp.codes) == 256
    assert np.mean([len(c) for c in resp.codes]) <= 12  # a few bytes per image, header included
    out = decompress(stub, list(resp.codes))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    assert foreground_iou(imgs, out).mean() > 0.6  # an all-black guess scores 0


def test_codes_are_deterministic_and_batch_independent(stub, sprites) -> None:
    imgs, _ = sprites
    batch = list(compress(stub, tensor(imgs[:16])).codes)
    singles = [compress(stub, tensor(imgs[i : i + 1])).codes[0] for i in range(16)]
    assert batch == singles


def test_float32_and_png_inputs_give_the_same_codes(stub, sprites) -> None:
    imgs, _ = sprites
    ref = list(compress(stub, tensor(imgs[:4])).codes)
    as_float = (imgs[:4] / 255.0).astype("<f4")
    assert list(compress(stub, tensor(as_float, pb.DTYPE_FLOAT32)).codes) == ref
    files = []
    for img in imgs[:4]:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buf, format="PNG")
        files.append(buf.getvalue())
    assert list(compress(stub, pb.Images(files=pb.EncodedImages(files=files))).codes) == ref


def test_quality_levels_and_png_output(stub, sprites) -> None:
    imgs, _ = sprites
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    sizes = []
    for q in m.qualities:  # listed from coarse to fine
        resp = compress(stub, tensor(imgs[:64]), quality=q.name)
        assert resp.quality == q.name
        sizes.append(np.mean([len(c) for c in resp.codes]))
    assert sizes == sorted(sizes)
    r = stub.Decompress(pb.DecompressRequest(codes=resp.codes[:8], format=pb.IMAGE_FORMAT_PNG), timeout=10)
    assert len(r.images.files.files) == 8
    assert Image.open(io.BytesIO(r.images.files.files[0])).size == (64, 64)


def test_encode_returns_named_factor_values(stub, sprites) -> None:
    imgs, _ = sprites
    resp = stub.Encode(pb.EncodeRequest(images=tensor(imgs[:3])), timeout=10)
    assert len(resp.items) == 3
    assert all(f.std > 0 and np.isfinite(f.mean) for item in resp.items for f in item.factors)


# --- bad input: each answered with a status naming the value; the server keeps serving afterwards ---

def test_wrong_shape(stub, sprites) -> None:
    small = np.zeros((2, 32, 32, 1), np.uint8)
    assert_status(lambda: compress(stub, tensor(small)), grpc.StatusCode.INVALID_ARGUMENT, "32x32x1", "64x64x1")
    flat = np.zeros((2, 64, 64), np.uint8)
    assert_status(lambda: compress(stub, tensor(flat)), grpc.StatusCode.INVALID_ARGUMENT, "[2, 64, 64]", "(N, H, W, C)")


def test_wrong_channel_count(stub) -> None:
    rgb = np.zeros((2, 64, 64, 3), np.uint8)
    assert_status(lambda: compress(stub, tensor(rgb)), grpc.StatusCode.INVALID_ARGUMENT, "64x64x3", "64x64x1")


def test_wrong_dtype(stub) -> None:
    a = np.zeros((1, 64, 64, 1), np.uint8)
    assert_status(lambda: compress(stub, tensor(a, pb.DTYPE_UNSPECIFIED)), grpc.StatusCode.INVALID_ARGUMENT,
                  "DTYPE_UNSPECIFIED", "uint8")
    assert_status(lambda: compress(stub, tensor(a, pb.DTYPE_FLOAT32)), grpc.StatusCode.INVALID_ARGUMENT,
                  "4096 bytes", "16384")
    out_of_range = np.full((1, 64, 64, 1), 255.0, "<f4")
    assert_status(lambda: compress(stub, tensor(out_of_range, pb.DTYPE_FLOAT32)), grpc.StatusCode.INVALID_ARGUMENT,
                  "[255, 255]", "[0, 1]")


def test_many_image_files_are_read_and_written_off_the_event_loop(stub, server: ServerThread, monkeypatch) -> None:
    """Reading or writing thousands of files on the event loop held up every other call (benchmarks/loop_stall.py:
    200-600 ms); a few stay on the loop, where a thread hop would cost more than they do."""
    threads: dict[str, set[str]] = {"from_files": set(), "to_png": set(), "to_uint8": set()}
    def spy(name: str):  # noqa: ANN202
        real = getattr(images, name)

        def call(*args):  # noqa: ANN002, ANN202
            threads[name].add(threading.current_thread().name)
            return real(*args)
        return call

    for name in threads:
        monkeypatch.setattr(images, name, spy(name))
    loop_thread = server.thread.name
    buf = io.BytesIO()
    Image.new("L", (64, 64), 200).save(buf, format="PNG")
    for n, on_loop in ((16, True), (17, False)):
        for kind in threads.values():
            kind.clear()
        codes = compress(stub, pb.Images(files=pb.EncodedImages(files=[buf.getvalue()] * n))).codes
        r = stub.Decompress(pb.DecompressRequest(codes=codes, format=pb.IMAGE_FORMAT_PNG), timeout=30)
        assert len(r.images.files.files) == n
        assert all(len(kind) == 1 for kind in threads.values()), threads
        assert all(t == loop_thread if on_loop else t.startswith("disco-images") for kind in threads.values()
                   for t in kind), threads  # the servicer's pool, as many threads as the process computes with


def test_undecodable_image_bytes(stub) -> None:
    files = pb.Images(files=pb.EncodedImages(files=[b"\x89PNG\r\n\x1a\nthis is not a png"]))
    assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT, "image file 0 (25 bytes, starting "
                  "89504e470d0a1a0a) is not a PNG/JPEG/WEBP/BMP/GIF/TIFF file")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 200).save(buf, format="PNG")
    cut = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()[:-20]]))  # its header reads, its pixels do not
    assert_status(lambda: compress(stub, cut), grpc.StatusCode.INVALID_ARGUMENT, "image file 0", "could not be decoded")


def test_image_files_of_several_frames_are_refused_not_read_as_their_first(stub) -> None:
    """An animated GIF, PNG or WebP, or a multi-page TIFF: which frame the caller meant is unknown."""
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (0, 255)]
    for fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            assert getattr(im, "n_frames", 1) == 2, fmt  # the file really holds both
        files = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))
        assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - called at once
                      "image file 0 holds more than one frame")
    for fmt in ("GIF", "MPO"):  # one frame is fine; so is a JPEG with an MPF preview (Pillow: MPO, 2 frames)
        buf = io.BytesIO()
        frames[1].save(buf, format=fmt, save_all=True, append_images=frames[:1] if fmt == "MPO" else [])
        assert len(compress(stub, pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))).codes) == 1
        assert images.from_files([buf.getvalue()], (64, 64, 1)).min() > 0.9  # frame 0, the white one, is read


def test_a_png_whose_text_chunks_inflate_to_megabytes_is_refused(stub) -> None:
    """Pillow inflated every compressed text chunk as it opened a PNG, up to 1 MiB each and 64 MiB a file: a 63 KB
    64x64 file of 60 such chunks took 0.19 s of CPU to read, on the event loop for a small request."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k in range(5):
        info.add_text(f"Comment{k}", "\0" * (1 << 20), zip=True)  # 1 MiB of zeros each, ~1 KB in the file
    bomb = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(bomb, format="PNG", pnginfo=info)
    assert len(bomb.getvalue()) < 16384
    assert_status(lambda: compress(stub, pb.Images(files=pb.EncodedImages(files=[bomb.getvalue()]))),
                  grpc.StatusCode.INVALID_ARGUMENT, "image file 0", "Too much memory used in text chunks")
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "<x:xmpmeta/>" + " " * 900_000, zip=True)  # real metadata still reads
    fine = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(fine, format="PNG", pnginfo=info)
    assert len(compress(stub, pb.Images(files=pb.EncodedImages(files=[fine.getvalue()]))).codes) == 1


def test_image_files_take_the_models_channels_as_pillow_converts_them() -> None:
    """Files were converted to grey or RGB only: a 2- or 4-channel model (the repository takes up to 4) answered
    INTERNAL for every file, a 3-channel array broadcast into 4."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[10:20, 10:20] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    for c, mode in ((1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")):
        x = images.from_files([buf.getvalue()], (64, 64, c))
        want = np.asarray(Image.fromarray(rgb).convert(mode), np.float32).reshape(64, 64, c) / 255.0
        assert np.array_equal(x[0], want.transpose(2, 0, 1)), mode
    assert images.from_files([buf.getvalue()], (64, 64, 4))[0, 3].min() == 1.0  # opaque


def test_transparent_image_files_are_refused_opaque_ones_with_alpha_are_read(stub) -> None:
    """convert() drops alpha: a shape drawn in the alpha channel alone would read as a blank image."""
    la = np.zeros((64, 64, 2), np.uint8)
    la[20:40, 20:40] = 255  # a white square, opaque; the rest black and transparent
    palette = Image.new("P", (64, 64), 0)
    palette.info["transparency"] = 0
    for image in (Image.fromarray(la, "LA"), Image.fromarray(la, "LA").convert("RGBA"), palette):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))
        assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - called at once
                      "image file 0 has transparent pixels (alpha down to 0)", "opaque")
    la[..., 1] = 255  # every pixel opaque: the alpha channel says nothing, and the image is read as it shows
    buf = io.BytesIO()
    Image.fromarray(la, "LA").save(buf, format="PNG")
    assert len(compress(stub, pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))).codes) == 1
    assert np.array_equal(images.from_files([buf.getvalue()], (64, 64, 1))[0, 0], la[..., 0] / 255.0)


def test_image_files_are_read_as_their_exif_orientation_shows_them(stub) -> None:
    """A phone stores a photo sideways with an orientation tag; viewers (and now the server) turn it upright."""
    shown = np.zeros((64, 64), np.uint8)
    shown[5:20, 30:60] = 255  # an off-centre bar: every turn or flip moves it
    stored = np.rot90(shown)  # turned a quarter anticlockwise: EXIF orientation 6 says "turn clockwise to show"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation (EXIF 2.3, tag 274)
    files = []
    for fmt in ("PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format=fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
        files.append(buf.getvalue())
    for i, f in enumerate(files):
        assert np.array_equal(images.from_files([f], (64, 64, 1))[0, 0], shown / 255.0), i
    plain = io.BytesIO()
    Image.fromarray(shown).save(plain, format="PNG")
    codes = compress(stub, pb.Images(files=pb.EncodedImages(files=[plain.getvalue(), files[0]]))).codes
    assert codes[0] == codes[1]  # the tagged file is the same image as the upright one
    # An EXIF block that does not parse says no orientation: the image is read as stored (it failed INTERNAL)
    bad = io.BytesIO()
    Image.fromarray(shown).save(bad, format="PNG", exif=b"Exif\x00\x00not a TIFF block at all")
    assert np.array_equal(images.from_files([bad.getvalue()], (64, 64, 1))[0, 0], shown / 255.0)
    assert len(compress(stub, pb.Images(files=pb.EncodedImages(files=[bad.getvalue()]))).codes) == 1
    # Not square: the size a model expects is the size as shown. A 32x64 (HxW) picture stored as 64x32 with the tag
    wide = np.zeros((32, 64), np.uint8)
    wide[:, :10] = 255
    tagged, untagged = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.rot90(wide)).save(tagged, format="PNG", exif=exif)
    Image.fromarray(np.rot90(wide)).save(untagged, format="PNG")
    assert np.array_equal(images.from_files([tagged.getvalue()], (32, 64, 1))[0, 0], wide / 255.0)
    with pytest.raises(InvalidInput, match=r"image file 0 is 64x32 \(HxW\), the model expects 32x64"):
        images.from_files([untagged.getvalue()], (32, 64, 1))
    with pytest.raises(InvalidInput, match=r"image file 0 is 32x64 \(HxW, 64x32 as stored before its EXIF "
                                           r"orientation\), the model expects 64x32"):
        images.from_files([tagged.getvalue()], (64, 32, 1))
    # Refused either way up before its orientation is read: the size as stored and turned (it said the stored one
    # alone, though the size is checked the way up it is shown)
    with pytest.raises(InvalidInput, match=r"image file 0 is 64x32 \(HxW as stored, 32x64 turned\), the model "
                                           r"expects 64x64"):
        images.from_files([tagged.getvalue()], (64, 64, 1))


def test_a_large_conversion_stops_once_its_deadline_passes(monkeypatch) -> None:
    """Files are read and written on a worker thread, which the caller's deadline does not stop by itself: the
    conversion looks at the deadline every 64 files (a clock that ticks once per look, here)."""
    from disco.service.errors import DeadlineExceeded

    class Clock:
        now = 0.0

        @classmethod
        def monotonic(cls) -> float:
            cls.now += 1.0
            return cls.now

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    files = [buf.getvalue()] * 300
    monkeypatch.setattr(images, "time", Clock)
    with pytest.raises(DeadlineExceeded, match="deadline passed with 128 of 300 image files read"):
        images.from_files(files, (64, 64, 1), deadline=2.5)  # looks at 0, 64 and 128: the clock reads 1, 2, 3
    with pytest.raises(DeadlineExceeded, match="deadline passed with 0 of 300 image files written"):
        images.to_png(np.zeros((300, 64, 64, 1), np.uint8), deadline=0.5)
    assert len(images.to_png(np.zeros((300, 64, 64, 1), np.uint8), deadline=1e9)) == 300
    assert images.from_files(files, (64, 64, 1)).shape == (300, 1, 64, 64)  # no deadline: never looked at


def test_image_files_of_16_bit_grey_are_read_exactly_and_others_refused_not_clipped(stub) -> None:
    """PIL's convert() clips 16-bit values at 255 and truncates floats: such files would encode as other images.
    16-bit grey is read at full precision; 32-bit integers and floats (their range unsaid) are refused."""
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(levels).save(buf, format=fmt)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            assert im.mode.startswith("I;16"), im.mode
        for c in (1, 2, 3, 4):
            x = images.from_files([buf.getvalue()], (64, 64, c))[0]
            assert np.array_equal(x[min(c, 3) - 1 if c != 2 else 0], levels / np.float32(65535.0)), (fmt, c)
            if c in (2, 4):
                assert (x[-1] == 1.0).all()
        codes = compress(stub, pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))).codes
        exact = compress(stub, tensor((levels / np.float32(65535.0))[None, ..., None].astype("<f4"), pb.DTYPE_FLOAT32))
        assert list(codes) == list(exact.codes), fmt  # the same code as the same pixels sent as floats
    # WhiteIsZero (TIFF photometric 0): sample 0 is white. Pillow inverts 8-bit such files as it opens them, not
    # 16-bit ones, which read as their negative: a TIFF written by hand, little-endian, one strip
    data = (65535 - levels).astype("<u2").tobytes()
    tags = [(256, 3, 64), (257, 3, 64), (258, 3, 16), (259, 3, 1), (262, 3, 0), (273, 4, 8 + 2 + 12 * 9 + 4),
            (277, 3, 1), (278, 3, 64), (279, 4, len(data))]
    tiff = b"II" + struct.pack("<HIH", 42, 8, len(tags)) + b"".join(
        struct.pack("<HHIH2x", t, k, 1, v) if k == 3 else struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    tiff += struct.pack("<I", 0) + data
    assert np.array_equal(images.from_files([tiff], (64, 64, 1))[0, 0], levels / np.float32(65535.0))
    buf = io.BytesIO()  # 16-bit grey with a level marked transparent (tRNS), which one pixel has
    Image.fromarray(levels).save(buf, format="PNG", transparency=16)
    with pytest.raises(InvalidInput, match=r"image file 0 has transparent pixels \(grey level 16 is marked"):
        images.from_files([buf.getvalue()], (64, 64, 1))
    for image in (Image.fromarray(np.full((64, 64), 1000, np.int32)), Image.fromarray(np.full((64, 64), 0.5, np.float32))):
        buf = io.BytesIO()
        image.save(buf, format="TIFF")
        files = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))
        assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - called at once
                      f"image file 0 has pixel mode {image.mode!r} (not 8- or 16-bit unsigned integers)", "float32 tensor")
    buf = io.BytesIO()  # 8 bits, but LAB: convert() would read it as RGB (it was called "more than 8 bits")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8), "LAB").save(buf, format="TIFF")
    files = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))
    assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT, "pixel mode 'LAB' (not a mode")


def test_nan_pixels_are_named_as_such(stub) -> None:
    x = np.full((1, 64, 64, 1), 0.5, "<f4")
    x.flat[7] = np.nan
    assert_status(lambda: compress(stub, tensor(x, pb.DTYPE_FLOAT32)), grpc.StatusCode.INVALID_ARGUMENT,
                  "1 NaN or infinite values (the first in image 0, at row 0, column 7, channel 0)")


def test_empty_batch(stub) -> None:
    empty = np.zeros((0, 64, 64, 1), np.uint8)
    assert_status(lambda: compress(stub, tensor(empty)), grpc.StatusCode.INVALID_ARGUMENT, "empty")
    negative = pb.Images(tensor=pb.Tensor(data=b"", shape=[-1, 64, 64, 1], dtype=pb.DTYPE_UINT8))
    assert_status(lambda: compress(stub, negative), grpc.StatusCode.INVALID_ARGUMENT,
                  "shape [-1, 64, 64, 1] has a negative image count")
    assert_status(lambda: compress(stub, pb.Images(files=pb.EncodedImages())), grpc.StatusCode.INVALID_ARGUMENT, "empty")
    assert_status(lambda: compress(stub, pb.Images()), grpc.StatusCode.INVALID_ARGUMENT, "no images")
    assert_status(lambda: decompress(stub, []), grpc.StatusCode.INVALID_ARGUMENT, "no codes")


def test_unknown_model_and_quality(stub, sprites) -> None:
    imgs, _ = sprites
    assert_status(lambda: compress(stub, tensor(imgs[:1]), model=pb.ModelRef(name="faces")),
                  grpc.StatusCode.NOT_FOUND, "'faces'", "dsprites")
    assert_status(lambda: compress(stub, tensor(imgs[:1]), model=pb.ModelRef(name="dsprites", version="99")),
                  grpc.StatusCode.NOT_FOUND, "'99'")
    assert_status(lambda: compress(stub, tensor(imgs[:1]), quality="ultra"), grpc.StatusCode.INVALID_ARGUMENT, "'ultra'")


def test_truncated_code(stub, sprites) -> None:
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    assert_status(lambda: decompress(stub, [code[:-1]]), grpc.StatusCode.DATA_LOSS, "checksum")
    assert_status(lambda: decompress(stub, [code[:3]]), grpc.StatusCode.INVALID_ARGUMENT, "3 bytes")


def test_every_bit_flip_is_caught(stub, sprites) -> None:
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    for i in range(len(code) * 8):
        bad = bytearray(code)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(grpc.RpcError) as info:
            decompress(stub, [bytes(bad)])
        assert info.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT)


def test_code_from_another_model(stub, server: ServerThread, tiny_repo, sprites) -> None:
    other = serve(tiny_repo)
    try:
        with grpc.insecure_channel(other.target) as ch:
            foreign = codec_pb2_grpc.CodecStub(ch).Compress(
                pb.CompressRequest(images=tensor(sprites[0][:1])), timeout=30).codes[0]
    finally:
        other.stop()
    # A different model id is named as such; a colliding id still fails the keyed checksum.
    with pytest.raises(grpc.RpcError) as info:
        decompress(stub, [foreign])
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS)
    assert "model id" in info.value.details()


def test_traverse_edits_and_sweeps_named_factors(stub, sprites) -> None:
    imgs, _ = sprites
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    f = m.factors[0]
    req = pb.TraverseRequest(images=tensor(imgs[:2]), sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=5))
    r = stub.Traverse(req, timeout=10)
    out = np.frombuffer(r.images.tensor.data, np.uint8).reshape(tuple(r.images.tensor.shape))
    assert out.shape == (10, 64, 64, 1)
    assert (out[0] != out[4]).any()  # the sweep moves the picture
    code = compress(stub, tensor(imgs[:1])).codes[0]
    same = stub.Traverse(pb.TraverseRequest(code=code), timeout=10)
    np.testing.assert_array_equal(np.frombuffer(same.images.tensor.data, np.uint8).reshape(1, 64, 64, 1),
                                  decompress(stub, [code]))
    shifted = stub.Traverse(pb.TraverseRequest(code=code, edits=[pb.FactorEdit(factor=f.name, shift=1.0)]), timeout=10)
    assert shifted.images.tensor.data != same.images.tensor.data


def test_traverse_bad_factor_and_range(stub, sprites, server) -> None:
    imgs, _ = sprites
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    f = m.factors[0]
    runs = lambda: server.running.servicer.metrics.registry.get_sample_value(  # noqa: E731
        "disco_batch_size_count", {"batcher": f"{m.name}/{m.version}/encode"})
    before = runs()
    bad = pb.TraverseRequest(images=tensor(imgs[:64]), edits=[pb.FactorEdit(factor="colour", set=0.0)])
    assert_status(lambda: stub.Traverse(bad, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "'colour'", f.name)
    assert runs() == before  # refused before its images were encoded
    far = pb.TraverseRequest(images=tensor(imgs[:1]), edits=[pb.FactorEdit(factor=f.name, set=f.max + 100)])
    assert_status(lambda: stub.Traverse(far, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "outside its range")
    # one float32 step past the bound: shown with the digits that tell it from the bound (':g' printed both alike)
    step = float(np.nextafter(np.float32(f.max), np.float32(np.inf)))
    top = f"[{np.float32(f.min)}, {np.float32(f.max)}]"
    near = pb.TraverseRequest(images=tensor(imgs[:1]), edits=[pb.FactorEdit(factor=f.name, set=step)])
    assert_status(lambda: stub.Traverse(near, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                  f"value {np.float32(step)} for factor {f.name!r} is outside its range {top}")
    assert str(np.float32(step)) != str(np.float32(f.max))
    stop = pb.TraverseRequest(images=tensor(imgs[:1]), sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=step, steps=3))
    assert_status(lambda: stub.Traverse(stop, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, f"sweep stop {np.float32(step)}")
    for edit in (pb.FactorEdit(factor=f.name, set=float("nan")), pb.FactorEdit(factor=f.name, shift=float("nan"))):
        nan = pb.TraverseRequest(images=tensor(imgs[:1]), edits=[edit])
        assert_status(lambda: stub.Traverse(nan, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - at once
                      f"nan of factor {f.name!r} is not a finite number" if edit.HasField("shift") else
                      f"value nan for factor {f.name!r} is not a finite number")
    assert_status(lambda: stub.Traverse(pb.TraverseRequest(), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "source")
    many = pb.TraverseRequest(images=tensor(np.concatenate([imgs, imgs])[:65]),  # 65 sources x 64 steps: 4160 out
                              sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=64))
    assert_status(lambda: stub.Traverse(many, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                  "traverse would return 4160 images (65 source image(s) x 64 sweep steps), the limit is 4096: a sweep "
                  "of 64 steps takes at most 64 source images a request")
    # A review: a batch container of 100 (which no client cuts) was refused without saying how many fit
    box = compress(stub, tensor(imgs[:100]), batch=True).codes[0]
    wide = pb.TraverseRequest(code=box, sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=64))
    assert_status(lambda: stub.Traverse(wide, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                  "(100 source image(s) x 64 sweep steps), the limit is 4096: a sweep of 64 steps takes at most 64")
    # A review: a 1-step sweep from NaN to NaN was told that stop nan differs from start nan; it is not finite
    for start, stop in ((float("nan"), float("nan")), (float("inf"), float("inf"))):
        one = pb.TraverseRequest(images=tensor(imgs[:1]),
                                 sweep=pb.FactorSweep(factor=f.name, start=start, stop=stop, steps=1))
        assert_status(lambda: stub.Traverse(one, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - at once
                      f"sweep start {start} for factor {f.name!r} is not a finite number")


def test_codes_with_bytes_added_or_altered_are_refused_even_with_a_valid_checksum(stub, sprites) -> None:
    """The fingerprint is public (GetModel), so anyone can recompute a checksum: a code must also be the one
    encoding of its symbols, and a batch count its shortest form."""
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    fp = bytes.fromhex(m.fingerprint)
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    h = container.parse(code)
    for payload in (h.payload + b"\x00", h.payload + b"\xff" * 3, h.payload[:-1] + bytes([h.payload[-1] ^ 1])):
        forged = container.wrap(h.version, h.quality, fp, payload)
        with pytest.raises(grpc.RpcError) as info:
            decompress(stub, [forged])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not the encoding of the symbols it decodes to" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # megabytes of padding are refused from the length alone
        decompress(stub, [container.wrap(h.version, h.quality, fp, h.payload + bytes(1 << 20))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds at most" in info.value.details()
    batch = compress(stub, tensor(sprites[0][:3]), batch=True).codes[0]
    b = container.parse_batch(batch)
    body = batch[:2] + bytes([b.count | 0x80, 0x00]) + b.stream  # 3 written in two LEB128 bytes
    with pytest.raises(grpc.RpcError) as info:
        decompress(stub, [body + container.checksum(fp, body, container.BATCH_CHECKSUM_BYTES)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shortest LEB128" in info.value.details()
    body = batch[:-container.BATCH_CHECKSUM_BYTES] + bytes(4)  # a word added to the stream
    with pytest.raises(grpc.RpcError) as info:
        decompress(stub, [body + container.checksum(fp, body, container.BATCH_CHECKSUM_BYTES)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch stream is not the encoding" in info.value.details()


def test_traverse_edits_are_bounded_and_shifts_finite(stub, sprites) -> None:
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    f = m.factors[0]
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    cases = {"too many edits": [pb.FactorEdit(factor=f.name, shift=0.0)] * 65}
    for shift in (float("nan"), float("inf"), 1e30, -(f.max - f.min) - 0.5):
        cases[f"shift {shift}"] = [pb.FactorEdit(factor=f.name, shift=shift)]
    for what, edits in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.Traverse(pb.TraverseRequest(code=code, edits=edits), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    ok = stub.Traverse(pb.TraverseRequest(code=code, edits=[pb.FactorEdit(factor=f.name, shift=f.max - f.min)]),
                       timeout=10)
    assert len(ok.images.tensor.data) == 64 * 64


def test_traverse_edits_each_factor_once_and_a_code_keeps_its_model(stub, sprites) -> None:
    """Shifts of one factor would add up past its range, and a later edit or the sweep would undo an earlier
    one: a factor is edited once. A sweep's steps are checked before the images they multiply. A code names its
    model version, so a Traverse from a code may name that model (or nothing), not another."""
    m = stub.GetModel(pb.GetModelRequest(), timeout=10)
    f, g = m.factors[0], m.factors[1]
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    width = f.max - f.min
    refused = {
        "edited 2 times": pb.TraverseRequest(code=code, edits=[pb.FactorEdit(factor=f.name, shift=width)] * 2),
        "is edited 2 times": pb.TraverseRequest(code=code, edits=[pb.FactorEdit(factor=f.name, set=f.min)],
                                                sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=3)),
        "sweep steps 1000000 is outside 1..64": pb.TraverseRequest(
            code=code, sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=10**6)),
        "a sweep of 1 step yields its start only": pb.TraverseRequest(
            code=code, sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.max, steps=1)),
        "but the request names color_dsprites/(latest)": pb.TraverseRequest(
            code=code, model=pb.ModelRef(name="color_dsprites")),
        f"but the request names {m.name}/1": pb.TraverseRequest(code=code, model=pb.ModelRef(version="1")),
    }
    for message, request in refused.items():
        assert_status(lambda r=request: stub.Traverse(r, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert_status(lambda: stub.Traverse(pb.TraverseRequest(code=code, model=pb.ModelRef(name="nope")), timeout=10),
                  grpc.StatusCode.NOT_FOUND, "'nope'")
    same = stub.Traverse(pb.TraverseRequest(code=code), timeout=10).images.tensor.data
    for ref in (pb.ModelRef(name=m.name), pb.ModelRef(name=m.name, version=m.version), pb.ModelRef(version=m.version)):
        assert stub.Traverse(pb.TraverseRequest(code=code, model=ref), timeout=10).images.tensor.data == same
    both = pb.TraverseRequest(code=code, edits=[pb.FactorEdit(factor=f.name, shift=width)],
                              sweep=pb.FactorSweep(factor=g.name, start=g.min, stop=g.max, steps=3))
    assert len(stub.Traverse(both, timeout=10).images.tensor.data) == 3 * 64 * 64  # different factors: fine
    one = pb.TraverseRequest(code=code, sweep=pb.FactorSweep(factor=f.name, start=f.min, stop=f.min, steps=1))
    assert len(stub.Traverse(one, timeout=10).images.tensor.data) == 64 * 64


def test_long_names_and_unknown_formats_get_their_own_status(stub, sprites) -> None:
    name = "m" * 100_000  # echoed whole, the message would pass gRPC's 16 KiB metadata limit (RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name=name)), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "(100000 characters)" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        compress(stub, tensor(sprites[0][:1]), quality="q" * 100_000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    code = compress(stub, tensor(sprites[0][:1])).codes[0]
    with pytest.raises(grpc.RpcError) as info:
        stub.Decompress(pb.DecompressRequest(codes=[code], format=7), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image format 7 is unknown" in info.value.details()


def test_server_still_serves_after_bad_input(stub, server: ServerThread, sprites) -> None:
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            decompress(stub, [b"\x10\x00garbage"])
    imgs, _ = sprites
    out = decompress(stub, list(compress(stub, tensor(imgs[:4])).codes))
    assert out.shape == (4, 64, 64, 1)
    test_health_is_serving(server)


def test_batch_codes_count_against_the_image_limit(stub, sprites) -> None:
    big = stub.Compress(pb.CompressRequest(images=tensor(sprites[0][:112]), batch=True), timeout=30).codes[0]
    s = serve(max_images_per_request=100)
    try:
        with grpc.insecure_channel(s.target) as ch:
            st = codec_pb2_grpc.CodecStub(ch)
            blobs = [st.Compress(pb.CompressRequest(images=tensor(sprites[0][i : i + 80]), batch=True), timeout=30).codes[0]
                     for i in (0, 80)]
            assert_status(lambda: st.Decompress(pb.DecompressRequest(codes=blobs), timeout=30),
                          grpc.StatusCode.INVALID_ARGUMENT, "160 images", "limit is 100")
            assert len(st.Decompress(pb.DecompressRequest(codes=blobs[:1]), timeout=30).images.tensor.data) == 80 * 4096
            # One container of more images than the limit is named; a count byte flipped to declare as many fails
            # its checksum instead (DATA_LOSS), before its count could be taken for the caller's mistake
            assert_status(lambda: st.Decompress(pb.DecompressRequest(codes=[blobs[1], big]), timeout=30),
                          grpc.StatusCode.INVALID_ARGUMENT, "code 1 declares 112 images", "split the batch")
            b = container.parse_batch(blobs[0])
            flipped = blobs[0][:2] + bytes([b.count | 0x20]) + blobs[0][3:]  # 80 -> 112, still one LEB128 byte
            assert_status(lambda: st.Decompress(pb.DecompressRequest(codes=[blobs[1], flipped]), timeout=30),
                          grpc.StatusCode.DATA_LOSS, "code 1: checksum mismatch")
            # ... also where only the total passes the limit (56 declared + 80 > 100, neither alone)
            small = st.Compress(pb.CompressRequest(images=tensor(sprites[0][:40]), batch=True), timeout=30).codes[0]
            forged = small[:2] + bytes([container.parse_batch(small).count | 0x10]) + small[3:]  # 40 -> 56
            assert_status(lambda: st.Decompress(pb.DecompressRequest(codes=[forged, blobs[0]]), timeout=30),
                          grpc.StatusCode.DATA_LOSS, "code 0: checksum mismatch")
            # Traverse checks the code before it multiplies the count by the sweep's steps
            sweep = pb.FactorSweep(factor="posX", start=-1, stop=1, steps=2)
            assert_status(lambda: st.Traverse(pb.TraverseRequest(code=flipped, sweep=sweep), timeout=30),
                          grpc.StatusCode.DATA_LOSS, "checksum mismatch")
    finally:
        s.stop()


def test_huge_image_file_is_refused_from_its_header(stub) -> None:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    files = pb.Images(files=pb.EncodedImages(files=[buf.getvalue()]))
    assert_status(lambda: compress(stub, files), grpc.StatusCode.INVALID_ARGUMENT, "9000x9000", "64x64")


def test_a_png_of_many_colour_profiles_is_refused_before_they_inflate_and_corrupt_pixels_are_named(stub) -> None:
    """A review: Pillow inflates every iCCP chunk of a PNG, up to 1 MiB each, however many there are: 2,500 in a
    2.6 MB file held the event loop 2.3 s, and under --processes a request of 16 outlasted the watchdog, which
    stopped the server. The PNG specification allows one. And a TIFF whose deflate data is corrupt was refused
    as 'decoder error -2' alone."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    profile = chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * ((1 << 20) - 16), 9))  # 1 KB inflating to 1 MiB

    def files(blob: bytes) -> pb.Images:
        return pb.Images(files=pb.EncodedImages(files=[blob]))

    assert len(compress(stub, files(png[:33] + profile + png[33:])).codes) == 1  # one profile (after IHDR) is fine
    end = png.rfind(b"IEND") - 4
    for many in (png[:33] + profile * 2500 + png[33:], png[:end] + profile * 2500 + png[end:]):  # before or after IDAT
        assert_status(lambda: compress(stub, files(many)), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023 - at once
                      "image file 0 is a PNG with more than one iCCP chunk")  # from the chunk headers, none inflated
    tiff = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tiff, format="TIFF",
                                                                                       compression="tiff_adobe_deflate")
    broken = bytearray(tiff.getvalue())
    broken[len(broken) // 3] ^= 0xFF  # inside the deflate stream
    assert_status(lambda: compress(stub, files(bytes(broken))), grpc.StatusCode.INVALID_ARGUMENT,
                  "its encoded data is corrupt")
    # Text chunks Pillow inflates without counting them against its text bound (an empty keyword), and chunks
    # beyond number (a review: 2,000 of the first took 1.5 s; a million empty ones 2.6 s)
    text = chunk(b"zTXt", b"\0\0" + zlib.compress(b"\0" * ((1 << 20) - 1), 9))
    assert_status(lambda: compress(stub, files(png[:33] + text * 9 + png[33:])), grpc.StatusCode.INVALID_ARGUMENT,
                  "more than 8 compressed text chunks (zTXt, iTXt)")
    assert len(compress(stub, files(png[:33] + text * 8 + png[33:])).codes) == 1
    titles = chunk(b"iTXt", b"Title\0\0\0en\0Title\0" + "título".encode())  # not compressed: nothing inflates
    assert len(compress(stub, files(png[:33] + titles * 9 + png[33:])).codes) == 1
    empty = chunk(b"zzZz", b"")
    assert png.count(b"IDAT") == 1  # IHDR, IDAT, IEND: 4,093 more make 4,096 chunks in all
    assert len(compress(stub, files(png[:33] + empty * 4093 + png[33:])).codes) == 1
    assert_status(lambda: compress(stub, files(png[:33] + empty * 4094 + png[33:])), grpc.StatusCode.INVALID_ARGUMENT,
                  "a PNG of more than 4096 chunks")


def test_a_few_large_image_files_are_read_off_the_event_loop(stub, monkeypatch) -> None:
    """Requests of up to 16 files were read on the event loop whatever their size (a review: GIF comment blocks cost
    0.5 s for 5 MB, and 16 files of 4 MB would have held every other call for seconds). Past 1 MiB of files, a
    request is read on a thread, as one of many files is."""
    import threading
    import zlib

    where: list[str] = []
    read = images.from_files

    def noted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        where.append(threading.current_thread().name)
        return read(*args, **kw)

    monkeypatch.setattr(images, "from_files", noted)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    pad = b"zzZz" + b"\0" * (600 << 10)  # an ancillary chunk Pillow skips, 600 KiB
    padded = png[:33] + struct.pack(">I", len(pad) - 4) + pad + struct.pack(">I", zlib.crc32(pad)) + png[33:]
    for blobs in ([png, png], [padded, padded]):
        assert len(compress(stub, pb.Images(files=pb.EncodedImages(files=blobs))).codes) == 2
    assert not where[0].startswith("disco-images") and where[1].startswith("disco-images"), where


def test_an_answer_ready_after_the_deadline_is_counted_deadline_exceeded_and_not_sent(server: ServerThread, sprites) -> None:
    """The rpc wrapper's rule, with the deadline already passed when the handler ends (the race that a real call
    wins only now and then: tests/test_serving.py). gRPC core has ended such a call: sending failed with an ERROR
    log, and the call was counted OK; an abort after it failed the same way."""
    from concurrent.futures import CancelledError

    from disco.service.servicer import CodecServicer

    class Late:  # the ServicerContext of a call whose deadline passed 1 ms ago, which gRPC core has ended
        def __init__(self) -> None:
            self.aborted: list[grpc.StatusCode] = []

        def time_remaining(self) -> float:
            return -0.001

        async def abort(self, code, details: str) -> None:  # noqa: ANN001
            self.aborted.append(code)
            raise RuntimeError("ExecuteBatchError: the call is over")  # what gRPC raises for an ended call

    servicer: CodecServicer = server.running.servicer
    count = lambda code: server.running.metrics.registry.get_sample_value(  # noqa: E731
        "disco_requests_total", {"method": "ListModels", "code": code}) or 0.0
    before = count("OK"), count("DEADLINE_EXCEEDED")
    late = Late()
    with pytest.raises(CancelledError):  # the handler ends as cancelled, which gRPC takes quietly: nothing is sent
        server.run(servicer.ListModels(pb.ListModelsRequest(), late))
    assert late.aborted == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert (count("OK"), count("DEADLINE_EXCEEDED")) == (before[0], before[1] + 1)
