//! `lora inspect FILE [--json]`: print a LoRA file's format, base-model guess, targets, rank and
//! alpha per module, parameter count, metadata and any tensors with NaN or infinite values (then
//! exit 2: the file cannot be used); for a single-file model checkpoint, what it is recognised as
//! (family, configs, prediction type). `--json` prints the same as one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::adapters::{
    read::read_lora_file,
    inspect::{describe, describe_json},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The LoRA file (safetensors: diffusers, PEFT, old attention-processor or kohya form), or a
    /// single-file model checkpoint (LDM layout).
    pub file: PathBuf,
    /// Single-file checkpoints: a diffusers folder whose configs replace the recognised ones.
    #[arg(long)]
    pub(crate) model_config: Option<PathBuf>,
    /// Single-file checkpoints: the prediction type (`epsilon` or `v_prediction`) to assume.
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Print one JSON object instead of text (see `adapters::inspect::describe_json` for the keys).
    #[arg(long)]
    pub json: bool,
}

/// A single-file checkpoint as text and as JSON.
struct Checkpoint {
    text: String,
    json: serde_json::Value,
}

/// Describe a single-file checkpoint, or `None` when the file is not one.
fn inspect_checkpoint(args: &Args) -> Option<anyhow::Result<Checkpoint>> {
    use crate::models::single_file::header::Header;
    use crate::models::single_file::recognition::{is_single_file_checkpoint, prediction_flag, recognise, SingleFileOptions};
    use crate::models::single_file::weights::open_weights;
    let header = Header::read(&args.file).ok()?;
    if !is_single_file_checkpoint(&header) {
        return None;
    }
    Some((|| {
        let prediction_type = args.prediction_type.as_deref().map(prediction_flag).transpose()?;
        let opts = SingleFileOptions { config_dir: args.model_config.clone(), prediction_type, ema: false };
        let mut rec = recognise(&args.file, &header, &opts)?;
        // Checks that every tensor is accounted for (and fills the left-out list).
        open_weights(&mut rec, &header, true)?;
        let description = rec.describe();
        let json = serde_json::json!({
            "kind": "model_checkpoint",
            "file": args.file.display().to_string(),
            "tensors": header.tensors.len(),
            "family": rec.family.name(),
            "prediction_type": rec.prediction.kind,
            "prediction_reason": rec.prediction.reason,
            "configs_from": rec.configs_from.as_ref().map(|d| d.display().to_string()),
            "description": description.lines().collect::<Vec<_>>(),
        });
        let text = format!("file:        {}\ntensors:     {}\n{description}", args.file.display(), header.tensors.len());
        Ok(Checkpoint { text, json })
    })())
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON of plain values"));
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(result) = inspect_checkpoint(&args) {
        return match result {
            Ok(c) => {
                if args.json {
                    print_json(&c.json);
                } else {
                    print!("{}", c.text);
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("error: {}: {err:#}", args.file.display());
                Ok(ExitCode::from(super::EXIT_INVALID))
            }
        };
    }
    let weights = match read_lora_file(&args.file) {
        Ok(w) => w,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
    };
    if args.json {
        let mut value = describe_json(&weights);
        value["file"] = args.file.display().to_string().into();
        print_json(&value);
    } else {
        println!("file:        {}", args.file.display());
        print!("{}", describe(&weights));
    }
    if weights.non_finite.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("error: LoRA file {}: {:#}", args.file.display(), weights.check_finite().unwrap_err());
    Ok(ExitCode::from(super::EXIT_INVALID))
}
