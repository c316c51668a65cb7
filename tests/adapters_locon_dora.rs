//! Conv LoRA (LoCon, `adapter.conv_rank`) and DoRA (`adapter.use_dora`) against their
//! references: PEFT 0.21's DoRA forward, gradients and merge on a linear and a conv
//! (`golden/dora.safetensors`), a DoRA file diffusers saved and the UNet output it gives
//! (`golden/lora-dora/`), kohya sd-scripts' own LoCon network on the tiny UNet: its modules, its
//! file and the UNet output with it (`golden/locon-kohya.*`, `golden/unet_locon.safetensors`), and
//! the key maps of ComfyUI and A1111 (`golden/locon-kohya.json` `ui`, `ui-lora-keys.json`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var};
use lora::adapters::lora::{apply_lora_layers, inject_layers, trained_weights, InitRng, LoraInit, LoraSpec};
use lora::adapters::read::{parse_lora_bytes, read_lora_file};
use lora::adapters::write::serialize_lora;
use lora::adapters::LoraFormat;
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;
use lora::nn::frozen::FrozenConv2d;
use lora::nn::{AdaptedConv2d, AdaptedLinear, LoraBranch};
use rand::SeedableRng;
use serde_json::Value;

use crate::support::rel_diff;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden").join(name), &Device::Cpu).unwrap()
}

fn tiny_unet() -> UNet2DConditionModel {
    tiny_unet_in(DType::F32)
}

fn tiny_unet_in(dtype: DType) -> UNet2DConditionModel {
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::from_json_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], dtype, &Device::Cpu).unwrap() };
    UNet2DConditionModel::load(vb, &cfg).unwrap()
}

/// The tiny UNet's output on `golden/unet.safetensors`'s inputs (in the UNet's dtype).
fn unet_out(unet: &UNet2DConditionModel) -> Tensor {
    let inputs = golden("unet.safetensors");
    let dtype = unet.convs_dtype();
    let cond = lora::models::Conditioning::context(inputs["encoder_hidden_states"].to_dtype(dtype).unwrap());
    unet.forward(&inputs["sample"].to_dtype(dtype).unwrap(), &inputs["timesteps"], &cond).unwrap().to_dtype(DType::F32).unwrap()
}

trait Dtype {
    fn convs_dtype(&self) -> DType;
}

impl Dtype for UNet2DConditionModel {
    fn convs_dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }
}

/// The tiny UNet's output with `weights` applied to its linear layers and convolutions.
fn unet_out_with(weights: &lora::adapters::LoraWeights) -> Tensor {
    let mut unet = tiny_unet();
    let (lin, conv) = unet.layers_mut();
    apply_lora_layers(weights, lin, conv, vec![], 1.0).unwrap();
    unet_out(&unet)
}

fn locon_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/locon-kohya.json")).unwrap()).unwrap()
}

/// PEFT's DoRA on `lin` (Linear 8 → 6) and `conv` (Conv2d 4 → 5, 3x3, padding 1), r = 2,
/// alpha = 4, with nonzero A, B and m = ‖W‖ (so ‖W + sBA‖ ≠ m): our forward, the gradients of
/// A, B, m and the input, and the merged weight equal PEFT's. All f32 on the CPU, sums of at
/// most 36 products: 1e-5 relative to each tensor's largest value covers the summation order
/// (measured below 1e-6); a missing detach of the norm or a bias scaled with the weight gives
/// errors of order 1e-1.
#[test]
fn dora_forward_gradients_and_merge_equal_peft() {
    let g = golden("dora.safetensors");
    let scale = 2.0;
    let check = |what: &str, ours: &Tensor, want: &Tensor| {
        let ours = ours.reshape(want.dims()).unwrap();
        let e = rel_diff(&ours, want);
        eprintln!("{what}: relative error {e:e}");
        assert!(e < 1e-5, "{what}: relative error {e:e}");
    };
    for layer in ["lin", "conv"] {
        let t = |k: &str| g[&format!("{layer}.{k}")].clone();
        let a = Var::from_tensor(&t("lora_A")).unwrap();
        let out_c = t("weight").dims()[0];
        let b = Var::from_tensor(&t("lora_B").reshape((out_c, 2)).unwrap()).unwrap();
        let m = Var::from_tensor(&t("magnitude").reshape(out_c).unwrap()).unwrap();
        let x = Var::from_tensor(&t("x")).unwrap();
        let branch = LoraBranch { down: a.as_tensor().clone(), up: b.as_tensor().clone(), scale, magnitude: Some(m.as_tensor().clone()) };
        let (y, merged) = if layer == "lin" {
            let mut lin = AdaptedLinear::new("lin", t("weight"), Some(t("bias")));
            lin.loras.push(branch);
            let y = lin.forward(x.as_tensor()).unwrap();
            lin.merge().unwrap();
            (y, lin.weight.clone())
        } else {
            let mut conv = AdaptedConv2d::new("conv", FrozenConv2d::new(t("weight"), Some(t("bias")), 1, 1).unwrap());
            conv.loras.push(branch);
            let y = conv.forward(x.as_tensor()).unwrap();
            conv.merge().unwrap();
            (y, conv.conv.weight.clone())
        };
        check(&format!("{layer} forward"), &y, &t("out"));
        let grads = (&y * t("loss_weight")).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("lora_A", &a), ("lora_B", &b), ("magnitude", &m), ("x", &x)] {
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{layer}: no gradient reaches {name}"));
            check(&format!("{layer} grad {name}"), got, &t(&format!("grad.{name}")));
        }
        check(&format!("{layer} merged weight"), &merged, &t("merged_weight"));
    }
}

/// A DoRA LoRA as diffusers saves it (`lora.down/up.weight` + `lora_magnitude_vector`, made by
/// PEFT on the tiny UNet's attention) gives the UNet output diffusers computed with it. f32 CPU
/// parity: 1e-4 relative to the output's largest value, as the plain LoRA goldens; reading it as
/// plain LoRA (the magnitudes dropped) is off by 0.19 absolute (`expected.json`).
#[test]
fn a_diffusers_dora_file_gives_diffusers_unet_output() {
    let weights = read_lora_file(&fixtures().join("golden/lora-dora/pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(weights.unet.len(), 80);
    assert!(weights.unet.values().all(|m| m.magnitude.is_some()), "every module keeps its magnitude");
    let e = rel_diff(&unet_out_with(&weights), &golden("lora-dora/unet_out.safetensors")["out_with_lora"]);
    assert!(e < 1e-4, "DoRA UNet output: relative error {e:e}");
}

/// kohya's LoCon (`conv_dim` 2, `conv_alpha` 0.5 on network_dim 2 / alpha 1): its file applied
/// to our UNet gives the output kohya's own network computed (f32, 1e-4 relative as above; the
/// LoRA moves the output by 0.53 absolute, so a dropped conv branch would show).
#[test]
fn a_kohya_locon_file_gives_kohya_unet_output() {
    let weights = read_lora_file(&fixtures().join("golden/locon-kohya.safetensors")).unwrap();
    let json = locon_json();
    let counts = &json["layouts"]["tiny-sd"]["counts"];
    let total: u64 = ["linear", "conv1x1", "conv3x3"].iter().map(|k| counts[k].as_u64().unwrap()).sum();
    assert_eq!(weights.unet.len() as u64, total, "every module of kohya's network is read");
    let e = rel_diff(&unet_out_with(&weights), &golden("unet_locon.safetensors")["out_with_lora"]);
    assert!(e < 1e-4, "LoCon UNet output: relative error {e:e}");
}

/// The LoCon + DoRA adapter `lora run pipelines/tiny.toml` wrote (conv_rank 2, conv_alpha 1,
/// use_dora, 10 steps; `golden/locon-dora-ours/`): diffusers loads all 123 modules and all 123
/// magnitudes with no key left over (`tools/reference/load_lora_check.py`, which also saved its
/// UNet output), and our UNet with the file gives diffusers' output (f32, 1e-4 relative as the
/// other parity tests; the adapter moves the output by 0.29 absolute).
#[test]
fn our_locon_dora_file_gives_diffusers_unet_output() {
    let weights = read_lora_file(&fixtures().join("golden/locon-dora-ours/pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(weights.unet.len(), 123);
    assert!(weights.unet.values().all(|m| m.magnitude.is_some()));
    let e = rel_diff(&unet_out_with(&weights), &golden("locon-dora-ours/unet_out.safetensors")["out_with_lora"]);
    assert!(e < 1e-4, "our LoCon + DoRA file in diffusers vs here: relative error {e:e}");
}

/// The convolutions `conv_rank` adapts are exactly kohya's `conv_dim` convolutions (the
/// resnets' and samplers' 3x3 convs) plus the resnets' `conv_shortcut`, which kohya adapts at
/// `network_dim` (ours take `conv_rank`; `rank_pattern` can set them apart).
#[test]
fn conv_rank_adapts_the_convolutions_kohyas_locon_adapts() {
    let json = locon_json();
    let modules = json["layouts"]["tiny-sd"]["modules"].as_object().unwrap();
    let kohya: BTreeSet<String> = modules
        .values()
        .filter(|m| m["kind"] == "conv3x3" || m["diffusers_module"].as_str().unwrap().ends_with("conv_shortcut"))
        .map(|m| m["diffusers_module"].as_str().unwrap().to_string())
        .collect();
    let mut unet = tiny_unet();
    let ours: BTreeSet<String> = unet.convs_mut().iter().map(|c| c.name.clone()).collect();
    assert_eq!(ours, kohya);
    // And each 3x3 one has kohya's down shape (its kernel, stride and padding: checked by the
    // output test above through the samplers' stride-2 conv).
    for m in modules.values().filter(|m| m["kind"] == "conv3x3") {
        assert_eq!(m["lora_down"][2], 3, "{m}");
    }
}

/// Our trained LoCon + DoRA branches: the UNet with branches equals the UNet with every branch
/// merged into its weight (an independent computation of the forward: one conv / matmul per
/// layer with `m/‖W + ΔW‖ · (W + ΔW)`), every parameter (A, B, m of linears and convs) gets a
/// gradient, and gradient checkpointing gives the same gradients.
#[test]
fn injected_locon_dora_equals_merged_weights_and_trains_every_parameter() {
    let spec = LoraSpec { conv: Some((2, 1.0)), use_dora: true, init: LoraInit::Kaiming, ..LoraSpec::reference_unet(2) };
    let mut unet = tiny_unet_in(DType::F64);
    let mut rng = InitRng::seed_from_u64(7);
    let loras = {
        let (lin, conv) = unet.layers_mut();
        inject_layers(lin, conv, &spec, &mut rng).unwrap()
    };
    let n_convs = unet.convs_mut().len();
    assert_eq!(loras.len(), 80 + n_convs);
    // B starts at zero (the identity); give it values so that the branches and m/‖W + ΔW‖ matter.
    for (i, l) in loras.iter().enumerate() {
        let b = Tensor::randn(0f32, 0.05, l.up.dims(), &Device::Cpu).unwrap();
        l.up.set(&b).unwrap();
        let m = l.magnitude.as_ref().unwrap();
        m.set(&(m.as_tensor() * (1.0 + 0.01 * (i % 5) as f64)).unwrap()).unwrap();
    }
    let with_branches = unet_out(&unet);
    let mut merged = tiny_unet_in(DType::F64);
    {
        let (lin, conv) = merged.layers_mut();
        apply_lora_layers(&trained_weights(&loras, &[]).unwrap(), lin, conv, vec![], 1.0).unwrap();
        let (lin, conv) = merged.layers_mut();
        lin.into_iter().for_each(|l| l.merge().unwrap());
        conv.into_iter().for_each(|c| c.merge().unwrap());
    }
    let e = rel_diff(&with_branches, &unet_out(&merged));
    eprintln!("branches vs merged weights: relative error {e:e}");
    // In f64 the two computations differ by summation order only; the output is compared in
    // f32, so 1e-6 (a third of the branches' own effect would be ~1e-2).
    assert!(e < 1e-6, "branches vs merged weights: relative error {e:e}");

    // 16x16 latents: at the golden's 8x8 the mid block sees one token, and the softmax over one
    // key gives its self-attention's `to_k` no gradient at all.
    let inputs = golden("unet.safetensors");
    let cond = lora::models::Conditioning::context(inputs["encoder_hidden_states"].to_dtype(DType::F64).unwrap());
    let sample = Tensor::randn(0f64, 1.0, (2, 4, 16, 16), &Device::Cpu).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (2, 4, 16, 16), &Device::Cpu).unwrap();
    let grads_of = |ckpt: Option<&lora::nn::CheckpointGrads>| {
        let out = unet.forward_checkpointed(&sample, &inputs["timesteps"], &cond, ckpt).unwrap();
        let mut grads = (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        if let Some(c) = ckpt {
            c.merge_into(&mut grads).unwrap();
        }
        loras.iter().flat_map(|l| l.vars().map(|v| grads.get(v.as_tensor()).cloned()).collect::<Vec<_>>()).collect::<Vec<_>>()
    };
    let plain = grads_of(None);
    let ckpt = lora::nn::CheckpointGrads::new();
    let checkpointed = grads_of(Some(&ckpt));
    let mut kinds = BTreeMap::<&str, usize>::new();
    let mut worst = 0f32;
    for (i, (g, c)) in plain.iter().zip(&checkpointed).enumerate() {
        let g = g.as_ref().unwrap_or_else(|| panic!("parameter {i} gets no gradient"));
        let c = c.as_ref().unwrap_or_else(|| panic!("parameter {i} gets no gradient under checkpointing"));
        let module = &loras[i / 3].module;
        assert!(support_max_abs(g) > 0.0, "parameter {i} ({module}): zero gradient");
        let e = rel_diff(c, g);
        worst = worst.max(e);
        *kinds.entry(match g.rank() { 4 => "conv A", 1 => "magnitude", _ => "A or B" }).or_default() += 1;
    }
    eprintln!("checkpointed vs plain gradients: largest relative difference {worst:e}");
    // f64 (the f32 gradients of LoRA's f32 parameters, summed in f64): only the order of the
    // sums differs. In f32 a magnitude gradient that is a small sum of large terms differed by
    // 2e-3 of its size, which is rounding, not a missing term (that would be of order 1).
    assert!(worst < 1e-5, "checkpointed gradients off by {worst:e}");
    assert_eq!(kinds["conv A"], n_convs);
    assert_eq!(kinds["magnitude"], loras.len());
}

fn support_max_abs(t: &Tensor) -> f32 {
    crate::support::max_abs(t)
}

/// What training writes: the diffusers and kohya files of a LoCon + DoRA adapter hold every
/// module, read back to the same weights, and give the same UNet output; the kohya file's
/// keys are all ones ComfyUI maps (`ui-lora-keys.json`), with `dora_scale` in LyCORIS's
/// `[out, 1]` / `[out, 1, 1, 1]` form, and the diffusers file has diffusers' own key forms
/// (`lora_magnitude_vector`, a conv's B as `[out, r, 1, 1]` and m as `[1, out, 1, 1]`).
#[test]
fn locon_dora_files_round_trip_and_use_the_loaders_keys() {
    let spec = LoraSpec { conv: Some((2, 1.0)), use_dora: true, ..LoraSpec::reference_unet(2) };
    let mut unet = tiny_unet();
    let mut rng = InitRng::seed_from_u64(3);
    let loras = {
        let (lin, conv) = unet.layers_mut();
        inject_layers(lin, conv, &spec, &mut rng).unwrap()
    };
    for l in &loras {
        l.up.set(&Tensor::randn(0f32, 0.05, l.up.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    let want = unet_out(&unet);
    let weights = trained_weights(&loras, &[]).unwrap();
    let comfy: BTreeSet<String> = {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("ui-lora-keys.json")).unwrap()).unwrap();
        v["layouts"]["tiny-sd"]["comfyui"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    for format in [LoraFormat::Diffusers, LoraFormat::Kohya, LoraFormat::Peft] {
        let bytes = serialize_lora(&weights, format).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in st.names() {
            let shape = st.tensor(name).unwrap().shape().to_vec();
            match format {
                LoraFormat::Kohya => {
                    let (stem, suffix) = name.split_once('.').unwrap();
                    assert!(comfy.contains(stem), "`{name}`: ComfyUI does not map `{stem}`");
                    assert!(["lora_down.weight", "lora_up.weight", "alpha", "dora_scale"].contains(&suffix), "{name}");
                    if suffix == "dora_scale" {
                        assert!(shape.len() >= 2 && shape[1..].iter().all(|&d| d == 1), "{name}: {shape:?}");
                    }
                }
                _ => {
                    if name.contains("resnets") && name.ends_with("conv1.lora.up.weight") {
                        assert_eq!(shape.len(), 4, "{name}");
                    }
                    if name.contains("conv1.lora_magnitude_vector") {
                        assert_eq!(shape[..2], [1, shape[1]], "{name}: PEFT's conv magnitude shape");
                    }
                }
            }
        }
        let back = parse_lora_bytes(&bytes).unwrap();
        assert_eq!(back.unet.len(), loras.len(), "{format}: every module");
        let e = rel_diff(&unet_out_with(&back), &want);
        // The file holds the same f32 values: only summation order may differ.
        assert!(e < 1e-5, "{format}: UNet output off by {e:e}");
    }
}

/// kohya's own LoCon file converts to our kohya form unchanged: the same keys and shapes.
#[test]
fn kohyas_locon_file_rewrites_with_the_same_keys() {
    let path = fixtures().join("golden/locon-kohya.safetensors");
    let original = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&original).unwrap();
    let shapes = |st: &safetensors::SafeTensors| -> BTreeMap<String, Vec<usize>> { st.names().into_iter().map(|n| (n.to_string(), st.tensor(n).unwrap().shape().to_vec())).collect() };
    let weights = read_lora_file(&path).unwrap();
    let ours = serialize_lora(&weights, LoraFormat::Kohya).unwrap();
    let ours_st = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let (a, b) = (shapes(&st), shapes(&ours_st));
    // kohya writes alphas as 0-d F32 tensors; ours are 0-d too.
    assert_eq!(a, b);
}

fn run_tiny(out: &std::path::Path, extra: &[&str], stop_at_once: bool) -> lora::runner::stages::RunReport {
    let root = crate::support::repo_root();
    let mut overrides: Vec<String> = vec![
        "train.max_steps=4".into(),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=2".into(),
        "adapter.conv_rank=2".into(),
        "adapter.conv_alpha=1".into(),
        "adapter.use_dora=true".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let loaded = lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(stop_at_once));
    lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), stop).expect("run succeeds")
}

/// `adapter.conv_rank` + `adapter.use_dora` in a run of the tiny pipeline: both exported files
/// hold the attention modules and every resnet/sampler convolution, each with a magnitude that
/// training moved off its initial `‖W‖`; the kohya header records the conv rank and DoRA; and a
/// run stopped after its first update resumes to the same bytes as an uninterrupted one (the
/// magnitudes are in the checkpoint and its optimizer state).
#[test]
fn a_locon_dora_run_exports_every_module_and_resumes_exactly() {
    use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    run_tiny(&straight, &[], false);
    let n_convs = tiny_unet().convs_mut().len();
    let initial: BTreeMap<String, Tensor> = {
        let mut unet = tiny_unet();
        let (lin, conv) = unet.layers_mut();
        lin.iter()
            .map(|l| (l.name.clone(), l.weight.clone()))
            .chain(conv.iter().map(|c| (c.name.clone(), c.conv.weight.clone())))
            .map(|(n, w)| {
                let out = w.dims()[0];
                (n, w.reshape((out, ())).unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap())
            })
            .collect()
    };
    for file in [DIFFUSERS_FILE, KOHYA_FILE] {
        let w = read_lora_file(&straight.join(file)).unwrap();
        assert_eq!(w.unet.len(), 80 + n_convs, "{file}: attention modules and every convolution");
        assert_eq!(w.unet.values().filter(|m| m.down.rank() == 4).count(), n_convs, "{file}: conv modules keep their kernel");
        let moved = w.unet.iter().filter(|(n, m)| rel_diff(m.magnitude.as_ref().unwrap(), &initial[*n]) > 0.0).count();
        assert!(moved > w.unet.len() / 2, "{file}: training moved the magnitudes ({moved} of {})", w.unet.len());
        if file == KOHYA_FILE {
            let args: Value = serde_json::from_str(&w.metadata["ss_network_args"]).unwrap();
            assert_eq!(args, serde_json::json!({"conv_dim": "2", "conv_alpha": "1", "dora_wd": "True"}));
        }
    }
    let stopped = dir.path().join("stopped");
    let first = run_tiny(&stopped, &[], true);
    assert_eq!(first.train.as_ref().unwrap().global_step, 1);
    let second = run_tiny(&stopped, &[], false);
    assert!(second.train.as_ref().unwrap().resumed_from.is_some());
    let same = std::fs::read(straight.join(DIFFUSERS_FILE)).unwrap() == std::fs::read(stopped.join(DIFFUSERS_FILE)).unwrap();
    assert!(same, "stop + resume gives the bytes of the straight run");
    // The kohya header names the output folder; its tensors are the same.
    let tensors = |d: &std::path::Path| candle_core::safetensors::load(d.join(KOHYA_FILE), &Device::Cpu).unwrap();
    let (a, b) = (tensors(&straight), tensors(&stopped));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().ok(), b[k].flatten_all().unwrap().to_vec1::<f32>().ok(), "{k}");
    }
}

/// SDXL: our kohya file names the convolutions as kohya sd-scripts does (the original layout:
/// `lora_unet_input_blocks_1_0_in_layers_2` for `down_blocks.0.resnets.0.conv1`, `…_op` for a
/// downsampler, `…_skip_connection` for `conv_shortcut`), stem for stem as kohya's own SDXL
/// network (`golden/locon-kohya.json`, `sdxl-tiny`), and a file so named applies to the same
/// modules.
#[test]
fn sdxl_conv_modules_take_kohyas_original_layout_names() {
    let json = locon_json();
    let want: BTreeMap<String, String> = json["layouts"]["sdxl-tiny"]["resnet_sampler_stems"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(stem, module)| (stem.clone(), module.as_str().unwrap().to_string()))
        .collect();
    let sd = lora::models::loading::StableDiffusion::load(
        fixtures().join("sdxl-tiny").to_str().unwrap(),
        &lora::models::loading::LoadOptions::default(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut sd = sd;
    let (lin, conv) = sd.unet.layers_mut();
    let mut weights = lora::adapters::LoraWeights::default();
    let module = |out: usize, shape: Vec<usize>| {
        lora::adapters::LoraModule::new(Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(), Tensor::zeros((out, 2), DType::F32, &Device::Cpu).unwrap(), Some(1.0))
    };
    for c in &conv {
        let (r, i, kh, kw) = c.down_shape(2);
        weights.unet.insert(c.name.clone(), module(c.out_channels(), vec![r, i, kh, kw]));
    }
    for l in lin.iter().filter(|l| l.name.contains("time_emb_proj")) {
        weights.unet.insert(l.name.clone(), module(l.out_features(), vec![2, l.in_features()]));
    }
    let ldm = lora::adapters::ldm_names::to_ldm_unet_names(&weights, sd.unet.config()).unwrap();
    // Each module renamed alone: its kohya stem.
    let ours: BTreeMap<String, String> = weights
        .unet
        .iter()
        .map(|(d, m)| {
            let mut one = lora::adapters::LoraWeights::default();
            one.unet.insert(d.clone(), m.clone());
            let l = lora::adapters::ldm_names::to_ldm_unet_names(&one, sd.unet.config()).unwrap();
            (format!("lora_unet_{}", l.unet.keys().next().unwrap().replace('.', "_")), d.clone())
        })
        .collect();
    assert_eq!(ldm.unet.len(), weights.unet.len(), "no two modules share an original-layout name");
    assert_eq!(ours, want);
    // Read back from kohya's names, they land on the same modules.
    let bytes = serialize_lora(&ldm, LoraFormat::Kohya).unwrap();
    let back = lora::adapters::ldm_names::to_diffusers_unet_names(&parse_lora_bytes(&bytes).unwrap(), sd.unet.config()).unwrap();
    assert_eq!(back.unet.keys().collect::<Vec<_>>(), weights.unet.keys().collect::<Vec<_>>());
    let (lin, conv) = sd.unet.layers_mut();
    apply_lora_layers(&back, lin, conv, vec![], 1.0).unwrap();
}
