//! `lora convert IN OUT --to diffusers|kohya|peft`: rewrite a LoRA file in another key layout.
//! Tensors, ranks and effective alphas are kept exactly; the output is written atomically, only
//! as `.safetensors`, never over an existing file without `--force`. NaN or infinite weights are
//! refused.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::adapters::keys::ADAPTER_METADATA_KEY;
use crate::adapters::weights::LoraFormat;
use crate::adapters::read::read_lora_file_for_use;
use crate::adapters::write::write_lora_file;

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
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// A diffusers model folder whose UNet config names the UNet modules in the original (LDM)
    /// layout: needed to read kohya's SDXL files (`lora_unet_input_blocks_…`) into diffusers or
    /// PEFT names; with `--to kohya` and an SDXL model, the UNet is written in that layout, as
    /// kohya sd-scripts writes SDXL LoRAs.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Checks on the output path alone (before reading anything): the message says what to do.
fn check_output(args: &Args) -> Result<(), String> {
    let out = &args.output;
    match out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("safetensors") => {}
        other => {
            let shown = other.map_or_else(|| "no extension".to_string(), |e| format!("`.{e}`"));
            return Err(format!(
                "{}: the output must end in `.safetensors` (it has {shown}): convert writes safetensors, and tools take `.ckpt`, `.pt` and `.bin` \
                 files for Python pickles (lora refuses to read them); name it {}",
                out.display(),
                out.with_extension("safetensors").display()
            ));
        }
    }
    if out.is_dir() {
        return Err(format!("{} is a folder; give the output file's path", out.display()));
    }
    if std::fs::symlink_metadata(out).is_ok() && !args.force {
        return Err(format!("{} exists; pass --force to replace it", out.display()));
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Err(message) = check_output(&args) {
        eprintln!("error: {message}");
        return Ok(ExitCode::from(super::EXIT_INVALID));
    }
    let mut weights = match read_lora_file_for_use(&args.input) {
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
    let has_ldm = weights.unet.keys().any(|n| crate::adapters::ldm_names::is_ldm_unet_name(n));
    match (&args.model, format) {
        // Without a model, names pass through (kohya to kohya keeps the original layout).
        (None, f) if !has_ldm || f == LoraFormat::Kohya => {}
        (None, _) => {
            eprintln!(
                "error: {} names its UNet modules in the original (LDM) layout (kohya's SDXL form, `lora_unet_input_blocks_…`); \
                 give the model it was trained for with --model <diffusers folder> so they can be renamed",
                args.input.display()
            );
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
        (Some(dir), _) => {
            let renamed = crate::models::config::UNetConfig::from_json_file(dir.join("unet/config.json")).and_then(|cfg| {
                let family = crate::models::family::family_of_folder(dir)?;
                if format == LoraFormat::Kohya && family == crate::vocab::Family::Sdxl {
                    crate::adapters::ldm_names::to_ldm_unet_names(&weights, &cfg)
                } else {
                    crate::adapters::ldm_names::to_diffusers_unet_names(&weights, &cfg)
                }
            });
            match renamed {
                Ok(w) => weights = w,
                Err(err) => {
                    eprintln!("error: --model {}: {err:#}", dir.display());
                    return Ok(ExitCode::from(super::EXIT_INVALID));
                }
            }
        }
    }
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
    for stale in crate::util::fs::remove_dead_temporaries(&args.output) {
        tracing::info!("removed {}, left by a convert that was killed", stale.display());
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
