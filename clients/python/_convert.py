"""Requests from Python values and Python values from responses; shared by Client and AsyncClient."""
from __future__ import annotations

import collections
import contextlib
import io
import math
import numbers
import re
import struct
import sys
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from disco.client.errors import DiscoError, ServerError
from disco.client.types import Code, FactorValue, Factors, Images, as_images
from disco.v1 import codec_pb2 as pb

# How PNG, JPEG, GIF, BMP, WEBP and TIFF files begin. Read as a code's first byte, each names a format version of 4
# or more, which no code has (disco.service.container), so a code is never taken for an image.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
ImagesLike = Union[np.ndarray, Image.Image, str, Path, bytes, bytearray, memoryview, Sequence[Any]]
CodesLike = Union[bytes, Code, Sequence[Union[bytes, Code]]]


def _hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def _nhwc(a: np.ndarray) -> np.ndarray:
    """An array of one image or several, as (N, H, W, C). Three axes whose last is not a channel count (1 to 4) are
    several grey images (N, H, W), as dSprites keeps them; otherwise one image (H, W, C)."""
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4):
        return a[..., None]
    return a if a.ndim == 4 else _hwc(a)[None]


def _tensor(a: np.ndarray) -> pb.Images:
    a = _nhwc(a)
    if a.ndim != 4:
        raise ValueError(f"image array has shape {a.shape}; expected (N, H, W, C), (N, H, W) grey, (H, W, C) or (H, W)")
    if a.dtype == np.uint8:
        dtype = pb.DTYPE_UINT8
    elif a.dtype in (np.float32, np.float64):
        a, dtype = a.astype("<f4"), pb.DTYPE_FLOAT32
    else:
        raise ValueError(f"image dtype {a.dtype} is not supported; expected uint8 (0..255) or float32 (0..1)")
    a = np.ascontiguousarray(a)
    return pb.Images(tensor=pb.Tensor(data=a.tobytes(), shape=list(a.shape), dtype=dtype))


_PIL_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B")  # what PNG holds without loss of meaning
BYTES_LIKE = (bytes, bytearray, memoryview)  # an encoded image, or a code, in memory
ONE_CODE = (*BYTES_LIKE, Code)  # what a single code may be given as
EMPTY_BATCH = "no images given: the batch is empty, expected at least one image"
_ARRAY_DTYPES = (np.uint8, np.float32, np.float64)


def _file_bytes(item: Any) -> bytes:
    if isinstance(item, (str, Path)):
        return Path(item).read_bytes()
    if isinstance(item, BYTES_LIKE):
        return bytes(item)
    if isinstance(item, Image.Image):
        if item.mode == "CMYK":  # as the file was: TIFF keeps the mode, PNG does not, and the server converts it to
            # the model's channels as it would the file's
            buf = io.BytesIO()
            item.save(buf, format="TIFF")
            return buf.getvalue()
        if item.mode == "YCbCr":  # as RGB: Pillow 12.3 wrote a YCbCr TIFF that it could not read back ("truncated")
            item = item.convert("RGB")
        if item.mode not in _PIL_MODES:
            raise ValueError(f"a PIL image in mode {item.mode!r} cannot be sent; expected one of "
                             f"{[*_PIL_MODES, 'CMYK', 'YCbCr']} "
                             "(convert it, or pass a float32 array in 0..1)")
        frames = getattr(item, "n_frames", 1)
        # as the server refuses the file: which frame is meant? (a re-saved PNG held the current one). Not a camera
        # JPEG with an MPF preview or gain map (MPO), whose first frame is the picture, as the server reads it.
        if frames > 1 and item.format != "MPO":
            raise ValueError(f"a PIL image of {frames} frames (an animation or a multi-page file) cannot be sent; "
                             "seek to the frame meant and pass image.copy()")
        try:  # as the server reads the file: the way a viewer shows it (a re-saved PNG dropped the orientation tag)
            item = ImageOps.exif_transpose(item) or item
        except (SyntaxError, ValueError, OSError, KeyError, TypeError, struct.error):
            pass  # an EXIF block that does not parse says no orientation, as the server reads it
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send an image of type {type(item).__name__}; "
                    "expected a numpy array, PIL image, path or encoded bytes")


MASK_WARNING = ("uint8 images whose pixels are all 0 or 1 are sent as they are, near black (uint8 is 0..255); "
                "a 0/1 mask, as dSprites' own file keeps its images, is sent as mask * 255, or as float32")


Where = tuple[str, int, dict[str, Any]]  # a file and line of the caller's code, and its module's globals


def caller_location() -> Where:
    """The first frame outside the SDK: where a warning about the caller's input belongs. A stream's batches are
    read on gRPC's thread or inside grpc.aio, so a stream takes its caller's place when it starts."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("disco.client"):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def _warn_if_mask(arrays: list[np.ndarray], where: Where | None) -> None:
    """dSprites' own images (uint8 in {0, 1}) sent as they are compressed into codes of black images, with no word
    said (a review). A warning, not an error: a very dark image is a valid one."""
    ones = [a for a in arrays if a.dtype == np.uint8 and a.size]
    if ones and all(int(a.max()) == 1 for a in ones):
        filename, lineno, module = where or caller_location()
        # as warnings.warn(stacklevel=...) would say it there: its module's name (for module= filters) and registry.
        # Not its globals: warn_explicit asks their loader for the source, and __main__'s in a REPL or under
        # `python -c` raises ImportError (a review).
        warnings.warn_explicit(MASK_WARNING, UserWarning, filename, lineno, module=module.get("__name__"),
                               registry=module.setdefault("__warningregistry__", {}))


def _check_float_pixels(a: np.ndarray, first: int = 0) -> None:
    """Float images (N, H, W, C) must hold finite pixels in [0, 1] (as float32, what is sent), judged before any
    request, with the image named as the caller counts it (the server names it within its own request). A NaN
    fails both bounds; only an array that fails is searched for its first bad pixel."""
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8) or not a.size or (a.min() >= 0 and a.max() <= 1):
        return  # float32 and float64 of either byte order; float16 is refused as such (_tensor)
    x = a.astype(np.float32)  # a float64 just past 1 may round into range
    bad = ~(np.isfinite(x) & (x >= 0) & (x <= 1))
    if bad.any():
        i, row, col, ch = np.unravel_index(int(np.argmax(bad)), x.shape)
        raise ValueError(f"image {first + i} has pixel {x[i, row, col, ch]} at row {row}, column {col}, channel {ch}; "
                         "float pixels must be finite and in [0, 1] (uint8 pixels are 0..255)")


def image_items(images: ImagesLike, where: Where | None = None) -> list[Any]:
    """Normalise any accepted input to a list of per-image items (arrays (H, W, C) or file bytes). `where`: the
    caller's line, for a warning (by default the first frame outside the SDK)."""
    if isinstance(images, np.ndarray):
        a = _nhwc(images)
        if a.ndim != 4:
            raise ValueError(f"image array has shape {images.shape}; expected (N, H, W, C), (N, H, W) grey, (H, W, C) "
                             "or (H, W)")
        _check_float_pixels(a)
        _warn_if_mask([a], where)
        return list(a)
    if isinstance(images, (str, Path, Image.Image, *BYTES_LIKE)):  # one image (a bytearray is not a list of ints)
        images = [images]
    if isinstance(images, Code) or not isinstance(images, Iterable):  # not "object is not iterable"
        hint = " (a Code is a compressed image: decompress() it)" if isinstance(images, Code) else ""
        raise TypeError(f"cannot send images given as {type(images).__name__}{hint}; expected a numpy array, PIL image, "
                        "path or encoded bytes, or a sequence of them")
    images = list(images)  # a generator is read once
    for i in images:  # a thing no call takes is named as such, not as the "encoded image" of a mix
        if not isinstance(i, (np.ndarray, str, Path, Image.Image, *BYTES_LIKE)):
            _file_bytes(i)  # raises its TypeError
    arrays = [isinstance(i, np.ndarray) for i in images]
    if any(arrays) and not all(arrays):  # judged on the whole input: a call cut into requests would send the ones
        # before the first that mixes, and none would mix where a cut falls between the two kinds
        raise TypeError(f"image {arrays.index(True)} is a numpy array and image {arrays.index(False)} an encoded image "
                        "(path, bytes or PIL image): one call takes either numpy arrays or encoded images, not both")
    items = [_hwc(i) if isinstance(i, np.ndarray) else _file_bytes(i) for i in images]
    for k, i in enumerate(items):  # each one: np.stack would quietly upcast a bool or int image among uint8 ones
        if isinstance(i, np.ndarray) and i.dtype not in _ARRAY_DTYPES:
            raise ValueError(f"image {k} has dtype {i.dtype}; expected uint8 (0..255) or float32 (0..1)")
        if isinstance(i, np.ndarray) and i.shape != np.shape(items[0]):  # judged whole (all arrays, or none):
            # np.stack would fail the request that holds both, after the requests before it were sent
            raise ValueError(f"image {k} has shape {i.shape} and image 0 {np.shape(items[0])}; the images of one "
                             "call must share a shape (H, W, C)")
        if isinstance(i, np.ndarray):
            _check_float_pixels(i[None], k)
    _warn_if_mask([i for i in items if isinstance(i, np.ndarray)], where)
    return items


def image_list(images: ImagesLike) -> list[Any]:
    """image_items, refusing an empty batch (the calls that cut a batch into requests would send none)."""
    items = image_items(images)
    if not items:
        raise ValueError(EMPTY_BATCH)
    return items


def images_message(items: list[Any]) -> pb.Images:
    if not items:  # an empty array or list: said here (the server would read it as an empty list of files)
        raise ValueError(EMPTY_BATCH)
    arrays = [i for i in items if isinstance(i, np.ndarray)]
    if arrays and len(arrays) != len(items):
        raise TypeError("one call takes either numpy arrays or encoded images (paths, bytes, PIL), not both")
    if not arrays:
        return pb.Images(files=pb.EncodedImages(files=items))
    if len({a.dtype for a in arrays}) > 1:  # uint8 and float mixed: send floats in [0, 1]
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
    return _tensor(np.stack(arrays))


def request_budget(max_bytes: int) -> int:
    """The bytes of images or codes one message (a request, or the response it asks for) may carry under a limit
    of max_bytes: a tenth spare, and room for the framing."""
    return int(max_bytes * 0.9) - 1024


def chunks(items: list[Any], max_bytes: int, max_count: int) -> Iterator[list[Any]]:
    """Consecutive runs of items whose payload stays under max_bytes (leaving room for framing). Arrays count at
    the size they are sent in: float32, for every array once any is a float (images_message sends them so)."""
    budget = request_budget(max_bytes)
    floats = any(isinstance(i, np.ndarray) and i.dtype != np.uint8 for i in items)
    run: list[Any] = []
    size = 0
    for item in items:
        n = (item.size * (4 if floats else 1)) if isinstance(item, np.ndarray) else len(item)
        if n > budget:
            raise ValueError(f"one image is {n} bytes, over the {budget}-byte share of the {max_bytes}-byte "
                             "message limit that one request may carry")
        if run and (size + n > budget or len(run) >= max_count):
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


_NUMBERED = re.compile(r"\b(code|image file|image) (\d+)\b")  # how the server names a request's codes and images


@contextlib.contextmanager
def counted_from(offset: int) -> Iterator[None]:
    """The server numbers a request's codes and image files from 0: an error of a request that carries the caller's
    items from `offset` on names them as the caller counts them ("code 80" of the second request of 100: code 180)."""
    try:
        yield
    except DiscoError as exc:
        if offset and exc.args:
            exc.args = (_NUMBERED.sub(lambda m: f"{m[1]} {int(m[2]) + offset}", str(exc.args[0])), *exc.args[1:])
        raise


def sources_in(req: pb.TraverseRequest) -> int:
    """Images a Traverse request carries as its sources (none for a code)."""
    images = req.images
    return len(images.files.files) if images.HasField("files") else (images.tensor.shape[0] if images.tensor.shape else 0)


def images_in(code: bytes) -> int:
    """Images a code decodes to: 1, or a batch container's count (read from its header)."""
    from disco.service import container  # pure Python: no onnxruntime behind it

    try:
        return container.count(code)
    except ValueError:
        return 1  # a malformed code: the server names the problem


def code_bytes(code: Any) -> bytes:
    if isinstance(code, BYTES_LIKE):
        return bytes(code)
    if hasattr(code, "data"):
        return bytes(code.data)
    raise TypeError(f"a code must be bytes or have .data bytes, got {type(code).__name__}")


def code_list(codes: CodesLike) -> list[bytes]:
    if isinstance(codes, ONE_CODE):
        return [code_bytes(codes)]
    out = [code_bytes(c) for c in codes]
    if not out:  # judged here, as an empty batch of images is (a ValueError, before any request)
        raise ValueError("no codes given: the batch is empty, expected at least one code")
    return out


_NONE = object()


def _on_type(kind: type, name: str) -> Any:
    """A special method as iter() finds it: in the class and its bases, not through __getattr__ (_NONE if absent)."""
    for k in kind.__mro__:
        if name in k.__dict__:
            return k.__dict__[name]
    return _NONE


def _iterable_type(kind: type) -> bool:
    """iter() takes its instances: an __iter__ (one set to None says no), or the sequence protocol's __getitem__."""
    it = _on_type(kind, "__iter__")
    if it is not _NONE:
        return it is not None
    return _on_type(kind, "__getitem__") not in (_NONE, None)


class StreamRequests:
    """The requests of a bulk stream, made lazily from the caller's batches: `make` cuts a batch into the requests
    that carry it (under the message limits, as the unary calls cut), each with how many of the batch's items
    (`item`s: images or codes) it holds, and `answered` hands back each batch's responses together, in order. A batch that cannot
    become requests (or a caller's iterator that raises) ends the stream there: gRPC would hide that error behind
    UNKNOWN or a cancellation. The responses to the batches before it still arrive; raise_error(), once they have,
    raises it. An RpcError meanwhile is the server's answer to an earlier batch, and goes first; `failed` says
    which batch it was about, and where in it the request began (the server numbers items from there).

    gRPC's sync stream reads the requests on a thread of its own: the deques are appended there, each entry before
    its request is sent, and popped here as the responses come (what a long stream keeps is what is in flight)."""

    def __init__(self, batches: Iterable[Any], make: Callable[[Any], list[tuple[Any, int]]], item: str) -> None:
        self._batches, self._make, self._item = batches, make, item
        self._parts: collections.deque[int] = collections.deque()  # requests per batch sent, oldest first
        # each request sent and not yet answered: its batch, and its first item there
        self._starts: collections.deque[tuple[int, int]] = collections.deque()
        self._group: list[Any] = []
        self.error: BaseException | None = None

    @staticmethod
    def check(batches: Any, async_ok: bool) -> None:
        """Batches that no stream can read are refused before any request (an async generator given to AsyncClient
        opened a stream and failed inside it, noted as though batches had been sent). What iter() takes is read,
        a sequence of __getitem__ alone (a map-style torch Dataset) among them; iter() itself is called once, by the
        stream."""
        if isinstance(batches, (*ONE_CODE, str)):
            raise TypeError(f"batches must be an iterable of batches (each one call's input), got one "
                            f"{type(batches).__name__}")
        if async_ok and isinstance(batches, AsyncIterable):
            return
        kind = type(batches)  # what iter() looks for, without calling it (a DataLoader's __iter__ starts workers)
        if not _iterable_type(kind):
            if isinstance(batches, AsyncIterable):
                raise TypeError("batches is an async iterable: Client's streams read an iterable; AsyncClient's take "
                                "both")
            raise TypeError(f"batches must be an iterable of batches (each one call's input), got {kind.__name__}")

    def _sent(self, batch: Any, sent: int) -> Iterator[Any]:
        """The requests of batch number `sent`, each recorded before it goes."""
        requests = self._make(batch)
        assert requests, "a batch makes at least one request"  # a batch of none would unpair the groups
        self._parts.append(len(requests))  # before they are sent: their responses come after
        start = 0
        for request, items in requests:
            self._starts.append((sent, start))
            start += items
            yield request

    def _keep(self, exc: Exception, sent: int) -> None:
        before = "; the batches before it were sent and answered" if sent else ""
        exc.__notes__ = [*getattr(exc, "__notes__", []), f"(batch {sent} of the stream{before})"]  # add_note: 3.11+
        self.error = exc

    def __iter__(self) -> Iterator[Any]:
        sent = 0
        try:
            for batch in self._batches:
                yield from self._sent(batch, sent)
                sent += 1
        except Exception as exc:  # noqa: BLE001 - kept for the caller, raised by raise_error()
            self._keep(exc, sent)

    async def __aiter__(self) -> AsyncIterator[Any]:
        """As __iter__, for AsyncClient: from an async iterable of batches too, read on the event loop."""
        sent = 0
        try:
            if isinstance(self._batches, AsyncIterable):
                async for batch in self._batches:
                    for request in self._sent(batch, sent):
                        yield request
                    sent += 1
            else:
                for request in self:  # keeps its own error
                    yield request
        except Exception as exc:  # noqa: BLE001 - kept for the caller, raised by raise_error()
            self._keep(exc, sent)

    def answered(self, response: Any) -> list[Any] | None:
        """Take the next response: the oldest unanswered batch's responses once it has them all, else None."""
        self._starts.popleft()
        self._group.append(response)
        if len(self._group) < self._parts[0]:
            return None
        self._parts.popleft()
        group, self._group = self._group, []
        return group

    def failed(self, error: BaseException) -> BaseException:
        """The error the server ended the stream with, noting the batch of the request it answered."""
        if self._starts:  # the oldest request not answered: the one the error ended
            batch, start = self._starts[0]
            where = f", in the request that began at its {self._item} {start} (the server numbers " \
                    f"{self._item}s from there)" if start else ""
            error.__notes__ = [*getattr(error, "__notes__", []), f"(batch {batch} of the stream{where})"]
        return error

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def images_from(msg: pb.Images) -> Images:
    """The raw uint8 (N, H, W, C) images a response carries. The client asks for raw pixels only: image files in
    their place are not opened (Pillow would hand some formats, EPS among them, to an external program), and a
    tensor whose bytes do not fill its shape is refused, each as a ServerError."""
    kind = msg.WhichOneof("kind")
    if kind != "tensor":
        raise ServerError(f"the server answered {'image files' if kind else 'no images'} to a request for raw pixels",
                          "INTERNAL")
    t = msg.tensor
    shape = tuple(t.shape)
    if t.dtype != pb.DTYPE_UINT8 or len(shape) != 4 or min(shape, default=0) < 0 or len(t.data) != math.prod(shape):
        raise ServerError(f"the server answered a tensor of {len(t.data)} bytes, shape {list(shape)} and dtype {t.dtype}, "
                          "expected uint8 pixels (N, H, W, C) that fill it", "INTERNAL")
    return as_images(np.frombuffer(t.data, dtype=np.uint8).reshape(shape))


def codes_from(resp: pb.CompressResponse) -> list[Code]:
    return [Code(c, resp.model.name, resp.model.version) for c in resp.codes]


def factors_from(resp: pb.EncodeResponse) -> list[Factors]:
    return [Factors({f.name: FactorValue(f.mean, f.std, f.dim) for f in item.factors}) for item in resp.items]


_FLOAT32_MAX = 3.4028234663852886e38  # the wire's float: a larger value would arrive as inf
_INT32_MAX = 2**31 - 1  # the wire's sweep steps


def _factor_value(what: str, name: str, v: float) -> float:
    """v as the request's 32-bit float carries it; refused, naming it, where it is not a number (None would send an
    edit without a value, True would send 1.0) or where the float would turn it into inf."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{what} {v!r} of factor {name!r}: expected a number")
    if not math.isfinite(float(v)):
        raise ValueError(f"{what} {v!r} of factor {name!r}: expected a finite number")
    if _FLOAT32_MAX < abs(float(v)):
        raise ValueError(f"{what} {v!r} of factor {name!r} is too large for the request's 32-bit float")
    return float(v)


def _factor_name(what: str, name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} names factor {name!r}: expected its name, a str")
    return name


def sweep_steps(sweep: tuple[str, float, float, int] | None) -> int:
    """The images a sweep makes of each source (1 without a sweep), its tuple's shape and steps checked."""
    if sweep is None:
        return 1
    if not isinstance(sweep, (tuple, list)) or len(sweep) != 4:
        raise ValueError(f"sweep {sweep!r}: expected (factor, start, stop, steps)")
    name, steps = _factor_name("sweep", sweep[0]), sweep[3]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= _INT32_MAX:
        raise ValueError(f"sweep steps {steps!r} of factor {name!r}: expected a whole number of images, 1 or more "
                         "(the server takes up to 64)")
    start, stop, moves = sweep[1], sweep[2], False
    if steps == 1 and all(isinstance(v, numbers.Real) for v in (start, stop)):
        with np.errstate(over="ignore"):  # a value that is not finite in float32 is refused with its own message
            a, b = np.float32(start), np.float32(stop)
        moves = bool(np.isfinite(a) and np.isfinite(b) and a != b)
    if moves:
        raise ValueError(f"a sweep of 1 step of factor {name!r} from {start:g} to {stop:g} would show only its start: "
                         "give 2 or more steps, or stop = start")  # as the server refuses it
    return int(steps)


def traverse_edits(set_: Mapping[str, float] | None, shift: Mapping[str, float] | None,
                   sweep: tuple[str, float, float, int] | None) -> tuple[list[pb.FactorEdit], pb.FactorSweep | None]:
    """The edits and the sweep as the request carries them; ValueError naming what it could not carry."""
    for what, edits_ in (("set", set_), ("shift", shift)):
        if edits_ is not None and not isinstance(edits_, Mapping):
            raise ValueError(f"{what} must map factor names to values, e.g. {{'posX': 0.5}}, got {edits_!r}")
    steps = sweep_steps(sweep)
    edits = [pb.FactorEdit(factor=_factor_name("set", k), set=_factor_value("value", k, v)) for k, v in (set_ or {}).items()]
    edits += [pb.FactorEdit(factor=_factor_name("shift", k), shift=_factor_value("shift", k, v))
              for k, v in (shift or {}).items()]
    if sweep is None:
        return edits, None
    name, start, stop = sweep[0], sweep[1], sweep[2]
    return edits, pb.FactorSweep(factor=name, start=_factor_value("sweep start", name, start),
                                 stop=_factor_value("sweep stop", name, stop), steps=steps)


def traverse_source(source: Any) -> Any:
    """What traverse starts from: a code as given, or images as their items (image_list), all checked at once,
    before any request (a review: bytes of an image file were refused only after a ListModels call)."""
    if isinstance(source, ONE_CODE):
        if code_bytes(source).startswith(_IMAGE_MAGIC):
            raise ValueError("traverse takes bytes as a code, and these are an image file: pass its path, "
                             "a PIL image or an array instead")
        return source
    if isinstance(source, Sequence) and not isinstance(source, str) and source \
            and all(isinstance(s, Code) for s in source):  # what compress() returns: not images, nor one code
        raise TypeError(f"traverse takes one code, and was given a list of {len(source)} Code: pass one of them "
                        "(codes[0]), or a batch container (compress(..., batch=True)) as one code")
    return image_list(source)


def traverse_request(source: Any, model: pb.ModelRef, set_: Mapping[str, float] | None,
                     shift: Mapping[str, float] | None, sweep: tuple[str, float, float, int] | None) -> pb.TraverseRequest:
    edits, swept = traverse_edits(set_, shift, sweep)
    req = pb.TraverseRequest(model=model, edits=edits)
    if isinstance(source, ONE_CODE):
        req.code = code_bytes(source)  # not an image file: traverse_source said so
    else:
        req.images.CopyFrom(images_message(list(source)))  # items of traverse_source, checked there
    if swept is not None:
        req.sweep.CopyFrom(swept)
    return req
