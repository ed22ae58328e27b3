#!/usr/bin/env bash
# Record every serving measurement the README quotes, on the embedded models as they are
# (scripts/ship_model.sh puts a run there and measures the model itself).
#   scripts/measure_default.sh
# Writes benchmarks/results/{roundtrip,folder_roundtrip,bench,bench_stability,bench_gather_0,bench_color_dsprites,bench_workers_4,bench_processes_*,bench_bound*,ab_intra_op_threads,bench_rate,bench_decode_cache,burst*,retry_storm,respread,loop_stall,codec_speed,handler_speed,idle_penalty,onnx_variants,old_versions,train_speed,bench_memory}.*; about 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
mkdir -p "$R"
PORT=50151
disco serve --port $PORT --metrics-port 0 > /dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do disco models --target localhost:$PORT > /dev/null 2>&1 && break; sleep 1; done
python benchmarks/roundtrip.py --target localhost:$PORT --n 256 --json "$R/roundtrip.json"
python benchmarks/folder_roundtrip.py --target localhost:$PORT --n 1000 --json "$R/folder_roundtrip.json"
kill $SERVER; wait $SERVER 2>/dev/null || true
disco bench --duration 5 --warmup 1 --json "$R/bench.json" --csv "$R/bench.csv" | tee "$R/bench.txt"
disco bench --duration 5 --warmup 1 --stability 10 --max-rounds 8 --json "$R/bench_stability.json" | tee "$R/bench_stability.txt"
# The single-image cases with gathering off (each small request runs alone, as before --gather-turns).
disco bench --batch-images 0 --duration 5 --warmup 1 --server-args "--gather-turns 0" \
  --json "$R/bench_gather_0.json" | tee "$R/bench_gather_0.txt"
# The batched cases on the other embedded model (64x64 RGB).
disco bench --single-concurrency "" --duration 5 --warmup 1 --model color_dsprites \
  --json "$R/bench_color_dsprites.json" | tee "$R/bench_color_dsprites.txt"
# The batched cases again with the old default of 4 ONNX Runtime threads (now one per core, 2 here).
disco bench --single-concurrency "" --duration 5 --warmup 1 --server-args "--workers 4" \
  --json "$R/bench_workers_4.json" | tee "$R/bench_workers_4.txt"
# Every case over 4 connections (spread over the processes): one server process against two sharing the port
# (--processes 2), with rounds added until the last three agree.
for P in 1 2; do
  disco bench --duration 5 --warmup 1 --stability 10 --max-rounds 8 --connections 4 --server-args "--processes $P" \
    --json "$R/bench_processes_$P.json" | tee "$R/bench_processes_$P.txt"
done
# The single-image cases again, one process and two, where the bench first printed each case's CPU bound on every
# core (the ceiling column holds the NoOp's busy cores only).
disco bench --batch-images 0 --duration 5 --warmup 1 --stability 10 --max-rounds 8 \
  --json "$R/bench_bound.json" | tee "$R/bench_bound.txt"
disco bench --batch-images 0 --duration 5 --warmup 1 --stability 10 --max-rounds 8 --connections 4 --server-args "--processes 2" \
  --json "$R/bench_bound_processes_2.json" | tee "$R/bench_bound_processes_2.txt"
# Two ONNX Runtime threads per session (no spinning) against one, alternating: single-image Compress at concurrency 32.
{ echo "# scripts/measure_default.sh: single-image Compress at concurrency 32, --intra-op-threads 1 and 2 alternating, 5 pairs"
  for _ in 1 2 3 4 5; do for A in 1 2; do
    echo "intra=$A $(disco bench --batch-images 0 --directions compress --single-concurrency 32 --duration 6 --warmup 1 \
      --server-args "--intra-op-threads $A" | sed -n 2p)"
  done; done; } | tee "$R/ab_intra_op_threads.txt"
# Open loop: latency at a given request rate, up to saturation.
disco bench --batch-images 0 --single-concurrency "" --request-rate 500,1000,2000,4000 --duration 5 --warmup 1 \
  --json "$R/bench_rate.json" | tee "$R/bench_rate.txt"
# The decode cache's hit path (the bench repeats its codes, so all but the first request hit).
disco bench --directions decompress --server-args "--decode-cache-mb 64" --duration 5 --warmup 1 \
  --json "$R/bench_decode_cache.json" | tee "$R/bench_decode_cache.txt"
# Bursts of 3,000 calls: gRPC core's default pending limit against disco serve's.
python benchmarks/burst.py --n 3000 --server-args "--max-pending-rpcs 0" --json "$R/burst_grpc_default.json"
python benchmarks/burst.py --n 3000 --json "$R/burst.json"
python benchmarks/retry_storm.py --json "$R/retry_storm.json"
python benchmarks/respread.py --json "$R/respread.json"
python benchmarks/loop_stall.py --json "$R/loop_stall.json"
python benchmarks/codec_speed.py --json "$R/codec_speed.json"
python benchmarks/handler_speed.py --json "$R/handler_speed.json"
python benchmarks/idle_penalty.py --json "$R/idle_penalty.json"
python benchmarks/onnx_variants.py --json "$R/onnx_variants.json"
python benchmarks/old_versions.py --json "$R/old_versions.json" | tee "$R/old_versions.txt"
python benchmarks/train_speed.py --steps 60 --json "$R/train_speed.json" | tee "$R/train_speed.txt"
disco bench --directions compress --batch-images 0 --single-concurrency 8 --duration 2 --memory-s 300 --json "$R/bench_memory.json" | tee "$R/bench_memory.txt"
