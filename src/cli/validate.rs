//! `lora validate`: check pipeline files and print every problem, or a short summary of each
//! valid file.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{choice_name, Diagnostics, LoadedPipeline};
use crate::util::path::tidy_path;

/// How diagnostics are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// `FILE:LINE:COL: error: message` with the line and a caret, on stderr.
    #[default]
    Human,
    /// A JSON list of diagnostics (file, line, column, key_path, severity, message, help) on stdout.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pipeline files to check.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Override a key with a TOML value, e.g. `--set train.learning_rate=2e-4` (repeatable;
    /// a string may be given unquoted).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the diagnostics as a JSON list (file, line, column, key_path, severity, message,
    /// help) on stdout, as `plan --json` and `inspect --json` print JSON.
    #[arg(long)]
    pub json: bool,
    /// Output format of the diagnostics (`--format json` is the older spelling of `--json`).
    #[arg(long, value_enum, default_value_t = Format::Human, hide = true)]
    pub format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut all = Diagnostics::new();
    let mut summaries = Vec::new();
    for file in &args.files {
        match crate::preflight::load_pipeline(file, &args.overrides) {
            Ok(loaded) => {
                summaries.push(summary(&loaded));
                all.extend(loaded.warnings);
            }
            Err(diags) => all.extend(diags),
        }
    }
    let format = if args.json { Format::Json } else { args.format };
    match format {
        Format::Json => println!("{}", all.to_json()),
        Format::Human => {
            eprint!("{}", all.render_styled(std::io::IsTerminal::is_terminal(&std::io::stderr())));
            for s in summaries {
                print!("{s}");
            }
        }
    }
    Ok(if all.has_errors() { ExitCode::from(super::EXIT_INVALID) } else { ExitCode::SUCCESS })
}

/// A few lines on a valid pipeline: what it reads, trains and writes, and what it downloads.
pub fn summary(loaded: &LoadedPipeline) -> String {
    let p = &loaded.pipeline;
    let mut out = format!("{}: ok\n", loaded.path.display());
    let model = match (&p.model.id, &p.model.path, &p.model.file) {
        (_, _, Some(file)) => format!("single file {}{}", tidy_path(file).display(), single_file_summary(p)),
        (Some(id), _, _) => format!("hub {id}"),
        (None, Some(path), _) => format!("local {}", tidy_path(path).display()),
        _ => "?".into(),
    };
    out += &format!("  model      {model}\n");
    if let Some(vae) = &p.model.vae {
        out += &format!("  vae        {}\n", tidy_path(vae).display());
    }
    let data = match (&p.dataset.name, &p.dataset.path) {
        (Some(name), _) => format!("hub {name}"),
        (None, Some(path)) => format!("{} {}", kind(p), tidy_path(path).display()),
        _ => "?".into(),
    };
    out += &format!(
        "  dataset    {data} (columns {}, {})\n",
        p.dataset.image_column, p.dataset.caption_column
    );
    let steps = match p.train.max_steps {
        Some(n) => format!("{n} steps"),
        None => format!("{} epochs", p.train.epochs),
    };
    out += &format!(
        "  train      {steps}, batch {} x {} accumulation, lr {} {}, precision {}, seed {}\n",
        p.train.batch_size,
        p.train.gradient_accumulation_steps,
        p.train.learning_rate,
        choice_name(&p.train.lr_scheduler),
        choice_name(&p.train.precision),
        p.train.seed.map_or("random".to_string(), |s| s.to_string()),
    );
    out += &format!(
        "  adapter    rank {} alpha {} on {}\n",
        p.adapter.rank,
        p.adapter.default_alpha(),
        p.adapter.target_modules.join(", ")
    );
    out += &format!("  output     {}\n", tidy_path(&p.output.dir).display());
    let mut downloads = Vec::new();
    if let Some(id) = &p.model.id {
        downloads.push(format!("model {id}"));
    }
    if let Some(vae) = p.model.vae.as_ref().filter(|v| !v.exists() && crate::hub_id::is_hub_id(&v.to_string_lossy())) {
        downloads.push(format!("VAE {}", vae.display()));
    }
    if let Some(name) = &p.dataset.name {
        downloads.push(format!("dataset {name}"));
    }
    let downloads = if downloads.is_empty() { "none".to_string() } else { downloads.join(", ") + " (unless cached)" };
    out += &format!("  downloads  {downloads}\n");
    out
}

/// `: SD 1.x single file, … (prediction …)` for a local single file (validation has checked it).
fn single_file_summary(p: &crate::config::Pipeline) -> String {
    match crate::models::single_file::recognise_config(&p.model) {
        Some(Ok(rec)) => format!(": {}", rec.summary()),
        Some(Err(e)) => format!(" (not recognised: {e:#})"),
        None => String::new(),
    }
}

fn kind(p: &crate::config::Pipeline) -> &'static str {
    use crate::config::DatasetKind::*;
    match p.dataset.kind {
        Hub => "hub",
        Parquet => "parquet",
        Imagefolder => "imagefolder",
        Sidecar => "sidecar",
    }
}
