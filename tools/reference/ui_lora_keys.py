"""The LoRA key names ComfyUI's and A1111's LoRA loaders accept, per model layout.

    /work/refenv/bin/python tools/reference/ui_lora_keys.py --comfy COMFYUI_DIR --webui WEBUI_DIR \
        > tests/fixtures/ui-lora-keys.json

COMFYUI_DIR is a ComfyUI checkout (or a folder with its comfy/lora.py and comfy/utils.py);
WEBUI_DIR a stable-diffusion-webui checkout (or a folder with extensions-builtin/Lora/networks.py).
The loaders' own functions are taken from those files at run time (parsed with `ast`, then run
with stand-ins for the modules they import that the key rules do not need), never copied here:
  - ComfyUI: `comfy.lora.model_lora_keys_unet`, `model_lora_keys_clip` and `load_lora` (what
    `comfy.sd.load_lora_for_models` calls), with `comfy.utils.unet_to_diffusers`;
  - A1111: `convert_diffusers_name_to_compvis` and the module lookup of `load_network` (the
    `network_layer_mapping` lookup with the `_[qkv]_proj` fallback), with `network_lora`'s rule
    that a module needs `lora_up.weight` and `lora_down.weight` (`alpha` optional).

The model layouts: the real module names of diffusers' `UNet2DConditionModel` and transformers'
`CLIPTextModel`, built on the meta device (no weights) from the configs of the fixtures
(`tests/fixtures/tiny-sd`, `tests/fixtures/sd2-tiny`) and of the real SD 1.5 and SD 2.1 models
(their published `unet/config.json` / `text_encoder/config.json` values, written below). The
original-layout (LDM) names each loader patches come from ComfyUI's own `unet_to_diffusers` map
and, for the text encoders, from the original layouts ComfyUI (`clip_l.transformer.` for SD 1.x,
`clip_h.transformer.` for SD 2.x) and A1111 (`transformer.` for CLIP, OpenCLIP's
`model.transformer.resblocks.N.attn` / `mlp.c_fc` / `mlp.c_proj` for SD 2.x) load.

Printed JSON: for each layout and loader, the sorted kohya stems (`lora_unet_...`, `lora_te_...`)
of every Linear / Conv2d module that loader maps onto a weight of the model (a file key is then
`<stem>.lora_down.weight`, `<stem>.lora_up.weight` or `<stem>.alpha`), the modules' diffusers names
(`modules`), where ComfyUI and A1111 disagree on the original-layout target (must be none), and
what each loader does with the reference script's diffusers file (`diffusers_file`).
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
    """Run the top-level assignments and the named functions of a Python file in `namespace`."""
    tree = ast.parse(open(path).read(), path)
    body = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign)) or (isinstance(n, ast.FunctionDef) and n.name in names)]
    missing = set(names) - {n.name for n in body if isinstance(n, ast.FunctionDef)}
    if missing:
        sys.exit(f"{path} has no {sorted(missing)}")
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace


def comfy_functions(comfy_dir):
    utils = types.SimpleNamespace(**{k: v for k, v in load_functions(os.path.join(comfy_dir, "comfy/utils.py"), ["unet_to_diffusers"], {}).items() if not k.startswith("__")})
    model_base = types.SimpleNamespace(**{n: type(n, (), {}) for n in ["SD3", "AuraFlow", "HunyuanDiT", "Flux", "HiDream", "ACEStep", "QwenImage", "Lumina2", "WAN21", "HunyuanVideo", "PixArt", "GenmoMochi", "LTXV", "HunyuanDiT1"]})
    comfy = types.SimpleNamespace(utils=utils, model_base=model_base, model_management=types.SimpleNamespace())
    ns = {"comfy": comfy, "logging": logging, "torch": torch}
    return load_functions(os.path.join(comfy_dir, "comfy/lora.py"), ["model_lora_keys_unet", "model_lora_keys_clip", "load_lora"], ns)


def webui_functions(webui_dir):
    return load_functions(os.path.join(webui_dir, "extensions-builtin/Lora/networks.py"), ["convert_diffusers_name_to_compvis"], {"re": re})


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
    down = cfg["down_block_types"]
    up = cfg["up_block_types"]
    transformer_depth = [depth if "CrossAttn" in down[x] else 0 for x in range(levels) for _ in range(per)]
    # Listed shallow level first; unet_to_diffusers pops from the end for up_blocks.0 (deepest).
    transformer_depth_output = [depth if "CrossAttn" in up[levels - 1 - x] else 0 for x in range(levels) for _ in range(per + 1)]
    return {
        "num_res_blocks": [per] * levels,
        "channel_mult": [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": depth,
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


def fixture_config(path):
    cfg = json.load(open(path))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--webui", required=True)
    ap.add_argument("--check", nargs="*", default=[], metavar="FILE", help="instead: load these LoRA files with ComfyUI's load_lora (and A1111's lookup for sd15/sd21) and print what is not loaded")
    ap.add_argument("--layout", default="tiny-sd", help="model layout for --check: tiny-sd, sd2-tiny, sd15, sd21")
    args = ap.parse_args()
    comfy = comfy_functions(args.comfy)
    webui = webui_functions(args.webui)

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


if __name__ == "__main__":
    main()
