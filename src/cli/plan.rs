//! `lora plan`: the stages of a pipeline in order, with what each reads and writes.

use std::process::ExitCode;

use crate::config::{choice_name, tidy_path, Crop, OutputFormat, Pipeline};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

/// One stage of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    pub does: String,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = match args.pipeline.load(&[]) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    println!("plan for {}", args.pipeline.file.display());
    // Which stages `lora run` would redo, from the fingerprints in <output>/lora.lock.
    let out_dir = &loaded.pipeline.output.dir;
    let lock = crate::runner::lock::Lock::read(out_dir).unwrap_or_default();
    let fingerprints = crate::runner::run::fingerprints(&loaded);
    let status = |name: &str| -> Option<&'static str> {
        let (_, fp) = fingerprints.iter().find(|(s, _)| *s == name)?;
        if matches!(name, "model" | "dataset") {
            return None;
        }
        Some(if lock.is_fresh(out_dir, name, fp) { "up to date" } else { "will run" })
    };
    for (i, stage) in stages(&loaded.pipeline).iter().enumerate() {
        match status(stage.name) {
            Some(st) => println!("{}. {:<10} {} [{st}]", i + 1, stage.name, stage.does),
            None => println!("{}. {:<10} {}", i + 1, stage.name, stage.does),
        }
        for r in &stage.reads {
            println!("   reads    {r}");
        }
        for w in &stage.writes {
            println!("   writes   {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The stages `lora run` goes through for `p`, in order.
pub fn stages(p: &Pipeline) -> Vec<Stage> {
    let out = &p.output.dir;
    let model = match (&p.model.id, &p.model.path) {
        _ if p.model.file.is_some() => format!("{} (single-file checkpoint)", p.model.file.as_deref().map(tidy_path).unwrap_or_default().display()),
        (Some(id), _) => format!("hub model {id}{}", p.model.revision.as_ref().map(|r| format!(" @ {r}")).unwrap_or_default()),
        (None, Some(path)) => format!("{} (diffusers folder)", tidy_path(path).display()),
        _ => String::new(),
    };
    let variant = p.model.variant.as_ref().map(|v| format!(", variant {v}")).unwrap_or_default();
    let dataset = match (&p.dataset.name, &p.dataset.path) {
        (Some(name), _) => format!("hub dataset {name}"),
        (None, Some(path)) => tidy_path(path).display().to_string(),
        _ => String::new(),
    };
    let crop = match p.preprocess.crop() {
        Crop::Center => "center crop",
        Crop::Random => "random crop",
    };
    let flip = if p.preprocess.random_flip { ", random flip" } else { "" };
    let steps = match p.train.max_steps {
        Some(n) => format!("{n} steps"),
        None => format!("{} epochs", p.train.epochs),
    };
    let mut stages = vec![
        Stage {
            name: "model",
            does: format!("load tokenizer, text encoder, UNet, VAE and noise scheduler{variant}"),
            reads: vec![model],
            writes: vec![],
        },
        Stage {
            name: "dataset",
            does: format!("read images ({}) and captions ({})", p.dataset.image_column, p.dataset.caption_column),
            reads: vec![dataset],
            writes: vec![],
        },
        Stage {
            name: "preprocess",
            does: format!("resize to {} ({}), {crop}{flip}, normalise to [-1, 1]", p.preprocess.resolution, choice_name(&p.preprocess.interpolation)),
            reads: vec![],
            writes: vec![],
        },
        Stage {
            name: "train",
            does: format!(
                "LoRA rank {} on {}; {steps}, batch {} x {}, lr {} ({})",
                p.adapter.rank,
                p.adapter.target_modules.join(", "),
                p.train.batch_size,
                p.train.gradient_accumulation_steps,
                p.train.learning_rate,
                choice_name(&p.train.lr_scheduler)
            ),
            reads: p.checkpoints.resume.iter().map(|r| format!("{} (resume from {r})", tidy_path(out).display())).collect(),
            writes: {
                let mut w = vec![format!(
                    "{}/checkpoint-<step> every {} steps{}",
                    tidy_path(out).display(),
                    p.checkpoints.every_steps,
                    p.checkpoints.total_limit.map(|l| format!(", keeping {l}")).unwrap_or_default()
                )];
                w.push(format!("{}/metrics.jsonl (loss, lr, grad norm per step)", tidy_path(out).display()));
                if p.logging.report_to == crate::config::ReportTo::Tensorboard {
                    w.push(format!("{} (TensorBoard events)", tidy_path(&out.join(&p.logging.dir)).display()));
                }
                w
            },
        },
    ];
    if !p.validation.prompts.is_empty() {
        stages.push(Stage {
            name: "validate",
            does: format!(
                "{} image(s) per prompt for {} prompt(s), {} steps, guidance {}",
                p.validation.num_images,
                p.validation.prompts.len(),
                p.validation.steps,
                p.validation.guidance_scale
            ),
            reads: vec![],
            writes: vec![format!("{}/validation/", tidy_path(out).display())],
        });
    }
    let writes = p
        .output
        .formats
        .iter()
        .map(|f| match f {
            OutputFormat::Diffusers => format!("{}/pytorch_lora_weights.safetensors", tidy_path(out).display()),
            OutputFormat::Kohya => format!("{}/pytorch_lora_weights_kohya.safetensors", tidy_path(out).display()),
        })
        .collect();
    stages.push(Stage { name: "export", does: "write the adapter".into(), reads: vec![], writes });
    stages
}
