"""Checks that diffusers itself loads a LoRA file cleanly and that it changes the UNet.

    python tools/reference/load_lora_check.py DIR_OR_FILE --model tests/fixtures/tiny-sd
        [--inputs tests/fixtures/golden/unet.safetensors] [--expect tests/fixtures/golden/unet_lora.safetensors]

Loads the pipeline with `StableDiffusionPipeline.from_pretrained(model)` and the LoRA with
`pipe.load_lora_weights(DIR_OR_FILE)` (a folder holding pytorch_lora_weights.safetensors, or a
.safetensors file in diffusers, PEFT or kohya naming). It FAILS (exit 1) when:
  - diffusers/peft log any warning about unexpected, missing, unsupported or ignored keys while loading,
    or load_lora_weights raises ("No LoRA keys associated to CLIPTextModel" is accepted only when the file
    has no text-encoder keys: diffusers prints it for every UNet-only LoRA);
  - the number of UNet modules that got a LoRA differs from the number of LoRA modules in the file
    (every `lora.down` / `lora_A` / `lora_down` tensor must end up in the UNet);
  - some injected lora_A / lora_B weight is not bit-identical to a tensor of the file;
  - DoRA (PEFT's `use_dora`): the number of UNet modules that got a DoRA magnitude differs from the
    number of `lora_magnitude_vector` tensors in the UNet part of the file, or some injected magnitude
    is not bit-identical to one of them (a file without magnitudes loads as a plain LoRA: nothing to
    check then). diffusers drops kohya/LyCORIS-style `dora_scale` keys with a warning, which fails;
  - the LoRA does not change the UNet output at all;
  - with --expect: the output with the LoRA differs from the file's `out_with_lora` by more than
    --tol (relative to max(1, |expected|)).
With --save FILE it writes diffusers' UNet output with the LoRA (`out_with_lora`) there. It prints the UNet output difference with/without the LoRA on fixed inputs (the --inputs file's
`sample`, `timesteps`, `encoder_hidden_states`, or seeded random ones), and one JSON summary line last.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import warnings

import torch

from reflib import Capture
from safetensors import safe_open

KEY_TROUBLE = ("unexpected", "missing", "unsupported", "no lora keys", "ignor", "not found", "could not",
               "unused", "were not used", "not match", "mismatch",
               # diffusers' "DoRA checkpoint that is not compatible ... filter out the keys associated to 'dora_scale'"
               "dora_scale", "not compatible", "filter out")
MAGNITUDE = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


def digest(t):
    t = t.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


def file_lora_tensors(path):
    """(number of LoRA modules in the UNet part of the file, {digest of every down/up tensor},
    number of DoRA magnitude tensors in the UNet part, {digest of every magnitude tensor})."""
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    modules, digests, magnitudes, mag_digests = 0, set(), 0, set()
    with safe_open(path, "pt") as f:
        for k in f.keys():
            is_unet = k.startswith("unet.") or k.startswith("lora_unet_") or not k.startswith(
                ("text_encoder", "lora_te"))
            down = k.endswith(("lora.down.weight", "lora_A.weight", "lora_down.weight"))
            if is_unet and down:
                modules += 1
            if k.endswith(".weight"):
                digests.add(digest(f.get_tensor(k)))
            if k.endswith(MAGNITUDE):
                magnitudes += is_unet
                mag_digests.add(digest(f.get_tensor(k)))
    return modules, digests, magnitudes, mag_digests


def file_has_text_encoder_keys(path):
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        return any(k.startswith(("text_encoder", "lora_te")) for k in f.keys())


def fixed_inputs(unet, inputs_path):
    if inputs_path:
        from safetensors.torch import load_file
        d = load_file(inputs_path)
        return d["sample"], d["timesteps"], d["encoder_hidden_states"]
    g = torch.Generator().manual_seed(1234)
    c = unet.config
    s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    sample = torch.randn(2, c.in_channels, s, s, generator=g)
    ehs = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 731]), ehs


def added_cond(unet):
    """SDXL's extra UNet inputs (pooled text embedding and time ids), fixed; None otherwise."""
    c = unet.config
    if c.addition_embed_type != "text_time":
        return None
    g = torch.Generator().manual_seed(4321)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [80.0, 96, 8, 16, 64, 64]])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lora", help="folder with pytorch_lora_weights.safetensors, or a .safetensors file")
    ap.add_argument("--model", default="tests/fixtures/tiny-sd", help="diffusers pipeline folder")
    ap.add_argument("--inputs", default=None, help="safetensors with sample/timesteps/encoder_hidden_states")
    ap.add_argument("--expect", default=None, help="safetensors with out_with_lora to compare against")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--save", default=None, help="write diffusers' output with the LoRA here as `out_with_lora` (safetensors)")
    a = ap.parse_args()
    if not os.path.exists(a.lora):
        print(f"error: LoRA path {a.lora} does not exist", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_warning()

    problems = []
    # The pipeline class model_index.json names (StableDiffusionPipeline, StableDiffusionXLPipeline).
    extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in open(os.path.join(a.model, "model_index.json")).read() else {}
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, **extra)
    unet = pipe.unet.eval()
    sample, timesteps, ehs = fixed_inputs(unet, a.inputs)
    added = added_cond(unet)
    if added is not None and a.inputs:
        from safetensors.torch import load_file
        d = load_file(a.inputs)
        added = {"text_embeds": d["text_embeds"], "time_ids": d["time_ids"]}
    with torch.no_grad():
        base = unet(sample, timesteps, ehs, added_cond_kwargs=added).sample

    cap = Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(cap)
    try:
        with warnings.catch_warnings(record=True) as pywarn:
            warnings.simplefilter("always")
            pipe.load_lora_weights(a.lora, adapter_name="checked")
    except Exception as e:  # any refusal by diffusers is a failed check, reported as such
        problems.append(f"load_lora_weights raised {type(e).__name__}: {e}")
        pywarn = []
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
    messages = cap.records + [f"warnings.{w.category.__name__}: {w.message}" for w in pywarn]
    has_text_encoder_keys = file_has_text_encoder_keys(a.lora)
    for m in messages:
        bad = any(s in m.lower() for s in KEY_TROUBLE)
        # diffusers always says this for a UNet-only file; it is a problem only if the file has such keys.
        if "No LoRA keys associated to CLIPTextModel" in m and not has_text_encoder_keys:
            bad = False
        print(("KEY WARNING: " if bad else "note: ") + m[:2000])
        if bad:
            problems.append(f"key warning while loading: {m[:300]}")

    report = {"lora": a.lora, "model": a.model}
    if not problems:
        n_file, file_digests, n_file_mag, mag_digests = file_lora_tensors(a.lora)
        injected = {n: m for n, m in unet.named_modules()
                    if hasattr(m, "lora_A") and "checked" in getattr(m, "lora_A", {})}
        report["file_lora_modules"] = n_file
        report["unet_modules_with_lora"] = len(injected)
        if len(injected) != n_file:
            problems.append(f"file has {n_file} UNet LoRA modules but {len(injected)} UNet modules got one")
        not_from_file = [n for n, m in injected.items()
                         if digest(m.lora_A["checked"].weight) not in file_digests
                         or digest(m.lora_B["checked"].weight) not in file_digests]
        if not_from_file:
            problems.append(f"{len(not_from_file)} modules hold weights not found in the file, e.g. {not_from_file[0]}")
        # DoRA: every magnitude of the file must end up in the UNet, bit for bit.
        dora = {n: m for n, m in injected.items() if "checked" in (getattr(m, "lora_magnitude_vector", None) or {})}
        if n_file_mag or dora:
            report["file_dora_magnitudes"] = n_file_mag
            report["unet_modules_with_dora"] = len(dora)
            if len(dora) != n_file_mag:
                problems.append(f"file has {n_file_mag} UNet DoRA magnitudes but {len(dora)} UNet modules got one")
            mag_not_from_file = [n for n, m in dora.items() if digest(m.lora_magnitude_vector["checked"].weight) not in mag_digests]
            if mag_not_from_file:
                problems.append(f"{len(mag_not_from_file)} modules hold DoRA magnitudes not found in the file, e.g. {mag_not_from_file[0]}")
        scales = sorted({float(m.scaling["checked"]) for m in injected.values()})
        ranks = sorted({int(m.r["checked"]) for m in injected.values()})
        report["scales"], report["ranks"] = scales, ranks
        with torch.no_grad():
            lora_out = unet(sample, timesteps, ehs, added_cond_kwargs=added).sample
        diff = (lora_out - base).abs()
        report["max_abs_diff_vs_base"] = float(diff.max())
        report["mean_abs_diff_vs_base"] = float(diff.mean())
        print(f"UNet output with vs without the LoRA: max |diff| {diff.max():.6g}, mean |diff| {diff.mean():.6g}"
              f" (base output mean |x| {base.abs().mean():.6g}); {len(injected)} modules, ranks {ranks}, scales {scales}")
        if float(diff.max()) == 0.0:
            problems.append("the LoRA does not change the UNet output")
        if a.save:
            from safetensors.torch import save_file
            save_file({"out_with_lora": lora_out.contiguous()}, a.save, metadata={"lora": os.path.basename(a.lora), "inputs": a.inputs or "seeded random", "by": "diffusers load_lora_weights (tools/reference/load_lora_check.py)"})
            report["saved"] = a.save
        if a.expect:
            from safetensors.torch import load_file
            exp = load_file(a.expect)["out_with_lora"]
            if exp.shape != lora_out.shape:
                problems.append(f"--expect out_with_lora has shape {tuple(exp.shape)}, output is {tuple(lora_out.shape)}")
            else:
                rel = float(((lora_out - exp).abs() / exp.abs().clamp(min=1.0)).max())
                report["max_rel_err_vs_expect"] = rel
                print(f"vs {a.expect}: max rel err {rel:.3e} (tolerance {a.tol})")
                if rel > a.tol:
                    problems.append(f"output differs from {a.expect} by {rel:.3e} > {a.tol}")
    report["ok"] = not problems
    report["problems"] = problems
    for p in problems:
        print("FAIL: " + p)
    print(json.dumps(report))
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
