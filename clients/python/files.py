"""Client subcommands on files: `disco compress`, `disco decompress`, `disco models`, `disco info`.

A code file holds exactly one code (the container is self-describing; see disco.service.container).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from disco.client._client import Client
from disco.client._transport import DEFAULT_TARGET
from disco.client.errors import DiscoError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CODE_SUFFIX = ".dsc"


def _inputs(paths: list[str], suffixes: set[str]) -> list[tuple[Path, Path]]:
    """(file, its path relative to the argument it came from), folders walked recursively."""
    found = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found += [(f, f.relative_to(arg)) for f in sorted(arg.rglob("*")) if f.suffix.lower() in suffixes]
        elif arg.is_file():
            found.append((arg, Path(arg.name)))
        else:
            raise SystemExit(f"disco: {arg} is not a file or folder")
    return found


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=what)
    p.add_argument("inputs", nargs="+", help="files or folders (walked recursively)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--target", default=DEFAULT_TARGET, help="server address (default %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="images per request")
    return p


def compress_main(argv: list[str] | None = None) -> int:
    p = _parser("disco compress", "Compress image files into code files (.dsc).")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--quality", default="", help="quality level (default: the model's default)")
    a = p.parse_args(argv)
    files = _inputs(a.inputs, IMAGE_SUFFIXES)
    t0, bytes_in, bytes_out = time.perf_counter(), 0, 0
    with Client(a.target, model=a.model) as client, tqdm(total=len(files), desc="compress", unit="img") as bar:
        for i in range(0, len(files), a.batch):
            chunk = files[i : i + a.batch]
            try:
                codes = client.compress([f for f, _ in chunk], quality=a.quality)
            except DiscoError as exc:
                print(f"disco compress: {exc}", file=sys.stderr)
                return 1
            for (src, rel), code in zip(chunk, codes):
                dst = (a.out / rel).with_suffix(CODE_SUFFIX)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(code.data)
                bytes_in, bytes_out = bytes_in + src.stat().st_size, bytes_out + len(code)
            bar.update(len(chunk))
    _summary("compressed", len(files), bytes_in, bytes_out, time.perf_counter() - t0)
    return 0


def decompress_main(argv: list[str] | None = None) -> int:
    a = _parser("disco decompress", "Decompress code files (.dsc) into PNG images.").parse_args(argv)
    files = _inputs(a.inputs, {CODE_SUFFIX})
    t0, bytes_in, bytes_out = time.perf_counter(), 0, 0
    with Client(a.target) as client, tqdm(total=len(files), desc="decompress", unit="img") as bar:
        for i in range(0, len(files), a.batch):
            chunk = files[i : i + a.batch]
            try:
                pixels = client.decompress([f.read_bytes() for f, _ in chunk])
            except DiscoError as exc:
                print(f"disco decompress: {exc}", file=sys.stderr)
                return 1
            for (src, rel), img in zip(chunk, pixels):
                dst = (a.out / rel).with_suffix(".png")
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(dst)
                bytes_in, bytes_out = bytes_in + src.stat().st_size, bytes_out + dst.stat().st_size
            bar.update(len(chunk))
    _summary("decompressed", len(files), bytes_in, bytes_out, time.perf_counter() - t0)
    return 0


def _summary(verb: str, n: int, bytes_in: int, bytes_out: int, seconds: float) -> None:
    ratio = bytes_in / bytes_out if bytes_out else float("nan")
    print(f"{verb} {n} images: {bytes_in} bytes in, {bytes_out} bytes out, ratio {ratio:.1f}x, "
          f"{seconds:.2f} s ({n / max(seconds, 1e-9):.0f} images/s)")


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disco models", description="List the models a server offers.")
    p.add_argument("--target", default=DEFAULT_TARGET)
    a = p.parse_args(argv)
    with Client(a.target) as client:
        for m in client.models():
            default = next((q.name for q in m.qualities if q.is_default), "")
            print(f"{m.name}/{m.version}  input {'x'.join(map(str, m.input_shape))}  "
                  f"factors {[f.name for f in m.factors]}  default quality {default}  fingerprint {m.fingerprint[:12]}")
    return 0


def info_main(argv: list[str] | None = None) -> int:
    from disco.service import container  # pure Python: no onnxruntime behind it
    from disco.service.errors import InvalidCode

    p = argparse.ArgumentParser(prog="disco info", description="Read code headers without a server.")
    p.add_argument("codes", nargs="+", type=Path)
    a = p.parse_args(argv)
    for path in a.codes:
        data = path.read_bytes()
        try:
            h = container.parse(data)
        except InvalidCode as exc:
            print(f"{path}: not a valid code: {exc}")
            continue
        print(f"{path}: {len(data)} bytes, format {h.version}, quality id {h.quality}, "
              f"model id 0x{h.model_id:02x}, payload {len(h.payload)} bytes")
    return 0


