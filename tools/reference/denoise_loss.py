"""diffusers' own denoising loss on a dataset, for the base model and with a LoRA (paired, fixed seeds).

    python tools/reference/denoise_loss.py --model tests/fixtures/tiny-sd --lora OUT_DIR_OR_FILE \
        --data tests/fixtures/datasets/shapes-parquet [--repeats 4] [--seed 0] [--resolution 64]

The loss is the training script's: pixels = Resize(resolution, lanczos) + CenterCrop + ToTensor +
Normalize(0.5, 0.5) (no random flip/crop, so it is deterministic); latents = vae.encode(px).latent_dist
.sample() * scaling_factor; noise ~ N(0, 1); t ~ randint(0, num_train_timesteps); noisy = add_noise;
target = noise (epsilon) or get_velocity (v_prediction) from the model's scheduler config (or
--prediction_type); loss = mse(unet(noisy, t, text_encoder(ids)[0]), target).

SDXL (a model whose UNet has addition_embed_type "text_time", e.g. tests/fixtures/sdxl-tiny) follows
train_text_to_image_lora_sdxl.py instead: StableDiffusionXLPipeline in f32 (the VAE in f32, as the script
keeps it); pixels = Resize(resolution, --image_interpolation_mode, default lanczos as the script) of the
image, no flip (the script flips before the crop, only with --random_flip, randomly: left out here so the
loss is deterministic), CenterCrop with crop top-left (y1, x1) = max(0, int(round((H - res) / 2))) of the
resized image, ToTensor + Normalize(0.5, 0.5); time_ids = (original h, w) + (y1, x1) + (res, res);
prompt_embeds = concat(text_encoder(ids_1).hidden_states[-2], text_encoder_2(ids_2).hidden_states[-2]) and
pooled = text_encoder_2's text_embeds (the script's encode_prompt; tokenizer_2 pads with its own pad token);
loss = mse(unet(noisy, t, prompt_embeds, added_cond_kwargs={text_embeds: pooled, time_ids}), target).

The text encodings are recomputed after the LoRA is loaded, so a LoRA with text-encoder keys
(--train_text_encoder) is measured through its LoRA'd encoders; for a UNet-only LoRA this changes nothing.

Every (image, repeat) pair draws its VAE sample noise, noise and timestep from its own
torch.Generator seeded with seed * 1_000_003 + index * 1_000 + repeat, so the base model and the model
with the LoRA see exactly the same draws and the difference is paired. --data is a Hugging Face parquet
dataset folder (data/*.parquet, columns image{bytes,path} and text), a .parquet file, or an imagefolder
with metadata.jsonl (itself or its train/ subfolder).

Prints per-run lines and one JSON line last: base_loss, lora_loss, diff (lora - base), the standard
error of the paired difference, n, and lora_modules (LoRA layers injected per model). Exit 1 on bad input (with a message naming the file or column).
"""
import argparse
import glob
import io
import json
import math
import os
import sys

import torch
import torch.nn.functional as F


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_dataset(path, image_column="image", caption_column="text"):
    """[(PIL image, caption)] from a parquet dataset or an imagefolder with metadata.jsonl."""
    from PIL import Image
    rows = []
    if os.path.isdir(path):
        parquets = sorted(glob.glob(os.path.join(path, "data", "*.parquet")) + glob.glob(os.path.join(path, "*.parquet")))
        folder = next((d for d in (path, os.path.join(path, "train"))
                       if os.path.isfile(os.path.join(d, "metadata.jsonl"))), None)
    elif path.endswith(".parquet") and os.path.isfile(path):
        parquets, folder = [path], None
    else:
        fail(f"--data {path}: not a folder or a .parquet file")
    if parquets:
        import pyarrow.parquet as pq
        for p in parquets:
            t = pq.read_table(p)
            for col in (image_column, caption_column):
                if col not in t.column_names:
                    fail(f"{p}: no column {col!r} (columns: {t.column_names})")
            for img, cap in zip(t.column(image_column).to_pylist(), t.column(caption_column).to_pylist()):
                data = img.get("bytes") if isinstance(img, dict) else img
                if data is None:
                    fail(f"{p}: an {image_column!r} value has no bytes")
                rows.append((Image.open(io.BytesIO(data)), cap))
    elif folder:
        with open(os.path.join(folder, "metadata.jsonl")) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "file_name" not in rec or caption_column not in rec:
                    fail(f"{folder}/metadata.jsonl line {n}: needs file_name and {caption_column!r}")
                rows.append((Image.open(os.path.join(folder, rec["file_name"])), rec[caption_column]))
    else:
        fail(f"--data {path}: no data/*.parquet and no metadata.jsonl")
    if not rows:
        fail(f"--data {path}: no rows")
    return [(im.convert("RGB"), cap if isinstance(cap, str) else cap[0]) for im, cap in rows]


def sdxl_pixels_and_time_ids(images, res, resize, center, post):
    """train_text_to_image_lora_sdxl.py's preprocess_train with --center_crop and without --random_flip, and its
    compute_time_ids: ([N, 3, res, res] pixels, [N, 6] f32 time ids (orig h, w, crop y1, x1, res, res))."""
    pxs, time_ids = [], []
    for im in images:
        original = (im.height, im.width)
        im = resize(im)
        y1 = max(0, int(round((im.height - res) / 2.0)))
        x1 = max(0, int(round((im.width - res) / 2.0)))
        pxs.append(post(center(im)))
        time_ids.append(list(original + (y1, x1) + (res, res)))
    return torch.stack(pxs), torch.tensor(time_ids, dtype=torch.float32)


def sdxl_encode_prompt(text_encoders, ids_list):
    """The SDXL script's encode_prompt(text_input_ids_list=...): each encoder's hidden_states[-2] (penultimate,
    no final layer norm) concatenated on the last axis; pooled = element 0 of the last encoder's output
    (text_encoder_2's projected text_embeds)."""
    embeds = []
    for te, ids in zip(text_encoders, ids_list):
        out = te(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="diffusers pipeline folder")
    ap.add_argument("--lora", default=None, help="LoRA folder or file; without it only the base loss is printed")
    ap.add_argument("--data", required=True)
    ap.add_argument("--resolution", type=int, default=None, help="default: unet sample_size * vae scale factor")
    ap.add_argument("--repeats", type=int, default=4, help="noise/timestep draws per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None)
    ap.add_argument("--image_column", default="image")
    ap.add_argument("--caption_column", default="text")
    ap.add_argument("--image_interpolation_mode", default="lanczos",
                    help="torchvision InterpolationMode of the resize (both scripts' default: lanczos)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from diffusers import DDPMScheduler
    from torchvision import transforms

    interpolation = getattr(transforms.InterpolationMode, a.image_interpolation_mode.upper(), None)
    if interpolation is None:
        fail(f"--image_interpolation_mode {a.image_interpolation_mode}: not a torchvision InterpolationMode")
    rows = read_dataset(a.data, a.image_column, a.caption_column)
    unet_cfg = os.path.join(a.model, "unet", "config.json")
    if not os.path.isfile(unet_cfg):
        fail(f"--model {a.model}: no unet/config.json (not a diffusers pipeline folder)")
    with open(unet_cfg) as f:
        sdxl = json.load(f).get("addition_embed_type") == "text_time"
    if sdxl:
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(a.model, torch_dtype=torch.float32, add_watermarker=False)
        text_encoders = [pipe.text_encoder.eval(), pipe.text_encoder_2.eval()]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        text_encoders, tokenizers = [pipe.text_encoder.eval()], [pipe.tokenizer]
    sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    if a.prediction_type:
        sched.register_to_config(prediction_type=a.prediction_type)
    vae, unet = pipe.vae.eval(), pipe.unet.eval()
    res = a.resolution or unet.config.sample_size * pipe.vae_scale_factor
    post = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    resize, center = transforms.Resize(res, interpolation=interpolation), transforms.CenterCrop(res)
    if sdxl:
        px, time_ids = sdxl_pixels_and_time_ids([im for im, _ in rows], res, resize, center, post)
    else:
        px = torch.stack([post(center(resize(im))) for im, _ in rows])
    captions = [c for _, c in rows]
    ids = [tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
               return_tensors="pt").input_ids for tok in tokenizers]

    def encode_text():
        """(encoder_hidden_states, pooled or None) for every row, through the text encoders as they are now."""
        with torch.no_grad():
            if not sdxl:
                return text_encoders[0](ids[0], return_dict=False)[0], None
            return sdxl_encode_prompt(text_encoders, ids)

    # Fixed draws per (image, repeat), shared by both runs.
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
    items = []
    for i in range(len(rows)):
        for r in range(a.repeats):
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + i * 1_000 + r)
            eps_vae = torch.randn(dist.mean[i].shape, generator=g)
            noise = torch.randn(dist.mean[i].shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
            latent = (dist.mean[i] + dist.std[i] * eps_vae) * vae.config.scaling_factor
            items.append((i, latent, noise, t))

    def losses():
        enc, pooled = encode_text()
        out = []
        for s in range(0, len(items), a.batch):
            chunk = items[s:s + a.batch]
            lat = torch.stack([c[1] for c in chunk])
            noise = torch.stack([c[2] for c in chunk])
            t = torch.cat([c[3] for c in chunk])
            noisy = sched.add_noise(lat, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
            rows_ = [c[0] for c in chunk]
            added = {"text_embeds": pooled[rows_], "time_ids": time_ids[rows_]} if sdxl else None
            with torch.no_grad():
                pred = unet(noisy, t, enc[rows_], added_cond_kwargs=added, return_dict=False)[0]
            out.append(F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(out)

    base = losses()
    report = {"model": a.model, "data": a.data, "n": len(items), "images": len(rows), "resolution": res,
              "sdxl": sdxl,
              "prediction_type": sched.config.prediction_type, "seed": a.seed,
              "base_loss": float(base.mean())}
    print(f"base: mean denoising loss {base.mean():.6f} over {len(items)} draws ({len(rows)} images x {a.repeats})")
    if a.lora:
        if not os.path.exists(a.lora):
            fail(f"--lora {a.lora} does not exist")
        pipe.load_lora_weights(a.lora)
        from peft.tuners.tuners_utils import BaseTunerLayer
        models = {"unet": unet, "text_encoder": text_encoders[0]}
        if sdxl:
            models["text_encoder_2"] = text_encoders[1]
        counts = {k: sum(isinstance(m, BaseTunerLayer) for m in v.modules()) for k, v in models.items()}
        print(f"lora: modules injected {counts}")
        lora = losses()
        d = lora - base
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        report.update({"lora": a.lora, "lora_modules": counts, "lora_loss": float(lora.mean()), "diff": float(d.mean()), "diff_stderr": se,
                       "lower_fraction": float((d < 0).float().mean())})
        print(f"lora: mean denoising loss {lora.mean():.6f}; lora - base = {d.mean():+.6f} +- {se:.6f} (paired s.e.),"
              f" lower on {100 * (d < 0).float().mean():.0f}% of draws")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
