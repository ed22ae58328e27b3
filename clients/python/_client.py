"""The synchronous client. AsyncClient (_async_client.py) has the same methods, awaited."""
from __future__ import annotations

import itertools
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np

from disco.client import _convert as cv
from disco.client._transport import (DEFAULT_TARGET, MAX_MESSAGE_BYTES, RESPREAD_S, TLS, ChannelConfig, Retired,
                                     RetryBudget, RetryPolicy, SPREAD_S, bearer, spread, spreadable,
                                     sync_channel, warn_plaintext_token)
from disco.client.errors import (ClientClosed, DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted,
                                 from_rpc_error, too_large)
from disco.client.types import Code, Factors, Images, as_images
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

HEALTH_SERVICE = "disco.v1.Codec"


def health_service(model: str = "") -> str:
    """The grpc.health.v1 name of the server ("disco.v1.Codec") or of one of its models ("disco.v1.Codec/<model>")."""
    return f"{HEALTH_SERVICE}/{model}" if model else HEALTH_SERVICE


def unknown_health(model: str, exc: NotFound) -> NotFound:
    """grpc.health.v1 answers NOT_FOUND without a message: say what was not found."""
    what = f"no model {model!r}" if model else f"no {HEALTH_SERVICE} service"
    return NotFound(f"NOT_FOUND: health knows no {health_service(model)!r}: the server serves {what}", exc.code)


MIN_MESSAGE_BYTES = 64 * 1024  # room for one RGB 64x64 image and its framing
MAX_TIMEOUT_S = 1e8  # about 3 years; from about 7.4e9 s gRPC's deadline arithmetic overflows and every call fails at once


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < float(timeout) <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0e}, got {timeout!r}")
    return float(timeout)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_args(**named: Any) -> None:
    """Arguments a request carries, checked before any call: protobuf would raise a TypeError naming none of them.
    `batch` must be a bool (numpy's, or 0 or 1, as protobuf took); every other one a string or None (the default)."""
    for name, value in named.items():
        if name == "batch":
            if not (isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1))):
                raise ValueError(f"batch must be a bool, got {value!r}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {value!r}")


def joined(out: list[np.ndarray]) -> Images:
    """The images of a call's requests, in order; requests answered with images of different shapes (codes of
    models of different image sizes, split over requests) cannot make one array: refused as one request would be."""
    shapes = sorted({a.shape[1:] for a in out})
    if len(shapes) > 1:
        raise InvalidArgument(f"INVALID_ARGUMENT: codes decode to different image shapes {shapes}; "
                              "decompress each model's codes in a call of its own", "INVALID_ARGUMENT")
    return as_images(out[0] if len(out) == 1 else np.concatenate(out))


class _Settings:
    """Keyword-only configuration shared by Client and AsyncClient; bad values fail at construction."""

    _closed: bool  # set by close(); a closed client's calls raise ValueError, and those it cut ClientClosed
    _image_bytes: int | None  # largest decoded image of the server's models, learned once
    _stubs: list[codec_pb2_grpc.CodecStub]  # one per connection (set by Client and AsyncClient)
    _turn: Iterator[int]  # whose turn it is

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0, model: str = "",
                 retry: RetryPolicy | None = None, tls: TLS | None = None, token: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_batch: int = 1024, connections: int = 1,
                 respread_s: float = RESPREAD_S) -> None:
        _check_timeout(timeout)
        check_args(model=model)
        kinds: tuple[tuple[str, object, type], ...] = (("retry", retry, RetryPolicy), ("tls", tls, TLS),
                                                      ("token", token, str))
        for name, value, kind in kinds:
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__} or None, got {value!r}")
        if isinstance(respread_s, bool) or not isinstance(respread_s, (int, float)) or not respread_s >= 0:  # NaN too
            raise ValueError(f"respread_s must be >= 0 seconds (0: spread only at the start), got {respread_s!r}")
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if token is not None and not token:
            raise ValueError("token is empty; pass None for no token")
        if token:
            from disco.service.security import unsendable  # the server's own rule; pure Python

            why = unsendable(token)
            if why:  # gRPC would fail every call with INTERNAL "Invalid metadata"
                raise ValueError(f"token cannot be sent: {why} (strip a trailing newline)")
        if not _is_int(max_message_bytes) or not MIN_MESSAGE_BYTES <= max_message_bytes <= 2**31 - 1:
            raise ValueError(f"max_message_bytes must be a whole number from {MIN_MESSAGE_BYTES} to {2**31 - 1}, "
                             f"got {max_message_bytes!r}")
        if not _is_int(connections) or connections < 1:
            raise ValueError(f"connections must be a whole number >= 1, got {connections!r}")
        self.target = target
        self.timeout = timeout
        self.model_name = model
        self.retry = retry or RetryPolicy()
        self.retry_budget = RetryBudget(self.retry)  # shared by every call of this client
        self.max_message_bytes = max_message_bytes
        self.max_batch = max_batch
        # Several connections each need their own subchannel pool: channels with equal arguments share one
        # TCP connection otherwise. A server of several processes (disco serve --processes N, SO_REUSEPORT)
        # balances connections, not calls, so a client reaches them all only over several connections.
        extra = (("grpc.use_local_subchannel_pool", 1),) if connections > 1 else ()
        self._channel_config = ChannelConfig(target=target, tls=tls, max_message_bytes=max_message_bytes,
                                             extra_options=extra)
        self._channel_config.resolved_target()  # a bad target fails here, not at the first call
        warn_plaintext_token(target, tls, token)
        self.connections = connections
        self._spread_s = min(SPREAD_S, float(timeout))  # a spread (the constructor's too) keeps within the timeout
        self._metadata = bearer(token)
        self._image_bytes = None
        self._server_limit: int | None = None  # the server's --max-message-bytes, once ListModels said it
        self._server_images: int | None = None  # its --max-images-per-request
        self._ref_bytes = 0  # the longest model reference of its models, framed
        self._factor_bytes = 0  # the largest Encode answer per image among its models, framed
        # Spread again every respread_s: a recycled connection lands on a process the kernel picks afresh.
        self.respread_s = respread_s
        again = respread_s > 0 and spreadable(self._channel_config, [None] * connections)
        self._respread_at = time.monotonic() + respread_s if again else math.inf
        self._longest_call_s = timeout  # the longest deadline a call of this client has had, streams included
        self._retired = Retired()  # connections a re-spread replaced, closed once their calls are over
        self._closed = False

    @property
    def _stub(self) -> codec_pb2_grpc.CodecStub:
        """The stub of the next connection, round robin: each request picks one. Every `respread_s` this also
        starts a re-spread of the connections in the background (no call waits for it)."""
        if self._closed:  # since the call began (_deadline): before a stub touches a closed channel
            raise self._closed_error()
        if time.monotonic() >= self._respread_at:
            self._respread_at = math.inf  # until that re-spread ends
            self._respread_soon()
        return self._stubs[next(self._turn) % len(self._stubs)]

    def _check_open(self) -> None:
        """A closed client's calls fail here as they begin, before a stub touches a closed channel (which can crash
        grpcio); close() while a call runs makes it raise ClientClosed instead (_closed_error)."""
        if self._closed:
            raise ValueError(f"this client of {self.target!r} is closed; make a new one")

    def _closed_error(self) -> ClientClosed:
        """What a call that close() cut short raises, in both clients: closing a channel cancels its calls, which
        gRPC reports as CANCELLED (grpc.aio as a CancelledError), though neither the server nor the caller did."""
        return ClientClosed(f"CANCELLED: the client was closed while the call ran (close() on this client of "
                            f"{self.target!r} ends the calls still in flight; their results are lost)", "CANCELLED")

    def _cut(self, exc: grpc.RpcError) -> bool:
        """Whether close() ended this call: CANCELLED once the client is closed (before any channel closes)."""
        return self._closed and exc.code() == grpc.StatusCode.CANCELLED

    def _respread_soon(self) -> None:
        raise NotImplementedError

    def _retire(self, channel: Any) -> None:
        """Close a replaced connection once the calls begun on it have passed their deadlines (1 s spare)."""
        self._retired.hold(channel, self._longest_call_s + 1.0)

    def _ref(self, model: str, version: str) -> pb.ModelRef:
        """(The public calls check their arguments first, once: check_args.)"""
        return pb.ModelRef(name=model or self.model_name, version=version)

    def _remember(self, listed: pb.ListModelsResponse) -> int:
        """What ListModels says: the largest decoded image of the server's models (returned), the longest model
        reference a Decompress response carries per image, and the server's limits, which this client's requests
        and the responses they ask for then fit too (0: a server from before it said)."""
        self._image_bytes = max(int(h * w * c) for h, w, c in (m.input_shape for m in listed.models))
        self._ref_bytes = max(pb.ModelRef(name=m.name, version=m.version).ByteSize() + 3 for m in listed.models)
        self._factor_bytes = max(pb.EncodeResponse(items=[pb.FactorValues(factors=[  # values never 0: all sent
            pb.FactorValue(name=f.name, dim=f.dim, mean=1.0, std=1.0) for f in m.factors])]).ByteSize()
            for m in listed.models)
        self._server_limit = int(listed.max_message_bytes) or None
        self._server_images = int(listed.max_images_per_request) or None
        return self._image_bytes

    @property
    def _limit(self) -> int:
        """The message limit requests are cut to: this client's, or the server's where it said a smaller one."""
        return min(self.max_message_bytes, self._server_limit or self.max_message_bytes)

    @property
    def _most_images(self) -> int:
        """Images per request: max_batch, or the server's --max-images-per-request where it said a smaller one."""
        return min(self.max_batch, self._server_images or self.max_batch)

    def _images_per_response(self, image_bytes: int) -> int:
        """Decoded images that fit one response under the message limit, each with its model reference, beside
        the server's fixed allowance (service/pipeline.py check_response: 1 KiB), with a tenth of the limit spare."""
        fit = cv.request_budget(self._limit) // max(image_bytes + self._ref_bytes, 1)
        return max(1, min(self._most_images, fit))

    def _images_per_compress(self, batch: bool, image_bytes: int) -> int:
        """Images per Compress request: with batch=True, as many as one Decompress response can give back."""
        return self._images_per_response(image_bytes) if batch else self._most_images

    @property
    def _images_per_encode(self) -> int:
        """Images whose factor values fit one Encode response: a small PNG (80 bytes) can ask for a larger answer
        (over 100 bytes of named factors), so a request under the limit could come back over it."""
        fit = cv.request_budget(self._limit) // max(self._factor_bytes, 1)
        return max(1, min(self._most_images, fit))

    @staticmethod
    def _grew(learned: tuple[int, int], fresh: tuple[int, int]) -> bool:
        """(largest image bytes, message limit) learned anew: did images grow or the limit shrink since?"""
        return fresh[0] > learned[0] or fresh[1] < learned[1]

    def _recut(self, runs: list[list[bytes]], image_bytes: int) -> list[list[bytes]]:
        """The runs left, cut again for an image size learned anew: a response was too large because the server
        has loaded a model with larger images since this client last asked (a hot reload)."""
        return self._decode_chunks([c for run in runs for c in run], image_bytes)

    def _decode_chunks(self, codes: list[bytes], image_bytes: int) -> list[list[bytes]]:
        """Runs of codes whose decoded images fit one response (a batch container counts all its images), and whose
        bytes fit one request. A code over the request's share of the limit is refused (ValueError) before any
        request: gRPC would fail the request carrying it, and with it the good codes beside it."""
        per_call, budget = self._images_per_response(image_bytes), cv.request_budget(self._limit)
        runs: list[list[bytes]] = []
        run: list[bytes] = []
        images = size = 0
        for i, code in enumerate(codes):
            if len(code) > budget:
                raise ValueError(f"code {i} is {len(code)} bytes, over the {budget}-byte share of the "
                                 f"{self._limit}-byte message limit that one request may carry: not a code")
            n = cv.images_in(code)
            if run and (images + n > per_call or size + len(code) > budget):
                runs.append(run)
                run, images, size = [], 0, 0
            run.append(code)
            images += n
            size += len(code)
        return runs + ([run] if run else [])

    def _traverse_requests(self, source: Any, model: str, version: str, set_: Mapping[str, float] | None,
                           shift: Mapping[str, float] | None, sweep: tuple[str, float, float, int] | None,
                           image_bytes: int) -> list[pb.TraverseRequest]:
        """Traverse requests for a source (cv.traverse_source): a code as one (it names its model: the client's
        default model is not sent for it), image items cut so that each request's images, and the sources x sweep
        steps it answers with, keep to the limits. A sweep is image-major, so the answers joined in order are the one
        answer."""
        if isinstance(source, cv.ONE_CODE):
            return [cv.traverse_request(source, pb.ModelRef(name=model, version=version), set_, shift, sweep)]
        steps = cv.sweep_steps(sweep)
        sources = max(1, min(self._most_images, self._images_per_response(image_bytes)) // steps)
        ref = self._ref(model, version)
        return [cv.traverse_request(run, ref, set_, shift, sweep)
                for run in cv.chunks(source, self._limit, sources)]

    def _compress_requests(self, model: str, version: str, quality: str, batch: bool, learned: int,
                           where: cv.Where) -> Callable[[Any], list[tuple[pb.CompressRequest, int]]]:
        """What a compress stream sends for one batch: requests cut as compress() cuts (ListModels asked first,
        which `learned` comes from), each with its number of images; a warning about a batch is said `where` the
        stream started (its batches are read on gRPC's side)."""
        ref = self._ref(model, version)
        most = self._images_per_compress(batch, learned)

        def make(images: Any) -> list[tuple[pb.CompressRequest, int]]:
            runs = list(cv.chunks(cv.image_items(images, where), self._limit, most))
            return [(pb.CompressRequest(model=ref, images=cv.images_message(run), quality=quality, batch=batch),
                     len(run)) for run in runs or [[]]]  # none: images_message says the batch is empty

        return make

    def _decompress_requests(self, image_bytes: int) -> Callable[[Any], list[tuple[pb.DecompressRequest, int]]]:
        """What a decompress stream sends for one batch: runs whose images fit one response, as decompress(), each
        with its number of codes."""
        def make(batch: Any) -> list[tuple[pb.DecompressRequest, int]]:
            return [(pb.DecompressRequest(codes=run, format=pb.IMAGE_FORMAT_RAW), len(run))
                    for run in self._decode_chunks(cv.code_list(batch), image_bytes)]

        return make

    def _stream_timeout(self, timeout: float | None) -> float:
        seconds = self.timeout if timeout is None else _check_timeout(timeout)
        self._longest_call_s = max(self._longest_call_s, seconds)
        return seconds

    def _deadline(self, timeout: float | None) -> float:
        """One absolute deadline for a whole public call, however many requests it takes. Every public call begins
        here, so a call on a closed client fails here (ValueError); one that close() interrupts later, in a request
        or between two, raises ClientClosed."""
        self._check_open()
        return time.monotonic() + self._stream_timeout(timeout)

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("DEADLINE_EXCEEDED: the call's deadline passed before a request could be sent",
                                   "DEADLINE_EXCEEDED")
        return remaining

    def _closed_hint(self, exc: grpc.RpcError) -> str:
        """What a connection the server closed at once most likely means. A server that wants TLS (or a client
        certificate) closes a connection whose handshake lacks it, and gRPC tells the client only "Socket closed"
        (TLS 1.3 reports a missing client certificate after the handshake); the server logs the reason."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or not str(exc.details()).endswith("Socket closed"):
            return ""
        tls = self._channel_config.tls
        if tls is None:
            return "; the server closed the connection at once: if it serves TLS, pass tls=TLS(ca=...) (--tls-ca)"
        if tls.cert is None:
            return ("; the server closed the connection at once: if it asks for a client certificate (mutual TLS), "
                    "pass TLS(cert=..., key=...) (--tls-cert, --tls-key)")
        return ""

    def _pause_after(self, exc: grpc.RpcError, attempt: int, deadline: float) -> float:
        """The backoff before the next attempt; or the SDK error, when the policy, the deadline or the retry budget
        says stop. A failed attempt with a retryable code takes a budget token even when it is the last (gRFC A6)."""
        if self._cut(exc):  # not retried, though CANCELLED may be (on_resource_exhausted): the channels are closed
            raise self._closed_error() from exc
        code = exc.code()
        retryable = self.retry.retryable(code)
        throttled = retryable and not self.retry_budget.failed()
        pause = self.retry.backoff(attempt)
        if not retryable or attempt + 1 >= self.retry.max_attempts or time.monotonic() + pause >= deadline:
            raise from_rpc_error(exc, attempt + 1, self._closed_hint(exc)) from exc
        if throttled:
            raise from_rpc_error(exc, attempt + 1, "; no more retries: too many of this client's recent calls "
                                 "failed (RetryPolicy.budget_tokens)") from exc
        return pause


class Client(_Settings):
    """A connection to a DisCo server (thread-safe; share one per process).

    >>> with Client("localhost:50051") as c:
    ...     codes = c.compress(images)      # uint8 (N, H, W, C), PIL images, paths or bytes -> list[Code]
    ...     pixels = c.decompress(codes)    # -> Images, uint8 (N, H, W, C), with .save()

    Every call has a deadline (`timeout`, overridable per call) that bounds its retries too; targets
    'ip1:port,ip2:port' (IP literals) or 'dns:///name:port' spread calls with round_robin. `connections=N` opens N TCP
    connections (to each address) and sends each request on the next: what reaches every process of a
    `--processes N` server, over which the client spreads them evenly as it starts (`spread`), and again every
    `respread_s` (30 s; 0: only at the start), since the server recycles connections. health() asks over every
    connection.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        super().__init__(target, **settings)
        self._channels = [sync_channel(self._channel_config) for _ in range(self.connections)]
        self._stubs = [codec_pb2_grpc.CodecStub(ch) for ch in self._channels]
        self._turn = itertools.count()
        self._spreading = threading.Lock()  # one spread at a time; close() waits for it
        if self.connections > 1:
            self._spread(retire=False)  # no call yet: a replaced connection closes at once

    def spread(self) -> list[str]:
        """Spread this client's connections evenly over the processes that share the server's port (`disco serve
        --processes N`; see `to_replace`), replacing connections that landed on a busy process; the constructor
        does it for a client with several connections, and the client again every `respread_s`. Best effort,
        within 5 s (or the client's timeout, if shorter): a server that cannot be asked now is left to the
        kernel's spread. Safe while calls are in flight: a replaced connection is closed once the calls begun on
        it have passed their deadlines. Returns
        the process each connection reached (server instance ids; empty where unknown)."""
        self._check_open()
        with self._spreading:
            return self._spread(retire=True)

    def _spread(self, retire: bool) -> list[str]:
        def replaced(k: int, channel: grpc.Channel) -> None:
            self._stubs[k] = codec_pb2_grpc.CodecStub(channel)

        return spread(self._channels, self._channel_config, self._metadata, replaced, timeout=self._spread_s,
                      retire=self._retire if retire else None)

    def _respread_soon(self) -> None:
        threading.Thread(target=self._respread, name="disco-respread", daemon=True).start()

    def _respread(self) -> None:
        with self._spreading:
            try:
                if not self._closed:
                    for channel in self._retired.due():
                        channel.close()
                    self._spread(retire=True)
            finally:
                self._respread_at = time.monotonic() + self.respread_s

    def _call(self, method: str, request: Any, deadline: float, stub: Any = None) -> Any:
        """One RPC with retries; each attempt takes the next connection (a retry after UNAVAILABLE may find a
        live process on another), unless `stub` pins one."""
        for attempt in itertools.count():
            if self._closed:  # since the call began: between its requests or in a backoff (`stub` skips _stub's check)
                raise self._closed_error()
            try:
                response = getattr(stub or self._stub, method)(request, timeout=self._remaining(deadline),
                                                              metadata=self._metadata)
            except grpc.RpcError as exc:
                time.sleep(self._pause_after(exc, attempt, deadline))
            else:
                self.retry_budget.succeeded()
                return response

    def compress(self, images: cv.ImagesLike, *, model: str = "", version: str = "", quality: str = "",
                 batch: bool = False, timeout: float | None = None) -> list[Code]:
        """Images -> one Code per image (batch=True: one batch container per request instead).

        Large inputs are split into requests under the message size limit; with batch=True also into containers
        whose images fit one Decompress response.
        """
        check_args(model=model, version=version, quality=quality, batch=batch)
        items = cv.image_list(images)  # the whole input checked before any request
        deadline, codes, sent = self._deadline(timeout), [], 0
        learned = self._largest_image_bytes(deadline)  # once per client: the server's limits, its image sizes
        most = self._images_per_compress(batch, learned)
        for run in cv.chunks(items, self._limit, most):
            req = pb.CompressRequest(model=self._ref(model, version), images=cv.images_message(run),
                                     quality=quality, batch=batch)
            with cv.counted_from(sent):
                codes += cv.codes_from(self._call("Compress", req, deadline))
            sent += len(run)
        return codes

    def decompress(self, codes: cv.CodesLike, *, timeout: float | None = None) -> Images:
        """Codes (bytes or Code, single or batch) -> uint8 images (N, H, W, C)."""
        deadline, blobs, out = self._deadline(timeout), cv.code_list(codes), []
        learned = (self._largest_image_bytes(deadline), self._limit)
        runs, done = self._decode_chunks(blobs, learned[0]), 0  # done: codes of the runs answered
        while runs:
            req = pb.DecompressRequest(codes=runs[0], format=pb.IMAGE_FORMAT_RAW)
            try:
                with cv.counted_from(done):
                    out.append(cv.images_from(self._call("Decompress", req, deadline).images))
            except (ResourceExhausted, InvalidArgument) as exc:
                if not too_large(exc):
                    raise
                # a response too large: learn the sizes again (a reload brought larger images, or a lower limit)
                fresh = (self._largest_image_bytes(deadline, fresh=True), self._limit)
                if not self._grew(learned, fresh):
                    raise
                learned, runs = fresh, self._recut(runs, fresh[0])
                continue
            done += len(runs.pop(0))
        return joined(out)

    def encode(self, images: cv.ImagesLike, *, model: str = "", version: str = "",
               timeout: float | None = None) -> list[Factors]:
        """Images -> named factor values (posterior mean and std), one Factors per image."""
        check_args(model=model, version=version)
        items = cv.image_list(images)  # the whole input checked before any request
        deadline, out = self._deadline(timeout), []
        self._largest_image_bytes(deadline)  # once per client: the server's limits
        sent = 0
        for run in cv.chunks(items, self._limit, self._images_per_encode):
            req = pb.EncodeRequest(model=self._ref(model, version), images=cv.images_message(run))
            with cv.counted_from(sent):
                out += cv.factors_from(self._call("Encode", req, deadline))
            sent += len(run)
        return out

    def traverse(self, source: cv.ImagesLike | bytes | Code, *, set: Mapping[str, float] | None = None,
                 shift: Mapping[str, float] | None = None, sweep: tuple[str, float, float, int] | None = None,
                 model: str = "", version: str = "", timeout: float | None = None) -> Images:
        """Decode images (or a code) with named factors set or shifted, or swept (factor, start, stop, steps):
        image-major, every step of the first image, then the next. Many images are cut into requests under the
        limits, as compress() cuts them."""
        check_args(model=model, version=version)
        cv.traverse_edits(set, shift, sweep)  # bad arguments: a ValueError before any call
        source = cv.traverse_source(source)  # and so are bad images: the whole input checked at once
        deadline = self._deadline(timeout)
        learned = self._largest_image_bytes(deadline)  # once per client: the server's limits, its image sizes
        out, sent = [], 0
        for req in self._traverse_requests(source, model, version, set, shift, sweep, learned):
            with cv.counted_from(sent):
                out.append(cv.images_from(self._call("Traverse", req, deadline).images))
            sent += cv.sources_in(req)
        return joined(out)

    def compress_stream(self, batches: Iterable[cv.ImagesLike], *, model: str = "", version: str = "",
                        quality: str = "", batch: bool = False, timeout: float | None = None) -> Iterator[list[Code]]:
        """Bulk: the batches on one stream, each cut into requests under the message limits as compress() cuts;
        yields each batch's codes in order (no retries). `version` and `batch` as for compress()."""
        where = cv.caller_location()  # the caller's line: this generator runs in its first next()
        check_args(model=model, version=version, quality=quality, batch=batch)
        cv.StreamRequests.check(batches, async_ok=False)
        deadline = self._deadline(timeout)  # one for the stream and the ListModels before it
        learned = self._largest_image_bytes(deadline)  # once per client: the server's limits
        requests = cv.StreamRequests(batches, self._compress_requests(model, version, quality, batch, learned, where),
                                     "image")
        call = self._stub.CompressStream(iter(requests), timeout=self._remaining(deadline), metadata=self._metadata)
        try:
            for resp in call:
                group = requests.answered(resp)
                if group is not None:
                    yield [code for r in group for code in cv.codes_from(r)]
        except grpc.RpcError as exc:  # about a batch that was sent: a bad later one ends the stream quietly
            error = self._closed_error() if self._cut(exc) else from_rpc_error(exc, note=self._closed_hint(exc))
            raise requests.failed(error) from exc
        finally:  # a caller that stops early (close, break): gRPC would go on reading its batches
            call.cancel()
        requests.raise_error()

    def decompress_stream(self, batches: Iterable[cv.CodesLike], *,
                          timeout: float | None = None) -> Iterator[Images]:
        """Bulk: the batches of codes on one stream, each cut into requests whose images fit one response, as
        decompress() cuts; yields each batch's images in order (no retries)."""
        cv.StreamRequests.check(batches, async_ok=False)
        deadline = self._deadline(timeout)
        learned = self._largest_image_bytes(deadline)
        requests = cv.StreamRequests(batches, self._decompress_requests(learned), "code")
        call = self._stub.DecompressStream(iter(requests), timeout=self._remaining(deadline), metadata=self._metadata)
        try:
            for resp in call:
                group = requests.answered(resp)
                if group is not None:
                    yield joined([cv.images_from(r.images) for r in group])
        except grpc.RpcError as exc:
            error = self._closed_error() if self._cut(exc) else from_rpc_error(exc, note=self._closed_hint(exc))
            raise requests.failed(error) from exc
        finally:
            call.cancel()
        requests.raise_error()

    def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model version the server offers."""
        return list(self._call("ListModels", pb.ListModelsRequest(), self._deadline(timeout)).models)

    def model(self, name: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One model's description: input shape, factors, quality levels, fingerprint."""
        check_args(model=name, version=version)
        return self._call("GetModel", pb.GetModelRequest(model=self._ref(name, version)), self._deadline(timeout))

    def health(self, model: str = "", *, timeout: float | None = None) -> bool:
        """True when the server reports SERVING (it does only after warm-up, and not while draining) on every
        connection: with `connections=N` to a `--processes` server, every process this client sends to. With a
        model name, that model's own status (NOT_SERVING once a reload withdraws it; NotFound if never served)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline, request = self._deadline(timeout), health_pb2.HealthCheckRequest(service=health_service(model))
        try:
            return all(self._call("Check", request, deadline, health_pb2_grpc.HealthStub(ch)).status
                       == health_pb2.HealthCheckResponse.SERVING for ch in self._channels)
        except NotFound as exc:
            raise unknown_health(model, exc) from exc

    def _largest_image_bytes(self, deadline: float, fresh: bool = False) -> int:
        known = self._image_bytes
        if known is not None and not fresh:
            return known
        return self._remember(self._call("ListModels", pb.ListModelsRequest(), deadline))

    def close(self) -> None:
        with self._spreading:  # after a re-spread that is running
            self._closed = True
            for ch in self._channels + self._retired.due(everything=True):
                ch.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
