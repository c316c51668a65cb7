#!/usr/bin/env bash
# Runs diffusers' real SDXL LoRA training script, unmodified, on a model folder and the shapes dataset, with
# the settings `lora`'s SDXL pipelines use, then diffusers' denoising loss of the LoRA it wrote (base vs LoRA).
#
# Usage (from the repository root):
#   bash tools/reference/train_sdxl_reference.sh MODEL OUT_DIR [--train_text_encoder] [more script flags]
# e.g.
#   bash tools/reference/train_sdxl_reference.sh /work/sdxl-eval/model /work/sdxl-eval/ref-out
#   bash tools/reference/train_sdxl_reference.sh /work/sdxl-eval/model /work/sdxl-eval/ref-out-te --train_text_encoder
#
# The command it runs (printed before it runs), from the repository root:
#   python $TRAIN_SCRIPT --pretrained_model_name_or_path MODEL \
#     --dataset_name tests/fixtures/datasets/shapes-parquet --resolution 64 --center_crop \
#     --train_batch_size 4 --max_train_steps 60 --learning_rate 1e-3 --seed 0 --rank 4 --output_dir OUT_DIR [...]
# Everything else is the script's default: no --random_flip, lanczos resize, constant lr (no warm-up),
# AdamW 0.9/0.999/1e-2/1e-8, max_grad_norm 1.0, mixed_precision no (f32), no snr_gamma, epsilon/v from the
# model's scheduler config, no validation, checkpointing every 500 steps (so none in 60).
#
# TRAIN_SCRIPT is examples/text_to_image/train_text_to_image_lora_sdxl.py from upstream diffusers (HEAD 58eb52c,
# check_min_version("0.40.0.dev0")), copied byte for byte outside the repository (third-party code is never
# committed):
#   git --git-dir=/work/.mirror/huggingface+diffusers/repo show \
#     HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py > /work/refsrc/train_text_to_image_lora_sdxl.py
#
# --train_text_encoder and the reference stack: the script calls transformers' `text_encoder.add_adapter(...)`,
# which in transformers 5.24 first checks peft >= 0.22.0 and raises "The version of PEFT you are using is not
# compatible" with peft 0.21.2 (the newest on PyPI when this was written). add_adapter itself is only
# peft.inject_adapter_in_model + set_adapter, both present in 0.21.2. With --train_text_encoder this wrapper
# therefore lowers transformers' MIN_PEFT_VERSION constant in memory to the installed peft version and runs the
# unmodified script with runpy (set PEFT_SHIM=0 to run it plainly and see the error). Without the flag the
# script runs plainly.
#
# Environment: REFENV (/work/refenv), TRAIN_SCRIPT (/work/refsrc/train_text_to_image_lora_sdxl.py), THREADS (1),
# DATA (tests/fixtures/datasets/shapes-parquet), STEPS (60: --max_train_steps), EVAL (1: run denoise_loss.py
# afterwards; 0: skip).
# Prints the load average before and after, the wall time and peak RSS (/usr/bin/time), the progress bar's last
# line, and denoise_loss.py's JSON line. Logs go to OUT_DIR.log and OUT_DIR.denoise.json.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,11p "$0"; exit 2; }
MODEL=$1; OUT=${2%/}; shift 2
REFENV=${REFENV:-/work/refenv}
PY="$REFENV/bin/python"
TRAIN_SCRIPT=${TRAIN_SCRIPT:-/work/refsrc/train_text_to_image_lora_sdxl.py}
THREADS=${THREADS:-1}
DATA=${DATA:-tests/fixtures/datasets/shapes-parquet}
EVAL=${EVAL:-1}
STEPS=${STEPS:-60}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -f "$TRAIN_SCRIPT" ] || { echo "error: $TRAIN_SCRIPT not found (see the comment at the top of $0)"; exit 1; }

args=(--pretrained_model_name_or_path "$MODEL" --dataset_name "$DATA" --resolution 64 --center_crop
      --train_batch_size 4 --max_train_steps "$STEPS" --learning_rate 1e-3 --seed 0 --rank 4 --output_dir "$OUT" "$@")
launch=("$PY" "$TRAIN_SCRIPT")
if [[ " $* " == *" --train_text_encoder "* && "${PEFT_SHIM:-1}" == 1 ]]; then
  launch=("$PY" -c 'import sys, runpy, peft, transformers.integrations.peft as tp
tp.MIN_PEFT_VERSION = peft.__version__  # add_adapter = inject_adapter_in_model + set_adapter, in peft 0.21.2 too
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' "$TRAIN_SCRIPT")
  echo "note: --train_text_encoder: running the unmodified script with transformers' MIN_PEFT_VERSION lowered to the installed peft"
fi

if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  # Only ever delete a previous output of the script (it always writes logs/).
  [ -d "$OUT/logs" ] || { echo "error: $OUT exists and is not a previous training output; not deleting it"; exit 1; }
  rm -rf -- "$OUT"
fi
echo "+ ${launch[0]} $TRAIN_SCRIPT ${args[*]}"
echo "  machine: $(getconf _NPROCESSORS_ONLN) cores; OMP threads $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
nice -n 10 /usr/bin/time -f "peak RSS %M KB" "${launch[@]}" "${args[@]}" >"$OUT.log" 2>&1 || { tail -30 "$OUT.log"; exit 1; }
t1=$(date +%s.%N)
echo "  wall: $(echo "$t1 - $t0" | bc) s; $(tail -1 "$OUT.log"); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
tr '\r' '\n' <"$OUT.log" | grep -E '^Steps: 100%' | tail -1 | sed 's/^/  /' || true
ls -l "$OUT"/pytorch_lora_weights.safetensors

if [ "$EVAL" = 1 ]; then
  echo "+ $PY tools/reference/denoise_loss.py --model $MODEL --lora $OUT/pytorch_lora_weights.safetensors --data $DATA --resolution 64"
  nice -n 10 "$PY" tools/reference/denoise_loss.py --model "$MODEL" --lora "$OUT/pytorch_lora_weights.safetensors" \
    --data "$DATA" --resolution 64 2>"$OUT.denoise.err" | tee "$OUT.denoise.log" | tail -1 >"$OUT.denoise.json"
  grep -E '^(base|lora):' "$OUT.denoise.log" | sed 's/^/  /'
fi
