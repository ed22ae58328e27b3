"""The `disco` command: one subcommand per job, each module imported only when its subcommand runs.

`pip install disco-codec` gives the client commands; a subcommand whose extra is missing says which
extra to install instead of printing a traceback.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import sys

# subcommand -> (module, function, extra that provides its imports, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("disco.export.train", "main", "train", "train a beta-VAE on dSprites"),
    "export": ("disco.export.package", "main", "train", "write a model repository entry from a checkpoint"),
    "eval": ("disco.export.evaluate.run", "main", "eval", "disentanglement metrics and pictures of a run or a model"),
    "serve": ("disco.service.server", "main", "serve", "serve the gRPC codec (embedded default model when given nothing)"),
    "rd": ("disco.service.rd", "main", "serve", "rate-distortion of a model against classical codecs"),
    "bench": ("disco.client.bench", "main", "serve", "load a server and measure it against raw ONNX Runtime and a no-op RPC"),
    "compress": ("disco.client.files", "compress_main", "", "compress image files through a server"),
    "decompress": ("disco.client.files", "decompress_main", "", "decompress code files to PNG through a server"),
    "models": ("disco.client.files", "models_main", "", "list the models a server offers"),
    "info": ("disco.client.files", "info_main", "", "read a code's header offline"),
}

# Third-party modules that only an extra brings.
_EXTRA_MODULES = {"torch": "train", "onnx": "train", "matplotlib": "eval", "sklearn": "eval", "onnxruntime": "serve",
                  "prometheus_client": "serve", "grpc_reflection": "serve"}


def usage() -> str:
    lines = ["usage: disco <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, _, help_) in COMMANDS.items()]
    lines += ["", "disco <command> --help shows a command's options."]
    return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, ended as Ctrl-C ends a run (the files being written finish or are removed, nothing half-written)."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _serve_terminated(signum: int, frame: object) -> None:
    """SIGTERM for `disco serve` until the server sets its own handler: nothing runs yet that a drain would wait
    for, so it ends at once. Raising (as _terminated does) surfaced in what the signal interrupted: inside
    onnxruntime's native import it became an ImportError, a traceback and exit status 1."""
    with contextlib.suppress(OSError):  # a closed or broken stderr must not keep it from ending
        os.write(2, b"disco serve: terminated\n")
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback per process
        terminated = isinstance(exc, Terminated)
        print(f"disco {' '.join((sys.argv[1:] if argv is None else argv)[:1])}: "
              f"{'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout; a missing command is an error: stderr
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"disco: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, extra, _ = COMMANDS[name]
    if name == "serve":  # the server handles both once it can. SIGHUP (reload) would kill it while it imports; as
        # a container's PID 1, which ignores a signal it has no handler for, a SIGTERM while it imported was lost,
        # and it came up anyway (Kubernetes then waits out the grace period and kills)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _serve_terminated)
    if name in ("compress", "decompress", "bench"):  # killed by SIGTERM, a run left its temporary files behind,
        # and a bench the server it had spawned, serving on with no one to stop it (a review)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        needed = _EXTRA_MODULES.get(top, extra)
        if top in _EXTRA_MODULES:
            print(f"disco {name} needs {top}, from the [{needed}] extra: pip install 'disco-codec[{needed}]'",
                  file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(mod, func)(rest) or 0)
    except BrokenPipeError:  # `disco models | head -1`: the reader left; say nothing more (Python docs: SIGPIPE)
        if not _stdout_reader_gone():
            raise  # another pipe or socket: not this one's to hide
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not raise again
        return 1


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose reading end has closed (poll says POLLERR)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (a captured stdout)
        return False


if __name__ == "__main__":
    raise SystemExit(main())
