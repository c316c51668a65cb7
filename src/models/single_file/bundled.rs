//! What a single file lacks and lora bundles: the CLIP tokenizer files and the published SD 1.5 /
//! SD 2.1 scheduler configs (or those of a `[model] config` folder), set to the recognised
//! prediction type.

use std::path::Path;

use anyhow::Context;

use super::recognition::{Family, Recognition};
use crate::models::tokenizer::{ClipTokenizer, ClipTokenizerSettings};
use crate::schedulers::SchedulerConfig;
use crate::util::fs::read_text;
use crate::vocab::{self, PredictionType};

/// The CLIP BPE files (the same for SD 1.x and 2.x; 49408 tokens), bundled so that a single
/// file needs nothing else. They are byte-identical to the SD 1.5 repository's `tokenizer/`.
const CLIP_VOCAB: &str = include_str!("../../../assets/sd/clip-vocab.json");
const CLIP_MERGES: &str = include_str!("../../../assets/sd/clip-merges.txt");
/// The published `scheduler/scheduler_config.json` of SD 1.5 (PNDM) and SD 2.1 (DDIM).
const SD1_SCHEDULER: &str = include_str!("../../../assets/sd/sd1-scheduler_config.json");
const SD2_SCHEDULER: &str = include_str!("../../../assets/sd/sd2-scheduler_config.json");
/// SDXL base 1.0's `scheduler/scheduler_config.json` (EulerDiscrete, leading spacing).
const SDXL_SCHEDULER: &str = include_str!("../../../assets/sd/sdxl-scheduler_config.json");

/// The tokenizer for a family: the bundled CLIP BPE files with SD 1.x's or SD 2.x's special
/// tokens (SD 2.x pads with `!`, as its published tokenizer config says).
pub(crate) fn bundled_tokenizer(family: Family) -> anyhow::Result<ClipTokenizer> {
    bundled_tokenizer_padding(family == Family::Sd2)
}

/// SDXL's two tokenizers: the first pads with `<|endoftext|>`, `tokenizer_2` with `!`.
pub(crate) fn bundled_sdxl_tokenizers() -> anyhow::Result<[ClipTokenizer; 2]> {
    Ok([bundled_tokenizer_padding(false)?, bundled_tokenizer_padding(true)?])
}

fn bundled_tokenizer_padding(exclamation: bool) -> anyhow::Result<ClipTokenizer> {
    let mut settings = ClipTokenizerSettings::default();
    if exclamation {
        settings.pad_token = "!".into();
    }
    ClipTokenizer::from_vocab_merges_text(
        CLIP_VOCAB,
        CLIP_MERGES,
        settings,
        Path::new("<bundled clip-vocab.json>"),
        Path::new("<bundled clip-merges.txt>"),
    )
}

/// The bundled scheduler config of a family, with the recognised prediction type.
pub(crate) fn bundled_scheduler(family: Family, prediction: PredictionType) -> anyhow::Result<SchedulerConfig> {
    let text = match family {
        Family::Sd1 => SD1_SCHEDULER,
        Family::Sd2 => SD2_SCHEDULER,
        Family::Sdxl => SDXL_SCHEDULER,
    };
    let mut s: SchedulerConfig = serde_json::from_str(text).context("the bundled scheduler config")?;
    s.prediction_type = prediction.as_str().to_string();
    Ok(s)
}

/// Tokenizers (one per text encoder) and scheduler for a recognised file: from `[model] config`
/// when given, else bundled.
pub(crate) fn tokenizer_and_scheduler(rec: &Recognition) -> anyhow::Result<(Vec<ClipTokenizer>, SchedulerConfig)> {
    match &rec.configs_from {
        Some(dir) => {
            let mut tokenizers = vec![ClipTokenizer::from_dir(&dir.join(vocab::TOKENIZER_DIR)).with_context(|| format!("the tokenizer of {}", dir.display()))?];
            if rec.family == Family::Sdxl {
                tokenizers.push(ClipTokenizer::from_dir(&dir.join(vocab::TOKENIZER_2_DIR)).with_context(|| format!("the second tokenizer of {}", dir.display()))?);
            }
            let path = dir.join(vocab::SCHEDULER_CONFIG);
            let mut scheduler: SchedulerConfig =
                serde_json::from_str(&read_text(&path)?).with_context(|| format!("{} is not a valid scheduler config", path.display()))?;
            scheduler.prediction_type = rec.prediction.kind.as_str().to_string();
            Ok((tokenizers, scheduler))
        }
        None => {
            let tokenizers = if rec.family == Family::Sdxl { bundled_sdxl_tokenizers()?.into() } else { vec![bundled_tokenizer(rec.family)?] };
            Ok((tokenizers, bundled_scheduler(rec.family, rec.prediction.kind)?))
        }
    }
}
