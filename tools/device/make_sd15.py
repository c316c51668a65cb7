"""Builds an SD 1.5-shaped diffusers pipeline folder with random weights, plus a small captioned
image folder, for `scripts/device-check.sh` (no download: the configs below are the published
stable-diffusion-v1-5 `config.json`s, the tokenizer is the real CLIP vocabulary shipped in
tests/fixtures/tiny-sd/tokenizer).

    python tools/device/make_sd15.py OUT_DIR [--small] [--images N] [--resolution PX]

--small shrinks every width (for the CPU dry run of the device check); the layout, block types and
key names stay those of SD 1.5. Weights are seeded (torch.manual_seed(0)) and saved in fp16, as the
published `fp16` variant is.
"""
import argparse, json, os, shutil, sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def shrink(unet, vae, text):
    unet.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=64, attention_head_dim=8)
    vae.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, projection_dim=64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=512)
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = dict(UNET), dict(VAE), dict(TEXT)
    if a.small:
        shrink(unet_cfg, vae_cfg, text_cfg)
    torch.manual_seed(0)
    model = os.path.join(a.out, "model")
    os.makedirs(model, exist_ok=True)
    unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    unet.to(torch.float16).save_pretrained(os.path.join(model, "unet"), safe_serialization=True)
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters", flush=True)
    del unet
    vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    vae.to(torch.float16).save_pretrained(os.path.join(model, "vae"), safe_serialization=True)
    del vae
    te_cfg = {k: v for k, v in text_cfg.items() if k not in ("architectures", "model_type")}
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    te.to(torch.float16).save_pretrained(os.path.join(model, "text_encoder"), safe_serialization=True)
    del te
    shutil.copytree(os.path.join(REPO, "tests/fixtures/tiny-sd/tokenizer"), os.path.join(model, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(model, "scheduler"), exist_ok=True)
    with open(os.path.join(model, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
    shutil.copy(os.path.join(REPO, "tests/fixtures/tiny-sd/model_index.json"), os.path.join(model, "model_index.json"))

    data = write_images(a.out, a.images, a.resolution)
    print(f"wrote {model} and {a.images} images in {data}", flush=True)


def write_images(out, count, resolution):
    """A captioned image folder `OUT/images/train` (metadata.jsonl): smooth random colour fields,
    so PNG decode and resize do real work. Returns the folder."""
    data = os.path.join(out, "images", "train")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "yellow", "circle", "square", "sky", "tree", "house", "cat"]
    with open(os.path.join(data, "metadata.jsonl"), "w") as meta:
        for i in range(count):
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC)
            name = f"{i:04d}.png"
            img.save(os.path.join(data, name))
            caption = "a " + " ".join(rng.choice(words, size=4))
            meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return data


if __name__ == "__main__":
    sys.exit(main())
