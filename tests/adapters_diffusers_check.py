"""Does diffusers load the LoRA files `lora convert` writes, with the same effect?

Usage: python adapters_diffusers_check.py LORA_BIN WORKDIR
Builds a kohya LoRA with per-module ranks and alphas for the tiny-sd UNet and text encoder,
converts it with our binary to diffusers, PEFT and kohya forms, loads each with diffusers'
`load_lora_weights`, and compares the UNet and text-encoder outputs with an independent merge
W += alpha / r * up @ down. Exit status 0 when every max difference is below 1e-4 (f32).
"""
import os, subprocess, sys
import torch, safetensors.torch as st
from diffusers import StableDiffusionPipeline

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, "fixtures/tiny-sd")
golden = os.path.join(here, "fixtures/golden")
lora_bin, work = sys.argv[1], sys.argv[2]

src = st.load_file(os.path.join(golden, "lora-kohya.safetensors"))
g = torch.Generator().manual_seed(1)
kohya = {}
for i, s in enumerate(sorted({k.split(".")[0] for k in src})):
    r, a = [4, 2, 8][i % 3], [4, 1, 3, 16][i % 4]
    kohya[s + ".lora_down.weight"] = torch.randn(r, src[s + ".lora_down.weight"].shape[1], generator=g) * 0.3
    kohya[s + ".lora_up.weight"] = torch.randn(src[s + ".lora_up.weight"].shape[0], r, generator=g) * 0.3
    kohya[s + ".alpha"] = torch.tensor(a, dtype=torch.int64)
for i in range(3):
    for j, p in enumerate(["q_proj", "k_proj", "v_proj", "out_proj"]):
        s = f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}"
        r, a = [4, 2][j % 2], [4, 8, 1][(i + j) % 3]
        kohya[s + ".lora_down.weight"] = torch.randn(r, 32, generator=g) * 0.3
        kohya[s + ".lora_up.weight"] = torch.randn(32, r, generator=g) * 0.3
        kohya[s + ".alpha"] = torch.tensor(a, dtype=torch.int64)
kohya_path = os.path.join(work, "mixed_kohya_in.safetensors")
st.save_file(kohya, kohya_path)

inp = st.load_file(os.path.join(golden, "unet.safetensors"))
ids = st.load_file(os.path.join(golden, "text_encoder.safetensors"))["input_ids"].long()

def pipeline():
    return StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)

def outputs(pipe):
    with torch.no_grad():
        return pipe.unet(inp["sample"], inp["timesteps"], inp["encoder_hidden_states"]).sample, pipe.text_encoder(ids)[0]

pipe = pipeline()
modules = {}
for name, m in pipe.unet.named_modules():
    modules["lora_unet_" + name.replace(".", "_")] = m
for name, m in pipe.text_encoder.named_modules():
    full = name if name.startswith("text_model") else "text_model." + name
    modules["lora_te_" + full.replace(".", "_")] = m
with torch.no_grad():
    for key in kohya:
        if key.endswith(".alpha"):
            s = key[: -len(".alpha")]
            d, u = kohya[s + ".lora_down.weight"], kohya[s + ".lora_up.weight"]
            modules[s].weight += float(kohya[key]) / d.shape[0] * (u @ d)
ref_unet, ref_te = outputs(pipe)

# diffusers mis-applies kohya files whose alphas differ between modules (its alpha_pattern keys
# for kohya attention layers do not match), so a kohya file is compared with diffusers loading
# the kohya input itself: ours must behave exactly as the original does.
p = pipeline()
p.load_lora_weights(kohya_path)
kohya_unet, kohya_te = outputs(p)

worst = 0.0
for form in ["diffusers", "peft", "kohya"]:
    out = os.path.join(work, f"ours_{form}.safetensors")
    subprocess.run([lora_bin, "convert", kohya_path, out, "--to", form], check=True)
    p = pipeline()
    p.load_lora_weights(out)
    u, t = outputs(p)
    want_u, want_t = (kohya_unet, kohya_te) if form == "kohya" else (ref_unet, ref_te)
    du, dt = (u - want_u).abs().max().item(), (t - want_t).abs().max().item()
    print(f"{form}: unet max diff {du:.3g}, text encoder max diff {dt:.3g}")
    worst = max(worst, du, dt)
sys.exit(0 if worst < 1e-4 else 1)
