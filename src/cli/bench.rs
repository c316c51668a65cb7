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
    /// Attention implementation: auto (the fused flash kernel on CPU, chunked elsewhere),
    /// fused, chunked or composed (full score matrices). Default: `LORA_ATTENTION`, else auto.
    #[arg(long)]
    pub attention: Option<crate::nn::attention::AttentionBackend>,
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    if let Some(backend) = args.attention {
        crate::nn::attention::set_backend(backend);
    }
    let attention = crate::nn::attention::backend()?;
    let mut overrides = Vec::new();
    overrides.push(format!("train.max_steps={}", args.steps + args.warmup));
    overrides.push(format!("checkpoints.every_steps={}", usize::MAX >> 1));
    overrides.push("validation.prompts=[]".into());
    let tmp = tempfile::tempdir().context("creating a temporary output directory")?;
    overrides.push(format!("output.dir={:?}", tmp.path().display().to_string()));
    let mut loaded = match args.pipeline.load(&overrides) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    loaded.pipeline.train.gradient_accumulation_steps = loaded.pipeline.train.gradient_accumulation_steps.max(1);
    let batch = loaded.pipeline.train.batch_size as usize * loaded.pipeline.train.gradient_accumulation_steps as usize;
    let resolution = loaded.pipeline.preprocess.resolution;

    let stamps = std::cell::RefCell::new(Vec::<Instant>::new());
    let started = Instant::now();
    let report = crate::runner::run::bench_pipeline(&loaded, !args.cache, &mut |_, _, _, _| stamps.borrow_mut().push(Instant::now()))?;
    let total = started.elapsed().as_secs_f64();
    let stamps = stamps.into_inner();
    anyhow::ensure!(stamps.len() > args.warmup, "training stopped after {} steps", stamps.len());
    let timed = &stamps[args.warmup..];
    let first = if args.warmup == 0 { report.train_started } else { stamps[args.warmup - 1] };
    let ms = timed.last().expect("at least one timed step").duration_since(first).as_secs_f64() * 1e3 / timed.len() as f64;
    let images_per_s = batch as f64 / (ms / 1e3);
    let peak = peak_rss_bytes();
    let device = if report.device_is_cpu { "cpu" } else { "cuda" };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"tool": "lora", "device": device, "ms_per_step": ms, "images_per_s": images_per_s,
                "batch": batch, "resolution": resolution, "steps": args.steps, "warmup": args.warmup,
                "cache": args.cache, "attention": attention.name(), "threads": rayon::current_num_threads(), "peak_rss_bytes": peak, "total_s": total})
        );
    } else {
        println!("lora bench {} ({device}, {} threads)", args.pipeline.file.display(), rayon::current_num_threads());
        println!("  batch {batch} at {resolution} px, {} timed steps after {} warm-up, {attention} attention", args.steps, args.warmup);
        println!("  {ms:.1} ms per optimizer step, {images_per_s:.1} images/s");
        if let Some(p) = peak {
            println!("  peak memory {:.0} MiB (resident)", p as f64 / (1024.0 * 1024.0));
        }
        println!("  whole run {total:.1} s (model load, data, warm-up included)");
    }
    Ok(ExitCode::SUCCESS)
}
