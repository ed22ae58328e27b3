"""The checked-in generated code is exactly what scripts/gen_protos.sh makes from the .proto."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "codegen produced nothing"
    for rel in generated:
        checked_in = ROOT / "protos" / rel
        assert checked_in.exists(), f"{rel} is generated but not checked in; run scripts/gen_protos.sh"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), (
            f"protos/{rel} disagrees with the .proto; run scripts/gen_protos.sh")
