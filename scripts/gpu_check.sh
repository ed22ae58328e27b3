#!/usr/bin/env bash
# The checks owed to a GPU, as one command for the device machine (one H100/H200, no network; its python3 holds
# torch with CUDA, onnxruntime, grpcio, numpy, pillow, tqdm, matplotlib, scikit-learn). About 6 minutes.
#   scripts/gpu_check.sh OUT_DIR [STEPS]
# 1. what the machine offers: GPU, torch/CUDA, ONNX Runtime's execution providers;
# 2. disco train on the GPU (the flagship's objective, beta-TCVAE beta 10), timed, with a checkpoint;
# 3. the same under torchrun (one rank: DistributedDataParallel over nccl), 300 steps;
# 4. where ONNX Runtime has the CUDA provider: codes and pixels against the CPU provider, and speed (else it says so).
# Everything it prints is also in OUT_DIR/gpu_check.log. On a machine without a GPU it runs the same steps on the
# CPU (that is how it was tried before it met a GPU).
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [STEPS]}"; STEPS="${2:-3000}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The package itself, without fetching anything (its dependencies are those already installed there).
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY - <<'PY'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, "providers", ort.get_available_providers())
PY
t0=$(date +%s)
$PY -m disco.export.train --dataset dsprites --objective betatcvae --beta 10 --steps "$STEPS" --threads 4 --log-every 500 \
  --ckpt-every 1000 --out "$OUT/train" 2>&1 | tr '\r' '\n' | grep -v "it/s," | tail -5
echo "train: $STEPS steps in $(( $(date +%s) - t0 )) s wall (start-up included)"
tail -1 "$OUT/train/log.jsonl"
t0=$(date +%s)
$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m disco.export.train --dataset dsprites \
  --objective betatcvae --beta 10 --steps 300 --threads 4 --out "$OUT/ddp" 2>&1 | tr '\r' '\n' | grep -v "it/s," | tail -5
echo "torchrun (1 rank): 300 steps in $(( $(date +%s) - t0 )) s wall; $(tail -1 "$OUT/ddp/log.jsonl" | cut -c1-80)"
# 4. Serving on the GPU: the embedded default model with the CUDA provider (and I/O binding, on by default there)
#    against the CPU provider: the same codes, nearly the same pixels, and batch-64 speed of each.
$PY - <<'PY'
import time
import numpy as np
import onnxruntime as ort
from disco.client.bench import sprites
from disco.service import images
from disco.service.repository import EMBEDDED, Repository
from disco.service.runtime import OnnxModel, RuntimeOptions

if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("ONNX Runtime here has no CUDA provider: the serving checks need onnxruntime-gpu (not in this image)")
    raise SystemExit(0)
e = Repository.load(EMBEDDED).get("dsprites")
x8 = sprites(64)
x = images.from_raw(x8.tobytes(), x8.shape, "uint8", e.input_shape)
cpu, gpu = OnnxModel(e.path), OnnxModel(e.path, RuntimeOptions(providers=("cuda", "cpu")))
print("gpu session:", gpu.providers, "io_binding", gpu.io_binding)
mu_c, mu_g = cpu.encode(x)[0], gpu.encode(x)[0]
same = np.mean([a == b for a, b in zip(e.codec.encode(mu_c), e.codec.encode(mu_g))])
z = e.codec.decode(e.codec.encode(mu_c), verified=True)
print(f"codes equal for {100 * same:.1f}% of 64 images; max |mu| diff {np.abs(mu_c - mu_g).max():.2e}; "
      f"max pixel-probability diff {np.abs(cpu.decode(z) - gpu.decode(z)).max():.2e}")
for name, m in (("cpu", cpu), ("cuda", gpu)):
    for what, f in (("encode", lambda: m.encode(x)), ("decode", lambda: m.decode(z))):
        f(); t0 = time.perf_counter(); n = 0
        while time.perf_counter() - t0 < 2:
            f(); n += 64
        print(f"{name} {what} batch 64: {n / (time.perf_counter() - t0):.0f} images/s")
PY
