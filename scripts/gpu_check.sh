#!/usr/bin/env bash
# The GPU paths of vbshare in one run, under 8 minutes on one modern GPU, written to one results folder:
#   1. bench      scripts/bench.py --device cuda: every adapter's training step on MiniLM shapes, and the training
#                 app's engine paths on SmolLM2-135M (fp32, bf16, fp16, activation checkpointing, torch.compile)
#   2. smollm2    a short instruction run of SmolLM2-135M in bf16 on data=files (a tiny JSONL written here)
#   3. qlora      the same run on a 4-bit NF4 base (model.quantization=nf4, QLoRA-style)
#   4. nola       NOLA's ways of holding its bases (cached / drawn again / chunked when present): one step's
#                 peak memory on a stack of 8 × (4096 × 4096) linears
#   5. plan       the planner's estimate (python -m vbshare.plan, when present) against the bf16 run's peak
# Then results.md (tables) and results.json (everything) in the folder, with the GPU named.
#
#   bash scripts/gpu_check.sh [--dry-run] [OUT]       # OUT: default results/gpu_check_<date>
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh OUT     # the same dry run
#
# --dry-run runs every step on the CPU at toy sizes (a tiny Llama instead of SmolLM2 for the runs, 2 × 256-wide
# layers for NOLA, one round of the bench without compile): what the test suite runs to keep this script working.
# A step that fails is recorded (its log in OUT/logs/) and the others still run; the exit status is 1 when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY="${GPU_CHECK_DRY:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-results/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT/logs" "$OUT/runs"
OUT="$(cd "$OUT" && pwd)"
export GPU_CHECK_DRY="$DRY"
: > "$OUT/steps.jsonl"
FAILED=0
PY="${PYTHON:-python}"

# run_step NAME TIMEOUT_S COMMAND...: the command's output in logs/NAME.log; status ok | skipped (exit 3) | failed
run_step() {
  local name="$1" limit="$2"; shift 2
  local start status rc
  start=$(date +%s.%N)
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    3) status=skipped ;;
    124) status="failed (over ${limit}s)"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  local seconds
  seconds=$(echo "$(date +%s.%N) - $start" | bc)
  printf '{"name": "%s", "status": "%s", "seconds": %.1f}\n' "$name" "$status" "$seconds" >> "$OUT/steps.jsonl"
  echo "   $status in ${seconds%.*}s ($(tail -n 1 "$OUT/logs/$name.log" | cut -c1-160))"
}

if [[ "$DRY" == 1 ]]; then
  DEVICE=cpu
  BENCH=(--device cpu --threads 1 --quick --parts adapters,engine --models minilm --batch-sizes 2 --seq-len 16
         --variants floor,lora,vblora --repeats 1 --engine-methods lora --engine-configs fp32,bf16,bf16+ckpt
         --engine-batch 1 --engine-seq-len 16)
  MODEL=(model=tiny_llama)
  TRAIN=(trainer=debug trainer.device=cpu trainer.max_steps=2 trainer.batch_size=4 trainer.eval_every=2
         data.max_length=32 trainer.max_examples=16)
  NOLA=(--device cpu --width 256 --layers 2 --bases 64 --tokens 16)
  PLAN_MODEL="$OUT/tiny_llama_config"
  "$PY" -c "import sys; from vbshare.models import tiny_llama; tiny_llama('lm')[0].config.save_pretrained(sys.argv[1])" \
    "$PLAN_MODEL" > /dev/null 2>&1
  LIMIT=300
else
  DEVICE=cuda
  BENCH=(--device cuda --parts adapters,engine --models minilm --batch-sizes 16 --repeats 10 --warmup 2
         --engine-methods lora,vblora --engine-configs fp32,bf16,fp16,bf16+ckpt,bf16+compile --compile-methods lora
         --engine-batch 8 --engine-seq-len 512)
  MODEL=(model=smollm2_135m)
  TRAIN=(trainer.device=cuda trainer.max_steps=40 trainer.batch_size=8 trainer.eval_every=20 trainer.log_every=5
         trainer.checkpoint_every=null trainer.progress_bar=false data.max_length=256)
  NOLA=(--device cuda --width 4096 --layers 8 --bases 1024 --tokens 512)
  PLAN_MODEL="${VBSHARE_CACHE:-$HOME/.cache/vbshare}/smollm2-135m-fp32"  # converted by the SmolLM2 steps
  LIMIT=240
fi

"$PY" scripts/gpu_check.py write-data "$OUT/chat.jsonl" > /dev/null
DATA=(data=files "data.path=$OUT/chat.jsonl")
LORA=(+adapter=lora)

run_step bench "$LIMIT" "$PY" scripts/bench.py "${BENCH[@]}" --json "$OUT/bench.json"
run_step smollm2_bf16 "$LIMIT" "$PY" -m vbshare.train "${MODEL[@]}" "${LORA[@]}" "${DATA[@]}" "${TRAIN[@]}" \
  trainer.precision=bf16 "hydra.run.dir=$OUT/runs/bf16"
run_step qlora_nf4 "$LIMIT" "$PY" -m vbshare.train "${MODEL[@]}" "${LORA[@]}" "${DATA[@]}" "${TRAIN[@]}" \
  trainer.precision=bf16 model.dtype=bf16 model.quantization=nf4 "hydra.run.dir=$OUT/runs/nf4"
run_step nola_memory "$LIMIT" "$PY" scripts/gpu_check.py nola-memory "${NOLA[@]}" --json "$OUT/nola.json"
run_step plan_vs_measured 120 "$PY" scripts/gpu_check.py plan-vs-measured "$OUT/runs/bf16" --json "$OUT/plan.json" \
  -- model=hf "model.loader.name=$PLAN_MODEL" "${LORA[@]}" "${DATA[@]}" "${TRAIN[@]}" trainer.precision=bf16

"$PY" scripts/gpu_check.py collect "$OUT" > "$OUT/logs/collect.log" 2>&1 || FAILED=1
echo "results: $OUT/results.md"
exit "$FAILED"
