"""Service configuration: one frozen dataclass, built once from flags and DISCO_* environment variables."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NoReturn

from disco.service.container import MAX_BATCH
from disco.service.repository import SERVING_KEYS, bound_text

_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False, "": False}
_SECRET = {"auth_token"}  # fields whose value --help must not show
_MAX_MS = (2**31 - 1) / 1000  # gRPC takes these durations as int32 milliseconds
_INT32_MAX = 2**31 - 1  # gRPC's int options and the proto's counts
_MAX_THREADS = 1024  # ONNX Runtime threads per session, and processes per port: far past any machine here
HEARTBEAT_S = 1.0  # a process of --processes writes to its heartbeat pipe this often (service/server.py)
_MAX_CACHE_MB = 2**30  # 1 PiB: past any machine, and its bytes still an exact integer
_MIN_POLL_S = 1.0  # a repository poll reads every version's files: 37 ms each here, so 1 s costs a core 4%
# Seconds settings: (low, high); each must also be finite.
# reload_interval_s: also 0 (off) or at least _MIN_POLL_S
_SECONDS = {"reload_interval_s": (0, 86400), "grace_s": (0, _MAX_MS), "drain_delay_s": (0, _MAX_MS),
            "keepalive_s": (0.001, _MAX_MS), "min_client_ping_s": (0, _MAX_MS), "max_connection_age_s": (0.001, _MAX_MS),
            "max_connection_age_grace_s": (0, _MAX_MS), "watchdog_s": (0, 86400)}


_CLIENT_VARIABLES = {"DISCO_TARGET", "DISCO_TOKEN"}  # the client commands' (disco compress ...): not the server's


def may_share(host: str, other: str) -> bool:
    """Whether a port bound on both addresses could be the same socket address: the same address, a wildcard that
    covers the other (IPv6's "::" takes IPv4 too, dual stack), or a name, which may resolve to the other."""
    try:
        a, b = ipaddress.ip_address(host.strip("[]")), ipaddress.ip_address(other.strip("[]"))
    except ValueError:  # "localhost", a hostname
        return True
    a, b = (getattr(x, "ipv4_mapped", None) or x for x in (a, b))  # ::ffff:127.0.0.1 is 127.0.0.1

    def covers(x: ipaddress.IPv4Address | ipaddress.IPv6Address, y: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return x.is_unspecified and (x.version == 6 or y.version == 4)

    return a == b or covers(a, b) or covers(b, a)


@dataclass(frozen=True)
class ServeConfig:
    repository: str = ""  # model repository root; empty serves the embedded default model
    host: str = "0.0.0.0"  # address to bind
    port: int = 50051  # gRPC port; 0 picks a free one
    metrics_port: int = 8000  # Prometheus /metrics HTTP port; 0 turns metrics serving off
    metrics_host: str = ""  # address /metrics binds; empty: host's (a server kept to loopback keeps its metrics there)
    health_port: int = 0  # grpc.health.v1 alone, in plaintext, on this port of host too (0: off): Kubernetes' native
    # gRPC probes cannot speak TLS, so a TLS server's probes use this port
    default_model: str = ""  # model used when a request names none; empty: dsprites when serving the
    # embedded models, else the first by name
    intra_op_threads: int = 1  # ONNX Runtime threads per session
    inter_op_threads: int = 1  # ONNX Runtime threads running independent graph nodes at once (above 1: parallel
    # execution mode); these models are one chain of nodes, so 1 loses nothing
    workers: int = 0  # threads running ONNX Runtime batches (shared by every batcher); 0: one per core of the
    # process's CPU affinity (a CFS quota is not seen: deploy/k8s sets it from the CPU request). Threads beyond
    # the cores only time-slice the runs: on 2 cores, 4 threads computed batched Compress at 0.61-0.63 x raw
    # ONNX Runtime and 2 threads at 0.69 (README: Measured).
    max_batch: int = 64  # rows per ONNX Runtime run; larger requests are split
    # rows a batcher may hold waiting; beyond it RESOURCE_EXHAUSTED. Two requests of --max-images-per-request: at
    # 4096 one bulk caller filled the queue, and a second one at the same moment was refused
    max_queue: int = 8192
    max_delay_ms: float = 0.0  # extra wait for fuller batches; 0 runs what is queued at once
    batch_workers: int = 4  # batches in flight per model and direction (README: Serving)
    gather_turns: int = 24  # single-image requests batch on the event loop until this many of its turns bring no
    # new one (service/batcher.py; README: Measured); 0: each runs alone, at once
    providers: str = "cpu"  # ONNX Runtime execution providers in order of preference: "cuda,cpu" or "cpu"
    graph_optimization: str = "all"  # ONNX Runtime graph optimisation: none, basic, extended, all
    io_binding: str = "auto"  # ONNX Runtime I/O binding: auto (on with CUDA), on, off
    reload_interval_s: float = 0.0  # poll the repository for new or changed versions, read it for unserved codes; 0: only on SIGHUP
    processes: int = 1  # server processes sharing the port (SO_REUSEPORT). Process i serves metrics on
    # metrics_port + i; --workers is divided between them, and ONNX Runtime threads capped at their share of cores
    reuse_port: bool = False  # bind with SO_REUSEPORT (set for the processes of --processes)
    port_processes: int = 1  # processes sharing the port, this one included (set for the processes of --processes);
    # ListModels tells clients, which spread their connections over them
    parent_pid: int = 0  # the --processes server this one serves for (set for its processes): once that process is
    # gone, this one drains and exits, not left serving the port on its own; 0: none
    watchdog_s: float = 30.0  # with --processes: a process whose event loop has not run for this long (hung, not
    # dead: a deadlock, a stuck native call, SIGSTOP) is killed, and the server stops as when one dies; 0: off
    heartbeat_fd: int = -1  # the pipe this process tells its --processes server it runs on (set for its processes)
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC receive/send limit; at start at least what ListModels and one image of each model take
    max_images_per_request: int = 4096  # larger batches are refused with INVALID_ARGUMENT
    decode_cache_mb: float = 0.0  # Decompress answers single codes it decoded before from this many MiB of decoded
    # images (least recently used out first; per process, and per snapshot: a reload starts empty); 0: off
    max_pending_rpcs: int = 4096  # calls received but not yet picked up (they wait in gRPC core while the event
    # loop is busy); beyond it gRPC core refuses new calls, answering CANCELLED. 0 keeps gRPC's own default, which
    # drops calls at random from 1,000 pending on and all past 3,000 (benchmarks/burst.py, README: Measured).
    max_old_versions: int = 4  # versions older than their model's latest (all models together) kept loaded for
    # old codes (about 40 MiB each for the embedded models, benchmarks/old_versions.py); the least recently used
    # is unloaded beyond it
    grace_s: float = 10.0  # on SIGTERM, how long in-flight calls may take to finish
    drain_delay_s: float = 0.0  # on SIGTERM, how long to go on serving while health says NOT_SERVING, before new
    # calls are refused: a load balancer that probes health stops sending first (Kubernetes: a preStop pause)
    tls_cert: str = ""  # PEM certificate chain; with tls_key, serve TLS instead of plaintext
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # PEM CA bundle; when set, clients must present a certificate it signed (mTLS)
    auth_token: str = field(default="", repr=False)  # bearer token every call but health must carry; prefer
    # DISCO_AUTH_TOKEN or the file (not in repr(): a logged config would show it)
    auth_token_file: str = ""  # file holding the bearer token (e.g. a mounted Kubernetes secret)
    keepalive_s: float = 60.0  # server pings idle connections this often
    min_client_ping_s: float = 10.0  # clients may ping no more often than this (align client keepalive)
    max_connection_age_s: float = 300.0  # connections are recycled so clients re-resolve and rebalance
    max_connection_age_grace_s: float = 3600.0  # calls running on a connection being recycled get this long to
    # finish before it closes (gRPC then ends them UNAVAILABLE); a long bulk stream keeps its connection meanwhile

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> ServeConfig:
        """Flags win over DISCO_<FIELD> environment variables, which win over the defaults."""
        env = os.environ if env is None else env
        # no abbreviated flags: an error could not tell a flag given as --grace from DISCO_GRACE_S
        p = argparse.ArgumentParser(prog="disco serve", description="Serve Compress/Decompress over gRPC.",
                                    allow_abbrev=False)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            typ: Any = type(f.default)
            var = "DISCO_" + f.name.upper()
            raw = env.get(var)
            shown = ("set" if raw else "unset") if f.name in _SECRET else "%(default)s"  # --help never prints a secret
            help_ = f"{_HELP[f.name]} (env {var}, default {shown})"
            default: Any = f.default
            if raw is not None and typ is bool:
                default = _BOOL.get(raw.strip().lower(), _BadEnv(var, raw, "one of 1, true, yes, on, 0, false, no, off"))
            elif raw is not None:
                try:
                    default = typ(raw)
                except ValueError:
                    default = _BadEnv(var, raw, "an integer" if typ is int else "a number" if typ is float else typ.__name__)
            if typ is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            else:
                p.add_argument(flag, type=typ, default=default, help=help_)
        a = p.parse_args(argv)  # --help answers even with a bad variable; a flag given overrides one
        given = {arg.split("=", 1)[0] for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
        names = {f.name for f in fields(cls)}
        refuse = p.error

        def error(message: str) -> NoReturn:
            """p.error, saying where each setting it names that no flag gave came from: its DISCO_* variable (a
            secret's value never shown). A message may name two settings that disagree, either from a variable."""
            sources = []
            named = re.sub(r"'[^']*'|\"[^\"]*\"", "", message)  # flags, not values that happen to look like one
            for flag in dict.fromkeys(re.findall(r"--[a-z][a-z0-9-]*", named)):
                name = flag[2:].replace("-", "_")
                var = "DISCO_" + name.upper()
                if flag not in given and var in env and name in names:
                    value = "" if name in _SECRET else f"={env[var]!r}"
                    sources.append(f"{flag} from {var}{value}")
            if sources:
                message += f" ({'; '.join(sources)}; no flag given)"
            refuse(message)

        p.error = error  # type: ignore[method-assign]
        for f in fields(cls):
            value = getattr(a, f.name)
            if isinstance(value, _BadEnv):
                p.error(f"{value.var}={value.raw!r}: expected {value.expected}")
        cfg = cls(**{f.name: getattr(a, f.name) for f in fields(cls)})
        known = {"DISCO_" + f.name.upper() for f in fields(cls)} | _CLIENT_VARIABLES
        unknown = sorted(k for k in env if k.startswith("DISCO_") and k not in known)
        if unknown:  # a misspelled setting (DISCO_GRACE=30) would be ignored without a word
            logging.getLogger("disco.serve").warning(
                "ignoring environment variable(s) %s: no such setting (disco serve --help lists them)", ", ".join(unknown))
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            p.error("--tls-cert and --tls-key go together")
        if cfg.tls_client_ca and not cfg.tls_cert:
            p.error("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if not 0 <= cfg.decode_cache_mb <= _MAX_CACHE_MB:
            p.error(f"--decode-cache-mb {cfg.decode_cache_mb}: expected 0 (off) to {_MAX_CACHE_MB} MiB")
        if not 1 <= cfg.max_images_per_request <= MAX_BATCH:  # a batch container holds at most MAX_BATCH codes
            p.error(f"--max-images-per-request {cfg.max_images_per_request}: expected 1..{MAX_BATCH}")
        if cfg.max_old_versions < 0:
            p.error(f"--max-old-versions {cfg.max_old_versions}: expected 0 or more versions")
        if not 0 <= cfg.max_pending_rpcs <= _INT32_MAX:
            p.error(f"--max-pending-rpcs {cfg.max_pending_rpcs}: expected 0 (gRPC's default) to {_INT32_MAX} calls")
        for key, (kind, low, high) in SERVING_KEYS.items():  # the ranges a model's serving.json may set them to
            value = getattr(cfg, key)
            if not (math.isfinite(value) and low <= value <= high):
                p.error(f"--{key.replace('_', '-')} {value}: expected {'an integer' if kind is int else 'a number'} "
                        f"from {bound_text(low)} to {bound_text(high)}")
        for key, (low, high) in _SECONDS.items():
            value = getattr(cfg, key)
            if not (math.isfinite(value) and low <= value <= high):
                p.error(f"--{key.replace('_', '-')} {value}: expected {bound_text(low)} to {bound_text(high)} seconds")
        for flag, port in (("--port", cfg.port), ("--metrics-port", cfg.metrics_port), ("--health-port", cfg.health_port)):
            if not 0 <= port <= 65535:
                p.error(f"{flag} {port}: expected 0 to 65535")
        metrics_ports = range(cfg.metrics_port, cfg.metrics_port + cfg.processes) if cfg.metrics_port else range(0)
        if cfg.port and cfg.port in metrics_ports and may_share(cfg.host, cfg.metrics_host or cfg.host):
            # found only once models loaded, as "already in use"
            which = "--metrics-port" if cfg.port == cfg.metrics_port else \
                f"metrics port of process {cfg.port - cfg.metrics_port} (--metrics-port {cfg.metrics_port} + i)"
            p.error(f"--port {cfg.port} is also the {which}: give the metrics a port of their own")
        if cfg.health_port and (cfg.health_port == cfg.port or cfg.health_port in metrics_ports):
            # the same port with SO_REUSEPORT (--processes) would split the connections between the two servers
            p.error(f"--health-port {cfg.health_port} is also the {'--port' if cfg.health_port == cfg.port else 'metrics port'}"
                    ": give it a port of its own")
        for name in ("auth_token", "auth_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            flag, var = "--" + name.replace("_", "-"), "DISCO_" + name.upper()
            if name.startswith("auth") and (cfg.auth_token or cfg.auth_token_file):
                continue  # the other one turns auth on: an empty one changes nothing
            if not getattr(cfg, name) and (flag in given or env.get(var) == ""):  # e.g. a Secret with no value
                off = "token auth" if name.startswith("auth") else "mutual TLS" if name == "tls_client_ca" else "TLS"
                p.error(f"{flag} is empty, which would turn {off} off without a word: give a value, or leave it "
                        f"unset for no {off}")
        if cfg.auth_token and cfg.auth_token_file:  # one source of tokens: the other would be dropped unsaid
            p.error("--auth-token (or DISCO_AUTH_TOKEN) and --auth-token-file are both set: give one (the file may "
                    "hold several tokens, one per line)")
        if cfg.processes > 1 and cfg.port == 0:  # each process would pick a port of its own
            p.error(f"--port 0 with --processes {cfg.processes}: the processes share one port; give it")
        if cfg.metrics_port and cfg.metrics_port + cfg.processes - 1 > 65535:  # process i serves metrics_port + i
            p.error(f"--metrics-port {cfg.metrics_port} with --processes {cfg.processes}: the last process's port "
                    f"{cfg.metrics_port + cfg.processes - 1} is past 65535")
        if not 1024 <= cfg.max_message_bytes <= 2**31 - 1:
            p.error(f"--max-message-bytes {cfg.max_message_bytes}: expected 1024 to {2**31 - 1}")
        for flag, n in (("--processes", cfg.processes), ("--port-processes", cfg.port_processes),
                        ("--intra-op-threads", cfg.intra_op_threads), ("--inter-op-threads", cfg.inter_op_threads)):
            if not 1 <= n <= _MAX_THREADS:
                p.error(f"{flag} {n}: expected 1 to {_MAX_THREADS}")
        if cfg.parent_pid < 0:
            p.error(f"--parent-pid {cfg.parent_pid}: expected 0 (none) or a process id")
        if cfg.heartbeat_fd < -1:
            p.error(f"--heartbeat-fd {cfg.heartbeat_fd}: expected -1 (none) or a file descriptor")
        if 0 < cfg.watchdog_s < 2 * HEARTBEAT_S:
            p.error(f"--watchdog-s {cfg.watchdog_s}: expected 0 (off) or at least {bound_text(2 * HEARTBEAT_S)} s "
                    f"(a process tells it runs every {bound_text(HEARTBEAT_S)} s)")
        if 0 < cfg.reload_interval_s < _MIN_POLL_S:
            p.error(f"--reload-interval-s {cfg.reload_interval_s}: expected 0 (only on SIGHUP) or at least "
                    f"{bound_text(_MIN_POLL_S)} s (each poll reads every version's files)")
        if cfg.max_queue < cfg.max_images_per_request:
            p.error(f"--max-queue {cfg.max_queue} is below --max-images-per-request {cfg.max_images_per_request}: "
                    "a request the server takes could never fit the queue")
        if not 0 <= cfg.drain_delay_s < float("inf"):
            p.error(f"--drain-delay-s {cfg.drain_delay_s}: expected 0 or more seconds")
        if cfg.workers < 0:
            p.error(f"--workers {cfg.workers}: expected 0 (one per usable core) or more")
        if cfg.io_binding not in ("auto", "on", "off"):
            p.error(f"--io-binding {cfg.io_binding!r}: expected auto, on or off")
        if cfg.graph_optimization not in ("none", "basic", "extended", "all"):
            p.error(f"--graph-optimization {cfg.graph_optimization!r}: expected none, basic, extended or all")
        bad = [x for x in cfg.provider_list() if x not in ("cpu", "cuda")]
        if not cfg.provider_list():
            p.error(f"--providers {cfg.providers!r}: names no provider, expected a comma-separated list of cuda and cpu")
        if bad:
            p.error(f"--providers: unknown {bad}, expected a comma-separated list of cuda and cpu")
        return cfg

    def worker_threads(self) -> int:
        return self.workers or available_cores()

    def provider_list(self) -> list[str]:
        return [x.strip().lower() for x in self.providers.split(",") if x.strip()]


class _BadEnv:
    """A DISCO_* variable that does not parse, held as its setting's default until the flags are read: an error
    only when no flag overrides it (and not for --help)."""

    def __init__(self, var: str, raw: str, expected: str) -> None:
        self.var, self.raw, self.expected = var, raw, expected

    def __repr__(self) -> str:
        return f"{self.raw!r} from {self.var}, which does not parse"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_HELP = {
    "repository": "model repository root; empty serves the embedded default model",
    "host": "address to bind",
    "port": "gRPC port; 0 picks a free one",
    "metrics_port": "Prometheus /metrics HTTP port; 0 turns it off",
    "metrics_host": "address /metrics binds; empty: the same as --host",
    "health_port": "also serve grpc.health.v1 alone, in plaintext, on this port (0: off): for Kubernetes' native gRPC "
                   "probes of a TLS server, which cannot speak TLS",
    "default_model": "model used when a request names none; empty: dsprites for the embedded models, else the first by name",
    "intra_op_threads": "ONNX Runtime threads per session",
    "inter_op_threads": "ONNX Runtime threads per session for independent graph nodes (above 1: parallel execution "
                        "mode; a chain of nodes gains nothing)",
    "workers": "threads running ONNX Runtime batches; 0: one per core of the process's CPU affinity (a container "
               "CPU quota is not seen: set it to the pod's CPU)",
    "max_batch": "rows per ONNX Runtime run (larger requests are split); every size up to it is warmed before "
                 "SERVING, so start-up grows with it",
    "max_queue": "rows a batcher may hold waiting before RESOURCE_EXHAUSTED; at least --max-images-per-request",
    "max_delay_ms": "most a request waits for a fuller batch, from when it queued (every request, small ones too); "
                    "0 runs what is queued at once",
    "batch_workers": "batches in flight per model and direction",
    "gather_turns": "small requests (up to 4 images) gather into one run on the event loop until this many turns of "
                    "the loop bring no new one; 0: each runs alone, at once",
    "providers": "ONNX Runtime execution providers, comma-separated, in order (cuda,cpu)",
    "graph_optimization": "ONNX Runtime graph optimisation level: none, basic, extended, all",
    "io_binding": "ONNX Runtime I/O binding: auto (on where CUDA runs the session), on, off",
    "reload_interval_s": "seconds between repository polls for hot reload; 0 reloads only on SIGHUP",
    "processes": "server processes sharing the port (SO_REUSEPORT); process i serves metrics on --metrics-port + i, "
                 "--workers is divided between them and ONNX Runtime threads are capped at each one's share of the "
                 "cores",
    "reuse_port": "bind with SO_REUSEPORT so that several processes share the port",
    "port_processes": "processes sharing the port, this one included (set by --processes); ListModels reports it "
                      "so that clients can spread their connections over every process",
    "parent_pid": "the --processes server this process serves for (set by --processes): once that process is "
                  "gone, this one drains and exits; 0: none",
    "watchdog_s": "with --processes, a process whose event loop has not run for this many seconds (hung, not "
                  "dead) is killed and the server stops, as when a process dies; 0: off",
    "heartbeat_fd": "the pipe this process writes to while its event loop runs (set by --processes); -1: none",
    "max_message_bytes": "gRPC message size limit in bytes",
    "max_images_per_request": "largest batch one request may carry",
    "decode_cache_mb": "MiB of decoded images Decompress keeps by code and answers repeated codes from (LRU; per "
                       "process and snapshot); 0: off",
    "max_old_versions": "versions older than their model's latest (all models together) kept loaded to decode old "
                        "codes; beyond it the least recently used is unloaded (and loaded again when a code asks)",
    "max_pending_rpcs": "calls that may wait for the server to pick them up; beyond it gRPC core refuses new calls "
                        "with CANCELLED (0: gRPC's default, random drops from 1,000 on)",
    "grace_s": "seconds in-flight calls may take to finish on SIGTERM (connection recycling has its own, "
               "--max-connection-age-grace-s)",
    "drain_delay_s": "seconds to go on serving after SIGTERM while health reports NOT_SERVING, before new calls are "
                     "refused and the grace starts (for load balancers that probe health; Kubernetes: preStop)",
    "tls_cert": "PEM certificate chain file; with --tls-key, serve TLS (the TLS files are read again when they "
                "change: new connections get the renewed certificate)",
    "tls_key": "PEM private key file",
    "tls_client_ca": "PEM CA file; when set, require client certificates it signed (mTLS)",
    "auth_token": "bearer token required on every call but health; a flag shows in `ps`: prefer DISCO_AUTH_TOKEN "
                  "or --auth-token-file",
    "auth_token_file": "file holding the bearer token, or several, one per line (read again when it changes)",
    "keepalive_s": "seconds between server keepalive pings on idle connections",
    "min_client_ping_s": "the shortest client keepalive interval the server accepts",
    "max_connection_age_s": "seconds after which a connection is gracefully recycled",
    "max_connection_age_grace_s": "seconds the calls running on a connection being recycled may take to finish "
                                  "(a long stream's connection lives on meanwhile); past it they end UNAVAILABLE",
}
