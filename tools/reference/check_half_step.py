"""Measures how far the reference's own half-precision training step is from the f32 golden step.

The golden `train_step` is f32. `tests/train_precision.rs` compares our bf16/fp16 step with it; this
script runs the same step the way `train_text_to_image_lora.py` does under `--mixed_precision`
(UNet cast to the weight dtype before `add_adapter`, LoRA parameters upcast to f32 as
`cast_training_params` does, forward under `torch.autocast`, fp16 loss scaled by 65536 and the
gradients unscaled), and prints the same error measures, so the test's bounds can be compared with
what the reference itself does. Run: python check_half_step.py --fixtures tests/fixtures
"""
import argparse
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

import reflib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    a = ap.parse_args()
    g = os.path.join(a.fixtures, "golden")
    u, d = load_file(f"{g}/unet.safetensors"), load_file(f"{g}/ddpm.safetensors")
    ts = load_file(f"{g}/train_step.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(a.fixtures, "tiny-sd"), subfolder="unet")
        sched = DDPMScheduler.from_pretrained(os.path.join(a.fixtures, "tiny-sd"), subfolder="scheduler")
        unet.requires_grad_(False)
        unet.to(dtype)
        params = reflib.add_lora(unet)
        with torch.no_grad():
            for n, p in params.items():
                p.data = ts[f"before.{n}"].clone().float()
        x0 = u["sample"].to(dtype)
        noise = d["noise"].to(dtype)
        noisy = sched.add_noise(x0, noise, u["timesteps"])
        with torch.autocast("cpu", dtype=dtype):
            pred = unet(noisy, u["timesteps"], u["encoder_hidden_states"].to(dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        scale = 65536.0 if dtype == torch.float16 else 1.0
        (loss * scale).backward()
        up, deep_num, deep_ref, deep_dot, deep_nn = 0.0, 0.0, 0.0, 0.0, 0.0
        sq = 0.0
        for n, p in params.items():
            gr = p.grad.float() / scale
            sq += float((gr.double() ** 2).sum())
            ref = ts[f"grad.{n}"]
            if ref.abs().max() <= 1e-8:
                continue
            if n.startswith("up_blocks."):
                up = max(up, float((gr - ref).abs().max() / ref.abs().max()))
            else:
                deep_num += float(((gr - ref).double() ** 2).sum())
                deep_ref += float((ref.double() ** 2).sum())
                deep_dot += float((gr.double() * ref.double()).sum())
                deep_nn += float((gr.double() ** 2).sum())
        ref_loss, ref_norm = float(ts["loss"][0]), float(ts["grad_norm_before_clip"][0])
        print(f"{dtype}: loss rel {abs(float(loss) - ref_loss) / ref_loss:.3e}, up-block grad rel {up:.3e}, "
              f"deep cosine {deep_dot / (deep_nn ** 0.5 * deep_ref ** 0.5):.4f}, deep rel L2 {(deep_num / deep_ref) ** 0.5:.3f}, "
              f"grad norm rel {abs(sq ** 0.5 - ref_norm) / ref_norm:.3e}")


if __name__ == "__main__":
    main()
