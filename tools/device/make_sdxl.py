"""Builds an SDXL-base-shaped diffusers pipeline folder with random weights, plus a captioned image
folder, for the SDXL part of `scripts/device-check.sh` (no download: the configs below are
stabilityai/stable-diffusion-xl-base-1.0's published `config.json`s, written from them; the
tokenizers are the real CLIP vocabulary shipped in tests/fixtures/sdxl-tiny, `tokenizer_2`
padding with `!`; the scheduler is lora's bundled SDXL Euler config).

    python tools/device/make_sdxl.py OUT_DIR [--small] [--images N] [--resolution PX]

--small shrinks every width (for the CPU dry run); block types, transformer depths per block, the
text_time embedding and key names stay SDXL's. Seeded (torch.manual_seed(0)), saved in fp16.
"""
import argparse, os, shutil, sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(REPO, "tests/fixtures/sdxl-tiny")
sys.path.insert(0, HERE)
from make_sd15 import write_images  # noqa: E402

UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True, up_block_types=["UpDecoderBlock2D"] * 4,
)
TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            projection_dim=768, max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_2 = dict(hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def shrink(unet, vae, text, text_2):
    unet.update(block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 2, 3],
                cross_attention_dim=128 + 128, addition_time_embed_dim=32, projection_class_embeddings_input_dim=128 + 6 * 32)
    vae.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    text.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2, projection_dim=128)
    text_2.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=3, projection_dim=128)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=1024)
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, text_cfg, text_2_cfg = dict(UNET), dict(VAE), dict(TEXT), dict(TEXT_2)
    if a.small:
        shrink(unet_cfg, vae_cfg, text_cfg, text_2_cfg)
    torch.manual_seed(0)
    model = os.path.join(a.out, "model")
    os.makedirs(model, exist_ok=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.to(torch.float16).save_pretrained(os.path.join(model, "unet"), safe_serialization=True)
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters", flush=True)
    del unet
    AutoencoderKL(**vae_cfg).to(torch.float16).save_pretrained(os.path.join(model, "vae"), safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**text_cfg)).to(torch.float16).save_pretrained(os.path.join(model, "text_encoder"), safe_serialization=True)
    CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg)).to(torch.float16).save_pretrained(
        os.path.join(model, "text_encoder_2"), safe_serialization=True)
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(TINY, tok), os.path.join(model, tok), dirs_exist_ok=True)
    os.makedirs(os.path.join(model, "scheduler"), exist_ok=True)
    shutil.copy(os.path.join(REPO, "assets/sd/sdxl-scheduler_config.json"), os.path.join(model, "scheduler", "scheduler_config.json"))
    shutil.copy(os.path.join(TINY, "model_index.json"), os.path.join(model, "model_index.json"))

    data = write_images(a.out, a.images, a.resolution)
    print(f"wrote {model} and {a.images} images in {data}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
