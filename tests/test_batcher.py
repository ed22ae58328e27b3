"""The dynamic batcher as a plain object: coalescing, splitting, bounded queue, deadlines, cancellation."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from disco.service.batcher import BatchConfig, Batcher
from disco.service.errors import DeadlineExceeded, QueueFull


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
