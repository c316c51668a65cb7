//! `lora inspect FILE`: print a LoRA file's format, base-model guess, targets, rank and alpha
//! per module, parameter count and metadata.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::adapters::{format::read_lora_file, inspect::describe};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The LoRA file (safetensors: diffusers, PEFT, old attention-processor or kohya form).
    pub file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
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
