"""The client SDK and the file CLI against the real server."""
from __future__ import annotations

import errno
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disco.client import Client, Code, DataLoss, InvalidArgument, NotFound, Unavailable, inspect
from disco.client import cli
from disco.client.bench import free_port
from disco.service.fidelity import foreground_iou

from conftest import ServerThread, serve


@pytest.fixture(scope="module")
def client(server: ServerThread):
    with Client(server.target) as c:
        yield c


def test_every_input_kind_gives_the_same_code(client: Client, sprites, tmp_path: Path) -> None:
    img = sprites[0][0]  # (64, 64, 1) uint8
    ref = client.compress(img)[0]
    assert isinstance(ref, Code) and ref.model == "dsprites" and bytes(ref) == ref.data
    png = tmp_path / "a.png"
    Image.fromarray(img[..., 0]).save(png)
    kinds = [img[..., 0], img[None], [img], Image.open(png), png, str(png), png.read_bytes(), (img / 255.0).astype(np.float32)]
    for kind in kinds:
        assert client.compress(kind)[0] == ref, type(kind)


def test_round_trip_accepts_bytes_and_code_objects(client: Client, sprites) -> None:
    imgs = sprites[0][:32]
    codes = client.compress(imgs)
    a = client.decompress(codes)
    b = client.decompress([c.data for c in codes])
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 64, 64, 1) and a.dtype == np.uint8
    assert foreground_iou(imgs, a).mean() > 0.6


def test_the_rgb_model_round_trips_color_sprites(client: Client) -> None:
    """The embedded RGB model (trained from a folder of color-dSprites PNGs) through the real server."""
    from disco.export.data.ground_truth import DSpritesData
    from disco.service.rd import foreground

    x = DSpritesData("color").sample(32, np.random.default_rng(77))
    imgs = np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    codes = client.compress(imgs, model="color_dsprites")
    assert all(len(c.data) <= 12 for c in codes)
    out = client.decompress(codes)
    assert out.shape == (32, 64, 64, 3) and out.dtype == np.uint8
    assert foreground_iou(foreground(imgs), foreground(out)).mean() > 0.6
    with pytest.raises(InvalidArgument, match="expects 64x64x3"):
        client.compress(imgs[..., :1], model="color_dsprites")


def test_errors_map_to_the_sdk_hierarchy(client: Client, sprites) -> None:
    code = client.compress(sprites[0][0])[0].data
    with pytest.raises(DataLoss):
        client.decompress([code[:-1] + bytes([code[-1] ^ 1])])
    with pytest.raises(InvalidArgument, match="64x64x1"):
        client.compress(np.zeros((8, 8), np.uint8))
    with pytest.raises(NotFound):
        client.compress(sprites[0][0], model="nope")
    with pytest.raises(ValueError, match="int16"):
        client.compress(np.zeros((64, 64), np.int16))


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=2) as c, pytest.raises(Unavailable):
        c.models()


def test_models_health_and_encode(client: Client, sprites) -> None:
    assert client.health()
    from disco.service.repository import EMBEDDED, Repository

    repo = Repository.load(EMBEDDED)
    assert sorted((m.name, m.version) for m in client.models()) == sorted((e.name, e.version) for e in repo.entries())
    default = client.model()  # a request that names no model gets the latest dsprites, whatever else ships
    assert (default.name, default.version) == ("dsprites", repo.get("dsprites").version)
    factors = client.encode(sprites[0][:2])
    assert len(factors) == 2 and all(v.std > 0 for f in factors for v in f.values())
    name = next(iter(factors[0]))
    assert factors[0][name].dim >= 0 and set(factors[0].means()) == set(factors[0])


def test_cli_round_trips_a_folder(server: ServerThread, sprites, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    for i, img in enumerate(sprites[0][:40]):
        sub = src / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(sub / f"{i:03d}.png")
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "codes"), "--target", server.target, "--batch", "16"]) == 0
    assert "compressed 40 images" in capsys.readouterr().out
    codes = sorted((tmp_path / "codes").rglob("*.dsc"))
    assert len(codes) == 40 and {p.parent.name for p in codes} == {"a", "b"}
    assert cli.main(["decompress", str(tmp_path / "codes"), "-o", str(tmp_path / "out"), "--target", server.target]) == 0
    out = np.stack([np.asarray(Image.open((tmp_path / "out" / p.relative_to(tmp_path / "codes")).with_suffix(".png")))
                    for p in codes])
    ref = np.stack([np.asarray(Image.open(src / p.relative_to(tmp_path / "codes").with_suffix(".png"))) for p in codes])
    assert foreground_iou(ref, out).mean() > 0.6
    assert cli.main(["info", str(codes[0])]) == 0
    assert "format 2" in capsys.readouterr().out
    assert cli.main(["models", "--target", server.target]) == 0
    assert "dsprites/" in capsys.readouterr().out


def test_cli_reports_server_errors(server: ServerThread, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.dsc"
    bad.write_bytes(b"\x10\x00\x01\x02\x03")
    assert cli.main(["decompress", str(bad), "-o", str(tmp_path / "o"), "--target", server.target]) == 1
    assert "INVALID_ARGUMENT: code 0 names model id 0x00, which this server lacks" in capsys.readouterr().err


def test_cli_refuses_runs_that_would_overwrite_their_own_outputs(server: ServerThread, sprites, tmp_path: Path) -> None:
    png = lambda path, k: Image.fromarray(sprites[0][k][..., 0]).save(path)  # noqa: E731
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    png(tmp_path / "a" / "x.png", 0)
    png(tmp_path / "a" / "x.bmp", 1)
    png(tmp_path / "b" / "y.png", 2)
    png(tmp_path / "a" / "y.png", 3)
    out = tmp_path / "codes"
    base = ["-o", str(out), "--target", server.target]
    with pytest.raises(SystemExit, match=r"x\.(png|bmp) and .*x\.(png|bmp) would both be written to .*x\.dsc"):
        cli.main(["compress", str(tmp_path / "a"), *base])
    with pytest.raises(SystemExit, match=r"y\.png and .*y\.png would both be written"):
        cli.main(["compress", str(tmp_path / "a" / "y.png"), str(tmp_path / "b"), *base])
    assert not out.exists()  # refused before any work
    with Client(server.target) as c:
        (blob,) = c.compress(sprites[0][:2], batch=True)
        single = c.compress(sprites[0][:1])[0]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "z.dsc").write_bytes(blob.data)  # -> z-00000.png, z-00001.png
    (tmp_path / "c" / "z-00000.dsc").write_bytes(single.data)  # -> z-00000.png as well
    with pytest.raises(SystemExit, match="would both be written to .*z-00000.png"):
        cli.main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "pngs"), "--target", server.target])
    (tmp_path / "empty").mkdir()  # a run with nothing to do fails, rather than report 0 images and exit 0
    with pytest.raises(SystemExit, match="no files ending in .bmp, .gif.* under .*empty"):
        cli.main(["compress", str(tmp_path / "empty"), *base])


def test_cli_writes_every_good_file_and_names_every_bad_one(server: ServerThread, sprites, tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    src = tmp_path / "in"
    (src / "folder.png").mkdir(parents=True)  # a folder with an image's name is not an input
    for k in range(7):
        Image.fromarray(sprites[0][k][..., 0]).save(src / f"{k}.png")
    (src / "3.png").write_bytes(b"not a png")
    (src / "5.png").write_bytes(b"")
    out = tmp_path / "codes"
    assert cli.main(["compress", str(src), "-o", str(out), "--batch", "4", "--target", server.target]) == 1
    io = capsys.readouterr()
    assert "compressed 5 images" in io.out
    assert "2 of 7 files failed" in io.err and f"{src / '3.png'}: INVALID_ARGUMENT" in io.err
    assert f"{src / '5.png'}: INVALID_ARGUMENT" in io.err
    assert sorted(p.name for p in out.iterdir()) == [f"{k}.dsc" for k in (0, 1, 2, 4, 6)]
    (out / "9.dsc").write_bytes(b"\x20garbage")
    assert cli.main(["decompress", str(out), "-o", str(tmp_path / "pngs"), "--target", server.target]) == 1
    io = capsys.readouterr()
    assert "decompressed 5 images" in io.out and f"{out / '9.dsc'}: " in io.err
    assert len(list((tmp_path / "pngs").iterdir())) == 5
    # A file that cannot be read is one more failure of the run, named with the others; the rest still decompress
    # (root reads any mode, so the read fails at the file system's seam)
    read_bytes = Path.read_bytes

    def refused(f: Path) -> bytes:
        if f.name == "4.dsc":
            raise PermissionError(13, "Permission denied", str(f))
        return read_bytes(f)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", refused)
        assert cli.main(["decompress", str(out), "-o", str(tmp_path / "pngs2"), "--target", server.target]) == 1
    io = capsys.readouterr()
    assert "decompressed 4 images" in io.out and "2 of 6 files failed" in io.err
    assert f"{out / '4.dsc'}: cannot read it: [Errno 13] Permission denied" in io.err
    assert sorted(p.name for p in (tmp_path / "pngs2").iterdir()) == [f"{k}.png" for k in (0, 1, 2, 6)]
    with pytest.raises(SystemExit, match=r"--quality 'best' is unknown to model the default, expected one of \["):
        cli.main(["compress", str(src), "-o", str(tmp_path / "none"), "--quality", "best", "--target", server.target])
    assert not (tmp_path / "none").exists()  # refused once, before any file was sent
    with Client(server.target) as c:
        low = min(c.model().qualities, key=lambda q: q.payload_bits).name
    assert cli.main(["compress", str(src / "0.png"), "-o", str(tmp_path / "low"), "--quality", low,
                     "--target", server.target]) == 0
    with Client(server.target) as c:
        wanted = next(q.id for q in c.model().qualities if q.name == low)
    assert inspect((tmp_path / "low" / "0.dsc").read_bytes()).quality_id == wanted
    for bad in (["--batch", "0"], ["--concurrency", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(["compress", str(src), "-o", str(out), "--target", server.target, *bad])
    with pytest.raises(SystemExit, match="go together"):  # a key without its certificate is not plaintext
        cli.main(["models", "--target", server.target, "--tls-key", str(src / "0.png")])
    with pytest.raises(SystemExit, match="No such file"):
        cli.main(["models", "--target", server.target, "--tls-ca", str(tmp_path / "missing.pem")])
    assert cli.main(["info", str(tmp_path / "missing.dsc")]) == 1
    said = capsys.readouterr()
    assert "cannot read" in said.err and "cannot read" not in said.out  # apart from the headers a pipe reads
    dead = f"127.0.0.1:{free_port()}"  # an error that is not about a file stops the run: the rest is not sent
    assert cli.main(["compress", str(src), "-o", str(out), "--batch", "1", "--concurrency", "1", "--target", dead,
                     "--timeout", "2"]) == 1
    assert "not sent after UNAVAILABLE" in capsys.readouterr().err


def test_dispatcher_usage_and_unknown_command(capsys) -> None:
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "serve" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch) -> None:
    """A Ctrl-C while a command imports or runs printed a traceback (one per process of --processes)."""
    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["models"]) == 130
    err = capsys.readouterr().err
    assert err == "disco models: interrupted\n", err


def test_batch_container_round_trip(client: Client, sprites) -> None:
    imgs = sprites[0][:100]
    (blob,) = client.compress(imgs, batch=True)
    singles = client.compress(imgs)
    assert len(blob) < sum(len(c) for c in singles) / 2  # one header, no per-code byte rounding
    np.testing.assert_array_equal(client.decompress([blob]), client.decompress(singles))
    mixed = client.decompress([singles[0], blob, singles[1]])
    assert mixed.shape[0] == 102


def test_cli_decompresses_a_batch_code_file_into_one_png_per_image(server: ServerThread, sprites, tmp_path: Path,
                                                                     capsys) -> None:
    with Client(server.target) as c:
        (blob,) = c.compress(sprites[0][:5], batch=True)
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / "five.dsc").write_bytes(blob.data)
    assert cli.main(["decompress", str(tmp_path / "codes"), "-o", str(tmp_path / "out"), "--target", server.target]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"five-{k:05d}.png" for k in range(5)]
    assert "decompressed 5 images" in capsys.readouterr().out  # images, not code files
    # A forged header declaring 2^20 images plans one output, not a million: its count is trusted once its
    # checksum matches a model of the server's, and the server names what is wrong with it
    from disco.client.files import _trusted_count
    from disco.service import container

    forged = bytes([container.FORMAT_BATCH << 4, blob.data[1], 0x80, 0x80, 0x40]) + bytes(5)
    assert container.count(forged) == 2**20
    with Client(server.target) as c:
        fingerprints: list[bytes] = []
        assert _trusted_count(forged, c, fingerprints) == 1 and _trusted_count(blob.data, c, fingerprints) == 5
    (tmp_path / "codes" / "forged.dsc").write_bytes(forged)
    assert cli.main(["decompress", str(tmp_path / "codes"), "-o", str(tmp_path / "out2"), "--target", server.target]) == 1
    assert "forged.dsc: DATA_LOSS: code 0: checksum mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [f"five-{k:05d}.png" for k in range(5)]


def test_bad_targets_and_mixed_inputs_fail_at_once(server: ServerThread, sprites, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dns:///"):
        Client("localhost:1,localhost:2")
    png = tmp_path / "a.png"
    Image.fromarray(sprites[0][0][..., 0]).save(png)
    with Client(server.target) as c:
        with pytest.raises(TypeError, match="not both"):
            c.compress([sprites[0][0], png])
        mixed = c.compress([sprites[0][0], (sprites[0][1] / 255.0).astype(np.float32)])
        assert mixed == c.compress(sprites[0][:2])


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """`disco info codes/* | head -1`: the reader goes away, and the next write fails with EPIPE."""
    import json
    import subprocess
    import sys

    golden = json.loads((Path(__file__).parent / "expected" / "golden_codes.json").read_text())
    paths = []
    for i, case in enumerate(golden["cases"][:50]):
        paths.append(tmp_path / f"{i}.dsc")
        paths[-1].write_bytes(bytes.fromhex(case["code"]))
    proc = subprocess.Popen([sys.executable, "-m", "disco.client.cli", "info", *map(str, paths * 200)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `head -1`
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err, err


def test_a_container_whose_images_cannot_all_be_written_leaves_none(server: ServerThread, sprites, tmp_path: Path,
                                                                     capsys, monkeypatch) -> None:
    """Image k of a batch container failing to write (a full disk) left images 0..k-1 while the summary said
    nothing was written for that file."""
    with Client(server.target) as c:
        (blob,) = c.compress(sprites[0][:5], batch=True)
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / "box.dsc").write_bytes(bytes(blob))
    save, calls = Image.Image.save, []

    def disk_full(self, fp, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(fp)
        if len(calls) == 3:
            Path(fp).write_bytes(b"\x89PNG half")  # what a full disk leaves
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "pngs"
    assert cli.main(["decompress", str(tmp_path / "codes"), "-o", str(out), "--target", server.target]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert len(calls) == 3 and list(out.iterdir()) == []


def test_a_pil_image_is_sent_as_its_file_would_be(client: Client, sprites) -> None:
    """The SDK re-saved a PIL image as PNG: an EXIF orientation was dropped (the file itself is read upright by the
    server), and an animation sent the frame it stood at (the file itself is refused)."""
    shown = sprites[0][3][..., 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; the tag says: turn clockwise to show
    tagged = io.BytesIO()
    Image.fromarray(np.rot90(shown)).save(tagged, format="PNG", exif=exif)
    upright = client.compress(shown[..., None])[0]
    assert client.compress(tagged.getvalue())[0] == upright
    assert client.compress(Image.open(io.BytesIO(tagged.getvalue())))[0] == upright
    frames = [Image.fromarray(shown), Image.fromarray(np.zeros_like(shown))]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(animated.getvalue())) as im:
        im.seek(1)
        with pytest.raises(ValueError, match="2 frames"):
            client.compress(im)
        assert client.compress(im.copy())  # one frame, chosen
    mpo = io.BytesIO()  # a camera JPEG with an MPF preview: Pillow opens it as MPO, 2 frames, the first the picture
    frames[0].save(mpo, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(mpo.getvalue())) as im:
        assert im.format == "MPO" and im.n_frames == 2
        assert client.compress(im) == client.compress(mpo.getvalue())  # sent as the server reads the file


def test_cli_writes_whole_files_or_none_and_keeps_what_was_there(server: ServerThread, sprites, tmp_path: Path,
                                                                 capsys, monkeypatch) -> None:
    """A write that fails (a full disk) left an empty .dsc beside 'nothing was written for them', truncating the good
    code an earlier run had written there; a failed PNG deleted the earlier one. Outputs are written under a
    temporary name and renamed: a failure leaves the earlier file as it was, and no temporary file. (g1 sits in a
    folder of its own, where the disk is made to fill.)"""
    src = tmp_path / "in"
    for k in range(3):
        (src / ("b" if k == 1 else "a")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(sprites[0][k][..., 0]).save(src / ("b" if k == 1 else "a") / f"g{k}.png")
    out, pngs = tmp_path / "codes", tmp_path / "pngs"
    base = ["--target", server.target]
    assert cli.main(["compress", str(src), "-o", str(out), *base]) == 0
    assert cli.main(["decompress", str(out), "-o", str(pngs), *base]) == 0
    files = lambda: {str(p.relative_to(tmp_path)): p.read_bytes() for d in (out, pngs) for p in d.rglob("*")  # noqa: E731
                     if p.is_file()}
    before = files()
    write_bytes, save = Path.write_bytes, Image.Image.save

    def full_disk(path: Path, data: bytes) -> int:
        if path.parent.name == "b":
            write_bytes(path, data[:1])
            raise OSError(28, "No space left on device")
        return write_bytes(path, data)

    def full_disk_png(img: Image.Image, fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(fp).parent.name == "b":
            Path(fp).write_bytes(b"\x89PNG")
            raise OSError(28, "No space left on device")
        return save(img, fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", full_disk)
        Image.fromarray(sprites[0][5][..., 0]).save(src / "b" / "g1.png")  # another image: its code would differ
        assert cli.main(["compress", str(src), "-o", str(out), *base]) == 1
        assert "g1.png: [Errno 28] No space left on device" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", full_disk_png)
        assert cli.main(["decompress", str(out), "-o", str(pngs), *base]) == 1
    assert files() == before  # g1's earlier code and PNG as they were, the others rewritten alike, no temporary file

def test_cli_waits_out_a_full_queue_and_names_every_failure(sprites, tmp_path: Path, capsys) -> None:
    """Against a server whose queue holds 64 images, 8 requests of 64 in flight failed most files with
    RESOURCE_EXHAUSTED: the CLI retries a full queue with backoff. Every failed file is named, not the first 20."""
    from conftest import serve

    s = serve(max_queue=64, max_images_per_request=64, batch_workers=1)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(1024):
        Image.fromarray(sprites[0][k % len(sprites[0])][..., 0]).save(src / f"{k:04d}.png")
    try:
        assert cli.main(["compress", str(src), "-o", str(tmp_path / "codes"), "--concurrency", "8",
                         "--target", s.target]) == 0
        assert "compressed 1024 images" in capsys.readouterr().out
    finally:
        s.stop()
    bad = tmp_path / "bad"
    bad.mkdir()
    for k in range(25):
        (bad / f"{k:02d}.png").write_bytes(b"not a png")
    assert cli.main(["compress", str(bad), "-o", str(tmp_path / "none"), "--target", f"127.0.0.1:{free_port()}",
                     "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "25 of 25 files failed" in err and all(f"{k:02d}.png: " in err for k in range(25))


def test_cli_follows_linked_folders_names_broken_links_and_takes_a_version(server: ServerThread, sprites,
                                                                          tmp_path: Path, capsys) -> None:
    """A symbolic link to a folder inside an input folder was skipped (given directly, it was walked), and a link
    to nothing was skipped with exit 0 (given directly, an error); --model took no version, though the SDK does."""
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    Image.fromarray(sprites[0][0][..., 0]).save(src / "a.png")
    Image.fromarray(sprites[0][1][..., 0]).save(elsewhere / "b.png")
    (src / "linked").symlink_to(elsewhere)
    (src / "loop").symlink_to(src)  # walked once, not forever
    (src / "dangling.png").symlink_to(tmp_path / "gone.png")
    (src / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's resource fork beside a copied file: hidden, skipped
    (src / ".staging").mkdir()
    Image.fromarray(sprites[0][2][..., 0]).save(src / ".staging" / "c.png")
    out = tmp_path / "codes"
    assert cli.main(["compress", str(src), "-o", str(out), "--target", server.target]) == 1
    io_ = capsys.readouterr()
    assert "compressed 2 images" in io_.out
    assert f"{src / 'dangling.png'}: a symbolic link that leads nowhere" in io_.err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.dsc")) == ["a.dsc", "linked/b.dsc"]
    with Client(server.target) as c:
        two = bytes.fromhex(c.model("dsprites", "2").fingerprint)[0]
    assert cli.main(["compress", str(src / "a.png"), "-o", str(tmp_path / "v2"), "--model", "dsprites/2",
                     "--target", server.target]) == 0
    assert inspect((tmp_path / "v2" / "a.dsc").read_bytes()).model_id == two
    with pytest.raises(SystemExit, match="NOT_FOUND"):  # once, before any file is sent
        cli.main(["compress", str(src / "a.png"), "-o", str(tmp_path / "v9"), "--model", "dsprites/9",
                  "--target", server.target])
    assert not (tmp_path / "v9").exists()


def test_cli_outputs_survive_sigterm_long_names_folders_in_the_way_and_links(server: ServerThread, sprites,
                                                                            tmp_path: Path, capsys) -> None:
    """From a second review of the CLI's writes: SIGTERM left temporary files behind (Ctrl-C did not); a temporary
    name that added the process id to a long output name passed the file system's 255 bytes; a container's files
    were replaced one by one until a folder stood in the way of one; a folder reached through a link that sorted
    first was written under the link's name and not its own."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with Client(server.target) as c:
        codes = c.compress(np.concatenate([sprites[0]] * 8)[:2000])
        (container,) = c.compress(sprites[0][:4], batch=True)
    src = tmp_path / "codes"
    src.mkdir()
    for k, code in enumerate(codes):
        (src / f"{k:04d}.dsc").write_bytes(code.data)
    out = tmp_path / "pngs"
    run = subprocess.Popen([sys.executable, "-m", "disco.client.cli", "decompress", str(src), "-o", str(out),
                            "--batch", "8", "--concurrency", "8", "--target", server.target],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.iterdir())) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143 and b"disco decompress: terminated" in err, (run.returncode, err[-300:])
    assert not [p.name for p in out.iterdir() if p.suffix != ".png"]  # no temporary file left
    long = tmp_path / "long"
    long.mkdir()
    Image.fromarray(sprites[0][0][..., 0]).save(long / ("n" * 251 + ".png"))  # the .dsc name is 255 bytes
    assert cli.main(["compress", str(long), "-o", str(tmp_path / "long_out"), "--target", server.target]) == 0
    box = tmp_path / "box"
    box.mkdir()
    (box / "x.dsc").write_bytes(container.data)  # -> x-00000.png .. x-00003.png
    old = {k: f"earlier {k}".encode() for k in (0, 1, 3)}
    (tmp_path / "box_out").mkdir()
    for k, data in old.items():
        (tmp_path / "box_out" / f"x-{k:05d}.png").write_bytes(data)
    (tmp_path / "box_out" / "x-00002.png").mkdir()  # a folder where the third image goes
    assert cli.main(["decompress", str(box), "-o", str(tmp_path / "box_out"), "--target", server.target]) == 1
    assert {k: (tmp_path / "box_out" / f"x-{k:05d}.png").read_bytes() for k in old} == old  # none replaced
    assert sorted(p.name for p in (tmp_path / "box_out").iterdir()) == [f"x-{k:05d}.png" for k in range(4)]
    tree = tmp_path / "tree"
    (tree / "sub" / "deep").mkdir(parents=True)
    Image.fromarray(sprites[0][1][..., 0]).save(tree / "sub" / "deep" / "d.png")
    os.symlink(tree / "sub" / "deep", tree / "adeep")  # sorts before sub/
    ext = tmp_path / "ext"  # outside the tree, reached through two links: one to it, one to a folder inside it
    (ext / "inner").mkdir(parents=True)
    Image.fromarray(sprites[0][2][..., 0]).save(ext / "inner" / "s.png")
    os.symlink(ext, tree / "b_ext")
    os.symlink(ext / "inner", tree / "c_inner")
    assert cli.main(["compress", str(tree), "-o", str(tmp_path / "tree_out"), "--target", server.target]) == 0
    written = sorted(str(p.relative_to(tmp_path / "tree_out")) for p in (tmp_path / "tree_out").rglob("*.dsc"))
    assert written == ["c_inner/s.dsc", "sub/deep/d.dsc"], written  # once (links met at one level before either is walked)
    scandir = os.scandir

    def refused(path):  # type: ignore[no-untyped-def]  # a folder this user may not list (root may list any)
        if str(path).endswith("deep"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    os.scandir = refused  # os.walk lists folders with it
    try:
        assert cli.main(["compress", str(tree), "-o", str(tmp_path / "tree_out2"), "--target", server.target]) == 1
    finally:
        os.scandir = scandir
    assert f"{tree / 'sub' / 'deep'}: cannot read the folder: Permission denied" in capsys.readouterr().err


def test_cli_write_failures_fail_their_files_alone_and_a_full_disk_stops_the_run(server: ServerThread, sprites,
                                                                                tmp_path: Path, capsys,
                                                                                monkeypatch) -> None:
    """A review: a full disk failed a write within a batch, and the batch was sent again file by file; each write
    failed anew, so the files written before it stayed on disk while the summary said 0 images and named them all as
    failed, 'nothing was written for them'. An output folder that is a file did the same for every file."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(10):
        Image.fromarray(sprites[0][k][..., 0]).save(src / f"{k}.png")
    sent: list[int] = []
    compress = Client.compress

    def counted(self: Client, images, **kw):  # noqa: ANN001, ANN003, ANN202
        sent.append(len(images))
        return compress(self, images, **kw)

    monkeypatch.setattr(Client, "compress", counted)
    write_bytes, writes = Path.write_bytes, []

    def filling(path: Path, data: bytes) -> int:
        writes.append(path)
        if len(writes) > 2:  # the disk is full from the third file on
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    out = tmp_path / "codes"
    run = ["compress", str(src), "-o", str(out), "--batch", "4", "--concurrency", "1", "--target", server.target]
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", filling)
        assert cli.main(run) == 1
    said = capsys.readouterr()
    assert sent == [4] and len(writes) == 4  # the first batch, once: its four writes tried, no batch after it
    assert "compressed 2 images" in said.out and "10 of 10 files failed" not in said.err
    assert "8 of 10 files failed, nothing was written for them" in said.err
    for k in (2, 3):
        assert f"{src / f'{k}.png'}: [Errno 28] No space left on device" in said.err
    for k in range(4, 10):
        assert f"{src / f'{k}.png'}: not sent after a write failed: [Errno 28]" in said.err
    assert sorted(p.name for p in out.iterdir()) == ["0.dsc", "1.dsc"]  # what the summary says was written
    # A write that fails for its own file (a folder where the file goes) fails that file alone; the rest go on
    sent.clear()
    (out / "5.dsc").mkdir()
    assert cli.main(run) == 1
    said = capsys.readouterr()
    assert sent == [4, 4, 2] and "compressed 9 images" in said.out and "1 of 10 files failed" in said.err
    assert f"{src / '5.png'}: [Errno 21]" in said.err
    # An output that is a file: refused before any request
    sent.clear()
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"-o .*afile is a file, expected a folder"):
        cli.main(["compress", str(src), "-o", str(tmp_path / "afile"), "--target", server.target])
    with pytest.raises(SystemExit, match=r"-o .*afile is a file, expected a folder"):
        cli.main(["decompress", str(out), "-o", str(tmp_path / "afile"), "--target", server.target])
    assert sent == []


def test_cli_a_code_file_too_large_for_a_request_fails_alone(sprites, tmp_path: Path, capsys) -> None:
    """A review: a junk .dsc larger than the message limit failed the request carrying it (gRPC's own "message
    larger than max", RESOURCE_EXHAUSTED), which stopped the run: every good code with it failed too."""
    s = serve(max_message_bytes=100_000)
    try:
        src = tmp_path / "in"
        src.mkdir()
        for k in range(6):
            Image.fromarray(sprites[0][k][..., 0]).save(src / f"{k}.png")
        codes = tmp_path / "codes"
        assert cli.main(["compress", str(src), "-o", str(codes), "--target", s.target]) == 0
        (codes / "3.dsc").write_bytes(b"\x02" + bytes(150_000))
        out = tmp_path / "pngs"
        assert cli.main(["decompress", str(codes), "-o", str(out), "--target", s.target]) == 1
        said = capsys.readouterr()
        assert "decompressed 5 images" in said.out and "1 of 6 files failed" in said.err
        assert f"{codes / '3.dsc'}: code 0 is 150001 bytes, over the " in said.err
        assert sorted(p.name for p in out.iterdir()) == [f"{k}.png" for k in (0, 1, 2, 4, 5)]
        with Client(s.target) as c:  # the SDK refuses it before any request, naming it as the caller counts
            good = [(codes / f"{k}.dsc").read_bytes() for k in (0, 1)]
            with pytest.raises(ValueError, match=r"code 2 is 150001 bytes, over the 88976-byte share of the "
                                                 r"100000-byte message limit that one request may carry: not a code"):
                c.decompress([*good, (codes / "3.dsc").read_bytes()])
            many = good * 9_000  # ~8 bytes each: 144 KB of codes, more than one request carries
            assert len(c.decompress(many)) == len(many)
    finally:
        s.stop()


def test_sdk_and_cli_take_what_they_say_and_refuse_the_rest_before_any_request(server: ServerThread, sprites,
                                                                               tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """A review's findings, each refused or taken as the README says: encoded image bytes in a bytearray or a
    memoryview (iterated as ints: "cannot send an image of type int"); a CMYK or YCbCr PIL image (its file was taken,
    the image refused); arrays of two shapes in one call (numpy's bare error, after the requests before them were
    sent); a one-step sweep that moves (taken by the client, refused by the server); a target without a port (gRPC
    dialled port 443)."""
    png = io.BytesIO()
    Image.fromarray(sprites[0][0][..., 0]).save(png, format="PNG")
    with Client(server.target, max_batch=2) as c:
        calls: list[str] = []
        call = Client._call

        def counted(self: Client, method: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
            calls.append(method)
            return call(self, method, *args, **kw)

        monkeypatch.setattr(Client, "_call", counted)
        want = bytes(c.compress(png.getvalue())[0])
        assert [bytes(x) for x in c.compress(bytearray(png.getvalue()))] == [want]
        assert [bytes(x) for x in c.compress(memoryview(png.getvalue()))] == [want]
        assert [bytes(x) for x in c.compress([bytearray(png.getvalue()), png.getbuffer()])] == [want, want]
        cmyk, ycbcr = (Image.fromarray(sprites[0][1][..., 0]).convert(mode) for mode in ("CMYK", "YCbCr"))
        cmyk.save(tmp_path / "cmyk.tif", format="TIFF")
        assert bytes(c.compress(cmyk)[0]) == bytes(c.compress(tmp_path / "cmyk.tif")[0])  # as its file
        assert bytes(c.compress(ycbcr)[0]) == bytes(c.compress(ycbcr.convert("RGB"))[0])  # as RGB
        calls.clear()
        a, b = sprites[0][0], sprites[0][0][:32, :32]
        with pytest.raises(ValueError, match=r"image 3 has shape \(32, 32, 1\) and image 0 \(64, 64, 1\)"):
            c.compress([a, a, a, b])
        code = c.compress(a)[0]
        name = next(iter(c.model().factors)).name
        calls.clear()
        with pytest.raises(ValueError, match=f"a sweep of 1 step of factor '{name}' from -1 to 1 would show only"):
            c.traverse(code, sweep=(name, -1.0, 1.0, 1))
        assert calls == [] and len(c.traverse(code, sweep=(name, 0.5, 0.5, 1))) == 1
    for target in ("127.0.0.1", "localhost", f"{server.target},127.0.0.1"):
        with pytest.raises(ValueError, match="has no port, expected HOST:PORT"):
            Client(target)
    # The file commands in their own words: usage on stderr when no command is given, the flags named
    assert cli.main([]) == 2
    said = capsys.readouterr()
    assert "usage: disco" in said.err and said.out == ""
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        cli.main(["models", "--target", server.target, "--tls-cert", str(tmp_path / "c.pem")])
    codes = tmp_path / "codes"
    (codes / "deep").mkdir(parents=True)
    (codes / "deep" / "a.dsc").write_bytes(bytes(code))
    (codes / "b.dsc").write_bytes(b"\xf0junk")
    assert cli.main(["info", str(codes)]) == 1  # a folder is walked, as compress and decompress walk it
    said = capsys.readouterr()
    assert f"{codes / 'deep' / 'a.dsc'}: {len(bytes(code))} bytes" in said.out and f"{codes / 'b.dsc'}: not a valid" in said.err
    (tmp_path / "none").mkdir()
    assert cli.main(["info", str(tmp_path / "none")]) == 1  # nothing read is not a success
    assert "no files ending in .dsc under" in capsys.readouterr().err


def test_cli_names_the_token_flag_and_warns_in_one_line(sprites, tmp_path: Path, capsys) -> None:
    s = serve(auth_token="s3cret-token")
    try:
        src = tmp_path / "in"
        src.mkdir()
        Image.fromarray(sprites[0][0][..., 0]).save(src / "0.png")
        assert cli.main(["compress", str(src), "-o", str(tmp_path / "out"), "--target", s.target]) == 1
        assert "UNAUTHENTICATED" in (err := capsys.readouterr().err) and "(the token: --token, or DISCO_TOKEN)" in err
        assert cli.main(["models", "--target", s.target]) == 1
        assert "(the token: --token, or DISCO_TOKEN)" in capsys.readouterr().err
        port = s.target.rsplit(":", 1)[1]  # not a loopback name: the token would cross a network in plaintext
        assert cli.main(["models", "--target", f"dns:///localhost.localdomain.invalid:{port}", "--token", "x",
                         "--timeout", "1"]) == 1
        err = capsys.readouterr().err
        assert "disco: warning: the bearer token goes to" in err and "(--tls-ca on the command line)" in err
        assert "InsecureTokenWarning" not in err and "return Client(" not in err
    finally:
        s.stop()
