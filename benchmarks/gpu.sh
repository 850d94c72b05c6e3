#!/usr/bin/env bash
# The whole CUDA benchmark in one go (about 6 minutes on one H100), for a borrowed GPU machine.
#
#   OUT=/some/dir bash benchmarks/gpu.sh                  # CUDA (default OUT: benchmarks/out/gpu)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh --device cpu --quick   # the same logic on a CPU, small shapes
#   BUDGET=420 ...                                         # seconds for all parts together (default 420)
#   PYTHON=.venv/bin/python ...                            # the interpreter (default: python on PATH)
#
# Needs torch + CUDA, lightning, transformers, safetensors, tokenizers, hydra-core and omegaconf, with the
# repository on PYTHONPATH (this script adds it). Parts, in order of importance, each under its own time
# limit (cut to what is left of BUDGET; a part with under 15 s left is skipped) so one failure or hang never
# stops the rest:
#   train_step     GPT-2 124M, batch 16 x 1024, bf16 autocast, fused AdamW: composed / hand-written /
#                  transformers / composed_unfused / composed_pad64 eager, composed + hand-written compiled
#   decode         GPT-2 124M bf16, batch 1 and 8, 128 new tokens: eager vs transformers' generate, and
#                  the static-cache compiled step (CUDA graphs)
#   checkpointing  checkpointing modes x (32-true, bf16-mixed): peak memory vs composer.plan, tokens/s
#   lightning      LitComposer in a Lightning Trainer vs a bare loop; host reads / CUDA syncs per step
#   train_precisions  python -m composer.train -m trainer=gpu trainer.precision=bf16-mixed,16-mixed,bf16-true
#   train_fsdp     python -m composer.train -m trainer=fsdp (activation checkpointing off and on), 20 steps
#   flex           sliding-window attention: FlexAttention block mask vs SDPA + mask (same loss and
#                  gradients; speed), and the model compiled with fullgraph=True
#   build          compose(device="meta") per preset; from_pretrained vs safetensors load_file
#   gqa            grouped-query attention: enable_gqa vs K/V repeated vs query heads folded, bf16 and
#                  float32; does components.attention's rule pick the fastest path on this GPU?
# Benchmarks save their JSON after each stage, so a part cut by its limit still reports what it measured.
# Everything lands in $OUT/gpu_results.json (one entry per part) and $OUT/log.txt (the full output); each
# part also prints a one-line JSON summary. Record the rows in benchmarks/RESULTS.md afterwards with
#   python -m benchmarks.collect record $OUT/gpu_results.json
set -u

DEVICE=cuda
QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    *) echo "unknown argument: $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-$REPO/benchmarks/out/gpu}"
mkdir -p "$OUT"
PARTS="$(mktemp -d)"
RESULT="$OUT/gpu_results.json"
LOG="$OUT/log.txt"
BUDGET="${BUDGET:-420}"
PYTHON="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" BENCH_OUT="$PARTS" \
       BENCH_RESULTS="$PARTS/RESULTS.md" HYDRA_FULL_ERROR=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
: > "$LOG"
rm -f "$RESULT"
SUMMARIES=()

say() { echo "[$(date +%H:%M:%S)] gpu.sh: $*" | tee -a "$LOG"; }

# part NAME LIMIT_SECONDS COMMAND...: run under a time limit, log everything, collect the results
part() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 15 ]; then
    say "skip $name (budget spent)"
    SUMMARIES+=("{\"part\": \"$name\", \"skipped\": \"budget spent\"}")
    return
  fi
  say "start $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered -E '^\[[0-9:]{8}\]|Error|error:'
  local rc=${PIPESTATUS[0]}
  local line
  line=$("$PYTHON" -m benchmarks.collect part "$name" "$rc" "$(( $(date +%s) - t0 ))" "$PARTS" "$RESULT" 2>>"$LOG")
  echo "$line" | tee -a "$LOG"
  SUMMARIES+=("$line")
  say "end $name: rc=$rc after $(( $(date +%s) - t0 ))s"
}

say "device $DEVICE ${QUICK[*]:-} budget ${BUDGET}s, parts in $PARTS"
if ! "$PYTHON" -c "import torch, lightning, transformers, hydra" 2>>"$LOG"; then
  say "$PYTHON lacks torch, lightning, transformers or hydra-core (see $LOG); set PYTHON=/path/to/python"
  exit 2
fi
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, sys
print(f"torch {torch.__version__}, python {sys.version.split()[0]}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
EOF

if [ "$DEVICE" = cuda ]; then
  TRAIN_STEP=(--contenders composed,handwritten,transformers,composed_unfused,composed_pad64 --compiled composed,handwritten)
  DECODE=(--no-hf-compile)
  TRAINER=gpu; PRECISIONS=bf16-mixed,16-mixed,bf16-true
else
  TRAIN_STEP=(--contenders composed,handwritten,transformers,composed_unfused,composed_pad64 --compiled composed,handwritten)
  DECODE=(--no-hf-compile)
  TRAINER=cpu; PRECISIONS=bf16-true  # float16 AMP needs CUDA; one run checks the logic
fi
BENCH=(--device "$DEVICE" --no-record "${QUICK[@]}")
# the training smoke runs: the default tiny model on the recall task, 20 steps
SMOKE=(trainer.max_steps=20 trainer.val_check_interval=10 trainer.log_every_n_steps=5 callbacks.progress_bar=none
       callbacks.summary=false data.num_val_examples=128)

part train_step 170 "$PYTHON" -m benchmarks.bench_train_step "${BENCH[@]}" "${TRAIN_STEP[@]}"
part decode 120 "$PYTHON" -m benchmarks.bench_decode "${BENCH[@]}" "${DECODE[@]}"
part checkpointing 70 "$PYTHON" -m benchmarks.bench_checkpointing "${BENCH[@]}"
part lightning 50 "$PYTHON" -m benchmarks.bench_lightning "${BENCH[@]}"
part train_precisions 60 "$PYTHON" -m composer.train -m "trainer=$TRAINER" "trainer.precision=$PRECISIONS" \
  "${SMOKE[@]}" "hydra.sweep.dir=$PARTS/runs/train_precisions"
if [ "$DEVICE" = cuda ]; then
  part train_fsdp 50 "$PYTHON" -m composer.train -m trainer=fsdp \
    trainer.strategy_options.activation_checkpointing=false,true "${SMOKE[@]}" "hydra.sweep.dir=$PARTS/runs/train_fsdp"
else
  say "skip train_fsdp (FSDP needs CUDA)"
  SUMMARIES+=('{"part": "train_fsdp", "skipped": "needs CUDA"}')
fi
part flex 45 "$PYTHON" -m benchmarks.bench_flex "${BENCH[@]}"
part build 30 "$PYTHON" -m benchmarks.bench_build "${BENCH[@]}"
part gqa 40 "$PYTHON" -m benchmarks.bench_gqa "${BENCH[@]}"

say "all parts done in $(( $(date +%s) - START ))s; results in $RESULT, log in $LOG"
echo "=== one line per part ==="
for s in "${SUMMARIES[@]}"; do echo "$s"; done
rm -rf "$PARTS"
