"""`disco serve`: the grpc.aio server with health, reflection, metrics, hot reload and graceful drain.

create_server(cfg) builds and starts a server (tests use port 0); serve(cfg) runs one until SIGTERM.

  start: load + verify repository -> NOT_SERVING -> warm every batch size -> SERVING
  SIGHUP or poll: load + verify + warm a new snapshot -> swap atomically (old one drains, then closes)
  SIGTERM: NOT_SERVING -> (serve on for drain_delay_s) -> stop accepting -> in-flight calls finish within
           grace_s -> exit
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from disco.service.batcher import BatchConfig
from disco.service.config import HEARTBEAT_S, ServeConfig, available_cores
from disco.service.health import Health, Probes
from disco.service.metrics import Metrics
from disco.service.pipeline import LoadFailed, Pipeline
from disco.service.repository import EMBEDDED, EMBEDDED_DEFAULT, Repository, RepositoryError, bound_text
from disco.service.runtime import RuntimeOptions
from disco.service.security import TokenAuth, server_credentials
from disco.service.servicer import CodecServicer, add_to_server, check_message_limit
from disco.v1 import codec_pb2

log = logging.getLogger("disco.serve")
SERVICE = codec_pb2.DESCRIPTOR.services_by_name["Codec"].full_name  # "disco.v1.Codec"
_UNLOADABLE = "could not be loaded and warmed"  # how a refusal of a version that verified but did not load begins
# How long after a reload for a code of a version not served here (Running.refresh) such a code waits for the next
# poll instead: a client retrying a corrupted code (UNAVAILABLE is retried; this is not) cannot keep the files read
_REFRESH_S = 5.0


def host_port(host: str, port: int) -> str:
    """An address gRPC binds: a bare IPv6 host ("::", "::1") in brackets, or gRPC reads its last group as the port."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def port_taken(host: str, port: int) -> OSError | None:
    """Why host:port cannot be bound without SO_REUSEPORT, as no process of --processes would bind it (EADDRINUSE:
    another server listens there, which they would silently share the port with), or None. Every address the host
    resolves to is tried, as gRPC binds them all."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is fine
                s.bind(address)
    except OSError as exc:
        return exc
    return None


def _root(cfg: ServeConfig) -> Path:
    return Path(cfg.repository) if cfg.repository else EMBEDDED


def _snapshot(repo: Repository) -> set[str]:
    """What a reload compares: every version's folder, model.json (each file's sha256, factors, description) and
    serving settings, so that a version whose encoder or metadata changed in place is reloaded too."""
    return {e.identity for e in repo.entries()}


def warn_collisions(repo: Repository, before: Repository | None = None) -> None:
    """Log versions whose 1-byte model ids collide (new ones only, on a reload): about one code in 65,536 of
    theirs passes both checksums, and is refused when both codecs decode it (Pipeline.route)."""
    for group in repo.collisions:
        if before is None or group not in before.collisions:
            log.warning("%s share a model id: a code that passes the checksums of both and decodes under both (about "
                        "1 in 65,536) is refused as ambiguous; re-export one (`disco export` picks an id its repository has free)",
                        " and ".join(group))


@dataclass
class Running:
    cfg: ServeConfig
    server: grpc.aio.Server
    port: int
    health: Health
    servicer: CodecServicer
    executor: ThreadPoolExecutor
    metrics: Metrics
    loader: ThreadPoolExecutor  # versions are created and warmed here, not on the threads requests run on
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: list[asyncio.Task[object]] = field(default_factory=list)
    _refusals: dict[str, str] = field(default_factory=dict)  # versions refused at the last load: folder -> why
    _unloadable: dict[str, str] = field(default_factory=dict)  # versions that verified but did not load: identity -> why
    _failure: str = ""  # the last reload refusal's message, while it lasts
    _health_models: set[str] = field(default_factory=set)  # the per-model health names reported so far
    _serving: bool = False  # what set_health last reported
    _stopping: bool = False  # stop() began: no reload starts any more
    _retiring: set[Pipeline] = field(default_factory=set)  # old snapshots draining after a reload (stop() closes them)
    health_server: grpc.aio.Server | None = None  # --health-port: health alone, in plaintext (stopped last)
    _started: set[grpc.aio.Server] = field(default_factory=set)  # the gRPC servers started (see _stop_server)
    _refreshing: asyncio.Future[bool] | None = None  # refresh()'s reload, while it runs
    _refreshed: float = -math.inf  # when refresh() last began one (time.monotonic)

    async def set_health(self, serving: bool) -> None:
        """The server ("" and disco.v1.Codec) and each model ("disco.v1.Codec/<model>", for a probe that waits
        for one model): all SERVING or all NOT_SERVING. A model gone from the repository turns NOT_SERVING."""
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        models = {f"{SERVICE}/{n}" for n in self.servicer.pipeline.repo.names()}
        for name in sorted(self._health_models - models):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._health_models = models
        for name in ("", SERVICE, *sorted(models)):
            await self.health.set(name, status)

    async def reload(self, retry: bool = False, for_code: bool = False) -> bool:
        """Load, verify and warm the repository as it is now; swap it in if it changed. Never fails a request.
        retry (SIGHUP: an operator asking) also tries again the versions that verified but did not load, which
        polls leave refused until their files change: a failure outside the files (a GPU not ready) may be over.
        Each is loaded before the swap, latest or not, so that none serves without having loaded."""
        async with self._reload_lock:
            if self._stopping:  # stop() closes the pipeline (holding this lock): a new one would be left open
                return False
            # Versions that failed to load for requests are tried again from here (their cause, a file's mode, may
            # be gone), once a poll or SIGHUP, not on every retry of a client, nor on a read for a client's code
            if not for_code:
                self.servicer.pipeline.forget_failed_loads()
            retrying = set(self._unloadable) if retry else set()
            if retrying:
                log.info("retrying %d version(s) that did not load before", len(retrying))
                self._unloadable.clear()
                self._refusals = {k: v for k, v in self._refusals.items() if not v.startswith(_UNLOADABLE)}
            try:
                return await self._reload(retrying)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old snapshot keeps serving
                if str(exc) != self._failure:  # counted and logged once, not on every poll while it lasts
                    self.metrics.load_failures.inc()
                    log.error("reload refused, still serving the old snapshot: %s", exc)
                self._failure = str(exc)
                return False

    async def _reload(self, retrying: set[str]) -> bool:
        """One reload attempt; raises what refuses it. A success clears the memory of the last failure."""
        changed = await self._load_and_swap(retrying)
        self._failure = ""
        return changed

    async def _load_and_swap(self, retrying: set[str]) -> bool:
        loop = asyncio.get_running_loop()
        old = self.servicer.pipeline
        try:
            read = await loop.run_in_executor(self.loader, Repository.load, _root(self.cfg), old.repo, self._refusals)
        except RepositoryError as exc:
            if exc.refused:  # logged once: the next poll that meets them says nothing more (a bad serving.json, read
                self._count_refusals(exc.refused)  # before any version, knows of none: what is known stays)
            raise
        attempt: Pipeline | None = None  # the pipeline being tried, until it is swapped in
        tried: list[Pipeline] = []  # attempts that failed to warm up, closed once the next has taken what they loaded
        try:
            for _ in range(len(read.entries()) + len(old.repo.entries()) + 1):  # each pass refuses one more, or swaps
                repo = self.loadable(read, old.repo)
                if _snapshot(repo) == _snapshot(old.repo):
                    return False
                if old.default_model not in repo.names():
                    raise ValueError(f"the new snapshot lacks the default model {old.default_model!r}")
                check_message_limit(repo, self.cfg)  # what the start refuses: a model this limit cannot serve
                # The default stays the one resolved at start, so unnamed requests never change model on a reload.
                new = build_pipeline(replace(self.cfg, default_model=old.default_model), repo, self.executor,
                                     self.metrics, self.loader)
                kept = new.adopt(old)  # unchanged versions keep their warm sessions; only what changed loads
                if attempt is not None:
                    new.take_loaded(attempt)  # nor what the last attempt loaded
                    tried.append(attempt)
                attempt = new  # no await between adopt() and the try below, which hands back whatever happens
                try:
                    await new.warm_up(also=retrying)
                except BaseException as exc:  # a failed load, or a shutdown cancelling the reload: the old keeps its own
                    new.hand_back(old)
                    if not isinstance(exc, LoadFailed):
                        raise
                    self.refuse(exc)
                    continue
                attempt = None  # it serves
                break
            else:
                raise RuntimeError("reload refused: versions kept failing to load")  # never: each pass refuses one
        finally:
            for p in tried + ([attempt] if attempt is not None else []):
                await p.close(drain=False)
        self.servicer.pipeline = new  # atomic: calls that already hold the old pipeline finish on it
        for e in repo.entries():
            was = old.repo.find(e.name, e.version)
            if was is not None and was.fingerprint != e.fingerprint:
                log.warning("%s/%s was replaced in place by a different decoder or codec tables (fingerprint %s, was "
                            "%s): the codes the old one made no longer decode; ship a new version instead", e.name,
                            e.version, e.fingerprint.hex()[:12], was.fingerprint.hex()[:12])
        warn_collisions(repo, old.repo)
        await self.set_health(self._serving)  # models added or removed
        self.metrics.reloads.inc()
        withdrawn = {(e.name, e.version) for e in old.repo.entries()} - {(e.name, e.version) for e in repo.entries()}
        for gone in withdrawn:  # no longer reported
            self.metrics.model.remove(*gone)
        for e in repo.entries():
            self.metrics.model.labels(e.name, e.version).info({"fingerprint": e.fingerprint.hex()})
        log.info("reloaded: now serving %s (kept loaded: %s)", ", ".join(f"{e.name}/{e.version}" for e in repo.entries()),
                 ", ".join(kept) or "none")
        self._tasks = [t for t in self._tasks if not t.done()]
        self._retiring.add(old)
        if not self._stopping:  # else stop(), waiting for this reload to end, closes it
            self._tasks.append(asyncio.create_task(self._retire(old, withdrawn)))
        return True

    async def refresh(self) -> bool:
        """A reload now, for a call that met a code of a version not served here (CodecServicer._handle): True if it
        swapped in a new snapshot. Calls that meet such codes meanwhile wait for the same reload; after one, the
        next waits _REFRESH_S, so that corrupted codes cannot keep the repository being read. Only where the server
        polls (--reload-interval-s): at 0 the operator reloads, with SIGHUP, when a version is in place (a review: a
        client's junk code swapped in a version copied in for a later SIGHUP). Not for the embedded models, which do
        not change."""
        if not (self.cfg.repository and self.cfg.reload_interval_s) or self._stopping or not self._serving:
            return False  # nor while the start warms: polls and SIGHUP wait for it too, and a swap would close its pipeline
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._refreshed < _REFRESH_S:
                return False
            self._refreshed = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._read_for_code())
            self._tasks = [t for t in self._tasks if not t.done()]  # a reload that changes nothing leaves no trace
            self._tasks.append(self._refreshing)  # stop() cancels it with the others
        try:
            return await asyncio.shield(self._refreshing)
        except asyncio.CancelledError:
            if self._refreshing.cancelled():  # stop() ended the reload; this call's own cancellation goes on up
                return False
            raise

    def reloading(self) -> bool:
        return self._reload_lock.locked()

    def draining(self) -> bool:
        return self._stopping

    async def _read_for_code(self) -> bool:
        """refresh()'s reload. One that brought a new snapshot asks the --processes parent to have every process
        reload (it forwards SIGHUP to each), so that the processes sharing the port do not serve different latest
        versions until their next polls (a review: up to --reload-interval-s, an hour there)."""
        swapped = await self.reload(for_code=True)
        if swapped and self.cfg.parent_pid:
            with contextlib.suppress(OSError):  # a parent gone: this process drains by itself (_watch_parent)
                os.kill(self.cfg.parent_pid, signal.SIGHUP)
        return swapped

    def reload_soon(self) -> None:
        """A reload in a task of its own (SIGHUP). The tasks that ended are let go: most reloads change nothing."""
        if self._stopping:  # a SIGHUP while draining: stop() has cancelled the tasks, and the executor is going
            log.info("SIGHUP while draining: not reloading")
            return
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self.reload(retry=True)))

    async def _retire(self, old: Pipeline, withdrawn: set[tuple[str, str]]) -> None:
        """The old snapshot drains and closes; then the series of the versions it alone served go."""
        await old.close(drain=True)
        self._retiring.discard(old)  # a close cut short (stop() cancelled this task) is stop()'s to finish
        serving = {(e.name, e.version) for e in self.servicer.pipeline.repo.entries()}  # one may be back since
        for name, version in withdrawn - serving:
            self.metrics.version_withdrawn(name, version)

    def refuse(self, exc: LoadFailed) -> None:
        """Remember versions that verified but did not load, by identity: the repository is served without them
        until their files change, so a poll neither loads them again nor refuses the versions beside them."""
        for ident, (e, why) in exc.failed.items():
            log.error("refusing model %s: it verified, but could not be loaded and warmed: %s", e.path, why)
            self._unloadable[ident] = f"{_UNLOADABLE}: {why}"

    def loadable(self, repo: Repository, served: Repository | None) -> Repository:
        """repo less the versions that did not load (each replaced by the served one of its name and version,
        if any); counts each refusal once. Raises RepositoryError when nothing is left."""
        # Forget what is gone from disk and from the snapshot served (a served version stands in for a refused
        # one of its name and version, and may be refused too: forgetting it would try it again, pass after pass).
        by_key = {(k.name, k.version): k for k in (served.entries() if served else [])}
        present = {e.identity for e in [*repo.entries(), *by_key.values()]}
        self._unloadable = {k: why for k, why in self._unloadable.items() if k in present}
        entries, refused = [], dict(repo.refused)
        for e in repo.entries():
            why = self._unloadable.get(e.identity)
            if why is None:
                entries.append(e)
                continue
            refused[str(e.path)] = why
            kept = by_key.get((e.name, e.version))
            if kept is not None and kept.identity not in self._unloadable:
                entries.append(kept)
        self._count_refusals(refused)
        if not entries:
            raise RepositoryError(f"no model under {_root(self.cfg)} could be loaded: {refused}")
        return Repository(entries, refused) if len(entries) != len(repo.entries()) or refused != repo.refused else repo

    def _count_refusals(self, refused: dict[str, str]) -> None:
        """Count each refusal once, not on every poll while it lasts (a version fixed and broken again counts again)."""
        new = [folder for folder, why in refused.items() if self._refusals.get(folder) != why]
        if new:
            self.metrics.load_failures.inc(len(new))
        self._refusals = refused

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            await self.reload()

    def refuse_reloads(self) -> None:
        """From now on no reload starts (a SIGTERM came: the drain is near)."""
        self._stopping = True

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish within grace, then close."""
        self._stopping = True
        await self.set_health(False)
        await self.health.drain()  # every Watch ends: an open one would hold the drain for all of the grace
        for t in self._tasks:
            t.cancel()
        await self._stop_server(self.server, grace)
        async with self._reload_lock:  # a reload called directly (not a task: not cancelled) ends first
            await self.servicer.pipeline.close(drain=False)
            for old in list(self._retiring):  # snapshots that a reload left draining: their calls have ended
                await old.close(drain=False)
            self._retiring.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.servicer.images_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        if self.health_server is not None:  # it said NOT_SERVING through the drain
            self.health.close()  # its Watches end with OK, within the stop's short grace
            await self._stop_server(self.health_server, 1.0)

    async def start_server(self, server: grpc.aio.Server) -> None:
        self._started.add(server)  # also a start that a stop cuts short: it is not started again
        await server.start()

    async def _stop_server(self, server: grpc.aio.Server, grace: float | None) -> None:
        """Stop a gRPC server, and free its port: one never started keeps the port it bound until it has been
        started and stopped (grpc.aio 1.85: stop() alone leaves it bound), e.g. when a later port fails to bind."""
        try:
            if server not in self._started:
                await self.start_server(server)
            await server.stop(grace)
        except Exception as exc:  # noqa: BLE001 - a start that a stop cut short leaves gRPC's server in a state
            log.debug("stopping a gRPC server: %r", exc)  # its stop() refuses (InvalidStateError); go on closing


def build_pipeline(cfg: ServeConfig, repo: Repository, executor: ThreadPoolExecutor, metrics: Metrics,
                   loader: ThreadPoolExecutor | None = None) -> Pipeline:
    opts = RuntimeOptions(intra_op_threads=cfg.intra_op_threads, inter_op_threads=cfg.inter_op_threads,
                          providers=tuple(cfg.provider_list()),
                          graph_optimization=cfg.graph_optimization, io_binding=cfg.io_binding)
    batching = BatchConfig(max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_delay_s=cfg.max_delay_ms / 1000,
                           workers=cfg.batch_workers, gather_turns=cfg.gather_turns)
    default = cfg.default_model or ("" if cfg.repository else EMBEDDED_DEFAULT)  # else the first by name
    return Pipeline(repo, executor, opts, batching, default, metrics, int(cfg.decode_cache_mb * 2**20),
                    cfg.max_old_versions, loader)


async def create_server(cfg: ServeConfig) -> Running:
    """Load and warm every model, then report SERVING; health says NOT_SERVING until then."""
    metrics = Metrics()
    metrics.loop_cpu.watch()  # this coroutine runs on the event loop's thread
    repo = Repository.load(_root(cfg))
    check_message_limit(repo, cfg)
    executor = ThreadPoolExecutor(cfg.worker_threads(), thread_name_prefix="disco-ort")
    loader = ThreadPoolExecutor(cfg.worker_threads(), thread_name_prefix="disco-load")  # Pipeline.loader
    pipeline = build_pipeline(cfg, repo, executor, metrics, loader)
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(cfg.min_client_ping_s * 1000)),
        ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
        ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),  # off by default: a stale server must not share the port
    ]
    if cfg.max_pending_rpcs:  # one bound, no random early drop below it (gRPC core's soft limit drops at random)
        options += [("grpc.server.max_pending_requests", cfg.max_pending_rpcs),
                    ("grpc.server.max_pending_requests_hard_limit", cfg.max_pending_rpcs)]
    auth = cfg.auth_token_file or cfg.auth_token  # a token file that holds no token stops the start (OSError)
    server = grpc.aio.server(options=options,
                             interceptors=[TokenAuth(cfg.auth_token, cfg.auth_token_file, metrics.unauthenticated)]
                             if auth else [])
    servicer = CodecServicer(pipeline, cfg, metrics)
    # read at each scrape from the snapshot serving now: a call still finishing on the one a reload replaced, or a
    # snapshot built for a reload that is then refused, cannot set it to another cache's size
    metrics.cache_bytes.set_function(lambda: servicer.pipeline.cache.bytes if servicer.pipeline.cache else 0)
    add_to_server(servicer, server)  # requests that do not parse are answered INVALID_ARGUMENT
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    creds = server_credentials(cfg)
    address = host_port(cfg.host, cfg.port)
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when the port is taken
        raise OSError(f"could not bind {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"could not bind {address}")
    running = Running(cfg, server, port, health_servicer, servicer, executor, metrics, loader)
    servicer.reloads = running
    try:  # from here a failure or a stop closes what was started, the ports bound included
        if cfg.health_port:  # the same health statuses, in plaintext and nothing else: probes that cannot speak TLS
            running.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if cfg.reuse_port else 0)])
            health_pb2_grpc.add_HealthServicer_to_server(Probes(health_servicer), running.health_server)
            probes = host_port(cfg.host, cfg.health_port)
            try:
                bound = running.health_server.add_insecure_port(probes)
            except RuntimeError:  # gRPC's word for a port that is taken
                bound = 0
            if not bound:
                raise OSError(f"could not bind --health-port {probes}")
        running._count_refusals(repo.refused)
        await running.set_health(False)
        await running.start_server(server)
        if running.health_server is not None:
            await running.start_server(running.health_server)
        if cfg.metrics_port:  # from before the warm-up: its memory and load failures show while health says NOT_SERVING
            try:
                metrics.serve(cfg.metrics_port, cfg.metrics_host or cfg.host)
            except (OSError, OverflowError) as exc:
                raise OSError(f"could not serve metrics on port {cfg.metrics_port} of {cfg.metrics_host or cfg.host}: "
                              f"{exc}") from exc
        while True:  # a version that verified but does not load is refused; the others serve
            try:
                await pipeline.warm_up()
                break
            except LoadFailed as exc:
                running.refuse(exc)
                repo = running.loadable(repo, None)
                failed, pipeline = pipeline, build_pipeline(cfg, repo, executor, metrics, loader)
                pipeline.take_loaded(failed)  # the versions that did load are not loaded again
                servicer.pipeline = pipeline  # before the await: a shutdown now closes this one (stop, below)
                await failed.close(drain=False)
        for e in repo.entries():  # what serves, once the versions that did not load are refused
            metrics.model.labels(e.name, e.version).info({"fingerprint": e.fingerprint.hex()})
        await running.set_health(True)
    except BaseException:
        await running.stop(0)
        raise
    if cfg.reload_interval_s > 0:
        running._tasks.append(asyncio.create_task(running._poll()))
    warn_collisions(repo)
    names = ", ".join(f"{e.name}/{e.version}" for e in repo.entries())
    providers = (await pipeline.load(pipeline.entry())).runtime.providers  # what ONNX Runtime really runs on
    log.info("serving %s on %s (%s%s, metrics %s, ONNX Runtime on %s, pid %d)", names, host_port(cfg.host, port),
             "mTLS" if cfg.tls_client_ca else "TLS" if creds else "plaintext", ", token auth" if auth else "",
             cfg.metrics_port or "off", ", ".join(providers), os.getpid())
    return running


class StartupError(Exception):
    """What keeps a server from starting that an operator fixes: the repository, a port, a TLS file."""


async def serve(cfg: ServeConfig) -> None:
    loop = asyncio.get_running_loop()
    asked: list[int] = []  # a SIGHUP while starting (the repository may have changed since it was read): reload once up
    loop.add_signal_handler(signal.SIGHUP, lambda: asked.append(signal.SIGHUP))
    # Handled from the first moment: as PID 1 (a container's entrypoint) a signal without a handler is ignored, and
    # a SIGTERM while the models warm was lost (Kubernetes then waits out the grace period and kills)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_parent(cfg.parent_pid, stop)) if cfg.parent_pid else None
    starting = asyncio.ensure_future(create_server(cfg))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # create_server stops what it started when cancelled
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            log.info("asked to stop while starting: stopped")
            return
        running = starting.result()
    except (RepositoryError, OSError, MemoryError) as exc:
        raise StartupError(str(exc)) from exc
    finally:
        stopped.cancel()

    loop.add_signal_handler(signal.SIGHUP, running.reload_soon)
    beat = asyncio.create_task(_heartbeat(cfg.heartbeat_fd)) if cfg.heartbeat_fd >= 0 else None
    if asked:
        log.info("SIGHUP while starting: reloading")
        running.reload_soon()
    await stop.wait()
    running.refuse_reloads()  # a SIGHUP during the drain delay reloads nothing (stop() would wait for it)
    if watch is not None:
        watch.cancel()
    if cfg.drain_delay_s:
        await running.set_health(False)
        log.info("NOT_SERVING; still serving for %.1f s before draining", cfg.drain_delay_s)
        await asyncio.sleep(cfg.drain_delay_s)
    log.info("draining (grace %.1f s)", cfg.grace_s)
    await running.stop(cfg.grace_s)
    if beat is not None:  # beating through the drain: a drain is not a hang
        beat.cancel()
    log.info("stopped")


async def _heartbeat(fd: int) -> None:
    """Tell the --processes server that started this process that its event loop runs: one byte every
    HEARTBEAT_S on the pipe it gave (its watchdog kills a process that stops). Never blocks the loop."""
    os.set_blocking(fd, False)
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:  # the pipe is full: that server is not reading, and knows this process runs
            pass
        except OSError:  # that server is gone (_watch_parent drains this process)
            return
        await asyncio.sleep(HEARTBEAT_S)


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    """A process of --processes drains once the server that started it is gone: killed by a signal it could not
    forward (SIGKILL), its processes were left serving the port on their own, and a new server was refused it."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    log.error("the --processes server (pid %d) that started this process is gone: draining", pid)
    stop.set()


def child_argv(cfg: ServeConfig, argv: list[str], i: int) -> list[str]:
    """Process i of a --processes N server: the parent's flags, then (last, so they win) one process on the
    shared port (told how many share it), its share of the cores in ONNX Runtime threads, and metrics on
    metrics_port + i."""
    threads = max(1, available_cores() // cfg.processes)
    return [*argv, "--processes", "1", "--reuse-port", "--port-processes", str(cfg.processes),
            "--intra-op-threads", str(min(cfg.intra_op_threads, threads)),
            "--workers", str(max(1, cfg.worker_threads() // cfg.processes)),
            "--metrics-port", str(cfg.metrics_port + i if cfg.metrics_port else 0), "--parent-pid", str(os.getpid())]


class _Watchdog:
    """What a --processes server knows of each process's event loop: the pipes they write to while it runs
    (_heartbeat). A process that has written once and then stops writing for watchdog_s is hung: a deadlock or a
    stuck native call leaves it alive, holding its share of the port's connections while it answers none, and
    health probes, spread over the processes by the kernel, see it only now and then."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.pipes: list[tuple[int, int]] = []  # per process: (read end, write end until it is started)
        self.last: list[float | None] = []  # when each last wrote; None until its first beat (it is starting)
        self.looked: float | None = None  # when hung() last ran

    def pipe(self) -> int:
        """A new process's write end, to pass it (pass_fds, --heartbeat-fd)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.pipes.append((r, w))
        self.last.append(None)
        return w

    def started(self) -> None:
        """The newest process has its write end: this process's copy is closed (EOF then means it exited)."""
        os.close(self.pipes[-1][1])

    def hung(self, now: float) -> list[int]:
        """Indexes of the processes silent for longer than the limit, having beaten before."""
        if self.looked is not None and now - self.looked > 2 * HEARTBEAT_S:
            # This process did not run either (the whole group paused: Ctrl-Z, a frozen cgroup): that gap is not
            # the processes' silence, or every one would be taken for hung before it could write again.
            gap = now - self.looked
            self.last = [t + gap if t is not None else None for t in self.last]
        self.looked = now
        out = []
        for i, (r, _) in enumerate(self.pipes):
            try:
                if os.read(r, 4096):
                    self.last[i] = now
            except BlockingIOError:  # nothing written since the last look
                pass
            last = self.last[i]
            if self.limit_s and last is not None and now - last > self.limit_s:
                out.append(i)
        return out

    def close(self) -> None:
        for r, _ in self.pipes:
            os.close(r)


def _serve_processes(cfg: ServeConfig, argv: list[str]) -> int:
    """N server processes on one port (SO_REUSEPORT), ONNX Runtime threads split between them.

    On small machines this beats one process with many threads: each process has its own GIL.
    Process i serves metrics on metrics_port + i. A process that exits unasked (it failed to start, or crashed)
    stops the others, and this one exits with its status: the port never stays half served while health and
    ListModels speak for the missing process, and a supervisor (Kubernetes) restarts the whole.
    """
    children: list[subprocess.Popen[bytes]] = []
    stop: list[int] = []  # SIGTERM / SIGINT received, or a process gone
    watchdog = _Watchdog(cfg.watchdog_s)

    def forward(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            stop.append(signum)
        for c in children:
            c.send_signal(signum)

    for port in (cfg.port, cfg.health_port) if cfg.health_port else (cfg.port,):
        taken = port_taken(cfg.host, port)
        if taken is not None:
            log.error("disco serve: could not bind %s: %s%s", host_port(cfg.host, port), taken,
                      " (another server listens there; --processes would share the port with it)"
                      if taken.errno == errno.EADDRINUSE else "")
            return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(cfg.processes):
        if stop:  # asked to stop while starting: start no more
            break
        # A child must not die of a SIGHUP forwarded while it starts (a reload asked while it imports is moot: it
        # has not read the repository yet). It starts with SIGHUP blocked: the mask survives exec, and this needs
        # no preexec_fn (unsafe in a process with threads) nor a moment in which the parent ignores SIGHUP itself.
        # Its main() ignores SIGHUP, which discards one left pending, then unblocks it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        fd = watchdog.pipe()
        try:
            children.append(subprocess.Popen([sys.executable, "-m", "disco.service.server",
                                              *child_argv(cfg, argv, i), "--heartbeat-fd", str(fd)], pass_fds=(fd,)))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one that came meanwhile is forwarded now
            watchdog.started()
        if stop:  # the stop may have come while this child was being started, before forward could see it
            children[-1].send_signal(stop[0])
    failed = 0
    while True:
        for i in watchdog.hung(time.monotonic()):
            if children[i].poll() is None:  # killed now, it is gone below: the others stop as for a crash
                log.error("server process %d has not run its event loop for over %s s (hung): killing it",
                          children[i].pid, bound_text(cfg.watchdog_s))
                children[i].kill()
                children[i].wait()
        codes = [c.poll() for c in children]  # every child polled (any() would stop at the first alive)
        gone = next((c for c in children if c.returncode is not None), None)
        if gone is not None and not stop and not failed:
            failed = exit_status(gone.returncode) or 1
            log.error("server process %d exited with status %s; stopping the others", gone.pid, gone.returncode)
            forward(signal.SIGTERM, None)
        if None not in codes:
            break
        time.sleep(0.1)
    watchdog.close()
    asked = stop[0] if stop else None  # a child that the stop's own signal ended (before it could drain) is fine
    # a child that the stop's own signal ended before it could drain (killed by it, or a Ctrl-C while it imported:
    # 128 + SIGINT) stopped as asked
    return failed or max((0 if asked and c.returncode in (-asked, 128 + asked) else exit_status(c.returncode or 0)
                          for c in children), default=0)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: its exit code, or 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


def _ignore_sighup() -> None:
    """Ignore SIGHUP (its default action kills), and unblock it: a --processes child starts with it blocked."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # discards a SIGHUP pending while it was blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _ignore_sighup()  # until serve() handles it: SIGHUP's default action would kill a server that is starting
    cfg = ServeConfig.from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.processes > 1:
        return _serve_processes(cfg, argv)
    try:
        asyncio.run(serve(cfg))
    except StartupError as exc:
        log.error("disco serve: %s", exc)
        return 2
    return 0


if __name__ == "__main__":  # a process of --processes; Ctrl-C reaches the whole group, and the parent reports it
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
