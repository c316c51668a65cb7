"""diffusers' StableDiffusionXLPipeline images for a side-by-side with `lora generate`: seeded
initial latents (saved as `latents` in a safetensors file `lora generate --latents` reads), the
model's own Euler scheduler or DDIM from its config, optional LoRA files (any form diffusers'
`load_lora_weights` reads, kohya's original-layout SDXL names included), PNGs out.

Usage: python tools/reference/sdxl_generate.py --model DIR --out DIR [--lora FILE] [--steps 20]
           [--guidance 5] [--size 64] [--prompt "..."]
Writes OUT/latents.safetensors and OUT/{euler,ddim}.png; prints one JSON line.
"""
import argparse, json, os

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--prompt", default="a red circle on a white background")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(a.model, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if a.lora:
        pipe.load_lora_weights(a.lora)
    lat = a.size // pipe.vae_scale_factor
    latents = torch.randn(1, pipe.unet.config.in_channels, lat, lat, generator=torch.Generator().manual_seed(99))
    save_file({"latents": latents}, os.path.join(a.out, "latents.safetensors"))
    euler = pipe.scheduler
    report = {"model": a.model, "lora": a.lora, "steps": a.steps, "guidance": a.guidance, "size": a.size}
    for name, sched in [("euler", euler), ("ddim", DDIMScheduler.from_config(euler.config))]:
        pipe.scheduler = sched
        img = pipe(a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                   latents=latents.clone(), output_type="np").images[0]
        Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(a.out, f"{name}.png"))
        report[name] = os.path.join(a.out, f"{name}.png")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
