#!/usr/bin/env bash
# Export a finished run as the embedded default model and record every measurement the README quotes.
#   scripts/measure_default.sh RUN_DIR
# Writes service/models/dsprites/1 and benchmarks/results/*. Takes about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:?usage: scripts/measure_default.sh RUN_DIR}"
R=benchmarks/results
mkdir -p "$R"
disco export "$RUN/ckpt.pt" --repository service/models --name dsprites --version 1
disco eval service/models/dsprites/1 --dataset dsprites --out "$R/eval_dsprites" --write-names | tee "$R/eval_dsprites.txt"
disco rd --model dsprites --n 2000 --json "$R/rd_dsprites.json" | tee "$R/rd_dsprites.txt"
PORT=50151
disco serve --port $PORT --metrics-port 0 > /dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do disco models --target localhost:$PORT > /dev/null 2>&1 && break; sleep 1; done
python benchmarks/roundtrip.py --target localhost:$PORT --n 256 --json "$R/roundtrip.json"
python benchmarks/folder_roundtrip.py --target localhost:$PORT --n 1000 --json "$R/folder_roundtrip.json"
kill $SERVER; wait $SERVER 2>/dev/null || true
disco bench --duration 5 --warmup 1 --json "$R/bench.json" --csv "$R/bench.csv" | tee "$R/bench.txt"
python benchmarks/train_speed.py --steps 60 --json "$R/train_speed.json" | tee "$R/train_speed.txt"
disco bench --directions compress --batch-images 0 --single-concurrency 8 --duration 2 --memory-s 300 --json "$R/bench_memory.json" | tee "$R/bench_memory.txt"
