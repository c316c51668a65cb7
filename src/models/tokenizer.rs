//! The CLIP BPE tokenizer (`vocab.json` + `merges.txt`, or `tokenizer.json`), padded/truncated to 77.
//!
//! Stable Diffusion 1.5 ships its tokenizer as `vocab.json` + `merges.txt` (the slow
//! `CLIPTokenizer` layout), so the `tokenizers` pipeline that `CLIPTokenizerFast` would build is
//! assembled here by hand: NFC, whitespace runs → one space, lowercase; CLIP's split regex then
//! byte-level mapping; BPE with the `</w>` end-of-word suffix; BOS … EOS around the tokens;
//! truncation to `model_max_length` (BOS and EOS included) and padding with the pad token.
//! The special tokens and the length come from `special_tokens_map.json` /
//! `tokenizer_config.json` when they are present (SD 2.x pads with `!`, SD 1.x with
//! `<|endoftext|>`).

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's word-splitting pattern (the one `CLIPTokenizer` uses), special tokens first.
const CLIP_SPLIT_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer` reads only the first `49152 - 256 - 2` merges of `merges.txt`.
const CLIP_MAX_MERGES: usize = 49152 - 256 - 2;

/// CLIP's context length; also the fallback when `tokenizer_config.json` gives no usable value.
const DEFAULT_MAX_LENGTH: usize = 77;

/// The special tokens and the sequence length, as the tokenizer's JSON configs give them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipTokenizerSettings {
    pub bos_token: String,
    pub eos_token: String,
    pub unk_token: String,
    pub pad_token: String,
    /// Length of every encoded sequence, BOS and EOS included (77 for CLIP).
    pub max_length: usize,
}

impl Default for ClipTokenizerSettings {
    fn default() -> Self {
        Self {
            bos_token: "<|startoftext|>".into(),
            eos_token: "<|endoftext|>".into(),
            unk_token: "<|endoftext|>".into(),
            pad_token: "<|endoftext|>".into(),
            max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

impl ClipTokenizerSettings {
    /// Read `special_tokens_map.json` then `tokenizer_config.json` from `dir` (the latter wins,
    /// as in transformers); missing files or keys keep the CLIP defaults.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let mut settings = Self::default();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = crate::util::fs::read_text(&path)?;
            let json: Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
            settings.apply_json(&json, &path)?;
        }
        Ok(settings)
    }

    fn apply_json(&mut self, json: &Value, path: &Path) -> anyhow::Result<()> {
        let token = |key: &str| -> anyhow::Result<Option<String>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => bail!("{}: `{key}` is an object without a string `content`", path.display()),
                },
                Some(other) => bail!("{}: `{key}` must be a string or {{\"content\": ...}}, found {other}", path.display()),
            }
        };
        if let Some(t) = token("bos_token")? {
            self.bos_token = t;
        }
        if let Some(t) = token("eos_token")? {
            self.eos_token = t;
        }
        if let Some(t) = token("unk_token")? {
            self.unk_token = t;
        }
        if let Some(t) = token("pad_token")? {
            self.pad_token = t;
        }
        match json.get("model_max_length") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                // transformers writes a huge sentinel (1e30) when the length is "unlimited":
                // a CLIP text encoder still has 77 positions, so keep the default then.
                match n.as_u64() {
                    Some(len) if (3..=100_000).contains(&len) => self.max_length = len as usize,
                    _ => tracing::warn!(
                        "{}: model_max_length {n} is not a usable length, using {DEFAULT_MAX_LENGTH}",
                        path.display()
                    ),
                }
            }
            Some(other) => bail!("{}: `model_max_length` must be a number, found {other}", path.display()),
        }
        Ok(())
    }
}

/// The CLIP tokenizer: text → `max_length` token ids (BOS, tokens, EOS, padding).
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    settings: ClipTokenizerSettings,
    pad_id: u32,
}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder: `tokenizer.json` when present, else
    /// `vocab.json` + `merges.txt`; special tokens and length from the JSON configs beside them.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let settings = ClipTokenizerSettings::from_dir(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            return Self::from_tokenizer_json_with(&tokenizer_json, settings);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let missing: Vec<String> = [&vocab, &merges]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        if !missing.is_empty() {
            bail!(
                "tokenizer folder {} has no tokenizer.json and lacks {} (a CLIP tokenizer needs \
                 tokenizer.json, or vocab.json + merges.txt)",
                dir.display(),
                missing.join(" and ")
            );
        }
        Self::from_vocab_merges(&vocab, &merges, settings)
    }

    /// Load a `tokenizers` JSON file (`tokenizer.json`). Special tokens and length come from
    /// `special_tokens_map.json` / `tokenizer_config.json` beside it when present, else the
    /// CLIP defaults (pad `<|endoftext|>`, 77).
    pub fn from_tokenizer_json(path: &Path) -> anyhow::Result<Self> {
        let settings = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => ClipTokenizerSettings::from_dir(dir)?,
            _ => ClipTokenizerSettings::default(),
        };
        Self::from_tokenizer_json_with(path, settings)
    }

    /// Load a `tokenizers` JSON file with explicit special tokens and length.
    pub(crate) fn from_tokenizer_json_with(path: &Path, settings: ClipTokenizerSettings) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{} is not a valid tokenizers JSON file: {e}", path.display()))?;
        Self::finish(tokenizer, settings, path)
    }

    /// Build the CLIP pipeline from `vocab.json` and `merges.txt`.
    pub(crate) fn from_vocab_merges(vocab_path: &Path, merges_path: &Path, settings: ClipTokenizerSettings) -> anyhow::Result<Self> {
        let vocab_text =
            crate::util::fs::read_text(vocab_path)?;
        let merges_text =
            crate::util::fs::read_text(merges_path)?;
        Self::from_vocab_merges_text(&vocab_text, &merges_text, settings, vocab_path, merges_path)
    }

    /// [`Self::from_vocab_merges`] from the files' text (e.g. a bundled copy); the paths only
    /// label error messages.
    pub(crate) fn from_vocab_merges_text(
        vocab_text: &str,
        merges_text: &str,
        settings: ClipTokenizerSettings,
        vocab_path: &Path,
        merges_path: &Path,
    ) -> anyhow::Result<Self> {
        let vocab = parse_vocab(vocab_text, vocab_path)?;
        let merges = parse_merges(merges_text, merges_path)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(settings.unk_token.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| {
                anyhow::anyhow!("{} + {} do not form a BPE model: {e}", vocab_path.display(), merges_path.display())
            })?;

        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| anyhow::anyhow!("whitespace normalizer: {e}"))?
                .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| anyhow::anyhow!("CLIP split regex: {e}"))?;
        let pre_tokenizer = PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| anyhow::anyhow!("setting the normalizer: {e}"))?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
        let source = vocab_path.parent().unwrap_or(vocab_path);
        let bos_id = token_id(&tokenizer, &settings.bos_token, "bos_token", source)?;
        let eos_id = token_id(&tokenizer, &settings.eos_token, "eos_token", source)?;
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((settings.eos_token.clone(), eos_id), (settings.bos_token.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        // Every special token is split out of the text before BPE, as transformers does: SDXL's
        // `tokenizer_2` (and SD 2.x's) pads with `!`, so a `!` in a prompt becomes id 0 there,
        // not BPE's `!</w>`.
        tokenizer
            .add_special_tokens([
                AddedToken::from(settings.bos_token.clone(), true),
                AddedToken::from(settings.eos_token.clone(), true),
                AddedToken::from(settings.pad_token.clone(), true),
            ])
            .map_err(|e| anyhow::anyhow!("adding the special tokens: {e}"))?;
        Self::finish(tokenizer, settings, source)
    }

    /// Set truncation and padding to `max_length` and look up the pad id.
    fn finish(mut tokenizer: Tokenizer, settings: ClipTokenizerSettings, source: &Path) -> anyhow::Result<Self> {
        let pad_id = token_id(&tokenizer, &settings.pad_token, "pad_token", source)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: settings.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow::anyhow!("setting truncation to {}: {e}", settings.max_length))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(settings.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: settings.pad_token.clone(),
        }));
        // A tokenizer.json without CLIP's post-processor would silently drop BOS/EOS.
        let bos_id = token_id(&tokenizer, &settings.bos_token, "bos_token", source)?;
        let eos_id = token_id(&tokenizer, &settings.eos_token, "eos_token", source)?;
        let probe = tokenizer
            .encode("", true)
            .map_err(|e| anyhow::anyhow!("{}: tokenizing an empty text failed: {e}", source.display()))?;
        let probe = probe.get_ids();
        if probe.len() < 2 || probe[0] != bos_id || probe[1] != eos_id {
            bail!(
                "{}: an empty text encodes to {:?}, not [{bos_id} (BOS), {eos_id} (EOS), padding…]: \
                 the tokenizer does not add CLIP's special tokens",
                source.display(),
                &probe[..probe.len().min(4)]
            );
        }
        Ok(Self { tokenizer, settings, pad_id })
    }

    /// The special tokens and length in use.
    pub fn settings(&self) -> &ClipTokenizerSettings {
        &self.settings
    }

    /// Length of every encoded sequence (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.settings.max_length
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids for one text: BOS, tokens, EOS, padded with the pad id to `max_length` (77).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        let ids = encoding.get_ids().to_vec();
        if ids.len() != self.settings.max_length {
            bail!(
                "tokenizing {text:?} gave {} ids instead of {} (is the tokenizer's post-processor adding BOS/EOS?)",
                ids.len(),
                self.settings.max_length
            );
        }
        Ok(ids)
    }

    /// `[B, 77]` u32 ids.
    pub fn encode_batch(&self, texts: &[&str], device: &Device) -> anyhow::Result<Tensor> {
        let mut flat = Vec::with_capacity(texts.len() * self.settings.max_length);
        for text in texts {
            flat.extend(self.encode(text)?);
        }
        Ok(Tensor::from_vec(flat, (texts.len(), self.settings.max_length), device)?)
    }
}

fn token_id(tokenizer: &Tokenizer, token: &str, role: &str, source: &Path) -> anyhow::Result<u32> {
    tokenizer
        .token_to_id(token)
        .with_context(|| format!("{role} {token:?} is not in the vocabulary of {}", source.display()))
}

fn parse_vocab(text: &str, path: &Path) -> anyhow::Result<Vocab> {
    let json: Value = serde_json::from_str(text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let Value::Object(entries) = json else {
        bail!("{} must be a JSON object mapping tokens to ids", path.display());
    };
    let mut vocab = Vocab::default();
    for (token, id) in entries {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("{}: the id of token {token:?} is not a non-negative integer: {id}", path.display()))?;
        vocab.insert(token, id);
    }
    Ok(vocab)
}

fn parse_merges(text: &str, path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => bail!("{} line {}: a merge must be two tokens separated by a space, found {line:?}", path.display(), index + 1),
        }
        if merges.len() == CLIP_MAX_MERGES {
            break;
        }
    }
    Ok(merges)
}
