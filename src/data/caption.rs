//! Caption tricks the peers train with, as kohya sd-scripts defines them (`train_util.py`,
//! `BaseDataset.process_caption`): drop the whole caption with a probability
//! (`--caption_dropout_rate`), else shuffle its comma-separated tags (`--shuffle_caption`)
//! keeping the first `keep_tokens` in place (`--keep_tokens`), re-joined with ", ". Off by
//! default (the reference script has none of them); each draw is seeded per (epoch, example).

use rand::seq::SliceRandom;
use rand::{Rng, RngExt};

/// `[dataset]`'s caption keys, resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CaptionOptions {
    /// Probability of training on an empty caption instead.
    pub dropout: f64,
    /// Shuffle the comma-separated tags.
    pub shuffle_tags: bool,
    /// Tags at the front kept in place when shuffling.
    pub keep_tokens: usize,
}

impl CaptionOptions {
    /// True when no trick is on (the caption passes through untouched and nothing is drawn).
    pub fn is_off(&self) -> bool {
        self.dropout <= 0.0 && !self.shuffle_tags
    }

    /// The caption to train on: "" with probability `dropout`; else, with `shuffle_tags`, the
    /// tags (split on ",", trimmed) with all but the first `keep_tokens` shuffled, joined by
    /// ", "; else the caption unchanged. Draws from `rng` only for what is on.
    pub fn apply(&self, caption: &str, rng: &mut impl Rng) -> String {
        if self.dropout > 0.0 && rng.random::<f64>() < self.dropout {
            return String::new();
        }
        if !self.shuffle_tags {
            return caption.to_string();
        }
        let mut tags: Vec<&str> = caption.trim().split(',').map(str::trim).collect();
        let keep = self.keep_tokens.min(tags.len());
        tags[keep..].shuffle(rng);
        tags.join(", ")
    }
}
