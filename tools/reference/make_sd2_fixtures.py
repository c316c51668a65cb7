"""Builds a tiny SD 2.x-shaped pipeline (tests/fixtures/sd2-tiny) and its goldens (tests/fixtures/golden-sd2).

Everything is seeded; rerunning with the same package versions rewrites the same files. The models are
saved in float16 safetensors (to keep the folder under ~10 MB, as SD 2.1's fp16 files are), then loaded
back from disk in float32, and every golden is computed from the loaded float32 models on CPU.

What makes it SD 2.x and not SD 1.5 (see golden-sd2/README.md):
  UNet: use_linear_projection=true (Linear proj_in/proj_out), attention_head_dim=[2,4,4,4] which diffusers
        reads as the per-block NUMBER of heads (num_attention_heads = attention_head_dim; head dim =
        channels / heads = 16 everywhere, as SD 2.1's [5,10,20,20] gives 64), upcast_attention=true.
  Text encoder: CLIP with hidden_act="gelu" (exact erf GELU, not quick_gelu).
  Scheduler: DDIMScheduler, prediction_type="v_prediction", as SD 2.1 ships it (no timestep_spacing key).

Usage: python tools/reference/make_sd2_fixtures.py [--fixtures tests/fixtures]
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file as _save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reflib  # noqa: E402

# The scheduler config as stabilityai/stable-diffusion-2-1 ships it (keys it lacks take the class defaults).
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=[2, 4, 4, 4], cross_attention_dim=32,
    use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
)
VAE = dict(  # the same shape as tests/fixtures/tiny-sd/vae
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
    layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, norm_num_groups=32,
)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=512,
)
PROMPTS = ["a red circle on a white background", "Two GREEN squares, side by side!", ""]
SAMPLING_PROMPT = "a red circle on a white background"


def save_file(tensors, path, metadata=None):
    """safetensors save of contiguous copies (views from chunk/permute are not allowed)."""
    _save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def build_model_folder(fixtures, out):
    """Creates the diffusers folder with random (seeded) weights, saved in float16."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    unet.half().save_pretrained(f"{out}/unet", safe_serialization=True)
    vae.half().save_pretrained(f"{out}/vae", safe_serialization=True)
    text.half().save_pretrained(f"{out}/text_encoder", safe_serialization=True)
    shutil.copytree(f"{fixtures}/tiny-sd/tokenizer", f"{out}/tokenizer")
    os.makedirs(f"{out}/scheduler")
    with open(f"{out}/scheduler/scheduler_config.json", "w") as f:
        json.dump(SD21_SCHEDULER, f, indent=2)
    with open(f"{fixtures}/tiny-sd/model_index.json") as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    with open(f"{out}/model_index.json", "w") as f:
        json.dump(index, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline)
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    model = f"{a.fixtures}/sd2-tiny"
    gold = f"{a.fixtures}/golden-sd2"
    build_model_folder(a.fixtures, model)
    os.makedirs(gold, exist_ok=True)  # README.md there is hand-written: keep it
    shutil.rmtree(f"{gold}/lora-diffusers", ignore_errors=True)

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    unet, vae, text, tok = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    heads = {n: m.heads for n, m in unet.named_modules() if n.endswith("attn1")}
    meta = {"torch": torch.__version__, "attn1_heads": heads}

    # Text encoder.
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text(ids, return_dict=False)[0]
    save_file({"input_ids": ids, "last_hidden_state": hidden.contiguous()}, f"{gold}/text_encoder.safetensors")

    # UNet on fixed inputs.
    gen = torch.Generator().manual_seed(1234)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 77, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 731], dtype=torch.int64)
    with torch.no_grad():
        out = unet(sample, timesteps, ehs).sample
    save_file({"sample": sample, "timesteps": timesteps, "encoder_hidden_states": ehs, "out": out},
              f"{gold}/unet.safetensors")

    # VAE on the pixel values of the SD 1.5 goldens (three 64x64 images).
    from safetensors.torch import load_file
    px = load_file(f"{a.fixtures}/golden/vae.safetensors")["pixel_values"]
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
        decoded = vae.decode(dist.mean).sample
    save_file({"pixel_values": px, "latent_mean": dist.mean.contiguous(), "latent_std": dist.std.contiguous(),
               "decoded_from_mean": decoded}, f"{gold}/vae.safetensors")

    # DDPM (the training noise scheduler, read from the DDIM config as the training script does).
    ddpm = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert ddpm.config.prediction_type == "v_prediction"
    all_t = torch.arange(1000)
    save_file({
        "alphas_cumprod": ddpm.alphas_cumprod.float(),
        "sample": sample, "noise": noise, "timesteps": timesteps,
        "noisy": ddpm.add_noise(sample, noise, timesteps),
        "velocity": ddpm.get_velocity(sample, noise, timesteps),
        "snr": reflib.snr(ddpm, all_t).float(),
    }, f"{gold}/ddpm.safetensors")

    # LoRA with fixed weights: output, saved files, one training step.
    reflib.add_lora(unet)
    reflib.set_fixed_lora_weights(unet, seed=4321)
    with torch.no_grad():
        out_lora = unet(sample, timesteps, ehs).sample
    save_file({"out_with_lora": out_lora}, f"{gold}/unet_lora.safetensors")
    peft_sd = get_peft_model_state_dict(unet)
    os.makedirs(f"{gold}/lora-diffusers")
    StableDiffusionPipeline.save_lora_weights(f"{gold}/lora-diffusers",
                                              unet_lora_layers=convert_state_dict_to_diffusers(peft_sd),
                                              safe_serialization=True)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    save_file({k: v.contiguous() for k, v in kohya.items()}, f"{gold}/lora-kohya.safetensors")

    unet.train()
    step = reflib.train_step(unet, ddpm, sample, noise, timesteps, ehs)
    save_file({k: v.contiguous() for k, v in step.items()}, f"{gold}/train_step.safetensors")
    with open(f"{gold}/train_step.json", "w") as f:
        json.dump({
            "inputs": "unet.safetensors sample/timesteps/encoder_hidden_states, ddpm.safetensors noise/noisy",
            "target": "v_prediction: velocity = sqrt(acp_t)*noise - sqrt(1-acp_t)*sample (ddpm.safetensors velocity)",
            "lora": "r=4 alpha=4 targets to_k,to_q,to_v,to_out.0; weights = before.* "
                    "(A ~ N(0, 1/4), B ~ N(0, 0.05), torch.Generator seed 4321, sorted names)",
            "loss": "mse(pred, velocity), mean over all elements; snr_gamma5_loss uses min(snr,5)/(snr+1)",
            "grads": "grad.* are the raw gradients of loss, before clipping",
            "optimizer": "clip_grad_norm 1.0 then AdamW lr=1e-3 betas=(0.9,0.999) wd=1e-2 eps=1e-8, one step",
            "param_names": "peft names inside the UNet (e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight)",
            "grad_norm_before_clip": float(step["grad_norm_before_clip"]),
        }, f, indent=1)

    # The same step with max_grad_norm 0.1, so that clipping really scales the gradients
    # (the step above has a gradient norm below 1.0, where clipping is a no-op).
    reflib.set_fixed_lora_weights(unet, seed=4321)
    for p in reflib.lora_params(unet).values():
        p.grad = None
    clipped = reflib.train_step(unet, ddpm, sample, noise, timesteps, ehs, max_grad_norm=0.1)
    save_file(clipped, f"{gold}/train_step_clip0.1.safetensors")

    # Sampling: base model (no LoRA), 4 steps, CFG 7.5, fixed initial latents.
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    samp = {"init_latents": init}
    schedulers = {
        "ddim": pipe.scheduler,
        "euler": EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler"),
    }
    for name, sch in schedulers.items():
        pipe.scheduler = sch
        with torch.no_grad():
            img = pipe(SAMPLING_PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=7.5,
                       height=64, width=64, latents=init.clone(), output_type="np").images[0]
        samp[f"image_{name}"] = torch.from_numpy(img).float().contiguous()
        samp[f"timesteps_{name}"] = sch.timesteps.clone()
        if name == "euler":
            samp["sigmas_euler"] = sch.sigmas.float().clone()
            samp["init_noise_sigma_euler"] = torch.tensor([float(sch.init_noise_sigma)])
    save_file(samp, f"{gold}/sampling.safetensors")
    with open(f"{gold}/sampling.json", "w") as f:
        json.dump({
            "prompt": SAMPLING_PROMPT, "negative": "(empty string)", "steps": 4, "guidance_scale": 7.5,
            "height": 64, "width": 64,
            "schedulers": "ddim: DDIMScheduler as saved (v_prediction, leading spacing, steps_offset 1); "
                          "euler: EulerDiscreteScheduler.from_pretrained(sd2-tiny/scheduler), so absent keys "
                          "take Euler's defaults (timestep_spacing linspace)",
            "init_latents": "torch.randn(1,4,8,8, Generator seed 99); the pipeline multiplies by init_noise_sigma",
            "image_*": "HWC float in [0,1] as output_type='np'",
        }, f, indent=1)

    meta.update({"diffusers": __import__("diffusers").__version__,
                 "transformers": __import__("transformers").__version__,
                 "peft": __import__("peft").__version__, "dtype_on_disk": "float16", "compute": "float32 CPU",
                 "prompts": PROMPTS})
    with open(f"{gold}/meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({"grad_norm_before_clip": float(step["grad_norm_before_clip"]),
                      "loss": float(step["loss"]), "lora_effect": float((out_lora - out).abs().max())}))


if __name__ == "__main__":
    main()
