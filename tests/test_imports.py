"""service/ and clients/ run without torch; the client imports neither torch nor onnxruntime."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A meta-path finder that makes the named top-level modules unimportable, as if not installed.
HIDE = textwrap.dedent("""
    import sys
    class Hide:
        def __init__(self, names): self.names = names
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Hide(set(sys.argv[1].split(","))))
""")


def run(hidden: str, body: str) -> subprocess.CompletedProcess[str]:
    code = HIDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, hidden], capture_output=True, text=True, timeout=120)


def test_service_imports_and_serves_without_torch() -> None:
    r = run("torch,onnx", """
        import asyncio
        from disco.service.config import ServeConfig
        from disco.service.server import create_server
        async def main():
            running = await create_server(ServeConfig(host="127.0.0.1", port=0, metrics_port=0))
            await running.stop(0)
        asyncio.run(main())
        assert "torch" not in sys.modules
        print("served")
    """)
    assert r.returncode == 0 and "served" in r.stdout, r.stderr


def test_client_imports_without_torch_or_onnxruntime() -> None:
    r = run("torch,onnx,onnxruntime,prometheus_client,grpc_reflection", """
        import disco.client, disco.client.cli, disco.client.files
        from disco.client import Client
        assert not {"torch", "onnxruntime"} & set(sys.modules)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_the_disco_command_starts_before_the_sdk_is_imported() -> None:
    """`disco serve` sets its SIGTERM handler first thing (a container's PID 1 loses a SIGTERM that comes before it),
    and the command's module was reached through this package, which imported the whole SDK first (0.2 s). Its
    names are now imported on first use, each from the module that defines it."""
    r = run("", """
        import disco.client.cli
        assert not {"grpc", "numpy", "asyncio"} & set(sys.modules), sorted(sys.modules)
        import disco.client
        assert disco.client.types.Code and disco.client.errors.DataLoss  # the public submodules, as before
        from disco.client import Client, DataLoss, cli  # a name, and a submodule
        for name in disco.client.__all__:
            assert getattr(disco.client, name).__name__ == name, name
        assert Client.__module__ == "disco.client._client" and {"AsyncClient", "errors"} <= set(dir(disco.client))
        try:
            disco.client.Nope
        except AttributeError as exc:
            assert "has no attribute 'Nope'" in str(exc)
        else:
            raise AssertionError("disco.client.Nope resolved")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.parametrize("command, extra", [("train", "train"), ("export", "train"), ("serve", "serve")])
def test_missing_extra_is_named_not_a_traceback(command: str, extra: str) -> None:
    r = run("torch,onnx,onnxruntime", f"""
        from disco.client.cli import main
        raise SystemExit(main(["{command}", "--help"]))
    """)
    assert r.returncode == 2, r.stderr
    assert f"pip install 'disco-codec[{extra}]'" in r.stderr and "Traceback" not in r.stderr
