//! Single-file checkpoints: the LDM-layout files in `tests/fixtures/single-file/` (made from the
//! tiny SD 1.5 and SD 2.x folders by `tools/reference/make_single_file.py`, whose layout round
//! trips through diffusers' own `from_single_file`) load into the same networks as the folders.
//!
//! Tolerance: none. The same stored values (f32, or f16 upcast to f32 exactly) go through the
//! same code, so the UNet, VAE and text-encoder outputs must be bit for bit equal; any renaming
//! slip (a swapped q/k/v slice, a wrong block index) changes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora::models::loading::{HubSettings, LoadOptions, StableDiffusion};
use lora::models::single_file::recognition::Family;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn offline_hub(cache: &Path) -> HubSettings {
    HubSettings { cache_dir: cache.to_path_buf(), endpoint: "http://127.0.0.1:9".into(), offline: true, token: None, progress: false }
}

fn load(source: &Path, opts: &LoadOptions) -> anyhow::Result<StableDiffusion> {
    let cache = tempfile::tempdir().unwrap();
    StableDiffusion::load_with(source.to_str().unwrap(), opts, &offline_hub(cache.path()), &Device::Cpu, DType::F32)
}

fn with_config(folder: &str) -> LoadOptions {
    LoadOptions { config: Some(fixtures().join(folder)), ..Default::default() }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// Deterministic inputs: `sin(k · 0.37 + phase)` over the tensor's elements.
fn wave(shape: &[usize], phase: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37 + phase).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The same inputs for every network; outputs as flat vectors (text, unet, vae mean, vae decode).
fn outputs(sd: &StableDiffusion) -> [Vec<f32>; 4] {
    let dev = Device::Cpu;
    let ids = sd.text.pairs[0].tokenizer.encode_batch(&["a red circle on a white background", ""], &dev).unwrap();
    let text = sd.text.pairs[0].encoder.forward(&ids).unwrap();
    let sample = wave(&[2, sd.unet.config().in_channels, 8, 8], 0.1);
    let timesteps = Tensor::new(&[10f32, 731.0], &dev).unwrap();
    let unet = sd.unet.forward(&sample, &timesteps, &lora::models::Conditioning::context(text.clone())).unwrap();
    let image = wave(&[1, 3, 64, 64], 0.7);
    let latent = sd.vae.encode(&image).unwrap();
    let decoded = sd.vae.decode(&latent.mean).unwrap();
    [values(&text), values(&unet), values(&latent.mean), values(&decoded)]
}

/// Outputs of two models on the same inputs.
fn same_inputs_outputs(a: &StableDiffusion, b: &StableDiffusion) -> ([Vec<f32>; 4], [Vec<f32>; 4]) {
    (outputs(a), outputs(b))
}

fn assert_same(what: &str, a: &StableDiffusion, b: &StableDiffusion) {
    let (x, y) = same_inputs_outputs(a, b);
    for (name, (p, q)) in ["text encoder", "unet", "vae encoder", "vae decoder"].iter().zip(x.iter().zip(&y)) {
        assert_eq!(p.len(), q.len(), "{what}: {name} output sizes");
        let differing = p.iter().zip(q).filter(|(u, v)| u.to_bits() != v.to_bits()).count();
        assert_eq!(differing, 0, "{what}: {name} differs in {differing} of {} values", p.len());
    }
}

fn single(name: &str) -> PathBuf {
    fixtures().join("single-file").join(name)
}

/// Rewrite a safetensors file with `edit` applied to its tensors (dtypes kept).
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(src, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dst).unwrap();
}

#[test]
fn sd1_single_file_gives_the_folders_networks_bit_for_bit() {
    let folder = load(&fixtures().join("tiny-sd"), &LoadOptions::default()).unwrap();
    let file = load(&single("tiny-sd.safetensors"), &with_config("tiny-sd")).unwrap();
    let rec = file.single_file.as_ref().expect("recognised as a single file");
    assert_eq!(rec.family, Family::Sd1);
    assert_eq!(rec.prediction.kind.as_str(), "epsilon");
    // The file's DDPM buffers are left out knowingly, not silently.
    assert!(rec.ignored.iter().any(|(n, _)| n == "alphas_cumprod"), "{:?}", rec.ignored);
    assert_eq!(file.scheduler.class_name.as_deref(), Some("PNDMScheduler"));
    assert_same("SD 1.x single file vs folder", &folder, &file);
}

#[test]
fn sd2_single_file_splits_open_clip_qkv_and_matches_the_folder() {
    let folder = load(&fixtures().join("sd2-tiny"), &LoadOptions::default()).unwrap();
    let file = load(&single("sd2-tiny.safetensors"), &with_config("sd2-tiny")).unwrap();
    let rec = file.single_file.as_ref().unwrap();
    assert_eq!(rec.family, Family::Sd2);
    assert_eq!(rec.prediction.kind.as_str(), "v_prediction");
    assert_eq!(file.scheduler.prediction_type, "v_prediction");
    assert!(rec.ignored.iter().any(|(n, _)| n == "cond_stage_model.model.text_projection"), "{:?}", rec.ignored);
    assert_same("SD 2.x single file vs folder", &folder, &file);
    let text = rec.describe();
    assert!(text.contains("recognised as SD 2.x") && text.contains("OpenCLIP") && text.contains("linear projection"), "{text}");
}

#[test]
fn recognition_without_a_config_reads_the_shapes() {
    // The tiny UNet's layout is SD 1.x's (8 heads per block) but its 32-wide text encoder has no
    // 64-wide heads: recognition must say so and point at `config` rather than guess.
    let err = format!("{:#}", load(&single("tiny-sd.safetensors"), &LoadOptions::default()).err().expect("must fail"));
    assert!(err.contains("32 wide") && err.contains("[model] config"), "{err}");
    // The prediction type can be overridden, and the override is reported.
    let opts = LoadOptions { prediction_type: Some(lora::vocab::PredictionType::VPrediction), ..with_config("tiny-sd") };
    let sd = load(&single("tiny-sd.safetensors"), &opts).unwrap();
    let rec = sd.single_file.as_ref().unwrap();
    assert_eq!((rec.prediction.kind.as_str(), rec.prediction.reason.as_str()), ("v_prediction", "set by [model] prediction_type"));
    assert_eq!(sd.scheduler.prediction_type, "v_prediction");
}

#[test]
fn a_missing_or_extra_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    rewrite(&single("tiny-sd.safetensors"), &missing, |t| {
        t.remove("model.diffusion_model.input_blocks.1.0.in_layers.2.bias").unwrap();
    });
    let err = format!("{:#}", load(&missing, &with_config("tiny-sd")).err().expect("must fail"));
    assert!(
        err.contains("down_blocks.0.resnets.0.conv1.bias") && err.contains("model.diffusion_model.input_blocks.1.0.in_layers.2.bias"),
        "{err}"
    );

    let missing_qkv = dir.path().join("missing-qkv.safetensors");
    rewrite(&single("sd2-tiny.safetensors"), &missing_qkv, |t| {
        t.remove("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias").unwrap();
    });
    let err = format!("{:#}", load(&missing_qkv, &with_config("sd2-tiny")).err().expect("must fail"));
    assert!(err.contains("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"), "{err}");

    let extra = dir.path().join("extra.safetensors");
    rewrite(&single("tiny-sd.safetensors"), &extra, |t| {
        t.insert("model.diffusion_model.extra_head.weight".into(), Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap());
    });
    let err = format!("{:#}", load(&extra, &with_config("tiny-sd")).err().expect("must fail"));
    assert!(err.contains("model.diffusion_model.extra_head.weight"), "{err}");

    let stray = dir.path().join("stray.safetensors");
    rewrite(&single("tiny-sd.safetensors"), &stray, |t| {
        t.insert("control_model.zero_convs.0.weight".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    });
    let err = format!("{:#}", load(&stray, &with_config("tiny-sd")).err().expect("must fail"));
    assert!(err.contains("control_model.zero_convs.0.weight"), "{err}");
}

#[test]
fn ema_weights_are_chosen_only_when_asked() {
    // A file with EMA copies (`model_ema.<name without dots>`) holding the true weights and the
    // plain UNet weights halved: `ema = true` must give the folder's UNet, the default must not.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ema.safetensors");
    rewrite(&single("tiny-sd.safetensors"), &path, |t| {
        let unet: Vec<String> = t.keys().filter(|k| k.starts_with("model.diffusion_model.")).cloned().collect();
        for k in unet {
            let v = t[&k].clone();
            t.insert(format!("model_ema.{}", k.strip_prefix("model.").unwrap().replace('.', "")), v.clone());
            t.insert(k, (v * 0.5).unwrap());
        }
        t.insert("model_ema.decay".into(), Tensor::new(0.9999f32, &Device::Cpu).unwrap());
    });
    let folder = load(&fixtures().join("tiny-sd"), &LoadOptions::default()).unwrap();
    let ema = load(&path, &LoadOptions { ema: true, ..with_config("tiny-sd") }).unwrap();
    assert!(ema.single_file.as_ref().unwrap().uses_ema);
    assert_same("EMA weights vs folder", &folder, &ema);
    let plain = load(&path, &with_config("tiny-sd")).unwrap();
    let (x, y) = same_inputs_outputs(&folder, &plain);
    assert_eq!(x[0], y[0], "the text encoder is not affected");
    assert_ne!(x[1], y[1], "the plain (halved) UNet weights were used");
}

#[test]
fn a_separate_vae_file_replaces_the_models_vae() {
    let sd1 = load(&fixtures().join("tiny-sd"), &LoadOptions::default()).unwrap();
    // A diffusers-layout VAE file on an SD 2.x single file: the VAE is tiny-sd's.
    let diffusers_vae = fixtures().join("tiny-sd/vae/diffusion_pytorch_model.safetensors");
    let mixed = load(&single("sd2-tiny.safetensors"), &LoadOptions { vae: Some(diffusers_vae.clone()), ..with_config("sd2-tiny") }).unwrap();
    let (x, y) = same_inputs_outputs(&sd1, &mixed);
    assert_eq!((&x[2], &x[3]), (&y[2], &y[3]), "VAE from the separate diffusers file");
    // An LDM-layout VAE file (as A1111 users swap them: `encoder.down.N.block.M`, no prefix).
    let dir = tempfile::tempdir().unwrap();
    let ldm_vae = dir.path().join("vae-ldm.safetensors");
    rewrite(&single("tiny-sd.safetensors"), &ldm_vae, |t| {
        *t = t.drain().filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|s| (s.to_string(), v))).collect();
    });
    let folder_with_ldm_vae = load(&fixtures().join("sd2-tiny"), &LoadOptions { vae: Some(ldm_vae), ..Default::default() }).unwrap();
    let (x, y) = same_inputs_outputs(&sd1, &folder_with_ldm_vae);
    assert_eq!((&x[2], &x[3]), (&y[2], &y[3]), "VAE from the LDM-layout file on a folder model");
    let err = format!("{:#}", load(&fixtures().join("sd2-tiny"), &LoadOptions { vae: Some(dir.path().join("vae.ckpt")), ..Default::default() }).err().unwrap());
    assert!(err.contains("arbitrary code"), "{err}");
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("v1-5-pruned-emaonly.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let err = format!("{:#}", load(&ckpt, &LoadOptions::default()).err().unwrap());
    assert!(err.contains("pickle") && err.contains("arbitrary code"), "{err}");
    // A LoRA file given as a model says what it is.
    let lora = fixtures().join("golden/lora-kohya.safetensors");
    let err = format!("{:#}", load(&lora, &LoadOptions::default()).err().unwrap());
    assert!(err.contains("not a single-file Stable Diffusion checkpoint") && err.contains("LoRA"), "{err}");
}

#[test]
fn a_hub_file_comes_from_the_hf_cache() {
    // `org/repo/file.safetensors` offline: found in the cache's snapshot for refs/main.
    let cache = tempfile::tempdir().unwrap();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--org--tiny-single");
    std::fs::create_dir_all(repo.join("snapshots").join(sha)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    std::fs::copy(single("sd2-tiny.safetensors"), repo.join("snapshots").join(sha).join("sd2-tiny.safetensors")).unwrap();
    let hub = offline_hub(cache.path());
    let sd = StableDiffusion::load_with("org/tiny-single/sd2-tiny.safetensors", &with_config("sd2-tiny"), &hub, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.single_file.as_ref().unwrap().family, Family::Sd2);
    let err = StableDiffusion::load_with("org/tiny-single/other.safetensors", &with_config("sd2-tiny"), &hub, &Device::Cpu, DType::F32)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap();
    assert!(err.contains("other.safetensors") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// Every output of an SDXL model: both encoders' conditioning (context, pooled), the UNet with
/// time ids, and the VAE.
fn sdxl_outputs(sd: &StableDiffusion) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let cond = sd.text.encode(&["a red circle on a white background", ""], &dev).unwrap();
    let sample = wave(&[2, sd.unet.config().in_channels, 8, 8], 0.1);
    let timesteps = Tensor::new(&[10f32, 731.0], &dev).unwrap();
    let time_ids = Tensor::new(&[[64f32, 64., 0., 0., 64., 64.], [80., 96., 8., 16., 64., 64.]], &dev).unwrap();
    let unet = sd.unet.forward(&sample, &timesteps, &cond.clone().with_time_ids(time_ids)).unwrap();
    let image = wave(&[1, 3, 64, 64], 0.7);
    let latent = sd.vae.encode(&image).unwrap().mean;
    vec![values(&cond.context), values(cond.pooled.as_ref().unwrap()), values(&unet), values(&latent), values(&sd.vae.decode(&latent).unwrap())]
}

/// The SDXL single file (`tools/reference/make_single_file.py`: UNet under
/// `model.diffusion_model.` with `label_emb`, CLIP-L under `conditioner.embedders.0.transformer.`,
/// OpenCLIP bigG under `conditioner.embedders.1.model.` with fused q/k/v and the transposed
/// `text_projection`) gives the folder's model bit for bit; diffusers' `from_single_file` was
/// checked to load it to the same tensors. The tiny widths (32) are not recognisable from
/// shapes (heads of 64), so the folder's configs are given, as `[model] config`.
#[test]
fn sdxl_single_file_gives_the_folders_model_bit_for_bit() {
    let folder = load(&fixtures().join("sdxl-tiny"), &LoadOptions::default()).unwrap();
    let file = load(&single("sdxl-tiny.safetensors"), &with_config("sdxl-tiny")).unwrap();
    let rec = file.single_file.as_ref().expect("recognised as a single file");
    assert_eq!((rec.family, file.family), (Family::Sdxl, Family::Sdxl));
    assert_eq!(file.text.pairs.len(), 2);
    assert_eq!(file.text.pairs[1].tokenizer.pad_id(), 0, "tokenizer_2 from the config folder pads with `!`");
    let ignored: Vec<&str> = rec.ignored.iter().map(|(n, _)| n.as_str()).collect();
    assert!(ignored.contains(&"conditioner.embedders.1.model.logit_scale"), "{ignored:?}");
    assert_eq!(sdxl_outputs(&folder), sdxl_outputs(&file), "SDXL single file vs folder");
    // Without the configs the tiny widths cannot be recognised, and the error says what to do.
    let err = format!("{:#}", load(&single("sdxl-tiny.safetensors"), &LoadOptions::default()).err().unwrap());
    assert!(err.contains("[model] config"), "{err}");
}
