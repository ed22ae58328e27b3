"""The model repository: <root>/<name>/<version>/{encoder.onnx, decoder.onnx, model.json}, and optionally
<root>/<name>/serving.json, batching settings for every version of that model (like Triton's per-model
config.pbtxt): {"max_batch": 16, "max_queue": 1024, "max_delay_ms": 0.5, "batch_workers": 2}, each key
optional, overriding the server's flags for that model only.

A version is loaded only after it verifies: file hashes match model.json, and the fingerprint
(sha-256 of decoder.onnx and the canonical codec tables) is recomputed and matches. The server never
guesses: shapes, dims, factor names and tables all come from model.json. A serving.json that does not
parse, names an unknown key or holds a bad value refuses the whole repository: the server does not start,
and a hot reload is refused while the old snapshot keeps serving (never a model silently on other settings).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from disco.service.codec import Codec, is_number
from disco.service.errors import NotFound, shown

log = logging.getLogger(__name__)

SCHEMA = 1
EMBEDDED = Path(__file__).parent / "models"  # the models that ship inside the package
EMBEDDED_DEFAULT = "dsprites"  # what a request that names no model gets from the embedded repository


class RepositoryError(ValueError):
    """The repository cannot be served as it is: no loadable model, or a bad serving.json. `refused`: the versions
    refused on the way (folder -> why), so that a poll that meets the same ones does not log them again."""

    def __init__(self, message: str, refused: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.refused = dict(refused or {})


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(decoder_onnx: bytes, codec_tables: dict[str, Any]) -> bytes:
    """What a code is bound to: the decoder network and the codec tables, nothing else."""
    return hashlib.sha256(decoder_onnx + b"\0" + canonical_json(codec_tables)).digest()


# A poll reads every version again: a file's hashes are kept while its stat says it has not changed (device, inode,
# size, modification and change times in ns), so that only what changed is read (a review measured half a core busy
# with --reload-interval-s 1 over three versions of 300 MB files). Loading a version still checks the bytes it runs
# (runtime.verified_bytes), whatever this says.
_HASHES: dict[tuple[Path, bytes], tuple[tuple[int, ...], bytes]] = {}
_RACY_S = 2.0


def _stat_key(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _hash_file(path: Path, suffix: bytes = b"") -> bytes:
    """sha-256 of the file's bytes followed by suffix, read in chunks, from the cache while the file is unchanged."""
    key = (path, hashlib.sha256(suffix).digest() if suffix else b"")
    before = _stat_key(path)
    hit = _HASHES.get(key)
    if hit is not None and hit[0] == before:
        return hit[1]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(suffix)
    digest = h.digest()
    # Not cached when it changed while it was read, nor while it changed too recently for its timestamps to tell a
    # later write in the same tick (coarse file system clocks): git's "racily clean" rule, with a 2 s margin.
    if _stat_key(path) == before and time.time() - before[4] / 1e9 > _RACY_S:
        if len(_HASHES) > 4096:  # versions come and go: a bound, not an eviction policy
            _HASHES.clear()
        _HASHES[key] = (before, digest)
    return digest


def sha256_file(path: Path) -> str:
    return _hash_file(path).hex()


def fingerprint_file(decoder: Path, codec_tables: dict[str, Any]) -> bytes:
    """fingerprint() of a decoder.onnx on disk."""
    return _hash_file(decoder, b"\0" + canonical_json(codec_tables))


@dataclass(frozen=True)
class ModelEntry:
    """One verified version of a model on disk."""

    name: str
    version: str
    path: Path
    meta: dict[str, Any]
    codec: Codec
    serving: dict[str, float] = field(default_factory=dict)  # the model's serving.json (checked), or empty

    @property
    def fingerprint(self) -> bytes:
        return self.codec.fingerprint

    @cached_property  # 185 us for the embedded models' model.json (made once: looked up per large request)
    def identity(self) -> str:
        """What a loaded version is built from: its folder, model.json (which holds every file's sha256) and
        serving.json. Equal identities load into equal sessions and batchers (the server's own settings are fixed);
        a version whose files were replaced in place has a new one."""
        return json.dumps([str(self.path), self.meta, self.serving], sort_keys=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        i = self.meta["input"]
        return int(i["height"]), int(i["width"]), int(i["channels"])

    @property
    def factors(self) -> list[dict[str, Any]]:
        return list(self.meta["factors"])


# Each setting's type and range. The caps keep a typo from hanging the server: warm-up runs every batch size up
# to max_batch, and a request waits up to max_delay_ms for its batch to fill.
SERVING_KEYS: dict[str, tuple[type, float, float]] = {
    "max_batch": (int, 1, 1024), "max_queue": (int, 1, 1 << 20), "max_delay_ms": (float, 0, 1000),
    "batch_workers": (int, 1, 64), "gather_turns": (int, 0, 1024),
}


def bound_text(v: float) -> str:
    """A range's end as written: 1048576, not 1.04858e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))  # shortest exact form: 2147483.647, not 2.14748e+06


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a setting can take")


def _not_finite(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def load_serving(path: Path) -> dict[str, float]:
    """A model's serving.json: settings that override the server's for that model. Raises RepositoryError when bad."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_bytes(), parse_constant=_no_constant)  # NaN, Infinity, -Infinity refused
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RepositoryError(f"{path} does not parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path} holds {type(raw).__name__}, expected an object of {sorted(SERVING_KEYS)}")
    unknown = sorted(set(raw) - set(SERVING_KEYS))
    if unknown:
        raise RepositoryError(f"{path}: unknown settings {unknown}, expected some of {sorted(SERVING_KEYS)}")
    out: dict[str, float] = {}
    for key, value in raw.items():
        kind, low, high = SERVING_KEYS[key]
        if not is_number(value) or not low <= value <= high or (kind is int and value != int(value)):
            what = "an integer" if kind is int else "a number"
            raise RepositoryError(f"{path}: {key} is {value!r}, expected {what} from {bound_text(low)} to {bound_text(high)}")
        out[key] = kind(value)
    return out


def check_version(version: str) -> None:
    """Versions are numbers, the latest the highest (as Triton's are): "1", "2", ..., no leading zeros, so
    that one version has one name and "0005" cannot stand beside "5"."""
    if not (version.isascii() and version.isdigit() and version == str(int(version)) and int(version) >= 1):
        raise ValueError(f"version {version!r} is not a version number: expected 1, 2, ... without leading zeros")


def _is_count(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


MAX_SIDE = 4096  # pixels a model's input may have on a side: far past a disentangled VAE's 64
MAX_CHANNELS = 4  # gray, RGB, and room for one more
MAX_LATENT_DIM = 4096  # a few to a few hundred in practice


def check_meta(path: Path, meta: Any) -> None:
    """The fields of model.json the server reads, each of the type and range it needs (raises ValueError naming the
    first that is not): a version that would fail later, on a request, is refused at load instead."""
    where = f"{path}/model.json"
    if not isinstance(meta, dict):
        raise ValueError(f"{where} holds {type(meta).__name__}, expected an object")
    missing = sorted({"schema", "name", "version", "input", "latent_dim", "factors", "codec", "fingerprint", "files"} - set(meta))
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if not _is_count(meta["latent_dim"]):
        raise ValueError(f"{where}: latent_dim {meta['latent_dim']!r}, expected an integer of 1 or more")
    shape = meta["input"]
    if not isinstance(shape, dict) or not all(_is_count(shape.get(k)) for k in ("height", "width", "channels")):
        raise ValueError(f"{where}: input {shape!r}, expected {{height, width, channels}} as integers of 1 or more")
    if not (shape["height"] <= MAX_SIDE and shape["width"] <= MAX_SIDE and shape["channels"] <= MAX_CHANNELS):
        # warm-up runs max_batch such images at once: a typo of 100000x100000 asked for 37 GiB, and every reload
        # failed on it (a memory error is the machine's, not a version's, so it was not refused)
        raise ValueError(f"{where}: input {shape['height']}x{shape['width']}x{shape['channels']} (HxWxC), expected "
                         f"at most {MAX_SIDE}x{MAX_SIDE}x{MAX_CHANNELS}")
    if meta["latent_dim"] > MAX_LATENT_DIM:
        raise ValueError(f"{where}: latent_dim {meta['latent_dim']}, expected at most {MAX_LATENT_DIM}")
    if not isinstance(meta.get("description", ""), str):
        raise ValueError(f"{where}: description {meta['description']!r}, expected a string")
    files = meta["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and Path(k).name == k
                                              and k not in ("", ".", "..") for k, v in files.items()):
        raise ValueError(f"{where}: files {files!r}, expected file names in the version's folder -> sha-256")
    if not isinstance(meta["fingerprint"], str) or not isinstance(meta["codec"], dict):
        raise ValueError(f"{where}: fingerprint must be a hex string and codec an object")
    factors = meta["factors"]
    if not isinstance(factors, list):
        raise ValueError(f"{where}: factors {factors!r}, expected a list")
    for i, f in enumerate(factors):
        ok = (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] and _is_count(f.get("dim"), 0)
              and f["dim"] < meta["latent_dim"] and all(is_number(f.get(k)) for k in ("kl_nats", "min", "max"))
              and f["min"] <= f["max"])
        if not ok:
            raise ValueError(f"{where}: factor {i} is {f!r}, expected {{name, dim < latent_dim {meta['latent_dim']}, "
                             "kl_nats, min <= max} with finite numbers")
    if len({f["name"] for f in factors}) != len(factors):
        raise ValueError(f"{where}: factor names repeat: {[f['name'] for f in factors]}")


def load_entry(path: Path, serving: dict[str, float] | None = None) -> ModelEntry:
    """Read and verify one <name>/<version> folder (with its model's serving settings, read by the caller).
    Raises ValueError when it does not verify."""
    try:  # NaN and Infinity are refused here as in serving.json: a NaN center or fill would decode to black, silently
        meta = json.loads((path / "model.json").read_bytes(), parse_constant=_not_finite)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}/model.json does not parse: {exc}") from exc
    check_meta(path, meta)
    if meta.get("schema") != SCHEMA:
        raise ValueError(f"{path}/model.json schema {meta.get('schema')!r} is unknown, expected {SCHEMA}")
    if (path.parent.name, path.name) != (meta.get("name"), str(meta.get("version"))):
        raise ValueError(f"{path} holds model.json of {meta.get('name')}/{meta.get('version')}; "
                         "the folders must be <name>/<version>")
    try:
        check_version(path.name)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    unlisted = {"encoder.onnx", "decoder.onnx"} - set(meta["files"])
    if unlisted:  # every file the server runs is verified (and a reload's identity of a version rests on it)
        raise ValueError(f"{path}/model.json lists no sha-256 for {sorted(unlisted)}")
    for fname, digest in meta["files"].items():
        if sha256_file(path / fname) != digest:
            raise ValueError(f"{path / fname} does not match its sha-256 in model.json")
    fp = fingerprint_file(path / "decoder.onnx", meta["codec"])
    if fp.hex() != meta["fingerprint"]:
        raise ValueError(f"{path}: fingerprint {fp.hex()[:12]} != model.json {meta['fingerprint'][:12]}")
    try:
        codec = Codec.from_json(meta["codec"], fp, int(meta["latent_dim"]))
    except KeyError as exc:  # a bare 'format' told the operator nothing
        raise ValueError(f"{path}/model.json: the codec (or one of its qualities) lacks the field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}/model.json: codec: {exc}") from exc
    return ModelEntry(meta["name"], str(meta["version"]), path, meta, codec, dict(serving or {}))




def _unreadable(folder: Path) -> str | None:
    """Why a served version's folder was not found by a scan, or None when it is gone (removed: withdrawn). A folder
    that is there but cannot be read, or whose model.json is missing, is a version broken in place."""
    for part, what in ((folder.parent, "its model's folder"), (folder, "its folder")):  # each as itself: a link
        try:  # that leads nowhere is there, though what it names is not
            os.lstat(part)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # a parent folder that cannot be read: the version may well be there
            return f"{what} cannot be read ({exc.strerror})"
        if part.is_symlink() and not part.exists():
            return f"{what} is a broken symbolic link"
    try:
        (folder / "model.json").stat()
    except OSError as exc:
        return f"its model.json cannot be read ({exc.strerror})"
    return "its model.json cannot be listed (the folder is not readable)"


def _bare_versions(root: Path, known: set[Path]) -> list[Path]:
    """Numbered folders under a visible model's folder that hold no model.json, other than `known`: a version's
    files copied in without its record, to be refused by name rather than ignored."""
    return sorted(d for d in root.glob("*/*") if d.name.isdigit() and not d.parent.name.startswith(".")
                  and d.is_dir() and d not in known)


class Repository:
    """All verified model versions under one root; the latest version of a name is its highest number."""

    def __init__(self, entries: list[ModelEntry], refused: dict[str, str] | None = None) -> None:
        self._entries = {(e.name, e.version): e for e in entries}
        self.refused = dict(refused or {})  # folder -> why it did not verify when this snapshot was read
        # A snapshot never changes, so its orderings are computed once, not per request.
        self._sorted = sorted(self._entries.values(), key=lambda e: (e.name, int(e.version)))  # check_version: numbers
        self._names = sorted({e.name for e in self._sorted})
        self._by_name: dict[str, list[ModelEntry]] = {}
        self._by_id: dict[int, list[ModelEntry]] = {}
        for e in self._sorted:
            self._by_name.setdefault(e.name, []).append(e)
        # Each name's versions newest first: versions that share a fingerprint (same decoder and tables, e.g. only
        # the encoder retrained) decode a code alike, and the latest of them is the one Compress names.
        for e in sorted(self._sorted, key=lambda e: (e.name, -int(e.version))):
            self._by_id.setdefault(e.fingerprint[0], []).append(e)
        # Versions of different fingerprints may share the 1-byte model id: their codes are told apart by the
        # checksum, and the rare code that passes both (Pipeline.route) by which of them decodes it canonically.
        self.collisions = sorted(
            tuple(f"{e.name}/{e.version}" for e in sorted({e.fingerprint: e for e in group}.values(),
                                                           key=lambda e: (e.name, int(e.version))))
            for group in self._by_id.values() if len({e.fingerprint for e in group}) > 1)

    @classmethod
    def load(cls, root: Path, served: Repository | None = None, reported: dict[str, str] | None = None) -> Repository:
        """Every version under root that verifies. One that does not is refused with a log line (none when
        `reported` holds the same refusal: a poll does not repeat itself); when `served`, the snapshot being
        served, has that version, it stays as it was verified then, so a version broken in place keeps serving
        what was loaded (its sessions verify the files' bytes again if they load later). `refused` says why."""
        entries, refused = [], {}
        # Hidden folders are skipped: a deployment may stage a version as <name>/.<version>.tmp, then rename it.
        metas = sorted(m for m in Path(root).glob("*/*/model.json") if not any(p.startswith(".") for p in m.parts[-3:-1]))
        serving = {d: load_serving(d / "serving.json") for d in {m.parent.parent for m in metas}}  # raises if bad
        for meta in metas:
            try:
                entries.append(load_entry(meta.parent, serving[meta.parent.parent]))
            except Exception as exc:  # noqa: BLE001 - any malformed entry is refused, the others still load
                folder, why = str(meta.parent), str(exc)
                refused[folder] = why
                kept = served._entries.get((meta.parent.parent.name, meta.parent.name)) if served else None
                if kept is not None:
                    entries.append(kept)
                if (reported or {}).get(folder) != why:
                    log.error("refusing model %s: %s%s", folder, why,
                              "; still serving it as verified before" if kept is not None else "")
        found = {m.parent for m in metas}
        served_paths = {e.path for e in served.entries()} if served else set()  # those: as broken in place, below
        for bare in _bare_versions(Path(root), found | served_paths):
            why = ("it has no model.json, which makes a folder a version: `disco export` writes it, last; stage a "
                   "version as <name>/.<version>.tmp and rename it into place")
            refused[str(bare)] = why
            if (reported or {}).get(str(bare)) != why:
                log.error("refusing model %s: %s", bare, why)
        for e in served.entries() if served else []:  # served, but not found by this scan: removed, or unreadable?
            if e.path in found:
                continue
            unread = _unreadable(e.path)
            if unread is None:  # the folder is gone: withdrawn
                continue
            refused[str(e.path)] = unread
            entries.append(e)
            if (reported or {}).get(str(e.path)) != unread:
                log.error("refusing model %s: %s; still serving it as verified before", e.path, unread)
        if not entries:
            raise RepositoryError(f"no loadable model under {root} (expected <name>/<version>/model.json)", refused)
        return cls(entries, refused)

    def entries(self) -> list[ModelEntry]:
        return list(self._sorted)

    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str, version: str = "") -> ModelEntry:
        versions = self._by_name.get(name, [])
        if not versions:
            raise NotFound(f"model {shown(name)} is not in the repository, which has {self.names()}")
        if not version:
            return versions[-1]
        for e in versions:
            if e.version == version:
                return e
        raise NotFound(f"model {shown(name)} has no version {shown(version)}, it has {[e.version for e in versions]}")

    def find(self, name: str, version: str) -> ModelEntry | None:
        return self._entries.get((name, version))

    def by_model_id(self, model_id: int) -> list[ModelEntry]:
        """Candidates for a code's 1-byte model id, by name and each name's newest first; its checksum decides."""
        return self._by_id.get(model_id, [])
