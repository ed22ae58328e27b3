"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers)."""
from __future__ import annotations

import os
import socket
import threading
from collections import Counter as Counter_
from collections.abc import Iterator
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

M = TypeVar("M", bound=MetricWrapperBase)
_POLL_S = 0.02  # how often the /metrics server looks for its shutdown (socketserver's default is 0.5 s)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no line per scrape
        pass


_LATENCY = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class LoopCpuCollector(Collector):
    """disco_event_loop_cpu_seconds_total: CPU time of the thread that runs the server's event loop.

    That one thread runs the gRPC stack's Python side and every handler (a lone request's compute too), so its
    rate approaching 1 means the process is bound by its loop whatever the cores left idle: serve with more
    processes (--processes, or replicas). Read from /proc/self/task/TID/stat (utime + stime, in clock ticks:
    proc(5)), so Linux only; elsewhere, or once that thread has ended, the collector reports nothing.
    """

    def __init__(self) -> None:
        self._stat = ""  # /proc path of the watched thread, set by watch()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def watch(self) -> None:
        """Watch the calling thread: call it from the event loop's thread."""
        self._stat = f"/proc/self/task/{threading.get_native_id()}/stat"

    def seconds(self) -> float | None:
        try:
            with open(self._stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self._tick  # fields 14 and 15 of the line: utime, stime

    def collect(self) -> Iterator[CounterMetricFamily]:
        seconds = self.seconds() if self._stat else None
        if seconds is not None:
            family = CounterMetricFamily("disco_event_loop_cpu_seconds",
                                         "CPU time of the event loop's thread (gRPC stack and handlers)")
            family.add_metric([], seconds)
            yield family


class Metrics:
    """Names follow Prometheus conventions: base units (seconds, bytes), _total for counters."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.loop_cpu = LoopCpuCollector()
        r.register(self.loop_cpu)
        self.requests = Counter("disco_requests", "RPCs answered, by method and status code", ["method", "code"], registry=r)
        self.streams = Counter("disco_streams", "Streaming RPCs ended, by method and final status code (each message "
                               "is also one Compress or Decompress request)", ["method", "code"], registry=r)
        self.latency = Histogram("disco_request_duration_seconds", "RPC latency, by method", ["method"],
                                 buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("disco_requests_in_flight", "RPCs being served", registry=r)
        self.queue_latency = Histogram("disco_queue_duration_seconds", "Time a request part waits in a batcher queue",
                                       ["batcher"], buckets=_LATENCY, registry=r)
        self.compute_latency = Histogram("disco_compute_duration_seconds", "ONNX Runtime time per batch",
                                         ["batcher"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("disco_batch_size", "Rows per ONNX Runtime run", ["batcher"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)  # to --max-batch's top
        self.queue_depth = Gauge("disco_queue_depth", "Rows waiting in a batcher: queued for a worker, or gathered on the event loop",
                                 ["batcher"], registry=r)
        self.images = Counter("disco_images", "Images compressed or decompressed, by method and model version",
                              ["method", "model", "version"], registry=r)
        self.bytes_in = Counter("disco_request_bytes", "Request payload bytes, by method", ["method"], registry=r)
        self.bytes_out = Counter("disco_response_bytes", "Response payload bytes, by method", ["method"], registry=r)
        # Bytes, not bits (Prometheus' base units: "always use bytes, even where bits appear more common"); a bucket
        # a byte wide where codes lie (a dSprites code is 6-11 bytes, header included), so quality levels show apart.
        self.code_bytes = Histogram("disco_code_bytes_per_image",
                                    "Code size per image, header included, in bytes: each Compress request's mean, "
                                    "by model version", ["model", "version"],
                                    buckets=(*range(2, 17), 20, 24, 32, 48, 64, 128, 256), registry=r)
        self.cache_lookups = Counter("disco_decode_cache_lookups", "Decode cache lookups, one per single code, by result",
                                     ["result"], registry=r)
        self.cache_bytes = Gauge("disco_decode_cache_bytes", "Bytes held by the decode cache (an estimate)", registry=r)
        self.model = Info("disco_model", "Model versions served, with their fingerprints", ["name", "version"],
                          registry=r)
        self.load_failures = Counter("disco_model_load_failures",
                                     "Model versions refused at start or reload or that failed to load when a code "
                                     "asked for them, and reloads refused", registry=r)
        self.loaded_versions = Gauge("disco_loaded_versions", "Model versions with ONNX Runtime sessions in memory",
                                     registry=r)
        self.loads = Counter("disco_model_loads", "Model versions loaded and warmed (at start, on reload, or for old codes)",
                             registry=r)
        self.provider_fallbacks = Counter("disco_provider_fallbacks",
                                          "Model versions loaded whose sessions run on another execution provider "
                                          "than the first --providers names (CPU where CUDA was asked for)", registry=r)
        self.unloads = Counter("disco_model_unloads", "Older model versions unloaded to stay within --max-old-versions",
                               registry=r)
        self.reloads = Counter("disco_repository_reloads", "Repository reloads that swapped in a new snapshot",
                               registry=r)
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._http: Any = None
        self._batchers: Counter_[str] = Counter_()  # open batchers by name (a version changed in place has two)
        self._batchers_lock = threading.Lock()  # batchers open on the threads that load versions

    def batcher_opened(self, name: str) -> None:
        with self._batchers_lock:
            self._batchers[name] += 1

    def batcher_closed(self, name: str) -> None:
        """The last batcher of this name closed (its version unloaded or withdrawn): its series go, so that a
        server that ships versions for months does not export every version it ever loaded."""
        with self._batchers_lock:
            self._batchers[name] -= 1
            if self._batchers[name] > 0:
                return
            del self._batchers[name]
            for metric in (self.queue_depth, self.queue_latency, self.compute_latency, self.batch_size):
                self._children.pop((metric, (name,)), None)
                try:
                    metric.remove(name)
                except KeyError:  # never observed
                    pass

    def unauthenticated(self, method: str, streaming: bool) -> None:
        """A call refused before its handler ran (no or a wrong bearer token), counted as the handlers count."""
        self.child(self.streams if streaming else self.requests, method, "UNAUTHENTICATED").inc()

    def version_withdrawn(self, name: str, version: str) -> None:
        """A version left the repository and its last calls ended: its per-version series go (as its batchers'
        go when they close)."""
        for metric, labels in ((self.code_bytes, (name, version)), (self.images, ("Compress", name, version)),
                               (self.images, ("Decompress", name, version))):
            self._children.pop((metric, labels), None)
            try:
                metric.remove(*labels)
            except KeyError:  # never observed
                pass

    def child(self, metric: M, *labels: str) -> M:
        """metric.labels(*labels), resolved once: labels() builds its key under a lock on every call, about
        a microsecond that the hot path would pay several times per request."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """/metrics on a thread, as prometheus_client's start_http_server serves it, but polled for its shutdown
        every _POLL_S, not every 0.5 s: close() waited out that poll on the event loop, and every exit took up to
        0.5 s past --grace-s (a review)."""
        addr = host.strip("[]")  # "[::]" -> "::"
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        self._http = make_server(addr, port, make_wsgi_app(self.registry), server, handler_class=_Quiet)
        threading.Thread(target=self._http.serve_forever, args=(_POLL_S,), name="disco-metrics", daemon=True).start()

    def close(self) -> None:
        """Stop the /metrics HTTP server, if serving."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
