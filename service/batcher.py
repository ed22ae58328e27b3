"""Dynamic batching: concurrent requests for one model and direction coalesce into one ONNX Runtime run.

  submit(x, deadline) --split into <= max_batch rows--> queue (bounded, in rows) --> worker(s):
      take the first waiting part, then every part already queued that still fits max_batch
      (never wait for more: when nothing else is queued, a lone request runs at once);
      drop parts whose caller cancelled or whose deadline passed; run; hand each caller its rows.

Small requests (single images) with nothing queued take another path: they run on the event loop itself,
which is cheaper than the hop to a worker thread and back. The first one gathers the small requests that
arrive while the loop serves other calls, turn by turn of the loop, and runs them all at once when
`gather_turns` turns bring none, when max_batch rows are gathered, or at once when it is alone and the loop
has nothing else to run (a lone request waits for nobody). grpc.aio hands the loop new calls one at a time,
so requests that arrive "together" reach the batcher turns apart; gathering them is what lets single-image
requests batch at all (README: Measured). A gathered run holds the loop while it computes, up to max_batch rows
(about 15 single images at concurrency 32 on 2 cores: 2-4 ms); a model whose runs are slow caps that with
max_batch or turns gathering off (gather_turns 0) in its serving.json.

Waiting for a batch to fill for a fixed time (Triton's max_queue_delay) is opt-in through `max_delay_s`: on
a small machine a fixed wait costs single-request latency more than it gains.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from disco.service.errors import DeadlineExceeded, InvalidInput, QueueFull
from disco.service.metrics import Metrics


# The earliest deadline on record is looked up again once it is this close (its part may have left the queue).
_DEADLINE_MARGIN_S = 0.002


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 64  # rows per ONNX Runtime run
    max_queue: int = 8192  # rows waiting; more is refused with RESOURCE_EXHAUSTED
    max_delay_s: float = 0.0  # extra wait for a fuller batch; 0 runs whatever is queued at once
    workers: int = 4  # runs in flight per batcher (disco serve --batch-workers)
    inline_rows: int = 4  # a request this small, with nothing else queued or running, runs on the event loop:
    # it takes less time than the hop to a worker thread and back (a lone single-image request)
    gather_turns: int = 24  # turns of the event loop without a new small request before a gathered batch runs;
    # 0: each small request runs alone, at once


@dataclass(eq=False)  # parts are compared by identity
class _Part:
    x: np.ndarray
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[tuple[np.ndarray, ...]]
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = False  # in the worker queue, its rows counted in _queued_rows
    withdrawn: bool = False  # its caller is gone: its rows no longer count, and a worker skips it


def refuse_unless_room(name: str, n: int, max_queue: int, queued: int, held: int) -> None:
    """Raise InvalidInput for a request larger than the whole queue (no wait would let it in), or QueueFull unless
    its n rows fit beside those queued and those held for large requests on their way in."""
    if n > max_queue:
        raise InvalidInput(f"a request of {n} images can never fit the {name} queue of {max_queue}; "
                           "send fewer images per request")
    if queued + held + n > max_queue:
        on_way = f" and {held} on their way in" if held else ""
        raise QueueFull(f"{name} queue is full: {queued} images queued{on_way}, {n} more would pass the limit of "
                        f"{max_queue}")


class Batcher:
    """Coalesces calls to `run(x) -> outputs` (row-aligned arrays) across concurrent requests."""

    # Batchers gathering right now, per event loop (touched only from that loop's thread): each keeps one turn
    # of its own in the loop's ready queue, which a lone request must not mistake for someone else's work.
    _leaders: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int]] = weakref.WeakKeyDictionary()

    def __init__(self, name: str, run: Callable[[np.ndarray], tuple[np.ndarray, ...]], cfg: BatchConfig,
                 executor: Executor, metrics: Metrics | None = None, held: Callable[[], int] = lambda: 0) -> None:
        self.name = name
        self._held = held  # rows of large requests on their way in: room this queue keeps for them
        self.cfg = cfg
        self._run = run
        self._executor = executor
        self._metrics = metrics
        self._queue: deque[_Part] = deque()
        self._queued_rows = 0
        self._withdrawn = 0  # withdrawn parts still in the queue (their arrays dropped), until a worker or a compaction
        self._earliest = float("inf")  # no queued part's deadline is earlier (it may be a part gone since: then later)
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0  # batches being computed
        self._waiting = 0  # submit() calls in progress
        self._closed = False
        # an inline or gathered run is one run: never above max_batch, and never holding more than max_queue rows
        self._inline_rows = min(cfg.inline_rows, cfg.max_batch, cfg.max_queue)
        self._gather_rows = min(cfg.max_batch, cfg.max_queue)
        self._gathering: list[_Part] | None = None  # small requests waiting for the one that gathers them
        self._gathered_rows = 0
        self._gathering_full = False  # a small request did not fit: run what is gathered
        self._released = False  # its metrics series handed back (once, at the end of the first close)
        if metrics is not None:
            metrics.batcher_opened(name)

    @property
    def queued_rows(self) -> int:
        """Rows waiting: queued for a worker, or gathered on the event loop."""
        return self._queued_rows + self._gathered_rows

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError(f"batcher {self.name} is closed")
        if not self._tasks:
            self._wakeup = asyncio.Event()
            self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
                           for i in range(self.cfg.workers)]

    async def close(self, drain: bool = True) -> None:
        """Stop the workers; with drain, first let every queued and running request finish."""
        self._closed = True  # from here on submit() refuses, so nothing can be queued without a worker
        while drain and (self._queue or self._running or self._gathering):
            await asyncio.sleep(0.005)
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue:  # without drain: whoever still waits hears why
            p = self._queue.popleft()
            p.queued = False  # its rows are not counted again when its caller withdraws it
            if not p.future.done():
                p.future.set_exception(RuntimeError(f"batcher {self.name} closed before this request ran"))
        self._queued_rows = self._withdrawn = 0
        self.release_metrics()

    def release_metrics(self) -> None:
        """Hand its metrics series back (once): closed, or never started (its version failed to warm up)."""
        if self._metrics is not None and not self._released:
            self._released = True
            self._metrics.batcher_closed(self.name)

    async def submit(self, x: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, ...]:
        """Rows of x -> the rows of every output, in order. Raises QueueFull or DeadlineExceeded."""
        self._start()
        n = len(x)
        if n == 0:  # the servicer never sends one; gather() of no parts would have no outputs to shape
            raise InvalidInput(f"a request to {self.name} holds no rows")
        if n <= self._inline_rows and not self.cfg.max_delay_s:  # on the event loop: no queue, no thread hop
            # (a fixed wait for fuller batches, max_delay_s, applies to every request: small ones queue too)
            if self._gathering is not None:
                if (self._gathered_rows + n <= self._gather_rows
                        and self.queued_rows + self._held() + n <= self.cfg.max_queue):
                    return await self._join(x, deadline)
                self._gathering_full = True  # this one queues for a worker; the gathered ones run now
            if self._gathering is None and not self._waiting and not self._queue and not self._running:
                if not self.cfg.gather_turns:
                    return self._run_inline(x)
                if self._held() + n <= self.cfg.max_queue:  # gathered rows wait in the room held for others
                    return await self._gather(x, deadline)
        self._waiting += 1
        try:
            return await self._submit(x, n, deadline)
        finally:
            self._waiting -= 1

    def check_room(self, n: int) -> None:
        """Raise (QueueFull, or InvalidInput for a request that can never fit) unless n more rows fit the queue now,
        beside the rows it holds for large requests on their way in. submit() checks this; a caller may check first,
        before it makes a large request's rows."""
        held = self._held()
        if n <= self.cfg.max_queue < self.queued_rows + held + n:
            self._withdraw_expired()  # rows whose deadline passed would be dropped anyway: not a reason to refuse
        refuse_unless_room(self.name, n, self.cfg.max_queue, self.queued_rows, held)

    async def _submit(self, x: np.ndarray, n: int, deadline: float | None) -> tuple[np.ndarray, ...]:
        self.check_room(n)
        loop = asyncio.get_running_loop()
        parts = [_Part(x[i : i + self.cfg.max_batch], deadline, loop.create_future(), queued=True)
                 for i in range(0, n, self.cfg.max_batch)]
        self._queue.extend(parts)
        self._queued_rows += n
        if deadline is not None:
            self._earliest = min(self._earliest, deadline)
        self._gauge()
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            results = await asyncio.gather(*(p.future for p in parts))
        except BaseException:  # the caller went away, or one part failed and the caller has its answer: the
            self._withdraw(parts)  # other parts are not computed, and their rows leave the queue's count now
            raise
        if len(results) == 1:
            return results[0]
        return tuple(np.concatenate([r[k] for r in results]) for k in range(len(results[0])))

    def _withdraw(self, parts: list[_Part]) -> None:
        """Parts whose answer nobody waits for: cancelled, and those still queued stop counting against max_queue
        at once (they held the queue until a worker reached them, refusing others meanwhile)."""
        for p in parts:
            if not p.future.done():
                p.future.cancel()
            if p.queued and not p.withdrawn:
                p.withdrawn = True
                self._queued_rows -= len(p.x)
                # max_queue bounds what the queue holds: a withdrawn part keeps none of its rows (and no view of
                # them, which would keep the caller's whole array)
                p.x = np.empty((0, *p.x.shape[1:]), p.x.dtype)
                self._withdrawn += 1
        if self._withdrawn > 64 and 2 * self._withdrawn > len(self._queue):  # mostly dead: rebuilt, O(n) once
            self._queue = deque(p for p in self._queue if not p.withdrawn)
            self._withdrawn = 0
        self._gauge()

    def _withdraw_expired(self) -> None:
        """Withdraw the queued parts whose deadline has passed (their callers hear DEADLINE_EXCEEDED). Scans the
        queue only once the earliest deadline in it has passed: a refusal under overload costs no scan."""
        now = time.monotonic()
        if now <= self._earliest_deadline(now):
            return
        self._withdraw([p for p in self._queue if not p.withdrawn and not self._alive(p, now)])
        self._earliest_deadline(now)

    def _earliest_deadline(self, now: float) -> float:
        """The earliest deadline of a queued part, looked up again (O(queue)) only when the one on record is
        within the margin of now: it may be of a part that has left the queue since."""
        if self._earliest <= now + _DEADLINE_MARGIN_S:
            self._earliest = min((p.deadline for p in self._queue if p.deadline is not None and not p.withdrawn),
                                 default=float("inf"))
        return self._earliest

    async def _join(self, x: np.ndarray, deadline: float | None) -> tuple[np.ndarray, ...]:
        """Wait in the batch being gathered; a caller that goes away cancels its part, which is then skipped."""
        assert self._gathering is not None
        part = _Part(x, deadline, asyncio.get_running_loop().create_future())
        self._gathering.append(part)
        self._gathered_rows += len(x)
        self._gauge()
        return await part.future

    async def _gather(self, x: np.ndarray, deadline: float | None) -> tuple[np.ndarray, ...]:
        """Gather the small requests that join while the loop runs other work, then run them on the loop."""
        loop = asyncio.get_running_loop()
        me = _Part(x, deadline, loop.create_future())
        self._gathering, self._gathered_rows, self._gathering_full = [me], len(x), False
        leaders = Batcher._leaders
        leaders[loop] = leaders.get(loop, 0) + 1
        try:
            self._gauge()
            quiet = 0  # turns since the last request joined
            while quiet < self.cfg.gather_turns and self._gathered_rows < self._gather_rows and not self._gathering_full:
                joined = len(self._gathering)
                await asyncio.sleep(0)  # one turn of the loop: other calls move on, and may reach submit()
                if len(self._gathering) > joined:
                    quiet = 0
                elif joined == 1 and len(getattr(loop, "_ready", ())) < leaders[loop]:
                    # alone, and asyncio's ready queue holds nothing but the other gathering batchers' turns (one
                    # each; this one's is running): nobody is coming. A loop without `_ready` (uvloop) ends here too.
                    break
                else:
                    quiet += 1
        except asyncio.CancelledError:
            me.future.cancel()  # this caller went away; the requests it gathered still run, in `finally`
            raise
        finally:
            leaders[loop] -= 1
            parts, self._gathering, self._gathered_rows = self._gathering, None, 0
            self._gauge()
            self._run_parts(parts)
        return me.future.result()

    def _run_parts(self, parts: list[_Part]) -> None:
        """Run the live ones of these parts as one batch, here on the event loop, and answer each caller."""
        now = time.monotonic()
        live = [p for p in parts if self._alive(p, now)]
        if not live:
            return
        self._running += 1
        try:
            x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
            outputs, seconds = self._timed_run(x)
            self._observe([now - p.enqueued for p in live], seconds, len(x))
            self._deliver(live, outputs)
        except Exception as exc:  # noqa: BLE001 - handed to every caller still waiting: none may hang
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            self._running -= 1

    def _alive(self, p: _Part, now: float) -> bool:
        """False for a part whose caller went away, or whose deadline passed (its caller hears so)."""
        if p.future.done():  # cancelled by its caller
            return False
        if p.deadline is not None and now > p.deadline:
            p.future.set_exception(DeadlineExceeded(
                f"deadline passed after {now - p.enqueued:.3f} s in the {self.name} queue, before compute"))
            return False
        return True

    @staticmethod
    def _deliver(batch: list[_Part], outputs: tuple[np.ndarray, ...]) -> None:
        """Each part's rows of every output, in the order the parts were concatenated."""
        start = 0
        for p in batch:
            end = start + len(p.x)
            if not p.future.done():
                p.future.set_result(tuple(o[start:end] for o in outputs))
            start = end

    def _run_inline(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        self._running += 1
        try:
            outputs, seconds = self._timed_run(x)
        finally:
            self._running -= 1
        self._observe([0.0], seconds, len(x))
        return outputs

    def _timed_run(self, x: np.ndarray) -> tuple[tuple[np.ndarray, ...], float]:
        """The run and its duration, timed on the thread that computes (no wait for a thread or the loop)."""
        t0 = time.monotonic()
        outputs = self._run(x)
        return outputs, time.monotonic() - t0

    def _take(self) -> list[_Part]:
        """The first queued part and every following one that fits, minus the dead ones."""
        batch: list[_Part] = []
        rows = 0
        now = time.monotonic()
        while self._queue and (self._queue[0].withdrawn or rows + len(self._queue[0].x) <= self.cfg.max_batch):
            p = self._queue.popleft()
            p.queued = False
            if p.withdrawn:  # its rows left the count when its caller went
                self._withdrawn -= 1
                continue
            self._queued_rows -= len(p.x)
            if self._alive(p, now):
                batch.append(p)
                rows += len(p.x)
        self._gauge()
        return batch

    async def _worker(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.cfg.max_delay_s:
                await self._fill()
            else:
                await asyncio.sleep(0)  # one turn of the loop: requests that arrived together join this batch
            batch = self._take()
            if not batch:
                continue
            self._running += 1
            try:
                live, outputs, started, seconds = await loop.run_in_executor(self._executor, self._compute, batch)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            except asyncio.CancelledError:  # close(drain=False) stopped this worker: its callers hear why
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError(f"batcher {self.name} closed while this request ran"))
                raise
            finally:
                self._running -= 1
            for p in batch:  # those the thread skipped: their callers hear why (a cancelled one hears nothing)
                if p not in live:
                    self._alive(p, started)
            if live:
                self._observe([started - p.enqueued for p in live], seconds, sum(len(p.x) for p in live))
                self._deliver(live, outputs)

    def _compute(self, batch: list[_Part]) -> tuple[list[_Part], tuple[np.ndarray, ...], float, float]:
        """On a worker thread: run the parts still wanted, and say which those were, when the run began and how
        long it took. A batch may wait here for a free thread (the threads are shared by every batcher): a part
        whose caller cancelled or whose deadline passed meanwhile is not computed. (A future's state is read
        from this thread, never changed.)"""
        started = time.monotonic()
        live = [p for p in batch if not p.future.done() and (p.deadline is None or started <= p.deadline)]
        if not live:
            return live, (), started, 0.0
        outputs, seconds = self._timed_run(live[0].x if len(live) == 1 else np.concatenate([p.x for p in live]))
        return live, outputs, started, seconds

    async def _fill(self) -> None:
        """Wait while the queue holds less than max_batch rows, until the oldest queued part has waited max_delay_s
        (Triton's max_queue_delay: counted from when the request queued, not from when a worker came free)."""
        assert self._wakeup is not None
        while self._queued_rows < self.cfg.max_batch:
            oldest = next((p for p in self._queue if not p.withdrawn), None)
            if oldest is None:
                return
            # Never past half of a queued part's time, from when it queued to its deadline: the other half is left
            # for the wait for a thread, the compute and the answer (a margin of 2 ms before the deadline itself
            # failed 20-100% of such calls after computing them: the worker woke late, or the answer came too late).
            due = oldest.enqueued + self.cfg.max_delay_s
            for p in self._queue:  # under max_batch rows: a short scan
                if p.deadline is not None and not p.withdrawn:
                    due = min(due, p.enqueued + (p.deadline - p.enqueued) / 2)
            left = due - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            # Then look again: a new part may fill the batch, the oldest may have gone, or the deadline on record
            # may be of a part that ran. (Not wait_for: in Python 3.11 it can swallow the cancel that close() sends
            # when the wait ends in the same turn, and in 3.10 its timeout is not the built-in TimeoutError.)
            waiter = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({waiter}, timeout=left)
            finally:
                waiter.cancel()

    def _observe(self, waits: list[float], seconds: float, rows: int) -> None:
        """One run of `rows` rows that computed for `seconds`, after each of its parts waited `waits` seconds."""
        if self._metrics is None or self._released:  # a run that ends after the close made no series anew
            return
        m = self._metrics
        m.child(m.batch_size, self.name).observe(rows)
        m.child(m.compute_latency, self.name).observe(seconds)
        queue = m.child(m.queue_latency, self.name)
        for w in waits:
            queue.observe(w)

    def _gauge(self) -> None:
        if self._metrics is not None and not self._released:
            self._metrics.child(self._metrics.queue_depth, self.name).set(self.queued_rows)
