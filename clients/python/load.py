"""How `disco bench` generates load: a closed loop (N callers, each sending as soon as its last call returned), an
open loop (sends on a schedule, whatever the answers) and a burst (N calls at once). Each measures a window after
a warm-up and returns what it saw; `disco.client.bench` turns windows into cases, limits and ratios."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from disco.client._transport import TLS, ChannelConfig, async_channel, bearer, spread_async, sync_channel
from disco.v1 import codec_pb2_grpc


# What a server answers when it cannot keep up: a queue full, or a reply later than the call's deadline. The open
# loop counts these as results; any other code (a server gone, a request refused) ends it, raised.
OVERLOAD = frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})


@dataclass
class Load:
    """What one window of load measured. `seconds` is the window: --duration's length; for a closed loop's count
    window (--count) the time its callers were busy with its requests, per caller (closed_loop says why); for an
    open loop's count window, to its last answer."""

    latencies: list[float]
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)  # status code name (one of OVERLOAD) -> calls (open loop only)
    send_lag: list[float] = field(default_factory=list)  # open loop: actual send - scheduled send (s)
    peak_outstanding: int = 0  # open loop: most calls in flight at once
    unmeasured: int = 0  # closed loop: warm-up calls answered after at_window() began, which the server counts
    # between the window's scrapes (those in flight as it opened, and those answered while it scraped)


@dataclass(frozen=True)
class Endpoint:
    """The server load goes to: its address (or a comma-separated list, as the SDK takes), with TLS and a bearer
    token where the server wants them. Wherever a target is taken, a plain address string does as well."""

    target: str
    tls: TLS | None = None
    token: str = ""

    @classmethod
    def of(cls, where: str | Endpoint) -> Endpoint:
        return where if isinstance(where, Endpoint) else cls(where)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)

    def channel(self) -> grpc.Channel:
        return sync_channel(ChannelConfig(target=self.target, tls=self.tls))

    @property
    def _separate(self) -> ChannelConfig:
        """Each channel with its own subchannel pool, so its own TCP connection."""
        return ChannelConfig(target=self.target, tls=self.tls, extra_options=(("grpc.use_local_subchannel_pool", 1),))

    def channels(self, connections: int) -> list[grpc.aio.Channel]:
        """One channel per connection, each its own TCP connection: what spreads load over the processes of a
        SO_REUSEPORT server (the kernel balances connections, not calls)."""
        return [async_channel(self._separate) for _ in range(max(1, connections))]

    async def spread(self, connections: int) -> list[grpc.aio.Channel]:
        """`channels(connections)`, spread evenly over the processes of a server that shares its port (disco serve
        --processes N; `to_replace` says how), best effort: the bench reports the split it got."""
        chans = self.channels(connections)
        await spread_async(chans, self._separate, self.metadata)
        return chans


async def closed_loop(target: str | Endpoint, method: str, request: Any, concurrency: int, seconds: float,
                      warmup_s: float, at_window: Callable[[], None] | None = None, connections: int = 1,
                      count: int = 0) -> Load:
    """`concurrency` callers, each in a loop; latencies of the requests started inside the window.

    The window opens once `warmup_s` is over and every caller has had an answer, as one of them starts its next
    call. Before that the callers may still run in step as they started, or wait on a first call that loads a
    model: a window opened then timed no request, or timed how fast callers start together rather than how fast
    answers come (32 callers, a count window of 32 requests: about 0 s).

    A time window lasts `seconds`: throughput counts the requests started in it. A count window lasts until
    `count` requests have started in it (their latencies are kept as they return), and its length is the time
    its callers were busy with them, per caller: caller i sent its n_i requests back to back, from its first
    start in the window to its last answer (span_i), so the loop's throughput is the sum of n_i over the mean
    span_i (over all the callers), never more than concurrency / mean latency. (Timing the window from its
    opening to its last start instead timed bursts: a batcher answers many callers at once, and with a count
    near the concurrency the starts they set off read two to five times what the callers could send.)

    Caller i sends on connection i % connections. at_window() runs once, just before the window opens, in a
    thread while the other callers go on warming up: on the event loop, the answers that came meanwhile (a scrape
    takes milliseconds) would all start calls at once as the window opened."""
    endpoint = Endpoint.of(target)
    channels, metadata = await endpoint.spread(connections), endpoint.metadata
    try:
        calls = [getattr(codec_pb2_grpc.CodecStub(ch), method) for ch in channels]
        load = Load([], seconds)
        warm_until = time.perf_counter() + warmup_s
        answered = 0  # callers that have had an answer
        opening = False  # a caller is opening the window
        hook_began = opens = closes = math.inf  # a count window closes once its count has started
        started, busy = 0, 0.0  # requests started in the window; the callers' busy time in it, summed

        async def caller(i: int) -> None:
            nonlocal answered, opening, hook_began, opens, closes, started, busy
            call, first = calls[i % len(calls)], True
            first_start = last_end = 0.0
            while True:
                t0 = time.perf_counter()
                if t0 >= closes:
                    break
                if not opening and answered == concurrency and t0 >= warm_until:
                    opening = True
                    if at_window is not None:
                        hook_began = t0
                        await asyncio.to_thread(at_window)
                    opens = t0 = time.perf_counter()
                    closes = math.inf if count else opens + seconds
                measured = t0 >= opens
                if measured:
                    started += 1
                    if started == count:
                        closes = t0
                    first_start = first_start or t0
                await call(request, timeout=30, metadata=metadata)
                t1 = time.perf_counter()
                if measured:
                    load.latencies.append(t1 - t0)
                    last_end = t1
                elif t1 >= hook_began:
                    load.unmeasured += 1
                if first:
                    answered, first = answered + 1, False
            busy += last_end - first_start

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        if count:
            load.seconds = busy / concurrency
        return load
    finally:
        for ch in channels:
            await ch.close()


async def open_loop(target: str | Endpoint, method: str, request: Any, rate: float, seconds: float, warmup_s: float,
                    at_window: Callable[[], None] | None = None, connections: int = 1, count: int = 0,
                    poisson: bool = False, max_outstanding: int = 4096) -> Load:
    """Requests sent on a schedule of `rate` per second whatever the answers (perf_analyzer's --request-rate):
    evenly spaced, or with exponential gaps (`poisson`, seeded). Latency is timed from the actual send; how late
    each send left against its schedule is kept too (`send_lag`), since a saturated load generator falls behind
    and would then measure itself. An overload code (OVERLOAD) is counted, not raised: overload is a result here.
    Any other error (UNAVAILABLE from a server that died, INVALID_ARGUMENT, ...), in the warm-up or the window,
    stops the sends and is raised once the calls in flight have ended. A send that would pass `max_outstanding`
    calls in flight waits for one to end (it shows as lag)."""
    endpoint = Endpoint.of(target)
    channels, metadata = await endpoint.spread(connections), endpoint.metadata
    rng = np.random.default_rng(7)
    load = Load([], 0.0)
    inflight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []  # anything but an overload code, the first raised at the end

    def done(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    room = asyncio.Semaphore(max_outstanding)
    ended = [0.0]  # the last answer of the window
    outstanding = [0]

    async def one(call: Any, scheduled: float, measure: bool) -> None:
        outstanding[0] += 1
        load.peak_outstanding = max(load.peak_outstanding, outstanding[0])
        t0 = time.perf_counter()
        if measure:
            load.send_lag.append(t0 - scheduled)
        try:
            await call(request, timeout=30, metadata=metadata)
            if measure:
                load.latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as exc:
            if exc.code().name not in OVERLOAD:
                raise  # kept by done(): the schedule stops there
            if measure:
                load.errors[exc.code().name] = load.errors.get(exc.code().name, 0) + 1
        finally:
            outstanding[0] -= 1
            room.release()
            if measure:
                ended[0] = max(ended[0], time.perf_counter())

    try:
        calls = [getattr(codec_pb2_grpc.CodecStub(ch), method) for ch in channels]
        start = time.perf_counter()
        opens, closes = start + warmup_s, start + warmup_s + seconds
        sent, k, due = 0, 0, start  # requests sent inside the window, sent in all, next send's time
        first = opens  # the window's first send is due (a count window is timed from it)
        ended[0] = opens
        while not failures:
            measure = due >= opens
            if measure and not sent:
                first = due
            if (count and measure and sent >= count) or (not count and due >= closes):
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if measure and at_window is not None:  # just before the first measured send
                at_window()
                at_window = None
            await room.acquire()
            task = asyncio.create_task(one(calls[k % len(calls)], due, measure))
            inflight.add(task)
            task.add_done_callback(done)
            sent, k = sent + measure, k + 1
            due += rng.exponential(1 / rate) if poisson else 1 / rate
        await asyncio.gather(*inflight, return_exceptions=True)  # what they raised, done() kept
        if failures:
            raise failures[0]
        # To the last answer (under overload the answers trail the schedule), and never shorter than the schedule:
        # `count` sends span count gaps of the schedule, from the first's time to when the next would be due (a
        # review: timed to the last send, count - 1 gaps, 3 sends at 10 per second read as 14.6 per second)
        load.seconds = max(ended[0], due if count else closes) - (first if count else opens)
        return load
    finally:
        for ch in channels:
            await ch.close()


async def burst(target: str | Endpoint, request: Any, n: int, method: str = "Compress") -> dict[str, int]:
    """n calls sent at once on one connection: how many were answered with each status code ("OK" for results)."""
    endpoint = Endpoint.of(target)
    (channel,) = endpoint.channels(1)
    async with channel:
        call = getattr(codec_pb2_grpc.CodecStub(channel), method)

        async def one() -> str:
            try:
                await call(request, timeout=60, metadata=endpoint.metadata)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)

        codes = await asyncio.gather(*(one() for _ in range(n)))
    return {code: codes.count(code) for code in sorted(set(codes))}
