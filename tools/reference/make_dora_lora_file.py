"""A DoRA LoRA for the tiny SD UNet, saved the way diffusers' train_text_to_image_lora.py saves a LoRA,
and what diffusers 0.42.1 does when it loads it back. Writes tests/fixtures/golden/lora-dora/:
  - pytorch_lora_weights.safetensors: `StableDiffusionPipeline.save_lora_weights(dir,
    unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))` of
    `unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=
    ["to_k", "to_q", "to_v", "to_out.0"], use_dora=True))`, lora_A / lora_B then overwritten with seeded
    values (A ~ N(0, 1/r), B ~ N(0, 0.05), in sorted PEFT-name order, B nonzero so the magnitude matters),
    the magnitude vectors left as PEFT initialized them (||W|| per output row);
  - unet_out.safetensors: `out_with_lora`, the DoRA UNet's output for golden/unet.safetensors's
    `sample`, `timesteps`, `encoder_hidden_states` (the --expect file of load_lora_check.py);
  - expected.json: every key with its shape and dtype, the naming rule, the magnitude count, and what the
    reload showed (warnings, max |output difference|, whether the magnitudes came back bit-identical);
    also the names diffusers' `convert_state_dict_to_kohya` gives the same tensors, and what diffusers
    does with such a kohya-named DoRA file (it drops `dora_scale` with a warning).

    nice -n 19 /work/refenv/bin/python tools/reference/make_dora_lora_file.py
Then `python tools/reference/load_lora_check.py tests/fixtures/golden/lora-dora --inputs
tests/fixtures/golden/unet.safetensors --expect tests/fixtures/golden/lora-dora/unet_out.safetensors`.
"""
import json
import logging
import os
import sys
import tempfile
import warnings

import torch

from reflib import Capture
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests/fixtures/tiny-sd")
OUT = os.path.join(ROOT, "tests/fixtures/golden/lora-dora")
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RANK = 4
MAX_BYTES = 300 * 1024


def load_pipe():
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)


def captured(fn):
    """Runs fn(), returns (result, [warning messages of diffusers / peft / transformers / python])."""
    cap = Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(cap)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = fn()
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
    return res, cap.records + [f"warnings.{x.category.__name__}: {x.message}" for x in w]


def plain_lora_output(unet_layers, sample, timesteps, ehs):
    """The UNet output with the same A and B as a plain LoRA (no magnitudes): diffusers loading the
    file without its `lora_magnitude_vector` keys."""
    pipe = load_pipe()
    with tempfile.TemporaryDirectory() as tmp:
        from diffusers import StableDiffusionPipeline
        plain = {k: v for k, v in unet_layers.items() if "lora_magnitude_vector" not in k}
        StableDiffusionPipeline.save_lora_weights(save_directory=tmp, unet_lora_layers=plain, safe_serialization=True)
        pipe.load_lora_weights(tmp, adapter_name="plain")
    return pipe.unet.eval()(sample, timesteps, ehs).sample


def main():
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from diffusers.utils import logging as dlogging
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    import diffusers
    import peft

    torch.set_num_threads(1)
    dlogging.set_verbosity_warning()
    inputs = load_file(os.path.join(ROOT, "tests/fixtures/golden/unet.safetensors"))
    sample, timesteps, ehs = inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"]

    pipe = load_pipe()
    unet = pipe.unet.eval()
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS, use_dora=True))
    params = dict(sorted((n, p) for n, p in unet.named_parameters() if "lora_" in n))
    mags = {n: p for n, p in params.items() if "lora_magnitude_vector" in n}
    # PEFT initialized each magnitude as the row norm of the base weight (B = 0 at init).
    modules = dict(unet.named_modules())
    for n, p in mags.items():
        w = modules[n.split(".lora_magnitude_vector")[0]].base_layer.weight
        assert torch.allclose(p, torch.linalg.norm(w, dim=1), rtol=1e-6, atol=0), n
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in params.items():
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=gen) / RANK)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    with torch.no_grad():
        unet.disable_adapters()
        base_out = unet(sample, timesteps, ehs).sample
        unet.enable_adapters()
        dora_out = unet(sample, timesteps, ehs).sample

    peft_sd = get_peft_model_state_dict(unet)
    unet_layers = convert_state_dict_to_diffusers(peft_sd)
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(save_directory=tmp, unet_lora_layers=unet_layers, safe_serialization=True)
        saved = os.path.join(tmp, "pytorch_lora_weights.safetensors")
        size = os.path.getsize(saved)
        with safe_open(saved, "pt") as f:
            keys = sorted(f.keys())
            header_meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in keys}

        # Reload into a fresh pipeline, the way a user loads the file.
        pipe2 = load_pipe()
        _, msgs = captured(lambda: pipe2.load_lora_weights(tmp, adapter_name="checked"))
        unet2 = pipe2.unet.eval()
        with torch.no_grad():
            reload_out = unet2(sample, timesteps, ehs).sample
        mods2 = dict(unet2.named_modules())
        n_mag_loaded, mag_identical = 0, True
        for k, v in tensors.items():
            if k.endswith("lora_magnitude_vector"):
                mod = mods2[k[len("unet."):-len(".lora_magnitude_vector")]]
                got = mod.lora_magnitude_vector["checked"].weight
                n_mag_loaded += 1
                mag_identical &= torch.equal(got, v)
        use_dora = sorted({bool(m.use_dora.get("checked")) for m in mods2.values() if hasattr(m, "use_dora") and "checked" in m.use_dora})

        # The same LoRA in kohya naming. diffusers' own converter (on the `unet.`-prefixed PEFT names, as
        # the SDXL/DreamBooth scripts call it) and a file named the way LyCORIS names DoRA
        # (`<stem>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `.dora_scale`), loaded by diffusers.
        kohya = convert_state_dict_to_kohya({"unet." + k: v for k, v in peft_sd.items()})
        kohya_keys = sorted(kohya)
        lyco = {}
        for k, v in unet_layers.items():
            stem = "lora_unet_" + k.rsplit(".lora", 1)[0].replace(".", "_")  # keys have no `unet.` yet
            if k.endswith(".lora.down.weight"):
                lyco[stem + ".lora_down.weight"] = v
                lyco[stem + ".alpha"] = torch.tensor(float(RANK))
            elif k.endswith(".lora.up.weight"):
                lyco[stem + ".lora_up.weight"] = v
            elif k.endswith(".lora_magnitude_vector"):
                lyco[stem + ".dora_scale"] = v.reshape(-1, 1)
        ktmp = os.path.join(tmp, "kohya.safetensors")
        save_file({k: v.contiguous() for k, v in lyco.items()}, ktmp)
        pipe3 = load_pipe()
        try:
            _, kmsgs = captured(lambda: pipe3.load_lora_weights(ktmp, adapter_name="k"))
            with torch.no_grad():
                kohya_out = pipe3.unet(sample, timesteps, ehs).sample
            kohya_dora = sorted({bool(m.use_dora.get("k")) for m in pipe3.unet.modules() if hasattr(m, "use_dora") and "k" in m.use_dora})
        except Exception as e:  # recorded, not fatal: this is about what diffusers does with such a file
            kmsgs, kohya_out, kohya_dora = [f"raised {type(e).__name__}: {e}"], None, None

        if size < MAX_BYTES:
            import shutil
            shutil.copyfile(saved, os.path.join(OUT, "pytorch_lora_weights.safetensors"))
            os.chmod(os.path.join(OUT, "pytorch_lora_weights.safetensors"), 0o644)
    save_file({"out_with_lora": dora_out.contiguous()}, os.path.join(OUT, "unet_out.safetensors"),
              metadata={"inputs": "tests/fixtures/golden/unet.safetensors", "lora": "lora-dora/pytorch_lora_weights.safetensors"})
    os.chmod(os.path.join(OUT, "unet_out.safetensors"), 0o644)

    mod0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    reload_diff = float((reload_out - dora_out).abs().max())
    kohya_diff = None if kohya_out is None else float((kohya_out - dora_out).abs().max())
    # Without DoRA (plain LoRA with the same A, B): what a loader that drops the magnitudes computes.
    with torch.no_grad():
        plain_out = plain_lora_output(unet_layers, sample, timesteps, ehs)
    expected = {
        "made_by": "tools/reference/make_dora_lora_file.py",
        "versions": {"diffusers": diffusers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "config": {"r": RANK, "lora_alpha": RANK, "init_lora_weights": "gaussian", "target_modules": TARGETS, "use_dora": True},
        "file_bytes": size,
        "file_written": size < MAX_BYTES,
        "safetensors_metadata": header_meta,
        "naming": {
            "down": "unet.<module>.lora.down.weight [r, in]",
            "up": "unet.<module>.lora.up.weight [out, r]",
            "magnitude": "unet.<module>.lora_magnitude_vector [out] (no `.weight` suffix)",
        },
        "keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "example_module": {k: list(v.shape) for k, v in tensors.items() if k.startswith(f"unet.{mod0}.")},
        "counts": {
            "tensors": len(keys),
            "lora_down": sum(k.endswith(".lora.down.weight") for k in keys),
            "lora_up": sum(k.endswith(".lora.up.weight") for k in keys),
            "lora_magnitude_vector": sum(k.endswith(".lora_magnitude_vector") for k in keys),
        },
        "magnitude_init": "PEFT sets lora_magnitude_vector = torch.linalg.norm(W, dim=1) of the base weight at add_adapter (B = 0); kept here",
        "reload": {
            "call": "StableDiffusionPipeline.load_lora_weights(dir, adapter_name='checked') on a fresh pipeline",
            "warnings": msgs,
            "use_dora_after_load": use_dora,
            "magnitude_vectors_loaded": n_mag_loaded,
            "magnitude_vectors_bit_identical": bool(mag_identical),
            "max_abs_diff_vs_trained_output": reload_diff,
            "max_abs_diff_dora_vs_base_output": float((dora_out - base_out).abs().max()),
        },
        "max_abs_diff_plain_lora_vs_dora_output": float((plain_out - dora_out).abs().max()),
        "kohya_naming": {
            "diffusers_convert_state_dict_to_kohya": {
                "call": "convert_state_dict_to_kohya({'unet.' + k: v for k, v in get_peft_model_state_dict(unet).items()})",
                "example_module": {k: list(kohya[k].shape) for k in kohya_keys if mod0.replace(".", "_") in k.replace(".", "_")},
            },
            "lycoris_style_file": {
                "keys_of_example_module": {k: list(v.shape) for k, v in lyco.items() if k.startswith("lora_unet_" + mod0.replace(".", "_") + ".")},
                "diffusers_load_warnings": kmsgs,
                "use_dora_after_load": kohya_dora,
                "max_abs_diff_vs_dora_output": kohya_diff,
                "max_abs_diff_vs_plain_lora_output": None if kohya_out is None else float((kohya_out - plain_out).abs().max()),
            },
        },
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: expected[k] for k in ("file_bytes", "counts", "example_module", "reload", "kohya_naming")}, indent=1))
    # diffusers prints the CLIPTextModel note for every UNet-only file (as load_lora_check.py accepts).
    real = [m for m in msgs if "No LoRA keys associated to CLIPTextModel" not in m]
    ok = not real and mag_identical and reload_diff == 0.0 and n_mag_loaded == expected["counts"]["lora_magnitude_vector"]
    print("OK" if ok else "PROBLEM: the reload was not clean", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
