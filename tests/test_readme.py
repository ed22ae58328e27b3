"""The README's Python examples run as written against a real server (only the address is changed)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import ServerThread

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, server: ServerThread, tmp_path: Path) -> None:
    code = BLOCKS[index].replace("localhost:50051", server.target)
    if "asyncio.run(main(images))" in code:  # the async example reuses the sync example's images
        code = BLOCKS[0].split("with Client")[0] + code
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
