"""Makes single-file checkpoints (original LDM / A1111 layout) from diffusers folders, and checks
them with diffusers' own loader.

    python tools/reference/make_single_file.py --model tests/fixtures/tiny-sd \
        --out tests/fixtures/single-file/tiny-sd.safetensors
    python tools/reference/make_single_file.py --model tests/fixtures/sd2-tiny \
        --out tests/fixtures/single-file/sd2-tiny.safetensors

The key maps are those of the public diffusers script
`scripts/convert_diffusers_to_original_stable_diffusion.py` (UNet, VAE, CLIP and OpenCLIP text
encoders), generalised from its hard-coded 2 layers per block to the folder's `layers_per_block`.
SD 2.x text encoders are written in OpenCLIP form (`cond_stage_model.model.*`, q/k/v fused into
`attn.in_proj_weight`/`in_proj_bias`), plus the `text_projection` and `logit_scale` real files carry.
Like real checkpoints, the file also holds the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...).
Tensors keep the folder's dtype (so an fp16 folder gives an fp16 file).

Check: `StableDiffusionPipeline.from_single_file(out, config=model)` (diffusers' LDM -> diffusers
conversion) must give every UNet, VAE and text-encoder tensor of `from_pretrained(model)` exactly;
the script exits non-zero otherwise.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
UNET_RESNET = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
]


def unet_prefixes(cfg):
    """(sd prefix, diffusers prefix, is_resnet) for the folder's block layout."""
    n = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    per = layers + 1
    down_attn = [t == "CrossAttnDownBlock2D" for t in cfg["down_block_types"]]
    up_attn = [t == "CrossAttnUpBlock2D" for t in cfg["up_block_types"]]
    out = [(sd, hf, False) for sd, hf in UNET_TOP]
    for i in range(n):
        for j in range(layers):
            idx = 1 + i * per + j
            out.append((f"input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.", True))
            if down_attn[i]:
                out.append((f"input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.", False))
        if i + 1 < n:
            out.append((f"input_blocks.{(i + 1) * per}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", False))
        for j in range(per):
            idx = i * per + j
            out.append((f"output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}.", True))
            if up_attn[i]:
                out.append((f"output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}.", False))
            if i + 1 < n and j == layers:
                out.append((f"output_blocks.{idx}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0.", False))
    out.append(("middle_block.0.", "mid_block.resnets.0.", True))
    out.append(("middle_block.1.", "mid_block.attentions.0.", False))
    out.append(("middle_block.2.", "mid_block.resnets.1.", True))
    return out


def rename(name, prefixes, inner_for):
    best = max((p for p in prefixes if name.startswith(p[1])), key=lambda p: len(p[1]), default=None)
    if best is None:
        raise SystemExit(f"no LDM name for `{name}`")
    sd, hf, kind = best
    rest = name[len(hf):]
    for sd_part, hf_part in inner_for(kind):
        if rest.startswith(hf_part):
            rest = sd_part + rest[len(hf_part):]
            break
    return sd + rest


def convert_unet(sd, cfg):
    prefixes = unet_prefixes(cfg)
    return {"model.diffusion_model." + rename(k, prefixes, lambda r: UNET_RESNET if r else []): v for k, v in sd.items()}


VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def convert_vae(sd, cfg):
    n = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    prefixes = []
    for x in ["encoder", "decoder"]:
        prefixes += [
            (f"{x}.conv_in.", f"{x}.conv_in.", None),
            (f"{x}.conv_out.", f"{x}.conv_out.", None),
            (f"{x}.norm_out.", f"{x}.conv_norm_out.", None),
            (f"{x}.mid.block_1.", f"{x}.mid_block.resnets.0.", "resnet"),
            (f"{x}.mid.block_2.", f"{x}.mid_block.resnets.1.", "resnet"),
            (f"{x}.mid.attn_1.", f"{x}.mid_block.attentions.0.", "attn"),
        ]
    for i in range(n):
        for j in range(layers):
            prefixes.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", "resnet"))
        for j in range(layers + 1):
            prefixes.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", "resnet"))
        if i + 1 < n:
            prefixes.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.", None))
            prefixes.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.", None))
    prefixes += [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    inner = {"resnet": [("nin_shortcut.", "conv_shortcut.")], "attn": VAE_ATTN, None: []}
    out = {}
    for k, v in sd.items():
        new = rename(k, prefixes, lambda kind: inner[kind])
        # The original VAE attention is 1x1 convolutions (reshape_weight_for_sd in the script).
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + new] = v
    return out


def convert_clip(sd):
    out = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out["cond_stage_model.transformer." + k] = v
    return out


OPEN_CLIP = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".fc1.", ".c_fc."),
    (".fc2.", ".c_proj."),
    (".self_attn", ".attn"),
]


def convert_open_clip(sd, seed):
    out = {}
    fused = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        if k.endswith("position_ids"):
            continue
        top = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
        }
        if k in top:
            out[top[k]] = v
            continue
        for q in ("q_proj", "k_proj", "v_proj"):
            for param in ("weight", "bias"):
                suffix = f".self_attn.{q}.{param}"
                if k.endswith(suffix):
                    fused.setdefault((k[: -len(suffix)], param), {})[q] = v
                    break
            else:
                continue
            break
        else:
            new = k
            for hf, ldm in OPEN_CLIP:
                new = new.replace(hf, ldm)
            out[new] = v
    for (base, param), parts in fused.items():
        new = base
        for hf, ldm in OPEN_CLIP:
            new = new.replace(hf, ldm)
        out[f"{new}.attn.in_proj_{param}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    hidden = out["token_embedding.weight"].shape[1]
    dtype = out["token_embedding.weight"].dtype
    g = torch.Generator().manual_seed(seed)
    out["text_projection"] = torch.randn(hidden, hidden, generator=g).to(dtype)
    out["logit_scale"] = torch.tensor(4.6052).to(dtype)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def schedule_buffers(sched, dtype):
    n = sched["num_train_timesteps"]
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.to(dtype), "alphas_cumprod": alphas_cumprod.to(dtype)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cfg = lambda c: json.load(open(os.path.join(a.model, c, "config.json")))  # noqa: E731
    unet_sd = load_file(os.path.join(a.model, "unet", "diffusion_pytorch_model.safetensors"))
    vae_sd = load_file(os.path.join(a.model, "vae", "diffusion_pytorch_model.safetensors"))
    te_sd = load_file(os.path.join(a.model, "text_encoder", "model.safetensors"))
    te_cfg = cfg("text_encoder")
    open_clip = te_cfg["hidden_act"] == "gelu"
    dtype = next(iter(unet_sd.values())).dtype
    state = {}
    state.update(convert_unet(unet_sd, cfg("unet")))
    state.update(convert_vae(vae_sd, cfg("vae")))
    state.update(convert_open_clip(te_sd, a.seed) if open_clip else convert_clip(te_sd))
    state.update(schedule_buffers(json.load(open(os.path.join(a.model, "scheduler", "scheduler_config.json"))), dtype))
    state = {k: v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {len(state)} tensors, {os.path.getsize(a.out)} bytes, {dtype}, {'OpenCLIP' if open_clip else 'CLIP'} text encoder")

    # Check with diffusers' own LDM -> diffusers conversion.
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None)
    back = StableDiffusionPipeline.from_single_file(a.out, config=os.path.abspath(a.model), torch_dtype=dtype, safety_checker=None)
    bad = 0
    for comp in ["unet", "vae", "text_encoder"]:
        want = getattr(ref, comp).state_dict()
        got = getattr(back, comp).state_dict()
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        diff = [k for k in want if k in got and not torch.equal(want[k], got[k].reshape(want[k].shape))]
        print(f"{comp}: {len(want)} tensors, missing {missing[:3]}, extra {extra[:3]}, different {diff[:3]}")
        bad += len(missing) + len(extra) + len(diff)
    if bad:
        sys.exit(f"round trip through from_single_file differs in {bad} tensors")
    print("round trip through diffusers' from_single_file: identical")


if __name__ == "__main__":
    main()
