#!/usr/bin/env bash
# Experiment 3 on one CUDA GPU (not run from this CPU-only workspace): tokens/s and the CUDA
# allocator's peak (metrics.json peak_gpu_mb) for precision x gradient checkpointing, then the
# report. A few minutes on one H100; writes into $OUT (or multirun/) and prints the table.
#   bash experiments/memory_speed_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-multirun}/memory_speed_gpu"
composer-train -m experiment=memory_speed trainer=gpu \
    trainer.precision=32-true,bf16-mixed model.gradient_checkpointing=none,every_layer,every_2 \
    data.batch_size=64 trainer.max_steps=100 trainer.val_check_interval=100 "hydra.sweep.dir=$out"
composer-report "$out" --metric tokens_per_s
for prec in 32-true bf16-mixed; do
  for mode in none every_layer every_2; do
    echo "== composer-plan $prec $mode"
    composer-plan --config-dir experiments experiment=memory_speed model.vocab_size=64 batch_size=64 seq_len=256 \
        "precision=$prec" "checkpointing=$mode" | grep -E "activations \(this|training total"
  done
done
