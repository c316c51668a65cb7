"""Recomputes the existing SD 1.5 goldens (tests/fixtures/golden) with reflib's helpers and this venv.

Proves that the method used for the new SD 2.x goldens reproduces the goldens we already trust
(UNet output, DDPM noising and velocity, LoRA output, the train step). Prints max abs differences
and exits non-zero if any is above 1e-4 (relative to max(1, |golden|)).

Usage: python tools/reference/check_sd1_goldens.py [--fixtures tests/fixtures]
"""
import argparse
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reflib  # noqa: E402


def rel_err(a, b):
    return float(((a.float() - b.float()).abs() / b.float().abs().clamp(min=1.0)).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    a = ap.parse_args()
    from diffusers import DDPMScheduler, UNet2DConditionModel
    torch.set_num_threads(1)
    model = os.path.join(a.fixtures, "tiny-sd")
    g = os.path.join(a.fixtures, "golden")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    u, d = load_file(f"{g}/unet.safetensors"), load_file(f"{g}/ddpm.safetensors")
    ts = load_file(f"{g}/train_step.safetensors")
    errs = {}
    with torch.no_grad():
        out = unet(u["sample"], u["timesteps"], u["encoder_hidden_states"]).sample
    errs["unet.out"] = rel_err(out, u["out"])
    errs["ddpm.noisy"] = rel_err(sched.add_noise(u["sample"], d["noise"], u["timesteps"]), d["noisy"])
    errs["ddpm.velocity"] = rel_err(sched.get_velocity(u["sample"], d["noise"], u["timesteps"]), d["velocity"])
    params = reflib.add_lora(unet)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ts[f"before.{n}"])
        out_lora = unet(u["sample"], u["timesteps"], u["encoder_hidden_states"]).sample
    errs["unet_lora.out_with_lora"] = rel_err(out_lora, load_file(f"{g}/unet_lora.safetensors")["out_with_lora"])
    mine = reflib.train_step(unet, sched, u["sample"], d["noise"], u["timesteps"], u["encoder_hidden_states"])
    if set(mine) != set(ts):
        print("key sets differ:", sorted(set(mine) ^ set(ts))[:10])
        sys.exit(1)
    for prefix in ("loss", "snr_gamma5_loss", "grad_norm_before_clip", "grad.", "after."):
        errs[f"train_step.{prefix}"] = max(rel_err(mine[k], ts[k]) for k in ts if k.startswith(prefix))
    bad = False
    for k, v in errs.items():
        flag = "OK " if v < 1e-4 else "BAD"
        bad |= v >= 1e-4
        print(f"{flag} {k:40s} max rel err {v:.3e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
