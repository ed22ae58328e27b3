"""For the benchmarks that spawn a server of their own: measure against it, stop it, print and keep the result."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from disco.client.bench import spawn

T = TypeVar("T")


def arguments(doc: str, n: int, n_help: str, argv: list[str] | None) -> argparse.Namespace:
    """--n, --rounds, --server-args and --json, which every such benchmark takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--n", type=int, default=n, help=n_help)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-args", default="")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def against_spawned(server_args: list[str], measure: Callable[[str], T]) -> T:
    """measure(target) against a `disco serve` started with these flags, which is stopped afterwards."""
    proc, target, _ = spawn(server_args)
    try:
        return measure(target)
    finally:
        proc.terminate()
        proc.wait(30)


def report(result: dict[str, Any], path: Path | None) -> None:
    """Print the result as JSON, and write it to path when given."""
    print(json.dumps(result, indent=1))
    if path:
        path.write_text(json.dumps(result, indent=1) + "\n")
