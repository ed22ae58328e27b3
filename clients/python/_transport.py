"""Channels and retries: one place for TLS, tokens, load balancing, keepalive and backoff."""
from __future__ import annotations

import ipaddress
import math
import numbers
import random
import re
import ssl
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from disco.client.errors import InsecureTokenWarning

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default limit (disco serve --max-message-bytes)
_jitter = random.Random()
KEEPALIVE_S = 30.0  # above the server's min_client_ping_s (10 s), so the server never refuses our pings


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter (sleep ~ U(0, min(cap, base * 2**attempt))).

    UNAVAILABLE is always retried (the server is restarting, or not there yet); the signs of an overloaded
    server only when `on_resource_exhausted` (retrying adds load): RESOURCE_EXHAUSTED (its queue is full) and
    CANCELLED (gRPC core sheds calls past the server's --max-pending-rpcs with it; the client never cancels a
    call it retries, and every DisCo call is safe to repeat). Nothing else is retried: a bad argument stays bad.
    Every call is bounded by its deadline, retries included.

    `budget_tokens` throttles retries as gRPC's retryThrottling does (gRFC A6), for a fleet of clients that must
    not multiply a lasting overload by `max_attempts`: a client holds that many tokens, each failed attempt with
    a retryable code takes one (whether or not a retry follows), each successful call gives `budget_ratio` back,
    and retries stop while half or fewer are left (they resume after enough successes). Streams are not retried
    and do not count. The bucket is per Client or AsyncClient: share one client, as gRPC shares one per server.
    Off by default, as in gRPC: a burst then retries until it gets through, where a budget would fail most of it
    fast (benchmarks/retry_storm.py measures both).
    """

    max_attempts: int = 5
    base_s: float = 0.05
    cap_s: float = 2.0
    on_resource_exhausted: bool = False
    budget_tokens: float = 0.0  # gRFC A6 maxTokens, in (0, 1000]; 0: retries are not throttled
    budget_ratio: float = 0.1  # gRFC A6 tokenRatio (> 0, 3 decimals): the budget holds while failures stay under
    # budget_ratio per success

    def __post_init__(self) -> None:
        whole = isinstance(self.max_attempts, numbers.Integral) and not isinstance(self.max_attempts, bool)
        if not whole or self.max_attempts < 1 or not 0 <= self.base_s <= self.cap_s < math.inf:  # NaN fails too
            raise ValueError(f"invalid RetryPolicy {self}: need a whole max_attempts >= 1 and 0 <= base_s <= cap_s, "
                             "finite")
        if not 0 <= self.budget_tokens <= 1000 or not self.budget_ratio >= 0.001:
            raise ValueError(f"invalid RetryPolicy {self}: need 0 <= budget_tokens <= 1000 (0: off) "
                             "and budget_ratio >= 0.001")

    def retryable(self, code: grpc.StatusCode) -> bool:
        return code == grpc.StatusCode.UNAVAILABLE or (
            self.on_resource_exhausted and code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED))

    def backoff(self, attempt: int) -> float:
        return _jitter.uniform(0, min(self.cap_s, self.base_s * 2**attempt))


class RetryBudget:
    """The token bucket of one client (RetryPolicy.budget_tokens, budget_ratio); thread-safe. Kept in integer
    thousandths of a token, as gRPC core keeps it, so that adding ratios never drifts across the threshold."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._max = round(policy.budget_tokens * 1000)
        self._ratio = round(policy.budget_ratio * 1000)
        self._milli = self._max
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._milli / 1000

    def failed(self) -> bool:
        """An attempt failed with a retryable code: take a token; may the call retry?"""
        if not self._max:
            return True
        with self._lock:
            self._milli = max(0, self._milli - 1000)
            return 2 * self._milli > self._max

    def succeeded(self) -> None:
        if self._max:
            with self._lock:
                self._milli = min(self._max, self._milli + self._ratio)


def is_local(target: str) -> bool:
    """Whether every address of a target is this machine's (a Unix socket, localhost, a loopback address)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    body = re.sub(r"^(dns:(//[^/]*/|/)?|ipv4:|ipv6:)", "", target.lower())  # dns:host, dns:///host, dns://ns/host
    for address in (a.strip() for a in body.split(",")):
        if address.startswith("["):  # [IPv6]:port
            host = address[1:address.find("]")]
        else:  # host:port or host; a bare IPv6 address has several colons and no port
            host = address.split(":")[0] if address.count(":") == 1 else address
        if host.rstrip(".") == "localhost":  # (not *.localhost: a resolver may still ask DNS for those)
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a host name that could resolve anywhere
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        if not (ip.is_loopback or ip.is_unspecified):  # 0.0.0.0 and :: reach this machine
            return False
    return True


def warn_plaintext_token(target: str, tls: TLS | None, token: str | None, stacklevel: int = 4) -> None:
    """A token sent without TLS to another machine can be read on the way: say so once, as a warning (gRPC's own
    call credentials refuse an insecure channel outright; ours are plain metadata, which gRPC sends anyway)."""
    if token and tls is None and not is_local(target):
        warnings.warn(f"the bearer token goes to {target!r} in plaintext, readable by anyone on the path: pass "
                      "tls=TLS(...) (--tls-ca on the command line)", InsecureTokenWarning, stacklevel=stacklevel)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token; none without a token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True, kw_only=True)
class TLS:
    """TLS to the server; with cert and key, mutual TLS. Paths to PEM files."""

    ca: str | Path | None = None  # CA that signed the server's certificate (default: system roots)
    cert: str | Path | None = None  # client certificate chain, for mTLS
    key: str | Path | None = None  # client private key, for mTLS
    server_name: str = ""  # override the name checked against the server certificate

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS(cert=..., key=...) go together: both for mutual TLS, or neither")

    @classmethod
    def of(cls, ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> TLS | None:
        """TLS from command-line flags: None when none is given (plaintext), never when only a key is."""
        return cls(ca=ca, cert=cert, key=key) if (ca or cert or key) else None

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p is not None else None  # noqa: E731
        ca, key, cert = read(self.ca), read(self.key), read(self.cert)
        self._check(ca)
        return grpc.ssl_channel_credentials(ca, key, cert)

    def _check(self, ca: bytes | None) -> None:
        """Files that TLS cannot use, named here: gRPC would only fail every call with "Failed to create security
        handshaker" (a key of another certificate, a key given as the CA), retried until the deadline."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # whether the files go together, not how strong they are
        if ca is not None:
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            except ssl.SSLError as exc:
                raise ValueError(f"TLS(ca={str(self.ca)!r}) holds no PEM certificate to trust: {exc.reason or exc}") from None
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except ssl.SSLError as exc:
                raise ValueError(f"TLS(cert={str(self.cert)!r}, key={str(self.key)!r}) cannot be used together: "
                                 f"{exc.reason or exc} (does the key belong to the certificate? do both parse?)") from None


# gRPC's name schemes (its naming doc): a target that names one says the rest its own way (dns:///host defaults to
# port 443 as DNS names do); a plain address without a port is refused rather than dialled at 443.
_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})


@dataclass(frozen=True, kw_only=True)
class ChannelConfig:
    target: str = DEFAULT_TARGET
    tls: TLS | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    keepalive_s: float = KEEPALIVE_S
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def resolved_target(self) -> str:
        """'ip:port,ip:port' becomes an ipv4:/ipv6: list for round_robin; dns:/// and single addresses pass as is."""
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"target {self.target!r}: expected an address such as 'localhost:50051'")
        for address in self.target.split(","):
            if address.split(":", 1)[0].strip() not in _SCHEMES and not re.search(r":\d+$", address.strip()):
                raise ValueError(f"target {self.target!r}: {address.strip()!r} has no port, expected HOST:PORT such as "
                                 "'localhost:50051' (gRPC would dial port 443)")
            port = re.search(r":(\d{5,})$", address.strip())  # 5 digits or more: a port, never an IPv6 group
            if port and int(port.group(1)) > 65535:  # gRPC would take it modulo 65536: another port, silently
                raise ValueError(f"target {self.target!r}: port {port.group(1)} is not a port, expected 1 to 65535")
        if "," not in self.target or ":///" in self.target:
            return self.target
        hosts = [h.strip() for h in self.target.split(",")]
        literals = [h.rsplit(":", 1)[0].strip("[]") for h in hosts]
        try:
            kinds = {ipaddress.ip_address(h).version for h in literals}
        except ValueError:
            raise ValueError(f"target {self.target!r}: a list of addresses takes IP literals only; for host names "
                             "use one name that resolves to them all, e.g. 'dns:///disco.default.svc:50051'") from None
        if len(kinds) > 1:
            raise ValueError(f"target {self.target!r} mixes IPv4 and IPv6 addresses")
        return ("ipv6:" if kinds == {6} else "ipv4:") + ",".join(hosts)

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.lb_policy_name", "round_robin"),  # spread calls over every resolved address
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.initial_reconnect_backoff_ms", 100),  # come back fast after a server restart
            ("grpc.max_reconnect_backoff_ms", 2_000),
            ("grpc.enable_retries", 0),  # retries are ours (RetryPolicy), counted against the deadline
        ]
        if self.tls and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return opts + list(self.extra_options)


SPREAD_TRIES = 8  # new connections per connection at most, while spreading them over a server's processes
SPREAD_S = 5.0  # and at most this long in all (a client's constructor does it)
RESPREAD_S = 30.0  # how often a client with several connections spreads them again: the server recycles each one
# every --max-connection-age-s (300 s by default), and the kernel hashes its replacement to a process afresh


class Retired:
    """Connections that a spread replaced while calls may still run on them (closing a connection cancels its
    calls): each is closed once every call begun on it has passed its deadline."""

    def __init__(self) -> None:
        self._held: list[tuple[float, Any]] = []

    def hold(self, channel: Any, longest_call_s: float) -> None:
        self._held.append((time.monotonic() + longest_call_s, channel))

    def due(self, everything: bool = False) -> list[Any]:
        """The held connections to close now (all of them when the client closes), no longer held."""
        now = time.monotonic()
        out = [ch for until, ch in self._held if everything or until <= now]
        self._held = [(until, ch) for until, ch in self._held if not (everything or until <= now)]
        return out


def to_replace(reached: list[tuple[str, int]]) -> int | None:
    """Connections that reached these (ListModels' server_instance, server_processes): the index of one to
    replace with a new connection so that they spread evenly over the processes sharing the server's port, or
    None when they do. The kernel hashes each new connection to one of the processes (SO_REUSEPORT): 4 connections
    to 2 processes land 2:2 only 3 times in 8, so a client replaces one on the busiest process until each has its
    share. A server that does not say (0) or runs one process (1) needs nothing."""
    processes = max((n for _, n in reached), default=0)
    if processes < 2:
        return None
    counts = Counter(instance for instance, _ in reached)
    if len(counts) >= min(processes, len(reached)) and max(counts.values()) - min(counts.values()) <= 1:
        return None
    busiest = counts.most_common(1)[0][0]
    return next(i for i, (instance, _) in enumerate(reached) if instance == busiest)


def _which(response: Any) -> tuple[str, int]:
    return response.server_instance, response.server_processes


def _replacements(reached: list[tuple[str, int]]) -> Iterator[int]:
    """The connections to replace, one at a time, while the caller updates `reached` with what each new one
    reached: at most SPREAD_TRIES per connection."""
    for _ in range(SPREAD_TRIES * len(reached)):
        k = to_replace(reached)
        if k is None:
            return
        yield k


def spreadable(cfg: ChannelConfig, channels: list[Any]) -> bool:
    """Several connections to one address: a list of addresses or a dns:/// name balances over its hosts instead
    (each connection then reaches every host, and ListModels would tell of one of them only)."""
    return len(channels) > 1 and "," not in cfg.target and ":///" not in cfg.target


def spread(channels: list[grpc.Channel], cfg: ChannelConfig, metadata: tuple[tuple[str, str], ...],
           replaced: Callable[[int, grpc.Channel], None] = lambda k, ch: None, timeout: float = SPREAD_S,
           retire: Callable[[grpc.Channel], None] | None = None) -> list[str]:
    """Spread these connections (in place) evenly over the processes sharing the server's port: while
    `to_replace` names one, open a new connection for it, hand it to `replaced(k, channel)` and the old one to
    `retire` (without it the old one is closed at once, which cancels its calls: then spread while no call is in
    flight). Best effort within `timeout` seconds: a server that cannot be asked leaves them as they are. Returns
    the process each connection reached (server instance ids; empty ones where unknown)."""
    from disco.v1 import codec_pb2, codec_pb2_grpc

    if not spreadable(cfg, channels):
        return [""] * len(channels)
    deadline = time.monotonic() + timeout

    def which(ch: grpc.Channel) -> tuple[str, int]:
        return _which(codec_pb2_grpc.CodecStub(ch).ListModels(
            codec_pb2.ListModelsRequest(), timeout=max(0.0, deadline - time.monotonic()), metadata=metadata))

    try:
        reached = [which(ch) for ch in channels]
        for k in _replacements(reached):
            old, channels[k] = channels[k], sync_channel(cfg)
            replaced(k, channels[k])
            if retire is None:
                old.close()
            else:
                retire(old)
            reached[k] = which(channels[k])
    except grpc.RpcError:
        return [""] * len(channels)
    return [instance for instance, _ in reached]


async def spread_async(channels: list[grpc.aio.Channel], cfg: ChannelConfig, metadata: tuple[tuple[str, str], ...],
                       replaced: Callable[[int, grpc.aio.Channel], None] = lambda k, ch: None,
                       timeout: float = SPREAD_S, retire: Callable[[grpc.aio.Channel], None] | None = None) -> list[str]:
    """`spread`, for grpc.aio channels."""
    from disco.v1 import codec_pb2, codec_pb2_grpc

    if not spreadable(cfg, channels):
        return [""] * len(channels)
    deadline = time.monotonic() + timeout

    async def which(ch: grpc.aio.Channel) -> tuple[str, int]:
        return _which(await codec_pb2_grpc.CodecStub(ch).ListModels(
            codec_pb2.ListModelsRequest(), timeout=max(0.0, deadline - time.monotonic()), metadata=metadata))

    try:
        reached = [await which(ch) for ch in channels]
        for k in _replacements(reached):
            old, channels[k] = channels[k], async_channel(cfg)
            replaced(k, channels[k])
            if retire is None:
                await old.close()
            else:
                retire(old)  # at once: a cancelled spread leaves no connection unaccounted for
            reached[k] = await which(channels[k])
    except grpc.RpcError:
        return [""] * len(channels)
    return [instance for instance, _ in reached]


def sync_channel(cfg: ChannelConfig) -> grpc.Channel:
    if cfg.tls:
        return grpc.secure_channel(cfg.resolved_target(), cfg.tls.credentials(), options=cfg.options())
    return grpc.insecure_channel(cfg.resolved_target(), options=cfg.options())


def async_channel(cfg: ChannelConfig) -> grpc.aio.Channel:
    if cfg.tls:
        return grpc.aio.secure_channel(cfg.resolved_target(), cfg.tls.credentials(), options=cfg.options())
    return grpc.aio.insecure_channel(cfg.resolved_target(), options=cfg.options())
