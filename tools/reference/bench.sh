#!/usr/bin/env bash
# Reference speed numbers on this machine (CPU, f32): the UNet LoRA step alone (tools/reference/reference_step.py,
# the SDXL-aware copy of shared/bench/reference_step.py) and the whole diffusers training scripts on the tiny
# fixtures (SD 1.x/2.x: train_text_to_image_lora.py; SDXL: train_text_to_image_lora_sdxl.py through
# train_sdxl_reference.sh, 30 steps with --train_text_encoder as pipelines/tiny-sdxl.toml), then the denoising
# loss of the LoRAs they wrote. A training row whose script is missing is skipped with a note.
#
# Usage (from the repository root):
#   REFENV=/work/refenv TRAIN_SCRIPT=/work/refsrc/train_text_to_image_lora.py \
#   TRAIN_SCRIPT_SDXL=/work/refsrc/train_text_to_image_lora_sdxl.py \
#   BENCH_STEP=tools/reference/reference_step.py THREADS=1 bash tools/reference/bench.sh [OUT_DIR]
# Prints every command before running it, its wall time, and the load average before and after, so the numbers
# can be read against what else the machine was doing. Keep THREADS=1 on a busy 2-core machine: with 2 OpenMP
# threads and other processes on the cores, torch's spinning threads make every step ~10x slower.
set -euo pipefail
REFENV=${REFENV:-/work/refenv}
PY="$REFENV/bin/python"
TRAIN_SCRIPT=${TRAIN_SCRIPT:-/work/refsrc/train_text_to_image_lora.py}
TRAIN_SCRIPT_SDXL=${TRAIN_SCRIPT_SDXL:-/work/refsrc/train_text_to_image_lora_sdxl.py}
BENCH_STEP=${BENCH_STEP:-tools/reference/reference_step.py}
THREADS=${THREADS:-1}
OUT=${1:-/tmp/lora-ref-bench}
F=tests/fixtures
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"

run() {
  echo "+ $*"
  echo "  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  local t0 t1
  t0=$(date +%s.%N)
  nice -n 10 "$@" > "$OUT/last.log" 2>&1 || { tail -20 "$OUT/last.log"; return 1; }
  t1=$(date +%s.%N)
  grep -E '^\{"impl"|^\{"model"|Steps: 100%' "$OUT/last.log" | tr '\r' '\n' | grep -E '^\{|Steps: 100%' | tail -2 || true
  echo "  wall: $(echo "$t1 - $t0" | bc) s; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
}

echo "machine: $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); OMP threads $THREADS"
"$PY" -c "import torch, diffusers, transformers, peft, accelerate, datasets; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"

# Python start-up alone: importing what the training script imports.
run "$PY" -c "import datasets, torch, transformers, accelerate, peft, torchvision, diffusers; from diffusers import StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL"

for model in tiny-sd sd2-tiny sdxl-tiny; do
  run "$PY" "$BENCH_STEP" --model "$F/$model" --resolution 64 --batch 4 --dtype f32 --device cpu --steps 20 --warmup 3
  run "$PY" "$BENCH_STEP" --model "$F/$model" --resolution 64 --batch 4 --dtype f32 --device cpu --steps 20 --warmup 3 --with-vae
done

for model in tiny-sd sd2-tiny; do
  [ -f "$TRAIN_SCRIPT" ] || { echo "skipped: training $model ($TRAIN_SCRIPT not found)"; continue; }
  rm -rf "$OUT/run-$model"
  run "$PY" "$TRAIN_SCRIPT" --pretrained_model_name_or_path "$F/$model" \
    --dataset_name "$F/datasets/shapes-parquet" --resolution 64 --train_batch_size 4 --max_train_steps 30 \
    --seed 0 --learning_rate 1e-3 --output_dir "$OUT/run-$model"
  run "$PY" tools/reference/denoise_loss.py --model "$F/$model" --lora "$OUT/run-$model" --data "$F/datasets/shapes-parquet"
done

# SDXL: the real script, unmodified, as pipelines/tiny-sdxl.toml trains (UNet + both text encoders, 30 steps).
if [ -f "$TRAIN_SCRIPT_SDXL" ]; then
  REFENV=$REFENV TRAIN_SCRIPT=$TRAIN_SCRIPT_SDXL THREADS=$THREADS STEPS=30 \
    bash tools/reference/train_sdxl_reference.sh "$F/sdxl-tiny" "$OUT/run-sdxl-tiny" --train_text_encoder
else
  echo "skipped: training sdxl-tiny ($TRAIN_SCRIPT_SDXL not found)"
fi
