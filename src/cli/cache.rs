//! `lora cache`: list or clear the encode cache of a pipeline's output folder (VAE latent
//! distributions and text embeddings the encode stage stored).

use std::process::ExitCode;

use crate::util::path::tidy_path;
use crate::data::cache::EncodeCache;
use crate::runner::stages::CACHE_DIR;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// Remove the cache (the next run's encode stage fills it again).
    #[arg(long)]
    pub clear: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = match args.pipeline.load(&[]) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let dir = loaded.pipeline.output.dir.join(CACHE_DIR);
    let stats = EncodeCache::stats(&dir);
    let shown = tidy_path(&dir);
    if args.clear {
        // Hold the folder so a running `lora run` is not pulled from under.
        let _held = crate::runner::run_dir::RunDir::acquire(&loaded.pipeline.output.dir)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
        }
        println!("cleared {} ({} entries, {:.1} MiB)", shown.display(), stats.entries, stats.bytes as f64 / (1024.0 * 1024.0));
    } else {
        println!("{}: {} entries, {:.1} MiB", shown.display(), stats.entries, stats.bytes as f64 / (1024.0 * 1024.0));
    }
    Ok(ExitCode::SUCCESS)
}
