"""ONNX Runtime sessions for one model version: encoder (image -> mu, logvar) and decoder (z -> probs).

With I/O binding (on by default where CUDA runs the session), inputs are bound from host memory and outputs
are allocated by ONNX Runtime on the session's device, then copied back once: no per-output staging by the
Python binding. On CPU the same path runs (and is tested) with host buffers throughout.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


log = logging.getLogger(__name__)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 1  # per session; several batches run concurrently on their own threads
    inter_op_threads: int = 1  # above 1, independent nodes run at once (ORT_PARALLEL)
    providers: tuple[str, ...] = ("cpu",)  # in order of preference; unavailable ones fall back with a log line
    graph_optimization: str = "all"
    io_binding: str = "auto"  # "auto" (on where CUDA runs the session), "on" or "off"


def session(path: Path | bytes, opts: RuntimeOptions = RuntimeOptions()) -> ort.InferenceSession:
    """A session of an ONNX file, or of its bytes."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    if opts.inter_op_threads > 1:  # ONNX Runtime uses inter-op threads only in parallel execution mode
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    # Spinning threads starve the gRPC threads on small machines: neither pool spins (the inter-op one runs only
    # with --inter-op-threads above 1, and spun there too while only the intra-op entry was set).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = LEVELS[opts.graph_optimization]
    available = set(ort.get_available_providers())
    wanted = [PROVIDERS[p] for p in opts.providers]
    providers = [p for p in wanted if p in available]
    if providers != wanted:
        log.warning("execution providers %s are not available here (have %s); using %s",
                    [p for p in wanted if p not in available], sorted(available), providers or ["CPUExecutionProvider"])
    s = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=so,
                             providers=providers or ["CPUExecutionProvider"])
    if providers and s.get_providers()[0] != providers[0]:  # e.g. CUDA present but failing: ORT falls back quietly
        log.warning("ONNX Runtime runs this session on %s, not the %s asked for first", s.get_providers(), providers[0])
    return s


def verified_bytes(path: Path, sha256: str) -> bytes:
    """The file's bytes, checked against the digest it was verified with: a session built from them runs what
    was verified, even if the file changed on disk since (a version loaded long after its repository was read)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} changed on disk since it was verified (its sha-256 no longer matches model.json); "
                         "not loading it")
    return data


class OnnxModel:
    def __init__(self, folder: Path, opts: RuntimeOptions = RuntimeOptions(), sha256: dict[str, str] | None = None) -> None:
        """Sessions of folder's encoder.onnx and decoder.onnx; with `sha256` (model.json's "files"), built from
        bytes that match it."""
        if opts.io_binding not in ("auto", "on", "off"):
            raise ValueError(f"io_binding {opts.io_binding!r}: expected auto, on or off")

        def load(name: str) -> Path | bytes:
            return folder / name if sha256 is None else verified_bytes(folder / name, sha256[name])

        self.encoder = session(load("encoder.onnx"), opts)
        self.decoder = session(load("decoder.onnx"), opts)
        on_cuda = self.providers[0] == PROVIDERS["cuda"]
        # Where the first provider asked for is not the one that runs (CUDA missing or failing): counted by the
        # pipeline (disco_provider_fallbacks), beside the log line, so that an alert can find a GPU pod on its CPU
        self.fell_back = bool(opts.providers) and self.providers[0] != PROVIDERS[opts.providers[0]]
        self.io_binding = opts.io_binding == "on" or (opts.io_binding == "auto" and on_cuda)
        self._device = "cuda" if on_cuda else "cpu"

    def _run(self, session: ort.InferenceSession, outputs: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.io_binding:
            return list(session.run(outputs, inputs))
        binding = session.io_binding()  # one per call: concurrent runs on a session must not share one
        for name, value in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, self._device)
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 (N, C, H, W) in [0, 1] -> mu, logvar (N, z)."""
        mu, logvar = self._run(self.encoder, ["mu", "logvar"], {"image": x})
        return mu, logvar

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z float32 (N, z) -> pixel probabilities float32 (N, C, H, W)."""
        (probs,) = self._run(self.decoder, ["probs"], {"z": z})
        return probs

    @property
    def providers(self) -> list[str]:
        return list(self.encoder.get_providers())


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps what freed sessions held, so an unloaded version's
    memory would otherwise stay resident (benchmarks/old_versions.py). A no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
