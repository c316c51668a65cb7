//! The encode stage: VAE latent distributions and text embeddings of every example, cached on
//! disk by model and input, so the train stage (and later runs) need not run the encoders.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::runner::lock::Fingerprint;
use crate::runner::plan::{Plan, StageId};
use crate::runner::resolve::model_loader_options;
use super::{LoadedModel, Run, nothing, out, with_rate, Ran, Stage, StageCtx};
use crate::config::types as cfg;
use crate::data::DataLoader;
use crate::data::cache::EncodeCache;
use crate::data;
use crate::layout::CACHE_DIR;
use crate::models::StableDiffusion;
use crate::util::path::tidy_path;

/// Whether the VAE latents can be cached: every preprocessing variant of an image is one exact
/// input (center crop; with random flip, both flips). A random crop is encoded every step.
pub(super) fn caches_latents(p: &Plan) -> bool {
    matches!(p.pipeline().preprocess.crop(), cfg::Crop::Center)
}

/// Whether the text-encoder outputs can be cached: the text encoder is not trained, and captions
/// are not reshuffled every draw (`dataset.shuffle_tags` makes a new string nearly every step, so
/// a cache would only grow; kohya refuses the combination too).
pub(super) fn caches_text(p: &Plan) -> bool {
    !p.pipeline().adapter.text_encoder && !p.pipeline().dataset.shuffle_tags
}

pub(super) const ENCODE: Stage = Stage {
    id: StageId::Encode,
    depends_on: &[StageId::Model, StageId::Preprocess],
    tracked: true,
    off: |p| {
        if p.no_cache {
            Some("--no-cache: the encoders run every step")
        } else if !caches_latents(p) && !caches_text(p) {
            Some("random crop and a trained text encoder: the encoders run every step")
        } else {
            None
        }
    },
    fingerprint: |p| {
        Fingerprint::new("encode")
            .add("model", p.fingerprint(StageId::Model))
            .add("preprocess", p.fingerprint(StageId::Preprocess))
            .add("latents", &caches_latents(p).to_string())
            .add("text", &caches_text(p).to_string())
            .finish()
    },
    reads: nothing,
    outputs: |_| vec![out(format!("{CACHE_DIR}/"), "VAE latent distributions and text embeddings, checksummed, keyed by model and input", true)],
    describe: |p| {
        let latents = match (caches_latents(p), p.pipeline().preprocess.random_flip) {
            (true, true) => "VAE latent distribution (mean, std) of every image, flipped and not",
            (true, false) => "VAE latent distribution (mean, std) of every image",
            (false, _) => "no latents (random crop: encoded every step)",
        };
        let text = if caches_text(p) { "text-encoder output of every caption" } else { "no text (the text encoder trains)" };
        format!("cache on disk: {latents}; {text}")
    },
    run: Run::ModelAndData(run_encode),
};

pub(super) fn encode_cache(p: &Plan) -> Arc<EncodeCache> {
    Arc::new(EncodeCache::new(&p.out_dir.join(CACHE_DIR), p.fingerprint(StageId::Model)))
}

fn run_encode(ctx: &mut StageCtx<'_>, model: &mut LoadedModel, loader: &DataLoader) -> Result<Ran> {
    let plan = ctx.plan;
    let cache = encode_cache(plan);
    std::fs::create_dir_all(cache.dir()).with_context(|| format!("creating {}", cache.dir().display()))?;
    let (device, sd) = (model.device.clone(), &mut model.sd);
    // Encoders parked by an earlier run of this session (watch mode) come back to encode.
    sd.unpark_encoders(&device)?;
    let sd: &StableDiffusion = sd;
    let opts = model_loader_options(plan.pipeline(), sd);
    let dataset = loader.dataset();
    let flips: &[bool] = if opts.preprocess.flip_p > 0.0 { &[false, true] } else { &[false] };
    let bar = indicatif::ProgressBar::new(dataset.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} encode [{bar:30}] {pos}/{len} {rate} ETA {eta}").map(with_rate)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut new_latents, mut new_texts) = (0usize, 0usize);
    // A caption several examples share is looked up once (not "reused" from the cache).
    let mut seen_captions: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (index, example) in dataset.examples.iter().enumerate() {
        if caches_latents(plan) {
            let image = data::decode::decode_example(example, &opts.decode).map_err(|e| anyhow::anyhow!("{e}"))?;
            for &flip in flips {
                // Exactly the loader's pixels for this variant (its bucket, when bucketed).
                let px = loader.fixed_pixels(index, &image, flip)?;
                let key = cache.latent_key(&px.get(0)?)?;
                if cache.get(&key, &device)?.is_none() {
                    let dist = sd.vae.encode(&px.to_device(&device)?)?;
                    cache.put(&key, &[&dist.mean.get(0)?, &dist.std()?.get(0)?])?;
                    new_latents += 1;
                }
            }
        }
        if caches_text(plan) {
            let captions: Vec<&String> = match &example.caption {
                data::Caption::One(s) => vec![s],
                data::Caption::Choices(list) => list.iter().collect(),
            };
            for c in captions {
                if !seen_captions.insert(c.as_str()) {
                    continue;
                }
                let key = cache.text_key(c);
                if cache.get(&key, &device)?.is_none() {
                    let row = sd.text_embeddings(&[c.as_str()], &device)?.get(0)?;
                    cache.put(&key, &row.text_parts())?;
                    new_texts += 1;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let reused = cache.hits.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        "encode: {new_latents} latent distribution(s) and {new_texts} text embedding(s) encoded, {reused} reused from {}",
        tidy_path(cache.dir()).display()
    );
    Ok(Ran::done())
}
