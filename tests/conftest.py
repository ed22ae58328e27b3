"""Shared fixtures: a real server on an ephemeral port (in its own event-loop thread) and tiny models."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from disco.service.config import ServeConfig
from disco.service.repository import EMBEDDED


class ServerThread:
    """A real grpc.aio server from create_server(), run on an event loop in a daemon thread."""

    def __init__(self, cfg: ServeConfig) -> None:
        from disco.service.server import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self.run(create_server(cfg))
        self.target = f"127.0.0.1:{self.running.port}"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def serve(repository: Path | str = "", **kw: Any) -> ServerThread:
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **kw}
    return ServerThread(ServeConfig(repository=str(repository), **settings))


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """The embedded default model, served as `disco serve` would serve it."""
    s = serve()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def sprites() -> tuple[np.ndarray, np.ndarray]:
    """256 held-out dSprites images as uint8 (N, 64, 64, 1) in {0, 255}, with their factor classes."""
    from disco.export.data.dsprites import DSprites

    imgs, classes = DSprites().sample(256, np.random.default_rng(2024))
    return (imgs * 255)[..., None], classes


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, tiny model (random weights, 20 steps) exported with the real exporter: another fingerprint."""
    pytest.importorskip("torch")
    from disco.export.package import export
    from disco.export.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    ckpt = train(TrainConfig(steps=20, batch_size=16, ckpt_every=20, log_every=10, threads=1), root / "run")
    export(ckpt, root / "repo", "tiny", "1", kl_threshold=0.0, n_stats=512, n_eval=64)
    return root / "repo"


@pytest.fixture(scope="session")
def embedded() -> Path:
    return EMBEDDED / "dsprites" / "1"
