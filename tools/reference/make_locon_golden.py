"""Golden for kohya sd-scripts' conv LoRA ("LoCon": `--network_module networks.lora --network_args
conv_dim=N conv_alpha=M`), made with kohya's own networks/lora.py, and the check that ComfyUI and A1111
map every key it writes (from tests/fixtures/ui-lora-keys*.json).

    nice -n 19 /work/refenv/bin/python tools/reference/make_locon_golden.py --sd-scripts SD_SCRIPTS_DIR

SD_SCRIPTS_DIR holds kohya's `networks/lora.py` and `library/` (e.g. `git --git-dir=<mirror> archive HEAD
networks/lora.py library/ | tar -x -C /tmp/kohya`; the golden was made at sd-scripts 48d368fa). They are
imported as they are, with stand-ins for `cv2` and `einops`, which building the networks does not use.

What kohya does (networks/lora.py, `LoRANetwork.__init__` / `create_modules` / `LoRAModule`):
  - UNet targets: every Linear / Conv2d child (any depth) of modules whose class is `Transformer2DModel`;
    with conv_dim set (or conv_block_dims, or when loading weights) ALSO of `ResnetBlock2D`,
    `Downsample2D`, `Upsample2D`. Rank/alpha per child: Linear or 1x1 Conv2d -> network_dim /
    network_alpha (so `time_emb_proj` and `conv_shortcut` of the resnets get a LoRA too, at network_dim);
    any other Conv2d (the 3x3 conv1/conv2, the samplers' conv) -> conv_dim / conv_alpha. conv_alpha
    defaults to 1.0 when conv_dim is given without it. dim 0 skips a module.
  - LoRAModule: Linear -> lora_down Linear(in, r, bias=False), lora_up Linear(r, out, bias=False);
    Conv2d -> lora_down Conv2d(in, r, kernel_size, stride, padding of the original, bias=False), lora_up
    Conv2d(r, out, (1, 1), (1, 1), bias=False). Init: kaiming_uniform(a=sqrt(5)) down, zeros up.
    scale = alpha / r (alpha None or 0 -> r); forward = org(x) + lora_up(lora_down(x)) * multiplier * scale.
  - Names: `lora_unet_` + `<module path>.<child path>` with `.` -> `_`; state dict keys
    `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d tensor; save_weights casts every
    tensor, alpha included, to the save dtype).
  - SD 1.x/2.x: kohya's own UNet (library/original_unet.py) has diffusers' module names, so the names are
    diffusers' (`lora_unet_down_blocks_0_resnets_0_conv1`). SDXL: kohya's SdxlUNet2DConditionModel
    (library/sdxl_original_unet.py) has the original (SGM) layout, so `lora_unet_input_blocks_1_0_in_layers_2`
    (conv1), `..._out_layers_3` (conv2), `..._emb_layers_1` (time_emb_proj), `..._skip_connection`
    (conv_shortcut), `lora_unet_input_blocks_3_0_op` (downsampler), `lora_unet_output_blocks_2_2_conv`
    (upsampler), `lora_unet_middle_block_0_...` / `_2_...`.

Writes (tiny-sd: kohya's network on diffusers' UNet of tests/fixtures/tiny-sd, network_dim 2,
network_alpha 1, conv_dim 2, conv_alpha 0.5 (scales 0.5 and 0.25), lora_down/lora_up overwritten with seeded values):
  tests/fixtures/golden/locon-kohya.safetensors   the network's state dict (F32), as save_weights writes it
                                                  (metadata: the network args; no sshs hashes)
  tests/fixtures/golden/unet_locon.safetensors    `out_with_lora`: the UNet output with the network applied
                                                  (kohya's forward) for golden/unet.safetensors's inputs
  tests/fixtures/golden/locon-kohya.json          `layouts.tiny-sd.modules`: every module kohya creates
                                                  ({stem: kind linear|conv1x1|conv3x3, rank, alpha, scale,
                                                  lora_down / lora_up shapes, down_conv kernel/stride/padding,
                                                  diffusers_module}), counts, roles; `sd15` / `sdxl` (networks
                                                  built on the meta device, kohya's own SDXL UNet for sdxl):
                                                  the resnet/sampler stems [kind, down shape, up shape(,
                                                  diffusers module)] and counts of all; `sdxl-tiny`: which of
                                                  SDXL's resnet/sampler stems the sdxl-tiny fixture has; per
                                                  layout `ui`: the stems ComfyUI / A1111 do NOT map (lists of
                                                  tests/fixtures/ui-lora-keys*.json; all empty).
Then `python tools/reference/load_lora_check.py tests/fixtures/golden/locon-kohya.safetensors --inputs
tests/fixtures/golden/unet.safetensors --expect tests/fixtures/golden/unet_locon.safetensors` checks that
diffusers loads it the same way.
"""
import argparse
import json
import os
import sys
import types

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NET = dict(network_dim=2, network_alpha=1.0, conv_dim="2", conv_alpha="0.5")  # conv_* as --network_args strings
SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    sample_size=64,
)


def import_kohya(sd_scripts):
    sys.path.insert(0, sd_scripts)
    for name in ("cv2", "einops"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.rearrange = None
            sys.modules[name] = stub
    import networks.lora as kohya_lora
    from library import sdxl_original_unet
    return kohya_lora, sdxl_original_unet


def make_network(kohya_lora, unet):
    # create_network appends the conv targets to the class attribute list it reads (`target_modules +=`):
    # restore it so each call starts from kohya's defaults.
    kohya_lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    net = kohya_lora.create_network(1.0, NET["network_dim"], NET["network_alpha"], None, [], unet,
                                    conv_dim=NET["conv_dim"], conv_alpha=NET["conv_alpha"])
    kohya_lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    return net


def describe(net, diffusers_name=None):
    """{stem: kind, rank, alpha, shapes, down conv geometry, diffusers module} for every module kohya made."""
    out = {}
    for lora in net.unet_loras:
        d, u = lora.lora_down, lora.lora_up
        org = lora.org_module if hasattr(lora, "org_module") else None
        if isinstance(d, torch.nn.Conv2d):
            kind = "conv3x3" if tuple(d.kernel_size) != (1, 1) else "conv1x1"
            geo = {"kernel": list(d.kernel_size), "stride": list(d.stride), "padding": list(d.padding)}
        else:
            kind, geo = "linear", None
        out[lora.lora_name] = {
            "kind": kind, "rank": lora.lora_dim, "alpha": float(lora.alpha), "scale": float(lora.scale),
            "lora_down": list(d.weight.shape), "lora_up": list(u.weight.shape), "down_conv": geo,
            "diffusers_module": diffusers_name(lora.lora_name) if diffusers_name else None,
        }
        del org
    return dict(sorted(out.items()))


def diffusers_module_map(unet):
    """kohya stem -> diffusers module name, for a diffusers UNet."""
    return {"lora_unet_" + n.replace(".", "_"): n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def child_role(stem):
    for key, role in (("conv1", "resnet conv1"), ("conv2", "resnet conv2"), ("in_layers_2", "resnet conv1"),
                      ("out_layers_3", "resnet conv2"), ("conv_shortcut", "resnet conv_shortcut"),
                      ("skip_connection", "resnet conv_shortcut"), ("time_emb_proj", "resnet time_emb_proj"),
                      ("emb_layers_1", "resnet time_emb_proj"), ("samplers_0_conv", "sampler conv"), ("_op", "sampler conv")):
        if stem.endswith(key):
            return role
    if stem.endswith("_conv") and "output_blocks" in stem:
        return "sampler conv"
    return "transformer"


def ui_check(stems, entry):
    """Which stems ComfyUI / A1111 map (the lists of tests/fixtures/ui-lora-keys*.json)."""
    res = {}
    for ui in ("comfyui", "a1111"):
        if ui in entry:
            have = set(entry[ui])
            res[ui + "_not_mapped"] = sorted(s for s in stems if s not in have)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd-scripts", required=True, help="folder with kohya's networks/lora.py and library/")
    a = ap.parse_args()
    torch.set_num_threads(1)
    kohya_lora, sdxl_unet_mod = import_kohya(a.sd_scripts)
    import logging
    logging.getLogger(kohya_lora.__name__).setLevel(logging.ERROR)  # kohya's per-network INFO lines
    from diffusers import UNet2DConditionModel

    report = {"made_by": "tools/reference/make_locon_golden.py", "network_args": NET, "layouts": {}}
    keys_sd = json.load(open(os.path.join(ROOT, "tests/fixtures/ui-lora-keys.json")))["layouts"]
    keys_xl = json.load(open(os.path.join(ROOT, "tests/fixtures/ui-lora-keys-sdxl.json")))["layouts"]

    # tiny-sd: the real network, seeded, applied, saved.
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "tests/fixtures/tiny-sd/unet")).eval()
    dmap = diffusers_module_map(unet)
    net = make_network(kohya_lora, unet)
    info = describe(net, dmap.get)
    inputs = load_file(os.path.join(ROOT, "tests/fixtures/golden/unet.safetensors"))
    with torch.no_grad():
        base = unet(inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)  # registers the modules in the network
    net.eval()
    # Seeded weights (lora_up nonzero), in sorted parameter-name order.
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        params = sorted(net.named_parameters())
        assert len(params) == 2 * len(info), len(params)
        for name, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "lora_down" in name else 0.05))
    with torch.no_grad():
        out = unet(inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
    sd = {k: v.detach().clone().to(torch.float32).contiguous() for k, v in net.state_dict().items()}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(NET["network_dim"]), "ss_network_alpha": str(NET["network_alpha"]),
            "ss_network_args": json.dumps({"conv_dim": NET["conv_dim"], "conv_alpha": NET["conv_alpha"]})}
    gold = os.path.join(ROOT, "tests/fixtures/golden")
    save_file(dict(sorted(sd.items())), os.path.join(gold, "locon-kohya.safetensors"), metadata=meta)
    save_file({"out_with_lora": out.contiguous()}, os.path.join(gold, "unet_locon.safetensors"),
              metadata={"inputs": "tests/fixtures/golden/unet.safetensors", "lora": "locon-kohya.safetensors"})
    for f in ("locon-kohya.safetensors", "unet_locon.safetensors"):
        os.chmod(os.path.join(gold, f), 0o644)
    stems = list(info)
    report["layouts"]["tiny-sd"] = {
        "modules": info,
        "counts": {k: sum(v["kind"] == k for v in info.values()) for k in ("linear", "conv1x1", "conv3x3")},
        "roles": {r: sum(child_role(s) == r for s in stems) for r in sorted({child_role(s) for s in stems})},
        "state_dict_keys": len(sd),
        "alpha_dtype": str(net.state_dict()[stems[0] + ".alpha"].dtype),
        "max_abs_diff_vs_base_output": float((out - base).abs().max()),
        "ui": ui_check(stems, keys_sd["tiny-sd"]),
    }

    # SD 1.5 (meta device): the names only, checked against ComfyUI's and A1111's lists.
    with torch.device("meta"):
        u15 = UNet2DConditionModel(**SD15_UNET)
    info15 = describe(make_network(kohya_lora, u15), diffusers_module_map(u15).get)
    report["layouts"]["sd15"] = {
        "resnet_sampler_stems": {s: [v["kind"], v["lora_down"], v["lora_up"]] for s, v in info15.items() if child_role(s) != "transformer"},
        "counts": {k: sum(v["kind"] == k for v in info15.values()) for k in ("linear", "conv1x1", "conv3x3")},
        "ui": ui_check(list(info15), keys_sd["sd15"]),
    }

    # SDXL (meta device): kohya's own SDXL UNet, original-layout names.
    with torch.device("meta"):
        uxl = sdxl_unet_mod.SdxlUNet2DConditionModel()
    sgm_to_diffusers = {s: m for s, m in keys_xl["sdxl"]["stems"]["unet_sgm"].items()}
    infoxl = describe(make_network(kohya_lora, uxl), sgm_to_diffusers.get)
    report["layouts"]["sdxl"] = {
        "resnet_sampler_stems": {s: [v["kind"], v["lora_down"], v["lora_up"], v["diffusers_module"]] for s, v in infoxl.items() if child_role(s) != "transformer"},
        "counts": {k: sum(v["kind"] == k for v in infoxl.values()) for k in ("linear", "conv1x1", "conv3x3")},
        "without_diffusers_module": sorted(s for s, v in infoxl.items() if v["diffusers_module"] is None),
        "ui": ui_check(list(infoxl), keys_xl["sdxl"]),
    }
    # sdxl-tiny has SDXL's resnet/sampler layout (2 resnets per level, 3 levels): the LoCon conv stems are
    # the same names; its transformer stems differ (depths 1, 1, 2 instead of 1, 2, 10).
    # (input_blocks.7.0 has no skip_connection there: its level is 64 -> 64 channels, SDXL's 640 -> 1280.)
    tiny_sgm = keys_xl["sdxl-tiny"]["stems"]["unet_sgm"]
    conv_stems = [s for s in infoxl if child_role(s) != "transformer"]
    report["layouts"]["sdxl-tiny"] = {
        "resnet_sampler_stems": {s: tiny_sgm[s] for s in conv_stems if s in tiny_sgm},
        "sdxl_stems_absent_in_sdxl_tiny": sorted(s for s in conv_stems if s not in tiny_sgm),
        "ui": ui_check([s for s in conv_stems if s in tiny_sgm], keys_xl["sdxl-tiny"]),
    }

    bad = []
    for name, entry in report["layouts"].items():
        for k, v in entry["ui"].items():
            if v:
                bad.append(f"{name}: {k} {v[:5]}")
    if report["layouts"]["sdxl"]["without_diffusers_module"]:
        bad.append(f"sdxl stems without a diffusers module: {report['layouts']['sdxl']['without_diffusers_module'][:5]}")
    if report["layouts"]["sdxl-tiny"]["sdxl_stems_absent_in_sdxl_tiny"] != ["lora_unet_input_blocks_7_0_skip_connection"]:
        bad.append(f"sdxl-tiny lacks other SDXL resnet/sampler stems: {report['layouts']['sdxl-tiny']['sdxl_stems_absent_in_sdxl_tiny']}")
    if report["layouts"]["tiny-sd"]["max_abs_diff_vs_base_output"] == 0.0:
        bad.append("the LoCon network does not change the tiny-sd UNet output")
    report["problems"] = bad
    with open(os.path.join(gold, "locon-kohya.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    for name, entry in report["layouts"].items():
        print(name, entry.get("counts"), entry.get("roles", ""), entry["ui"] and {k: len(v) for k, v in entry["ui"].items()})
    print("tiny-sd LoCon changes the UNet output by", report["layouts"]["tiny-sd"]["max_abs_diff_vs_base_output"])
    for b in bad:
        print("PROBLEM:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
