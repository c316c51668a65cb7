//! Gradient checkpointing (`train.gradient_checkpointing`, `nn::checkpoint`) on the tiny SD
//! fixture: the golden training step still passes with it, every LoRA gradient equals the one
//! without it (also for LoRA on every linear layer of the UNet, and summed over two micro-steps
//! of gradient accumulation), no gradient is lost or counted twice, and the trainer's own loop
//! gives the same grad norms and weights with and without it.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use lora::adapters::lora::{inject, load_peft_tensors, InitRng, LoraSpec, TrainableLora};
use lora::models::{LoadOptions, StableDiffusion};
use lora::nn::CheckpointGrads;
use lora::schedulers::ddpm::Ddpm;
use lora::train::step::{denoising_loss_checkpointed, LossOptions};
use rand::SeedableRng;

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

fn golden(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("golden file loads")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

fn tiny_sd() -> StableDiffusion {
    StableDiffusion::load(fixture("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap()
}

/// The recomputation runs the same kernels on bit-identical inputs (the loss is bit-identical),
/// only the order in which candle's backward sums gradient contributions differs: per tensor,
/// max |with - without| must stay within 2e-5 of that tensor's max |gradient|. Measured on this
/// fixture: up to 5.3e-6, in the down blocks (the far end of the backward, where the rounding
/// differences of ~20 layers add up); a wrong, lost or doubled gradient is off by O(1).
const EQUAL_TOL: f32 = 2e-5;

/// One micro-step's gradients: loss, backward, and with checkpointing the side channel merged.
struct Step {
    loss: f64,
    grads: GradStore,
    checkpointed: usize,
    recomputed: usize,
}

struct Inputs {
    x0: Tensor,
    noise: Tensor,
    timesteps: Vec<u32>,
    ehs: Tensor,
}

fn golden_inputs() -> Inputs {
    let unet_in = golden("golden/unet.safetensors");
    let ddpm_golden = golden("golden/ddpm.safetensors");
    Inputs {
        x0: unet_in["sample"].clone(),
        noise: ddpm_golden["noise"].clone(),
        timesteps: unet_in["timesteps"].to_vec1::<i64>().unwrap().iter().map(|&t| t as u32).collect(),
        ehs: unet_in["encoder_hidden_states"].clone(),
    }
}

fn step(sd: &StableDiffusion, inputs: &Inputs, checkpointing: bool) -> Step {
    let ddpm = Ddpm::from_config(&sd.scheduler).unwrap();
    let ckpt = checkpointing.then(CheckpointGrads::new);
    let loss = denoising_loss_checkpointed(
        &sd.unet,
        &ddpm,
        &inputs.x0,
        &inputs.noise,
        &inputs.timesteps,
        &lora::models::Conditioning::context(inputs.ehs.clone()),
        &LossOptions::default(),
        ckpt.as_ref(),
    )
    .unwrap();
    let mut grads = loss.backward().unwrap();
    if let Some(c) = &ckpt {
        let merged = c.merge_into(&mut grads).unwrap();
        assert!(merged > 0, "checkpointing merged no gradient");
        assert_eq!(c.pending(), 0);
    }
    Step {
        loss: scalar(&loss),
        grads,
        checkpointed: ckpt.as_ref().map_or(0, |c| c.checkpointed()),
        recomputed: ckpt.as_ref().map_or(0, |c| c.recomputed()),
    }
}

fn params(loras: &[TrainableLora]) -> Vec<(String, Var)> {
    loras.iter().flat_map(|l| [(l.peft_down_name(), l.down.clone()), (l.peft_up_name(), l.up.clone())]).collect()
}

/// Parameters whose gradient is mathematically zero on the tiny fixture, so that both ways it
/// is f32 rounding noise: the mid block works on a 1x1 latent, so its self-attention has one
/// token (softmax of one score is 1 whatever q and k are); and a resnet with 32 channels has a
/// 32-group norm2, one channel per group, which removes the per-channel constant that
/// `time_emb_proj` adds.
fn mathematically_zero(name: &str) -> bool {
    let single_token = name.starts_with("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.")
        || name.starts_with("mid_block.attentions.0.transformer_blocks.0.attn1.to_k.");
    let one_channel_groups = name.starts_with("down_blocks.0.resnets.0.time_emb_proj.") || name.starts_with("up_blocks.3.resnets.");
    single_token || (one_channel_groups && name.contains(".time_emb_proj."))
}

/// Every parameter has a gradient both ways and the two agree within `EQUAL_TOL` of the
/// tensor's largest gradient. With `nonzero`, gradients that are mathematically zero
/// (`mathematically_zero`) must stay below 1e-6 of the largest gradient of all both ways (they
/// are rounding noise), and every other one must be non-zero. Returns the largest relative
/// difference seen among the non-zero ones.
fn assert_equal_grads(params: &[(String, Var)], plain: &GradStore, ckpt: &GradStore, nonzero: bool) -> f32 {
    let get = |store: &GradStore, name: &str, var: &Var, what: &str| {
        store.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient {what}")).clone()
    };
    let global = params.iter().map(|(n, v)| max_abs(&get(plain, n, v, "without checkpointing"))).fold(0f32, f32::max);
    assert!(global > 0.0);
    let mut worst = 0f32;
    for (name, var) in params {
        let p = get(plain, name, var, "without checkpointing");
        let c = get(ckpt, name, var, "with checkpointing (lost)");
        let scale = max_abs(&p);
        let diff = max_abs(&(&p - &c).unwrap());
        if nonzero {
            if mathematically_zero(name) {
                assert!(scale <= 1e-6 * global && max_abs(&c) <= 1e-6 * global, "{name}: should be ~0, max |grad| {scale} of {global}");
                continue;
            }
            assert!(scale > 0.0 && max_abs(&c) > 0.0, "{name}: zero gradient");
        }
        assert!(diff <= EQUAL_TOL * scale.max(1e-6 * global), "{name}: max diff {diff}, max |grad| {scale} (tolerance {EQUAL_TOL} relative)");
        worst = worst.max(diff / scale.max(1e-6 * global));
    }
    worst
}

/// The golden training step (`tests/train_golden.rs`) with checkpointing on: loss and every
/// LoRA gradient against the reference at the golden test's tolerances, and against the same
/// step without checkpointing at `EQUAL_TOL`.
#[test]
fn golden_step_with_checkpointing() {
    let mut sd = tiny_sd();
    let mut rng = InitRng::seed_from_u64(0);
    let loras = inject(sd.unet.linears_mut(), &LoraSpec::reference_unet(4), &mut rng).unwrap();
    let golden_step = golden("golden/train_step.safetensors");
    load_peft_tensors(&loras, &golden_step, "before.").unwrap();
    let inputs = golden_inputs();

    let plain = step(&sd, &inputs, false);
    let ckpt = step(&sd, &inputs, true);
    // Down block 0's first resnet holds no LoRA and sees no gradient-carrying input: it runs
    // plainly. The other 23 resnets and transformers are checkpointed, each recomputed once.
    assert_eq!(ckpt.checkpointed, 23, "pieces checkpointed");
    assert_eq!(ckpt.recomputed, ckpt.checkpointed, "every checkpointed piece is recomputed exactly once");

    let reference_loss = scalar(&golden_step["loss"]);
    assert!((ckpt.loss - reference_loss).abs() <= 1e-5 * reference_loss.abs(), "loss {} vs reference {reference_loss}", ckpt.loss);
    assert_eq!(ckpt.loss, plain.loss, "the forward value does not change");

    // Against the reference: as tests/train_golden.rs (1e-3 of the tensor's max; ~0 where the
    // reference's gradient is exactly zero).
    let ps = params(&loras);
    for (name, var) in &ps {
        let g = ckpt.grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} received no gradient"));
        let reference = &golden_step[&format!("grad.{name}")];
        let scale = max_abs(reference);
        let diff = max_abs(&(g - reference).unwrap());
        if scale > 1e-8 {
            assert!(diff <= 1e-3 * scale, "grad of {name}: max diff {diff}, max |reference| {scale} (1e-3 relative)");
            assert!(max_abs(g) > 0.0, "{name} got a zero gradient");
        } else {
            assert!(diff <= 1e-8, "grad of {name} should be ~0 as in the reference, max diff {diff}");
        }
    }
    let worst = assert_equal_grads(&ps, &plain.grads, &ckpt.grads, false);
    eprintln!("golden step: largest relative gradient difference with/without checkpointing {worst:e}");
}

/// Give every LoRA up matrix random values so that no gradient is zero (PEFT's init has B = 0,
/// which makes every A gradient exactly zero).
fn randomize_up(loras: &[TrainableLora], seed: u64) {
    use rand::RngExt;
    let mut rng = InitRng::seed_from_u64(seed);
    for l in loras {
        let n = l.up.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        l.up.set(&Tensor::from_vec(v, l.up.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}

/// LoRA on every linear layer the UNet has (attention, feed-forward, proj_in/out, the resnets'
/// time_emb_proj, the time embedding): resnet and feed-forward parameters live inside
/// checkpointed pieces whose inputs carry no gradient (the first ones), or outside any piece
/// (the time embedding). Every parameter gets a non-zero gradient, equal to the one without.
#[test]
fn every_lora_target_gets_the_same_nonzero_gradient() {
    let mut sd = tiny_sd();
    let mut rng = InitRng::seed_from_u64(1);
    let spec = LoraSpec {
        targets: ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "linear_1", "linear_2"]
            .map(String::from)
            .to_vec(),
        ..LoraSpec::reference_unet(2)
    };
    let loras = inject(sd.unet.linears_mut(), &spec, &mut rng).unwrap();
    assert!(loras.iter().any(|l| l.module == "down_blocks.0.resnets.0.time_emb_proj"));
    assert!(loras.iter().any(|l| l.module == "time_embedding.linear_1"));
    randomize_up(&loras, 2);
    let inputs = golden_inputs();
    let plain = step(&sd, &inputs, false);
    let ckpt = step(&sd, &inputs, true);
    assert_eq!(ckpt.checkpointed, 24, "with LoRA in every resnet, all 24 pieces are checkpointed");
    assert_eq!(ckpt.recomputed, 24);
    assert_eq!(ckpt.loss, plain.loss);
    let worst = assert_equal_grads(&params(&loras), &plain.grads, &ckpt.grads, true);
    eprintln!("all targets: {} parameters, largest relative difference {worst:e}", 2 * loras.len());
}

/// Gradient accumulation: two micro-steps (different noise and timesteps), each with its own
/// handle merged after its own backward, summed as the trainer sums them, equal the sum without
/// checkpointing. A gradient counted twice, or kept over from the first micro-step, would be off
/// by a whole micro-step's contribution.
#[test]
fn accumulated_gradients_over_two_micro_steps_are_equal() {
    let mut sd = tiny_sd();
    let mut rng = InitRng::seed_from_u64(3);
    let loras = inject(sd.unet.linears_mut(), &LoraSpec::reference_unet(4), &mut rng).unwrap();
    randomize_up(&loras, 4);
    let first = golden_inputs();
    let second = Inputs {
        noise: (first.noise.affine(-0.5, 0.0).unwrap() + first.x0.affine(0.25, 0.0).unwrap()).unwrap(),
        timesteps: first.timesteps.iter().map(|t| (t + 317) % 1000).collect(),
        ..golden_inputs()
    };
    let ps = params(&loras);
    let sum = |checkpointing: bool| -> GradStore {
        let a = step(&sd, &first, checkpointing);
        let b = step(&sd, &second, checkpointing);
        let mut total = GradStore::default();
        for (name, v) in &ps {
            let ga = a.grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in micro-step 1"));
            let gb = b.grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in micro-step 2"));
            total.insert(v.as_tensor(), ((ga + gb).unwrap() / 2.0).unwrap());
        }
        total
    };
    let worst = assert_equal_grads(&ps, &sum(false), &sum(true), true);
    eprintln!("two micro-steps: largest relative difference {worst:e}");
}

mod trainer_loop {
    use super::*;
    use lora::train::optim::AdamWConfig;
    use lora::train::trainer::{BatchSource, TrainBatch, TrainSettings, Trainer};
    use lora::train::checkpoint::NamedVar;

    struct Fixed(Vec<(Tensor, String)>);

    impl BatchSource for Fixed {
        fn num_examples(&self) -> usize {
            self.0.len()
        }
        fn batches<'a>(&'a self, _epoch: usize, start: usize) -> Box<dyn Iterator<Item = anyhow::Result<TrainBatch>> + 'a> {
            Box::new(self.0.iter().skip(start).map(|(px, c)| Ok(TrainBatch { pixel_values: px.unsqueeze(0)?, captions: vec![c.clone()], geometry: vec![] })))
        }
    }

    fn settings(dir: &std::path::Path, checkpointing: bool, steps: usize) -> TrainSettings {
        TrainSettings {
            gradient_accumulation_steps: 2,
            // eps = 1 makes AdamW's update ~ lr · m / (sqrt(v) + 1) ~ lr · the gradient for
            // gradients well below 1, so the weights show a gradient's scale (with the default
            // eps the first update is lr · sign(g), blind to scale and chaotic where g ~ 0).
            adamw: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1.0, weight_decay: 0.0, ..Default::default() },
            gradient_checkpointing: checkpointing,
            ..crate::support::small_run(dir, steps, 7)
        }
    }

    /// Two optimizer updates of two micro-steps each through `Trainer::train` (which creates a
    /// handle per micro-step and merges it after that micro-step's backward). Returns the logged
    /// grad norms (global, no clipping), and how far training moved each parameter with its
    /// largest absolute value afterwards.
    fn train(checkpointing: bool, steps: usize) -> (Vec<f64>, Vec<(Tensor, f32)>) {
        let mut sd = tiny_sd();
        let mut rng = InitRng::seed_from_u64(5);
        let loras = inject(sd.unet.linears_mut(), &LoraSpec::reference_unet(4), &mut rng).unwrap();
        randomize_up(&loras, 6);
        let named: Vec<NamedVar> = loras
            .iter()
            .flat_map(|l| [NamedVar { name: l.peft_down_name(), var: l.down.clone() }, NamedVar { name: l.peft_up_name(), var: l.up.clone() }])
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut prng = InitRng::seed_from_u64(8);
        let source = Fixed(
            (0..8)
                .map(|i| {
                    use rand::RngExt;
                    let v: Vec<f32> = (0..3 * 64 * 64).map(|_| prng.random_range(-1f32..1.0)).collect();
                    (Tensor::from_vec(v, (3, 64, 64), &Device::Cpu).unwrap(), format!("a shape number {i}"))
                })
                .collect(),
        );
        let before: Vec<Tensor> = named.iter().map(|p| p.var.as_tensor().copy().unwrap()).collect();
        let mut trainer = Trainer::new(&sd, named.clone(), settings(dir.path(), checkpointing, steps)).unwrap();
        let outcome = trainer.train(&source, None).unwrap();
        assert_eq!(outcome.global_step, steps);
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let norms = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"].as_f64().unwrap()).collect();
        (norms, named.iter().zip(&before).map(|(p, b)| ((p.var.as_tensor() - b).unwrap(), max_abs(p.var.as_tensor()))).collect())
    }

    /// One update of two micro-steps: the logged grad norm within 1e-5 relative (see
    /// `EQUAL_TOL`), and every parameter's change within 1e-4 of that tensor's largest change
    /// (f32 rounding of the gradients) plus two ulps of its largest weight (the stored weights
    /// round the change). A micro-step's gradient lost or counted twice would move the norm and
    /// the changes by tens of percent.
    #[test]
    fn trainer_update_with_accumulation_is_the_same() {
        let (norms_plain, w_plain) = train(false, 1);
        let (norms_ckpt, w_ckpt) = train(true, 1);
        assert_eq!((norms_plain.len(), norms_ckpt.len()), (1, 1));
        let (p, c) = (norms_plain[0], norms_ckpt[0]);
        assert!(p > 0.0 && (p - c).abs() <= 1e-5 * p, "grad norm {c} with checkpointing vs {p} without (1e-5 relative)");
        let mut worst = 0f32;
        for ((p, w), (c, _)) in w_plain.iter().zip(&w_ckpt) {
            let (diff, scale) = (max_abs(&(p - c).unwrap()), max_abs(p));
            let tol = 1e-4 * scale + 2.0 * f32::EPSILON * w;
            assert!(diff <= tol, "weight changes differ by {diff}, largest change {scale}, largest weight {w} (tolerance {tol})");
            worst = worst.max(diff / tol);
        }
        eprintln!("trainer: grad norm {p} vs {c}, largest weight-change difference {worst:.3} of its tolerance");
    }

    /// Two updates: each update's handles are fresh, nothing carries over from the first. The
    /// second norm gets 1e-2 relative: rounding-level differences of the first update are
    /// amplified by this fixture (a 1e-5 relative change of the learning rate alone moves the
    /// second norm by 1.3e-4 relative); a leftover micro-step would move it by tens of percent.
    #[test]
    fn trainer_second_update_starts_clean() {
        let (norms_plain, _) = train(false, 2);
        let (norms_ckpt, _) = train(true, 2);
        assert_eq!((norms_plain.len(), norms_ckpt.len()), (2, 2));
        for (i, (p, c)) in norms_plain.iter().zip(&norms_ckpt).enumerate() {
            let tol = if i == 0 { 1e-5 } else { 1e-2 };
            assert!(*p > 0.0 && (p - c).abs() <= tol * p, "update {}: grad norm {c} with checkpointing vs {p} without ({tol} relative)", i + 1);
        }
        eprintln!("trainer, two updates: grad norms {norms_plain:?} vs {norms_ckpt:?}");
    }
}
