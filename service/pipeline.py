"""The serving core without gRPC: images -> codes -> images for every model of a repository snapshot.

    Compress:   pixels (float NCHW) --encoder batcher--> mu --Codec.encode--> codes
    Decompress: codes --route by model id + keyed checksum--> Codec.decode --decoder batcher--> pixels
    Traverse:   images or a code -> latents -> named edits / sweep --decoder batcher--> pixels

A Pipeline is immutable in what it serves: hot reload builds a new one and swaps it in, and requests
already running finish on the old one. ONNX Runtime sessions are created on first use of a version
(old versions that only decode old codes cost nothing until asked for) and warmed at every batch size;
at most max_old_versions older versions (of all models together) stay loaded beside the latest ones, the
least recently used unloaded first, so memory stays bounded however many versions old codes name.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from disco.service import container
from disco.service.batcher import BatchConfig, Batcher, refuse_unless_room
from disco.service.cache import DecodeCache
from disco.service.errors import (OVER_MESSAGE_LIMIT, InvalidCode, InvalidInput, NotFound,
                                  OutOfMemory, UnservedChecksum, UnservedCode, VersionUnavailable, shown)
from disco.service.metrics import Metrics
from disco.service.repository import ModelEntry, Repository, RepositoryError
from disco.service.runtime import OnnxModel, RuntimeOptions, release_freed_memory
from disco.v1 import codec_pb2 as pb

log = logging.getLogger(__name__)
MAX_SWEEP_STEPS = 64
MAX_EDITS = 64  # per Traverse request: a model has a handful of factors, and one edit each says all
# A raw-image response's framing beside its pixels: once, the tensor's shape and the fields around it (generous);
# per image, a Decompress response's model reference (its ModelRef's size plus 3 bytes of field tag and length).
RESPONSE_BYTES = 1024


@dataclass(frozen=True)
class Edit:
    factor: str
    op: str  # "set" (absolute latent value) or "shift" (added to the encoded value)
    value: float


@dataclass(frozen=True)
class Sweep:
    factor: str
    start: float
    stop: float
    steps: int


@dataclass(frozen=True)
class Factors:
    names: list[str]
    dims: list[int]
    mean: np.ndarray  # (N, D)
    std: np.ndarray  # (N, D)


def ref_bytes(entries: Iterable[ModelEntry]) -> int:
    """The most bytes one image's model reference takes in a Decompress response, framing included."""
    return max((_ref_bytes(e.name, e.version) for e in entries), default=0)


@functools.lru_cache(maxsize=1024)
def _ref_bytes(name: str, version: str) -> int:  # once per version, not per request
    return pb.ModelRef(name=name, version=version).ByteSize() + 3


def check_response(images: int, shape: tuple[int, int, int], limit: int, per_image_extra: int = 0) -> None:
    """Refuse, before any compute, a request whose raw images (with per_image_extra bytes each: Decompress's model
    references) would not fit one response under the server's message limit: gRPC would fail the send after the
    work, as an error of its own."""
    h, w, c = shape
    per_image = h * w * c + per_image_extra
    if limit and images * per_image + RESPONSE_BYTES > limit:
        most = max(0, (limit - RESPONSE_BYTES) // per_image)
        raise InvalidInput(f"the response would carry {images} images of {h}x{w}x{c} (about {images * per_image} "
                           f"bytes), {OVER_MESSAGE_LIMIT} of {limit} bytes (--max-message-bytes): "
                           f"ask for at most {most} images per request")


def image_shape(entries: Iterable[ModelEntry]) -> tuple[int, int, int]:
    """The one image shape (H, W, C) of these models' codes: codes of several shapes cannot share a response."""
    shapes = {e.input_shape for e in entries}
    if len(shapes) > 1:
        raise InvalidCode(f"codes decode to different image shapes {sorted(shapes)}; send them in separate requests")
    return shapes.pop()


def batching_for(e: ModelEntry, server: BatchConfig) -> BatchConfig:
    """The server's batching settings with the model's serving.json over them."""
    s = e.serving
    return replace(server, max_batch=int(s.get("max_batch", server.max_batch)), max_queue=int(s.get("max_queue", server.max_queue)),
                   max_delay_s=s["max_delay_ms"] / 1000 if "max_delay_ms" in s else server.max_delay_s,
                   workers=int(s.get("batch_workers", server.workers)),
                   gather_turns=int(s.get("gather_turns", server.gather_turns)))


class Abandoned(VersionUnavailable):
    """A version's load stopped because the pipeline it was loading for closed (a shutdown, an abandoned reload)."""


class LoadFailed(Exception):
    """Versions that verified but could not be loaded and warmed (ONNX Runtime refused a file, or its shapes do not
    match model.json): identity -> (entry, why)."""

    def __init__(self, failed: dict[str, tuple[ModelEntry, str]]) -> None:
        super().__init__("; ".join(f"{e.name}/{e.version}: {why}" for e, why in failed.values()))
        self.failed = failed


class _Loaded:
    """One model version's sessions and its two batchers."""

    def __init__(self, e: ModelEntry, opts: RuntimeOptions, batching: BatchConfig, executor: Executor,
                 metrics: Metrics | None, held: Callable[[], int] = lambda: 0) -> None:
        self.identity = e.identity
        self.runtime = runtime = OnnxModel(e.path, opts, e.meta["files"])  # the bytes that were verified
        tag = f"{e.name}/{e.version}"
        # The runs close over the runtime, not self: no reference cycle, so an unloaded version is freed at once.
        self.encoder = Batcher(f"{tag}/encode", runtime.encode, batching, executor, metrics, held)
        self.decoder = Batcher(f"{tag}/decode", lambda z: (runtime.decode(z),), batching, executor, metrics)
        self.unloaded = False  # set when the pipeline lets go of it (its batchers then drain and close)

    def warm_up(self, e: ModelEntry, max_batch: int, abandoned: Callable[[], bool] = lambda: False) -> None:
        """Run every batch size the batcher can form, so no request pays for a first-run allocation, and check
        that the outputs have the shapes model.json promises (raises ValueError naming the first that does not).
        Stops with Abandoned between sizes once `abandoned()` says nobody will use it (a shutdown waits for it)."""
        h, w, c = e.input_shape
        z = e.codec.latent_dim
        for n in range(1, max_batch + 1):
            if abandoned():
                raise Abandoned(f"{e.name}/{e.version} was being warmed when its pipeline closed")
            mu, logvar = self.runtime.encode(np.zeros((n, c, h, w), np.float32))
            probs = self.runtime.decode(np.zeros((n, z), np.float32))
            for name, got, want in (("encoder mu", mu, (n, z)), ("encoder logvar", logvar, (n, z)),
                                    ("decoder probs", probs, (n, c, h, w))):
                if got.shape != want:
                    raise ValueError(f"{name} is {list(got.shape)} for a batch of {n}, but model.json (latent_dim "
                                     f"{z}, input {h}x{w}x{c}) needs {list(want)}")


class Pipeline:
    def __init__(self, repo: Repository, executor: Executor, opts: RuntimeOptions = RuntimeOptions(),
                 batching: BatchConfig = BatchConfig(), default_model: str = "", metrics: Metrics | None = None,
                 decode_cache_bytes: int = 0, max_old_versions: int = 4, loader: Executor | None = None) -> None:
        self.repo = repo
        self.default_model = default_model or repo.names()[0]
        if self.default_model not in repo.names():
            raise RepositoryError(f"default model {self.default_model!r} is not in the repository, which has {repo.names()}")
        self.executor = executor
        # Where versions are created and warmed: threads of their own, so that a load (a reload's new version, an old
        # one asked for) never holds the threads requests run on (a review: with --workers 1 and --max-batch 256,
        # requests of more than 4 images waited out a 14 s warm-up, past their deadlines)
        self.loader = loader or executor
        self.opts = opts
        self.batching = batching
        self.metrics = metrics
        self.max_old_versions = max_old_versions
        self._loaded: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()  # least recently used first
        self._loading: dict[tuple[str, str], asyncio.Future[_Loaded]] = {}
        self._unloading: set[asyncio.Task[None]] = set()
        self._handed: dict[tuple[str, str], _Loaded] = {}  # versions adopted by the pipeline that replaced this one
        self._successor: Pipeline | None = None  # that pipeline
        # Images of large requests on their way into each version's encoder queue (the servicer's room for them), by
        # the version's identity (a version replaced in place has a new queue, with room of its own): one count for
        # this pipeline and every one that takes over from it, as their versions do.
        self.reading: dict[str, int] = {}
        self._active = 0  # calls using this pipeline; a replaced pipeline closes when they are done
        # Versions that failed to load for a request, (name, version) -> (identity, why): refused at once from then
        # on (a client retrying UNAVAILABLE would otherwise load it again and again), until a reload or a retry.
        self._failed: dict[tuple[str, str], tuple[str, str]] = {}
        self._closing = False
        self._closed = False
        self.cache: DecodeCache[ModelEntry] | None = DecodeCache(decode_cache_bytes, metrics) if decode_cache_bytes else None

    @contextlib.contextmanager
    def in_use(self) -> Iterator[Pipeline]:
        """Held by the servicer for the whole of a call, so that close(drain=True) waits for it."""
        self._active += 1
        try:
            yield self
        finally:
            self._active -= 1

    # --- models ------------------------------------------------------------------------------------

    def entry(self, name: str = "", version: str = "") -> ModelEntry:
        return self.repo.get(name or self.default_model, version)

    def images_per_request(self, limit: int) -> int:
        """The most images a request may carry to any model: the server's limit, or a smaller queue that a model's
        serving.json sets (a request that could never fit its queue is refused)."""
        return min([limit] + [batching_for(e, self.batching).max_queue for e in self.repo.entries()])

    def latest(self) -> list[ModelEntry]:
        return [self.repo.get(n) for n in self.repo.names()]

    def loaded(self) -> list[str]:
        """The versions with sessions in memory, "name/version", least recently used first."""
        return [f"{n}/{v}" for n, v in self._loaded]

    async def load(self, e: ModelEntry, asked: bool = True) -> _Loaded:
        """Sessions of a version, created and warmed on first use (once, however many callers ask). The caller
        submits to the batchers it returns in the same step of the event loop: an unload drains what it queued.
        asked: a call asked for it (a failure is counted here), not warm_up (whose caller counts refusals)."""
        key = (e.name, e.version)
        while True:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)  # most recently used last
                return loaded
            loaded = self._handed.get(key)
            if loaded is not None and not loaded.unloaded:  # a call that outlived a reload: the same sessions
                if self._successor is not None and key in self._successor._loaded:
                    self._successor._loaded.move_to_end(key)  # in use, as the new pipeline's LRU order should know
                return loaded
            if self._closing and not self._active:
                raise RuntimeError("this pipeline has been replaced and closed")
            failed = self._failed.get(key)
            if failed is not None and failed[0] == e.identity:
                raise VersionUnavailable(f"model {e.name}/{e.version} could not be loaded: {failed[1]}")
            task = self._loading.get(key)
            if task is None:
                task = self._loading[key] = asyncio.ensure_future(self._build(e, asked))
            loaded = await asyncio.shield(task)
            if not loaded.unloaded:
                return loaded
            # Unloaded again before this caller resumed (other old versions were asked for meanwhile): load anew.

    async def _build(self, e: ModelEntry, asked: bool) -> _Loaded:
        key, room = (e.name, e.version), e.identity
        reading = self.reading  # the dict, not self: an adopted version keeps no pipeline

        def build() -> _Loaded:
            batching = batching_for(e, self.batching)
            m = _Loaded(e, self.opts, batching, self.executor, self.metrics, lambda: reading.get(room, 0))
            try:
                m.warm_up(e, batching.max_batch, lambda: self._closed)
            except BaseException:
                m.encoder.release_metrics()  # never started: nothing else would hand their series back
                m.decoder.release_metrics()
                raise
            log.info("loaded %s/%s (warmed batch sizes 1..%d)", e.name, e.version, batching.max_batch)
            return m

        try:
            loaded = await asyncio.get_running_loop().run_in_executor(self.loader, build)
        except Abandoned:  # not the version's fault: nothing to remember against it
            raise
        except MemoryError as exc:  # nor this: the caller hears RESOURCE_EXHAUSTED (not INTERNAL), and may retry
            raise OutOfMemory(f"out of memory loading model {e.name}/{e.version}: {exc or 'MemoryError'}; "
                              "try again later") from exc
        except Exception as exc:  # the caller hears why (UNAVAILABLE), not INTERNAL with a traceback
            why = (f"its files are gone ({exc.filename}): restore them, or remove its folder to withdraw it"
                   if isinstance(exc, FileNotFoundError)
                   else f"{type(exc).__name__}: {exc}"[:500])
            self._failed[key] = (e.identity, why)
            log.warning("could not load %s/%s: %s", e.name, e.version, why)  # once: it is not tried again
            if asked and self.metrics is not None:  # an old version a call asked for: no reload refused it
                self.metrics.load_failures.inc()
            raise VersionUnavailable(f"model {e.name}/{e.version} could not be loaded: {why}") from exc
        finally:
            self._loading.pop(key, None)
        if self.metrics is not None:
            self.metrics.loads.inc()
            self.metrics.loaded_versions.inc()
            if loaded.runtime.fell_back:
                self.metrics.provider_fallbacks.inc()
        if self._closed:  # the pipeline closed while this loaded (its callers had gone): nothing will use it
            await self._close_loaded(loaded, drain=False)
            return loaded
        self._loaded[key] = loaded
        self._unload_old(keep=key)
        return loaded

    def _unload_old(self, keep: tuple[str, str] | None = None) -> None:
        """Unload the least recently used older versions beyond max_old_versions (never a model's latest, nor
        the version just loaded for a request). They drain first: what was submitted to them still runs."""
        latest = {(e.name, e.version) for e in self.latest()}
        old = [k for k in self._loaded if k not in latest]  # least recently used first
        for key in [k for k in old if k != keep][: max(0, len(old) - self.max_old_versions)]:
            m = self._loaded.pop(key)
            m.unloaded = True
            task = asyncio.create_task(self._close_loaded(m, drain=True))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)
            if self.metrics is not None:
                self.metrics.unloads.inc()
            log.info("unloading %s/%s: the least recently used of %d older versions loaded, %d kept "
                     "(--max-old-versions)", key[0], key[1], len(old), self.max_old_versions)

    async def _close_loaded(self, m: _Loaded, drain: bool) -> None:
        m.unloaded = True
        try:
            await m.encoder.close(drain)
            await m.decoder.close(drain)
        finally:  # also when a shutdown cancels the drain, maybe before the decoder's close began
            m.encoder.release_metrics()
            m.decoder.release_metrics()
            if self.metrics is not None:
                self.metrics.loaded_versions.dec()
        del m  # the last reference to its sessions: what they held can go back to the OS
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, release_freed_memory)
        except RuntimeError:  # the executor has shut down (the server is stopping): a millisecond or two here
            release_freed_memory()

    def adopt(self, old: Pipeline) -> list[str]:
        """Take over the versions the pipeline this one replaces has loaded that did not change (same identity):
        a reload then loads and warms only what changed. Only what this pipeline keeps is taken (its latest
        versions, and the most recently used older ones up to max_old_versions), so that nothing the old pipeline
        still serves from is unloaded before the swap. Returns them, "name/version". The count of images on their
        way in is shared from now on: the versions taken keep counting in it."""
        self.reading = old.reading
        unchanged = []
        for key, m in old._loaded.items():  # least recently used first
            try:
                e = self.repo.get(*key)
            except NotFound:
                continue  # withdrawn from the repository
            if m.identity == e.identity and key not in self._loaded:
                unchanged.append(key)
        latest = {(e.name, e.version) for e in self.latest()}
        older = [k for k in unchanged if k not in latest]
        keep = latest | set(older[len(older) - self.max_old_versions:] if self.max_old_versions else [])
        taken = [k for k in unchanged if k in keep]
        for key in taken:
            self._loaded[key] = old._handed[key] = old._loaded.pop(key)
        old._successor = self
        return [f"{n}/{v}" for n, v in taken]

    def forget_failed_loads(self) -> None:
        """Let versions that failed to load for requests be tried again (a reload, or SIGHUP: an operator asking)."""
        self._failed.clear()

    def take_loaded(self, failed: Pipeline) -> None:
        """Take over what an attempt that failed to warm up loaded of the versions this one serves unchanged (its
        other versions did load): a reload or start that refuses a version loads each of the others once."""
        self.reading = failed.reading  # as in adopt()
        for key, m in list(failed._loaded.items()):
            try:
                e = self.repo.get(*key)
            except NotFound:
                continue
            if m.identity == e.identity and key not in self._loaded:
                self._loaded[key] = failed._loaded.pop(key)

    def hand_back(self, old: Pipeline) -> None:
        """Undo adopt(): this pipeline will not serve (its warm-up failed), the old one goes on with its versions."""
        for key in list(old._handed):
            m = self._loaded.pop(key, None)
            if m is not None and not m.unloaded:
                old._loaded[key] = m
        old._handed.clear()
        old._successor = None
        old._unload_old()

    async def warm_up(self, also: Collection[str] = ()) -> None:
        """Load the latest version of every model (older versions load when a code asks for them), and the versions
        whose identities are in `also`. Raises LoadFailed naming each version that did not load, after trying them all."""
        failed = {}
        latest = self.latest()
        for e in latest + [e for e in self.repo.entries() if e.identity in also and e not in latest]:
            try:
                await self.load(e, asked=False)
            except Abandoned:  # a shutdown: not a reason to refuse it
                raise
            except MemoryError as exc:  # the machine's state, not the version's: not a reason to refuse it
                raise MemoryError(f"out of memory loading {e.name}/{e.version}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raised: that version is refused
                cause = exc.__cause__ if isinstance(exc, VersionUnavailable) and exc.__cause__ else exc
                failed[e.identity] = (e, f"{type(cause).__name__}: {cause}"[:1000])
        if failed:
            raise LoadFailed(failed)

    async def close(self, drain: bool = True) -> None:
        """Stop the batchers; with drain, once every call that uses this pipeline has finished."""
        self._closing = True
        while drain and self._active:
            await asyncio.sleep(0.005)
        self._closed = True  # from here a load still running closes what it built
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        while self._loaded:  # one at a time, each freed (no reference left here) before the next closes
            await self._close_loaded(self._loaded.popitem(last=False)[1], drain)
        await asyncio.gather(*self._unloading, return_exceptions=True)
        self._handed.clear()  # the sessions handed on are the new pipeline's to free
        self._successor = None
        if self.cache is not None:
            self.cache.clear()  # the new snapshot's cache reports the bytes from here on

    # --- requests ----------------------------------------------------------------------------------

    async def compress(self, e: ModelEntry, x: np.ndarray, quality: str = "", batch: bool = False,
                       deadline: float | None = None) -> list[bytes]:
        """x float32 (N, C, H, W) in [0, 1] -> one code per image, or one batch container."""
        q = e.codec.quality(quality)  # a bad quality fails before any compute
        mu, _ = await self._encode(e, x, deadline)
        if batch:
            return [e.codec.encode_batch(mu, q.name)]
        return e.codec.encode(mu, q.name)

    def check_room(self, e: ModelEntry, n: int) -> None:
        """Raise QueueFull now if e's encoder queue has no room for n images beside those of other large requests on
        their way in (`reading`), before these are converted. A version not loaded has an empty queue: nothing is
        loaded for the check, but a request its serving.json's queue could never hold is refused."""
        key = (e.name, e.version)
        loaded = self._loaded.get(key) or self._handed.get(key)
        if loaded is not None and not loaded.unloaded:
            loaded.encoder.check_room(n)
            return
        refuse_unless_room(f"{e.name}/{e.version}/encode", n, batching_for(e, self.batching).max_queue, 0,
                           self.reading.get(e.identity, 0))

    async def _encode(self, e: ModelEntry, x: np.ndarray, deadline: float | None) -> tuple[np.ndarray, ...]:
        """Images -> (mu, logvar) through the version's encoder batcher."""
        return await (await self.load(e)).encoder.submit(x, deadline)

    async def encode(self, e: ModelEntry, x: np.ndarray, deadline: float | None = None) -> Factors:
        mu, logvar = await self._encode(e, x, deadline)
        dims = [int(f["dim"]) for f in e.factors]
        return Factors([f["name"] for f in e.factors], dims, mu[:, dims], np.exp(0.5 * logvar[:, dims]))

    def route(self, code: bytes, index: int) -> ModelEntry:
        """The model version a code belongs to: its model id narrows, its keyed checksum decides."""
        try:
            header = container.parse(code)
        except InvalidCode as exc:
            raise type(exc)(f"code {index}: {exc}") from exc
        candidates = self.repo.by_model_id(header.model_id)
        verified: dict[bytes, ModelEntry] = {}  # fingerprint -> the newest version of it (by_model_id's order)
        for e in candidates:
            if e.fingerprint not in verified and container.verify(code, e.fingerprint):
                verified[e.fingerprint] = e
        if len(verified) == 1:
            return next(iter(verified.values()))
        if verified:
            return self._disambiguate(code, index, header.model_id, list(verified.values()))
        if not candidates:
            have = ", ".join(f"{e.name}/{e.version} (0x{e.fingerprint[0]:02x})" for e in self.repo.entries())
            raise UnservedCode(f"code {index} names model id 0x{header.model_id:02x}, which this server lacks (or the code "
                              f"is corrupted); it has {have}")
        names = ", ".join(f"{e.name}/{e.version}" for e in candidates)
        raise UnservedChecksum(f"code {index}: checksum mismatch under model id 0x{header.model_id:02x} ({names}): "
                          "the code is corrupted, truncated or was made by another model")

    @staticmethod
    def _disambiguate(code: bytes, index: int, model_id: int, verified: list[ModelEntry]) -> ModelEntry:
        """Of versions whose model ids collide (1 byte: about 1 pair in 256), a code passes the 16-bit checksum of
        one it was not made by about once in 65,536: it belongs to the one whose codec decodes it canonically. When
        several do, which made it cannot be told: refused, never decoded by a guess."""
        decodes = []
        for e in verified:
            try:
                if container.is_batch(code):
                    e.codec.batch_symbols(code)
                else:
                    e.codec.symbols([code], verified=True)
            except InvalidCode:
                continue
            decodes.append(e)
        if len(decodes) == 1:
            return decodes[0]
        if not decodes:  # its decode names why, under the first candidate (by name, each name's newest first)
            return verified[0]
        names = " and ".join(f"{e.name}/{e.version}" for e in decodes)
        raise InvalidCode(f"code {index} passes the checksums of {names}, whose model ids collide (0x{model_id:02x}), "
                          "and decodes under each: which made it cannot be told; decode it where only one is served")

    def latents(self, codes: list[bytes], numbers: list[int] | None = None,
                check: Callable[[list[ModelEntry]], None] | None = None) -> tuple[list[np.ndarray], list[ModelEntry]]:
        """Codes (single or batch, of any models) -> latents per code and each code's model. An error names a
        code by its position in the request: numbers[i] for codes[i] when given (a subset of the request).
        `check` sees each code's model once every code is verified, before any is entropy-decoded."""
        if not codes:
            raise InvalidCode("no codes given, expected at least one")
        at = numbers or range(len(codes))
        entries = [self.route(c, at[i]) for i, c in enumerate(codes)]  # parses and verifies every code
        if check is not None:
            check(entries)
        out: list[np.ndarray] = [np.empty(0)] * len(codes)
        singles: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, (code, e) in enumerate(zip(codes, entries)):
            if not container.is_batch(code):
                singles[(e.name, e.version)].append(i)  # decoded together below
                continue
            try:
                symbols, q = e.codec.batch_symbols(code)
            except InvalidCode as exc:
                raise type(exc)(f"code {at[i]} (model {e.name}/{e.version}): {exc}") from exc
            out[i] = e.codec.dequantize(symbols, q)
        for rows in singles.values():
            e = entries[rows[0]]
            z = e.codec.decode([codes[i] for i in rows], verified=True,
                               label=lambda k, rows=rows, e=e: f"code {at[rows[k]]} (model {e.name}/{e.version}): ")
            for k, i in enumerate(rows):
                out[i] = z[k : k + 1]
        return out, entries

    async def decompress(self, codes: list[bytes], deadline: float | None = None,
                         max_response_bytes: int = 0) -> tuple[np.ndarray, list[ModelEntry]]:
        """Codes -> probabilities (N, C, H, W) and each image's model; a batch container expands in place.
        With a decode cache, single codes already decoded are answered from it and only the others decode.
        With max_response_bytes, images that would not fit one response are refused before they decode."""
        if self.cache is None or not codes or any(container.is_batch(c) for c in codes):
            return await self._decompress(codes, deadline, None, max_response_bytes)
        cache = self.cache
        found = cache.lookup(codes)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            probs, entries = await self._decompress([codes[i] for i in missing], deadline, missing, max_response_bytes,
                                                    len(codes) - len(missing))
            for row, i in enumerate(missing):  # single codes: one image each, in order
                found[i] = (probs[row : row + 1], entries[row])
                cache.put(codes[i], probs[row : row + 1], entries[row])
            if len(missing) == len(codes):  # nothing was cached: the decode's own arrays, no copy
                return probs, entries
        hits = [f for f in found if f is not None]
        if not missing:  # all answered from the cache: bounded here (a miss is bounded before its decode)
            check_response(len(hits), image_shape(e for _, e in hits), max_response_bytes, ref_bytes(e for _, e in hits))
        if len(hits) == 1:
            return hits[0][0], [hits[0][1]]
        image_shape(e for _, e in hits)
        return np.concatenate([f[0] for f in hits]), [f[1] for f in hits]

    async def _decompress(self, codes: list[bytes], deadline: float | None, numbers: list[int] | None = None,
                          max_response_bytes: int = 0, cached: int = 0) -> tuple[np.ndarray, list[ModelEntry]]:
        def fits(entries: list[ModelEntry]) -> None:  # before the entropy decoding
            versions = {id(e): e for e in entries}.values()  # entries repeat the same few objects
            shape = image_shape(versions)
            # `cached`: the request's cache hits, answered beside these (a different shape fails the request anyway)
            n = sum(container.count(c) if container.is_batch(c) else 1 for c in codes) + cached
            check_response(n, shape, max_response_bytes, ref_bytes(versions))

        if len(codes) <= 8 and not any(container.is_batch(c) for c in codes):
            latents, entries = self.latents(codes, numbers, fits)  # a few single codes: cheaper than a thread hop
        else:
            latents, entries = await asyncio.get_running_loop().run_in_executor(self.executor, self.latents, codes,
                                                                                numbers, fits)
        versions = {id(e): e for e in entries}.values()
        h, w, c = image_shape(versions)
        per_image = [e for e, z in zip(entries, latents) for _ in range(len(z))]
        z_all = latents[0] if len(latents) == 1 else np.concatenate(latents)
        if len(versions) == 1:  # the common case: one model, rows already in order
            (probs,) = await (await self.load(entries[0])).decoder.submit(z_all, deadline)
            return probs, per_image
        out = np.empty((len(z_all), c, h, w), dtype=np.float32)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for row, e in enumerate(per_image):
            groups[(e.name, e.version)].append(row)

        async def run(rows: list[int]) -> None:
            (probs,) = await (await self.load(per_image[rows[0]])).decoder.submit(z_all[rows], deadline)
            out[rows] = probs

        await asyncio.gather(*(run(rows) for rows in groups.values()))
        return out, per_image

    async def traverse(self, e: ModelEntry, z: np.ndarray, edits: list[Edit], sweep: Sweep | None,
                       deadline: float | None = None) -> np.ndarray:
        """Latents (N, z) -> edited (and swept) images: (N, C, H, W), or (N * steps, ...) image-major.

        Values are in latent units and must lie in the factor's range on the training data (model.json
        factors[].min/max); values outside are refused rather than clamped, so a caller never gets an
        image of a value they did not ask for. A shift, relative to the encoded value, may be at most the
        range's width either way.
        """
        z = apply_edits(e, z, edits, sweep)
        (probs,) = await (await self.load(e)).decoder.submit(z, deadline)
        return probs

    async def encode_latents(self, e: ModelEntry, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        return (await self._encode(e, x, deadline))[0]


def check_sweep_steps(sweep: Sweep) -> None:
    if not 1 <= sweep.steps <= MAX_SWEEP_STEPS:
        raise InvalidInput(f"sweep steps {sweep.steps} is outside 1..{MAX_SWEEP_STEPS}")
    start, stop = np.float32(sweep.start), np.float32(sweep.stop)  # not finite: refused by name later
    if sweep.steps == 1 and np.isfinite(start) and np.isfinite(stop) and start != stop:
        raise InvalidInput(f"a sweep of 1 step yields its start only, but stop {sweep.stop:g} differs from start "
                           f"{sweep.start:g}: give 2 or more steps, or stop = start")


def _range(f: dict[str, Any]) -> str:
    return f"[{np.float32(f['min'])}, {np.float32(f['max'])}]"


def check_edits(e: ModelEntry, edits: list[Edit], sweep: Sweep | None) -> None:
    """apply_edits' checks (factor names, ranges, repeats) alone, before any compute: on one row of zeros, which
    they do not read."""
    apply_edits(e, np.zeros((1, e.codec.latent_dim), np.float32), edits, sweep)


def apply_edits(e: ModelEntry, z: np.ndarray, edits: list[Edit], sweep: Sweep | None) -> np.ndarray:
    by_name = {f["name"]: f for f in e.factors}

    def factor(name: str, value: float | None = None, what: str = "value") -> int:
        if name not in by_name:
            raise InvalidInput(f"factor {shown(name)} is not a factor of {e.name}/{e.version}, which has {sorted(by_name)}")
        f = by_name[name]
        # Compared in float32, the precision the proto carries the values (and the range) in, and shown so: as many
        # digits as tell a value from the bound it passes by one float32 step
        if value is not None and not math.isfinite(value):
            raise InvalidInput(f"{what} {value} for factor {name!r} is not a finite number, expected one in its range "
                               f"{_range(f)}")
        if value is not None and not (np.float32(f["min"]) <= np.float32(value) <= np.float32(f["max"])):
            raise InvalidInput(f"{what} {np.float32(value)} for factor {name!r} is outside its range {_range(f)}")
        return int(f["dim"])

    edited = [ed.factor for ed in edits] + ([sweep.factor] if sweep is not None else [])
    twice = sorted({name for name in edited if edited.count(name) > 1})
    if twice:  # shifts would add up past the range, and a later set or the sweep would undo an edit
        raise InvalidInput(f"factor {shown(twice[0])} is edited {edited.count(twice[0])} times; give each factor one "
                           "edit (set or shift) or the sweep")
    z = z.astype(np.float32).copy()
    for ed in edits:
        if ed.op == "set":
            z[:, factor(ed.factor, ed.value)] = ed.value
        elif ed.op == "shift":
            d, f = factor(ed.factor), by_name[ed.factor]
            width = np.float32(f["max"]) - np.float32(f["min"])
            if not math.isfinite(ed.value):
                raise InvalidInput(f"shift {ed.value} of factor {ed.factor!r} is not a finite number, expected one "
                                   f"of at most the width of its range {_range(f)} ({width}) either way")
            if not abs(np.float32(ed.value)) <= width:
                raise InvalidInput(f"shift {np.float32(ed.value)} of factor {ed.factor!r} is larger than its whole range "
                                   f"{_range(f)} (width {width})")
            z[:, d] += ed.value
        else:
            raise InvalidInput(f"edit of factor {shown(ed.factor)} has no operation: set 'set' or 'shift'")
    if sweep is not None:
        check_sweep_steps(sweep)
        d = factor(sweep.factor, sweep.start, "sweep start")
        factor(sweep.factor, sweep.stop, "sweep stop")
        z = np.repeat(z, sweep.steps, axis=0)  # image-major: all steps of image 0, then image 1, ...
        z[:, d] = np.tile(np.linspace(sweep.start, sweep.stop, sweep.steps, dtype=np.float32), len(z) // sweep.steps)
    return z
