#!/usr/bin/env bash
# The device check: one prepared command for the lent GPU machine (one H200), within a deadline
# (DEADLINE seconds, default 420: GPU time comes 15 minutes at a time, start-up included). Steps
# in order of value, each under its own timeout (cut to what the deadline leaves; a step that
# cannot fit is skipped and says so), so a hang in one still returns the others:
#   1. the CUDA parity tests (`device_*` tests of the integration binary with LORA_TEST_DEVICE=cuda:
#      f32 at the CPU tolerances, half precision at the stated looser ones); the test binary finds
#      its fixtures through LORA_REPO_ROOT (this checkout), not the build machine's path;
#   2. `lora bench` on an SD 1.5-shaped model with random weights (the published SD 1.5 configs,
#      generated on the machine), 512 px, batch 1 and 4, bf16, and the reference beside it
#      (tools/reference/reference_step.py: diffusers + PEFT, bf16 autocast, SDPA);
#   3. a profile of the batch-1 step (`lora bench --profile` under CUDA_LAUNCH_BLOCKING=1, so each
#      scope's wall time is GPU time);
#   4. 50 real `lora run` steps of that model on a generated image folder, with the GPU's
#      utilisation sampled, to show the whole loop (data, encode, train, checkpoint);
#   5. the gradient-checkpointing rows of step 2;
#   6. generation: `lora generate` 20 steps at 512 px beside diffusers' StableDiffusionPipeline
#      (tools/device/generate_timing.py).
# Memory: `nvidia-smi --query-gpu=memory.used` is sampled every 100 ms while each tool runs, and
# the summary gives that peak above the idle baseline for both tools, beside each tool's own
# figure (ours: cuMemGetInfo in use, the CUDA context included; torch's max_memory_allocated,
# the context and the allocator's cache excluded): only the nvidia-smi columns compare alike.
#
# `--sdxl` instead runs the SDXL row (issue 16): an SDXL-base-shaped model with random weights
# (tools/device/make_sdxl.py, the published configs), `lora bench` at 1024 px, batch 1, bf16,
# without and with gradient checkpointing, beside `reference_step.py --config sdxl`; about 6 minutes,
# so it is a second call of the device tool: command `bash scripts/device-check.sh --sdxl`.
#
# Prepare here first: `scripts/device-prepare.sh` (CUDA build + wheels into .device/), then run
# through the device tool: command `bash scripts/device-check.sh`, carry [".device"].
# Dry run on the CPU with a small model (checks the script itself):
#   scripts/device-prepare.sh --cpu && PYTHON=/work/refenv/bin/python bash scripts/device-check.sh --cpu-dry-run [--sdxl]
# Results: $OUT (the device tool's folder) or /tmp/device-check-out: summary.md, *.jsonl, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dry=0
sdxl=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) dry=1 ;;
    --sdxl) sdxl=1 ;;
    *) echo "unknown argument $arg (--cpu-dry-run, --sdxl)"; exit 2 ;;
  esac
done
py=${PYTHON:-python3}   # the Python with torch (on the GPU machine: python3)
out=${OUT:-/tmp/device-check-out}
work=${WORK:-/tmp/lora-device-check}
mkdir -p "$out" "$work"
exec > >(tee "$out/device-check.log") 2>&1
started=$(date +%s)
deadline=$(( started + ${DEADLINE:-420} ))
say() { echo "== [$(( $(date +%s) - started ))s] $*"; }
fail=0
# The tests read tests/fixtures from this checkout, wherever it lies.
export LORA_REPO_ROOT="$repo"

# limit N: N, or what the deadline leaves (minus 10 s for the summary); 0 when under 15 s are left
# (callers skip the step then: `timeout 0` would mean no limit at all).
limit() {
  local left=$(( deadline - $(date +%s) - 10 ))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# GPU memory sampling (nvidia-smi, every 100 ms) around one tool's run: smi_start TAG, smi_stop.
smi=""
smi_start() {
  [ "$dry" = 1 ] && return
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/mem-$1.csv" 2>/dev/null &
  smi=$!
}
smi_stop() {
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  smi=""
}

# A pipeline file $1 for model folder $2, image folder $3, output $4, at $5 px.
pipeline() {
  cat >"$1" <<TOML
[model]
path = "$2"

[dataset]
kind = "imagefolder"
path = "$3"

[preprocess]
resolution = $5
center_crop = true

[train]
batch_size = 1
learning_rate = 1e-4
seed = 0
precision = "$precision"
device = "$device"

[checkpoints]
every_steps = 25

[output]
dir = "$4"
TOML
}

# One side-by-side row: `lora bench` on pipeline $1 and the reference step on the same architecture
# ($2: sd15 or sdxl; the generated model in the dry run, the published config on the GPU) at $3 px,
# batch $4, gradient checkpointing $5, each under a timeout of $6 s; appends to the .jsonl files.
bench_pair() {
  local toml=$1 arch=$2 px=$3 batch=$4 ckpt=$5 tag="$2-$4-$5" t
  t=$(limit "$6")
  if [ "$t" = 0 ]; then say "SKIPPED (deadline): bench $tag"; return; fi
  say "lora bench $arch $px px batch $batch checkpointing $ckpt (timeout $t s)"
  smi_start "lora-$tag"
  timeout "$t" "$lora" -q bench "$toml" --cache --resolution "$px" --batch "$batch" --steps "$steps" --warmup "$warmup" \
    --set "train.gradient_checkpointing=$ckpt" --json >>"$out/lora-bench.jsonl" 2>"$out/lora-$tag.err" \
    || { echo "lora bench failed:"; tail -5 "$out/lora-$tag.err"; fail=1; }
  smi_stop
  tail -1 "$out/lora-bench.jsonl"
  t=$(limit "$6")
  if [ "$t" = 0 ]; then say "SKIPPED (deadline): reference $tag"; return; fi
  say "reference $arch $px px batch $batch checkpointing $ckpt (timeout $t s)"
  local gc=() ref_model=(--config "$arch")
  [ "$ckpt" = true ] && gc=(--gradient-checkpointing)
  [ "$dry" = 1 ] && ref_model=(--model "$work/$arch/model")
  smi_start "ref-$tag"
  timeout "$t" "$py" tools/reference/reference_step.py "${ref_model[@]}" --resolution "$px" --batch "$batch" --dtype "$dtype" \
    --steps "$steps" --warmup "$warmup" --device "$device" "${gc[@]}" >>"$out/ref-bench.jsonl" 2>"$out/ref-$tag.err" \
    || { echo "reference failed:"; tail -5 "$out/ref-$tag.err"; }
  smi_stop
  tail -1 "$out/ref-bench.jsonl"
}

# --- binaries and libraries ------------------------------------------------------------------
[ -f .device/bin.tar.xz ] || { echo "no .device/bin.tar.xz: run scripts/device-prepare.sh first"; exit 2; }
rm -rf "$work/bin" && tar -C "$work" -xJf .device/bin.tar.xz
lora="$work/bin/lora"; tests="$work/bin/tests"
mode=$(cat "$work/bin/MODE")
if [ "$dry" = 1 ]; then
  [ "$mode" = cpu ] || echo "note: dry run with a $mode build"
  device=cpu; dtype=f32; precision=no; res=64; small=--small; steps=3; warmup=2; run_steps=6
else
  [ "$mode" = cuda ] || { echo ".device holds a $mode build; run scripts/device-prepare.sh (without --cpu)"; exit 2; }
  device=cuda; dtype=bf16; precision=bf16; res=512; small=; steps=10; warmup=5; run_steps=50
  # The CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC) come with PyTorch's wheels there;
  # libcuda.so.1 with the driver.
  libs=$("$py" - <<'PY'
import glob, os
dirs = set()
try:
    import nvidia
    for base in nvidia.__path__:
        for so in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(so))
except ImportError:
    pass
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="${libs}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "ldd"
  if ldd "$lora" | grep "not found"; then echo "missing libraries above (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"; exit 1; fi
  ldd "$lora" | grep -E "cuda|cublas|curand|nvrtc"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # The idle baseline the memory columns are measured above.
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/mem-idle.csv" 2>/dev/null &
  smi=$!; sleep 1; smi_stop
fi
export RUST_LOG=${RUST_LOG:-info}

# --- 1. parity tests on the device -----------------------------------------------------------
if [ "$sdxl" = 0 ]; then
say "parity tests on $device"
t=$(limit 240); [ "$t" = 0 ] && t=1   # `timeout 0` would mean no limit
LORA_TEST_DEVICE=$device timeout "$t" "$tests" device_ --test-threads=1 2>&1 | tee "$out/parity.log" | grep -E "^test |test result|panicked|relative" || true
grep -q "test result: ok" "$out/parity.log" || { echo "PARITY TESTS FAILED"; fail=1; }
fi

# --- 2. the SD 1.5-shaped model and the pipeline ---------------------------------------------
say "python environment"
site=/tmp/lora-site
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"
if [ "$sdxl" = 1 ]; then
  # --- SDXL: 1024 px bf16 beside diffusers --------------------------------------------------------
  if [ "$dry" = 1 ]; then xres=128; else xres=1024; fi
  say "random SDXL model"
  timeout "$(limit 400 | sed 's/^0$/1/')" "$py" tools/device/make_sdxl.py "$work/sdxl" $small --images 4 --resolution "$xres" || { echo "SDXL model generation failed"; exit 1; }
  pipeline "$work/sdxl.toml" "$work/sdxl/model" "$work/sdxl/images/train" "$work/sdxl-out" "$xres"
  : >"$out/lora-bench.jsonl"; : >"$out/ref-bench.jsonl"
  for ckpt in false true; do
    bench_pair "$work/sdxl.toml" sdxl "$xres" 1 "$ckpt" 200
  done
  run_steps=0; run_start=0; run_end=0
else
say "random SD 1.5 model"
timeout "$(limit 300 | sed 's/^0$/1/')" "$py" tools/device/make_sd15.py "$work/sd15" $small --images 16 --resolution "$res" || { echo "model generation failed"; exit 1; }
mkdir -p "$work/sd15/images-bench/train"
cp "$work/sd15"/images/train/000[0-3].png "$work/sd15/images-bench/train/"
head -4 "$work/sd15/images/train/metadata.jsonl" >"$work/sd15/images-bench/train/metadata.jsonl"
pipeline "$work/bench.toml" "$work/sd15/model" "$work/sd15/images-bench/train" "$work/bench-out" "$res"
pipeline "$work/run.toml" "$work/sd15/model" "$work/sd15/images/train" "$work/run-out" "$res"

# --- 3. lora bench and the reference, side by side (no checkpointing) ------------------------
: >"$out/lora-bench.jsonl"; : >"$out/ref-bench.jsonl"
for batch in 1 4; do
  bench_pair "$work/bench.toml" sd15 "$res" "$batch" false 150
done

# --- 4. a profile of the batch-1 step: each scope's wall time is GPU time ----------------------
t=$(limit 120)
if [ "$t" = 0 ]; then say "SKIPPED (deadline): profile"; else
  say "lora bench --profile, batch 1 (CUDA_LAUNCH_BLOCKING=1, timeout $t s)"
  CUDA_LAUNCH_BLOCKING=1 timeout "$t" "$lora" -q bench "$work/bench.toml" --cache --resolution "$res" --batch 1 --steps "$steps" --warmup "$warmup" \
    --profile >"$out/profile.txt" 2>"$out/profile.err" || { echo "profile failed:"; tail -5 "$out/profile.err"; }
  tail -30 "$out/profile.txt"
fi

# --- 5. a real run: data, encode, train, checkpoint ------------------------------------------
t=$(limit 240)
if [ "$t" = 0 ]; then say "SKIPPED (deadline): lora run"; run_steps=0; run_start=0; run_end=0; else
say "lora run, $run_steps steps (timeout $t s)"
if [ "$dry" = 0 ]; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 >"$out/gpu-util.csv" 2>/dev/null &
  smi=$!
fi
run_start=$(date +%s.%N)
timeout "$t" "$lora" run "$work/run.toml" --set "train.max_steps=$run_steps" >"$out/run.log" 2>&1 || { echo "lora run failed"; tail -20 "$out/run.log"; fail=1; }
run_end=$(date +%s.%N)
smi_stop
tail -8 "$out/run.log"
ls "$work/run-out" || true
fi

# --- 6. the gradient-checkpointing rows --------------------------------------------------------
for batch in 1 4; do
  bench_pair "$work/bench.toml" sd15 "$res" "$batch" true 150
done

# --- 7. generation: lora generate beside diffusers --------------------------------------------
gsteps=20; [ "$dry" = 1 ] && gsteps=2
t=$(limit 120)
if [ "$t" = 0 ]; then say "SKIPPED (deadline): generation"; else
  say "lora generate, $gsteps steps at $res px (timeout $t s)"
  smi_start gen-lora
  g0=$(date +%s.%N)
  timeout "$t" "$lora" -q generate --model "$work/sd15/model" --prompt "a red circle" --steps "$gsteps" --height "$res" --width "$res" \
    --device "$device" --seed 0 --out "$work/gen.png" --no-progress >"$out/gen-lora.log" 2>&1 || { echo "lora generate failed"; tail -5 "$out/gen-lora.log"; }
  g1=$(date +%s.%N)
  smi_stop
  echo "{\"tool\": \"lora\", \"size\": $res, \"steps\": $gsteps, \"wall_s\": $(python3 -c "print(round($g1 - $g0, 3))")}" | tee "$out/gen.jsonl"
  t=$(limit 120)
  if [ "$t" != 0 ]; then
    smi_start gen-ref
    timeout "$t" "$py" tools/device/generate_timing.py --model "$work/sd15/model" --size "$res" --steps "$gsteps" --device "$device" \
      >>"$out/gen.jsonl" 2>"$out/gen-ref.err" || { echo "diffusers generate failed:"; tail -5 "$out/gen-ref.err"; }
    smi_stop
    tail -1 "$out/gen.jsonl"
  fi
fi

fi

# --- summary ---------------------------------------------------------------------------------
python3 - "$out" "$run_start" "$run_end" "$run_steps" <<'PY' | tee "$out/summary.md"
import json, sys, os
out, t0, t1, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def rows(name):
    try:
        return [json.loads(l) for l in open(os.path.join(out, name)) if l.strip().startswith("{")]
    except FileNotFoundError:
        return []
def mib(name):
    """nvidia-smi memory.used samples (MiB) of one phase."""
    try:
        return [float(l.split(",")[0]) for l in open(os.path.join(out, name)) if l.strip() and l.split(",")[0].strip().replace(".", "").isdigit()]
    except FileNotFoundError:
        return []
idle = mib("mem-idle.csv")
base = min(idle) if idle else None
def smi_peak(tag):
    v = mib(f"mem-{tag}.csv")
    return f"{max(v) - base:.0f}" if v and base is not None else "-"
fmt = lambda x, f="{:.1f}": f.format(x) if isinstance(x, (int, float)) else "-"
ours, ref = rows("lora-bench.jsonl"), rows("ref-bench.jsonl")
key = lambda r: (r.get("batch"), bool(r.get("gradient_checkpointing")))
refs = {key(r): r for r in ref}
print(f"GPU memory: nvidia-smi memory.used sampled every 100 ms per phase, peak above the idle baseline ({fmt(base, '{:.0f}')} MiB); "
      "beside it each tool's own figure (lora: cuMemGetInfo in use, context included; diffusers: torch max_memory_allocated, context and cache excluded)\n")
print("| batch | grad. ckpt | lora ms/step | diffusers ms/step | ratio | lora smi peak MiB | diffusers smi peak MiB | lora own MiB | diffusers own MiB | lora host RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in ours:
    f = refs.get(key(r), {})
    ms, rms = r.get("ms_per_step"), f.get("ms_per_step")
    ratio = f"{ms / rms:.2f}" if ms and rms else "-"
    tag = f"sd15-{r['batch']}-{'true' if r.get('gradient_checkpointing') else 'false'}"
    gpu, rgpu = r.get("peak_device_bytes"), f.get("peak_mem_gib")
    print(f"| {r['batch']} | {'on' if r.get('gradient_checkpointing') else 'off'} | {fmt(ms)} | {fmt(rms)} | {ratio} | {smi_peak('lora-' + tag)} | {smi_peak('ref-' + tag)} | "
          f"{fmt(gpu / 2**20 if gpu is not None else None, '{:.0f}')} | {fmt(rgpu * 1024 if rgpu is not None else None, '{:.0f}')} | {(r.get('peak_rss_bytes') or 0) / 2**20:.0f} |")
for g in rows("gen.jsonl"):
    tool = g.get("tool")
    t = g.get("wall_s") if tool == "lora" else g.get("generate_s")
    what = "wall, model load included" if tool == "lora" else f"one image after a warm-up (load {g.get('load_s')} s apart)"
    print(f"\ngenerate ({tool}): {g.get('steps')} steps at {g.get('size')} px: {t} s ({what}); smi peak {smi_peak('gen-' + ('lora' if tool == 'lora' else 'ref'))} MiB")
util = os.path.join(out, "gpu-util.csv")
extra = ""
if os.path.exists(util):
    vals = [float(l.split(",")[0]) for l in open(util) if l.strip() and l.split(",")[0].strip().replace(".", "").isdigit()]
    if vals:
        extra = f", GPU utilisation mean {sum(vals) / len(vals):.0f}% over {len(vals)} samples"
if n:
    print(f"\nlora run: {n} steps in {t1 - t0:.1f} s wall (model load, data, encode, checkpoints included){extra}")
if os.path.exists(os.path.join(out, "profile.txt")):
    print("\nprofile (batch 1, CUDA_LAUNCH_BLOCKING=1): profile.txt")
PY
say "done (fail=$fail)"
exit $fail
