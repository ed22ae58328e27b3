"""The asyncio client: Client's methods, awaited, on a grpc.aio channel."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc
from disco.client import _convert as cv
from disco.client._client import _Settings, check_args, health_service, joined, unknown_health
from disco.client._transport import DEFAULT_TARGET, async_channel, spread_async
from disco.client.errors import (DeadlineExceeded, DiscoError, InvalidArgument, NotFound, ResourceExhausted,
                                 from_rpc_error, too_large)
from disco.client.types import Code, Factors, Images
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc


def stream_error(exc: grpc.RpcError, deadline: float, note: str = "") -> DiscoError:
    """The error a stream ended with. grpc.aio ends a stream whose deadline passes while it writes a request with
    an INTERNAL of its own making ("Internal error from Core", grpc/aio/_call.py): past the deadline, that is
    DEADLINE_EXCEEDED, as the sync client reports it."""
    if exc.code() == grpc.StatusCode.INTERNAL and time.monotonic() >= deadline:
        return DeadlineExceeded(f"DEADLINE_EXCEEDED: the stream's deadline passed (gRPC said {exc.details()!r})",
                                "DEADLINE_EXCEEDED")
    return from_rpc_error(exc, note=note)


class AsyncClient(_Settings):
    """A grpc.aio connection to a DisCo server; create it inside the event loop that uses it.

    >>> async with AsyncClient("localhost:50051") as c:
    ...     codes = await c.compress(images)
    ...     pixels = await c.decompress(codes)
    """

    def __init__(self, target: str = DEFAULT_TARGET, **settings: Any) -> None:
        super().__init__(target, **settings)
        self._channels = [async_channel(self._channel_config) for _ in range(self.connections)]
        self._stubs = [codec_pb2_grpc.CodecStub(ch) for ch in self._channels]
        self._turn = itertools.count()
        self._spreading = asyncio.Lock()  # one spread at a time
        self._respreading: asyncio.Task[None] | None = None  # the background re-spread, if one runs

    def _cancelled_by_close(self) -> bool:
        """Whether a CancelledError that reached an await on gRPC came from close(): grpc.aio ends the calls of a
        channel it closes with one, as though their tasks had been cancelled. A task that was itself asked to cancel
        has a count of it (Task.cancelling(), Python 3.11), and its cancellation goes on. Python 3.10 keeps no count:
        there every CancelledError once the client is closed is taken for the close's, so a task cancelled at the
        moment the client closes, before it ran again, ends with ClientClosed instead of being cancelled."""
        if not self._closed:
            return False
        cancelling = getattr(asyncio.current_task(), "cancelling", None)
        return cancelling is None or cancelling() == 0

    @contextlib.contextmanager
    def _closed_not_cancelled(self) -> Iterator[None]:
        """A CancelledError from close() raised as ClientClosed, as the sync client raises it: left as it was, the
        caller's task would end cancelled though nobody cancelled it (`except Exception` misses it, and a TaskGroup
        drops the call's outcome without a word)."""
        try:
            yield
        except asyncio.CancelledError:
            if not self._cancelled_by_close():
                raise
            raise self._closed_error() from None

    async def _call(self, method: str, request: Any, deadline: float, stub: Any = None) -> Any:
        """Client._call, awaited."""
        for attempt in itertools.count():
            if self._closed:  # as in Client._call
                raise self._closed_error()
            try:
                with self._closed_not_cancelled():
                    response = await getattr(stub or self._stub, method)(request, timeout=self._remaining(deadline),
                                                                        metadata=self._metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(self._pause_after(exc, attempt, deadline))
            else:
                self.retry_budget.succeeded()
                return response


    async def compress(self, images: cv.ImagesLike, *, model: str = "", version: str = "", quality: str = "",
                       batch: bool = False, timeout: float | None = None) -> list[Code]:
        """Images -> one Code per image (batch=True: one batch container per request)."""
        check_args(model=model, version=version, quality=quality, batch=batch)
        items = cv.image_list(images)  # the whole input checked before any request
        deadline, codes, sent = self._deadline(timeout), [], 0
        learned = await self._largest_image_bytes(deadline)  # once per client: the server's limits, its image sizes
        most = self._images_per_compress(batch, learned)
        for run in cv.chunks(items, self._limit, most):
            req = pb.CompressRequest(model=self._ref(model, version), images=cv.images_message(run),
                                     quality=quality, batch=batch)
            with cv.counted_from(sent):
                codes += cv.codes_from(await self._call("Compress", req, deadline))
            sent += len(run)
        return codes

    async def decompress(self, codes: cv.CodesLike, *, timeout: float | None = None) -> Images:
        """Codes (bytes or Code, single or batch) -> uint8 images (N, H, W, C)."""
        deadline, blobs, out = self._deadline(timeout), cv.code_list(codes), []
        learned = (await self._largest_image_bytes(deadline), self._limit)
        runs, done = self._decode_chunks(blobs, learned[0]), 0  # done: codes of the runs answered
        while runs:  # as Client.decompress: a too-large response learns the sizes again
            req = pb.DecompressRequest(codes=runs[0], format=pb.IMAGE_FORMAT_RAW)
            try:
                with cv.counted_from(done):
                    out.append(cv.images_from((await self._call("Decompress", req, deadline)).images))
            except (ResourceExhausted, InvalidArgument) as exc:
                if not too_large(exc):
                    raise
                fresh = (await self._largest_image_bytes(deadline, fresh=True), self._limit)
                if not self._grew(learned, fresh):
                    raise
                learned, runs = fresh, self._recut(runs, fresh[0])
                continue
            done += len(runs.pop(0))
        return joined(out)

    async def encode(self, images: cv.ImagesLike, *, model: str = "", version: str = "",
                     timeout: float | None = None) -> list[Factors]:
        """Images -> named factor values (posterior mean and std), one Factors per image."""
        check_args(model=model, version=version)
        items = cv.image_list(images)  # the whole input checked before any request
        deadline, out = self._deadline(timeout), []
        await self._largest_image_bytes(deadline)  # once per client: the server's limits
        sent = 0
        for run in cv.chunks(items, self._limit, self._images_per_encode):
            req = pb.EncodeRequest(model=self._ref(model, version), images=cv.images_message(run))
            with cv.counted_from(sent):
                out += cv.factors_from(await self._call("Encode", req, deadline))
            sent += len(run)
        return out

    async def traverse(self, source: cv.ImagesLike | bytes | Code, *, set: Mapping[str, float] | None = None,
                       shift: Mapping[str, float] | None = None, sweep: tuple[str, float, float, int] | None = None,
                       model: str = "", version: str = "", timeout: float | None = None) -> Images:
        """Client.traverse: image-major; many images cut into requests under the limits."""
        check_args(model=model, version=version)
        cv.traverse_edits(set, shift, sweep)  # bad arguments: a ValueError before any call
        source = cv.traverse_source(source)  # and so are bad images: the whole input checked at once
        deadline = self._deadline(timeout)
        learned = await self._largest_image_bytes(deadline)
        out, sent = [], 0
        for req in self._traverse_requests(source, model, version, set, shift, sweep, learned):
            with cv.counted_from(sent):
                out.append(cv.images_from((await self._call("Traverse", req, deadline)).images))
            sent += cv.sources_in(req)
        return joined(out)

    async def compress_stream(self, batches: Iterable[cv.ImagesLike] | AsyncIterable[cv.ImagesLike], *, model: str = "", version: str = "",
                              quality: str = "", batch: bool = False,
                              timeout: float | None = None) -> AsyncIterator[list[Code]]:
        """Client.compress_stream: each batch cut under the message limits, its codes yielded in order."""
        where = cv.caller_location()  # the caller's line: this generator runs in its first __anext__()
        check_args(model=model, version=version, quality=quality, batch=batch)
        cv.StreamRequests.check(batches, async_ok=True)
        deadline = self._deadline(timeout)  # one for the stream and the ListModels before it
        learned = await self._largest_image_bytes(deadline)  # once per client: the server's limits
        requests = cv.StreamRequests(batches, self._compress_requests(model, version, quality, batch, learned, where),
                                     "image")  # read lazily
        call = self._stub.CompressStream(requests.__aiter__(), timeout=self._remaining(deadline),
                                         metadata=self._metadata)
        try:
            async for resp in call:
                group = requests.answered(resp)
                if group is not None:
                    yield [code for r in group for code in cv.codes_from(r)]
        except grpc.RpcError as exc:  # about a batch that was sent: a bad later one ends the stream quietly
            error = self._closed_error() if self._cut(exc) else stream_error(exc, deadline, self._closed_hint(exc))
            raise requests.failed(error) from exc
        except asyncio.CancelledError:  # as in _call: close()'s, or the task's own
            if not self._cancelled_by_close():
                raise
            raise requests.failed(self._closed_error()) from None
        finally:  # a caller that stops early (aclose, break): gRPC would go on reading its batches till the deadline
            call.cancel()
        requests.raise_error()

    async def decompress_stream(self, batches: Iterable[cv.CodesLike] | AsyncIterable[cv.CodesLike], *,
                                timeout: float | None = None) -> AsyncIterator[Images]:
        """Client.decompress_stream: each batch cut into requests whose images fit a response, yielded in order."""
        cv.StreamRequests.check(batches, async_ok=True)
        deadline = self._deadline(timeout)
        learned = await self._largest_image_bytes(deadline)
        requests = cv.StreamRequests(batches, self._decompress_requests(learned), "code")
        call = self._stub.DecompressStream(requests.__aiter__(), timeout=self._remaining(deadline),
                                           metadata=self._metadata)
        try:
            async for resp in call:
                group = requests.answered(resp)
                if group is not None:
                    yield joined([cv.images_from(r.images) for r in group])
        except grpc.RpcError as exc:
            error = self._closed_error() if self._cut(exc) else stream_error(exc, deadline, self._closed_hint(exc))
            raise requests.failed(error) from exc
        except asyncio.CancelledError:
            if not self._cancelled_by_close():
                raise
            raise requests.failed(self._closed_error()) from None
        finally:
            call.cancel()
        requests.raise_error()

    async def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._call("ListModels", pb.ListModelsRequest(), self._deadline(timeout))).models)

    async def model(self, name: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        check_args(model=name, version=version)
        return await self._call("GetModel", pb.GetModelRequest(model=self._ref(name, version)),
                                self._deadline(timeout))

    async def health(self, model: str = "", *, timeout: float | None = None) -> bool:
        """Client.health, awaited: SERVING on every connection (the server's, or one model's)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline, request = self._deadline(timeout), health_pb2.HealthCheckRequest(service=health_service(model))
        try:
            answers = await asyncio.gather(*(self._call("Check", request, deadline, health_pb2_grpc.HealthStub(ch))
                                             for ch in self._channels))
        except NotFound as exc:
            raise unknown_health(model, exc) from exc
        return all(r.status == health_pb2.HealthCheckResponse.SERVING for r in answers)

    async def _largest_image_bytes(self, deadline: float, fresh: bool = False) -> int:
        known = self._image_bytes
        if known is not None and not fresh:
            return known
        return self._remember(await self._call("ListModels", pb.ListModelsRequest(), deadline))

    async def close(self) -> None:
        self._closed = True
        if self._respreading is not None:  # a re-spread that is running stops; what it opened is in the lists
            self._respreading.cancel()
            await asyncio.gather(self._respreading, return_exceptions=True)
        for ch in self._channels + self._retired.due(everything=True):
            await ch.close()

    async def spread(self) -> list[str]:
        """Client.spread, awaited; `async with` does it for a client with several connections."""
        self._check_open()
        async with self._spreading:
            with self._closed_not_cancelled():  # close() does not wait for a spread (Client.close() does)
                return await self._spread(retire=True)

    async def _spread(self, retire: bool) -> list[str]:
        def replaced(k: int, channel: grpc.aio.Channel) -> None:
            self._stubs[k] = codec_pb2_grpc.CodecStub(channel)

        return await spread_async(self._channels, self._channel_config, self._metadata, replaced,
                                  timeout=self._spread_s, retire=self._retire if retire else None)

    def _respread_soon(self) -> None:
        self._respreading = asyncio.get_running_loop().create_task(self._respread())

    async def _respread(self) -> None:
        try:
            async with self._spreading:
                if not self._closed:
                    for channel in self._retired.due():
                        await channel.close()
                    await self._spread(retire=True)
        finally:
            self._respread_at = time.monotonic() + self.respread_s

    async def __aenter__(self) -> AsyncClient:
        self._check_open()
        if self.connections > 1:
            async with self._spreading:
                with self._closed_not_cancelled():
                    await self._spread(retire=False)  # no call yet: a replaced connection closes at once
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
