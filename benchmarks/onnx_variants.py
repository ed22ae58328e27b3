"""Can the default model run cheaper in ONNX Runtime? Equivalent and quantized graphs, timed side by side.

    python benchmarks/onnx_variants.py --json benchmarks/results/onnx_variants.json

Needs the [train] extra (onnx). Per image, one intra-op thread, spinning off (the server's settings), best of 5:
- decoder as exported (ConvTranspose 4x4, stride 2, pad 1);
- the same decoder with each ConvTranspose rewritten exactly: as a 3x3 convolution to 4x the channels followed by
  DepthToSpace (sub-pixel convolution, Shi et al. 2016), and as four 2x2 convolutions, one per output phase, then
  Concat and DepthToSpace. Output phase r of a stride-2 transposed convolution with kernel 4 and padding 1 takes
  kernel taps (3, 1) for r = 0 and (2, 0) for r = 1 along each axis;
- encoder and decoder quantized to int8 by onnxruntime.quantization (static, QDQ, per channel; calibrated on 512
  dSprites images and their latent means). Quantization changes the outputs: the table gives how much.
And where the exported graphs spend their time: ONNX Runtime's own profile of 50 runs at batch 16
(`{encoder,decoder}_op_share`: each node's share of the summed kernel time).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from disco.client.bench import sprites
from disco.service.repository import EMBEDDED, Repository
from disco.service.runtime import session  # the server's settings

PHASE_TAPS = {0: (3, 1), 1: (2, 0)}  # output phase -> transposed-conv taps for input offsets (-1, 0) or (0, +1)
PHASE_PADS = {0: (1, 0), 1: (0, 1)}


def rewrite(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """Every ConvTranspose(k=4, s=2, p=1) as an exactly equal sub-pixel ("subpixel") or per-phase ("phases") graph."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    nodes, extra = [], []
    for n in m.graph.node:
        if n.op_type != "ConvTranspose":
            nodes.append(n)
            continue
        w, b = weights[n.input[1]], weights[n.input[2]]  # (Cin, Cout, 4, 4), (Cout,)
        cout, name = w.shape[1], n.output[0]
        if how == "subpixel":
            k = np.zeros((2, 2, cout, w.shape[0], 3, 3), np.float32)
            for ry in (0, 1):
                for rx in (0, 1):
                    for ty, ky in zip((0, 1) if ry == 0 else (1, 2), PHASE_TAPS[ry]):
                        for tx, kx in zip((0, 1) if rx == 0 else (1, 2), PHASE_TAPS[rx]):
                            k[ry, rx, :, :, ty, tx] = w[:, :, ky, kx].T
            extra += [numpy_helper.from_array(k.reshape(4 * cout, -1, 3, 3), f"{name}_w"),
                      numpy_helper.from_array(np.tile(b, 4), f"{name}_b")]
            nodes.append(helper.make_node("Conv", [n.input[0], f"{name}_w", f"{name}_b"], [f"{name}_s"],
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        else:
            outs = []
            for ry in (0, 1):
                for rx in (0, 1):
                    k = np.stack([np.stack([w[:, :, ky, kx].T for kx in PHASE_TAPS[rx]], -1) for ky in PHASE_TAPS[ry]], -2)
                    tag = f"{name}_{ry}{rx}"
                    extra += [numpy_helper.from_array(np.ascontiguousarray(k), f"{tag}_w"),
                              numpy_helper.from_array(b, f"{tag}_b")]
                    (py0, py1), (px0, px1) = PHASE_PADS[ry], PHASE_PADS[rx]
                    nodes.append(helper.make_node("Conv", [n.input[0], f"{tag}_w", f"{tag}_b"], [tag],
                                                  kernel_shape=[2, 2], pads=[py0, px0, py1, px1]))
                    outs.append(tag)
            nodes.append(helper.make_node("Concat", outs, [f"{name}_s"], axis=1))
        nodes.append(helper.make_node("DepthToSpace", [f"{name}_s"], [name], blocksize=2, mode="DCR"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in list(m.graph.initializer) + extra if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    onnx.checker.check_model(m)
    return m


def us_per_image(f: Callable[[], object], batch: int) -> float:
    for _ in range(20):
        f()
    n, best = max(5, 1000 // batch), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n / batch)
    return round(best * 1e6, 1)


def op_share(path: Path, name: str, data: np.ndarray, runs: int = 50) -> dict[str, float]:
    """Each node's share of the summed kernel time over `runs` runs, from ONNX Runtime's profiler (its JSON trace)."""
    so = ort.SessionOptions()  # the server's settings (service/runtime.py session()), with the profiler on
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir(), "onnx_variants_profile"))
    s = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {name: data})
    trace = Path(s.end_profiling())
    kernel = Counter[str]()
    for ev in json.loads(trace.read_text()):
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            kernel[f"{ev['args']['op_name']} {ev['name'].removesuffix('_kernel_time')}"] += ev["dur"]
    os.unlink(trace)
    total = sum(kernel.values())
    return {k: round(v / total, 3) for k, v in kernel.most_common(6)}


class _Feed(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._it = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    e = Repository.load(EMBEDDED).get("dsprites")
    x = (sprites(512, seed=3).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    enc = session(e.path / "encoder.onnx")
    mu = enc.run(["mu"], {"image": x})[0]
    rows: dict[str, object] = {"model": f"{e.name}/{e.version}"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"decoder": e.path / "decoder.onnx", "encoder": e.path / "encoder.onnx"}
        for how in ("subpixel", "phases"):
            paths[f"decoder_{how}"] = Path(tmp, f"decoder_{how}.onnx")
            onnx.save(rewrite(onnx.load(paths["decoder"]), how), paths[f"decoder_{how}"])
        for part, name, data in (("encoder", "image", x), ("decoder", "z", mu)):
            paths[f"{part}_int8"] = Path(tmp, f"{part}_int8.onnx")
            quantize_static(str(paths[part]), str(paths[f"{part}_int8"]),
                            _Feed(name, [data[i:i + 16] for i in range(0, len(data), 16)]),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True)
        sessions = {k: session(v) for k, v in paths.items()}
        ref = {"encoder": enc.run(["mu"], {"image": x[:64]})[0], "decoder": sessions["decoder"].run(None, {"z": mu[:64]})[0]}
        for key, s in sessions.items():
            part = key.split("_")[0]
            name, data = ("image", x) if part == "encoder" else ("z", mu)
            out = s.run(None, {name: data[:64]})[0]
            row = {f"batch_{b}_us_per_image": us_per_image(lambda b=b, s=s, name=name, data=data: s.run(None, {name: data[:b]}), b)
                   for b in (1, 64)}
            row["max_abs_diff"] = float(np.abs(out - ref[part]).max())
            if part == "decoder":
                row["pixels_flipped_at_0.5"] = float(((out > 0.5) != (ref[part] > 0.5)).mean())
            rows[key] = row
            print(key, row)
        for part, name, data in (("encoder", "image", x[:16]), ("decoder", "z", mu[:16])):
            rows[f"{part}_op_share"] = op_share(paths[part], name, data)
            print(f"{part}_op_share", rows[f"{part}_op_share"])
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
