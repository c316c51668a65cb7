//! SDXL parity: the tiny SDXL-shaped pipeline `tests/fixtures/sdxl-tiny/` (two text encoders,
//! the second with a projection; a `text_time` UNet with per-block transformer depth; F16 on
//! disk, loaded as f32) against diffusers/transformers/peft goldens in
//! `tests/fixtures/golden-sdxl/` (made by `tools/reference/make_sdxl_fixtures.py`; see its
//! README). Each test states its tolerance; f32 CPU parity is ~1e-4 relative, as SD 1.x/2.x.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::adapters::lora::{apply_lora_file, inject, load_peft_tensors, InitRng, LoraSpec, TrainableLora};
use lora::inference::{self as pipeline, GenerateOptions};
use lora::models::{Conditioning, LoadOptions, StableDiffusion};
use lora::schedulers::{Ddpm, SamplerKind};
use lora::train::optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use lora::train::step::{denoising_loss, LossOptions};
use lora::vocab::Family;
use rand::SeedableRng;

use crate::support::{rel_diff, scalar, timesteps_u32, to_vec_f32};

/// f32 CPU forward parity: max |ours − reference| ≤ 1e-4 · max |reference|.
const REL_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden-sdxl").join(name), &Device::Cpu).expect("golden file loads")
}

fn sdxl() -> StableDiffusion {
    StableDiffusion::load(fixtures().join("sdxl-tiny").to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32)
        .expect("sdxl-tiny loads (F16 weights upcast to F32)")
}

const PROMPTS: [&str; 3] = ["a red circle on a white background", "Two GREEN squares, side by side!", ""];

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) -> f32 {
    let rel = rel_diff(ours, reference);
    eprintln!("{what}: relative error {rel:e} (tolerance {REL_TOL:e})");
    assert!(rel <= REL_TOL, "{what}: relative error {rel:e} > {REL_TOL:e}");
    rel
}

#[test]
fn sdxl_is_recognised_from_its_configs() {
    let sd = sdxl();
    assert_eq!(sd.family, Family::Sdxl);
    assert_eq!(sd.text.pairs.len(), 2, "two (tokenizer, encoder) pairs");
    assert!(sd.force_zeros_for_empty_prompt, "model_index.json says force_zeros_for_empty_prompt");
    let add = sd.unet.config().addition.expect("text_time embedding");
    assert_eq!((add.time_embed_dim, add.input_dim, add.pooled_dim()), (8, 80, 32));
    assert_eq!(sd.unet.config().transformer_layers_per_block, vec![1, 1, 2]);
    assert_eq!(sd.vae.scaling_factor(), 0.13025);
    assert_eq!(sd.text.pairs[1].tokenizer.pad_id(), 0, "tokenizer_2 pads with `!` (id 0)");
}

#[test]
fn sdxl_tokenizers_and_text_encoders_match_transformers() {
    let sd = sdxl();
    let g = golden("text_encoders.safetensors");
    for (i, pair) in sd.text.pairs.iter().enumerate() {
        let n = i + 1;
        let ids = pair.tokenizer.encode_batch(&PROMPTS, &Device::Cpu).unwrap();
        let want: Vec<Vec<u32>> = g[&format!("input_ids_{n}")].to_dtype(DType::U32).unwrap().to_vec2().unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), want, "tokenizer {n} ids");
        let out = pair.encoder.forward_all(&ids).unwrap();
        assert_close(&format!("text encoder {n} penultimate"), &out.penultimate, &g[&format!("penultimate_{n}")]);
        assert_close(&format!("text encoder {n} last hidden state"), &out.last_hidden_state, &g[&format!("last_hidden_state_{n}")]);
        if n == 2 {
            assert_close("text encoder 2 pooled (text_embeds)", out.text_embeds.as_ref().unwrap(), &g["pooled_2"]);
        } else {
            assert!(out.text_embeds.is_none(), "the first encoder has no projection");
        }
    }
    // The one encode function: both penultimate states side by side, pooled from encoder 2.
    let cond = sd.text.encode(&PROMPTS, &Device::Cpu).unwrap();
    assert_close("prompt_embeds", &cond.context, &g["prompt_embeds"]);
    assert_close("pooled_prompt_embeds", cond.pooled.as_ref().unwrap(), &g["pooled_prompt_embeds"]);
    assert!(cond.time_ids.is_none(), "time ids come from the images");
}

fn unet_inputs() -> (HashMap<String, Tensor>, Conditioning) {
    let g = golden("unet.safetensors");
    let cond = Conditioning { context: g["encoder_hidden_states"].clone(), pooled: Some(g["text_embeds"].clone()), time_ids: Some(g["time_ids"].clone()) };
    (g, cond)
}

#[test]
fn sdxl_unet_with_time_ids_matches_diffusers() {
    let sd = sdxl();
    let (g, cond) = unet_inputs();
    let out = sd.unet.forward(&g["sample"], &g["timesteps"], &cond).unwrap();
    assert_close("sdxl unet", &out, &g["out"]);
    // Without the pooled embedding and time ids the SDXL UNet refuses, naming what is missing.
    let err = sd.unet.forward(&g["sample"], &g["timesteps"], &Conditioning::context(g["encoder_hidden_states"].clone())).unwrap_err().to_string();
    assert!(err.contains("pooled"), "{err}");
    // The time ids matter: other crops give another output.
    let other = Conditioning { time_ids: Some((&g["time_ids"] + 8.0).unwrap()), ..cond };
    let moved = sd.unet.forward(&g["sample"], &g["timesteps"], &other).unwrap();
    assert!(rel_diff(&moved, &g["out"]) > 10.0 * REL_TOL, "time ids must change the output");
}

fn with_lora(file: &str) -> StableDiffusion {
    let mut sd = sdxl();
    apply_lora_file(&mut sd, &fixtures().join("golden-sdxl").join(file), 1.0).unwrap();
    sd
}

fn check_lora(file: &str) {
    let sd = with_lora(file);
    let (g, cond) = unet_inputs();
    let out = sd.unet.forward(&g["sample"], &g["timesteps"], &cond).unwrap();
    let want = &golden("unet_lora.safetensors")["out_with_lora"];
    assert_close(&format!("sdxl unet with {file}"), &out, want);
    assert!(rel_diff(&g["out"], want) > 10.0 * REL_TOL, "the LoRA must change the output");
    let t = golden("text_encoders_lora.safetensors");
    let cond = sd.text.encode(&PROMPTS, &Device::Cpu).unwrap();
    assert_close(&format!("prompt_embeds with {file}"), &cond.context, &t["prompt_embeds"]);
    assert_close(&format!("pooled with {file}"), cond.pooled.as_ref().unwrap(), &t["pooled_prompt_embeds"]);
    assert!(rel_diff(&t["pooled_prompt_embeds"], &golden("text_encoders.safetensors")["pooled_prompt_embeds"]) > 10.0 * REL_TOL);
}

#[test]
fn sdxl_diffusers_lora_on_unet_and_both_text_encoders_matches_diffusers() {
    // 1e-4 relative (f32 CPU) on the UNet output and on both encoders' conditioning.
    check_lora("lora-diffusers/pytorch_lora_weights.safetensors");
}

#[test]
fn sdxl_kohya_lora_from_diffusers_conversion_matches_diffusers() {
    // diffusers' convert_state_dict_to_kohya: `lora_te1_encoder_layers_*` (transformers 5 names,
    // no `text_model_`), `lora_te2_text_model_*`; 1e-4 relative.
    check_lora("lora-kohya.safetensors");
}

/// Inject the reference LoRA (UNet to_q/k/v/out.0; both encoders q/k/v/out_proj) with the
/// golden `before.*` weights. Returns (UNet, encoder 1, encoder 2) branches.
fn injected(sd: &mut StableDiffusion, step: &HashMap<String, Tensor>) -> (Vec<TrainableLora>, Vec<Vec<TrainableLora>>) {
    let mut rng = InitRng::seed_from_u64(0);
    let unet = inject(sd.unet.linears_mut(), &LoraSpec::reference_unet(4), &mut rng).unwrap();
    load_peft_tensors(&unet, step, "before.").unwrap();
    let mut te = Vec::new();
    for (i, linears) in sd.text.linears_mut().into_iter().enumerate() {
        let loras = inject(linears, &LoraSpec::reference_text_encoder(4), &mut rng).unwrap();
        // The golden names: `text_encoder.encoder.layers…` (transformers 5 saved the first
        // encoder without `text_model.`), `text_encoder_2.text_model.encoder.layers…`.
        let prefix = if i == 0 { "before.text_encoder." } else { "before.text_encoder_2." };
        let renamed: HashMap<String, Tensor> = step
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (if rest.starts_with("text_model.") { rest.to_string() } else { format!("text_model.{rest}") }, v.clone())))
            .collect();
        load_peft_tensors(&loras, &renamed, "").unwrap();
        te.push(loras);
    }
    (unet, te)
}

/// The golden name of a branch's parameter (A or B).
fn golden_name(component: usize, peft_name: &str) -> String {
    match component {
        0 => peft_name.to_string(),
        1 => format!("text_encoder.{}", peft_name.strip_prefix("text_model.").unwrap_or(peft_name)),
        _ => format!("text_encoder_2.{peft_name}"),
    }
}

#[test]
fn sdxl_train_step_with_unet_and_text_encoder_lora_matches_torch() {
    let step = golden("train_step.safetensors");
    let mut sd = sdxl();
    let (unet_loras, te_loras) = injected(&mut sd, &step);
    let ddpm = Ddpm::from_config(&sd.scheduler).unwrap();
    let d = golden("ddpm.safetensors");
    let u = golden("unet.safetensors");
    // Conditioning through both LoRA'd encoders, with gradients; time ids from the geometry.
    let ids = [step["input_ids_1"].clone(), step["input_ids_2"].clone()];
    let cond = sd.text.encode_ids(&ids, &Device::Cpu).unwrap().with_time_ids(step["time_ids"].clone());
    assert_close("train prompt_embeds", &cond.context, &step["prompt_embeds"]);
    let ts = timesteps_u32(&d["timesteps"]);
    let loss = denoising_loss(&sd.unet, &ddpm, &u["sample"], &d["noise"], &ts, &cond, &LossOptions::default()).unwrap();
    let (ours, want) = (scalar(&loss), scalar(&step["loss"]));
    let rel = (ours - want).abs() / want.abs();
    eprintln!("sdxl train loss: ours {ours} torch {want} relative {rel:e} (tolerance 1e-4)");
    assert!(rel <= 1e-4, "loss {ours} vs torch {want}: relative {rel:e} > 1e-4");
    let snr = denoising_loss(&sd.unet, &ddpm, &u["sample"], &d["noise"], &ts, &cond, &LossOptions { snr_gamma: Some(5.0), ..Default::default() }).unwrap();
    let rel = (scalar(&snr) - scalar(&step["snr_gamma5_loss"])).abs() / scalar(&step["snr_gamma5_loss"]);
    assert!(rel <= 1e-4, "snr_gamma5_loss: relative {rel:e} > 1e-4");

    let grads = loss.backward().unwrap();
    let mut names = Vec::new();
    let mut vars = Vec::new();
    let mut gs = Vec::new();
    let mut unused = Vec::new();
    let components: Vec<&Vec<TrainableLora>> = std::iter::once(&unet_loras).chain(te_loras.iter()).collect();
    for (c, loras) in components.iter().enumerate() {
        for l in loras.iter() {
            for (var, name) in [(&l.down, l.peft_down_name()), (&l.up, l.peft_up_name())] {
                let gname = golden_name(c, &name);
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.clone(),
                    None => {
                        // Only the first encoder's last layer is off the path (penultimate states).
                        assert!(c == 1 && name.contains("encoder.layers.2."), "{gname}: no gradient");
                        unused.push(names.len());
                        var.as_tensor().zeros_like().unwrap()
                    }
                };
                names.push(gname);
                vars.push(var.clone());
                gs.push(g);
            }
        }
    }
    assert_eq!(names.len(), 320, "272 UNet + 24 + 24 text-encoder parameters");
    assert_eq!(unused.len(), 8, "encoder 1's last layer: 4 projections x (A, B)");
    // Every LoRA gradient: |ours − torch| ≤ 1e-4 · max(1, |torch|) per element.
    let mut worst = 0f32;
    for (name, g) in names.iter().zip(&gs) {
        let want = &step[&format!("grad.{name}")];
        let err = to_vec_f32(g).iter().zip(to_vec_f32(want)).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        assert!(err <= 1e-4, "grad.{name}: error {err:e} > 1e-4");
        worst = worst.max(err);
    }
    eprintln!("sdxl grads: worst error vs max(1,|g|) {worst:e} (tolerance 1e-4)");
    let norm = global_grad_norm(&gs).unwrap();
    let want = scalar(&step["grad_norm_before_clip"]) as f64;
    assert!(((norm - want) / want).abs() <= 5e-4, "grad norm {norm} vs {want}");

    // Clip 1.0 (a no-op here: norm 0.073) and one AdamW step at the SDXL script's lr 1e-4;
    // parameters without a gradient are skipped (torch: `.grad` None), weight decay included.
    clip_grad_norm(&mut gs, 1.0).unwrap();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, ..Default::default() };
    let mut opt = AdamW::new_named(vars.clone(), names.clone(), cfg).unwrap();
    let some: Vec<Option<&Tensor>> = gs.iter().enumerate().map(|(i, g)| (!unused.contains(&i)).then_some(g)).collect();
    opt.step_some(&some, 1e-4).unwrap();
    // README: lr 1e-4. AdamW's first step moves an element by lr·g/(|g|+eps), which is
    // sensitive to tiny gradient differences where |g| is near eps: 1e-6 absolute where
    // |g| > 1e-5, else 1.1e-4 (within one update's size).
    let mut worst = 0f64;
    for (name, var) in names.iter().zip(&vars) {
        let g = to_vec_f32(&step[&format!("grad.{name}")]);
        for ((o, w), g) in to_vec_f32(var.as_tensor()).iter().zip(to_vec_f32(&step[&format!("after.{name}")])).zip(g) {
            let err = (o - w).abs() as f64;
            let tol = if g.abs() > 1e-5 { 1e-6 } else { 1.1e-4 };
            assert!(err <= tol, "after.{name}: error {err:e} > {tol:e} (|grad| {})", g.abs());
            if g.abs() > 1e-5 {
                worst = worst.max(err);
            }
        }
    }
    eprintln!("sdxl after.* where |g| > 1e-5: worst abs error {worst:e} (tolerance 1e-6)");
    for &i in &unused {
        assert_eq!(to_vec_f32(vars[i].as_tensor()), to_vec_f32(&step[&format!("before.{}", names[i])]), "{} must not move", names[i]);
    }
}

fn golden_rgb8(t: &Tensor) -> Vec<u8> {
    to_vec_f32(t).iter().map(|v| (v * 255.0).round() as u8).collect()
}

fn sample_and_compare(sd: &StableDiffusion, kind: SamplerKind, name: &str) {
    let g = golden("sampling.safetensors");
    let opts = GenerateOptions {
        prompt: PROMPTS[0].to_string(),
        negative_prompt: String::new(),
        sampler: kind,
        steps: 4,
        guidance_scale: 5.0,
        height: 64,
        width: 64,
        seed: 0,
        progress: false,
    };
    let images = pipeline::generate(sd, &opts, 1, Some(&g["init_latents"]), &Device::Cpu).unwrap();
    let got = pipeline::to_rgb8(&images[0]).unwrap().into_raw();
    let want = golden_rgb8(&g[&format!("image_{name}")]);
    let diff = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    eprintln!("sdxl {name}: max pixel difference {diff}/255 (tolerance 2/255)");
    assert!(diff <= 2, "sdxl {name}: a pixel channel differs by {diff}/255 > 2/255");
}

#[test]
fn sdxl_euler_and_ddim_with_zero_negative_match_diffusers() {
    // Guidance 5, no negative prompt (force_zeros_for_empty_prompt: zeros, not the encoding of
    // ""), time ids (64, 64, 0, 0, 64, 64); within 2/255 at every channel.
    let sd = sdxl();
    sample_and_compare(&sd, SamplerKind::Euler, "euler");
    sample_and_compare(&sd, SamplerKind::Ddim, "ddim");
    let lora = with_lora("lora-diffusers/pytorch_lora_weights.safetensors");
    sample_and_compare(&lora, SamplerKind::Euler, "euler_lora");
}

#[test]
fn sdxl_preprocessing_geometry_matches_the_script() {
    // torchvision's Resize truncates the long side; the script's center-crop offsets use
    // Python's round (half to even).
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden-sdxl/preprocess.json")).unwrap()).unwrap();
    let cases = json["cases"].as_array().expect("a list of cases");
    assert!(cases.len() >= 6);
    for c in cases {
        let v = |k: &str| -> Vec<u32> { serde_json::from_value(c[k].clone()).unwrap() };
        let (orig, resized, crop) = (v("original"), v("resized"), v("crop_top_left"));
        let (w, h) = lora::data::transform::resized_size(orig[1], orig[0], 64);
        assert_eq!(vec![h, w], resized, "resize of {orig:?} (height, width)");
        let (top, left) = (lora::data::transform::center_crop_offset(h, 64), lora::data::transform::center_crop_offset(w, 64));
        assert_eq!(vec![top, left], crop, "center crop of {orig:?}");
        let ids = lora::models::conditioning::time_ids((orig[0] as usize, orig[1] as usize), (top as usize, left as usize), (64, 64));
        let want: Vec<f32> = serde_json::from_value(c["time_ids"].clone()).unwrap();
        assert_eq!(ids.to_vec(), want, "time ids of {orig:?}");
        // Flip, then crop at `left`: the columns of the unflipped image that end up in the crop.
        let cols = v("flipped_crop_columns_of_unflipped_image");
        assert_eq!(vec![w - 64 - left, w - left], cols, "flip-then-crop window of {orig:?}");
    }
}

#[test]
fn each_fixture_has_its_family_and_default_resolution() {
    // What `preprocess.resolution` falls back to: 512 for SD 1.x, 768 for an SD 2.x v-prediction
    // model, 1024 for SDXL (the reference scripts' defaults for those models).
    for (dir, family, resolution) in [("tiny-sd", Family::Sd1, 512), ("sd2-tiny", Family::Sd2, 768), ("sdxl-tiny", Family::Sdxl, 1024)] {
        let sd = StableDiffusion::load(fixtures().join(dir).to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!((sd.family, sd.default_resolution()), (family, resolution), "{dir}");
    }
    assert_eq!(Family::Sd2.default_resolution(lora::vocab::PredictionType::Epsilon), 512, "SD 2.x base");
    // The SDXL script keeps the model's own VAE in f32 under any precision; the SD 1.x script
    // casts it to the weight dtype.
    let load = |dir: &str| StableDiffusion::load(fixtures().join(dir).to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!((load("sdxl-tiny").vae.dtype(), load("tiny-sd").vae.dtype()), (DType::F32, DType::BF16));
}

#[test]
fn sdxl_kohya_lora_with_original_layout_unet_names_matches_diffusers() {
    // The golden LoRA with its UNet modules named as kohya sd-scripts names SDXL's
    // (`lora_unet_input_blocks_4_1_…`): every stem is the one ComfyUI's own map gives for that
    // module (tests/fixtures/ui-lora-keys-sdxl.json), and applied it gives diffusers' output
    // (1e-4 relative) and image (2/255).
    let weights = lora::adapters::read_lora_file(&fixtures().join("golden-sdxl/lora-diffusers/pytorch_lora_weights.safetensors")).unwrap();
    let sd = sdxl();
    let ldm = lora::adapters::ldm_names::to_ldm_unet_names(&weights, sd.unet.config()).unwrap();
    let ui: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("ui-lora-keys-sdxl.json")).unwrap()).unwrap();
    let sgm = ui["layouts"]["sdxl-tiny"]["stems"]["unet_sgm"].as_object().unwrap();
    for name in ldm.unet.keys() {
        let stem = format!("lora_unet_{}", name.replace('.', "_"));
        let module = sgm.get(&stem).unwrap_or_else(|| panic!("{stem} is not an SGM stem ComfyUI knows"));
        assert!(weights.unet.contains_key(module.as_str().unwrap()), "{stem} maps to {module}, not one of the LoRA's modules");
    }
    assert_eq!(ldm.unet.len(), weights.unet.len());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sgm.safetensors");
    lora::adapters::write_lora_file(&ldm, &file, lora::adapters::LoraFormat::Kohya).unwrap();
    let names = safetensors::SafeTensors::deserialize(&std::fs::read(&file).unwrap()).unwrap().names().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(names.iter().any(|k| k.starts_with("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.")), "kohya's SDXL names");
    let mut applied = sdxl();
    apply_lora_file(&mut applied, &file, 1.0).unwrap();
    let (g, cond) = unet_inputs();
    let out = applied.unet.forward(&g["sample"], &g["timesteps"], &cond).unwrap();
    assert_close("sdxl unet with original-layout kohya LoRA", &out, &golden("unet_lora.safetensors")["out_with_lora"]);
    sample_and_compare(&applied, SamplerKind::Euler, "euler_lora");
}
