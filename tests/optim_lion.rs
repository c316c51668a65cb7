//! `optimizer.kind = "lion"`: Lion as lion-pytorch 0.2.5 computes it (kohya's `--optimizer_type
//! Lion`), five steps against `tests/fixtures/golden/lion.safetensors`
//! (`tools/reference/make_lion_golden.py`); its one-moment state through a checkpoint; the config
//! keys' per-kind defaults and refusals.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use lora::train::optim::{AdamW, AdamWConfig, UpdateRule};

fn golden() -> HashMap<String, Tensor> {
    let path = crate::support::repo_root().join("tests/fixtures/golden/lion.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn lion() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.99, weight_decay: 0.1, rule: UpdateRule::Lion, ..Default::default() }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn lion_matches_lion_pytorch_step_for_step() {
    let g = golden();
    let names = ["a", "b", "c"];
    let vars: Vec<Var> = names.iter().map(|n| Var::from_tensor(&g[&format!("before.{n}")]).unwrap()).collect();
    let mut opt = AdamW::new_named(vars.clone(), names.iter().map(|n| n.to_string()).collect(), lion()).unwrap();
    let mut worst = 0f32;
    for step in 0..5 {
        let grads: Vec<Tensor> = names.iter().map(|n| g[&format!("grad.{step}.{n}")].clone()).collect();
        opt.step(&grads, 3e-4).unwrap();
        for (n, v) in names.iter().zip(&vars) {
            for (o, w) in values(v.as_tensor()).iter().zip(values(&g[&format!("after.{step}.{n}")])) {
                worst = worst.max((o - w).abs());
            }
        }
    }
    // The same f32 operations in the same order: the only room is float rounding of p·(1 − lr·wd)
    // (1e-7 of |p| ~ 3), and a sign flipping on a near-zero interpolation would move an element by
    // 2·lr = 6e-4, far above the tolerance.
    eprintln!("lion vs lion-pytorch: worst abs error over 5 steps {worst:e} (tolerance 1e-6)");
    assert!(worst <= 1e-6, "worst abs error {worst:e} > 1e-6");
    // Step 0's zero gradients: the sign is 0, so those elements only decayed.
    let before = values(&g["before.a"]);
    let after = values(&g["after.0.a"]);
    for i in (0..before.len()).step_by(3) {
        assert!((after[i] - before[i] * (1.0 - 3e-4 * 0.1)).abs() < 1e-7, "element {i}");
    }
}

#[test]
fn lion_state_is_one_moment_and_is_not_adamws() {
    let g = golden();
    let var = Var::from_tensor(&g["before.a"]).unwrap();
    let mut opt = AdamW::new_named(vec![var.clone()], vec!["a".into()], lion()).unwrap();
    opt.step(&[g["grad.0.a"].clone()], 3e-4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    opt.save(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&std::fs::read(&path).unwrap()).unwrap().names().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(st, vec!["exp_avg.a".to_string()], "Lion keeps one moment");
    // Restored, the next step equals an uninterrupted one.
    let resumed_var = Var::from_tensor(var.as_tensor()).unwrap();
    let mut resumed = AdamW::new_named(vec![resumed_var.clone()], vec!["a".into()], lion()).unwrap();
    resumed.load(&path).unwrap();
    opt.step(&[g["grad.1.a"].clone()], 3e-4).unwrap();
    resumed.step(&[g["grad.1.a"].clone()], 3e-4).unwrap();
    assert_eq!(values(var.as_tensor()), values(resumed_var.as_tensor()));
    // AdamW's state does not load into Lion, and the error names both.
    let mut adamw = AdamW::new_named(vec![Var::from_tensor(&g["before.a"]).unwrap()], vec!["a".into()], AdamWConfig::default()).unwrap();
    adamw.step(&[g["grad.0.a"].clone()], 1e-3).unwrap();
    adamw.save(&path).unwrap();
    let err = format!("{:#}", resumed.load(&path).unwrap_err());
    assert!(err.contains("AdamW") && err.contains("Lion"), "{err}");
}

#[test]
fn lion_keys_default_per_kind_and_refuse_epsilon() {
    let root = crate::support::repo_root();
    let load = |set: &[&str]| lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &set.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let p = load(&["optimizer.kind=\"lion\""]).unwrap_or_else(|d| panic!("{}", d.render())).pipeline;
    assert_eq!((p.optimizer.beta2(), p.optimizer.weight_decay()), (0.99, 0.0), "lion-pytorch's defaults");
    let p = load(&[]).unwrap().pipeline;
    assert_eq!((p.optimizer.beta2(), p.optimizer.weight_decay()), (0.999, 1e-2), "the reference's AdamW");
    let err = load(&["optimizer.kind=\"lion\"", "optimizer.epsilon=1e-6"]).err().expect("refused").render();
    assert!(err.contains("optimizer.epsilon") && err.contains("Lion"), "{err}");
    let err = load(&["optimizer.kind=\"sgd\""]).err().expect("refused").render();
    assert!(err.contains("adamw") && err.contains("lion") && err.contains("prodigy"), "names the kinds: {err}");
}

/// `train.ema_decay`: the moving average the optimizer keeps is diffusers' `EMAModel` (decay
/// ramp (1 + k) / (10 + k) capped at 0.9 here, the first update copying the parameters), on the
/// Lion trajectory above; it travels with the optimizer's state.
#[test]
fn ema_matches_diffusers_emamodel_and_survives_save_and_load() {
    let g = golden();
    let names = ["a", "b", "c"];
    let cfg = AdamWConfig { ema_decay: Some(0.9), ..lion() };
    let vars: Vec<Var> = names.iter().map(|n| Var::from_tensor(&g[&format!("before.{n}")]).unwrap()).collect();
    let mut opt = AdamW::new_named(vars.clone(), names.iter().map(|n| n.to_string()).collect(), cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let mut worst = 0f32;
    for step in 0..5 {
        let grads: Vec<Tensor> = names.iter().map(|n| g[&format!("grad.{step}.{n}")].clone()).collect();
        opt.step(&grads, 3e-4).unwrap();
        let ema = opt.ema_weights().expect("an EMA is kept");
        for n in names {
            for (o, w) in values(&ema[n]).iter().zip(values(&g[&format!("ema.{step}.{n}")])) {
                worst = worst.max((o - w).abs());
            }
        }
        if step == 2 {
            // Saved and restored mid-way, the average goes on as if never interrupted.
            opt.save(&path).unwrap();
            let restored: Vec<Var> = vars.iter().map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()).collect();
            let mut again = AdamW::new_named(restored.clone(), names.iter().map(|n| n.to_string()).collect(), cfg).unwrap();
            again.load(&path).unwrap();
            assert_eq!(values(&again.ema_weights().unwrap()["a"]), values(&ema["a"]));
            // The restored optimizer steps its own copies of the parameters from here on.
            opt = again;
        }
    }
    eprintln!("EMA vs diffusers EMAModel: worst abs error over 5 steps {worst:e} (tolerance 1e-6)");
    assert!(worst <= 1e-6, "worst abs error {worst:e}");
    assert_eq!(lora::train::optim::ema_decay(0.9, 1), 0.0, "the first update copies the parameters");
    assert_eq!(lora::train::optim::ema_decay(0.9, 3), 3.0 / 12.0);
    assert_eq!(lora::train::optim::ema_decay(0.9, 1000), 0.9);
}

/// What `lora bench` reports as the optimizer's state: AdamW's two f32 moments, Lion's one, and
/// the moving average on top.
#[test]
fn optimizer_state_bytes_per_kind() {
    let g = golden();
    let vars = || ["a", "b", "c"].iter().map(|n| Var::from_tensor(&g[&format!("before.{n}")]).unwrap()).collect::<Vec<_>>();
    let elems = 4 * 8 + 8 + 3 * 2 * 2;
    let bytes = |cfg: AdamWConfig| AdamW::new(vars(), cfg).unwrap().state_bytes();
    assert_eq!(bytes(AdamWConfig::default()), 2 * 4 * elems);
    assert_eq!(bytes(lion()), 4 * elems, "half AdamW's");
    assert_eq!(bytes(AdamWConfig { ema_decay: Some(0.99), ..lion() }), 2 * 4 * elems);
}
