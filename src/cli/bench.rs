//! `lora bench`: steady-state time per optimizer step, images/s and peak memory of a pipeline's
//! training step (warm-up steps excluded), for side-by-side runs with the reference
//! (`docs/benchmarks.md`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;


#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first (allocations, caches).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Cache VAE latents and text embeddings as `lora run` does (the reference encodes every
    /// step, so the default compares like with like).
    #[arg(long)]
    pub cache: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image side in pixels (shortcut for `--set preprocess.resolution=N`).
    #[arg(long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// Images per micro-step (shortcut for `--set train.batch_size=N`).
    #[arg(long, value_name = "N")]
    pub batch: Option<u32>,
    /// Attention implementation: auto (the fused flash kernel on CPU, chunked elsewhere),
    /// fused, chunked or composed (full score matrices). Default: `LORA_ATTENTION`, else auto.
    #[arg(long)]
    pub attention: Option<crate::nn::attention::AttentionBackend>,
    /// Time the pieces of the timed steps (forward, backward, optimizer, and our own conv,
    /// linear, attention and group-norm kernels; the rest is candle's tensor ops) and print them.
    #[arg(long)]
    pub profile: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    if let Some(backend) = args.attention {
        crate::nn::attention::set_backend(backend);
    }
    let attention = crate::nn::attention::backend()?;
    let mut overrides = Vec::new();
    overrides.push(format!("train.max_steps={}", args.steps + args.warmup));
    if let Some(r) = args.resolution {
        overrides.push(format!("preprocess.resolution={r}"));
    }
    if let Some(b) = args.batch {
        overrides.push(format!("train.batch_size={b}"));
    }
    let tmp = tempfile::tempdir().context("creating a temporary output directory")?;
    overrides.push(format!("output.dir={:?}", tmp.path().display().to_string()));
    // Checkpoints are switched off below: their warnings (e.g. "no checkpoint will be saved")
    // are about settings the bench does not use.
    let mut loaded = match args.pipeline.load_except(&overrides, &["checkpoints"]) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    loaded.pipeline.train.gradient_accumulation_steps = loaded.pipeline.train.gradient_accumulation_steps.max(1);
    // No checkpoint inside the timed steps (set here, not as an override, so that validation
    // does not warn about a key the user never wrote).
    loaded.pipeline.checkpoints.every_steps = u64::MAX >> 1;
    // No validation images either: cleared here too, since an override would leave a pipeline's
    // other validation keys (`validation.steps`, ...) set without prompts, which is an error.
    loaded.pipeline.validation.prompts.clear();
    let batch = loaded.pipeline.train.batch_size as usize * loaded.pipeline.train.gradient_accumulation_steps as usize;

    let stamps = std::cell::RefCell::new(Vec::<Instant>::new());
    let started = Instant::now();
    let warmup = args.warmup;
    crate::util::profile::enable(args.profile && warmup == 0);
    // The same stage table as `lora run` (model, dataset, preprocess, encode with --cache, train,
    // export) into the temporary folder, with a timing hook on the train stage.
    let report = crate::runner::run::bench_pipeline(&loaded, !args.cache, &mut |_, _, _, _| {
        stamps.borrow_mut().push(Instant::now());
        if args.profile && stamps.borrow().len() == warmup {
            crate::util::profile::enable(true);
        }
        // The evaluation after the last step is not a training step.
        if stamps.borrow().len() == warmup + args.steps {
            crate::util::profile::enable(false);
        }
    })?;
    crate::util::profile::enable(false);
    let total = started.elapsed().as_secs_f64();
    let stamps = stamps.into_inner();
    anyhow::ensure!(stamps.len() > args.warmup, "training stopped after {} steps", stamps.len());
    let timed = &stamps[args.warmup..];
    let first = if args.warmup == 0 { report.train_started } else { stamps[args.warmup - 1] };
    let ms = timed.last().expect("at least one timed step").duration_since(first).as_secs_f64() * 1e3 / timed.len() as f64;
    let images_per_s = batch as f64 / (ms / 1e3);
    let peak = crate::util::memory::peak_rss_bytes();
    let peak_process = report.setup_peak_rss_bytes.max(peak);
    let device = if report.device_is_cpu { "cpu" } else { "cuda" };
    let p = &loaded.pipeline;
    let resolution = report.run.resolution.unwrap_or(0);
    let precision = crate::config::choice_name(&p.train.precision);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"tool": "lora", "device": device, "device_name": report.device, "ms_per_step": ms, "images_per_s": images_per_s,
                "batch": batch, "resolution": resolution, "steps": args.steps, "warmup": args.warmup,
                "cache": args.cache, "precision": precision, "gradient_checkpointing": p.train.gradient_checkpointing,
                "attention": attention.name(), "threads": rayon::current_num_threads(), "peak_rss_bytes": peak, "peak_rss_process_bytes": peak_process,
                "peak_device_bytes": report.peak_device_bytes, "model_device_bytes": report.model_bytes, "total_s": total,
                "optimizer": crate::config::choice_name(&p.optimizer.kind), "optimizer_state_bytes": report.run.optimizer_state_bytes})
        );
    } else {
        println!("lora bench {} ({})", args.pipeline.file.display(), report.device);
        println!(
            "  batch {batch} at {resolution} px, precision {precision}, gradient checkpointing {}, {attention} attention, {} timed steps after {} warm-up",
            if p.train.gradient_checkpointing { "on" } else { "off" },
            args.steps,
            args.warmup
        );
        println!("  {ms:.1} ms per optimizer step, {images_per_s:.1} images/s");
        if let Some(g) = report.peak_device_bytes {
            println!("  peak GPU memory {:.0} MiB in use (after loading the model: {:.0} MiB; CUDA context included)", mib(g), mib(report.model_bytes.unwrap_or(0)));
        }
        if let Some(p) = peak {
            println!("  peak host memory {:.0} MiB resident while training (whole run {:.0} MiB)", mib(p), mib(peak_process.unwrap_or(p)));
        }
        if let Some(b) = report.run.optimizer_state_bytes {
            println!("  optimizer {} state {:.2} MiB", crate::config::choice_name(&p.optimizer.kind), mib(b as u64));
        }
        println!("  whole run {total:.1} s (model load, data, warm-up included)");
    }
    if args.profile {
        print_profile(ms * timed.len() as f64, timed.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The profile of the timed steps, on stderr (stdout may be JSON): milliseconds per step and
/// share of the step for each recorded piece.
fn print_profile(total_ms: f64, steps: usize) {
    eprintln!("profile of {steps} timed step(s), ms per step (share of the step):");
    for (name, d, calls) in crate::util::profile::totals() {
        let ms = d.as_secs_f64() * 1e3;
        eprintln!("  {name:<18} {:>9.2} ms  {:>5.1} %  {:>6} calls/step", ms / steps as f64, 100.0 * ms / total_ms, calls as f64 / steps as f64);
    }
    eprintln!("  (step.forward and step.backward contain the kernels listed; the rest of them is candle's tensor ops)");
}
