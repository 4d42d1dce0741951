#!/usr/bin/env bash
# Issue 10's results in one device call, from the repo root (one H200: ~8-9 min):
#   bash benchmarks/run_quality.sh
# 1. the README's `tether train` on its defaults, alone on the GPU (the headline run);
# 2. the softmax and TTT-MLP baselines through the same script and defaults, side by side;
# 3. `tether eval --context 256,1024,4096 --reset-every 256` on the three best/ checkpoints.
# The corpus: $TETHER_DATA (default .data/tinyshakespeare.txt, carried with the call). $EXTRA: flags added to
# every `tether train` (a CPU smoke: EXTRA="--device cpu --max-iters 4 ..."); $EVAL_EXTRA: to `tether eval`.
# $OUT (default runs/quality) receives at most 8 files: the table, the eval JSON and plot, and one archive of the
# runs' logs, metrics, samples and summaries (no weights).
set -euo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
export TETHER_DATA=${TETHER_DATA:-.data/tinyshakespeare.txt}
OUT=${OUT:-runs/quality}
RUNS=${RUNS:-/tmp/tether_quality}
EXTRA=${EXTRA:-}
EVAL_EXTRA=${EVAL_EXTRA:-}
mkdir -p "$OUT" "$RUNS"
train() {  # name, flags...
  local name=$1; shift
  # shellcheck disable=SC2086  # EXTRA holds several flags
  python3 -m tether.train --out "$RUNS/$name" --force "$@" $EXTRA > "$RUNS/$name.log" 2>&1
}
train spiking
train softmax --mixer softmax & softmax=$!
train ttt-mlp --mixer ttt-mlp & ttt=$!
wait "$softmax" "$ttt"
# shellcheck disable=SC2086
python3 -m tether.evaluate --checkpoint "$RUNS/spiking/best" --checkpoint "$RUNS/softmax/best" \
  --checkpoint "$RUNS/ttt-mlp/best" --context 256,1024,4096 --reset-every 256 --json "$OUT/long_context.json" \
  --plot "$OUT/long_context.png" $EVAL_EXTRA > "$RUNS/eval.log" 2>&1
python3 - "$RUNS" > "$OUT/quality.md" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print("| mixer | params | best val loss | at step | final val loss | steps | tokens/s (run mean) | train wall s |")
print("|---|---|---|---|---|---|---|---|")
for name in ("spiking", "softmax", "ttt-mlp"):
    s = json.loads((runs / name / "summary.json").read_text())
    print(f"| {name} | {s['params'] / 1e6:.2f}M | {s['best_val_loss']:.4f} | {s['best_val_step']} | {s['val_loss']:.4f} "
          f"| {s['steps']} | {s['tokens_per_s']:.4g} | {s['train_time_s']:.1f} |")
EOF
cat "$RUNS/eval.log" >> "$OUT/quality.md"
tar -czf "$OUT/quality_runs.tar.gz" -C "$RUNS" --exclude='*.safetensors' --exclude='state.pt' .
cat "$OUT/quality.md"
