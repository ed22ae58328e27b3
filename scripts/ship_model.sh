#!/usr/bin/env bash
# Ship a finished training run as an embedded model, with its evaluation inside the repository entry.
#   scripts/ship_model.sh RUN_DIR NAME VERSION DATASET [disco export flags...]
# e.g. scripts/ship_model.sh /work/runs/flagship dsprites 2 dsprites
#      scripts/ship_model.sh /work/runs/color color_dsprites 1 color_dsprites --held-out color_dsprites
# Writes service/models/NAME/VERSION/{encoder.onnx,decoder.onnx,model.json,metrics.json,traversal.png,rd.json,rd.png}
# and copies of the evaluation under benchmarks/results/. The full disentanglement_lib protocol takes about
# 11 minutes per model on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:?usage: scripts/ship_model.sh RUN_DIR NAME VERSION DATASET [export flags]}"; NAME="$2"; VERSION="$3"; DATASET="$4"
shift 4
ENTRY="service/models/$NAME/$VERSION"
R="benchmarks/results"
rm -rf "$ENTRY"
disco export "$RUN/ckpt.pt" --repository service/models --name "$NAME" --version "$VERSION" "$@"
disco eval "$ENTRY" --dataset "$DATASET" --out "$R/eval_$NAME" --write-names | tee "$R/eval_$NAME.txt"
disco rd --model "$NAME" --version "$VERSION" --dataset "$DATASET" --n 2000 --json "$R/rd_$NAME.json" | tee "$R/rd_$NAME.txt"
cp "$R/eval_$NAME/metrics.json" "$R/eval_$NAME/traversal.png" "$ENTRY/"
cp "$R/rd_$NAME.json" "$ENTRY/rd.json"
cp "$R/rd_$NAME.png" "$ENTRY/rd.png"
cp "$RUN/loss_curve.png" "$ENTRY/loss_curve.png"
