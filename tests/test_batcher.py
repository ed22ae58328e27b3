"""The dynamic batcher as a plain object: coalescing, splitting, bounded queue, deadlines, cancellation."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from disco.service.batcher import BatchConfig, Batcher
from disco.service.errors import DeadlineExceeded, InvalidInput, QueueFull


class Gate:
    """A fake model (x -> 2x) that records its batches and can be held closed to let a queue build up."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.batches: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray]:
        self.open.wait(10)
        self.batches.append(x.copy())
        return (2 * x,)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def make(gate: Gate, **cfg: float) -> Batcher:
    return Batcher("test", gate, BatchConfig(**{"workers": 1, "inline_rows": 0, **cfg}), ThreadPoolExecutor(2))  # type: ignore[arg-type]


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None]


async def occupy(b: Batcher, gate: Gate, n: int = 2) -> asyncio.Task:
    """Close the gate and give the only worker a request to hold, so that what follows has to queue."""
    gate.open.clear()
    first = asyncio.create_task(b.submit(rows(0, n)))
    await asyncio.sleep(0.05)
    return first


def test_concurrent_requests_coalesce_and_get_their_own_rows() -> None:
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=64)
        gate.open.clear()
        first = asyncio.create_task(b.submit(rows(0, 1)))  # occupies the only worker
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(b.submit(rows(100 * i, 3))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.open.set()
        results = await asyncio.gather(first, *others)
        for i, (out,) in enumerate(results[1:], start=1):
            np.testing.assert_array_equal(out, 2 * rows(100 * i, 3))
        await b.close()

    run(main())
    assert [len(x) for x in gate.batches] == [1, 15]  # five waiting requests, one run


def test_large_request_is_split_at_max_batch() -> None:
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=16)
        (out,) = await b.submit(rows(0, 40))
        np.testing.assert_array_equal(out, 2 * rows(0, 40))
        await b.close()

    run(main())
    assert [len(x) for x in gate.batches] == [16, 16, 8]


def test_lone_request_runs_at_once() -> None:
    gate = Gate()

    async def main() -> float:
        b = make(gate, max_batch=64)
        t0 = time.perf_counter()
        await b.submit(rows(0, 1))
        dt = time.perf_counter() - t0
        await b.close()
        return dt

    assert run(main()) < 0.5  # no fixed wait for a batch to fill (max_delay_s = 0)


def test_full_queue_is_refused_with_its_numbers() -> None:
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=8, max_queue=20)
        first = await occupy(b, gate, 8)  # taken by the worker, which now waits at the gate
        queued = asyncio.create_task(b.submit(rows(0, 16)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="16 images queued, 8 more would pass the limit of 20"):
            await b.submit(rows(0, 8))
        gate.open.set()
        await asyncio.gather(first, queued)
        await b.close()

    run(main())


def test_expired_deadline_is_dropped_before_compute() -> None:
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=8)
        first = await occupy(b, gate)
        late = asyncio.create_task(b.submit(rows(500, 3), deadline=time.monotonic() + 0.02))
        await asyncio.sleep(0.1)  # the deadline passes while it waits
        gate.open.set()
        await first
        with pytest.raises(DeadlineExceeded, match="before compute"):
            await late
        await b.close()

    run(main())
    assert all(500 not in x for x in gate.batches)


def test_cancelled_request_is_dropped_before_compute() -> None:
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=8)
        first = await occupy(b, gate)
        gone = asyncio.create_task(b.submit(rows(700, 3)))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.open.set()
        await first
        await b.submit(rows(0, 1))
        await b.close()

    run(main())
    assert all(700 not in x for x in gate.batches)


def test_a_failing_run_fails_its_callers_only() -> None:
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> tuple[np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return (x,)

    async def main() -> None:
        b = Batcher("flaky", flaky, BatchConfig(workers=1), ThreadPoolExecutor(1))
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(rows(0, 1))
        (out,) = await b.submit(rows(0, 2))
        assert len(out) == 2
        await b.close()

    run(main())


def test_a_lone_request_above_max_batch_is_split_not_run_inline() -> None:
    gate = Gate()

    async def main() -> None:
        b = Batcher("small", gate, BatchConfig(workers=1, max_batch=2), ThreadPoolExecutor(1))  # inline_rows 4
        (out,) = await b.submit(rows(0, 3))
        np.testing.assert_array_equal(out, 2 * rows(0, 3))
        await b.close()

    run(main())
    assert [len(x) for x in gate.batches] == [2, 1]  # never a run larger than max_batch (the size warm-up stops at)


def test_close_without_drain_answers_the_request_being_computed() -> None:
    gate = Gate()
    gate.open.clear()  # the run starts and blocks in the "model"

    async def main() -> BaseException:
        b = make(gate)
        call = asyncio.create_task(b.submit(rows(0, 2)))
        while not b._running:
            await asyncio.sleep(0.01)
        await b.close(drain=False)
        gate.open.set()
        try:
            await asyncio.wait_for(call, 5)
        except RuntimeError as exc:
            return exc
        raise AssertionError("the request got an answer from a closed batcher")

    assert "closed while this request ran" in str(run(main()))


class Turns:
    """Counts the turns of the event loop the batcher asks for (asyncio.sleep(0))."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = asyncio.sleep

        async def sleep(delay: float, *a: object) -> None:
            if delay == 0:
                self.n += 1
            await real(delay, *a)

        monkeypatch.setattr(asyncio, "sleep", sleep)


def gathering(gate: Gate, turns: int = 24, **cfg: float) -> Batcher:
    return Batcher("g", gate, BatchConfig(**{"workers": 1, "gather_turns": turns, **cfg}), ThreadPoolExecutor(1))  # type: ignore[arg-type]


def test_small_requests_that_arrive_together_run_as_one_batch_on_the_event_loop() -> None:
    gate = Gate()
    threads: list[int] = []

    def model(x: np.ndarray) -> tuple[np.ndarray]:
        threads.append(threading.get_ident())
        return gate(x)

    async def main() -> list[tuple[np.ndarray, ...]]:
        b = Batcher("g", model, BatchConfig(workers=1, gather_turns=24), ThreadPoolExecutor(1))
        out = await asyncio.gather(*(b.submit(rows(10 * i, 1 + i % 3)) for i in range(10)))
        await b.close()
        return out

    out = run(main())
    assert [len(x) for x in gate.batches] == [sum(1 + i % 3 for i in range(10))]  # one run
    assert threads == [threading.get_ident()]  # on the loop's thread: no hop to a worker
    for i, (o,) in enumerate(out):
        np.testing.assert_array_equal(o, 2 * rows(10 * i, 1 + i % 3))


def test_a_gathered_batch_waits_while_requests_keep_coming_and_runs_once_they_stop() -> None:
    async def trickle(turns: int) -> list[int]:
        """A request every 3 turns of the loop, 6 in all, while the loop has other work (this coroutine)."""
        gate = Gate()
        b = gathering(gate, turns)
        calls = []
        for i in range(6):
            calls.append(asyncio.ensure_future(b.submit(rows(i, 1))))
            for _ in range(3):
                await asyncio.sleep(0)
        await asyncio.gather(*calls)
        await b.close()
        return [len(x) for x in gate.batches]

    assert run(trickle(4)) == [6]  # 3 quiet turns between arrivals: fewer than 4, all wait for each other
    assert len(run(trickle(2))) > 1  # after 2 quiet turns the gathered ones run
    assert run(trickle(0)) == [1] * 6  # gathering off: each runs at once


def test_a_lone_small_request_waits_one_turn_not_gather_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    turns = Turns(monkeypatch)
    gate = Gate()

    async def main() -> None:
        b = gathering(gate, 1000)
        await b.submit(rows(0, 1))
        await b.close()

    run(main())
    assert turns.n == 1 and [len(x) for x in gate.batches] == [1]


def test_gathering_stops_at_max_batch_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    turns = Turns(monkeypatch)
    gate = Gate()

    async def main() -> None:
        b = gathering(gate, 1000, max_batch=8)
        await asyncio.gather(*(b.submit(rows(i, 3)) for i in range(5)))
        await b.close()

    run(main())
    # 3 + 3 gathered; the third request does not fit, so the gathered ones run at once (the rest queue)
    assert sorted(len(x) for x in gate.batches) == [3, 6, 6] and turns.n < 10


def test_the_gathered_run_when_its_first_caller_goes_away() -> None:
    """The caller that gathers is cancelled: the others still get their rows, and its own are not computed."""
    gate = Gate()

    async def main() -> list[tuple[np.ndarray, ...]]:
        b = gathering(gate, 1000)
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0)  # it starts gathering
        others = [asyncio.ensure_future(b.submit(rows(10 * i, 1))) for i in range(1, 4)]
        await asyncio.sleep(0)  # they join
        first.cancel()
        out = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
        await b.close()
        return out

    out = run(main())
    assert [x.ravel().tolist() for x in gate.batches] == [[10.0, 20.0, 30.0]]
    assert [o[0].ravel().tolist() for o in out] == [[20.0], [40.0], [60.0]]


def test_a_gathered_request_whose_deadline_passed_is_dropped_before_compute() -> None:
    gate = Gate()

    async def main() -> list[object]:
        b = gathering(gate, 1000, max_batch=3)
        late = asyncio.ensure_future(b.submit(rows(0, 1), deadline=time.monotonic() - 1))
        ok = [asyncio.ensure_future(b.submit(rows(10 * i, 1))) for i in (1, 2)]  # the third row ends the gathering
        out = await asyncio.gather(late, *ok, return_exceptions=True)
        await b.close()
        return out

    late, *ok = run(main())
    assert isinstance(late, DeadlineExceeded) and "before compute" in str(late)
    assert [len(x) for x in gate.batches] == [2] and all(isinstance(o, tuple) for o in ok)


def test_gathering_stops_once_max_batch_rows_have_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    turns = Turns(monkeypatch)
    gate = Gate()

    async def main() -> None:
        b = gathering(gate, 1000, max_batch=8)
        await asyncio.gather(b.submit(rows(0, 4)), b.submit(rows(10, 4)))  # together exactly max_batch
        await b.close()

    run(main())
    assert [len(x) for x in gate.batches] == [8] and turns.n < 10


def test_a_gathered_batch_that_cannot_be_formed_fails_every_caller() -> None:
    """An error outside the model run (here rows of different widths) reaches every caller; none waits forever."""
    gate = Gate()

    async def main() -> list[object]:
        b = gathering(gate, 1000)
        out = await asyncio.wait_for(asyncio.gather(b.submit(rows(0, 1)), b.submit(np.zeros((1, 2), np.float32)),
                                                    return_exceptions=True), 5)
        await b.close()
        return out

    assert all(isinstance(o, ValueError) for o in run(main()))


def test_two_batchers_gathering_at_once_do_not_make_lone_requests_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each gathering batcher keeps a turn in the loop's ready queue; the other must not read it as more work."""
    turns = Turns(monkeypatch)
    gate = Gate()

    async def main() -> None:
        encoder, decoder = gathering(gate, 1000), gathering(gate, 1000)
        await asyncio.gather(encoder.submit(rows(0, 1)), decoder.submit(rows(10, 1)))
        await encoder.close()
        await decoder.close()

    run(main())
    assert sorted(len(x) for x in gate.batches) == [1, 1] and turns.n < 10


def test_gathered_rows_count_against_the_queue_limit_and_show_in_the_depth() -> None:
    gate = Gate()
    depths: list[int] = []

    async def main() -> list[object]:
        b = gathering(gate, 1000, max_batch=8, max_queue=4)
        calls = [asyncio.ensure_future(b.submit(rows(i, 1))) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the three are gathered
        depths.append(b.queued_rows)
        over = asyncio.ensure_future(b.submit(rows(9, 2)))  # 3 + 2 rows would pass the limit of 4
        out = await asyncio.gather(*calls, over, return_exceptions=True)
        depths.append(b.queued_rows)
        await b.close()
        return out

    *ok, over = run(main())
    assert depths == [3, 0]
    assert isinstance(over, QueueFull) and "3 images queued, 2 more would pass the limit of 4" in str(over)
    assert all(isinstance(o, tuple) for o in ok) and [len(x) for x in gate.batches] == [3]


def test_a_caller_that_goes_frees_its_queue_rows_at_once() -> None:
    """A cancelled request's rows counted against max_queue until a worker reached them: others were refused
    meanwhile. So did rows whose deadline had passed."""
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=8, max_queue=16)
        first = await occupy(b, gate, 8)
        gone = asyncio.create_task(b.submit(rows(100, 16)))  # fills the queue
        await asyncio.sleep(0.01)
        assert b.queued_rows == 16
        gone.cancel()
        await asyncio.sleep(0.01)
        assert b.queued_rows == 0  # the worker is still held: only the cancel freed them
        late = asyncio.create_task(b.submit(rows(200, 16), deadline=time.monotonic() + 0.01))
        await asyncio.sleep(0.05)  # its deadline passes in the queue: no reason to refuse the next one
        third = asyncio.create_task(b.submit(rows(300, 4)))
        await asyncio.sleep(0.01)
        assert b.queued_rows == 4
        with pytest.raises(DeadlineExceeded, match="before compute"):
            await late
        gate.open.set()
        await first
        (out,) = await third
        np.testing.assert_array_equal(out, 2 * rows(300, 4))
        await b.close()

    run(main())
    assert all(100 not in x and 200 not in x for x in gate.batches)


def test_when_one_part_of_a_split_request_fails_the_others_are_not_computed() -> None:
    calls: list[int] = []

    def failing_first(x: np.ndarray) -> tuple[np.ndarray]:
        calls.append(len(x))
        time.sleep(0.02)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return (x,)

    async def main() -> None:
        b = Batcher("split", failing_first, BatchConfig(max_batch=8, workers=1, inline_rows=0), ThreadPoolExecutor(1))
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(rows(0, 32))
        assert b.queued_rows == 0
        await asyncio.sleep(0.1)
        await b.close()

    run(main())
    assert len(calls) <= 2  # the failed part, and at most the one a worker had taken already: not all 4


def test_max_delay_counts_from_queueing_and_applies_to_small_requests_too() -> None:
    """Triton's max_queue_delay: a request waits at most that long for its batch to fill, counted from when it
    queued; a lone single image waited nothing (it ran on the event loop), a request behind a run the delay again."""
    gate = Gate()

    async def main() -> None:
        b = Batcher("delay", gate, BatchConfig(max_batch=64, max_delay_s=1.0, workers=1), ThreadPoolExecutor(2))
        t0 = time.monotonic()
        await b.submit(rows(0, 1))
        assert 0.99 <= time.monotonic() - t0 < 5  # it waited for company, as a larger request does
        t0 = time.monotonic()
        together = [asyncio.create_task(b.submit(rows(10 * i, 8))) for i in range(8)]  # 64 rows: a full batch
        await asyncio.gather(*together)
        assert time.monotonic() - t0 < 0.9  # a full batch does not wait out the delay
        await b.close()

    run(main())
    assert [len(x) for x in gate.batches] == [1, 64]


def test_withdrawn_parts_hold_no_rows_and_close_counts_each_once() -> None:
    """A withdrawn part's rows left the count but its array stayed queued until a worker came: callers that left
    could pile up any amount past max_queue. And close(drain=False), then the callers withdrawing, counted rows
    out twice (queued_rows went to -36)."""
    gate = Gate()

    async def main() -> None:
        b = make(gate, max_batch=8, max_queue=16)
        first = await occupy(b, gate, 8)
        async def come_and_go(n: int) -> list[weakref.ref]:
            gone, arrays = [], []
            for i in range(n):  # each fills the queue, then goes
                x = rows(1000 + i, 16).copy()  # owns its rows: a view of them keeps it
                arrays.append(weakref.ref(x))
                gone.append(asyncio.create_task(b.submit(x)))
                del x
                await asyncio.sleep(0.001)
                gone[-1].cancel()
                await asyncio.sleep(0.001)
            outcomes = await asyncio.gather(*gone, return_exceptions=True)
            assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)  # none refused: each found room
            return arrays

        await come_and_go(200)
        assert b.queued_rows == 0 and len(b._queue) <= 130  # a queue of mostly withdrawn parts is rebuilt
        await b.close(drain=False)
        gate.open.set()
        await asyncio.gather(first, return_exceptions=True)
        b = make(gate, max_batch=8, max_queue=16)
        first = await occupy(b, gate, 8)
        arrays = await come_and_go(30)  # 60 parts, too few for a rebuild: the withdrawn parts stay queued
        await asyncio.sleep(0.05)
        gc.collect()
        assert b.queued_rows == 0 and sum(len(p.x) for p in b._queue) == 0
        assert sum(a() is not None for a in arrays) <= 2  # the callers' arrays are freed (a view kept each whole)
        waiting = [asyncio.create_task(b.submit(rows(0, 9)))]
        await asyncio.sleep(0.01)
        assert b.queued_rows == 9
        await b.close(drain=False)
        gate.open.set()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        assert b.queued_rows == 0

    run(main())


def test_a_batch_waiting_to_fill_runs_before_a_queued_deadline() -> None:
    """With max_delay_s, the wait for a fuller batch ran past a queued request's deadline, which then failed in the
    queue while a worker was idle."""
    gate = Gate()

    async def main() -> float:
        b = Batcher("delay", gate, BatchConfig(max_batch=64, max_delay_s=5.0, workers=1), ThreadPoolExecutor(2))
        t0 = time.monotonic()
        (out,) = await b.submit(rows(0, 1), deadline=t0 + 0.2)
        took = time.monotonic() - t0
        np.testing.assert_array_equal(out, 2 * rows(0, 1))
        await b.close()
        return took

    # by half its time (0.1 s): the other half is the answer's (2 ms before the deadline left too little for it)
    assert 0.09 < run(main()) < 0.19


@pytest.mark.parametrize("turns", range(4))
def test_close_stops_a_worker_waiting_for_a_fuller_batch_whatever_just_arrived(turns: int) -> None:
    """With max_delay_s a worker waits for more rows; a request arriving just before close(drain=False) ended that
    wait in the same turn as the close's cancel, which asyncio.wait_for swallowed in Python 3.11: close hung."""
    async def main() -> None:
        b = Batcher("close", lambda x: (2 * x,), BatchConfig(max_batch=8, max_delay_s=1.0, workers=1, inline_rows=0),
                    ThreadPoolExecutor(1))
        first = asyncio.create_task(b.submit(rows(0, 1)))
        await asyncio.sleep(0.02)  # the worker waits for a fuller batch
        second = asyncio.create_task(b.submit(rows(10, 1)))
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.wait_for(b.close(drain=False), 5)
        with pytest.raises(RuntimeError, match="closed before this request ran"):
            await first
        # Python 3.12's wait_for runs close() in this task, before `second` has submitted when turns is 0: it is
        # refused as it arrives (3.11 ran close() in a task of its own, after it)
        with pytest.raises(RuntimeError, match="closed before this request ran|batcher close is closed"):
            await second

    run(main())


def test_a_batch_waiting_to_fill_looks_again_when_what_bounded_its_wait_has_gone() -> None:
    """The wait for a fuller batch ended at the first timeout it computed, even when its bound was stale: the
    deadline of a part that had already run, or the age of a part whose caller had gone. Then a request ran alone
    where the next one, within max_delay_s of it, would have joined it."""
    gate = Gate()

    async def main() -> None:
        b = Batcher("fill", gate, BatchConfig(max_batch=2, max_delay_s=0.5, workers=1, inline_rows=0),
                    ThreadPoolExecutor(1))
        await asyncio.gather(b.submit(rows(1, 1), time.monotonic() + 0.1), b.submit(rows(2, 1)))  # full: at once
        third = asyncio.create_task(b.submit(rows(3, 1)))  # the deadline on record (+0.1 s) is of a part that ran
        await asyncio.sleep(0.25)
        await asyncio.gather(third, b.submit(rows(4, 1)))  # joins it, within its 0.5 s
        await b.close()
        b = Batcher("fill", gate, BatchConfig(max_batch=3, max_delay_s=0.5, workers=1, inline_rows=0),
                    ThreadPoolExecutor(1))
        fifth = asyncio.create_task(b.submit(rows(5, 1)))
        await asyncio.sleep(0.3)
        sixth = asyncio.create_task(b.submit(rows(6, 1)))  # queued 0.3 s after the fifth, whose caller goes now:
        await asyncio.sleep(0.01)
        fifth.cancel()
        await asyncio.sleep(0.3)  # the wait bounded by the fifth's age ends; the sixth has waited only 0.3 s
        await asyncio.gather(sixth, b.submit(rows(7, 1)))  # and the seventh joins it
        await b.close()

    run(main())
    assert [x[:, 0].tolist() for x in gate.batches] == [[1, 2], [3, 4], [6, 7]]


def test_a_request_of_no_rows_is_refused_by_name() -> None:
    async def main() -> None:
        b = Batcher("empty", Gate(), BatchConfig(max_delay_s=0.01, workers=1), ThreadPoolExecutor(1))
        with pytest.raises(InvalidInput, match="holds no rows"):
            await b.submit(rows(0, 0))
        await b.close()

    run(main())


def test_rows_whose_caller_left_while_the_batch_waited_for_a_thread_are_not_computed() -> None:
    """The worker threads are shared by every batcher: a batch taken from the queue may wait for one. A part whose
    deadline passes, or whose caller cancels, during that wait is not computed (it was, though nobody waited)."""

    async def main(kind: str) -> tuple[list[np.ndarray], BaseException | None]:
        gate, pool = Gate(), ThreadPoolExecutor(1)
        b = Batcher("test", gate, BatchConfig(workers=1, inline_rows=0), pool)
        held = threading.Event()
        pool.submit(held.wait, 10)  # another batcher's run holds the only thread
        mine = asyncio.ensure_future(b.submit(rows(0, 2), time.monotonic() + 0.05 if kind == "deadline" else None))
        other = asyncio.ensure_future(b.submit(rows(10, 1)))  # taken in the same batch, still wanted
        await asyncio.sleep(0.02)  # both taken: the batch waits for the thread
        assert not b._queue and b._running == 1
        if kind == "cancel":
            mine.cancel()
        await asyncio.sleep(0.1)  # past the deadline
        held.set()
        np.testing.assert_array_equal((await other)[0], 2 * rows(10, 1))
        error = None
        try:
            await mine
        except (DeadlineExceeded, asyncio.CancelledError) as exc:
            error = exc
        await b.close()
        pool.shutdown()
        return gate.batches, error

    for kind in ("deadline", "cancel"):
        batches, error = run(main(kind))
        assert len(batches) == 1 and len(batches[0]) == 1, (kind, batches)  # the other part alone
        if kind == "deadline":
            assert isinstance(error, DeadlineExceeded) and "before compute" in str(error), error
        else:
            assert isinstance(error, asyncio.CancelledError)


def test_a_small_request_keeps_to_the_room_held_for_large_ones() -> None:
    """Rows held for large requests on their way in (their images being made) count against the queue for every
    request: one that would start a gathering, or join one, is refused while the held rows fill the queue, rather
    than the large request being refused as it queues, its images made."""
    held = {"rows": 8}

    async def go() -> None:
        b = Batcher("m/1/encode", lambda x: (x * 2,), BatchConfig(workers=1, max_batch=8, max_queue=8, gather_turns=24),
                    ThreadPoolExecutor(1), None, lambda: held["rows"])
        with pytest.raises(QueueFull, match="0 images queued and 8 on their way in, 1 more would pass the limit of 8"):
            await b.submit(np.ones((1, 3), np.float32))  # it would start a gathering
        held["rows"] = 7
        out = await asyncio.gather(b.submit(np.ones((1, 3), np.float32)), b.submit(np.ones((1, 3), np.float32)),
                                   return_exceptions=True)  # one gathers, the other would join: no room for it
        assert isinstance(out[1], QueueFull) and "1 images queued and 7 on their way in" in str(out[1]), out
        assert float(out[0][0][0, 0]) == 2.0  # type: ignore[index]
        held["rows"] = 4  # a large request let go of its room: its 4 rows queue beside the others' 4
        (y,) = await b.submit(np.ones((4, 3), np.float32))
        assert y.shape == (4, 3)
        await b.close()

    run(go())
