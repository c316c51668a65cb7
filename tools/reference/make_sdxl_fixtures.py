"""Builds a tiny SDXL-shaped pipeline (tests/fixtures/sdxl-tiny) and its goldens (tests/fixtures/golden-sdxl).

Same method as make_sd2_fixtures.py: everything is seeded; the models are saved in float16 safetensors, loaded
back from disk in float32, and every golden is computed from the loaded float32 models on CPU. Rerunning with
the same package versions rewrites byte-identical files.

What makes it SDXL (see golden-sdxl/README.md):
  UNet: 3 blocks (DownBlock2D + 2 CrossAttnDownBlock2D), layers_per_block 2, transformer_layers_per_block
        [1, 1, 2] (the mid block takes the last entry, up blocks the reversed list), attention_head_dim [2, 4, 4]
        read as the number of heads, linear proj_in/proj_out, cross_attention_dim 64 = 32 + 32 (the two text
        encoders' hidden sizes concatenated), addition_embed_type "text_time" (pooled text embeds + 6 time ids).
  Two text encoders: CLIPTextModel (quick_gelu) and CLIPTextModelWithProjection (gelu, text_projection), both
        with eos_token_id 2 in their configs (so the pooled token is argmax(input_ids), as SDXL base ships them).
  tokenizer_2 pads with "!" (id 0); tokenizer pads with <|endoftext|> (49407).
  Scheduler: EulerDiscreteScheduler, epsilon, "leading" spacing, as SDXL base 1.0 ships it.
  VAE: scaling_factor 0.13025, force_upcast true.

The reference training script is diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py; its
encode_prompt / compute_time_ids math is reproduced here by calling the models the same way (it is checked
against StableDiffusionXLPipeline.encode_prompt, which the script's version is adapted from).

Usage: python tools/reference/make_sdxl_fixtures.py [--fixtures tests/fixtures]
"""
import argparse
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file as _save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reflib  # noqa: E402

# The scheduler config as stabilityai/stable-diffusion-xl-base-1.0 ships it (written from memory of that file).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
    use_linear_projection=True, upcast_attention=False, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
VAE = dict(  # tests/fixtures/tiny-sd/vae's shape, with SDXL's scaling factor and force_upcast
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
    layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, norm_num_groups=32,
    scaling_factor=0.13025, force_upcast=True,
)
TEXT_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408,
    max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as SDXL base's text_encoder / text_encoder_2 configs
)
TEXT_1 = dict(TEXT_COMMON, hidden_act="quick_gelu")
TEXT_2 = dict(TEXT_COMMON, hidden_act="gelu")

PROMPTS = ["a red circle on a white background", "Two GREEN squares, side by side!", ""]
SAMPLING_PROMPT = "a red circle on a white background"
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]            # the SDXL script's unet LoraConfig
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]      # its text encoder LoraConfig
LORA_SEEDS = {"unet": 4321, "text_encoder": 4322, "text_encoder_2": 4323}
# The SDXL script's optimizer defaults (--learning_rate 1e-4, --adam_beta1/2 0.9/0.999,
# --adam_weight_decay 1e-2, --adam_epsilon 1e-8, --max_grad_norm 1.0); one param group for UNet + both TEs.
OPT = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
MAX_GRAD_NORM = 1.0
RESOLUTION = 64
PREPROCESS_SIZES = [(64, 64), (100, 64), (64, 100), (65, 97), (97, 65), (301, 200), (200, 301), (63, 129)]
# (original (h, w), crop top-left (y1, x1)) of the two train-step images: center crop of 64x64 and 65x97
TRAIN_STEP_GEOMETRY = [((64, 64), (0, 0)), ((65, 97), (0, 16))]


def save_file(tensors, path, metadata=None):
    """safetensors save of contiguous copies (views from chunk/permute are not allowed)."""
    _save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def build_model_folder(fixtures, out):
    """Creates the diffusers folder with random (seeded) weights, saved in float16."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_1))
    torch.manual_seed(3)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    unet.half().save_pretrained(f"{out}/unet", safe_serialization=True)
    vae.half().save_pretrained(f"{out}/vae", safe_serialization=True)
    text.half().save_pretrained(f"{out}/text_encoder", safe_serialization=True)
    text_2.half().save_pretrained(f"{out}/text_encoder_2", safe_serialization=True)
    shutil.copytree(f"{fixtures}/tiny-sd/tokenizer", f"{out}/tokenizer")
    # tokenizer_2: the same BPE files, but padding with "!" (id 0) as SDXL base's tokenizer_2 (OpenCLIP-style).
    shutil.copytree(f"{fixtures}/tiny-sd/tokenizer", f"{out}/tokenizer_2")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = f"{out}/tokenizer_2/{name}"
        with open(path) as f:
            cfg = json.load(f)
        cfg["pad_token"] = "!"
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    os.makedirs(f"{out}/scheduler")
    with open(f"{out}/scheduler/scheduler_config.json", "w") as f:
        json.dump(SDXL_SCHEDULER, f, indent=2)
    # model_index.json exactly as StableDiffusionXLPipeline.save_pretrained writes it (save_config of the pipeline).
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2,
        tokenizer=CLIPTokenizer.from_pretrained(f"{out}/tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(f"{out}/tokenizer_2"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_config(out)


# ---------------------------------------------------------------------------------------------------------------
# The SDXL training script's text conditioning, called the way the script calls the models.

def tokenize(tokenizer, prompts):
    """The script's tokenize_prompt: padding to model_max_length (77), truncation."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt(text_encoders, ids_list):
    """The script's encode_prompt(text_input_ids_list=...): each encoder is called with output_hidden_states=True,
    return_dict=False; element 0 of the last encoder's tuple is the pooled embedding (text_embeds of
    CLIPTextModelWithProjection), element -1 the hidden states, of which [-2] (penultimate layer, no final layer
    norm) is concatenated over the encoders on the last axis."""
    embeds, pooled = [], None
    for te, ids in zip(text_encoders, ids_list):
        out = te(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)


def compute_time_ids(original_size, crop_top_left, resolution=RESOLUTION):
    """The script's compute_time_ids: original (h, w) + crop top-left (y1, x1) + target (res, res)."""
    return torch.tensor([list(tuple(original_size) + tuple(crop_top_left) + (resolution, resolution))],
                        dtype=torch.float32)


def encoder_outputs(te1, te2, ids1, ids2):
    with torch.no_grad():
        o1 = te1(ids1, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
        pooler_2 = te2.text_model(ids2).pooler_output
        pe, pooled = encode_prompt([te1, te2], [ids1, ids2])
    return {
        "penultimate_1": o1.hidden_states[-2], "penultimate_2": o2.hidden_states[-2],
        "last_hidden_state_1": o1.last_hidden_state, "last_hidden_state_2": o2.last_hidden_state,
        "pooled_2": o2.text_embeds, "pooler_output_2": pooler_2,
        "prompt_embeds": pe, "pooled_prompt_embeds": pooled,
    }


def add_text_lora(te, rank=4):
    """The script's text encoder LoraConfig, injected with peft (transformers' add_adapter refuses peft 0.21.2)."""
    from peft import LoraConfig, inject_adapter_in_model
    te.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=TEXT_LORA_TARGETS), te)
    return reflib.lora_params(te)


def unet_call(unet, sample, timesteps, ehs, text_embeds, time_ids):
    return unet(sample, timesteps, ehs, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                return_dict=False)[0]


def max_abs(a, b):
    return float((a.float() - b.float()).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model = f"{a.fixtures}/sdxl-tiny"
    gold = f"{a.fixtures}/golden-sdxl"
    build_model_folder(a.fixtures, model)
    os.makedirs(gold, exist_ok=True)  # README.md there is hand-written: keep it
    shutil.rmtree(f"{gold}/lora-diffusers", ignore_errors=True)

    def load_pipe():
        return StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False)

    pipe = load_pipe()
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler), type(pipe.scheduler)
    unet, te1, te2 = pipe.unet.eval(), pipe.text_encoder.eval(), pipe.text_encoder_2.eval()
    # Tokenizers as the training script loads them (AutoTokenizer, use_fast=False); must agree with the pipeline's.
    tok1 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    tok2 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2", use_fast=False)
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0, (tok2.pad_token, tok2.pad_token_id)
    assert tok1.pad_token_id == 49407, tok1.pad_token_id

    def keys_of(path):
        with safe_open(path, "pt") as f:
            return sorted(f.keys())
    te1_keys = keys_of(f"{model}/text_encoder/model.safetensors")
    te2_keys = keys_of(f"{model}/text_encoder_2/model.safetensors")
    meta = {
        "torch": torch.__version__,
        "attn1_heads": {n: m.heads for n, m in unet.named_modules() if n.endswith("attn1")},
        "text_encoder_keys_have_text_model_prefix": all(k.startswith("text_model.") for k in te1_keys),
        "text_encoder_2_keys_have_text_model_prefix": all(
            k.startswith("text_model.") for k in te2_keys if k != "text_projection.weight"),
        "text_encoder_example_keys": te1_keys[:2],
        "text_encoder_2_example_keys": te2_keys[:2] + [k for k in te2_keys if not k.startswith("text_model.")],
        "tokenizer_classes": [type(tok1).__name__, type(tok2).__name__,
                              type(pipe.tokenizer).__name__, type(pipe.tokenizer_2).__name__],
        "pad_token_ids": {"tokenizer": tok1.pad_token_id, "tokenizer_2": tok2.pad_token_id},
    }

    # 1. Text encoders.
    ids1, ids2 = tokenize(tok1, PROMPTS), tokenize(tok2, PROMPTS)
    assert torch.equal(ids1, tokenize(pipe.tokenizer, PROMPTS)) and torch.equal(ids2, tokenize(pipe.tokenizer_2, PROMPTS))
    assert int(ids2[2, 2]) == 0 and int(ids1[2, 2]) == 49407
    te = encoder_outputs(te1, te2, ids1, ids2)
    with torch.no_grad():
        # The pipeline's encode_prompt (which the script's is adapted from) must give the same.
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        assert max_abs(pe, te["prompt_embeds"]) == 0 and max_abs(pooled, te["pooled_prompt_embeds"]) == 0
        assert max_abs(te["pooled_2"], te["pooled_prompt_embeds"]) == 0
        # negative_prompt=None with force_zeros_for_empty_prompt -> zeros; negative_prompt="" -> encoded.
        _, neg_none, _, neg_pool_none = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True,
                                                           negative_prompt=None)
        _, neg_empty, _, neg_pool_empty = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True,
                                                             negative_prompt="")
    assert float(neg_none.abs().max()) == 0 and float(neg_pool_none.abs().max()) == 0
    assert max_abs(neg_empty[0], te["prompt_embeds"][2]) == 0
    save_file({"input_ids_1": ids1, "input_ids_2": ids2, **te,
               "pipeline_negative_zero_prompt_embeds": neg_none,
               "pipeline_negative_zero_pooled_prompt_embeds": neg_pool_none,
               "pipeline_negative_empty_prompt_embeds": neg_empty,
               "pipeline_negative_empty_pooled_prompt_embeds": neg_pool_empty},
              f"{gold}/text_encoders.safetensors")

    # 2. UNet on fixed inputs, with a hook on add_embedding to record its input.
    gen = torch.Generator().manual_seed(1234)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 77, 64, generator=gen)
    text_embeds = torch.randn(2, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 731], dtype=torch.int64)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [80, 96, 8, 16, 64, 64]], dtype=torch.float32)
    captured = {}

    def grab(_m, args, out):
        captured["add_embedding_in"] = args[0].detach().clone()
        captured["add_embedding_out"] = out.detach().clone()
    hook = unet.add_embedding.register_forward_hook(grab)
    with torch.no_grad():
        out = unet_call(unet, sample, timesteps, ehs, text_embeds, time_ids)
    hook.remove()
    assert max_abs(captured["add_embedding_in"][:, :32], text_embeds) == 0
    save_file({"sample": sample, "timesteps": timesteps, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
               "time_ids": time_ids, "out": out, **captured}, f"{gold}/unet.safetensors")

    # 3. DDPM: the training noise scheduler, read from the Euler config as the SDXL script does.
    ddpm = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert ddpm.config.prediction_type == "epsilon"
    save_file({
        "alphas_cumprod": ddpm.alphas_cumprod.float(),
        "sample": sample, "noise": noise, "timesteps": timesteps,
        "noisy": ddpm.add_noise(sample, noise, timesteps),
        "velocity": ddpm.get_velocity(sample, noise, timesteps),
        "snr": reflib.snr(ddpm, torch.arange(1000)).float(),
    }, f"{gold}/ddpm.safetensors")

    # 4. Fixed LoRA on the UNet (diffusers add_adapter, as the script) and both text encoders (peft injection).
    reflib.add_lora(unet)
    reflib.set_fixed_lora_weights(unet, seed=LORA_SEEDS["unet"])
    add_text_lora(te1)
    reflib.set_fixed_lora_weights(te1, seed=LORA_SEEDS["text_encoder"])
    add_text_lora(te2)
    reflib.set_fixed_lora_weights(te2, seed=LORA_SEEDS["text_encoder_2"])
    with torch.no_grad():
        out_lora = unet_call(unet, sample, timesteps, ehs, text_embeds, time_ids)
    save_file({"out_with_lora": out_lora}, f"{gold}/unet_lora.safetensors")
    te_lora = encoder_outputs(te1, te2, ids1, ids2)
    save_file(te_lora, f"{gold}/text_encoders_lora.safetensors")

    peft_unet, peft_te1, peft_te2 = (get_peft_model_state_dict(m) for m in (unet, te1, te2))
    os.makedirs(f"{gold}/lora-diffusers")
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=f"{gold}/lora-diffusers",
        unet_lora_layers=convert_state_dict_to_diffusers(peft_unet),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_te1),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(peft_te2))
    kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in peft_unet.items()},
                                         **{f"text_encoder.{k}": v for k, v in peft_te1.items()},
                                         **{f"text_encoder_2.{k}": v for k, v in peft_te2.items()}})
    save_file(kohya, f"{gold}/lora-kohya.safetensors")

    # 5. One training step of the SDXL script's math, UNet + both text encoder LoRAs.
    models = {"": unet, "text_encoder.": te1, "text_encoder_2.": te2}
    params = {f"{pre}{n}": p for pre, m in models.items() for n, p in reflib.lora_params(m).items()}
    params = dict(sorted(params.items()))
    ids1_b, ids2_b = ids1[:2], ids2[:2]
    step_time_ids = torch.cat([compute_time_ids(s, c) for s, c in TRAIN_STEP_GEOMETRY])

    def train_step(max_grad_norm):
        for key, m in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
            reflib.set_fixed_lora_weights(m, seed=LORA_SEEDS[key])
        for p in params.values():
            p.grad = None
        step = {f"before.{n}": p.detach().clone() for n, p in params.items()}
        for m in models.values():
            m.train()
        prompt_embeds, pooled_embeds = encode_prompt([te1, te2], [ids1_b, ids2_b])
        noisy = ddpm.add_noise(sample, noise, timesteps)
        target = noise  # epsilon
        pred = unet_call(unet, noisy, timesteps, prompt_embeds, pooled_embeds, step_time_ids)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        with torch.no_grad():
            s = reflib.snr(ddpm, timesteps)
            w = torch.stack([s, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / s
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            snr_loss = (per * w).mean()
        loss.backward()
        # text_encoder's LAST layer feeds neither prompt_embeds (hidden_states[-2]) nor the pooled embedding (taken
        # from text_encoder_2 only): its LoRA gets no gradient at all (grad None). Stored as zeros and listed in
        # the json; AdamW skips such parameters entirely (no weight decay either), so after == before for them.
        no_grad = [n for n, p in params.items() if p.grad is None]
        for n, p in params.items():
            step[f"grad.{n}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        # The script's params_to_optimize order: unet, then text_encoder_one, then text_encoder_two parameters.
        ordered = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        assert len(ordered) == len(params)
        norm = torch.nn.utils.clip_grad_norm_(ordered, max_grad_norm)
        opt = torch.optim.AdamW(ordered, **OPT)
        opt.step()
        for n, p in params.items():
            step[f"after.{n}"] = p.detach().clone()
        for n in no_grad:
            assert torch.equal(step[f"after.{n}"], step[f"before.{n}"])
        step.update({
            "loss": loss.detach().reshape(1), "snr_gamma5_loss": snr_loss.reshape(1),
            "grad_norm_before_clip": norm.detach().reshape(1),
            "input_ids_1": ids1_b, "input_ids_2": ids2_b, "time_ids": step_time_ids,
            "prompt_embeds": prompt_embeds.detach(), "pooled_prompt_embeds": pooled_embeds.detach(),
            "noisy": noisy, "model_pred": pred.detach(),
        })
        for m in models.values():
            m.eval()
        return step, no_grad

    step, no_grad = train_step(MAX_GRAD_NORM)
    loss, norm = step["loss"][0], step["grad_norm_before_clip"][0]
    save_file(step, f"{gold}/train_step.safetensors")
    n_unet = sum(1 for n in params if not n.startswith("text_encoder"))
    dump_json({
        "inputs": "latents (model_input) = unet.safetensors sample; noise, timesteps, noisy from ddpm.safetensors; "
                  "captions = the first two text_encoders.safetensors prompts (input_ids_1/_2 here); "
                  "time_ids = compute_time_ids(original_size, crop_top_left) for the geometries below",
        "geometry": [{"original_size": list(s), "crop_top_left": list(c), "target_size": [RESOLUTION] * 2}
                     for s, c in TRAIN_STEP_GEOMETRY],
        "conditioning": "prompt_embeds, pooled_prompt_embeds = the script's encode_prompt through both LoRA'd "
                        "encoders (train mode; CLIP and LoRA have no dropout), WITH gradient",
        "target": "epsilon: noise",
        "lora": "r=4 alpha=4; unet targets to_k,to_q,to_v,to_out.0 (unet.add_adapter), text encoders "
                "q_proj,k_proj,v_proj,out_proj (peft inject_adapter_in_model); weights = before.* (A ~ N(0, 1/4), "
                "B ~ N(0, 0.05), one torch.Generator per model in its sorted parameter-name order: "
                f"seeds {LORA_SEEDS})",
        "loss": "mse(model_pred, noise), mean over all elements; snr_gamma5_loss uses min(snr,5)/snr (epsilon); "
                "reported, not back-propagated",
        "grads": "grad.* are the raw gradients of loss, before clipping",
        "optimizer": "clip_grad_norm_ over ALL LoRA params (unet + both text encoders) to 1.0, then one AdamW step, "
                     "one param group: lr=1e-4 (the SDXL script's --learning_rate default; the text encoders "
                     "get the same lr), betas=(0.9,0.999), weight_decay=1e-2, eps=1e-8",
        "lr": OPT["lr"], "betas": list(OPT["betas"]), "weight_decay": OPT["weight_decay"], "eps": OPT["eps"],
        "max_grad_norm": MAX_GRAD_NORM,
        "param_names": "unet: peft names (down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default"
                       ".weight); text encoders: 'text_encoder.' / 'text_encoder_2.' + peft name inside that model "
                       "(text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.default.weight, "
                       "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight)",
        "num_params": {"unet": n_unet, "text_encoder": sum(1 for n in params if n.startswith("text_encoder.")),
                       "text_encoder_2": sum(1 for n in params if n.startswith("text_encoder_2."))},
        "params_without_grad": no_grad,
        "params_without_grad_note": "grad None in torch (not merely zero): these LoRA layers sit in text_encoder's "
                                    "last layer, whose output the SDXL conditioning never uses. grad.* stores zeros "
                                    "for them; AdamW skips them (no update, no weight decay): after == before",
        "loss_value": float(loss), "grad_norm_before_clip": float(norm),
    }, f"{gold}/train_step.json")
    # The same step with max_grad_norm 0.01 (the norm above is far below 1.0, so there clipping is a no-op).
    clipped, _ = train_step(0.01)
    for k in ("loss", "grad_norm_before_clip"):
        assert torch.equal(clipped[k], step[k])
    save_file(clipped, f"{gold}/train_step_clip0.01.safetensors")

    # 6. Sampling: 4 steps, CFG 5.0, negative_prompt None (-> zero negative embeddings), fixed initial latents.
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    samp = {"init_latents": init}

    def run(p, tag):
        calls = []

        def pre(_m, args, kwargs):
            calls.append({k: kwargs["added_cond_kwargs"][k].detach().clone() for k in ("text_embeds", "time_ids")}
                         | {"encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone()})
        h = p.unet.register_forward_pre_hook(pre, with_kwargs=True)
        with torch.no_grad():
            img = p(SAMPLING_PROMPT, negative_prompt=None, num_inference_steps=4, guidance_scale=5.0,
                    height=64, width=64, latents=init.clone(), output_type="np").images[0]
        h.remove()
        samp[f"image_{tag}"] = torch.from_numpy(img).float().contiguous()
        return calls

    pipe = load_pipe()
    calls = run(pipe, "euler")
    sch = pipe.scheduler
    samp["timesteps_euler"] = sch.timesteps.clone()
    samp["sigmas_euler"] = sch.sigmas.float().clone()
    samp["init_noise_sigma_euler"] = torch.tensor([float(sch.init_noise_sigma)])
    samp["unet_in_time_ids"] = calls[0]["time_ids"]
    samp["unet_in_text_embeds"] = calls[0]["text_embeds"]
    samp["unet_in_encoder_hidden_states"] = calls[0]["encoder_hidden_states"]
    assert all(torch.equal(c["time_ids"], calls[0]["time_ids"]) for c in calls)
    vae_dtype = str(pipe.vae.dtype)
    pipe.scheduler = DDIMScheduler.from_config(sch.config)
    run(pipe, "ddim")
    samp["timesteps_ddim"] = pipe.scheduler.timesteps.clone()

    pipe = load_pipe()
    pipe.load_lora_weights(f"{gold}/lora-diffusers")
    with torch.no_grad():  # the file must reproduce the fixed LoRA's outputs
        chk_unet = max_abs(unet_call(pipe.unet, sample, timesteps, ehs, text_embeds, time_ids), out_lora)
        pe_l, _, pooled_l, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        chk_te = max(max_abs(pe_l, te_lora["prompt_embeds"]), max_abs(pooled_l, te_lora["pooled_prompt_embeds"]))
    assert chk_unet < 1e-5 and chk_te < 1e-5, (chk_unet, chk_te)
    run(pipe, "euler_lora")
    save_file(samp, f"{gold}/sampling.safetensors")
    dump_json({
        "prompt": SAMPLING_PROMPT, "negative_prompt": None, "steps": 4, "guidance_scale": 5.0,
        "height": 64, "width": 64, "pipeline": "StableDiffusionXLPipeline.from_pretrained(sdxl-tiny, "
        "torch_dtype=float32, add_watermarker=False), force_zeros_for_empty_prompt true",
        "negative": "negative_prompt None + force_zeros_for_empty_prompt -> negative prompt_embeds and pooled are "
                    "zeros (unet_in_encoder_hidden_states[0], unet_in_text_embeds[0])",
        "add_time_ids": samp["unet_in_time_ids"].tolist(),
        "add_time_ids_note": "original_size = target_size = (64, 64), crops_coords_top_left (0, 0); the negative "
                             "row uses the same ids (negative_original_size not given)",
        "schedulers": "euler: the model's EulerDiscreteScheduler (leading spacing, steps_offset 1, epsilon); "
                      "ddim: DDIMScheduler.from_config(euler config) (leading, steps_offset 1, set_alpha_to_one "
                      "false, eta 0)",
        "lora": "image_euler_lora: load_lora_weights(golden-sdxl/lora-diffusers) (unet + both text encoders, "
                "scale 1); checked: unet max abs diff to out_with_lora "
                f"{chk_unet:.3g}, encode_prompt vs text_encoders_lora {chk_te:.3g}",
        "vae": f"vae dtype {vae_dtype}: force_upcast only acts on a float16 VAE, so no upcast happened here; "
               "latents / 0.13025 then decode",
        "init_latents": "torch.randn(1,4,8,8, Generator seed 99); the pipeline multiplies by init_noise_sigma",
        "image_*": "HWC float in [0,1] as output_type='np'",
    }, f"{gold}/sampling.json")

    # 7. Preprocessing geometry of the SDXL script (Resize(res) -> optional flip -> center crop, offsets by round()).
    from PIL import Image
    from torchvision import transforms
    resize = transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.BILINEAR)
    center = transforms.CenterCrop(RESOLUTION)
    rows = []
    for h, w in PREPROCESS_SIZES:
        img = resize(Image.new("RGB", (w, h)))
        rh, rw = img.height, img.width
        y1 = max(0, int(round((rh - RESOLUTION) / 2.0)))
        x1 = max(0, int(round((rw - RESOLUTION) / 2.0)))
        # torchvision's CenterCrop must cut at the same place: crop a map of coordinates.
        coords = torch.stack(torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij")).float()
        cut = center(coords)
        assert (int(cut[0, 0, 0]), int(cut[1, 0, 0])) == (y1, x1)
        # With --random_flip the script flips BEFORE the crop (and records (y1, x1) of the flipped image).
        flipped_cut = center(torch.flip(coords, dims=[2]))
        x1_unflipped = int(flipped_cut[1, 0, -1])
        rows.append({
            "original": [h, w], "resized": [rh, rw], "crop_top_left": [y1, x1],
            "time_ids": compute_time_ids((h, w), (y1, x1))[0].int().tolist(),
            "flipped_crop_columns_of_unflipped_image": [x1_unflipped, x1_unflipped + RESOLUTION],
            "flip_then_crop_equals_crop_then_flip": x1_unflipped == x1,
        })
    dump_json({
        "resolution": RESOLUTION,
        "resize": "transforms.Resize(64, BILINEAR) on PIL: short side -> 64, long side -> int(64 * long / short) "
                  "(truncated); the interpolation (script default lanczos) does not change the geometry",
        "crop": "--center_crop: y1 = max(0, int(round((H - 64) / 2.0))), x1 likewise (python round: half to even); "
                "equal to torchvision CenterCrop's offsets (checked). Without --center_crop the script uses "
                "RandomCrop.get_params (random, recorded as is).",
        "flip": "--random_flip: the resized image is flipped (p=0.5 via python random) BEFORE cropping; crop_top_left "
                "is the offset in the flipped image. flipped_crop_columns_of_unflipped_image gives the columns "
                "[a, b) of the unflipped resized image that the crop covers (then mirrored).",
        "time_ids": "compute_time_ids = [orig_h, orig_w, y1, x1, 64, 64] (original size is the PIL image before resize)",
        "cases": rows,
    }, f"{gold}/preprocess.json")

    # 8. meta.json
    meta.update({
        "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__,
        "torchvision": __import__("torchvision").__version__,
        "safetensors": __import__("safetensors").__version__, "tokenizers": __import__("tokenizers").__version__,
        "dtype_on_disk": "float16", "compute": "float32 CPU", "prompts": PROMPTS,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE.items()},
        "text_encoder_config": TEXT_1, "text_encoder_2_config": TEXT_2, "scheduler_config": SDXL_SCHEDULER,
        "seeds": {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "unet_inputs": 1234,
                  "init_latents": 99, "lora": LORA_SEEDS},
        "lora_keys": {"diffusers": len(keys_of(f"{gold}/lora-diffusers/pytorch_lora_weights.safetensors")),
                      "kohya": len(kohya)},
    })
    dump_json(meta, f"{gold}/meta.json")
    print(json.dumps({"loss": float(loss), "grad_norm_before_clip": float(norm),
                      "unet_lora_effect": max_abs(out_lora, out),
                      "te_lora_effect": max_abs(te_lora["prompt_embeds"], te["prompt_embeds"])}))


if __name__ == "__main__":
    main()
