#!/usr/bin/env bash
# Issue 8's table: the UNet LoRA step of the tiny SD 1.5 fixture, batch 1, f32, on this CPU at
# 64, 256 and 512 px, `lora bench --cache` beside the reference (`reference_step.py --model`,
# diffusers + PEFT, random latents = cached encodings), interleaved in one run with the same
# thread count; peak RSS of both measured the same way (/usr/bin/time's maximum resident size of
# the whole process), and lora's own peak over its training steps (`peak_rss_bytes`: the
# process's peak is reset after loading and encoding the timed batches, which the reference,
# starting from random latents, does not do).
#
#   THREADS=2 PY=/work/refenv/bin/python bash tools/reference/scale_bench.sh [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${THREADS:-2}
py=${PY:-/work/refenv/bin/python}
lora=${LORA:-target/release/lora}
out=${1:-/tmp/scale-bench.jsonl}
: >"$out"
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
export HF_HUB_OFFLINE=1
for res in ${RESOLUTIONS:-64 256 512}; do
  case $res in 64) steps=20 ;; 256) steps=6 ;; *) steps=3 ;; esac
  for extra in "" ${CHECKPOINTING:+"--set train.gradient_checkpointing=true"}; do
    echo "== $res px lora $extra (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    /usr/bin/time -f "%M" -o /tmp/scale-rss "$lora" -q bench pipelines/tiny.toml --cache --resolution "$res" --batch 1 \
      --steps "$steps" --warmup 1 --json $extra | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['max_rss_kb']=int(open('/tmp/scale-rss').read().split()[-1]); print(json.dumps(r))" >>"$out"
    tail -1 "$out" >&2
  done
  echo "== $res px reference (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  /usr/bin/time -f "%M" -o /tmp/scale-rss "$py" tools/reference/reference_step.py --model tests/fixtures/tiny-sd --resolution "$res" \
    --batch 1 --dtype f32 --device cpu --steps "$steps" --warmup 1 | python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['tool']='diffusers'; r['max_rss_kb']=int(open('/tmp/scale-rss').read().split()[-1]); print(json.dumps(r))" >>"$out"
  tail -1 "$out" >&2
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| resolution | grad. ckpt | lora ms/step | diffusers ms/step | ratio | lora peak RSS, training steps | lora peak RSS, whole process | diffusers peak RSS, whole process |")
print("|---|---|---|---|---|---|---|---|")
ref = {r["resolution"]: r for r in rows if r.get("tool") == "diffusers"}
for r in rows:
    if r.get("tool") != "lora":
        continue
    d = ref.get(r["resolution"], {})
    ratio = r["ms_per_step"] / d["ms_per_step"] if d else float("nan")
    print(f"| {r['resolution']} px | {'on' if r.get('gradient_checkpointing') else 'off'} | {r['ms_per_step']:.0f} | {d.get('ms_per_step', float('nan')):.0f} | {ratio:.2f} | "
          f"{(r.get('peak_rss_bytes') or 0) / 2**20:.0f} MiB | {(r.get('peak_rss_process_bytes') or r['max_rss_kb'] * 1024) / 2**20:.0f} MiB | {d.get('max_rss_kb', 0) / 1024:.0f} MiB |")
PY
