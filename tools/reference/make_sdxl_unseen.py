"""Builds an SDXL-shaped pipeline that is NOT one of the test fixtures, to check `lora` on a model it was not
written against. Built like make_sdxl_fixtures.py builds tests/fixtures/sdxl-tiny (seeded default
initialisers, diffusers layout, StableDiffusionXLPipeline.save_config's model_index.json, the same SDXL base
scheduler config, the real tokenizer files copied from sdxl-tiny), with a different configuration:

  UNet: block_out_channels [64, 96, 160], layers_per_block 2, transformer_layers_per_block [1, 2, 2]
        (mid block 2, up blocks [2, 2, 1]), attention_head_dim [2, 4, 8] (= heads per block: 4 heads of 24 in
        block 1, 8 heads of 20 in block 2 and the mid block; sdxl-tiny has 4 heads everywhere),
        cross_attention_dim 128 = 48 + 80, addition_time_embed_dim 16,
        projection_class_embeddings_input_dim 80 + 6 * 16 = 176, sample_size 8 (64 px).
        The attention widths (96 in block 1, 160 in block 2 and the mid block) differ from each other and from
        cross_attention_dim (128), as in SDXL base (640, 1280, 2048); in sdxl-tiny all three are 64, so a
        LoRA shape or key mix-up between blocks (or attn1 vs attn2's to_k/to_v) cannot show there.
  Text encoders of DIFFERENT sizes and depths, as in SDXL base (768/12 layers and 1280/32 layers; sdxl-tiny's
        are both 32 wide and 3 deep): text_encoder CLIPTextModel hidden 48, 4 layers, 4 heads (12 each),
        intermediate 96, quick_gelu; text_encoder_2 CLIPTextModelWithProjection hidden 80, 5 layers, 5 heads
        (16 each), intermediate 160, gelu, projection_dim 80 (= hidden, as SDXL base). Both eos_token_id 2
        (pooled token = argmax(input_ids)), as SDXL base's configs.
  VAE: sdxl-tiny's config (scaling_factor 0.13025, force_upcast), new random weights.
  Seeds: UNet 10, VAE 11, text_encoder 12, text_encoder_2 13 (sdxl-tiny uses 0..3).
  Weights stored as float32 by default (sdxl-tiny is float16), so the f32-on-disk path is exercised too.

The folder is written outside the repository (default /work/sdxl-eval/model); a description with the sha256
of every file goes to <out>-meta.json beside it (not inside, so the folder is a plain diffusers pipeline).
Rerunning with the same versions rewrites byte-identical files.

Usage: python tools/reference/make_sdxl_unseen.py [--out /work/sdxl-eval/model] [--dtype f32|f16]
       [--fixtures tests/fixtures]
"""
import argparse
import hashlib
import json
import os
import shutil

import torch

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 96, 160),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 2, 2], attention_head_dim=[2, 4, 8], cross_attention_dim=48 + 80,
    use_linear_projection=True, upcast_attention=False, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=80 + 6 * 16,
)
VAE = dict(  # sdxl-tiny's VAE config
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
    layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, norm_num_groups=32,
    scaling_factor=0.13025, force_upcast=True,
)
TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL base's token ids
TEXT_1 = dict(TEXT_COMMON, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              projection_dim=48, hidden_act="quick_gelu")
TEXT_2 = dict(TEXT_COMMON, hidden_size=80, intermediate_size=160, num_hidden_layers=5, num_attention_heads=5,
              projection_dim=80, hidden_act="gelu")
SEEDS = {"unet": 10, "vae": 11, "text_encoder": 12, "text_encoder_2": 13}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/work/sdxl-eval/model")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--fixtures", default="tests/fixtures", help="where sdxl-tiny (tokenizers, scheduler) is")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = f"{a.fixtures}/sdxl-tiny"
    out = a.out.rstrip("/")
    dtype = {"f32": torch.float32, "f16": torch.float16}[a.dtype]
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(SEEDS["text_encoder"])
    te1 = CLIPTextModel(CLIPTextConfig(**TEXT_1))
    torch.manual_seed(SEEDS["text_encoder_2"])
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        m.to(dtype).save_pretrained(f"{out}/{name}", safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(f"{src}/{name}", f"{out}/{name}")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(f"{out}/tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(f"{out}/tokenizer_2"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_config(out)
    del pipe

    # Load it back as the training script and the pipeline do, and check that it works and reads back exactly.
    pipe = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float32, add_watermarker=False)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        ref, got = m.state_dict(), getattr(pipe, name).state_dict()
        assert ref.keys() == got.keys(), name
        assert all(torch.equal(ref[k].float(), got[k]) for k in ref), f"{name}: weights differ after reload"
    tok2 = AutoTokenizer.from_pretrained(out, subfolder="tokenizer_2", use_fast=False)
    assert tok2.pad_token_id == 0, tok2.pad_token_id
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(["a red circle on a white background", ""],
                                              do_classifier_free_guidance=False)
        assert pe.shape == (2, 77, 128) and pooled.shape == (2, 80), (pe.shape, pooled.shape)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        y = pipe.unet(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500]),
                      pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert y.shape == (2, 4, 8, 8) and torch.isfinite(y).all()

    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    u = pipe.unet
    meta = {
        "made_by": "tools/reference/make_sdxl_unseen.py", "dtype_on_disk": a.dtype, "seeds": SEEDS,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
        "unet": UNET, "vae": VAE, "text_encoder": TEXT_1, "text_encoder_2": TEXT_2,
        "parameters": {n: sum(p.numel() for p in getattr(pipe, n).parameters())
                       for n in ("unet", "vae", "text_encoder", "text_encoder_2")},
        "attn1_heads": {n: m.heads for n, m in u.named_modules() if n.endswith("attn1")},
        "transformer_blocks": sum(1 for n, _ in u.named_modules() if n.endswith("transformer_blocks") is False
                                  and n.split(".")[-2:-1] == ["transformer_blocks"]),
        "unet_lora_modules_to_q_k_v_out0": sum(1 for n, _ in u.named_modules()
                                             if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))),
        "prompt_embeds_shape": list(pe.shape), "pooled_shape": list(pooled.shape),
        "sha256": {f: sha256(os.path.join(out, f)) for f in files},
    }
    with open(f"{out}-meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(json.dumps({k: meta[k] for k in ("parameters", "transformer_blocks", "unet_lora_modules_to_q_k_v_out0",
                                           "prompt_embeds_shape", "pooled_shape")}))
    print(f"wrote {out} ({len(files)} files) and {out}-meta.json")


if __name__ == "__main__":
    main()
