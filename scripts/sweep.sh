#!/usr/bin/env bash
# The flagship sweep (issue "Flagship models"): short dSprites runs, each trained, exported, evaluated and rate-measured.
#   scripts/sweep.sh SWEEP_DIR STEPS NAME:"train flags" [NAME:"train flags" ...]
# Each run: disco train (one thread, --resume so a re-invocation continues), disco export into SWEEP_DIR/repo,
# disco eval at 1/4 of disentanglement_lib's sample sizes, disco rd on 500 held-out images.
# Runs listed are processed in order; start two invocations side by side to use both cores.
# Summarise with: python benchmarks/sweep_table.py SWEEP_DIR
set -euo pipefail
DIR="${1:?usage: scripts/sweep.sh SWEEP_DIR STEPS NAME:FLAGS ...}"; STEPS="$2"; shift 2
mkdir -p "$DIR/repo"
for spec in "$@"; do
  name="${spec%%:*}"; flags="${spec#*:}"
  run="$DIR/$name"
  # shellcheck disable=SC2086
  disco train --dataset dsprites $flags --steps "$STEPS" --threads 1 --out "$run" --resume > "$run.train.log" 2>&1
  rm -rf "$DIR/repo/$name"
  disco export "$run/ckpt.pt" --repository "$DIR/repo" --name "$name" --version 1 > "$run.export.log" 2>&1
  OMP_NUM_THREADS=1 disco eval "$DIR/repo/$name/1" --dataset dsprites --scale 0.25 --out "$run/eval" > "$run.eval.log" 2>&1
  disco rd --repository "$DIR/repo" --model "$name" --n 500 --json "$run/rd.json" > "$run.rd.log" 2>&1
  echo "$name done $(date +%T)"
done
