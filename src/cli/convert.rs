//! `lora convert IN OUT --to diffusers|kohya|peft`: rewrite a LoRA file in another key layout.
//! Tensors, ranks and effective alphas are kept exactly; the output is written atomically.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::adapters::format::{read_lora_file, write_lora_file, LoraFormat, ADAPTER_METADATA_KEY};

/// Formats `lora convert` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Target {
    /// `unet.<module>.lora.down.weight`, as diffusers' training scripts save.
    Diffusers,
    /// `lora_unet_<module>.lora_down.weight` + `.alpha`, for A1111 / kohya tools.
    Kohya,
    /// `unet.<module>.lora_A.weight`, PEFT parameter names.
    Peft,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The LoRA file to read (any supported form).
    pub input: PathBuf,
    /// Where to write the converted file.
    pub output: PathBuf,
    /// The form to write.
    #[arg(long, value_enum)]
    pub to: Target,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut weights = match read_lora_file(&args.input) {
        Ok(w) => w,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
    };
    let format = match args.to {
        Target::Diffusers => LoraFormat::Diffusers,
        Target::Kohya => LoraFormat::Kohya,
        Target::Peft => LoraFormat::Peft,
    };
    if format == LoraFormat::Kohya {
        // kohya headers carry `ss_*` keys, not diffusers' framework keys.
        weights.metadata.remove("format");
        weights.metadata.remove(ADAPTER_METADATA_KEY);
        weights.metadata.entry("ss_network_module".into()).or_insert_with(|| "networks.lora".into());
        let first = weights.modules().next().map(|(_, _, m)| (m.rank(), m.effective_alpha()));
        if let Some((rank, alpha)) = first {
            weights.metadata.entry("ss_network_dim".into()).or_insert_with(|| rank.to_string());
            weights.metadata.entry("ss_network_alpha".into()).or_insert_with(|| alpha.to_string());
        }
    }
    write_lora_file(&weights, &args.output, format)?;
    let source = weights.source_format.map_or("unknown".to_string(), |f| f.to_string());
    println!(
        "wrote {} ({} modules, {} parameters) from {source} to {format}",
        args.output.display(),
        weights.modules().count(),
        weights.param_count()
    );
    Ok(ExitCode::SUCCESS)
}
