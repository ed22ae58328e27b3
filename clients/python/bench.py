"""`disco bench`: perf_analyzer-style load against a server, with the limits it is measured against.

For each case (direction x images per request x concurrency) a closed loop of `concurrency` callers
sends requests for a time window (or a count of requests) and records every latency; `--request-rate` adds
open-loop cases (disco.client.load generates both). In the same run it measures the limits:
  - batched cases: raw in-process ONNX Runtime on the same model and batch, including the
    uint8 <-> float work a request needs (`raw_ort_images_per_s`);
  - single-image cases: a NoOp RPC on the same server stack that moves the same bytes each way as the call it
    is measured beside: that request, serialized, and an answer of that call's size (`noop_requests_per_s`).
The service and its limit take turns in --rounds windows each (ABAB...): this shared machine's speed drifts by
10% within minutes, and alternating makes the drift weigh on both sides of a ratio alike. Each round's own ratio is
kept (`round_ratios`, and their range in the table), so that a reader sees how far one window can be trusted;
`--stability PCT` adds rounds until the last three agree within PCT%, as perf_analyzer's stability criterion does.
The load generator shares the machine with the server, as it would on one host.

Where the server's /metrics can be read (a spawned server's always; another's with --metrics-url, which then
should serve nothing else meanwhile), each case also says where the time went, like perf_analyzer's server-side
breakdown: the mean time inside the RPC handler, the ONNX Runtime compute within it (timed on the thread that
computes), the queue wait of each batcher part, the mean rows per run and, for single-image cases, the NoOp's
handler time. The rest of a request's latency is the gRPC stack and the client. The server figures cover the
requests that ran between the window's start and its end; requests the target answered for others meanwhile are
counted and reported.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import http.client
import io
import json
import math
import os
import platform
import resource
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from disco.client._transport import TLS, warn_plaintext_token
from disco.client.files import security_flags
from disco.client.load import Endpoint, Load, closed_loop, open_loop
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

TARGETS = {"batched": 0.65, "single_1": 0.7, "single_8": 0.5, "single_32": 0.7, "p99_over_p50": 3.0}


def sprites(n: int, seed: int = 5) -> np.ndarray:
    from disco.export.data.dsprites import DSprites  # numpy only

    imgs, _ = DSprites().sample(n, np.random.default_rng([seed, 10**9]))
    return (imgs * 255)[..., None]  # uint8 (N, 64, 64, 1)


def synthetic(n: int, hwc: tuple[int, int, int]) -> np.ndarray:
    """dSprites shapes in a model's image shape: resized (nearest) and repeated over its channels."""
    h, w, c = hwc
    x = sprites(n)
    x = x[:, np.arange(h) * 64 // h][:, :, np.arange(w) * 64 // w]
    return np.repeat(x, c, axis=3) if c != 1 else x


def read_images(folder: Path, hwc: tuple[int, int, int]) -> np.ndarray:
    """The image files of a folder, as uint8 (N, H, W, C); each must have the model's size (nothing is resized)."""
    from PIL import Image

    h, w, c = hwc
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c)
    if mode is None:
        raise SystemExit(f"disco bench: --images reads 1, 3 or 4 channels, the model has {c}")
    from disco.client.files import IMAGE_SUFFIXES, _inputs

    skipped: list[tuple[Path, str]] = []  # links to nothing and unlistable folders: skipped here, as they always were
    files = [f for f, _ in _inputs([str(folder)], IMAGE_SUFFIXES, skipped)]  # the files `disco compress` would take
    if not files:
        raise SystemExit(f"disco: no files ending in {', '.join(sorted(IMAGE_SUFFIXES))} under {folder}")
    out = np.empty((len(files), h, w, c), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if im.size != (w, h):
                    raise SystemExit(f"disco bench: {f} is {im.size[1]}x{im.size[0]} (HxW), the model expects {h}x{w}")
                a = np.asarray(im.convert(mode))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
            raise SystemExit(f"disco bench: {f} is not a readable image: {exc}") from None
        out[i] = a[..., None] if c == 1 else a
    return out


@dataclass(frozen=True)
class Inputs:
    """The model under test, as the target names it, and the images its requests carry (cycled)."""

    model: pb.ModelRef
    fingerprint: str
    pool: np.ndarray  # uint8 (N, H, W, C)

    @property
    def batcher(self) -> str:
        return f"{self.model.name}/{self.model.version}"

    def images(self, n: int) -> np.ndarray:
        return self.pool[np.arange(n) % len(self.pool)]

    def entry(self, repository: Path | None) -> Any:
        """The same model version in a local repository, for the raw ONNX Runtime limit."""
        from disco.service.repository import EMBEDDED, Repository

        root = repository or EMBEDDED
        try:
            e = Repository.load(root).get(self.model.name, self.model.version)
        except Exception as exc:  # noqa: BLE001 - whatever the lookup raised, the fix is the same
            raise SystemExit(f"disco bench: the raw ONNX Runtime limit needs {self.batcher} in the local repository "
                             f"{root} (--repository): {exc}") from exc
        if e.fingerprint.hex() != self.fingerprint:
            raise SystemExit(f"disco bench: {self.batcher} in {root} is not the model the target serves "
                             f"(fingerprint {e.fingerprint.hex()[:16]}..., the target's {self.fingerprint[:16]}...)")
        return e


def processes_of(endpoint: Endpoint) -> int:
    """How many server processes share the target's port (1 where it does not say)."""
    with endpoint.channel() as ch:
        listed = codec_pb2_grpc.CodecStub(ch).ListModels(pb.ListModelsRequest(), timeout=30, metadata=endpoint.metadata)
    return max(1, listed.server_processes)


def resolve_inputs(target: str | Endpoint, model: str, images: Path | None, n: int) -> Inputs:
    """--model NAME[/VERSION] (default: the target's default model) as the target resolves it, and its images."""
    name, _, version = model.partition("/")
    endpoint = Endpoint.of(target)
    try:
        with endpoint.channel() as ch:
            info = codec_pb2_grpc.CodecStub(ch).GetModel(
                pb.GetModelRequest(model=pb.ModelRef(name=name, version=version)), timeout=30, metadata=endpoint.metadata)
    except grpc.RpcError as exc:
        raise SystemExit(f"disco bench: {endpoint.target} cannot run model {model or '(its default)'}: "
                         f"{exc.code().name}: {exc.details()}") from exc
    hwc = (info.input_shape[0], info.input_shape[1], info.input_shape[2])
    pool = read_images(images, hwc) if images else synthetic(max(n, 64), hwc)
    return Inputs(pb.ModelRef(name=info.name, version=info.version), info.fingerprint, pool)


class RawOrt:
    """In-process ONNX Runtime on one batch, looping: the best of 1 session x 2 threads and 2 sessions x 1 thread.
    run() adds a window of each configuration; images_per_s() is the best configuration's rate over all of them."""

    def __init__(self, repository: Path | None, inputs: Inputs, direction: str, batch: int) -> None:
        from disco.service.runtime import OnnxModel, RuntimeOptions

        self.entry = inputs.entry(repository)
        self.direction, self.batch = direction, batch
        self.x_u8 = inputs.images(batch)
        self.z = np.random.default_rng(0).normal(size=(batch, self.entry.codec.latent_dim)).astype(np.float32)
        self.configs = [[OnnxModel(self.entry.path, RuntimeOptions(intra_op_threads=threads)) for _ in range(sessions)]
                        for sessions, threads in ((1, 2), (2, 1))]
        self.images = [0] * len(self.configs)
        self.seconds = [0.0] * len(self.configs)

    def run(self, seconds: float) -> float:
        """A window of `seconds` per configuration; returns the best configuration's images/s in this window."""
        from disco.service import images as im

        rates = []
        for k, models in enumerate(self.configs):
            counts = [0] * len(models)
            stop = time.perf_counter() + seconds

            def loop(i: int, model: Any, counts: list[int], stop: float) -> None:
                while not counts[i] or time.perf_counter() < stop:  # one run at least: a window never reads 0
                    if self.direction == "compress":  # with the uint8 -> float work a request needs
                        model.encode(im.from_raw(self.x_u8.tobytes(), self.x_u8.shape, "uint8", self.entry.input_shape))
                    else:
                        im.to_uint8(model.decode(self.z))
                    counts[i] += self.batch

            workers = [threading.Thread(target=loop, args=(i, m, counts, stop)) for i, m in enumerate(models)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            took = time.perf_counter() - t0
            self.seconds[k] += took
            self.images[k] += sum(counts)
            rates.append(sum(counts) / took)
        return max(rates)

    def images_per_s(self) -> float:
        return max(n / t for n, t in zip(self.images, self.seconds) if t > 0)


Scrape = dict[tuple[str, str], float]  # (sample name, its method or batcher label) -> value
REQUESTS = "disco_request_duration_seconds_count"


class MetricsUnreadable(Exception):
    """A /metrics URL that gave no Prometheus text; the message names the URL and why."""


def metric_families(url: str) -> list[Any]:
    """The metric families of a Prometheus /metrics page (prometheus-client, of the [serve] extra), or
    MetricsUnreadable: a URL that refuses, is no HTTP/1.1 server (a gRPC port) or serves something else."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except http.client.HTTPException as exc:  # a gRPC port answers HTTP/2 frames, no HTTP/1.1 status line
        raise MetricsUnreadable(f"{url} did not answer as an HTTP/1.1 server ({type(exc).__name__}; "
                                "a gRPC port?)") from exc
    except UnicodeDecodeError as exc:
        raise MetricsUnreadable(f"{url} did not answer text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, ValueError) as exc:  # refused, timed out, an HTTP error status, a URL urllib cannot open
        raise MetricsUnreadable(f"{url} could not be read: {exc}") from exc
    try:
        return list(text_string_to_metric_families(text))
    except ValueError as exc:  # e.g. an HTML page
        raise MetricsUnreadable(f"{url} is not Prometheus text ({str(exc)[:80]})") from exc


def check_metrics(urls: list[str]) -> str:
    """Why the URLs are not the /metrics of a disco server's processes, or "": read once before a run, since a
    wrong --metrics-url was found only at the first window's scrape, after the warm-up."""
    for url in urls:
        try:
            names = {family.name for family in metric_families(url)}
        except MetricsUnreadable as exc:
            return str(exc)
        if "disco_requests_in_flight" not in names:  # a disco server's, answered a call or not
            return f"{url} serves Prometheus metrics, but not a disco server's (no disco_requests_in_flight)"
    return ""


def scrape(urls: list[str]) -> Scrape | None:
    """The request/queue/compute latency and batch-size sums and counts of a server's /metrics, summed over
    its processes' (one URL each), or None (with a line on stderr) when one cannot be read. With several
    processes, each one's request counts are kept too, as f"{REQUESTS}@{i}": how the calls split between them."""
    total: Scrape = {}
    for i, url in enumerate(urls):
        try:
            samples = metric_samples(metric_families(url))
        except (ImportError, MetricsUnreadable) as exc:
            print(f"disco bench: no server-side breakdown: {exc}", file=sys.stderr)
            return None
        if len(urls) > 1:  # this process, even before it has answered a call
            total[(f"{REQUESTS}@{i}", "")] = 0.0
        for k, v in samples.items():
            total[k] = total.get(k, 0.0) + v
            if len(urls) > 1 and k[0] == REQUESTS:
                total[(f"{REQUESTS}@{i}", k[1])] = v
    return total


def parse_metrics(text: str) -> Scrape:
    """Prometheus text exposition -> the samples the breakdown needs (prometheus-client, of the [serve] extra)."""
    from prometheus_client.parser import text_string_to_metric_families

    return metric_samples(text_string_to_metric_families(text))


def metric_samples(families: Any) -> Scrape:
    """The samples of some metric families that the breakdown needs."""
    wanted = {f"{m}_{k}" for m in ("disco_request_duration_seconds", "disco_queue_duration_seconds",
                                    "disco_compute_duration_seconds", "disco_batch_size") for k in ("sum", "count")}
    wanted.add("process_cpu_seconds_total")  # every thread of the process (prometheus-client's ProcessCollector)
    wanted.add("disco_event_loop_cpu_seconds_total")  # the thread that runs the gRPC stack and the handlers
    return {(sample.name, sample.labels.get("method") or sample.labels.get("batcher", "")): sample.value
            for family in families for sample in family.samples if sample.name in wanted}


def breakdown(before: Scrape, after: Scrape, method: str, direction: str, model: str = "") -> dict[str, float]:
    """Means between two scrapes: per request, the handler time, the compute of its direction's batchers and the
    server's CPU time (all its processes and threads); per batcher part, the queue wait; per run, the rows.
    Empty when no request of `method` ran."""
    def delta(sample: str, label: str | None = None, suffix: str = "") -> float:
        """A sample's change, for one label, or (suffix) for the batchers of `model` / of every model."""
        def matches(k1: str) -> bool:
            if label is not None:
                return k1 == label
            return k1 == f"{model}{suffix}" if model else k1.endswith(suffix)
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == sample and matches(k[1]))

    requests = delta(REQUESTS, method)
    if not requests:
        return {}
    batcher = "/encode" if direction == "compress" else "/decode"  # of `model` ("name/version"), or of every model
    runs = delta("disco_batch_size_count", suffix=batcher)
    parts = delta("disco_queue_duration_seconds_count", suffix=batcher)
    mean = lambda total, n: round(total / n, 4) if n else float("nan")  # noqa: E731
    return {
        "server_handler_ms": mean(1000 * delta("disco_request_duration_seconds_sum", method), requests),
        "server_compute_ms": mean(1000 * delta("disco_compute_duration_seconds_sum", suffix=batcher), requests),
        "server_queue_ms_per_part": mean(1000 * delta("disco_queue_duration_seconds_sum", suffix=batcher), parts),
        "mean_batch_rows": mean(delta("disco_batch_size_sum", suffix=batcher), runs),
    } | ({"server_cpu_ms": mean(1000 * delta("process_cpu_seconds_total", ""), requests)}
         if ("process_cpu_seconds_total", "") in after else {}) | (  # both read on Linux only
        {"server_loop_ms": mean(1000 * delta("disco_event_loop_cpu_seconds_total", ""), requests)}
        if ("disco_event_loop_cpu_seconds_total", "") in after else {})


@dataclass
class Window:
    """One kind of load (the service's or the NoOp's) summed over the rounds of a case."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the windows' lengths, summed: rates are requests / seconds
    errors: dict[str, int] = field(default_factory=dict)
    send_lag: list[float] = field(default_factory=list)
    peak_outstanding: int = 0
    server: Scrape = field(default_factory=dict)  # metric increments between each window's two scrapes, summed
    client_cpu_s: float = 0.0
    in_flight_at_open: int = 0  # requests of the warm-up that the server may count between a window's scrapes,
    # summed: closed loop, those answered after its first scrape began; open loop, the most in flight at once (the
    # load generator times only the requests it started inside the window)
    span_s: float = 0.0  # each window's first scrape to its last (the last caller's return, the channels'
    # close and the scrape itself: about 1% more than the server's CPU delta covers)
    scraped: bool = True

    def add(self, load: Load) -> None:
        self.latencies += load.latencies
        self.seconds += load.seconds
        self.send_lag += load.send_lag
        self.peak_outstanding = max(self.peak_outstanding, load.peak_outstanding)
        for code, n in load.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n


LITTLE_MARGIN = 1.5  # how far past Little's law a closed loop's rate may read before its window is refused


class WindowFailed(Exception):
    """A window whose figures cannot stand as a result: the run ends there, marked failed, as after a failed
    request (the cases measured before it are still reported)."""


def window_problem(load: Load, conc: int) -> str:
    """Why a window cannot be reported, or "". It timed no request and counted no error: there is nothing to
    report but zeros. Or, a closed loop of `conc` callers that each wait for their answer, it counted more
    requests per second than they can send at the window's mean latency (Little's law: conc / mean latency) by
    more than LITTLE_MARGIN: a time window so short that a few callers' starts decide its rate."""
    if not load.latencies and not load.errors:
        return "it timed no request and counted no error"
    if conc and load.latencies:
        mean = float(np.mean(load.latencies))
        rate, bound = len(load.latencies) / max(load.seconds, 1e-9), conc / mean
        if rate > LITTLE_MARGIN * bound:
            return (f"it counted {rate:.0f} requests/s, more than {conc} callers that wait for their answers can "
                    f"send at its mean latency of {1000 * mean:.3f} ms ({bound:.0f}/s, refused past x{LITTLE_MARGIN}): "
                    "too short a window to time; give a longer --duration")
    return ""


def measured(a: argparse.Namespace, method: str, request: Any, conc: int, seconds: float, warmup_s: float,
             into: Window, count: int = 0, rate: float = 0.0) -> float:
    """One window of load, added to `into`: closed loop of `conc` callers, or open loop at `rate` requests per
    second; with the server's metrics (when they can be read) and the load generator's own CPU time over the
    same span. Returns the window's length in seconds; raises WindowFailed for a window that cannot be reported."""
    urls = [u.strip() for u in a.metrics_url.split(",") if u.strip()]
    start: list[tuple[float, float, Scrape | None]] = []

    def at_window() -> None:
        start.append((time.perf_counter(), cpu_seconds(), scrape(urls)))

    hook = at_window if urls else None
    if rate:
        load = asyncio.run(open_loop(a.endpoint, method, request, rate, seconds, warmup_s, hook, a.connections, count,
                                     a.request_distribution == "poisson"))
    else:
        load = asyncio.run(closed_loop(a.endpoint, method, request, conc, seconds, warmup_s, hook, a.connections, count))
    problem = window_problem(load, conc)
    if problem:
        at = f"{rate:g} requests/s" if rate else f"concurrency {conc}"
        raise WindowFailed(f"a {method} window at {at} cannot be reported: {problem}")
    into.add(load)
    if not start:
        into.scraped = False
        return load.seconds
    t0, cpu0, before = start[0]
    after = scrape(urls)
    if before is None or after is None:
        into.scraped = False
        return load.seconds
    into.span_s += time.perf_counter() - t0
    into.client_cpu_s += cpu_seconds() - cpu0
    into.in_flight_at_open += load.peak_outstanding if rate else load.unmeasured
    for k, v in after.items():
        into.server[k] = into.server.get(k, 0.0) + v - before.get(k, 0.0)
    return load.seconds


def server_side(w: Window, method: str, direction: str, model: str) -> dict[str, Any]:
    """The breakdown of a window's requests, with the load generator's CPU per request and the cores busy, and
    with several server processes each one's share of the requests."""
    out: dict[str, Any] = breakdown({}, w.server, method, direction, model) if w.scraped else {}
    if not out:
        return out
    requests = w.server[(REQUESTS, method)]  # what the breakdown divides by
    # Requests of this method that the target answered for someone else: the breakdown divides by them too.
    ours = len(w.latencies) + sum(w.errors.values())
    others = requests - ours - w.in_flight_at_open
    if others > max(10, 0.02 * ours):
        out["other_requests"] = int(others)
    if "server_cpu_ms" in out:
        out["client_cpu_ms"] = round(1000 * w.client_cpu_s / requests, 4)
        out["cores_used"] = round((out["server_cpu_ms"] + out["client_cpu_ms"]) * requests / 1000 / w.span_s, 2)
    if "server_loop_ms" in out:  # near 1 (per server process): bound by the event loop, whatever cores are idle
        out["loop_cores"] = round(out["server_loop_ms"] * requests / 1000 / w.span_s, 2)
    processes = {int(k[0].rsplit("@", 1)[1]) for k in w.server if k[0].startswith(f"{REQUESTS}@")}
    if processes:  # SO_REUSEPORT spreads connections, not calls: an uneven split shows here
        out["process_shares"] = [round(w.server.get((f"{REQUESTS}@{i}", method), 0.0) / requests, 3)
                                 for i in range(max(processes) + 1)]
    return out


def cpu_seconds() -> float:
    """CPU time of this process, every thread (the load generator's gRPC threads included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo), for telling apart results from different machines."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


def mean_ms(lat: list[float]) -> float:
    return round(1000 * float(np.mean(lat)), 4) if lat else float("nan")


def percentile_ms(lat: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(lat) * 1000, q)), 3) if lat else float("nan")


def requests_for(target: str | Endpoint, inputs: Inputs, direction: str, n: int) -> pb.CompressRequest | pb.DecompressRequest:
    x = inputs.images(n)
    compress = pb.CompressRequest(model=inputs.model, images=pb.Images(tensor=pb.Tensor(
        data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8)))
    if direction == "compress":
        return compress
    endpoint = Endpoint.of(target)
    with endpoint.channel() as ch:
        codes = codec_pb2_grpc.CodecStub(ch).Compress(compress, timeout=30, metadata=endpoint.metadata).codes
    return pb.DecompressRequest(codes=codes)


def noop_request(target: str | Endpoint, method: str, req: pb.CompressRequest | pb.DecompressRequest) -> pb.NoOpRequest:
    """The NoOp of the same bytes each way as one call of `method`: the request, serialized, as its payload, and
    the size of that call's answer (asked once, here) as the size of its own. (It once sent a Decompress's codes
    and answered nothing: a single-image Decompress answers 4 KiB, a NoOp of 15 bytes nothing.)"""
    endpoint = Endpoint.of(target)
    with endpoint.channel() as ch:
        stub = codec_pb2_grpc.CodecStub(ch)
        answer = getattr(stub, method)(req, timeout=30, metadata=endpoint.metadata)
        noop = pb.NoOpRequest(payload=req.SerializeToString(), response_bytes=answer.ByteSize())
        try:  # once, so that a server whose NoOp is the old one is named as such, not as a bad request
            stub.NoOp(noop, timeout=30, metadata=endpoint.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "CompressRequest" in (exc.details() or ""):
                raise SystemExit(f"disco bench: {endpoint.target}'s NoOp takes a CompressRequest: a server older than "
                                 "this bench, whose NoOp answers nothing; serve the same version") from None
            raise
    return noop


def latency_fields(lat: list[float]) -> dict[str, Any]:
    return {"requests": len(lat), "p50_ms": percentile_ms(lat, 50), "p90_ms": percentile_ms(lat, 90),
            "p95_ms": percentile_ms(lat, 95), "p99_ms": percentile_ms(lat, 99), "mean_ms": mean_ms(lat)}


def _rounds(case: dict[str, Any]) -> str:
    """The spread of a case's per-round ratios and their number, e.g. '0.62-0.71/3'; '!' when --stability was
    asked and not reached."""
    r = case["round_ratios"]
    return f"{min(r):.2f}-{max(r):.2f}/{len(r)}{'!' if case.get('stable') is False else ''}"


def stable(ratios: list[float], percent: float) -> bool:
    """perf_analyzer's criterion: each of the last 3 measurements within `percent` of their mean."""
    last = ratios[-3:]
    mean = sum(last) / 3
    return len(last) == 3 and all(abs(x - mean) <= percent / 100 * mean for x in last)


def run_case(a: argparse.Namespace, direction: str, n: int, conc: int) -> dict[str, Any]:
    """The service and its limit take turns, a.rounds windows each (ABAB...), so that a drift in the machine's
    speed during the case weighs on both alike; each round's ratio is kept, and with --stability more rounds run
    (up to --max-rounds) until the last 3 ratios agree. With --count, each window is a count window of count /
    rounds requests, and the raw ONNX Runtime limit runs as long as the service's window before it took."""
    req = requests_for(a.endpoint, a.inputs, direction, n)
    method = "Compress" if direction == "compress" else "Decompress"
    raw = RawOrt(a.repository, a.inputs, direction, n) if n > 1 else None
    noop_req = noop_request(a.endpoint, method, req) if raw is None else None
    svc, noop = Window(), Window()
    ratios: list[float] = []
    while len(ratios) < a.rounds or (a.stability and len(ratios) < a.max_rounds and not stable(ratios, a.stability)):
        r = len(ratios)
        warmup, seconds = (a.warmup if r == 0 else min(a.warmup, 0.2)), a.duration / a.rounds
        count = a.count // a.rounds + (r < a.count % a.rounds) if a.count else 0  # the rounds add up to a.count
        done, window = len(svc.latencies), svc.seconds
        took = measured(a, method, req, conc, seconds, warmup, svc, count)
        rate = (len(svc.latencies) - done) * n / max(svc.seconds - window, 1e-9)
        if raw is not None:
            limit = raw.run(took)
        else:
            done, window = len(noop.latencies), noop.seconds
            measured(a, "NoOp", noop_req, conc, seconds, warmup, noop, count)
            limit = (len(noop.latencies) - done) / max(noop.seconds - window, 1e-9)
        ratios.append(rate / max(limit, 1e-9))
    lat = svc.latencies
    case: dict[str, Any] = {
        "kind": "closed", "direction": direction, "images_per_request": n, "concurrency": conc,
        "connections": min(conc, a.connections), "rounds": len(ratios),
        "round_ratios": [round(x, 3) for x in ratios], **latency_fields(lat),
        "window_s": round(svc.seconds, 6),
        "service_images_per_s": round(len(lat) * n / svc.seconds, 1), **server_side(svc, method, direction, a.inputs.batcher),
    }
    if raw is not None:
        case["raw_ort_images_per_s"] = round(raw.images_per_s(), 1)
        case["ratio"] = round(case["service_images_per_s"] / case["raw_ort_images_per_s"], 3)
        case["target"] = TARGETS["batched"]
    else:
        noop_server = server_side(noop, "NoOp", direction, a.inputs.batcher)
        case["noop_mean_ms"] = mean_ms(noop.latencies)
        case["service_requests_per_s"] = round(len(lat) / svc.seconds, 1)
        case["noop_requests_per_s"] = round(len(noop.latencies) / noop.seconds, 1)
        case["ratio"] = round(case["service_requests_per_s"] / max(case["noop_requests_per_s"], 1e-9), 3)
        case["target"] = TARGETS.get(f"single_{conc}")
        if "other_requests" in noop_server:
            case["noop_other_requests"] = noop_server["other_requests"]
        if "server_compute_ms" in case and noop_server:
            case["noop_handler_ms"] = noop_server["server_handler_ms"]
            # A model, not a bound: the ratio of an ideal server whose only work beyond the NoOp is ONNX
            # Runtime's compute, done on the same CPU, so that each request costs the NoOp's 1 / rate plus it.
            case["ideal_ratio"] = round(1 / (1 + case["noop_requests_per_s"] * case["server_compute_ms"] / 1000), 3)
        if "server_cpu_ms" in case and "server_cpu_ms" in noop_server:
            # CPU accounting: a server whose requests each cost the NoOp's CPU (server and load generator) plus the
            # compute's. ceiling: on as many cores as the NoOp kept busy; bound: on every core of this machine, which
            # a spawned server shares with the load generator (the NoOp leaves some idle, so the service could reach
            # above the ceiling). Estimates, not strict: compute is timed in wall time on its thread, which holds any
            # wait for a core (so it overstates the CPU when the cores are saturated).
            noop_cpu = noop_server["server_cpu_ms"] + noop_server["client_cpu_ms"]
            ceiling = noop_cpu / (noop_cpu + case["server_compute_ms"])
            case.update(noop_server_cpu_ms=noop_server["server_cpu_ms"], noop_client_cpu_ms=noop_server["client_cpu_ms"],
                        noop_cores_used=noop_server["cores_used"], cpu_ceiling_ratio=round(ceiling, 3))
            if a.shared_cores:
                case["cpu_bound_ratio"] = round(ceiling * a.shared_cores / max(noop_server["cores_used"], 1e-9), 3)
        if "server_loop_ms" in noop_server:
            case.update(noop_server_loop_ms=noop_server["server_loop_ms"], noop_loop_cores=noop_server["loop_cores"])
        if "process_shares" in noop_server:
            case["noop_process_shares"] = noop_server["process_shares"]
    case["p99_over_p50"] = round(case["p99_ms"] / case["p50_ms"], 2)
    if a.stability:
        case["stable"] = stable(ratios, a.stability)
    return case


def run_rate_case(a: argparse.Namespace, direction: str, rate: float) -> dict[str, Any]:
    """Single-image requests sent at `rate` per second (open loop) for --duration or --count: the latency a
    client sees at a given load, short of saturation, and the throughput the server keeps up with past it."""
    req = requests_for(a.endpoint, a.inputs, direction, 1)
    method = "Compress" if direction == "compress" else "Decompress"
    w = Window()
    measured(a, method, req, 0, a.duration, a.warmup, w, a.count, rate)
    lat = w.latencies
    return {
        "kind": "open", "direction": direction, "images_per_request": 1, "request_rate": rate,
        "distribution": a.request_distribution, "peak_in_flight": w.peak_outstanding, "connections": a.connections,
        **latency_fields(lat),
        "window_s": round(w.seconds, 6), "service_requests_per_s": round(len(lat) / w.seconds, 1) if w.seconds else 0.0,
        "p99_over_p50": round(percentile_ms(lat, 99) / percentile_ms(lat, 50), 2) if lat else float("nan"),
        "send_lag_p99_ms": percentile_ms(w.send_lag, 99), "errors": w.errors,
        **server_side(w, method, direction, a.inputs.batcher),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of n consecutive free ports (the metrics ports of an n-process server)."""
    for _ in range(100):
        base = free_port()
        try:
            for port in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise SystemExit(f"disco bench: found no {n} consecutive free ports for the server's metrics")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (the processes of a --processes server)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(rss_bytes(int(c)) for c in children)


def wait_ready(target: str, metrics_urls: list[str], proc: subprocess.Popen[bytes], timeout: float = 120,
               log: IO[bytes] | None = None) -> None:
    """Until health says SERVING and every process's /metrics answers: a process serves its metrics only
    once warm, and health reaches just the one process its connection landed on. A server that does not come up
    is named with the end of its log."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout

    def check() -> None:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            why = ""
            if log is not None:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()[-5:]
                why = ":\n" + "\n".join(f"  {line}" for line in lines) if lines else ""
            raise SystemExit(f"disco bench: the spawned server did not become ready{why}")
        time.sleep(0.2)

    with grpc.insecure_channel(target) as ch:
        while True:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            check()
    for url in metrics_urls:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                check()


# Where spawn() has the server listen; the health port is off (the bench probes the main port): an inherited
# DISCO_HEALTH_PORT, taken by the server it was meant for, failed the spawned one's bind
BENCH_SETS = {"--host", "--port", "--metrics-port", "--metrics-host", "--health-port"}
# The bench's own calls to a server it spawns are plaintext without a token: these settings would refuse them all
# (the bench waited 2 minutes for a server it could not reach). Refused in --server-args, dropped from the environment.
PLAINTEXT_ONLY = {"--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token", "--auth-token-file"}
# What a --processes server tells each of its processes (service/server.py, child_argv): inherited by a server of
# the bench's, a stale --parent-pid drained it at once, and a --heartbeat-fd wrote to a descriptor it does not own
PER_PROCESS = {"--reuse-port", "--port-processes", "--parent-pid", "--heartbeat-fd"}


def spawned_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a server the bench spawns: its own, less the DISCO_* settings of PLAINTEXT_ONLY,
    PER_PROCESS and BENCH_SETS (the bench gives those as flags; DISCO_HEALTH_PORT=abc, read with the processes'
    count before them, failed the run)."""
    drop = {"DISCO_" + flag[2:].replace("-", "_").upper() for flag in PLAINTEXT_ONLY | PER_PROCESS | BENCH_SETS}
    return {k: v for k, v in env.items() if k not in drop}


def spawn(server_args: list[str]) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    """A server on free ports, ready on every process: (process, target, its processes' /metrics URLs).
    The bench sets the server's --metrics-port; process i of a --processes server serves metrics_port + i."""
    from disco.service.config import ServeConfig

    env = spawned_env(dict(os.environ))
    n = ServeConfig.from_args(server_args, env).processes  # flags or DISCO_PROCESSES, as the server reads them
    port, metrics_port = free_port(), free_ports(n)
    target, urls = f"127.0.0.1:{port}", [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(n)]
    with tempfile.TemporaryFile() as log:  # the server's log, for its reason should it not come up (the server
        # writes on through a descriptor of its own)
        proc = subprocess.Popen([sys.executable, "-m", "disco.service.server", "--host", "127.0.0.1", "--port",
                                 str(port), *server_args, "--metrics-port", str(metrics_port),
                                 "--metrics-host", "127.0.0.1", "--health-port", "0"],  # BENCH_SETS, all given
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            wait_ready(target, urls, proc, log=log)
        except BaseException:  # SIGTERM or Ctrl-C while it warms up (main's stop is not set up yet)
            proc.kill()
            proc.wait()
            raise
    return proc, target, urls


def memory_soak(a: argparse.Namespace, pid: int) -> dict[str, Any]:
    """Mixed load for a.memory_s seconds; resident memory sampled every 10 s after a warm-up window."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(10):
            samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))

    req = requests_for(a.endpoint, a.inputs, "compress", 64)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    asyncio.run(closed_loop(a.endpoint, "Compress", req, 8, a.memory_s, 20.0, connections=a.connections))
    stop.set()
    sampler.join()
    after_warmup = [s for s in samples if s[0] >= 20]
    first, last = after_warmup[0][1], after_warmup[-1][1]
    peak = max(s[1] for s in after_warmup)
    return {"seconds": a.memory_s, "samples": samples, "rss_first_bytes": first, "rss_last_bytes": last,
            "growth": round(last / first - 1, 4), "peak_over_first": round(peak / first - 1, 4), "target": 0.05}


def _col(c: dict[str, Any], key: str, width: int, digits: int) -> str:
    return f"{c[key]:>{width}.{digits}f}" if key in c else f"{'-':>{width}}"


def _pair(c: dict[str, Any], what: str, width: int, digits: int) -> str:
    """'service/NoOp' of CPU ms per request (server + load generator), of cores busy, or of the event loop's
    (its CPU ms per request, its cores busy); '-' where unmeasured."""
    key = {"cores": "cores_used", "loop": "server_loop_ms", "loop_cores": "loop_cores"}.get(what)

    def value(prefix: str) -> str:
        if key is not None:
            v = c.get(prefix + key)
        elif f"{prefix}server_cpu_ms" in c:
            v = c[f"{prefix}server_cpu_ms"] + c[f"{prefix}client_cpu_ms"]
        else:
            v = None
        return "-" if v is None else f"{v:.{digits}f}"
    return f"{value(''):>{width}}/{value('noop_'):<{width}}"


def print_table(a: argparse.Namespace, closed: list[dict[str, Any]], opened: list[dict[str, Any]],
                memory: dict[str, Any] | None, out: IO[str]) -> None:
    """The cases as tables, with notes on them and the memory soak's result."""
    cases = closed + opened
    if closed:
        print(f"{'direction':>10} {'img/req':>7} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
              f"{'service':>10} {'limit':>10} {'ratio':>6} {'target':>6} {'unit':>5} {'rounds':>11}", file=out)
    for c in closed:
        svc = c.get("service_images_per_s") if c["images_per_request"] > 1 else c["service_requests_per_s"]
        lim = c.get("raw_ort_images_per_s") or c.get("noop_requests_per_s")
        unit = "img/s" if c["images_per_request"] > 1 else "req/s"
        print(f"{c['direction']:>10} {c['images_per_request']:>7} {c['concurrency']:>4} {c['p50_ms']:>8.2f} "
              f"{c['p99_ms']:>8.2f} {c['p99_over_p50']:>7.2f} {svc:>10.0f} {lim:>10.0f} {c['ratio']:>6.2f} "
              f"{c['target'] if c['target'] is not None else '-':>6} {unit:>5} {_rounds(c):>11}", file=out)
    if opened:
        print(f"{chr(10) if closed else ''}open loop, single-image requests sent at a rate ({a.request_distribution} gaps); "
              "late: p99 of how long a send left after its\nscheduled time (large: the load generator fell behind); in flight: most calls "
              "outstanding at once", file=out)
        print(f"{'direction':>10} {'rate':>8} {'achieved':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
              f"{'late ms':>8} {'in flight':>9} errors", file=out)
        for c in opened:
            errors = ",".join(f"{k}:{v}" for k, v in sorted(c["errors"].items())) or "-"
            print(f"{c['direction']:>10} {c['request_rate']:>8.0f} {c['service_requests_per_s']:>9.0f} "
                  f"{c['p50_ms']:>8.2f} {c['p90_ms']:>8.2f} {c['p99_ms']:>8.2f} {c['p99_over_p50']:>7.2f} "
                  f"{c['send_lag_p99_ms']:>8.2f} {c['peak_in_flight']:>9} {errors}", file=out)
    if any("server_handler_ms" in c for c in closed):
        print("\nwhere the time goes, mean ms per request (queue: per batcher part; outside = latency - handler,\n"
              "the gRPC stack and the client; ideal: the ratio if the handler did nothing but the compute; cpu: CPU ms\n"
              "per request of server + load generator, service / NoOp; cores: cores busy, service / NoOp; ceiling:\n"
              "the ratio if each request cost the NoOp's CPU plus the compute's, on as many cores as the NoOp kept busy;\n"
              "bound: the same on every core of this machine (a spawned server); loop: the event loop's thread, its CPU\n"
              "ms per request and its cores busy, service / NoOp: busy near 1 is loop-bound)", file=out)
        print(f"{'direction':>10} {'img/req':>7} {'conc':>4} {'latency':>8} {'handler':>8} {'compute':>8} {'queue':>8} "
              f"{'rows/run':>8} {'outside':>8} {'noop lat':>8} {'noop hdl':>8} {'ideal':>6} {'cpu':>11} {'cores':>9} "
              f"{'ceiling':>7} {'bound':>6} {'loop':>11} {'loop busy':>9}", file=out)
        for c in closed:
            if "server_handler_ms" not in c:
                continue
            print(f"{c['direction']:>10} {c['images_per_request']:>7} {c['concurrency']:>4} {c['mean_ms']:>8.3f} "
                  f"{c['server_handler_ms']:>8.3f} {c['server_compute_ms']:>8.3f} {c['server_queue_ms_per_part']:>8.3f} "
                  f"{c['mean_batch_rows']:>8.1f} {c['mean_ms'] - c['server_handler_ms']:>8.3f} "
                  f"{_col(c, 'noop_mean_ms', 8, 3)} {_col(c, 'noop_handler_ms', 8, 3)} {_col(c, 'ideal_ratio', 6, 2)} "
                  f"{_pair(c, 'cpu', 5, 3)} {_pair(c, 'cores', 4, 2)} {_col(c, 'cpu_ceiling_ratio', 7, 2)} "
                  f"{_col(c, 'cpu_bound_ratio', 6, 2)} {_pair(c, 'loop', 5, 3)} {_pair(c, 'loop_cores', 4, 2)}", file=out)
    for c in cases:  # closed and open loop alike (an open-loop case has a rate, not a concurrency: a KeyError here
        # lost a --processes run's output, a review)
        at = f"at concurrency {c['concurrency']}" if "concurrency" in c else f"at {c['request_rate']:g} requests/s"
        if "process_shares" in c:
            split = lambda key, c=c: " / ".join(f"{x:.2f}" for x in c[key])  # noqa: E731
            print(f"note: the {c['direction']} case with {c['images_per_request']} images per request {at}: "
                  f"server processes answered {split('process_shares')} of its requests"
                  + (f" (NoOp: {split('noop_process_shares')})" if "noop_process_shares" in c else ""), file=out)
        shared = {k: c[k] for k in ("other_requests", "noop_other_requests") if k in c}
        if shared:
            print(f"note: during the {c['direction']} case {at} the target answered "
                  + " and ".join(f"{n} {'NoOp' if k.startswith('noop') else 'service'} requests" for k, n in shared.items())
                  + " that this bench did not send; its server-side figures count them too (measure a quiet target)", file=out)
    if memory:
        print(f"memory: rss {memory['rss_first_bytes'] / 2**20:.1f} -> {memory['rss_last_bytes'] / 2**20:.1f} MiB "
              f"over {memory['seconds']:.0f} s ({100 * memory['growth']:+.2f}%, peak {100 * memory['peak_over_first']:+.2f}%)", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco bench", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="", help="a running server; default: spawn one (needs the [serve] extra)")
    p.add_argument("--metrics-url", default="", help="the target's /metrics, for the server-side breakdown "
                   "(comma-separated: one per server process; a spawned server's are found by themselves); each is "
                   "read once before the run, which a URL that is not a disco server's /metrics stops")
    security_flags(p)  # for a running --target
    p.set_defaults(token=None)  # DISCO_TOKEN, the clients' token, is for a --target only (below), not a spawned server
    p.add_argument("--server-args", default="", help="extra flags for the spawned server, e.g. '--max-batch 64' or "
                   "'--processes 2'; not --host, --port, --metrics-port or --metrics-host: the bench sets them (free "
                   "ports on 127.0.0.1) and waits for the server there")
    p.add_argument("--repository", type=Path, help="model repository for the raw ONNX Runtime limit (default embedded)")
    p.add_argument("--model", default="", help="NAME or NAME/VERSION of the model under test (default: the target's "
                   "default model); its requests name it, and the raw ONNX Runtime limit runs it from --repository")
    p.add_argument("--images", type=Path, help="a folder of image files in the model's size for the requests to carry "
                   "(cycled); default: dSprites shapes in the model's size")
    p.add_argument("--directions", default="compress,decompress", help="the methods measured: compress, "
                   "decompress or both, comma-separated")
    p.add_argument("--batch-images", type=int, default=64, help="images per batched request, at least 2 (0: no "
                   "batched cases; single-image requests are the single-image cases, measured against the NoOp)")
    p.add_argument("--batched-concurrency", default="4", help="concurrency levels of the batched cases")
    p.add_argument("--single-concurrency", default="1,8,32", help="concurrency levels of the single-image cases")
    p.add_argument("--connections", type=int, default=0, help="TCP connections the callers share (a server "
                   "with --processes N needs several: SO_REUSEPORT balances connections, not calls; they are spread "
                   "evenly over its processes); 0: one per process of the target (ListModels says how many)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per case (and per limit)")
    p.add_argument("--count", type=int, default=0, help="count windows instead: requests measured per case (and per "
                   "limit), cut into --rounds windows; a closed-loop count window lasts the time its callers were busy "
                   "with its requests, per caller (--duration is not read)")
    p.add_argument("--request-rate", default="", help="also open-loop cases of single-image requests at these rates "
                   "(requests/s, comma-separated), sent whatever the answers: latency at a given load; an overload "
                   "answer (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is counted, any other error fails the run")
    p.add_argument("--request-distribution", choices=["constant", "poisson"], default="constant",
                   help="gaps between the open loop's sends")
    p.add_argument("--rounds", type=int, default=3, help="windows the duration is cut into, service and limit "
                   "taking turns, so that a drift in the machine's speed weighs on both alike")
    p.add_argument("--stability", type=float, default=0.0, help="percent: after --rounds, add rounds until each of "
                   "the last 3 rounds' ratios is within it of their mean (perf_analyzer's stability criterion; 0: off)")
    p.add_argument("--max-rounds", type=int, default=10, help="most rounds per case with --stability")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before a case's first round (the "
                   "service's window and its NoOp's each), and before an open-loop case; later rounds warm up for the "
                   "least of it and 0.2 s, the server being warm by then. A closed-loop window also waits until every "
                   "caller has had an answer (an old model version loads on its first request)")
    p.add_argument("--memory-s", type=float, default=0.0, help="also soak this long and report resident memory")
    p.add_argument("--csv", type=Path, help="also write the cases to this CSV file, one row each, closed and open "
                   "loop told apart by `kind` ('-': standard output, the table then going to standard error)")
    p.add_argument("--json", type=Path, help="also write the run to this JSON file: the machine, the flags that "
                   "shaped it, `cases` (closed loop: latency, rate, the limit and ratio, the target) and `rate_cases` "
                   "(open loop, --request-rate: latency, rate kept up with, errors, peak_in_flight); each case's "
                   "`kind` says which ('-': standard output, the table then going to standard error)")
    a = p.parse_args(argv)
    if a.token is None and a.target:
        a.token = os.environ.get("DISCO_TOKEN")
    directions = a.directions.split(",")
    if not set(directions) <= {"compress", "decompress"} or len(set(directions)) != len(directions):
        p.error(f"--directions {a.directions!r}: expected compress, decompress or both, comma-separated, each once")
    if a.count < 0:
        p.error(f"--count {a.count}: expected 0 (time windows) or a number of requests")
    for flag, value, low in (("--duration", a.duration, 0.0), ("--warmup", a.warmup, 0.0), ("--memory-s", a.memory_s, 0.0)):
        above = flag == "--duration" and not a.count  # count windows do not read --duration: 0 is fine there
        if not (low < value < math.inf if above else low <= value < math.inf):  # NaN fails both
            p.error(f"{flag} {value}: expected a finite number of seconds, {'above' if above else 'at least'} 0"
                    + (" (or --count)" if above else ""))
    if a.memory_s and a.memory_s < 30:  # the soak warms up for 20 s, then samples every 10 s
        p.error(f"--memory-s {a.memory_s}: expected 0 (no soak) or at least 30 s (20 s of warm-up, then a sample "
                "every 10 s)")
    if a.memory_s and a.target:
        p.error("--memory-s reads the server's resident memory: it needs a spawned server, not --target")
    if a.batch_images < 0 or a.batch_images == 1:  # 1 made no batched case, without a word
        p.error(f"--batch-images {a.batch_images}: expected 0 (no batched cases) or at least 2 images per batched "
                "request (single-image requests are the single-image cases: --single-concurrency)")
    levels: dict[str, list[int]] = {}
    for flag, text in (("--batched-concurrency", a.batched_concurrency), ("--single-concurrency", a.single_concurrency)):
        try:
            levels[flag] = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            p.error(f"{flag} {text!r}: expected whole numbers of callers, comma-separated")
        if any(c < 1 for c in levels[flag]):
            p.error(f"{flag} {text!r}: every concurrency level must be at least 1")
    if str(a.json) == str(a.csv) == "-":
        p.error("--json - and --csv -: standard output can take one of them")
    for flag, path in (("--json", a.json), ("--csv", a.csv)):  # found now, not after the run it would have recorded
        problem = "" if path is None or str(path) == "-" else unwritable(path)  # "-": standard output
        if problem:
            p.error(f"{flag} {path}: {problem}")
    flags = [arg.split("=", 1)[0] for arg in a.server_args.split() if arg.startswith("--")]  # never a value: a token
    secured = [flag for flag in flags if flag in PLAINTEXT_ONLY]
    if secured:
        p.error(f"--server-args: {', '.join(secured)}: a spawned server serves plaintext without "
                "auth (its DISCO_TLS_*/DISCO_AUTH_* variables are dropped too); to measure TLS or auth, start the "
                "server yourself and give --target with --tls-* and --token")
    ours = [flag for flag in flags if flag in BENCH_SETS]
    if ours:  # the server would listen where the bench does not wait for it (for 2 minutes)
        p.error(f"--server-args: {', '.join(ours)}: the bench sets the spawned server's "
                f"{', '.join(sorted(BENCH_SETS))} itself (free ports on 127.0.0.1, no health port); leave them out")
    if a.connections < 0:
        p.error(f"--connections {a.connections}: expected 0 (one per server process) or more")
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: expected at least 1")
    if not a.stability >= 0 or (a.stability and a.max_rounds < max(a.rounds, 3)):  # NaN too (a review)
        p.error(f"--stability {a.stability} --max-rounds {a.max_rounds}: expected a percentage >= 0 and at least "
                f"max(--rounds, 3) rounds")
    if a.stability and a.count:
        p.error("--stability adds rounds, --count fixes the requests measured: choose one")
    try:
        rates = [float(v) for v in a.request_rate.split(",") if v]
    except ValueError:
        p.error(f"--request-rate {a.request_rate!r}: expected requests per second, comma-separated")
    if any(not 0 < r < float("inf") for r in rates):
        p.error(f"--request-rate {a.request_rate!r}: every rate must be above 0")
    plan = [(n, c) for n in ([a.batch_images] if a.batch_images else []) for c in levels["--batched-concurrency"]]
    plan += [(1, c) for c in levels["--single-concurrency"]]
    callers = max((c for _, c in plan), default=0)
    if a.count and plan and a.count < a.rounds:  # an open loop (--request-rate) sends the whole count, in no rounds
        p.error(f"--count {a.count}: expected 0 (time windows) or at least one request per round ({a.rounds})")
    if a.count and a.count // a.rounds < callers:  # callers with nothing to send; a raw window too short to run
        p.error(f"--count {a.count}: {a.count // a.rounds} requests per window (--rounds {a.rounds}) is fewer than "
                f"the {callers} callers of the largest concurrency; expected at least {a.rounds * callers}")
    if not plan and not rates:
        p.error("no case to measure: give --batch-images above 1 with --batched-concurrency, --single-concurrency, "
                "or --request-rate")
    proc = None
    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key or a.token:
        if not a.target:
            p.error("--tls-* and --token are for a running --target; a spawned server serves plaintext")
        try:
            tls = TLS.of(a.tls_ca, a.tls_cert, a.tls_key)
            if tls is not None:
                tls.credentials()  # the files read now: a missing one is named here, not by a traceback mid-run
        except (ValueError, OSError) as exc:
            p.error(str(exc))
    if a.metrics_url and a.target:  # a spawned server's are found by themselves
        try:
            problem = check_metrics([u.strip() for u in a.metrics_url.split(",") if u.strip()])
        except ImportError:
            p.error("--metrics-url reads Prometheus text with prometheus-client, of the [serve] extra")
        if problem:
            p.error(f"--metrics-url: {problem}; expected the /metrics of each process of the target, comma-separated "
                    "(http://HOST:PORT/metrics, PORT its --metrics-port)")
    a.shared_cores = 0  # the cores the server shares with this load generator: known for a spawned one only
    if not a.target:
        from disco.service.config import available_cores  # spawning needs the [serve] extra anyway

        extra = ["--repository", str(a.repository)] if a.repository else []  # the raw limit's model is the server's
        proc, a.target, urls = spawn(a.server_args.split() + extra)
        a.metrics_url = ",".join(urls)
        a.shared_cores = available_cores()
    cases: list[dict[str, Any]] = []  # closed loop: the ratio to its limit, against its target
    rate_cases: list[dict[str, Any]] = []  # open loop (--request-rate): latency at a given load, no limit
    memory, failed = None, ""
    try:
        warn_plaintext_token(a.target, tls, a.token, stacklevel=2)
        a.endpoint = Endpoint(a.target, tls, a.token or "")
        a.inputs = resolve_inputs(a.endpoint, a.model, a.images, a.batch_images)
        processes = processes_of(a.endpoint)
        a.connections = a.connections or processes
        named = [u for u in (a.metrics_url or "").split(",") if u.strip()]
        if named and len(named) < processes:  # a review: the breakdown of one process of two, as the server's, silently
            p.error(f"--metrics-url names {len(named)} /metrics, and the target runs {processes} processes (ListModels' "
                    "server_processes): give each process's, comma-separated (process i serves --metrics-port + i)")
        for d, n, conc in ((d, n, conc) for d in directions for n, conc in plan):
            cases.append(run_case(a, d, n, conc))
        for d, r in ((d, r) for d in directions for r in rates):
            rate_cases.append(run_rate_case(a, d, r))
        memory = memory_soak(a, proc.pid) if (a.memory_s and proc) else None
    except (grpc.RpcError, WindowFailed) as exc:  # e.g. --batch-images past the server's --max-images-per-request
        if isinstance(exc, WindowFailed):
            failed = str(exc)
        else:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            failed = f"a request failed: {getattr(code, 'name', code)}: {details}"
        if not cases + rate_cases:
            p.exit(1, f"disco bench: {failed}\n")
        # the cases measured so far are reported and written (a long run lost them all), the run marked failed
        print(f"disco bench: {failed}; the run stopped there, after {len(cases + rate_cases)} case(s), which follow",
              file=sys.stderr)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    out = sys.stderr if "-" in (str(a.json), str(a.csv)) else sys.stdout  # "-": the JSON or CSV is there
    print_table(a, cases, rate_cases, memory, out)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}", "cpu": cpu_model(),
              "target": a.target, "model": a.inputs.batcher, "images": str(a.images or "synthetic dSprites shapes"),
              "server_args": a.server_args, "connections": a.connections,
              "duration_s": None if a.count else a.duration, "count": a.count,  # what shaped the windows
              "cases": cases, "rate_cases": rate_cases,
              "memory": memory, **({"failed": failed} if failed else {})}
    if a.json:
        write(a.json, json.dumps(finite(result), indent=1, allow_nan=False) + "\n")  # no NaN: not JSON
    if a.csv:
        rows = cases + rate_cases  # one table: `kind` tells them apart
        keys = sorted({k for c in rows for k in c})
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=keys)
        w.writeheader()
        w.writerows([finite(c | {"errors": ";".join(f"{k}:{v}" for k, v in c["errors"].items())} if "errors" in c else c)
                     for c in rows])
        write(a.csv, text.getvalue())
    return 1 if failed else 0


def finite(value: Any) -> Any:
    """value with every NaN or infinite float as None (null in JSON, empty in CSV): a figure with nothing to measure
    (no batcher runs for a request answered from the decode cache, no latency where every call failed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def unwritable(path: Path) -> str:
    """Why write() could not put a file at path, or "", found without creating anything: the file, if there, is
    writable, and the folder write() would make it in (or the nearest one there, under which write() makes the
    rest) takes a new file. A file made to check it was left empty by a run that failed before writing."""
    if path.is_dir():
        return "is a folder; expected a file to write"
    if path.exists() and not os.access(path, os.W_OK):
        return "is read-only"
    if _special(path):  # a pipe or device (`--json >(jq .)`): written in place, nothing made beside it
        return ""
    try:
        path = path.resolve()  # a link: its target's folder takes the file
    except (OSError, RuntimeError) as exc:  # a loop of links
        return f"cannot be resolved ({exc})"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):  # nameless where the system can: nothing to clean up
            pass
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc})"
    return ""


def _special(path: Path) -> bool:
    """An existing file that is not a regular one (a named pipe, /dev/fd/N of a shell's >(...), a device), or a
    descriptor's name (/dev/stdout, /dev/fd/N, /proc/self/fd/N), whatever it stands for: renamed over, a regular
    file a descriptor stands for (`>> log`) would be replaced, and what was written through it lost."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (or a loop of links): made as a new file, if it can be
        return False
    return str(path).startswith(("/dev/", "/proc/")) or not stat.S_ISREG(mode)


def write(path: Path, text: str) -> None:
    """text to the file, whole or not at all: written beside it, then renamed over it, so that a reader never
    sees half of it and a write that fails leaves the file as it was; or to standard output for "-"."""
    if str(path) == "-":
        sys.stdout.write(text)
        return
    if _special(path):  # a pipe, a device, a descriptor: written in place (appended: /dev/fd/N of `>>` keeps its start)
        with open(path, "a") as f:
            f.write(text)
        return
    path = path.resolve()  # a link stays a link: its target is replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")  # same folder: same file system, so the rename is atomic
    try:
        part.write_text(text)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
