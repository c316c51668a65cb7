//! Clip-grad-norm + one AdamW step against `golden/train_step.safetensors` (torch's result), the
//! optimizer state's save/load round trip, and the lr schedules against hand-computed values.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use lora::train::lr::{lr_at, scale_lr, LrSchedule, StepPlan};
use lora::train::optim::{clip_grad_norm, AdamW, AdamWConfig};

fn golden() -> HashMap<String, Tensor> {
    let path = crate::support::repo_root().join("tests/fixtures/golden/train_step.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

#[test]
fn clip_then_adamw_step_equals_torch() {
    let g = golden();
    let mut names: Vec<String> =
        g.keys().filter_map(|k| k.strip_prefix("before.").map(str::to_string)).collect();
    names.sort();
    assert!(names.len() > 100, "expected every LoRA parameter in the golden, found {}", names.len());
    let vars: Vec<Var> = names.iter().map(|n| Var::from_tensor(&g[&format!("before.{n}")]).unwrap()).collect();
    let mut grads: Vec<Tensor> = names.iter().map(|n| g[&format!("grad.{n}")].clone()).collect();

    // Tolerance: the norm is a sum of ~500 f32 squares; 1e-5 relative.
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    let expected_norm = scalar(&g["grad_norm_before_clip"]);
    assert!(
        ((norm - expected_norm) / expected_norm).abs() < 1e-5,
        "grad norm {norm} vs torch {expected_norm} (tolerance 1e-5 relative)"
    );
    // The golden norm (~0.17) is below 1.0, so clipping leaves the gradients as they are; the
    // scaling itself is checked in `clip_is_a_no_op_below_max_norm` and below.
    let mut scaled = grads.clone();
    let again = clip_grad_norm(&mut scaled, 0.05).unwrap();
    let after = lora::train::optim::global_grad_norm(&scaled).unwrap();
    assert!((again - norm).abs() < 1e-9 && (after - 0.05).abs() < 1e-6, "clip to 0.05 gave norm {after} (tolerance 1e-6)");

    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, ..Default::default() };
    let mut opt = AdamW::new_named(vars.clone(), names.clone(), cfg).unwrap();
    opt.step(&grads, 1e-3).unwrap();
    assert_eq!(opt.step_count(), 1);

    // Tolerance: |ours - torch| <= 1e-6 + 1e-4 * |torch| per element.
    let mut worst = 0f64;
    for (name, var) in names.iter().zip(&vars) {
        let ours = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = g[&format!("after.{name}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let before = g[&format!("before.{name}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), want.len(), "{name}: element count");
        assert_ne!(ours, before, "{name}: the step changed nothing");
        for (i, (o, w)) in ours.iter().zip(&want).enumerate() {
            let err = (o - w).abs() as f64;
            worst = worst.max(err);
            assert!(
                err <= 1e-6 + 1e-4 * w.abs() as f64,
                "{name}[{i}]: ours {o} vs torch {w} (tolerance 1e-6 abs + 1e-4 rel)"
            );
        }
    }
    eprintln!("worst abs error after one AdamW step: {worst:e}");
}

#[test]
fn clip_is_a_no_op_below_max_norm() {
    let mut grads = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
    let norm = clip_grad_norm(&mut grads, 10.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6, "norm {norm} vs 5 (tolerance 1e-6)");
    assert_eq!(grads[0].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let clipped = grads[0].to_vec1::<f32>().unwrap();
    let coef = 1.0 / (5.0 + 1e-6);
    assert!((clipped[0] as f64 - 3.0 * coef).abs() < 1e-6 && (clipped[1] as f64 - 4.0 * coef).abs() < 1e-6, "{clipped:?} (tolerance 1e-6)");
}

/// Two AdamW steps computed by hand in f64 for a single scalar parameter.
#[test]
fn two_steps_match_hand_computation() {
    let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(vec![var.clone()], cfg).unwrap();
    let (lr, g1, g2) = (0.1, 0.5f64, -0.25f64);
    let mut p = 1.0f64;
    let (mut m, mut v) = (0.0, 0.0);
    for (k, g) in [(1, g1), (2, g2)] {
        opt.step(&[Tensor::new(&[g as f32], &Device::Cpu).unwrap()], lr).unwrap();
        p *= 1.0 - lr * cfg.weight_decay;
        m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
        let denom = v.sqrt() / (1.0 - cfg.beta2.powi(k)).sqrt() + cfg.eps;
        p -= lr / (1.0 - cfg.beta1.powi(k)) * m / denom;
        let ours = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((ours - p).abs() < 1e-6, "step {k}: ours {ours} vs hand {p} (tolerance 1e-6)");
    }
}

#[test]
fn state_save_load_round_trip_and_mismatch_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let dev = Device::Cpu;
    let make = || {
        let a = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let b = Var::new(&[0.5f32, -0.5, 0.25], &dev).unwrap();
        (a, b)
    };
    let grads = vec![
        Tensor::new(&[[0.1f32, -0.2], [0.3, 0.4]], &dev).unwrap(),
        Tensor::new(&[1f32, 2.0, -3.0], &dev).unwrap(),
    ];
    let names = vec!["a".to_string(), "b".to_string()];

    // Run 1: three steps straight through.
    let (a1, b1) = make();
    let mut straight = AdamW::new_named(vec![a1.clone(), b1.clone()], names.clone(), AdamWConfig::default()).unwrap();
    for _ in 0..3 {
        straight.step(&grads, 1e-2).unwrap();
    }
    // Run 2: two steps, save, fresh optimizer over the same vars, load, third step.
    let (a2, b2) = make();
    let mut first = AdamW::new_named(vec![a2.clone(), b2.clone()], names.clone(), AdamWConfig::default()).unwrap();
    first.step(&grads, 1e-2).unwrap();
    first.step(&grads, 1e-2).unwrap();
    first.save(&path).unwrap();
    let mut resumed = AdamW::new_named(vec![a2.clone(), b2.clone()], names.clone(), AdamWConfig::default()).unwrap();
    resumed.load(&path).unwrap();
    assert_eq!(resumed.step_count(), 2);
    resumed.step(&grads, 1e-2).unwrap();
    assert_eq!(a1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), a2.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(b1.as_tensor().to_vec1::<f32>().unwrap(), b2.as_tensor().to_vec1::<f32>().unwrap());

    // A parameter with another shape: the error names it and both shapes.
    let wrong = Var::new(&[0f32; 4], &dev).unwrap();
    let mut other = AdamW::new_named(vec![a2.clone(), wrong], names.clone(), AdamWConfig::default()).unwrap();
    let err = format!("{:#}", other.load(&path).unwrap_err());
    assert!(err.contains("exp_avg.b") && err.contains("[3]") && err.contains("[4]"), "{err}");
    // A parameter that is not in the file.
    let mut missing = AdamW::new_named(vec![a2, b2], vec!["a".into(), "c".into()], AdamWConfig::default()).unwrap();
    let err = format!("{:#}", missing.load(&path).unwrap_err());
    assert!(err.contains("exp_avg.b") || err.contains("exp_avg.c"), "{err}");
}

fn close(a: f64, b: f64, what: &str) {
    // Tolerance: 1e-12 absolute (the formulas are closed form in f64).
    assert!((a - b).abs() < 1e-12, "{what}: {a} vs expected {b} (tolerance 1e-12)");
}

/// Values worked out by hand from diffusers' formulas with base 1e-3, W = 10, N = 110.
#[test]
fn lr_schedules_match_hand_computed_values() {
    let (lr, w, n) = (1e-3, 10, 110);
    let at = |s: &LrSchedule, step| lr_at(s, lr, step, w, n);
    close(at(&LrSchedule::Constant, 0), 1e-3, "constant ignores warmup");
    close(at(&LrSchedule::Constant, 500), 1e-3, "constant after the end");
    close(at(&LrSchedule::ConstantWithWarmup, 0), 0.0, "warmup starts at 0");
    close(at(&LrSchedule::ConstantWithWarmup, 4), 4e-4, "warmup 4/10");
    close(at(&LrSchedule::ConstantWithWarmup, 10), 1e-3, "warmup done");
    close(at(&LrSchedule::Linear, 5), 5e-4, "linear warmup");
    close(at(&LrSchedule::Linear, 10), 1e-3, "linear peak");
    close(at(&LrSchedule::Linear, 60), 5e-4, "linear half way (50/100)");
    close(at(&LrSchedule::Linear, 85), 2.5e-4, "linear 25/100 left");
    close(at(&LrSchedule::Linear, 110), 0.0, "linear end");
    close(at(&LrSchedule::Linear, 130), 0.0, "linear clamps at 0");
    close(at(&LrSchedule::Cosine, 3), 3e-4, "cosine warmup");
    close(at(&LrSchedule::Cosine, 60), 5e-4, "cosine p=0.5: 0.5(1+cos(pi/2))");
    close(at(&LrSchedule::Cosine, 35), 1e-3 * 0.5 * (1.0 + 0.5f64.sqrt()), "cosine p=0.25: 0.5(1+cos(pi/4))");
    close(at(&LrSchedule::Cosine, 110), 0.0, "cosine end");
    // p = 1.2 -> 0.5(1+cos(1.2 pi)) = 0.5(1 - cos(0.2 pi)) = 0.5(1 - 0.809017) = 0.0954915
    close(at(&LrSchedule::Cosine, 130), 1e-3 * 0.5 * (1.0 - (0.2 * std::f64::consts::PI).cos()), "cosine past the end rises again as in diffusers");
    let restarts = LrSchedule::CosineWithRestarts { num_cycles: 2 };
    close(at(&restarts, 35), 5e-4, "2 cycles, p=0.25: 0.5(1+cos(pi/2))");
    close(at(&restarts, 60), 1e-3, "2 cycles, p=0.5: restart");
    close(at(&restarts, 85), 5e-4, "2 cycles, p=0.75");
    close(at(&restarts, 110), 0.0, "p >= 1 gives 0");
    let one_cycle = LrSchedule::CosineWithRestarts { num_cycles: 1 };
    close(at(&one_cycle, 60), 5e-4, "1 cycle equals cosine");
    let poly = LrSchedule::Polynomial { power: 2.0, lr_end: 1e-7 };
    close(at(&poly, 5), 5e-4, "polynomial warmup");
    close(at(&poly, 10), 1e-3, "polynomial peak");
    close(at(&poly, 60), (1e-3 - 1e-7) * 0.25 + 1e-7, "(lr0-lr_end)(1-0.5)^2+lr_end");
    close(at(&poly, 110), 1e-7, "polynomial end");
    close(at(&poly, 111), 1e-7, "polynomial after the end");
    let linear_poly = LrSchedule::Polynomial { power: 1.0, lr_end: 1e-7 };
    close(at(&linear_poly, 85), (1e-3 - 1e-7) * 0.25 + 1e-7, "power 1");
    // No warmup: the first update gets the full lr.
    close(lr_at(&LrSchedule::Linear, 1e-3, 0, 0, 100), 1e-3, "linear without warmup");
    close(lr_at(&LrSchedule::Cosine, 1e-3, 0, 0, 100), 1e-3, "cosine without warmup");
}

#[test]
fn scale_lr_and_step_bookkeeping_as_the_reference() {
    close(scale_lr(1e-4, 4, 16, 1), 6.4e-3, "1e-4 * 4 * 16");
    // 24 examples, batch 5 -> 5 batches; GA 2 -> 3 updates per epoch (the last alone).
    let plan = StepPlan::new(24, 5, 2, 10, None).unwrap();
    assert_eq!(plan, StepPlan { batches_per_epoch: 5, updates_per_epoch: 3, max_train_steps: 30, num_epochs: 10 });
    let updates: Vec<bool> = (0..5).map(|b| plan.is_update_batch(b, 2)).collect();
    assert_eq!(updates, vec![false, true, false, true, true]);
    // max_train_steps wins and the epochs are recomputed: ceil(7 / 3) = 3.
    let plan = StepPlan::new(24, 5, 2, 100, Some(7)).unwrap();
    assert_eq!((plan.max_train_steps, plan.num_epochs), (7, 3));
    assert_eq!(plan.first_epoch_after_resume(6), 2);
    let err = StepPlan::new(0, 5, 1, 1, None).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

/// A parameter without a gradient is skipped as torch skips `grad is None`: unchanged, and its
/// own bias-correction count does not advance.
#[test]
fn parameters_without_gradients_are_skipped() {
    let dev = Device::Cpu;
    let a = Var::new(&[1.0f32], &dev).unwrap();
    let b = Var::new(&[1.0f32], &dev).unwrap();
    let mut opt = AdamW::new(vec![a.clone(), b.clone()], AdamWConfig::default()).unwrap();
    let g = Tensor::new(&[0.5f32], &dev).unwrap();
    opt.step_some(&[Some(&g), None], 0.1).unwrap();
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0], "no gradient, no weight decay either");
    opt.step_some(&[Some(&g), Some(&g)], 0.1).unwrap();
    // b's first update (k = 1) equals a's first update.
    let fresh = Var::new(&[1.0f32], &dev).unwrap();
    let mut reference = AdamW::new(vec![fresh.clone()], AdamWConfig::default()).unwrap();
    reference.step(&[g.clone()], 0.1).unwrap();
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), fresh.as_tensor().to_vec1::<f32>().unwrap());
    assert_ne!(a.as_tensor().to_vec1::<f32>().unwrap(), fresh.as_tensor().to_vec1::<f32>().unwrap());
    assert_eq!(opt.step_count(), 2);
}

/// `optimizer.fused` (one pass over one flat buffer) gives the per-parameter AdamW's bits: the
/// golden step's 160 real LoRA parameters and gradients for 12 steps, with weight decay, a
/// changing learning rate, and one parameter left out every third step (so the parameters'
/// step counts, and their bias corrections, differ), compared with `==` on every value of the
/// parameters and both moments (saved state).
#[test]
fn fused_adamw_is_the_per_parameter_adamw_bit_for_bit() {
    let g = golden();
    let mut names: Vec<String> = g.keys().filter_map(|k| k.strip_prefix("before.").map(str::to_string)).collect();
    names.sort();
    let run = |fused: bool| -> (Vec<Vec<f32>>, Vec<u8>) {
        let vars: Vec<Var> = names.iter().map(|n| Var::from_tensor(&g[&format!("before.{n}")]).unwrap()).collect();
        let cfg = AdamWConfig { weight_decay: 1e-2, fused, ..Default::default() };
        let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
        for step in 0..12usize {
            let grads: Vec<Tensor> = names
                .iter()
                .map(|n| (g[&format!("grad.{n}")].clone() * (1.0 + 0.37 * step as f64)).unwrap().sin().unwrap())
                .collect();
            let some: Vec<Option<&Tensor>> = grads.iter().enumerate().map(|(i, t)| (!(i == 3 && step % 3 == 0)).then_some(t)).collect();
            opt.step_some(&some, 1e-3 * (1.0 + step as f64 / 7.0)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let state = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut keys: Vec<&String> = state.keys().collect();
        keys.sort();
        let bytes: Vec<u8> = keys.iter().flat_map(|k| state[*k].flatten_all().unwrap().to_vec1::<f32>().unwrap()).flat_map(f32::to_le_bytes).collect();
        (vars.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect(), bytes)
    };
    let (plain, plain_state) = run(false);
    let (fused, fused_state) = run(true);
    assert_eq!(plain.len(), fused.len());
    for (i, (a, b)) in plain.iter().zip(&fused).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameter {} differs", names[i]);
    }
    assert!(plain_state == fused_state, "the moments differ");
    assert!(plain[0] != g[&format!("before.{}", names[0])].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "the steps moved the weights");
}
