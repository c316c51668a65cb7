"""Makes single-file checkpoints (original LDM / A1111 layout) from diffusers folders, and checks
them with diffusers' own loader.

    python tools/reference/make_single_file.py --model tests/fixtures/tiny-sd \
        --out tests/fixtures/single-file/tiny-sd.safetensors
    python tools/reference/make_single_file.py --model tests/fixtures/sd2-tiny \
        --out tests/fixtures/single-file/sd2-tiny.safetensors
    python tools/reference/make_single_file.py --model tests/fixtures/sdxl-tiny \
        --out tests/fixtures/single-file/sdxl-tiny.safetensors \
        [--diffusers-sdxl-script DIFFUSERS/scripts/convert_diffusers_to_original_sdxl.py]

The key maps are those of the public diffusers script
`scripts/convert_diffusers_to_original_stable_diffusion.py` (UNet, VAE, CLIP and OpenCLIP text
encoders), generalised from its hard-coded 2 layers per block to the folder's `layers_per_block`.
SD 2.x text encoders are written in OpenCLIP form (`cond_stage_model.model.*`, q/k/v fused into
`attn.in_proj_weight`/`in_proj_bias`), plus the `text_projection` and `logit_scale` real files carry.
Like real checkpoints, the file also holds the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...).
Tensors keep the folder's dtype (so an fp16 folder gives an fp16 file).

SDXL folders (a `text_encoder_2/`) are written in the SGM layout of `sd_xl_base_1.0.safetensors`, with the
key maps of `scripts/convert_diffusers_to_original_sdxl.py`: UNet `model.diffusion_model.*` (with
`label_emb.0.0`/`label_emb.0.2` = `add_embedding.linear_1`/`linear_2`), VAE `first_stage_model.*`, CLIP-L
`conditioner.embedders.0.transformer.text_model.*` (plus the int64 `embeddings.position_ids` [1, 77] buffer
the real file carries) and OpenCLIP bigG `conditioner.embedders.1.model.*`, whose `text_projection` is the
transpose of transformers' `text_projection.weight` (OpenCLIP computes `x @ text_projection`), plus
`logit_scale`. No schedule buffers: SGM checkpoints have no `betas`/`alphas_cumprod`. With
`--diffusers-sdxl-script` the UNet/VAE/OpenCLIP maps are also checked against that script's own functions.

Check: `StableDiffusionPipeline.from_single_file(out, config=model)` (diffusers' LDM -> diffusers
conversion) must give every UNet, VAE and text-encoder tensor of `from_pretrained(model)` exactly;
the script exits non-zero otherwise. For SDXL, `StableDiffusionXLPipeline` (both text encoders), and
also one `encode_prompt` and one UNet call must agree exactly; the keys diffusers never reads or drops
after conversion are printed.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    # SDXL's added (text_time) conditioning embedding.
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
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


def convert_clip(sd, prefix="cond_stage_model.transformer.", position_ids=False):
    out = {}
    for k, v in sd.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + k] = v
    if position_ids:
        # The persistent buffer of transformers < 4.31 that real SDXL files still carry (int64 [1, 77]).
        n = sd[next(k for k in sd if k.endswith("embeddings.position_embedding.weight"))].shape[0]
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


OPEN_CLIP = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".fc1.", ".c_fc."),
    (".fc2.", ".c_proj."),
    (".self_attn", ".attn"),
]


def convert_open_clip(sd, seed, prefix="cond_stage_model.model."):
    out = {}
    fused = {}
    sd = dict(sd)
    # CLIPTextModelWithProjection's Linear (no bias): pooled @ weight.T.
    projection = sd.pop("text_projection.weight", None)
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
    if projection is not None:
        # OpenCLIP computes pooled @ text_projection, so its [hidden, proj] parameter is weight.T.
        out["text_projection"] = projection.t().contiguous()
    else:
        # SD 2.x: the folder has no projection (the pipeline never uses it), real files have one.
        g = torch.Generator().manual_seed(seed)
        out["text_projection"] = torch.randn(hidden, hidden, generator=g).to(dtype)
    out["logit_scale"] = torch.tensor(4.6052).to(dtype)  # ln(100), as trained CLIPs have it
    return {prefix + k: v for k, v in out.items()}


def schedule_buffers(sched, dtype):
    n = sched["num_train_timesteps"]
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.to(dtype), "alphas_cumprod": alphas_cumprod.to(dtype)}


SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."


def is_sdxl(model):
    return os.path.isdir(os.path.join(model, "text_encoder_2"))


def load_folder(model):
    sd = lambda c, f: load_file(os.path.join(model, c, f))  # noqa: E731
    parts = {
        "unet": sd("unet", "diffusion_pytorch_model.safetensors"),
        "vae": sd("vae", "diffusion_pytorch_model.safetensors"),
        "text_encoder": sd("text_encoder", "model.safetensors"),
    }
    if is_sdxl(model):
        parts["text_encoder_2"] = sd("text_encoder_2", "model.safetensors")
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--diffusers-sdxl-script",
        help="path of diffusers' scripts/convert_diffusers_to_original_sdxl.py: cross-check the SDXL maps with it",
    )
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cfg = lambda c: json.load(open(os.path.join(a.model, c, "config.json")))  # noqa: E731
    parts = load_folder(a.model)
    sdxl = "text_encoder_2" in parts
    te_cfg = cfg("text_encoder")
    open_clip = te_cfg["hidden_act"] == "gelu"
    dtype = next(iter(parts["unet"].values())).dtype
    state = {}
    state.update(convert_unet(parts["unet"], cfg("unet")))
    state.update(convert_vae(parts["vae"], cfg("vae")))
    if sdxl:
        state.update(convert_clip(parts["text_encoder"], prefix=SDXL_TE1, position_ids=True))
        state.update(convert_open_clip(parts["text_encoder_2"], a.seed, prefix=SDXL_TE2))
    else:
        state.update(convert_open_clip(parts["text_encoder"], a.seed) if open_clip else convert_clip(parts["text_encoder"]))
        state.update(schedule_buffers(json.load(open(os.path.join(a.model, "scheduler", "scheduler_config.json"))), dtype))
    state = {k: v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, a.out)
    kind = "SDXL (CLIP-L + OpenCLIP)" if sdxl else ("OpenCLIP" if open_clip else "CLIP")
    print(f"wrote {a.out}: {len(state)} tensors, {os.path.getsize(a.out)} bytes, {dtype}, {kind} text encoder")

    if sdxl:
        describe_sdxl(state)
        bad = 0
        if a.diffusers_sdxl_script:
            bad += cross_check_sdxl_script(a.diffusers_sdxl_script, parts, state)
        bad += check_sdxl(a.out, os.path.abspath(a.model), state)
        if bad:
            sys.exit(f"SDXL single file check failed ({bad} problems)")
        return

    # Check with diffusers' own LDM -> diffusers conversion.
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None)
    back = StableDiffusionPipeline.from_single_file(a.out, config=os.path.abspath(a.model), torch_dtype=dtype, safety_checker=None)
    bad = 0
    for comp in ["unet", "vae", "text_encoder"]:
        bad += compare_state_dicts(comp, getattr(ref, comp).state_dict(), getattr(back, comp).state_dict())
    if bad:
        sys.exit(f"round trip through from_single_file differs in {bad} tensors")
    print("round trip through diffusers' from_single_file: identical")


def compare_state_dicts(comp, want, got):
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    diff = [k for k in want if k in got and not torch.equal(want[k], got[k].reshape(want[k].shape))]
    print(f"{comp}: {len(want)} tensors, missing {missing[:3]}, extra {extra[:3]}, different {diff[:3]}")
    return len(missing) + len(extra) + len(diff)


def describe_sdxl(state):
    """Prints the layout facts a loader needs: prefixes, OpenCLIP layer 0, text_projection, extras."""
    groups = {}
    for k in state:
        top = next((p for p in ("model.diffusion_model.", "first_stage_model.", SDXL_TE1, SDXL_TE2) if k.startswith(p)), k)
        groups[top] = groups.get(top, 0) + 1
    print("key prefixes:", json.dumps(groups))
    for k in sorted(state):
        if k.startswith(SDXL_TE2 + "transformer.resblocks.0.") or (k.startswith(SDXL_TE2) and ".resblocks." not in k):
            print(f"  {k} {list(state[k].shape)} {state[k].dtype}")
    print(f"  {SDXL_TE1}text_model.embeddings.position_ids {list(state[SDXL_TE1 + 'text_model.embeddings.position_ids'].shape)}"
          f" {state[SDXL_TE1 + 'text_model.embeddings.position_ids'].dtype}")


def load_module(path):
    spec = importlib.util.spec_from_file_location("convert_diffusers_to_original_sdxl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cross_check_sdxl_script(path, parts, state):
    """The UNet, VAE and OpenCLIP maps must equal those of diffusers' own diffusers -> SGM script."""
    mod = load_module(path)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per reshaped VAE attention weight
        theirs = {"model.diffusion_model." + k: v for k, v in mod.convert_unet_state_dict(parts["unet"]).items()}
        theirs.update({"first_stage_model." + k: v for k, v in mod.convert_vae_state_dict(parts["vae"]).items()})
    te2 = {SDXL_TE2 + k: v for k, v in mod.convert_openclip_text_enc_state_dict(parts["text_encoder_2"]).items()}
    te2[SDXL_TE2 + "text_projection"] = te2.pop(SDXL_TE2 + "text_projection.weight").T.contiguous()
    theirs.update(te2)
    # Its CLIP-L conversion is the identity; transformers 5 saves CLIPTextModel without `text_model.`, which the
    # real file (and diffusers' loader: `conditioner.embedders.0.transformer.text_model.*`) has.
    te1 = mod.convert_openai_text_enc_state_dict(parts["text_encoder"])
    theirs.update({SDXL_TE1 + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te1.items()})
    ours = {k: v for k, v in state.items() if not k.endswith(("position_ids", "logit_scale"))}
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    diff = [k for k in theirs if k in ours and not torch.equal(theirs[k], ours[k])]
    print(f"diffusers' convert_diffusers_to_original_sdxl.py: {len(theirs)} tensors; ours lack {missing[:3]}, "
          f"have more {extra[:3]}, differ {diff[:3]} (ours add position_ids and logit_scale)")
    return len(missing) + len(extra) + len(diff)


class ReadRecorder(dict):
    """A checkpoint dict that remembers which keys the loader read."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)


def check_sdxl(out, model, state):
    import diffusers.loaders.single_file as sf
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as su

    torch.set_num_threads(1)
    f32 = torch.float32
    ref = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=f32, add_watermarker=False)

    recorders = []
    load_checkpoint = sf.load_single_file_checkpoint

    def recording_load(*a, **k):
        recorders.append(ReadRecorder(load_checkpoint(*a, **k)))
        return recorders[-1]

    # diffusers tells OpenCLIP bigG from CLIP-L by `conditioner.embedders.0...position_embedding.weight` being in
    # the file *and* as wide as the model being built (768 vs 1280 in SDXL). sdxl-tiny's encoders are both 32 wide,
    # so for text_encoder_2 it would take the CLIP-L branch and load CLIP-L's weights. Hide embedders.0 from that
    # one call, so it takes the OpenCLIP branch (`convert_open_clip_checkpoint(prefix=conditioner.embedders.1.model.)`)
    # that a real SDXL file takes.
    make_clip = sf.create_diffusers_clip_model_from_ldm

    def make_clip_by_width(cls, checkpoint, subfolder="", **k):
        if subfolder == "text_encoder_2":
            view = ReadRecorder({n: t for n, t in checkpoint.items() if not n.startswith(SDXL_TE1)})
            model_ = make_clip(cls, view, subfolder=subfolder, **k)
            checkpoint.read |= view.read
            return model_
        return make_clip(cls, checkpoint, subfolder=subfolder, **k)

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("diffusers").addHandler(handler)
    logging.getLogger("transformers").addHandler(handler)
    sf.load_single_file_checkpoint = recording_load
    sf.create_diffusers_clip_model_from_ldm = make_clip_by_width
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            back = StableDiffusionXLPipeline.from_single_file(out, config=model, torch_dtype=f32, add_watermarker=False)
    finally:
        sf.load_single_file_checkpoint = load_checkpoint
        sf.create_diffusers_clip_model_from_ldm = make_clip
        logging.getLogger("diffusers").removeHandler(handler)
        logging.getLogger("transformers").removeHandler(handler)
    said = [line for line in log.getvalue().splitlines() if line.strip()] + [str(w.message) for w in caught]
    print("diffusers/transformers warnings while loading:", said or "none")

    bad = 0
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        bad += compare_state_dicts(comp, getattr(ref, comp).state_dict(), getattr(back, comp).state_dict())

    # Keys diffusers never reads, and keys it converts but then drops (not in the model's state dict).
    ckpt = recorders[0] if recorders else {}
    print("file keys diffusers never read:", sorted(set(state) - ckpt.read) if recorders else "(not recorded)")
    plain = dict(state)
    converted = {
        "unet": su.convert_ldm_unet_checkpoint(plain, back.unet.config),
        "vae": su.convert_ldm_vae_checkpoint(plain, back.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in su.convert_ldm_clip_checkpoint(plain).items()},
        "text_encoder_2": su.convert_open_clip_checkpoint(back.text_encoder_2, plain, prefix=SDXL_TE2),
    }
    for comp, conv in converted.items():
        dropped = sorted(set(conv) - set(getattr(back, comp).state_dict()))
        print(f"{comp}: converted keys dropped by the loader: {dropped}")

    # One encode_prompt and one UNet call.
    prompts = ["a red circle on a white background", ""]
    with torch.no_grad():
        e_ref = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        e_back = back.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        same = [torch.equal(e_ref[i], e_back[i]) for i in (0, 2)]
        print(f"encode_prompt: prompt_embeds {list(e_ref[0].shape)} equal {same[0]}, pooled {list(e_ref[2].shape)} equal {same[1]}")
        bad += same.count(False)
        c = ref.unet.config
        g = torch.Generator().manual_seed(1234)
        sample = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
        t = torch.tensor([10, 731])
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [80, 96, 8, 16, 64, 64]], dtype=f32)
        cond = {"text_embeds": e_ref[2], "time_ids": time_ids}
        o_ref = ref.unet(sample, t, e_ref[0], added_cond_kwargs=cond).sample
        o_back = back.unet(sample, t, e_back[0], added_cond_kwargs={"text_embeds": e_back[2], "time_ids": time_ids}).sample
        print(f"unet call: out {list(o_ref.shape)} equal {torch.equal(o_ref, o_back)}")
        bad += 0 if torch.equal(o_ref, o_back) else 1
    proj = state[SDXL_TE2 + "text_projection"]
    w = ref.text_encoder_2.text_projection.weight.to(proj.dtype)
    print(f"text_projection {list(proj.shape)}: equals text_projection.weight.T {torch.equal(proj, w.T)}, "
          f"equals text_projection.weight {torch.equal(proj, w)}; logit_scale {state[SDXL_TE2 + 'logit_scale'].item()} "
          f"(exp {math.exp(state[SDXL_TE2 + 'logit_scale'].item()):.2f})")
    if not bad:
        print("round trip through diffusers' StableDiffusionXLPipeline.from_single_file: identical")
    return bad


if __name__ == "__main__":
    main()
