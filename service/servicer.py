"""The thin gRPC layer: protobuf <-> numpy, errors -> status codes; the Pipeline does the work.

The servicer reads `self.pipeline` once per call, so a hot reload that swaps it never disturbs a
request already running.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from disco.service import container, images
from disco.service.config import ServeConfig
from disco.service.errors import (CorruptCode, DeadlineExceeded, InvalidInput, NotFound, OutOfMemory, QueueFull,
                                  UnservedChecksum, UnservedCode, VersionUnavailable, response_too_large)
from disco.service.metrics import Metrics
from disco.service.pipeline import (MAX_EDITS, RESPONSE_BYTES, Edit, Pipeline, Sweep, check_edits, check_response,
                                    check_sweep_steps, ref_bytes)
from disco.service.repository import ModelEntry, Repository, RepositoryError
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPE_NAMES = {pb.DTYPE_UINT8: "uint8", pb.DTYPE_FLOAT32: "float32"}
INSTANCE = secrets.token_hex(8)  # this process, for ListModels: clients tell the processes sharing a port apart
_INLINE_IMAGES = 16  # images a request converts on the event loop; more go to a thread (_off_loop)
# and image-file bytes: a few large files cost as much (a review: 16 GIF files of 4 MB of comment blocks each
# would hold the loop about 6 s, at 0.5 s for 5 MB)
_INLINE_BYTES = 1 << 20
_MAX_NOOP_BYTES = 1 << 20  # what a NoOp may answer beyond one raw image of the largest model served
_CHECK_ROOM_FROM = _INLINE_IMAGES  # larger requests look for room in the encoder's queue before their pixels are made
_MAX_DETAILS = 4096  # characters of an error message sent back: well inside gRPC's 16 KiB metadata limit
# gRPC core cancels a call whose deadline passed by its monotonic clock, while time_remaining() reads the wall
# clock against the deadline converted to it; the two disagree by a few ms (up to 2.4 ms seen here), so a call
# ended this close to its deadline ended by it.
_DEADLINE_SLACK_S = 0.02
_STREAM_SLACK_S = 0.005  # a stream's requests ending this close to its deadline ended by it (_count_stream)
# gRPC core rounds a call's grpc-timeout header up: the server's deadline came 9 ms after the caller's at 1-3 s, 99 ms
# at 10.5 s (a review's measurement); a stream that ends this close to the server's deadline ended by the caller's
_TIMEOUT_ROUNDING = 0.01
# Time kept to answer a call that waited for a reload (CodecServicer._handle) before its deadline
_ANSWER_S = 0.05
_STATUS = (  # the one place where the core's errors become gRPC status codes (most specific first)
    (CorruptCode, grpc.StatusCode.DATA_LOSS),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (VersionUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return None


class Malformed:
    """A request message that did not parse. gRPC would answer UNKNOWN and log a traceback for each such call;
    the handler answers INVALID_ARGUMENT instead, counted like any other bad request."""

    __slots__ = ("type_name", "error")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name, self.error = type_name, error


def _tolerant(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Malformed(message.DESCRIPTOR.full_name, str(exc))

    return parse


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_to_server(servicer: CodecServicer, server: grpc.aio.Server) -> None:
    """codec_pb2_grpc.add_CodecServicer_to_server, with requests that do not parse handed to the handlers as
    Malformed: every method of the service, from its descriptor."""
    service = pb.DESCRIPTOR.services_by_name["Codec"]
    handlers = {}
    for m in service.methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        handlers[m.name] = _HANDLERS[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name), request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


# What a handler counts once its call is sure to answer OK: run by `rpc` after its last checks (the response's size,
# the deadline), so that images of a call that then fails are not counted as compressed or decompressed.
_ON_OK: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar("disco_on_ok", default=None)


def on_ok(account: Callable[[], None]) -> None:
    """Count this when the call answers OK (at once outside an RPC)."""
    pending = _ON_OK.get()
    if pending is None:
        account()
    else:
        pending.append(account)


def rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Count, time and translate errors for one unary RPC."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: CodecServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        m = self.metrics
        t0 = time.perf_counter()
        m.in_flight.inc()
        code, details = grpc.StatusCode.OK, ""
        pending: list[Callable[[], None]] = []
        scope = _ON_OK.set(pending)
        try:
            if isinstance(request, Malformed):
                raise InvalidInput(f"the request is not a valid {request.type_name} message: {request.error}")
            m.child(m.bytes_in, name).inc(request.ByteSize())
            result = await self._handle(method, request, context)
            size = result.ByteSize()  # type: ignore[attr-defined]
            if size > self.cfg.max_message_bytes:  # gRPC would fail the send, as an error of its own, after the work
                raise InvalidInput(response_too_large(size, self.cfg.max_message_bytes))
            if _past_deadline(context, slack=0):  # the caller stopped waiting: gRPC could not send it (an ERROR log)
                raise DeadlineExceeded("the deadline passed as the answer was ready")
            m.child(m.bytes_out, name).inc(size)
            for account in pending:
                account()
        except asyncio.CancelledError:  # gRPC cancels the handler when its caller goes away or its deadline passes
            code = _ended_early(context)
            raise
        except Exception as exc:
            known = status_of(exc)
            if known is None:  # a bug, not a bad request: log it, answer INTERNAL, keep serving
                log.exception("%s failed", name)
                code, details = grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(exc).__name__}"
            else:
                code, details = known, str(exc)[:_MAX_DETAILS]
        finally:
            _ON_OK.reset(scope)
            m.in_flight.dec()
            m.child(m.requests, name, code.name).inc()
            m.child(m.latency, name).observe(time.perf_counter() - t0)
        if code is not grpc.StatusCode.OK:
            try:
                await context.abort(code, details)
            except grpc.aio.AbortError:  # how abort() ends the handler
                raise
            except Exception:  # noqa: BLE001 - gRPC core ended the call already (its deadline): nothing can be sent
                raise asyncio.CancelledError from None  # which gRPC takes quietly, as it does a cancelled handler
        return result

    return wrapper


def _past_deadline(context: grpc.aio.ServicerContext, slack: float = _DEADLINE_SLACK_S) -> bool:
    """The call's deadline has passed, by this process's reckoning, or is within `slack` seconds of it."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack


def _ended_early(context: grpc.aio.ServicerContext, slack: float = _DEADLINE_SLACK_S) -> grpc.StatusCode:
    """How a call the server did not finish ended for its caller: its deadline passed, or it was cancelled."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if _past_deadline(context, slack) else grpc.StatusCode.CANCELLED


def _count(code: bytes, index: int) -> int:
    try:
        return container.count(code)
    except InvalidInput as exc:
        raise type(exc)(f"code {index}: {exc}") from exc


def _check_format(fmt: int) -> None:
    if fmt not in pb.ImageFormat.values():
        raise InvalidInput(f"image format {fmt} is unknown, expected one of {list(pb.ImageFormat.keys())}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _image_count(msg: pb.Images) -> int:
    """How many images a request's Images say they hold (a tensor's first axis, or its files)."""
    kind = msg.WhichOneof("kind")
    if kind == "tensor":
        return msg.tensor.shape[0] if msg.tensor.shape else 0
    return len(msg.files.files) if kind == "files" else 0


def _from_tensor(t: pb.Tensor, e: ModelEntry, room: Callable[[int], None] | None) -> np.ndarray:
    """A request's tensor as float32 for e's encoder; room(N) is asked once the tensor is known valid."""
    dtype = _DTYPE_NAMES.get(t.dtype) or (pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else str(t.dtype))
    return images.from_raw(t.data, tuple(t.shape), dtype, e.input_shape, room)


@functools.lru_cache(maxsize=16)
def _zeros(n: int) -> bytes:
    """NoOp's answers: made once per size (a benchmark asks for one or two sizes)."""
    return bytes(n)


def model_ref(e: ModelEntry) -> pb.ModelRef:
    return pb.ModelRef(name=e.name, version=e.version)


def models_list(repo: Repository, cfg: ServeConfig, images_per_request: int) -> pb.ListModelsResponse:
    """ListModels' answer: every version served, and the limits a client cuts its requests to."""
    return pb.ListModelsResponse(models=[model_info(e) for e in repo.entries()], server_instance=INSTANCE,
                                 server_processes=cfg.port_processes, max_message_bytes=cfg.max_message_bytes,
                                 max_images_per_request=images_per_request)


def check_message_limit(repo: Repository, cfg: ServeConfig) -> None:
    """Raise RepositoryError unless --max-message-bytes serves these models: ListModels' answer (which a client asks
    for first), and one raw image of each model, in a Decompress answer with its reference (as
    pipeline.check_response allows) and in a request the SDK sends (which keeps a tenth of the limit and 1 KiB spare:
    disco.client._convert.request_budget). Below it a server started, said SERVING and answered every call with an
    error (a review: --max-message-bytes 1024)."""
    need, what = models_list(repo, cfg, cfg.max_images_per_request).ByteSize(), "ListModels' answer"
    for e in repo.entries():
        image = math.prod(e.input_shape)
        one = max(image + ref_bytes([e]) + RESPONSE_BYTES, math.ceil((image + 1024) / 0.9))
        if one > need:
            need, what = one, f"one image of {e.name}/{e.version} in a request and its answer"
    if cfg.max_message_bytes < need:
        raise RepositoryError(f"--max-message-bytes {cfg.max_message_bytes} is too small for the models served: {what} "
                              f"take {need} bytes; expected at least {need}")


def model_info(e: ModelEntry) -> pb.ModelInfo:
    h, w, c = e.input_shape
    return pb.ModelInfo(
        name=e.name, version=e.version, fingerprint=e.fingerprint.hex(), input_shape=[h, w, c],
        latent_dim=e.codec.latent_dim, description=e.meta.get("description", ""),
        factors=[pb.Factor(name=f["name"], dim=f["dim"], kl_nats=f["kl_nats"], min=f["min"], max=f["max"])
                 for f in e.factors],
        qualities=[pb.QualityLevel(name=q.name, id=q.id, payload_bits=q.payload_bits, is_default=q.is_default)
                   for q in e.codec.qualities],
        code_formats=list(container.KNOWN_FORMATS),
    )


def images_message(probs: np.ndarray, fmt: int, deadline: float | None = None) -> pb.Images:
    """Decoder probabilities -> the response's images: raw uint8 pixels or PNG files (written until the deadline)."""
    pixels = images.to_uint8(probs)
    if fmt == pb.IMAGE_FORMAT_PNG:
        return pb.Images(files=pb.EncodedImages(files=images.to_png(pixels, deadline)))
    return pb.Images(tensor=pb.Tensor(data=pixels.tobytes(), shape=list(pixels.shape), dtype=pb.DTYPE_UINT8))


class _Room:
    """Room for one large request's images in its model version's encoder queue, from the check until they can
    queue: the pipelines' count of images on their way in (`Pipeline.reading`, which the encoder's queue keeps room
    for, for small requests too) holds them meanwhile. Several requests arriving together otherwise all passed the
    check at an empty queue and all made their pixels."""

    def __init__(self, p: Pipeline, e: ModelEntry) -> None:
        self._reading, self._p, self._e, self._key = p.reading, p, e, e.identity
        self._held = 0

    def take(self, n: int) -> None:
        """Room for n images, or QueueFull (InvalidInput for a request no queue of the version could hold)."""
        self._p.check_room(self._e, n)
        self._reading[self._key] = self._reading.get(self._key, 0) + n
        self._held = n

    def keep_until(self, work: Future[Any]) -> None:
        """The caller left while a thread still makes its images: the room goes with the thread's end."""
        held, self._held = self._held, 0
        loop = asyncio.get_running_loop()

        def ended(_: object) -> None:  # on the thread
            with contextlib.suppress(RuntimeError):  # the loop closed first (a stop): nothing counts any more
                loop.call_soon_threadsafe(self._give_back, held)

        work.add_done_callback(ended)

    def _give_back(self, n: int) -> None:
        left = self._reading.get(self._key, 0) - n
        if left > 0:
            self._reading[self._key] = left
        else:
            self._reading.pop(self._key, None)

    def __enter__(self) -> _Room:
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held = self._held, 0
        if held:
            self._give_back(held)


class Reloads(Protocol):
    """What the servicer asks of the server's reloads (server.Running) for a code of a version not served here."""

    async def refresh(self) -> bool: ...  # read the repository now, if it may; True if that swapped in a new snapshot

    def reloading(self) -> bool: ...  # a reload (a poll's, SIGHUP's or refresh's) is under way

    def draining(self) -> bool: ...


class CodecServicer(codec_pb2_grpc.CodecServicer):
    """disco.v1.Codec: converts messages and delegates to the Pipeline."""

    def __init__(self, pipeline: Pipeline, cfg: ServeConfig, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.cfg = cfg
        self.metrics = metrics
        self.reloads: Reloads | None = None  # the server's (server.Running), for codes of versions not served here
        # Image conversions of large requests: as many threads as this process computes with (its share of the
        # cores under --processes), not asyncio's default pool of cores + 4 in every process.
        self.images_pool = ThreadPoolExecutor(cfg.worker_threads(), thread_name_prefix="disco-images")

    async def _handle(self, method: Callable[..., Awaitable[T]], request: Any, context: grpc.aio.ServicerContext) -> T:
        """method on the pipeline serving now (kept for the call, even across a hot reload). A code of a version not
        served here may be one that another replica or process loaded first, while this one waits for its next poll
        (a review: for up to --reload-interval-s after a version shipped, the replicas that had not polled refused
        its codes): the repository is read again, and the call runs once more if that brought a new snapshot."""
        ran = self.pipeline
        try:
            with ran.in_use() as pipeline:
                return await method(self, pipeline, request, context)
        except (UnservedCode, UnservedChecksum) as exc:
            remaining = context.time_remaining()  # the read may wait for a reload under way: not past the deadline
            budget = None if remaining is None else remaining - _ANSWER_S
            reloads = self.reloads
            if reloads is None:
                raise
            if budget is None or budget > 0:
                with contextlib.suppress(asyncio.TimeoutError):  # the answer goes out in time, not DEADLINE_EXCEEDED
                    await asyncio.wait_for(reloads.refresh(), budget)
            if self.pipeline is ran:  # neither that read nor another reload (a poll's, since) brought anything new
                # A refusal no client retries, unless the answer may still change: retry (UNAVAILABLE), here once the
                # reload under way has ended, or on another replica once this one drains (a review: both answered
                # INVALID_ARGUMENT, for a version being loaded that very moment)
                if reloads.draining():
                    raise VersionUnavailable(f"{exc}; this server is draining: retry") from exc
                if reloads.reloading():
                    raise VersionUnavailable(f"{exc}; the repository is being read again, which may bring it: "
                                             "retry") from exc
                raise
        with self.pipeline.in_use() as pipeline:
            return await method(self, pipeline, request, context)

    async def _off_loop(self, n: int, f: Callable[..., T], *args: Any, room: _Room | None = None,
                        size: int = 0) -> T:
        """f(*args), which converts n images (reads or writes files, or turns probabilities into pixels): a few on the
        event loop, more on a thread. Pillow and numpy let go of the GIL for much of it, and the loop serves other
        calls meanwhile (reading 4,096 PNG files took 350 ms here and writing them 480: every other call, health
        checks included, waited that long; benchmarks/loop_stall.py). A caller that leaves does not stop the thread:
        the room the rows hold is kept until it ends. `size`: the bytes of the files it reads, if any."""
        if n <= _INLINE_IMAGES and size <= _INLINE_BYTES:
            return f(*args)
        work = self.images_pool.submit(f, *args)
        try:
            return await asyncio.wrap_future(work)
        finally:
            if room is not None and not work.done():
                room.keep_until(work)

    async def _pixels(self, p: Pipeline, msg: pb.Images, e: ModelEntry, deadline: float | None) -> np.ndarray:
        """The images of a request as float32 for e's encoder. A large request looks for room in the encoder's queue
        before its pixels are made (192 MiB of float32 for 4096 RGB images), and holds it until it can queue them:
        through the read of its files and the load of an old version, during which others look too."""
        n = _image_count(msg)
        self._check_count(n)
        tensor = msg.WhichOneof("kind") == "tensor"
        if n <= _CHECK_ROOM_FROM:
            return _from_tensor(msg.tensor, e, None) if tensor else await self._from_files(msg, e, deadline, None)
        with _Room(p, e) as room:
            x = _from_tensor(msg.tensor, e, room.take) if tensor else await self._from_files(msg, e, deadline, room)
            await p.load(e)  # loaded: the caller queues x in this step of the event loop, as the room is let go
            return x

    async def _from_files(self, msg: pb.Images, e: ModelEntry, deadline: float | None,
                          room: _Room | None) -> np.ndarray:
        if msg.WhichOneof("kind") != "files":
            raise InvalidInput("no images given: set images.tensor or images.files")
        files = list(msg.files.files)
        if room is not None:
            room.take(len(files))  # files are known valid only once read
        return await self._off_loop(len(files), images.from_files, files, e.input_shape, deadline, room=room,
                                    size=sum(map(len, files)))

    def _check_response(self, n: int, e: ModelEntry, fmt: int) -> None:
        """n raw images of e must fit one response. PNG sizes are not known before encoding (and far smaller): a
        PNG response is bounded once built (_check_sent)."""
        if fmt != pb.IMAGE_FORMAT_PNG:
            check_response(n, e.input_shape, self.cfg.max_message_bytes)

    def _check_sent(self, response: Any, n: int, fewer: str) -> None:
        """A PNG response of n images, built, must fit one message (the rpc wrapper bounds any response; this
        one says how many images would fit)."""
        size = response.ByteSize()
        if size > self.cfg.max_message_bytes:
            raise InvalidInput(response_too_large(size, self.cfg.max_message_bytes, n, fewer))

    def _counts(self, p: Pipeline, codes: list[bytes], steps: int = 1) -> list[int]:
        """Images each code stands for (batch containers hold many). When they would pass the request limit, each
        container's checksum is checked first: a corrupted count answers DATA_LOSS, not "too many images"."""
        counts = [_count(c, i) for i, c in enumerate(codes)]
        if sum(counts) * steps > self.cfg.max_images_per_request:
            for i, n in enumerate(counts):
                if n > 1:
                    p.route(codes[i], i)
        return counts

    def _check_count(self, n: int, steps: int = 0) -> None:
        """n images in a request, or with sweep steps, n images out of n / steps sources, within the limit."""
        if n > self.cfg.max_images_per_request:
            limit = self.cfg.max_images_per_request
            what = f"request carries {n} images" if not steps else (
                f"traverse would return {n} images ({n // steps} source image(s) x {steps} sweep steps)")
            fits = f": a sweep of {steps} steps takes at most {limit // steps} source images a request" \
                if steps > 1 and n // steps > 1 else ""  # a batch container of many, which no client cuts
            raise InvalidInput(f"{what}, the limit is {limit}{fits}")

    @rpc
    async def Compress(self, p: Pipeline, request: pb.CompressRequest, context: grpc.aio.ServicerContext) -> pb.CompressResponse:
        e, deadline = p.entry(request.model.name, request.model.version), deadline_of(context)
        quality = e.codec.quality(request.quality).name  # a bad quality is refused before the pixels are read
        x = await self._pixels(p, request.images, e, deadline)
        codes = await p.compress(e, x, quality, request.batch, deadline)
        m = self.metrics

        def account() -> None:
            m.child(m.images, "Compress", e.name, e.version).inc(len(x))
            # One observation per request, its mean (a histogram observation costs a microsecond or two: per image,
            # a 64-image request would spend as long on them as on its entropy coding).
            m.child(m.code_bytes, e.name, e.version).observe(sum(map(len, codes)) / len(x))

        on_ok(account)
        return pb.CompressResponse(codes=codes, model=model_ref(e), quality=quality)

    @rpc
    async def Decompress(self, p: Pipeline, request: pb.DecompressRequest, context: grpc.aio.ServicerContext) -> pb.DecompressResponse:
        codes = list(request.codes)
        _check_format(request.format)
        self._check_count(len(codes))  # every code is at least one image: refuse a flood before reading headers
        counts = self._counts(p, codes)
        limit = self.cfg.max_images_per_request
        big = next((i for i, n in enumerate(counts) if n > limit), None)
        if big is not None:
            raise InvalidInput(f"code {big} declares {counts[big]} images, more than this server takes in one request "
                               f"({limit}); split the batch")
        self._check_count(sum(counts))
        raw = request.format != pb.IMAGE_FORMAT_PNG  # PNG: bounded once encoded (_check_sent), its sizes unknown before
        deadline = deadline_of(context)
        probs, entries = await p.decompress(codes, deadline, self.cfg.max_message_bytes if raw else 0)
        versions = {id(e): e for e in entries}  # entries repeat the same few objects, one per image
        refs = {k: model_ref(e) for k, e in versions.items()}  # one per version, not per image
        response = pb.DecompressResponse(images=await self._off_loop(len(probs), images_message, probs, request.format,
                                                                     deadline),
                                         models=[refs[id(e)] for e in entries])
        if not raw:
            self._check_sent(response, len(entries), "images per request (a batch code counts all its images)")
        def account() -> None:
            for e in versions.values():
                n = len(entries) if len(versions) == 1 else sum(x is e for x in entries)
                self.metrics.child(self.metrics.images, "Decompress", e.name, e.version).inc(n)

        on_ok(account)
        return response

    @rpc
    async def Encode(self, p: Pipeline, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        e, deadline = p.entry(request.model.name, request.model.version), deadline_of(context)
        f = await p.encode(e, await self._pixels(p, request.images, e, deadline), deadline)
        items = [pb.FactorValues(factors=[pb.FactorValue(name=n, dim=d, mean=float(m), std=float(s))
                                          for n, d, m, s in zip(f.names, f.dims, mu_row, sd_row)])
                 for mu_row, sd_row in zip(f.mean, f.std)]
        return pb.EncodeResponse(items=items, model=model_ref(e))

    @rpc
    async def Traverse(self, p: Pipeline, request: pb.TraverseRequest, context: grpc.aio.ServicerContext) -> pb.TraverseResponse:
        _check_format(request.format)
        deadline = deadline_of(context)
        if len(request.edits) > MAX_EDITS:  # before any compute
            raise InvalidInput(f"{len(request.edits)} edits, expected at most {MAX_EDITS} (one per factor says all)")
        source = request.WhichOneof("source")
        edits = [Edit(ed.factor, ed.WhichOneof("op") or "", getattr(ed, ed.WhichOneof("op") or "set"))
                 for ed in request.edits]
        sw = request.sweep if request.HasField("sweep") else None
        sweep = Sweep(sw.factor, sw.start, sw.stop, sw.steps) if sw is not None else None
        if sweep is not None:
            check_sweep_steps(sweep)  # before the image count it multiplies
        steps = sweep.steps if sweep is not None else 1
        swept = steps if sweep is not None else 0  # what _check_count names: the sweep's steps, if any
        if source == "code":
            n = self._counts(p, [request.code], steps)[0] * steps
            self._check_count(n, swept)
            # bounded once the code is verified, before it is entropy-decoded
            latents, entries = p.latents([request.code], check=lambda es: self._check_response(n, es[0], request.format))
            z, e = latents[0], entries[0]
            ref = request.model
            if ref.name or ref.version:  # a code names its model version: a request may only agree with it
                named = p.entry(ref.name or e.name, ref.version)  # NOT_FOUND for a model or version not served
                if named.fingerprint == e.fingerprint:  # it decodes the code alike (versions may share a decoder)
                    e = named
                elif named.name != e.name or ref.version:
                    raise InvalidInput(f"the code is of model {e.name}/{e.version}, but the request names "
                                       f"{named.name}/{ref.version or '(latest)'}; leave model unset to use the code's")
        elif source == "images":
            e = p.entry(request.model.name, request.model.version)
            n = _image_count(request.images)  # checked against the pixels as they are read
            self._check_count(n * steps, swept)
            self._check_response(n * steps, e, request.format)
            check_edits(e, edits, sweep)  # before the pixels are read, and the encode a bad edit would have cost
            x = await self._pixels(p, request.images, e, deadline)
            z = await p.encode_latents(e, x, deadline)
        else:
            raise InvalidInput("traverse needs a source: set images or code")
        probs = await p.traverse(e, z, edits, sweep, deadline)
        response = pb.TraverseResponse(images=await self._off_loop(len(probs), images_message, probs, request.format,
                                                                   deadline))
        if request.format == pb.IMAGE_FORMAT_PNG:
            self._check_sent(response, len(probs), "images (sources x sweep steps) per request")
        return response

    @rpc
    async def ListModels(self, p: Pipeline, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return models_list(p.repo, self.cfg, p.images_per_request(self.cfg.max_images_per_request))

    @rpc
    async def GetModel(self, p: Pipeline, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return model_info(p.entry(request.model.name, request.model.version))

    @rpc
    async def NoOp(self, p: Pipeline, request: pb.NoOpRequest, context: grpc.aio.ServicerContext) -> pb.NoOpResponse:
        n = request.response_bytes
        if n > _MAX_NOOP_BYTES:  # bytes(n) of a caller's choosing: at 64 MiB, 20 unread calls held 2.9 GiB
            most = min(max(math.prod(e.input_shape) for e in p.repo.entries()) + _MAX_NOOP_BYTES,
                       self.cfg.max_message_bytes)  # one raw image of the largest model served, and a margin
            if n > most:
                raise InvalidInput(f"response_bytes {n} is more than the NoOp answers ({most}: disco bench measures "
                                   "it beside single images)")
        return pb.NoOpResponse(payload=_zeros(n))

    def _count_stream(self, name: str, context: grpc.aio.ServicerContext) -> Callable[[], None]:
        """Count the stream once by how it ended, disco_streams_total{method, code}, when gRPC ends the call (a
        stream its caller left may leave its handler suspended for good). Returns what the handler calls once its
        requests have ended and every message is answered. A caller that cancels while the server waits for its
        next message looks to grpc.aio like one that finished sending: that counts as OK, unless it is near the
        deadline."""
        answered_all = False
        timeout = context.time_remaining()
        # The requests also end, as if the caller had finished, when the caller's deadline passes while the server
        # waits for its next message. The server's deadline is then near, later than the caller's by the grpc-timeout
        # header's rounding: with a 5 ms slack alone a review saw 5 such streams in 10 counted OK. Within 5 ms and
        # the rounding of the deadline a stream counts DEADLINE_EXCEEDED, also one whose caller finished just in time
        # and saw OK: grpc.aio tells them apart only by a cancellation that may come milliseconds later, and waiting
        # for it held back the answer of a caller finishing 4-7 ms before its deadline past that deadline (a review).
        near = _STREAM_SLACK_S + _TIMEOUT_ROUNDING * (timeout or 0.0)

        def finished() -> None:
            nonlocal answered_all
            answered_all = not _past_deadline(context, slack=near)

        def ended(_: object) -> None:
            code = context.code()  # set when a message's error aborted the stream
            if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
                ok = answered_all and not context.cancelled()
                code = grpc.StatusCode.OK if ok else _ended_early(context, max(near, _DEADLINE_SLACK_S))
            self.metrics.child(self.metrics.streams, name, code.name).inc()

        context.add_done_callback(ended)
        return finished

    async def CompressStream(self, request_iterator: AsyncIterator[pb.CompressRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CompressResponse]:
        finished = self._count_stream("CompressStream", context)
        async for request in request_iterator:  # each message answered and counted as one Compress
            yield await self.Compress(request, context)
        finished()

    async def DecompressStream(self, request_iterator: AsyncIterator[pb.DecompressRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecompressResponse]:
        finished = self._count_stream("DecompressStream", context)
        async for request in request_iterator:
            yield await self.Decompress(request, context)
        finished()
