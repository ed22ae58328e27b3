"""service/ and clients/ are mypy-clean (STYLE.md), and every Python file passes the lint rules in pyproject.toml."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_service_and_clients() -> None:
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "service", "clients"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_lint() -> None:
    pytest.importorskip("ruff")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "service", "clients", "export", "benchmarks", "tests", "scripts"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_type_checkers_see_the_sdk_names(tmp_path: Path) -> None:
    """disco.client (py.typed) resolves its names on first use; a module __getattr__ visible to a type checker would
    have let it take any name, a misspelt one too, as Any."""
    pytest.importorskip("mypy")
    package = tmp_path / "site" / "disco"  # the installed layout (pyproject.toml's package-dir), as links
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    for name, folder in (("client", "clients/python"), ("service", "service"), ("export", "export"),
                         ("v1", "protos/disco/v1")):
        (package / name).symlink_to(ROOT / folder)
    user = tmp_path / "user.py"
    user.write_text("import disco.client\nfrom disco.client import Client, Clinet\n"
                    "code: disco.client.types.Code\nloss = disco.client.errors.DataLoss\n"
                    "client: Client = Client('localhost:50051')\nx = disco.client.NoSuchThing\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "MYPY_FORCE_COLOR")}  # plain lines
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                        "--no-color-output", "--no-pretty", "--follow-imports=silent", str(user)],
                       env={**env, "MYPYPATH": str(tmp_path / "site")},
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    errors = [line.split(": error: ")[1] for line in r.stdout.splitlines() if line.startswith("user.py:")
              and ": error: " in line]  # not the stubs' (protobuf's types are not installed)
    assert errors == ['Module "disco.client" has no attribute "Clinet"; maybe "Client"?  [attr-defined]',
                      'Module has no attribute "NoSuchThing"  [attr-defined]'], r.stdout + r.stderr
