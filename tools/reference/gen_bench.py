"""Reference inference timings on CPU for the side-by-side in docs/benchmarks.md: the UNet forward
(CFG batch 2) and a whole StableDiffusionPipeline call, on a diffusers folder.

Usage: python tools/reference/gen_bench.py --model tests/fixtures/tiny-sd [--size 64] [--steps 30]
Prints one JSON line.
"""
import argparse, json, time

import torch
from diffusers import StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    unet = pipe.unet
    lat = a.size // pipe.vae_scale_factor
    x = torch.randn(2, unet.config.in_channels, lat, lat)
    t = torch.tensor([10, 731])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(x, t, ctx)
        t1 = time.perf_counter()
        for _ in range(a.runs * 10):
            unet(x, t, ctx)
        unet_ms = (time.perf_counter() - t1) / (a.runs * 10) * 1e3
    g = torch.Generator().manual_seed(0)
    pipe("a red circle on a white background", num_inference_steps=a.steps, height=a.size, width=a.size, generator=g)
    t2 = time.perf_counter()
    for _ in range(a.runs):
        pipe("a red circle on a white background", num_inference_steps=a.steps, height=a.size, width=a.size, generator=g)
    gen_s = (time.perf_counter() - t2) / a.runs
    print(json.dumps({"impl": "diffusers", "model": a.model, "size": a.size, "steps": a.steps, "threads": torch.get_num_threads(),
                      "load_s": round(load_s, 3), "unet_forward_ms": round(unet_ms, 2), "generate_s": round(gen_s, 3)}))


if __name__ == "__main__":
    main()
