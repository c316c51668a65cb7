"""The LoRA key names ComfyUI's and A1111's LoRA loaders accept, per model layout.

    /work/refenv/bin/python tools/reference/ui_lora_keys.py --comfy COMFYUI_DIR --webui WEBUI_DIR \
        > tests/fixtures/ui-lora-keys.json
    /work/refenv/bin/python tools/reference/ui_lora_keys.py --comfy COMFYUI_DIR --webui WEBUI_DIR --sdxl \
        > tests/fixtures/ui-lora-keys-sdxl.json

COMFYUI_DIR is a ComfyUI checkout (or a folder with its comfy/lora.py and comfy/utils.py);
WEBUI_DIR a stable-diffusion-webui checkout (or a folder with extensions-builtin/Lora/networks.py).
The loaders' own functions are taken from those files at run time (parsed with `ast`, then run
with stand-ins for the modules they import that the key rules do not need), never copied here:
  - ComfyUI: `comfy.lora.model_lora_keys_unet`, `model_lora_keys_clip` and `load_lora` (what
    `comfy.sd.load_lora_for_models` calls), with `comfy.utils.unet_to_diffusers` (and, for SDXL,
    `clip_text_transformers_convert`, which names OpenCLIP's weights in the transformers layout);
  - A1111: `convert_diffusers_name_to_compvis` and the module lookup of `load_network` (the
    `network_layer_mapping` lookup with the `_[qkv]_proj` fallback), with `network_lora`'s rule
    that a module needs `lora_up.weight` and `lora_down.weight` (`alpha` optional). For SDXL the
    whole `load_network` runs (its `lora_unet` -> `diffusion_model` and `lora_te1_text_model` ->
    `0_transformer_text_model` fallbacks are the SDXL rules), on a stand-in `network_layer_mapping`.

The model layouts: the real module names of diffusers' `UNet2DConditionModel` and transformers'
`CLIPTextModel`, built on the meta device (no weights) from the configs of the fixtures
(`tests/fixtures/tiny-sd`, `tests/fixtures/sd2-tiny`) and of the real SD 1.5 and SD 2.1 models
(their published `unet/config.json` / `text_encoder/config.json` values, written below). The
original-layout (LDM) names each loader patches come from ComfyUI's own `unet_to_diffusers` map
and, for the text encoders, from the original layouts ComfyUI (`clip_l.transformer.` for SD 1.x,
`clip_h.transformer.` for SD 2.x) and A1111 (`transformer.` for CLIP, OpenCLIP's
`model.transformer.resblocks.N.attn` / `mlp.c_fc` / `mlp.c_proj` for SD 2.x) load.

SDXL (`--sdxl`, printed instead of the above): the real SDXL base 1.0 configs and those of the
`tests/fixtures/sdxl-tiny` fixture (written below; a fixture folder whose configs give another
module tree is reported on stderr), UNet2DConditionModel + CLIPTextModel +
CLIPTextModelWithProjection. The stems tried, each naming one diffusers module: the UNet's in both
schemes people's files use (diffusers-derived `lora_unet_down_blocks_...`, as diffusers'
`convert_state_dict_to_kohya` writes, and the original-layout `lora_unet_input_blocks_...` that
kohya sd-scripts writes for SDXL; the original name of each module from ComfyUI's
`unet_to_diffusers`, checked against diffusers' `convert_ldm_unet_checkpoint`), `lora_te1_`,
`lora_te_` (the SD 1.x prefix) and `lora_te2_`. A1111's model: embedder 0's
`transformer.text_model...`, embedder 1's OpenCLIP `model.transformer.resblocks.N.attn`
(a MultiheadAttention), `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`, and
`diffusion_model.<original layout>`. Each stem a loader maps is named back to the diffusers
module it patches (`wrong_module` lists those that land elsewhere: must be none).

Printed JSON (SD 1.x / 2.x): for each layout and loader, the sorted kohya stems (`lora_unet_...`,
`lora_te_...`) of every Linear / Conv2d module that loader maps onto a weight of the model (a file
key is then `<stem>.lora_down.weight`, `<stem>.lora_up.weight` or `<stem>.alpha`), the modules'
diffusers names (`modules`), where ComfyUI and A1111 disagree on the original-layout target (must
be none), and what each loader does with the reference script's diffusers file (`diffusers_file`).
For SDXL: `stems` (per naming: stem -> diffusers module), `comfyui` / `a1111` (the stems each maps
onto that same module), `not_loaded`, `wrong_module`, `a1111_fused_attention` (OpenCLIP attention
stems A1111 applies only as a complete q/k/v/out set), `counts`, `checks`; tests/fixtures/README.md
describes every field. `--check` works for `--layout sdxl` / `sdxl-tiny` too.
"""
import argparse
import ast
import json
import logging
import os
import re
import sys
import types

import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
# (only the keys that shape the module tree; everything else is diffusers' default).
SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    sample_size=64,
)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu", projection_dim=512)


def load_functions(path, names, namespace):
    """Run the top-level assignments and the named functions of a Python file in `namespace`.

    An assignment that needs a module the key rules do not use (a NameError or AttributeError on
    one of the stand-ins, e.g. A1111's `module_types = [network_lora.ModuleTypeLora(), ...]` or
    ComfyUI's `MMDIT_MAP_BASIC`, built with a function not loaded here) is skipped; the named
    functions must all be there and load."""
    tree = ast.parse(open(path).read(), path)
    missing = set(names) - {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if missing:
        sys.exit(f"{path} has no {sorted(missing)}")
    for n in tree.body:
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            try:
                exec(compile(ast.Module(body=[n], type_ignores=[]), path, "exec"), namespace)
            except (NameError, AttributeError):
                pass
        elif isinstance(n, ast.FunctionDef) and n.name in names:
            exec(compile(ast.Module(body=[n], type_ignores=[]), path, "exec"), namespace)
    return namespace


def comfy_functions(comfy_dir):
    utils = types.SimpleNamespace(**{k: v for k, v in load_functions(os.path.join(comfy_dir, "comfy/utils.py"), ["unet_to_diffusers", "transformers_convert", "clip_text_transformers_convert"], {}).items() if not k.startswith("__")})
    model_base = types.SimpleNamespace(**{n: type(n, (), {}) for n in ["SD3", "AuraFlow", "HunyuanDiT", "Flux", "HiDream", "ACEStep", "QwenImage", "Lumina2", "WAN21", "HunyuanVideo", "PixArt", "GenmoMochi", "LTXV", "HunyuanDiT1"]})
    comfy = types.SimpleNamespace(utils=utils, model_base=model_base, model_management=types.SimpleNamespace())
    ns = {"comfy": comfy, "logging": logging, "torch": torch}
    return load_functions(os.path.join(comfy_dir, "comfy/lora.py"), ["model_lora_keys_unet", "model_lora_keys_clip", "load_lora"], ns)


class A1111Network:
    """Stand-in for A1111's `network.Network`: what `load_network` fills in."""

    def __init__(self, name, network_on_disk):
        self.name = name
        self.modules = {}


class A1111LoraType:
    """A1111's `network_lora.ModuleTypeLora.create_module` (a LoRA needs `lora_up.weight` and
    `lora_down.weight`) with `NetworkModuleLora.create_module`'s check of the layer it matched:
    Linear (also MultiheadAttention's `NonDynamicallyQuantizableLinear`), MultiheadAttention or
    Conv2d, anything else an AssertionError (which fails the whole file)."""

    def create_module(self, net, weights):
        if not all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return None
        if weights.sd_module.kind not in ("Linear", "MultiheadAttention", "Conv2d"):
            raise AssertionError(f"Lora layer {weights.network_key} matched a layer with unsupported type: {weights.sd_module.kind}")
        return types.SimpleNamespace(sd_key=weights.sd_key, network_key=weights.network_key, sd_module=weights.sd_module)


def webui_functions(webui_dir):
    # Stand-ins for what `load_network` touches besides the key rules: the file is read by
    # `sd_models.read_state_dict` and the model is `shared.sd_model` (both set per call, see
    # a1111_load), `network.Network` / `NetworkWeights` hold the result, and `module_types`
    # is the LoRA type only.
    ns = {
        "re": re,
        "os": types.SimpleNamespace(path=types.SimpleNamespace(getmtime=lambda f: 0.0)),
        "logging": types.SimpleNamespace(debug=lambda *a, **k: None),
        "network": types.SimpleNamespace(Network=A1111Network, NetworkWeights=lambda **kw: types.SimpleNamespace(**kw)),
    }
    ns = load_functions(os.path.join(webui_dir, "extensions-builtin/Lora/networks.py"), ["convert_diffusers_name_to_compvis", "load_network"], ns)
    ns["module_types"] = [A1111LoraType()]
    return ns


def meta_models(unet_cfg, text_cfg):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return unet, text


def lora_modules(model):
    """Diffusers / transformers names of the Linear and Conv2d modules (what a LoRA can adapt)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def text_module_names(text):
    """Text-encoder module names from `text_model.` on (transformers 5 drops that level)."""
    out = []
    for n in lora_modules(text):
        if not n.startswith("text_model."):
            n = "text_model." + n
        out.append(n)
    return sorted(out)


def comfy_unet_config(cfg):
    """ComfyUI's `unet_config` keys that `unet_to_diffusers` reads, for a diffusers UNet config."""
    levels = len(cfg["block_out_channels"])
    per = cfg.get("layers_per_block", 2)
    depth = cfg.get("transformer_layers_per_block", 1)
    # SDXL gives one depth per level (diffusers: the up blocks take the same list reversed, the
    # mid block its last entry).
    at = (lambda x: depth[x]) if isinstance(depth, list) else (lambda x: depth)
    down = cfg["down_block_types"]
    up = cfg["up_block_types"]
    transformer_depth = [at(x) if "CrossAttn" in down[x] else 0 for x in range(levels) for _ in range(per)]
    # Listed shallow level first; unet_to_diffusers pops from the end for up_blocks.0 (deepest).
    transformer_depth_output = [at(x) if "CrossAttn" in up[levels - 1 - x] else 0 for x in range(levels) for _ in range(per + 1)]
    return {
        "num_res_blocks": [per] * levels,
        "channel_mult": [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": at(levels - 1),
    }


class FakeModel:
    def __init__(self, keys, unet_config=None):
        self._keys = keys
        self.model_config = types.SimpleNamespace(unet_config=unet_config)

    def state_dict(self):
        return dict.fromkeys(self._keys)


class FakeTensor:
    def item(self):
        return 1.0

    def tolist(self):
        return []


def kohya_stem(prefix, name):
    return prefix + name.replace(".", "_")


def layout(name, unet_cfg, text_cfg, comfy, webui, v2):
    unet, text = meta_models(unet_cfg, text_cfg)
    unet_modules, text_modules = lora_modules(unet), text_module_names(text)
    d2ldm = comfy["comfy"].utils.unet_to_diffusers(comfy_unet_config(unet_cfg))
    ldm_unet_keys = ["diffusion_model." + v for v in d2ldm.values()]
    clip_prefix = "clip_h.transformer." if v2 else "clip_l.transformer."
    clip_keys = [clip_prefix + k for k, _ in ((n if n.startswith("text_model.") else "text_model." + n, p) for n, p in text.named_parameters())]
    key_map = {}
    key_map = comfy["model_lora_keys_unet"](FakeModel(ldm_unet_keys, comfy_unet_config(unet_cfg)), key_map)
    key_map = comfy["model_lora_keys_clip"](FakeModel(clip_keys), key_map)

    candidates = [(kohya_stem("lora_unet_", m), m, "unet") for m in unet_modules] + [(kohya_stem("lora_te_", m), m, "te") for m in text_modules]
    comfy_ok = {}
    for stem, module, part in candidates:
        target = key_map.get(stem)
        # ComfyUI patches only keys its model has (ModelPatcher.add_patches).
        if target is not None and (target in ldm_unet_keys or target in clip_keys):
            comfy_ok[stem] = target

    # A1111: the module names of the original-layout model, `.` -> `_`.
    ldm_modules = {k.rsplit(".", 1)[0].replace(".", "_") for k in ldm_unet_keys}
    if v2:
        for i in range(text_cfg["num_hidden_layers"]):
            for m in ["attn", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]:
                ldm_modules.add(f"model.transformer.resblocks.{i}.{m}".replace(".", "_"))
    else:
        ldm_modules |= {("transformer." + n).replace(".", "_") for n in text_modules}
    a1111_ok = {}
    for stem, module, part in candidates:
        key = webui["convert_diffusers_name_to_compvis"](stem, v2)
        if key in ldm_modules:
            a1111_ok[stem] = key
        else:
            m = webui["re_x_proj"].match(key)
            if m and m.group(1) in ldm_modules:
                a1111_ok[stem] = m.group(1)
    # Where both map a UNet module, they must name the same original-layout weight.
    disagree = sorted(s for s in set(comfy_ok) & set(a1111_ok) if s.startswith("lora_unet_") and comfy_ok[s][: -len(".weight")].replace(".", "_") != a1111_ok[s])
    # The tiny model also exists as an original-layout single file (made by diffusers' own
    # conversion, tools/reference/make_single_file.py): ComfyUI's targets must be its tensors.
    single = os.path.join(ROOT, "tests/fixtures/single-file", name + ".safetensors")
    missing = None
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            have = set(f.keys())
        missing = sorted(t for s, t in comfy_ok.items() if s.startswith("lora_unet_") and "model." + t not in have)
    return {
        "comfyui_targets_not_in_single_file": missing,
        "modules": {"unet": unet_modules, "text_encoder": text_modules},
        "comfyui": sorted(comfy_ok),
        "a1111": sorted(a1111_ok),
        "comfyui_a1111_disagree": disagree,
    }, key_map, ldm_modules


def run_comfy_load(comfy, key_map, keys):
    """ComfyUI's load_lora on a file's key names: (patched targets, keys it reports not loaded)."""
    lost = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("lora key not loaded: "):
                lost.append(msg[len("lora key not loaded: "):])

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy["load_lora"]({k: FakeTensor() for k in keys}, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    return len(patches), sorted(lost)


def run_a1111_load(webui, ldm_modules, keys, v2):
    """A1111's load_network lookup on a file's key names: the keys it cannot match."""
    failed = []
    for k in keys:
        stem, _, _ = k.partition(".")
        key = webui["convert_diffusers_name_to_compvis"](stem, v2)
        if key in ldm_modules:
            continue
        m = webui["re_x_proj"].match(key)
        if m and m.group(1) in ldm_modules:
            continue
        if "lora_unet" in stem and stem.replace("lora_unet", "diffusion_model") in ldm_modules:
            continue
        failed.append(k)
    return sorted(failed)


# --------------------------------------------------------------------------------------------
# SDXL (`--sdxl`): two text encoders, kohya names in both UNet schemes.

# Published configs of stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/,
# text_encoder_2/; only the keys that shape the module tree).
SDXL_UNET = dict(
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], sample_size=128,
)
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
# tests/fixtures/sdxl-tiny: SDXL's block layout, small (text_embeds 32 + 6 * 8 time ids = 80).
SDXL_TINY_UNET = dict(
    SDXL_UNET, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, sample_size=32,
)
SDXL_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=32)
SDXL_TINY_TEXT_2 = dict(SDXL_TINY_TEXT, hidden_act="gelu")
# What decides the module names (and so the keys): a fixture folder that differs here is reported.
UNET_SHAPE_KEYS = ["block_out_channels", "layers_per_block", "transformer_layers_per_block", "down_block_types", "up_block_types", "use_linear_projection", "addition_embed_type"]
LORA_KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class Layer:
    """A module of A1111's `network_layer_mapping`: its kind is all `load_network` looks at."""

    def __init__(self, kind):
        self.kind = kind


def text_name(n):
    """A text-encoder module or weight name from `text_model.` on, as kohya stems and ComfyUI /
    A1111 name it (transformers 5's CLIPTextModel drops that level from its module tree and from the
    weights it saves; `text_projection` of CLIPTextModelWithProjection sits beside it)."""
    return n if n.startswith(("text_model.", "text_projection")) else "text_model." + n


def module_kinds(model, rename=lambda n: n):
    """{name: Linear | Conv2d | other} for every module that holds weights of its own."""
    out = {}
    for n, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        out[rename(n)] = "Linear" if isinstance(m, torch.nn.Linear) else "Conv2d" if isinstance(m, torch.nn.Conv2d) else "other"
    return out


def a1111_load(webui, mapping, keys):
    """A1111's `load_network` on a file holding `keys`, against a model whose
    `network_layer_mapping` is `mapping`: ({key: matched network module}, error or None)."""
    webui["shared"] = types.SimpleNamespace(sd_model=types.SimpleNamespace(network_layer_mapping=mapping))
    webui["sd_models"] = types.SimpleNamespace(read_state_dict=lambda filename: {k: FakeTensor() for k in keys})
    try:
        net = webui["load_network"]("check", types.SimpleNamespace(filename="check"))
    except AssertionError as e:
        return {}, str(e)
    return net.modules, None


def a1111_fused(mapping, key):
    """Is `key` one of the q/k/v/out LoRAs A1111 applies to a MultiheadAttention (OpenCLIP's) as a
    whole? `network_apply_weights` does that only when all four of the layer are loaded; a
    MultiheadAttention never calls its out_proj's forward, so nothing else applies them."""
    for suffix in ("_q_proj", "_k_proj", "_v_proj", "_out_proj"):
        if key.endswith(suffix) and getattr(mapping.get(key[: -len(suffix)]), "kind", None) == "MultiheadAttention":
            return key[: -len(suffix)]
    return None


def a1111_check_keys(webui, mapping, keys):
    """A1111 on a file: (matched {stem: key}, keys not matched, errors, stems loaded but never
    applied: q/k/v/out of an attention layer that lacks one of the four)."""
    by_stem = {}
    for k in keys:
        by_stem.setdefault(k.partition(".")[0], []).append(k)
    matched, lost, errors = {}, [], {}
    for stem, ks in sorted(by_stem.items()):
        modules, err = a1111_load(webui, mapping, ks)
        if err:
            errors[stem] = err
        elif modules:
            (key,) = modules
            matched[stem] = key
        else:
            lost += ks
    fused = {}
    for stem, key in matched.items():
        layer = a1111_fused(mapping, key)
        if layer:
            fused.setdefault(layer, {})[key[len(layer):]] = stem
    not_applied = sorted(s for parts in fused.values() if len(parts) < 4 for s in parts.values())
    return matched, sorted(lost), errors, not_applied


def sdxl_layout(name, unet_cfg, te_cfg, te2_cfg, comfy, webui):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    utils = comfy["comfy"].utils
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        te1 = CLIPTextModel(CLIPTextConfig(**te_cfg))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    kinds = {"unet": module_kinds(unet), "te1": module_kinds(te1, text_name), "te2": module_kinds(te2, text_name)}
    lin = {c: sorted(n for n, k in v.items() if k != "other") for c, v in kinds.items()}
    assert lin["unet"] == lora_modules(unet)
    unet_params = {n for n, _ in unet.named_parameters()}
    te1_params = [text_name(n) for n, _ in te1.named_parameters()]
    te2_params = [text_name(n) for n, _ in te2.named_parameters()]

    # The original (SGM/LDM) UNet layout of ComfyUI's checkpoints, A1111's `sd_model.model` and
    # kohya sd-scripts' SDXL names: ComfyUI's unet_to_diffusers, checked against diffusers' own
    # conversion of an original-layout checkpoint (convert_ldm_unet_checkpoint) on the same names.
    ccfg = comfy_unet_config(unet_cfg)
    d2sgm = {k: v for k, v in utils.unet_to_diffusers(ccfg).items() if k in unet_params}
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + v: v for v in d2sgm.values()}, unet_cfg)
    sgm = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in d2sgm.items() if k.endswith(".weight")}

    # text_encoder_2 in OpenCLIP's layout (A1111's `conditioner.embedders[1].wrapped.model`, SDXL
    # checkpoints' `conditioner.embedders.1.model.`): its weights, named back by ComfyUI's
    # clip_text_transformers_convert (the split of `attn.in_proj_weight` into q, k, v rows).
    oc = ["positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection"]
    for i in range(te2_cfg["num_hidden_layers"]):
        b = f"transformer.resblocks.{i}."
        oc += [b + m + "." + p for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj") for p in ("weight", "bias")]
        oc += [b + "attn.in_proj_weight", b + "attn.in_proj_bias"]
    hf2oc = {k: oc[int(v.flatten()[0])] for k, v in utils.clip_text_transformers_convert({k: torch.full((3, 1), i) for i, k in enumerate(oc)}, "", "").items()}

    # A1111's network_layer_mapping for an SDXL model: `{i}_` + the embedders' module names
    # (embedder 0: sgm FrozenCLIPEmbedder, `transformer.` = transformers' CLIPTextModel; embedder
    # 1: FrozenOpenCLIPEmbedder2, `model.` = open_clip's model, whose attention is a
    # MultiheadAttention and whose text_projection is a bare parameter), then the UNet's; `.` -> `_`.
    mapping, a1111_module = {}, {}

    def add(prefix, dotted, kind, module=None):
        parts = dotted.split(".")
        for j in range(1, len(parts)):
            mapping.setdefault(prefix + "_".join(parts[:j]), Layer("container"))
        mapping[prefix + "_".join(parts)] = Layer(kind)
        if module:
            a1111_module[prefix + "_".join(parts)] = module

    for m, s in sgm.items():
        add("", "diffusion_model." + s, kinds["unet"][m], m)
    for m, kind in kinds["te1"].items():
        add("0_", "transformer." + m, kind, "text_encoder." + m)
    for m, kind in kinds["te2"].items():
        o = hf2oc.get(m + ".weight")
        if o is None or not o.endswith("weight"):
            continue  # text_projection: a parameter of the model, no module
        if o.endswith(".in_proj_weight"):
            attn = "model." + o[: -len(".in_proj_weight")]
            add("1_", attn, "MultiheadAttention")
            a1111_module["1_" + attn.replace(".", "_") + "_" + m.rsplit(".", 1)[-1]] = "text_encoder_2." + m
        else:
            add("1_", "model." + o[: -len(".weight")], "Linear" if m.endswith("out_proj") else kind, "text_encoder_2." + m)

    # ComfyUI: the model's state dict (`diffusion_model.` + the original layout) and the CLIP's
    # (`clip_l.transformer.` / `clip_g.transformer.` + the transformers layout; ComfyUI's own
    # CLIPTextModel, comfy/clip_model.py, has a text_projection Linear for clip_l too).
    unet_keys = ["diffusion_model." + v for v in d2sgm.values()]
    clip_keys = ["clip_l.transformer." + n for n in te1_params + ["text_projection.weight"]] + ["clip_g.transformer." + n for n in te2_params]
    key_map = comfy["model_lora_keys_unet"](FakeModel(unet_keys, ccfg), {})
    key_map = comfy["model_lora_keys_clip"](FakeModel(clip_keys), key_map)
    comfy_keys = set(unet_keys) | set(clip_keys)
    comfy_module = {f"diffusion_model.{s}.weight": m for m, s in sgm.items()}
    comfy_module.update({f"clip_l.transformer.{m}.weight": "text_encoder." + m for m in kinds["te1"]})
    comfy_module.update({f"clip_g.transformer.{m}.weight": "text_encoder_2." + m for m in kinds["te2"]})

    def comfy_target(stem):
        t = key_map.get(stem)
        if t is None or t not in comfy_keys:  # ComfyUI patches only keys its model has
            return None
        return comfy_module.get(t, t)

    a1111_errors = {}

    def a1111_target(stem):
        modules, err = a1111_load(webui, mapping, [stem + s for s in LORA_KEY_SUFFIXES])
        if err:
            a1111_errors[stem] = err
        if not modules:
            return None, None
        (key,) = modules
        return a1111_module.get(key, key), key

    # The stems people's files use, each naming one diffusers module.
    stems = {
        "unet_diffusers": {kohya_stem("lora_unet_", m): m for m in lin["unet"]},
        "unet_sgm": {kohya_stem("lora_unet_", sgm[m]): m for m in lin["unet"]},
        "text_encoder": {kohya_stem("lora_te1_", m): "text_encoder." + m for m in lin["te1"]},
        "text_encoder_as_lora_te": {kohya_stem("lora_te_", m): "text_encoder." + m for m in lin["te1"]},
        "text_encoder_2": {kohya_stem("lora_te2_", m): "text_encoder_2." + m for m in lin["te2"]},
    }
    flat = {}
    for group in stems.values():
        assert not set(group) & set(flat)
        flat.update(group)
    comfy_got = {s: comfy_target(s) for s in flat}
    a1111_got, a1111_key = {}, {}
    for s in flat:
        a1111_got[s], a1111_key[s] = a1111_target(s)
    loads = {
        "comfyui": sorted(s for s in flat if comfy_got[s] == flat[s]),
        "a1111": sorted(s for s in flat if a1111_got[s] == flat[s]),
    }
    # Names that are not one of the above, and what each loader does with them.
    others = [
        "lora_te1_encoder_layers_0_self_attn_q_proj",  # transformers 5's module path of CLIPTextModel
        "lora_te1_text_projection",
        "lora_te_text_projection",
    ]
    # The reference script's diffusers file (the same naming rule as for SD): UNet attention
    # projections, `unet.<module>.lora.{down,up}.weight`.
    targets = [m for m in lin["unet"] if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0")]
    dkeys = sorted(f"unet.{m}.lora.{h}.weight" for m in targets for h in ("down", "up"))
    patched, lost = run_comfy_load(comfy, key_map, dkeys)
    _, a_lost, a_err, _ = a1111_check_keys(webui, mapping, dkeys)
    single = os.path.join(ROOT, "tests/fixtures/single-file", name + ".safetensors")
    missing = None
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            have = set(f.keys())
        missing = sorted(key_map[s] for s in loads["comfyui"] if s.startswith("lora_unet_") and "model." + key_map[s] not in have)
    entry = {
        "modules": {"unet": lin["unet"], "text_encoder": ["text_encoder." + m for m in lin["te1"]], "text_encoder_2": ["text_encoder_2." + m for m in lin["te2"]]},
        "stems": stems,
        "comfyui": loads["comfyui"],
        "a1111": loads["a1111"],
        "not_loaded": {"comfyui": sorted(s for s in flat if comfy_got[s] is None), "a1111": sorted(s for s in flat if a1111_got[s] is None)},
        "wrong_module": {
            "comfyui": {s: g for s, g in comfy_got.items() if g is not None and g != flat[s]},
            "a1111": {s: g for s, g in a1111_got.items() if g is not None and g != flat[s]},
        },
        "comfyui_a1111_disagree": sorted(s for s in flat if comfy_got[s] and a1111_got[s] and comfy_got[s] != a1111_got[s]),
        "a1111_errors": a1111_errors,
        "a1111_fused_attention": sorted(s for s in loads["a1111"] if a1111_fused(mapping, a1111_key[s])),
        "counts": {g: {"stems": len(v), "comfyui": sum(s in loads["comfyui"] for s in v), "a1111": sum(s in loads["a1111"] for s in v)} for g, v in stems.items()},
        "other_stems": {s: {"comfyui": comfy_target(s), "a1111": a1111_target(s)[0]} for s in others},
        "checks": {
            "unet_weights_without_sgm_name": sorted(unet_params - set(d2sgm)),
            "sgm_names_diffusers_conversion_disagrees": sorted(k for k in set(converted) | set(d2sgm) if converted.get(k) != d2sgm.get(k)),
            "text_encoder_2_weights_without_openclip_name": sorted(set(te2_params) ^ set(hf2oc)),
        },
        "diffusers_file": {
            "tensors": len(dkeys),
            "comfyui_modules_patched": patched,
            "comfyui_keys_not_loaded": len(lost),
            "a1111_keys_not_matched": len(a_lost),
        },
        "comfyui_targets_not_in_single_file": missing,
    }
    return entry, key_map, mapping


def sdxl_layouts():
    fx = os.path.join(ROOT, "tests/fixtures/sdxl-tiny")
    tiny = (SDXL_TINY_UNET, SDXL_TINY_TEXT, SDXL_TINY_TEXT_2)
    if os.path.isdir(fx):
        # The fixture's own configs must give the same module tree as the values above.
        got = [fixture_config(f"{fx}/{c}/config.json") for c in ("unet", "text_encoder", "text_encoder_2") if os.path.isfile(f"{fx}/{c}/config.json")]
        if len(got) == 3:
            diff = [k for k in UNET_SHAPE_KEYS if got[0].get(k) != tiny[0].get(k)]
            diff += [f"{c}.num_hidden_layers" for c, g, t in zip(("text_encoder", "text_encoder_2"), got[1:], tiny[1:]) if g.get("num_hidden_layers") != t["num_hidden_layers"]]
            diff += ["text_encoder_2 (not CLIPTextModelWithProjection)"] if got[2].get("architectures") not in (None, ["CLIPTextModelWithProjection"]) else []
            if diff:
                print(f"warning: {fx} differs from SDXL_TINY_* in {diff}; the keys listed are those of SDXL_TINY_*", file=sys.stderr)
    return {"sdxl": (SDXL_UNET, SDXL_TEXT, SDXL_TEXT_2), "sdxl-tiny": tiny}


def fixture_config(path):
    cfg = json.load(open(path))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--webui", required=True)
    ap.add_argument("--sdxl", action="store_true", help="the SDXL layouts (sdxl, sdxl-tiny) instead of SD 1.x / 2.x")
    ap.add_argument("--check", nargs="*", default=[], metavar="FILE", help="instead: load these LoRA files with ComfyUI's load_lora (and A1111's lookup for sd15/sd21/sdxl/sdxl-tiny) and print what is not loaded")
    ap.add_argument("--layout", default="tiny-sd", help="model layout for --check: tiny-sd, sd2-tiny, sd15, sd21, sdxl, sdxl-tiny")
    args = ap.parse_args()
    comfy = comfy_functions(args.comfy)
    webui = webui_functions(args.webui)
    if args.sdxl or args.layout in ("sdxl", "sdxl-tiny"):
        sys.exit(main_sdxl(args, comfy, webui))

    fx = os.path.join(ROOT, "tests/fixtures")
    layouts = {
        "tiny-sd": (fixture_config(f"{fx}/tiny-sd/unet/config.json"), fixture_config(f"{fx}/tiny-sd/text_encoder/config.json"), False),
        "sd2-tiny": (fixture_config(f"{fx}/sd2-tiny/unet/config.json"), fixture_config(f"{fx}/sd2-tiny/text_encoder/config.json"), True),
        "sd15": (SD15_UNET, SD15_TEXT, False),
        "sd21": (SD21_UNET, SD21_TEXT, True),
    }
    if args.check:
        u, t, v2 = layouts[args.layout]
        _, key_map, ldm_modules = layout(args.layout, u, t, comfy, webui, v2)
        bad = False
        for path in args.check:
            with safe_open(path, "pt") as f:
                keys = sorted(f.keys())
            patched, lost = run_comfy_load(comfy, key_map, keys)
            report = {"file": path, "tensors": len(keys), "comfyui_modules_patched": patched, "comfyui_keys_not_loaded": lost}
            if args.layout in ("sd15", "sd21"):
                report["a1111_keys_not_matched"] = run_a1111_load(webui, ldm_modules, keys, v2)
            print(json.dumps(report))
            bad |= bool(lost) or bool(report.get("a1111_keys_not_matched"))
        sys.exit(1 if bad else 0)
    out = {"layouts": {}}
    for name, (u, t, v2) in layouts.items():
        entry, key_map, ldm_modules = layout(name, u, t, comfy, webui, v2)
        # The reference script's diffusers file: its own key names (the golden for tiny-sd, the same
        # naming rule for the others), UNet attention projections as the script targets them.
        if name == "tiny-sd":
            with safe_open(f"{fx}/golden/lora-diffusers/pytorch_lora_weights.safetensors", "pt") as f:
                dkeys = sorted(f.keys())
        else:
            targets = [m for m in entry["modules"]["unet"] if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0")]
            dkeys = sorted(f"unet.{m}.lora.{h}.weight" for m in targets for h in ("down", "up"))
        patched, lost = run_comfy_load(comfy, key_map, dkeys)
        entry["diffusers_file"] = {
            "tensors": len(dkeys),
            "comfyui_modules_patched": patched,
            "comfyui_keys_not_loaded": len(lost),
            "a1111_keys_not_matched": len(run_a1111_load(webui, ldm_modules, dkeys, v2)) if name in ("sd15", "sd21") else None,
        }
        if name in ("tiny-sd", "sd2-tiny"):
            # A1111's conversion hard-codes SD's two resnets per level (`1 + block * 3 + index`), so
            # it cannot map a tiny layout (one per level); only ComfyUI's list is meaningful here.
            entry.pop("a1111")
            entry.pop("comfyui_a1111_disagree")
            entry["modules"] = None
        out["layouts"][name] = entry
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


def main_sdxl(args, comfy, webui):
    layouts = sdxl_layouts()
    if args.check:
        u, t, t2 = layouts[args.layout]
        _, key_map, mapping = sdxl_layout(args.layout, u, t, t2, comfy, webui)
        bad = False
        for path in args.check:
            with safe_open(path, "pt") as f:
                keys = sorted(f.keys())
            patched, lost = run_comfy_load(comfy, key_map, keys)
            _, a_lost, a_err, not_applied = a1111_check_keys(webui, mapping, keys)
            report = {
                "file": path, "tensors": len(keys), "comfyui_modules_patched": patched, "comfyui_keys_not_loaded": lost,
                "a1111_keys_not_matched": a_lost, "a1111_errors": a_err, "a1111_loaded_not_applied": not_applied,
            }
            print(json.dumps(report))
            bad |= bool(lost or a_lost or a_err or not_applied)
        return 1 if bad else 0
    out = {"layouts": {name: sdxl_layout(name, u, t, t2, comfy, webui)[0] for name, (u, t, t2) in layouts.items()}}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    main()
