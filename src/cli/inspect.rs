//! `lora inspect FILE`: print a LoRA file's format, base-model guess, targets, rank and alpha
//! per module, parameter count and metadata; for a single-file model checkpoint, what it is
//! recognised as (family, configs, prediction type).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::adapters::{format::read_lora_file, inspect::describe};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The LoRA file (safetensors: diffusers, PEFT, old attention-processor or kohya form), or a
    /// single-file model checkpoint (LDM layout).
    pub file: PathBuf,
    /// Single-file checkpoints: a diffusers folder whose configs replace the recognised ones.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Single-file checkpoints: the prediction type (`epsilon` or `v_prediction`) to assume.
    #[arg(long)]
    pub prediction_type: Option<String>,
}

/// Describe a single-file checkpoint, or `None` when the file is not one.
fn inspect_checkpoint(args: &Args) -> Option<anyhow::Result<String>> {
    use crate::models::single_file::{is_single_file_checkpoint, open_weights, recognise, Header, SingleFileOptions};
    let header = Header::read(&args.file).ok()?;
    if !is_single_file_checkpoint(&header) {
        return None;
    }
    let opts = SingleFileOptions { config_dir: args.model_config.clone(), prediction_type: args.prediction_type.clone(), ema: false };
    Some((|| {
        let mut rec = recognise(&args.file, &header, &opts)?;
        // Checks that every tensor is accounted for (and fills the left-out list).
        open_weights(&mut rec, &header, true)?;
        Ok(format!("file:        {}
tensors:     {}
{}", args.file.display(), header.tensors.len(), rec.describe()))
    })())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(result) = inspect_checkpoint(&args) {
        return match result {
            Ok(text) => {
                print!("{text}");
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
    println!("file:        {}", args.file.display());
    print!("{}", describe(&weights));
    Ok(ExitCode::SUCCESS)
}
