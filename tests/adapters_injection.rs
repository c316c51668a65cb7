//! LoRA injection on synthetic `AdaptedLinear`s: PEFT matching rules, regex targets, errors
//! with near names, init statistics, seeded determinism, per-pattern rank/alpha, shared `Var`s.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use lora::adapters::lora::{inject, plan_targets, InitRng, LoraInit, LoraSpec, ModulePattern};
use lora::nn::AdaptedLinear;
use rand::SeedableRng;

/// Names shaped like the tiny UNet's attention layers plus a few non-targets.
fn unet_names() -> Vec<String> {
    let mut names = Vec::new();
    for block in ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.2"] {
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                names.push(format!("{block}.transformer_blocks.0.{attn}.{proj}"));
            }
        }
        names.push(format!("{block}.transformer_blocks.0.ff.net.2"));
        names.push(format!("{block}.proj_in"));
    }
    names.push("time_embedding.linear_1".into());
    names
}

/// One linear per name: `in` is 48 for cross-attention k/v, 32 otherwise; `out` 32.
fn make_linears(names: &[String]) -> Vec<AdaptedLinear> {
    let dev = Device::Cpu;
    names
        .iter()
        .map(|n| {
            let in_f = if n.contains("attn2.to_k") || n.contains("attn2.to_v") { 48 } else { 32 };
            let w = Tensor::randn(0f32, 0.1, (32, in_f), &dev).unwrap();
            AdaptedLinear::new(n.clone(), w, None)
        })
        .collect()
}

fn spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        targets: targets.iter().map(|s| s.to_string()).collect(),
        rank: 4,
        alpha: 4.0,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        init: LoraInit::Gaussian,
        conv: None,
        use_dora: false,
    }
}

fn matched(targets: &[&str]) -> anyhow::Result<Vec<String>> {
    let names = unet_names();
    Ok(plan_targets(names.iter().map(String::as_str), &spec(targets))?.into_iter().map(|p| p.module).collect())
}

#[test]
fn suffix_patterns_match_like_peft() {
    // The reference's targets hit every attention projection and nothing else.
    let m = matched(&["to_k", "to_q", "to_v", "to_out.0"]).unwrap();
    assert_eq!(m.len(), 4 * 2 * 4);
    assert!(m.iter().all(|n| n.contains(".attn1.") || n.contains(".attn2.")));
    // A longer suffix narrows the match.
    let m = matched(&["attn1.to_q"]).unwrap();
    assert_eq!(m.len(), 4);
    assert!(m.iter().all(|n| n.ends_with("attn1.to_q")));
    // The match is at a `.` boundary: `o_q` is not a suffix of `to_q` in PEFT's sense.
    assert!(matched(&["o_q"]).is_err());
    // A full name matches itself.
    assert_eq!(matched(&["time_embedding.linear_1"]).unwrap(), vec!["time_embedding.linear_1".to_string()]);
    // `to_out` alone is not `to_out.0`.
    assert!(matched(&["to_out"]).is_err());
}

#[test]
fn regex_patterns_fullmatch_the_whole_name() {
    let m = matched(&[r"re:.*attn2\.to_(k|v)"]).unwrap();
    assert_eq!(m.len(), 8);
    assert!(m.iter().all(|n| n.contains("attn2.to_k") || n.contains("attn2.to_v")));
    // Full match: a bare `to_q` regex matches no full name.
    assert!(matched(&["re:to_q"]).is_err());
    let p = ModulePattern::parse(r"re:down_blocks\.\d+\..*").unwrap();
    assert!(p.matches("down_blocks.1.attentions.0.proj_in"));
    assert!(!p.matches("mid_block.attentions.0.proj_in"));
    assert!(ModulePattern::parse("re:(").is_err(), "invalid regex must be an error");
}

#[test]
fn unmatched_pattern_is_an_error_listing_near_names() {
    let err = matched(&["to_q", "to_qq"]).unwrap_err().to_string();
    assert!(err.contains("`to_qq`"), "error names the pattern: {err}");
    assert!(err.contains("to_q"), "error lists near names: {err}");
    assert!(!err.contains("`to_q` matches"), "only the failing pattern is reported: {err}");
    let err = matched(&["q_proj"]).unwrap_err().to_string();
    assert!(err.contains("near names"), "{err}");
}

#[test]
fn per_pattern_rank_and_alpha_longest_pattern_wins() {
    let mut s = spec(&["to_q", "to_k"]);
    s.rank_pattern.insert("to_k".into(), 8);
    s.rank_pattern.insert("attn2.to_k".into(), 2);
    s.alpha_pattern.insert("re:mid_block\\..*".into(), 1.0);
    let names = unet_names();
    let plans = plan_targets(names.iter().map(String::as_str), &s).unwrap();
    for p in &plans {
        let want_rank = if p.module.ends_with("attn2.to_k") {
            2
        } else if p.module.ends_with("to_k") {
            8
        } else {
            4
        };
        assert_eq!(p.rank, want_rank, "{}", p.module);
        let want_alpha = if p.module.starts_with("mid_block.") { 1.0 } else { 4.0 };
        assert_eq!(p.alpha, want_alpha, "{}", p.module);
    }
    // A rank pattern that hits no targeted module is an error, not silently ignored.
    let mut s = spec(&["to_q"]);
    s.rank_pattern.insert("to_v".into(), 8);
    let err = plan_targets(names.iter().map(String::as_str), &s).unwrap_err().to_string();
    assert!(err.contains("rank_pattern key `to_v`"), "{err}");
}

#[test]
fn injection_shares_vars_with_layers_and_scales_by_alpha_over_r() {
    let names = unet_names();
    let mut layers = make_linears(&names);
    let mut s = spec(&["to_q", "to_k", "to_v", "to_out.0"]);
    s.alpha = 2.0; // scale 0.5
    let mut rng = InitRng::seed_from_u64(7);
    let loras = inject(layers.iter_mut().collect(), &s, &mut rng).unwrap();
    assert_eq!(loras.len(), 32);
    let injected: usize = layers.iter().map(|l| l.loras.len()).sum();
    assert_eq!(injected, 32, "one branch per targeted layer, none elsewhere");
    for l in &loras {
        assert_eq!(l.down.dtype(), DType::F32);
        assert_eq!(l.up.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "B starts at exactly 0");
        assert_eq!(l.scale(), 0.5);
        assert_eq!(l.peft_down_name(), format!("{}.lora_A.default.weight", l.module));
    }
    // Setting the Vars changes the layer: forward = x Wᵀ + 0.5 · x Aᵀ Bᵀ (independent computation).
    let l = &loras[0];
    let layer = layers.iter().find(|x| x.name == l.module).unwrap();
    let (out_f, r) = l.up.dims2().unwrap();
    l.up.set(&Tensor::randn(0f32, 1.0, (out_f, r), &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, layer.in_features()), &Device::Cpu).unwrap();
    let y = layer.forward(&x).unwrap();
    let base = x.matmul(&layer.weight.t().unwrap()).unwrap();
    let delta = (x.matmul(&l.down.as_tensor().t().unwrap()).unwrap().matmul(&l.up.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap();
    let diff = (y - (base + delta).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // Tolerance 1e-5 absolute (f32 matmuls of size 32).
    assert!(diff < 1e-5, "layer output must use the Var's tensors: max diff {diff} > 1e-5");
    // Gradients reach both Vars through the layer.
    let grads = layer.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g_down = grads.get(l.down.as_tensor()).expect("grad for A").abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    let g_up = grads.get(l.up.as_tensor()).expect("grad for B").abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(g_down > 0.0 && g_up > 0.0);
}

fn all_down_values(loras: &[lora::adapters::TrainableLora]) -> Vec<f32> {
    loras.iter().flat_map(|l| l.down.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn gaussian_init_has_std_one_over_r() {
    // 64 layers of [8, 256] → 131072 samples; the std of the sample std is ~std/sqrt(2n) ≈ 0.2%.
    let names: Vec<String> = (0..64).map(|i| format!("blocks.{i}.to_q")).collect();
    let mut layers: Vec<AdaptedLinear> = names
        .iter()
        .map(|n| AdaptedLinear::new(n.clone(), Tensor::zeros((16, 256), DType::F32, &Device::Cpu).unwrap(), None))
        .collect();
    let mut s = spec(&["to_q"]);
    s.rank = 8;
    let loras = inject(layers.iter_mut().collect(), &s, &mut InitRng::seed_from_u64(1)).unwrap();
    let v = all_down_values(&loras);
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    // Tolerance: mean within 0.005 of 0, std within 2% of 1/r = 0.125.
    assert!(mean.abs() < 0.005, "mean {mean} not within 0.005 of 0");
    assert!((std - 0.125).abs() < 0.125 * 0.02, "std {std} not within 2% of 1/r = 0.125");
}

#[test]
fn kaiming_init_is_uniform_with_bound_one_over_sqrt_in() {
    let names: Vec<String> = (0..32).map(|i| format!("blocks.{i}.to_q")).collect();
    let mut layers: Vec<AdaptedLinear> = names
        .iter()
        .map(|n| AdaptedLinear::new(n.clone(), Tensor::zeros((16, 400), DType::F32, &Device::Cpu).unwrap(), None))
        .collect();
    let mut s = spec(&["to_q"]);
    s.init = LoraInit::Kaiming;
    let loras = inject(layers.iter_mut().collect(), &s, &mut InitRng::seed_from_u64(2)).unwrap();
    let v = all_down_values(&loras);
    let bound = 1.0 / 400f64.sqrt(); // 0.05
    assert!(v.iter().all(|&x| (x as f64).abs() <= bound), "every value within ±1/sqrt(in)");
    let n = v.len() as f64;
    let std = (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
    let want = bound / 3f64.sqrt();
    // Tolerance: 2% of the uniform distribution's std bound/sqrt(3).
    assert!((std - want).abs() < want * 0.02, "std {std} not within 2% of {want}");
    let max = v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    assert!(max > bound * 0.99, "the range is used up to the bound: max {max}");
}

#[test]
fn init_is_deterministic_and_independent_of_layer_order() {
    let names = unet_names();
    let s = spec(&["to_q", "to_v"]);
    let run = |seed: u64, reverse: bool| {
        let mut layers = make_linears(&names);
        let mut refs: Vec<&mut AdaptedLinear> = layers.iter_mut().collect();
        if reverse {
            refs.reverse();
        }
        let loras = inject(refs, &s, &mut InitRng::seed_from_u64(seed)).unwrap();
        loras.iter().map(|l| (l.module.clone(), l.down.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect::<BTreeMap<_, _>>()
    };
    let a = run(42, false);
    assert_eq!(a, run(42, false), "same seed, same weights bit for bit");
    assert_eq!(a, run(42, true), "layer order does not change the draw");
    assert_ne!(a, run(43, false), "another seed gives other weights");
}

#[test]
fn bad_specs_are_errors() {
    let names = unet_names();
    let names = || names.iter().map(String::as_str);
    let mut s = spec(&["to_q"]);
    s.rank = 0;
    assert!(plan_targets(names(), &s).unwrap_err().to_string().contains("rank"));
    let mut s = spec(&["to_q"]);
    s.alpha = f64::NAN;
    assert!(plan_targets(names(), &s).unwrap_err().to_string().contains("alpha"));
    assert!(plan_targets(names(), &spec(&[])).is_err());
    assert!(plan_targets(names(), &spec(&[".to_q"])).is_err());
}

#[test]
fn trained_weights_export_in_the_reference_form_and_load_back() {
    use lora::adapters::weights::LoraFormat;
    use lora::adapters::read::parse_lora_bytes;
    use lora::adapters::write::serialize_lora;
    use lora::adapters::lora::{load_lora_modules, load_peft_tensors, trained_weights};
    let names = unet_names();
    let mut layers = make_linears(&names);
    let s = LoraSpec::reference_unet(4);
    let loras = inject(layers.iter_mut().collect(), &s, &mut InitRng::seed_from_u64(3)).unwrap();
    for l in &loras {
        let (o, r) = l.up.dims2().unwrap();
        l.up.set(&Tensor::randn(0f32, 1.0, (o, r), &Device::Cpu).unwrap()).unwrap();
    }
    let w = trained_weights(&loras, &[]).unwrap();
    let bytes = serialize_lora(&w, LoraFormat::Diffusers).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta.len(), 1, "alpha = r: header is exactly {{\"format\": \"pt\"}}, got {meta:?}");
    let back = parse_lora_bytes(&bytes).unwrap();
    assert_eq!(back.unet.len(), loras.len());

    // Load into a fresh injection (different seed) and compare bit for bit.
    let mut layers2 = make_linears(&names);
    let loras2 = inject(layers2.iter_mut().collect(), &s, &mut InitRng::seed_from_u64(99)).unwrap();
    load_lora_modules(&loras2, &back.unet).unwrap();
    for (a, b) in loras.iter().zip(&loras2) {
        assert_eq!(a.module, b.module);
        let d = (a.up.as_tensor() - b.up.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "exact reload of {}", a.module);
    }
    // Missing tensors are reported by name and change nothing.
    let empty = std::collections::HashMap::new();
    let e = load_peft_tensors(&loras2, &empty, "before.").unwrap_err().to_string();
    assert!(e.contains("before.") && e.contains("lora_A.default.weight"), "{e}");
}

/// `pipelines/tiny-block-ranks.toml` (per-block ranks, kohya's `block_dims` / `block_alphas`, as
/// rank / alpha patterns): every module of the exported file has the rank and alpha its block asks.
#[test]
fn per_block_ranks_example_gives_each_block_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let overrides: Vec<String> = vec!["train.max_steps=1".into(), format!("output.dir={:?}", out.display().to_string())];
    let loaded = lora::config::load_pipeline(&crate::support::repo_root().join("pipelines/tiny-block-ranks.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).unwrap();
    let w = lora::adapters::read_lora_file(&out.join(lora::layout::KOHYA_FILE)).unwrap();
    assert_eq!(w.unet.len(), 80, "the default targets of the tiny UNet");
    for (name, m) in &w.unet {
        let (rank, alpha) = if name.starts_with("down_blocks.0.") || name.starts_with("up_blocks.3.") {
            // The alpha stays the global one (8), as PEFT's and kohya's `block_alphas` default.
            (4, 8.0)
        } else if name.starts_with("mid_block.") {
            (16, 8.0)
        } else {
            (8, 8.0)
        };
        assert_eq!((m.down.dims()[0], m.alpha), (rank, Some(alpha)), "{name}");
    }
}
