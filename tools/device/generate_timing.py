"""diffusers' StableDiffusionPipeline generation time, for the device check's generation row beside
`lora generate`: one warm-up image, then one timed image at the given size and steps (model load
timed apart). Prints one JSON line.

    python tools/device/generate_timing.py --model DIR [--size 512] [--steps 20] [--device cuda] [--dtype f32|bf16|f16]
"""
import argparse
import json
import time

import torch
from diffusers import StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    gen = lambda: pipe("a red circle", num_inference_steps=a.steps, height=a.size, width=a.size, generator=torch.Generator(a.device).manual_seed(0), output_type="np")
    gen()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    gen()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(json.dumps({"tool": "diffusers", "size": a.size, "steps": a.steps, "dtype": a.dtype, "load_s": round(load, 3), "generate_s": round(time.perf_counter() - t1, 3)}))


if __name__ == "__main__":
    main()
