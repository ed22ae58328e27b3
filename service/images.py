"""Request pixels <-> model tensors, validated at the edge with messages that name the bad value."""
from __future__ import annotations

import io
from collections.abc import Callable
import math
import struct
import time

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from disco.service.errors import DeadlineExceeded, InvalidInput

DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # nothing that hands work to an external program
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")  # PIL modes convert() maps exactly
# 16-bit grey (PNG, TIFF), read here at full precision: convert() would clip every value above 255 to white. A 16-bit
# colour PNG Pillow opens as RGB, RGBA or LA already, keeping each sample's high byte (within one 8-bit step).
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L")
# Where an EXIF orientation can live once a file is loaded: PNG's eXIf chunk or text profiles, JPEG/WebP's EXIF
# block, XMP; a TIFF's own tags. Files without any (plain PNGs, the common case) skip the EXIF parse.
_ORIENTATION_KEYS = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})
# Pillow inflates every zTXt/iTXt text chunk as it opens a PNG, by default up to 1 MiB each and 64 MiB a file, and
# zlib packs 1 MiB of zeros into about 1 KB: a 63 KB 64x64 file cost 0.19 s of CPU (a review's measurement), on the
# event loop for small requests. Text chunks hold metadata (XMP and EXIF profiles are tens of KB): past 4 MiB of text
# a file is refused as malformed (Pillow's ValueError). The 1 MiB a chunk stays: it also bounds an ICC profile
# (iCCP), and display profiles can pass 256 KiB.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024
# That 4 MiB counts text only: Pillow inflates every iCCP chunk too, up to 1 MiB each, with no bound on how many a file
# holds (a review: 2,500 of them in a 2.6 MB file held the event loop 2.3 s, and a request of 16 such files outlasted
# --processes' 30 s watchdog, which stopped the server). The PNG specification allows one iCCP chunk, before IDAT;
# Pillow inflates those after it too, as it finishes loading.
# Nor does it count a zTXt or iTXt chunk whose keyword is empty, whose data fails its checksum, or whose text is not
# UTF-8 (a review: 2,000 such chunks, 2.1 MB, took 1.2-1.5 s) after inflating it. And Pillow walks chunks in Python:
# a million empty ones (12 MB) took 2.6 s. Files with more than these are refused from their chunk headers.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_PNG_CHUNKS = 4096  # a PNG's pixels may come in many IDAT chunks; metadata is a handful more
_MAX_PNG_INFLATED = 8  # zTXt and iTXt chunks (XMP, EXIF, comments), each inflated up to 1 MiB by Pillow


def _check_png_chunks(blob: bytes, i: int) -> None:
    """Refuse a PNG whose chunks would cost Pillow far more than its pixels: more than one iCCP chunk (colour
    profile), more than _MAX_PNG_INFLATED compressed text chunks, or more than _MAX_PNG_CHUNKS chunks. Read from the
    chunk headers alone: nothing is inflated."""
    pos, chunks, seen = len(_PNG_SIGNATURE), 0, {b"iCCP": 0, b"zTXt": 0, b"iTXt": 0}
    while pos + 8 <= len(blob):
        length, kind = struct.unpack_from(">I4s", blob, pos)
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise InvalidInput(f"image file {i} is a PNG of more than {_MAX_PNG_CHUNKS} chunks, expected at most "
                               f"{_MAX_PNG_CHUNKS}")
        # an iTXt chunk whose text is stored as it is has nothing to inflate (nine titles in as many languages)
        if kind in seen and (kind != b"iTXt" or _compressed_itxt(blob, pos + 8, length)):
            seen[kind] += 1
            if seen[b"iCCP"] > 1:
                raise InvalidInput(f"image file {i} is a PNG with more than one iCCP chunk (colour profile), which "
                                   "the PNG specification does not allow; expected at most one")
            if seen[b"zTXt"] + seen[b"iTXt"] > _MAX_PNG_INFLATED:
                raise InvalidInput(f"image file {i} is a PNG with more than {_MAX_PNG_INFLATED} compressed text chunks "
                                   f"(zTXt, iTXt), expected at most {_MAX_PNG_INFLATED}: strip its metadata")
        elif kind == b"IEND":
            return
        pos += 12 + length  # length, type, data, CRC


def _compressed_itxt(blob: bytes, start: int, length: int) -> bool:
    """Whether an iTXt chunk's text is compressed: the flag after its keyword (keyword, NUL, flag, method, ...).
    One that does not parse counts as compressed: Pillow may still inflate what follows."""
    data = blob[start : start + min(length, 82)]  # a keyword is at most 79 bytes
    nul = data.find(b"\0")
    return nul < 0 or nul + 1 >= len(data) or data[nul + 1] != 0


# What Pillow's decoders say of data they could not decode, "decoder error -2" alone among them (ImageFile)
_CORRUPT = ("decoder error", "broken data stream", "unrecognized data stream", "failed to read next frame")
# A file's pixels as the model's channels: Pillow's mode conversions (colour to grey by ITU-R 601-2 luma, grey copied
# into each colour channel). A tensor must have the model's channels already.
_MODE_OF_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def from_raw(data: bytes, shape: tuple[int, ...], dtype: str, expect_hwc: tuple[int, int, int],
             room: Callable[[int], None] | None = None) -> np.ndarray:
    """A raw (N, H, W, C) batch -> float32 (N, C, H, W) in [0, 1]. room(N), once the batch is known valid and
    before its float32 copy is made, may refuse it (a full queue)."""
    if dtype not in DTYPES:
        raise InvalidInput(f"image dtype {dtype!r} is not supported, expected one of {sorted(DTYPES)}")
    h, w, c = expect_hwc
    if len(shape) != 4:
        raise InvalidInput(f"image batch shape {list(shape)} has {len(shape)} dims, expected (N, H, W, C) = (N, {h}, {w}, {c})")
    n = shape[0]
    if n <= 0:
        what = "is empty" if n == 0 else "has a negative image count"
        raise InvalidInput(f"image batch shape {list(shape)} {what} (N = {n}), expected at least one image")
    if tuple(shape[1:]) != expect_hwc:
        raise InvalidInput(f"image is {shape[1]}x{shape[2]}x{shape[3]} (HxWxC), the model expects {h}x{w}x{c}")
    dt = DTYPES[dtype]
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise InvalidInput(f"image data is {len(data)} bytes, shape {list(shape)} of {dtype} needs {expected}")
    x = np.frombuffer(data, dtype=dt).reshape(shape)
    if dt != np.uint8:
        finite = np.isfinite(x)
        if not finite.all():  # named by image and place, not a flat index: a client that cuts a call into requests
            # renumbers "image N" (a review: a flat index named a valid pixel of another image)
            i, row, col, ch = np.unravel_index(int(np.argmin(finite.ravel())), x.shape)  # (N, H, W, C), checked above
            raise InvalidInput(f"float32 pixels hold {x.size - int(finite.sum())} NaN or infinite values (the first in "
                               f"image {i}, at row {row}, column {col}, channel {ch}), expected finite values in [0, 1]")
        if x.min() < 0.0 or x.max() > 1.0:
            raise InvalidInput(f"float32 pixels span [{x.min():.9g}, {x.max():.9g}], expected values in [0, 1]")
    if room is not None:  # valid: the copy below is what a full queue should not cost
        room(n)
    if dt == np.uint8:  # one pass: cast, divide in float32 and lay out as NCHW (same values as astype / 255)
        out = np.empty((n, c, h, w), dtype=np.float32)
        np.divide(x.transpose(0, 3, 1, 2), np.float32(255.0), out=out, dtype=np.float32)
        return out
    return x.astype(np.float32).transpose(0, 3, 1, 2).copy()


# Files converted between looks at the caller's deadline: a large request's conversion (4,096 PNG files read in 350 ms,
# written in 480: benchmarks/loop_stall.py) stops soon after its caller stopped waiting, not at the end.
_DEADLINE_EVERY = 64


def check_deadline(deadline: float | None, i: int, n: int, what: str) -> None:
    """Every _DEADLINE_EVERY items of n, from the first: DeadlineExceeded once the deadline (time.monotonic) passed."""
    if deadline is not None and i % _DEADLINE_EVERY == 0 and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline passed with {i} of {n} image files {what}")


def from_files(files: list[bytes], expect_hwc: tuple[int, int, int], deadline: float | None = None) -> np.ndarray:
    """Encoded image files -> float32 (N, C, H, W) in [0, 1]. Sizes must match; nothing is resized."""
    if not files:
        raise InvalidInput("image batch is empty (0 files), expected at least one image")
    h, w, c = expect_hwc
    out = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, blob in enumerate(files):
        check_deadline(deadline, i, len(files), "read")
        if blob.startswith(_PNG_SIGNATURE):
            _check_png_chunks(blob, i)
        try:
            with Image.open(io.BytesIO(blob), formats=FORMATS) as im:
                if im.size not in ((w, h), (h, w)):  # from the header, before any pixel is decoded (either way up:
                    # an EXIF orientation, read below, may turn it)
                    fw, fh = im.size  # not known yet: which way up it is shown (the size is checked that way)
                    turned = f" as stored, {fw}x{fh} turned" if fw != fh else ""
                    raise InvalidInput(f"image file {i} is {fh}x{fw} (HxW{turned}), the model expects {h}x{w}")
                if im.mode not in EIGHT_BIT_MODES and im.mode not in SIXTEEN_BIT_GREY:  # convert() would truncate
                    # 32-bit integers and floats (whose range the file does not say), and maps LAB or HSV as if RGB
                    why = ("not 8- or 16-bit unsigned integers" if im.mode.startswith(("I", "F"))
                           else "not a mode converted exactly")
                    raise InvalidInput(f"image file {i} has pixel mode {im.mode!r} ({why}), expected 8-bit pixels "
                                       f"({', '.join(EIGHT_BIT_MODES)}) or 16-bit grey; send other images as a float32 "
                                       "tensor in [0, 1]")
                # An animated GIF, PNG or WebP, or a multi-page TIFF: which frame is meant? (Not a camera JPEG whose
                # MPF block holds a preview or a gain map: Pillow opens it as MPO, frame 0 the picture.)
                if im.format != "MPO" and getattr(im, "is_animated", False):
                    raise InvalidInput(f"image file {i} holds more than one frame (an animation or a multi-page "
                                       "file), expected a single image")
                im.load()
                stored = im.size
                if im.format in ("TIFF", "MPO") or not _ORIENTATION_KEYS.isdisjoint(im.info):
                    # the image as a viewer shows it (a phone's photo is stored sideways with an orientation tag)
                    try:
                        ImageOps.exif_transpose(im, in_place=True)
                    except (SyntaxError, ValueError, OSError, KeyError, TypeError, struct.error):
                        pass  # an EXIF block that does not parse says no orientation: as stored, as viewers show it
                if im.size != (w, h):
                    turned = f", {stored[1]}x{stored[0]} as stored before its EXIF orientation" if im.size != stored else ""
                    raise InvalidInput(f"image file {i} is {im.size[1]}x{im.size[0]} (HxW{turned}), the model "
                                       f"expects {h}x{w}")
                if im.mode in SIXTEEN_BIT_GREY:
                    out[i] = _grey16(im, i, c)
                    continue
                if im.mode in ("LA", "PA", "RGBA") or "transparency" in im.info:
                    # convert() would drop the alpha and keep whatever colour a transparent pixel holds: which
                    # background is meant is the caller's to say (a fully opaque alpha channel is fine)
                    lowest = int(np.asarray(im.convert("RGBA"))[..., 3].min())
                    if lowest < 255:
                        raise InvalidInput(f"image file {i} has transparent pixels (alpha down to {lowest}), expected "
                                           "an opaque image: flatten it onto the background the model knows (black "
                                           "for the dSprites models)")
                img = im.convert(_MODE_OF_CHANNELS[c])
        except InvalidInput:
            raise
        except UnidentifiedImageError as exc:
            raise InvalidInput(f"image file {i} ({len(blob)} bytes, starting {blob[:8].hex() or 'with nothing'}) is not "
                               f"a {'/'.join(FORMATS)} file, or one of a kind Pillow does not read") from exc
        except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as exc:  # Pillow's
            # parsers raise SyntaxError (and struct.error) for some malformed files
            corrupt = "its encoded data is corrupt, " if str(exc).startswith(_CORRUPT) else ""
            raise InvalidInput(f"image file {i} ({len(blob)} bytes) could not be decoded as "
                               f"{'/'.join(FORMATS)}: {corrupt}{exc}") from exc
        a = np.asarray(img, dtype=np.float32) / 255.0
        out[i] = a[None] if c == 1 else a.transpose(2, 0, 1)
    return out


def _grey16(im: Image.Image, i: int, c: int) -> np.ndarray:
    """A 16-bit grey image -> float32 (C, H, W) in [0, 1], every bit kept; grey copied into colour channels and an
    opaque alpha added, as convert() does for 8-bit grey."""
    g = np.asarray(im).astype(np.uint16)  # native order, whatever the file's
    if im.format == "TIFF" and getattr(im, "tag_v2", {}).get(262) == 0:  # WhiteIsZero: Pillow inverts 8-bit such
        g = np.uint16(65535) - g  # files as it opens them, not 16-bit ones
    if "transparency" in im.info and bool((g == im.info["transparency"]).any()):
        raise InvalidInput(f"image file {i} has transparent pixels (grey level {im.info['transparency']} is marked "
                           "transparent), expected an opaque image: flatten it onto the background the model knows")
    grey = g.astype(np.float32) / np.float32(65535.0)
    opaque = np.ones_like(grey)
    planes = {1: [grey], 2: [grey, opaque], 3: [grey] * 3, 4: [grey] * 3 + [opaque]}[c]
    return np.stack(planes)


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Decoder probabilities (N, C, H, W) -> uint8 pixels (N, H, W, C), rounded to nearest.

    In place on one NHWC float32 buffer; the same values as rint(clip(p, 0, 1) * 255) (clipping after the
    multiplication changes nothing in float32, since 1 * 255 is exact)."""
    buf = np.empty((probs.shape[0], probs.shape[2], probs.shape[3], probs.shape[1]), dtype=np.float32)
    np.multiply(probs.transpose(0, 2, 3, 1), np.float32(255.0), out=buf, dtype=np.float32)
    np.clip(buf, 0.0, 255.0, out=buf)
    np.rint(buf, out=buf)
    return buf.astype(np.uint8)


def to_png(pixels: np.ndarray, deadline: float | None = None) -> list[bytes]:
    """uint8 (N, H, W, C) -> PNG files."""
    files = []
    for i, img in enumerate(pixels):
        check_deadline(deadline, i, len(pixels), "written")
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files
