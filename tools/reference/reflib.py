"""Shared helpers for the reference scripts: LoRA injection with fixed weights, one reference training step.

Everything here calls diffusers / peft / torch the way `train_text_to_image_lora.py` does; nothing is
re-implemented. Used by make_sd2_fixtures.py and check_sd1_goldens.py (which proves these helpers
reproduce the existing SD 1.5 goldens before they are trusted for new ones), and, for `Capture`, by
load_lora_check.py and make_dora_lora_file.py.
"""
import logging

import torch
import torch.nn.functional as F
from peft import LoraConfig

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class Capture(logging.Handler):
    """Collects WARNING+ records of the libraries that report LoRA key problems."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


def add_lora(unet, rank=4):
    """Injects the training script's LoRA (r = alpha = rank, gaussian init, to_q/k/v/out.0) into `unet`."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    return lora_params(unet)


def lora_params(unet):
    """{peft parameter name: parameter} for every LoRA parameter, in sorted name order."""
    return dict(sorted((n, p) for n, p in unet.named_parameters() if "lora_" in n))


def set_fixed_lora_weights(unet, seed, rank=4, b_std=0.05):
    """Overwrites every LoRA A with N(0, 1/rank) and every B with N(0, b_std), drawn from one seeded
    generator in sorted parameter-name order, so B != 0 and both A and B get gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_params(unet).items():
            std = 1.0 / rank if ".lora_A." in name else b_std
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def snr(scheduler, timesteps):
    """diffusers.training_utils.compute_snr."""
    from diffusers.training_utils import compute_snr
    return compute_snr(scheduler, timesteps)


def train_step(unet, scheduler, sample, noise, timesteps, encoder_hidden_states, *, lr=1e-3,
               betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, max_grad_norm=1.0, snr_gamma=5.0):
    """One reference step on fixed inputs: noisy = add_noise(x0, noise, t); target by the scheduler's
    prediction_type; loss = MSE; backward; clip_grad_norm_(max_grad_norm); AdamW step.

    Returns a dict of tensors in the golden train_step layout (loss, snr_gamma5_loss,
    grad_norm_before_clip, before.*, grad.*, after.*).
    """
    params = lora_params(unet)
    out = {f"before.{n}": p.detach().clone() for n, p in params.items()}
    noisy = scheduler.add_noise(sample, noise, timesteps)
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        target = noise
    elif pred_type == "v_prediction":
        target = scheduler.get_velocity(sample, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction_type {pred_type}")
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting exactly as the training script computes it (reported, not back-propagated).
    with torch.no_grad():
        s = snr(scheduler, timesteps)
        w = torch.stack([s, snr_gamma * torch.ones_like(s)], dim=1).min(dim=1)[0]
        w = w / s if pred_type == "epsilon" else w / (s + 1)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        snr_loss = (per * w).mean()
    loss.backward()
    for n, p in params.items():
        out[f"grad.{n}"] = p.grad.detach().clone()
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
    opt.step()
    for n, p in params.items():
        out[f"after.{n}"] = p.detach().clone()
    out["loss"] = loss.detach().reshape(1)
    out["snr_gamma5_loss"] = snr_loss.detach().reshape(1)
    out["grad_norm_before_clip"] = norm.detach().reshape(1)
    return out
