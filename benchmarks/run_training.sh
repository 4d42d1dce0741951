#!/usr/bin/env bash
# The GPU training runs behind benchmarks/results/train_*, one device call each, from the repo root:
#   bash benchmarks/run_training.sh spiking|softmax   # full run, 8.5 min budget (one H100, ~9.5 min call)
#   bash benchmarks/run_training.sh ddp STEPS BATCH   # 1 GPU then 2 GPUs (torchrun), same global batch
# The corpus travels with the call at runs/data/tinyshakespeare.txt (or set TETHER_DATA).
# Results land in $OUT (default runs/): the run directories, minus weights, are what gets committed.
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export TETHER_DATA=${TETHER_DATA:-runs/data/tinyshakespeare.txt}
OUT=${OUT:-runs}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "$1" in
  spiking|softmax)
    python3 -m tether.train --mixer "$1" --time-budget 8.5 --out "$OUT/train_$1" 2>&1 | tee "$OUT/train_$1.log"
    ;;
  ddp)
    # Fixed step count and no dropout: the two runs take the same steps on the same global batches,
    # so their loss curves must agree step for step. The time budget is set far away so that the lr
    # schedule follows the steps alone (the device call's own limit stops a runaway).
    args=(--max-iters "$2" --batch-size "$3" --time-budget 20 --dropout 0 --eval-interval 100000 --sample-tokens 100)
    python3 -m tether.train "${args[@]}" --out "$OUT/ddp_1gpu" 2>&1 | tee "$OUT/ddp_1gpu.log"
    torchrun --standalone --nproc_per_node=2 -m tether.train "${args[@]}" --out "$OUT/ddp_2gpu" 2>&1 \
      | tee "$OUT/ddp_2gpu.log"
    ;;
  *) echo "usage: $0 spiking|softmax|ddp STEPS BATCH" >&2; exit 2 ;;
esac
rm -f "$OUT"/*/checkpoint/model.safetensors "$OUT"/*/checkpoint/state.pt  # weights and optimizer state stay off the results
