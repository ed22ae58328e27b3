"""Client subcommands on files: `disco compress`, `disco decompress`, `disco models`, `disco info`.

A code file (.dsc) holds exactly one code; the container is self-describing (disco.service.container).
"""
from __future__ import annotations

import argparse
import errno
import functools
import itertools
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from disco.client._client import Client
from disco.client._convert import images_in
from disco.client._transport import DEFAULT_TARGET, TLS
from disco.client.errors import DataLoss, DiscoError, InvalidArgument, ResourceExhausted, Unauthenticated, too_large

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CODE_SUFFIX = ".dsc"


def _inputs(paths: list[str], suffixes: set[str], broken: list[tuple[Path, str]]) -> list[tuple[Path, Path]]:
    """(file, its path relative to the argument it came from), folders walked recursively (_walk). What the walk
    finds but cannot read is appended to `broken` with why, to be reported as a failure of the run."""
    found = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found += _walk(arg, suffixes, broken)
        elif arg.is_file():
            found.append((arg, Path(arg.name)))
        else:
            raise SystemExit(f"disco: {arg} is not a file or folder")
    if not found and not broken:  # a run that does nothing must not look like one that succeeded
        raise SystemExit(f"disco: no files ending in {', '.join(sorted(suffixes))} under {', '.join(paths)}")
    return found


def _walk(arg: Path, suffixes: set[str], broken: list[tuple[Path, str]]) -> list[tuple[Path, Path]]:
    """The files under a folder with a wanted suffix, hidden files and folders (a leading dot) skipped. Links to
    folders are followed, and every folder walked once: the tree's own under their own names (a link to one is not
    followed), one that only links lead to (or a folder inside it) under the first name the walk meets. A link with a
    wanted suffix that leads nowhere, and a folder that cannot be listed, go to `broken`."""
    own = {os.path.realpath(arg)}  # listed or not (one that cannot be listed is a failure, below)
    for root, dirs, _ in os.walk(arg):
        own.update(os.path.realpath(p) for p in (os.path.join(root, d) for d in dirs) if not os.path.islink(p))
    seen, found = set(own), []
    for root, dirs, names in os.walk(arg, followlinks=True, onerror=functools.partial(_unlisted, broken, arg)):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            if d.startswith("."):  # hidden: .git, a staging folder
                continue
            real = os.path.realpath(path)
            if os.path.islink(path) or real not in own:  # reached through a link
                if real in seen:
                    continue
                seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            f = Path(root) / name
            if f.suffix.lower() not in suffixes or name.startswith("."):  # hidden: macOS's ._x.png, ours .tmp
                continue
            if f.is_file():
                found.append((f, f.relative_to(arg)))
            else:
                broken.append((f, "a symbolic link that leads nowhere" if f.is_symlink() else "not a file"))
    return found


def _unlisted(broken: list[tuple[Path, str]], arg: Path, exc: OSError) -> None:
    """A folder os.walk cannot list: a named failure of the run, not skipped without a word."""
    broken.append((Path(exc.filename or arg), f"cannot read the folder: {exc.strerror or exc}"))


_TEMPORARY = itertools.count()  # with the process and thread: a short temporary name, whatever the output's length


def _write_whole(outputs: list[tuple[Path, Callable[[Path], None]]]) -> int:
    """Write each file under a temporary name beside it, then rename them all into place: a failure (a full disk, a
    folder where a file goes) leaves none of them, and whatever an earlier run wrote there as it was. Returns the bytes
    written."""
    temps: list[Path] = []
    try:
        for dst, write in outputs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            temps.append(dst.parent / f".disco-{os.getpid()}-{threading.get_ident()}-{next(_TEMPORARY)}.tmp")
            write(temps[-1])
        for dst, _ in outputs:  # before any rename: a container's files are replaced all or none
            if dst.is_dir() and not dst.is_symlink():
                raise IsADirectoryError(21, "a folder is where the output file goes", str(dst))
        for tmp, (dst, _) in zip(temps, outputs):
            os.replace(tmp, dst)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return sum(dst.stat().st_size for dst, _ in outputs)


def _check_out(out: Path) -> None:
    """Refuse, before any work, an output folder that is a file: every write would fail (a review: each file was sent
    again alone, and failed again)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"disco: -o {out} is a file, expected a folder (made if missing)")


def _check_destinations(planned: list[tuple[Path, list[Path]]]) -> None:
    """Refuse, before any work, a run in which two inputs would write the same file (x.png and x.jpg both give
    x.dsc; two folders' a.png both give a.dsc): one would silently replace the other."""
    seen: dict[Path, Path] = {}
    for src, dsts in planned:
        for dst in dsts:
            if dst in seen:
                raise SystemExit(f"disco: {seen[dst]} and {src} would both be written to {dst}; "
                                 "rename one, or send them in separate runs with separate output folders")
            seen[dst] = src


def security_flags(p: argparse.ArgumentParser) -> None:
    """--token and --tls-ca/--tls-cert/--tls-key, as every client command (and disco bench) takes them."""
    p.add_argument("--token", default=os.environ.get("DISCO_TOKEN"), help="bearer token (env DISCO_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="CA file: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client key, for mutual TLS")


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("DISCO_TARGET", DEFAULT_TARGET),
                   help="server address, or several comma-separated (env DISCO_TARGET, default %(default)s)")
    security_flags(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default %(default)s)")


# A bulk run waits out a busy server rather than fail its files: a batch refused for a full queue
# (RESOURCE_EXHAUSTED) is sent again after a jittered backoff, up to 10 times (a review: 2,872 of 3,000 files failed
# against a server with --max-queue 64 under the default --batch and --concurrency). Only that: a server that is not
# there fails as fast as the SDK's default retries let it (about a second), not after ten attempts.
_BUSY_ATTEMPTS, _BUSY_BASE_S, _BUSY_CAP_S = 10, 0.05, 2.0


def _client(a: argparse.Namespace, **kw: Any) -> Client:
    """The client the flags describe; a bad flag or an unreadable TLS file ends the command with its message, and
    a warning (a token sent in plaintext) is one line, not Python's warning with the line of code that gave it."""
    if (a.tls_cert is None) != (a.tls_key is None):
        raise SystemExit("disco: --tls-cert and --tls-key go together: both for mutual TLS, or neither")
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            client = Client(a.target, tls=TLS.of(a.tls_ca, a.tls_cert, a.tls_key), token=a.token or None,
                            timeout=a.timeout, **kw)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"disco: {exc}") from exc
    for w in said:
        print(f"disco: warning: {w.message}", file=sys.stderr)
    return client


def _stop_reason(exc: DiscoError) -> str:
    """Why a run stopped, with the flag that fixes a refused token (the server's message names the metadata)."""
    if isinstance(exc, Unauthenticated):
        return f"{exc} (the token: --token, or DISCO_TOKEN)"
    return str(exc)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: expected at least 1")
    return n


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=what)
    p.add_argument("inputs", nargs="+", help="files or folders (walked recursively)")
    p.add_argument("-o", "--out", required=True, type=Path,
                   help="output folder (the input tree is mirrored; files already there are replaced)")
    p.add_argument("--batch", type=_positive, default=64, help="files per request (default %(default)s; the client cuts "
                                                               "a request further to the server's limits)")
    p.add_argument("--concurrency", type=_positive, default=4, help="requests in flight (default %(default)s)")
    _connection_flags(p)
    return p


# A request that fails for one of its files fails whole; these errors are about a file, so its batch is sent again
# one file at a time, to write every good file and name every bad one. Other errors (server down, auth) are not.
_FILE_ERRORS = (InvalidArgument, DataLoss, OSError, ValueError)
# A write that fails for these fails for every file after it: the run sends no more batches (a review: a full disk
# had every file of a 50-file run sent again one by one, and each write fail anew).
_DEVICE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _run(files: list[Any], a: argparse.Namespace, desc: str, fetch: Callable[[list[Any]], list[Any]],
         write: Callable[[Any, Any], tuple[int, int, int]], unread: Sequence[tuple[Path, str]] = ()) -> int:
    """Send batches of files (each item's [0] is its path) through `fetch` (-> one answer per item), a bounded
    number in flight, and `write` each item's answer (-> bytes in, bytes out, images written; its outputs whole or
    none). A batch that fails for a file is sent again file by file, and an error that is not about a file (server
    down, token refused, a full disk) stops the run. A write that fails fails its file alone: the server's answer
    was right, and the files written before it stay. Prints the summary line, then every file that failed, those
    that could not be read beforehand (`unread`) among them (exit 1)."""
    batches = [files[i : i + a.batch] for i in range(0, len(files), a.batch)]
    failed: list[tuple[Path, str]] = list(unread)
    stopped: list[str] = []

    def patient(batch: list[Any]) -> list[Any]:
        """fetch(batch), sent again while the server's queue is full (not a message too large: that stays so)."""
        for attempt in itertools.count():
            try:
                return fetch(batch)
            except ResourceExhausted as exc:
                if too_large(exc) or attempt + 1 >= _BUSY_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, min(_BUSY_CAP_S, _BUSY_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    def written(batch: list[Any], answers: list[Any]) -> tuple[int, int, int]:
        totals = [0, 0, 0]
        for item, answer in zip(batch, answers):
            try:
                totals = [t + n for t, n in zip(totals, write(item, answer))]
            except OSError as exc:
                failed.append((item[0], str(exc)))
                if exc.errno in _DEVICE_ERRNOS and not stopped:
                    stopped.append(f"a write failed: {exc}")
        return totals[0], totals[1], totals[2]

    def guarded(batch: list[Any]) -> tuple[int, int, int]:
        """fetch and write a batch, with its failures recorded instead of raised."""
        if stopped:
            failed.extend((item[0], f"not sent after {stopped[0]}") for item in batch)
            return 0, 0, 0
        try:
            answers = patient(batch)
        except _FILE_ERRORS as exc:
            if len(batch) == 1:
                failed.append((batch[0][0], str(exc)))
                return 0, 0, 0
            totals = [guarded([item]) for item in batch]
            return tuple(map(sum, zip(*totals)))  # type: ignore[return-value]
        except DiscoError as exc:
            why = _stop_reason(exc)
            stopped.append(why)
            failed.extend((item[0], why) for item in batch)
            return 0, 0, 0
        return written(batch, answers)

    t0, bytes_in, bytes_out, done = time.perf_counter(), 0, 0, 0
    with ThreadPoolExecutor(a.concurrency) as pool, tqdm(total=len(files), desc=desc, unit="img") as bar:
        for (n_in, n_out, n), batch in zip(pool.map(guarded, batches), batches):
            bytes_in, bytes_out, done = bytes_in + n_in, bytes_out + n_out, done + n
            bar.update(len(batch))
    seconds = time.perf_counter() - t0
    if desc == "compress":  # codes are smaller than their images; decompression expands them
        size = f"ratio {bytes_in / bytes_out:.1f}x" if bytes_out else "no ratio"
    else:
        size = f"expansion {bytes_out / bytes_in:.1f}x" if bytes_in else "no expansion"
    print(f"{desc}ed {done} images: {bytes_in} bytes in, {bytes_out} bytes out, {size}, "
          f"{seconds:.2f} s ({done / max(seconds, 1e-9):.0f} images/s)")
    if not failed:
        return 0
    print(f"disco {desc}: {len(failed)} of {len(files) + len(unread)} files failed, nothing was written for them:", file=sys.stderr)
    for path, why in sorted(failed):  # every one: the only place a failed file is named
        print(f"  {path}: {why}", file=sys.stderr)
    return 1


def compress_main(argv: list[str] | None = None) -> int:
    p = _parser("disco compress", "Compress image files into code files (.dsc), one per image.")
    p.add_argument("--model", default="", help="NAME or NAME/VERSION (default: the server's default model, its "
                                                 "latest version)")
    p.add_argument("--quality", default="", help="quality level (default: the model's default)")
    a = p.parse_args(argv)
    _check_out(a.out)
    broken: list[tuple[Path, str]] = []
    files = [(f, (a.out / rel).with_suffix(CODE_SUFFIX)) for f, rel in _inputs(a.inputs, IMAGE_SUFFIXES, broken)]
    _check_destinations([(f, [dst]) for f, dst in files])
    name, _, version = a.model.partition("/")
    with _client(a, model=name) as client:
        if a.model or a.quality:  # settings of every request: checked once here, not found wrong again for every file
            try:
                known = [q.name for q in client.model(name, version).qualities]
            except DiscoError as exc:
                raise SystemExit(f"disco compress: {exc}") from exc
            if a.quality and a.quality not in known:
                raise SystemExit(f"disco compress: --quality {a.quality!r} is unknown to model "
                                 f"{a.model or 'the default'}, expected one of {known}")

        def fetch(batch: list[tuple[Path, Path]]) -> list[Any]:
            codes = client.compress([f for f, _ in batch], version=version, quality=a.quality)
            if len(codes) != len(batch):
                raise DiscoError(f"the server returned {len(codes)} codes for {len(batch)} images")
            return codes

        def write(item: tuple[Path, Path], code: Any) -> tuple[int, int, int]:
            src, dst = item
            size = src.stat().st_size
            return size, _write_whole([(dst, functools.partial(_write_bytes, code.data))]), 1

        return _run(files, a, "compress", fetch, write, broken)


def _trusted_count(blob: bytes, client: Client, fingerprints: list[bytes]) -> int:
    """Images a code file holds: a batch container's declared count only once its checksum matches one of the
    server's models (fingerprints, filled on first need), so that a corrupted or forged count (up to 2^20) never
    plans that many output files; an unverified one counts 1, and the server names what is wrong with it."""
    n = images_in(blob)
    if n == 1:
        return 1
    from disco.service import container  # pure Python: no onnxruntime behind it

    if not fingerprints:
        try:
            fingerprints += [bytes.fromhex(m.fingerprint) for m in client.models()]
        except DiscoError as exc:
            raise SystemExit(f"disco decompress: {exc}") from exc
    return n if any(container.verify(blob, fp) for fp in fingerprints) else 1


def decompress_main(argv: list[str] | None = None) -> int:
    a = _parser("disco decompress", "Decompress code files (.dsc) into PNG images.").parse_args(argv)
    _check_out(a.out)
    files: list[tuple[Path, bytes, list[Path]]] = []
    unreadable: list[tuple[Path, str]] = []  # reported with the run's other failures; the rest still decompress
    fingerprints: list[bytes] = []  # the server's models', fetched once a batch container needs them
    with _client(a) as client:
        for f, rel in _inputs(a.inputs, {CODE_SUFFIX}, unreadable):
            try:
                blob = f.read_bytes()
            except OSError as exc:
                unreadable.append((f, f"cannot read it: {exc}"))
                continue
            n = _trusted_count(blob, client, fingerprints)  # a batch container: written as <stem>-<k>.png
            files.append((f, blob, [a.out / rel.with_suffix(".png")] if n == 1 else
                          [a.out / rel.with_name(f"{rel.stem}-{k:05d}.png") for k in range(n)]))
        _check_destinations([(f, dsts) for f, _, dsts in files])

        def fetch(batch: list[tuple[Path, bytes, list[Path]]]) -> list[Any]:
            pixels = client.decompress([blob for _, blob, _ in batch])
            wanted = sum(len(dsts) for _, _, dsts in batch)
            if len(pixels) != wanted:
                raise DiscoError(f"the server returned {len(pixels)} images for codes that hold {wanted}")
            ends = list(itertools.accumulate(len(dsts) for _, _, dsts in batch))
            return [pixels[end - len(dsts) : end] for end, (_, _, dsts) in zip(ends, batch)]

        def write(item: tuple[Path, bytes, list[Path]], images: Any) -> tuple[int, int, int]:
            _, blob, dsts = item  # a container's images are written whole or not at all, as the summary says
            return len(blob), _write_whole([(dst, functools.partial(_save_png, img)) for dst, img in zip(dsts, images)]), len(dsts)

        return _run(files, a, "decompress", fetch, write, unreadable)


def _write_bytes(data: bytes, path: Path) -> None:
    path.write_bytes(data)


def _save_png(img: Any, path: Path) -> None:
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path, format="PNG")


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco models", description="List the models a server offers.")
    _connection_flags(p)
    a = p.parse_args(argv)
    try:
        with _client(a) as client:
            for m in client.models():
                default = next((q.name for q in m.qualities if q.is_default), "")
                print(f"{m.name}/{m.version}  input {'x'.join(map(str, m.input_shape))}  "
                      f"factors {[f.name for f in m.factors]}  qualities {[q.name for q in m.qualities]} "
                      f"(default {default})  fingerprint {m.fingerprint[:12]}")
    except DiscoError as exc:
        print(f"disco models: {_stop_reason(exc)}", file=sys.stderr)
        return 1
    return 0


def info_main(argv: list[str] | None = None) -> int:
    from disco.client._inspect import inspect

    p = argparse.ArgumentParser(prog="disco info", description="Read code headers without a server.")
    p.add_argument("codes", nargs="+", type=Path, help="code files, or folders of them (walked recursively)")
    a = p.parse_args(argv)
    status = 0
    broken: list[tuple[Path, str]] = []
    paths: list[Path] = []
    for arg in a.codes:  # folders walked as compress and decompress walk them; a file that is not there is named below
        paths += [f for f, _ in _walk(arg, {CODE_SUFFIX}, broken)] if arg.is_dir() else [arg]
    if not paths and not broken:  # a run that does nothing must not look like one that succeeded
        print(f"disco info: no files ending in {CODE_SUFFIX} under {', '.join(map(str, a.codes))}", file=sys.stderr)
        return 1
    for path, why in broken:
        print(f"{path}: cannot read: {why}", file=sys.stderr)
        status = 1
    for path in paths:
        try:
            i = inspect(path.read_bytes())
        except OSError as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)  # errors apart from the headers, as a pipe wants
            status = 1
            continue
        except DiscoError as exc:
            print(f"{path}: not a valid code: {exc}", file=sys.stderr)
            status = 1
            continue
        kind = {1: "fixed-width", 2: "entropy-coded", 3: f"batch of {i.count}"}.get(i.format, "?")
        print(f"{path}: {i.size} bytes, format {i.format} ({kind}), quality id {i.quality_id}, "
              f"model id 0x{i.model_id:02x}, payload {i.payload_bytes} bytes")
    return status
