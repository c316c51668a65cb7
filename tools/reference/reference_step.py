"""(Copy of shared/bench/reference_step.py, carried to the GPU machine by scripts/device-check.sh.)

Reference LoRA training step (diffusers + PEFT + PyTorch), for side-by-side speed and memory numbers.

Times exactly the step the reference trainer runs: frozen SD UNet in half precision (or f32), PEFT LoRA
(r, alpha = r, gaussian init, to_q/to_k/to_v/to_out.0) in f32, DDPM noising, MSE loss, backward, AdamW.
Latents and text embeddings are random tensors of the right shapes (as if cached), so the number is the
UNet step alone; add --with-vae to also encode 8x-larger images through a VAE each step, as the reference
script does.

SDXL: when the UNet has addition_embed_type "text_time" (a --model folder such as tests/fixtures/sdxl-tiny,
or --config sdxl, SDXL base 1.0's architecture with random weights), the step is train_text_to_image_lora_sdxl.py's:
random encoder_hidden_states of the UNet's cross_attention_dim (the two encoders' penultimate states
concatenated), random pooled text_embeds of projection_class_embeddings_input_dim - 6 * addition_time_embed_dim,
and time_ids [res, res, 0, 0, res, res] (original size = target size, crop (0, 0)) in added_cond_kwargs; the
same UNet LoRA (to_q/to_k/to_v/to_out.0, r = alpha). With --with-vae the SDXL VAE stays in float32 as that
script keeps it (the SD path casts it to --dtype, as the SD script does), and the latents are scaled by the
VAE's own scaling_factor (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).

Usage:
  python reference_step.py --config sd15 --resolution 512 --batch 1 --dtype bf16 --steps 20 [--device cuda]
  python reference_step.py --model PATH_TO_DIFFUSERS_FOLDER --resolution 64 --batch 4 --dtype f32 --device cpu
  python reference_step.py --model tests/fixtures/sdxl-tiny --resolution 64 --batch 4 --dtype f32 --device cpu
  python reference_step.py --config sdxl --resolution 1024 --batch 1 --dtype bf16 --steps 10 --device cuda
Prints one JSON line: {"ms_per_step": ..., "peak_mem_gib": ..., ...}.
"""
import argparse, json, time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.57 G parameters) and its VAE (SD's shape, scaling 0.13025).
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["sd15", "sdxl"], default=None, help="random weights of this architecture")
    ap.add_argument("--model", default=None, help="a diffusers pipeline folder (uses its unet/ and vae/)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["f32", "fp16", "bf16"], default="bf16")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--with-vae", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    wdtype = {"f32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    if a.model:
        unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae") if a.with_vae else None
    else:
        unet = UNet2DConditionModel(**(SDXL if a.config == "sdxl" else SD15))
        vae = AutoencoderKL(**(SDXL_VAE if a.config == "sdxl" else SD15_VAE)) if a.with_vae else None
    unet.requires_grad_(False).to(dev, wdtype)
    sdxl = unet.config.addition_embed_type == "text_time"
    # The SDXL script keeps the VAE in float32 ("to avoid NaN losses") unless a separate VAE is given; the SD script
    # casts it to the weight dtype.
    vae_dtype = torch.float32 if sdxl else wdtype
    if vae is not None:
        vae.requires_grad_(False).to(dev, vae_dtype)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    lat_hw = a.resolution // 8
    ctx_dim = unet.config.cross_attention_dim
    if sdxl:
        # The pooled embedding (text_encoder_2's projection) is what add_embedding's input has left after the
        # 6 time ids, each expanded to addition_time_embed_dim sinusoids.
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[a.resolution, a.resolution, 0, 0, a.resolution, a.resolution]] * a.batch,
                                device=dev, dtype=wdtype)
    vae_scale = vae.config.scaling_factor if vae is not None else None
    amp = torch.autocast(dev.type, dtype=wdtype) if wdtype != torch.float32 else torch.autocast(dev.type, enabled=False)

    def step():
        if vae is not None:
            px = torch.randn(a.batch, 3, a.resolution, a.resolution, device=dev, dtype=vae_dtype)
            with torch.no_grad():
                lat = (vae.encode(px).latent_dist.sample() * vae_scale).to(wdtype)
        else:
            lat = torch.randn(a.batch, 4, lat_hw, lat_hw, device=dev, dtype=wdtype)
        ehs = torch.randn(a.batch, 77, ctx_dim, device=dev, dtype=wdtype)
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        noisy = sched.add_noise(lat, noise, t)
        with amp:
            if sdxl:
                added = {"text_embeds": torch.randn(a.batch, pooled_dim, device=dev, dtype=wdtype), "time_ids": time_ids}
                pred = unet(noisy, t, ehs, added_cond_kwargs=added).sample
            else:
                pred = unet(noisy, t, ehs).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    ms = (time.perf_counter() - t0) * 1000 / a.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    print(json.dumps({"impl": "diffusers+peft", "torch": torch.__version__, "device": str(dev),
                      "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                      "model": a.model or a.config or "sd15", "sdxl": sdxl, "resolution": a.resolution, "batch": a.batch,
                      "dtype": a.dtype, "rank": a.rank, "with_vae": a.with_vae,
                      "gradient_checkpointing": a.gradient_checkpointing, "steps": a.steps,
                      "ms_per_step": round(ms, 2), "images_per_s": round(a.batch * 1000 / ms, 2),
                      "peak_mem_gib": round(peak, 3) if peak is not None else None}))


if __name__ == "__main__":
    main()
