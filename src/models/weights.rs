//! Weight files of one component: choosing them (variant, shards, pickle refusal) and a checking
//! `VarBuilder` backend that converts dtypes, accepts the old VAE attention names, checks shapes,
//! and reports the tensors the model never read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// File extensions of pickle-based checkpoints (models and LoRA files), which are refused.
pub(crate) const PICKLE_EXTENSIONS: [&str; 5] = ["bin", "ckpt", "pt", "pth", "pkl"];

/// Stored tensors a model may legitimately leave unread (buffers, not parameters), matched by
/// the last name component. transformers' CLIP ignores `position_ids` the same way.
const IGNORABLE_BUFFERS: [&str; 2] = ["position_ids", "num_batches_tracked"];

/// How a component treats a requested weight variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VariantPolicy {
    /// The variant file must exist (UNet and VAE: the reference passes `variant` to both).
    Required,
    /// The plain file is used when present, the variant file otherwise (the text encoder: the
    /// reference loads it without `variant`).
    PlainFirst,
}

/// The weight files chosen for one component, relative to the component folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightChoice {
    /// One `.safetensors` file.
    Single(String),
    /// A `*.safetensors.index.json` whose `weight_map` names the shards.
    Sharded { index: String },
}

/// Names a variant gives: `base.fp16.safetensors` and the two spellings of the shard index
/// (`base.safetensors.index.fp16.json` as diffusers/transformers write it, and
/// `base.fp16.safetensors.index.json`).
fn candidates(base: &str, variant: Option<&str>) -> (String, Vec<String>) {
    match variant {
        None => (format!("{base}.safetensors"), vec![format!("{base}.safetensors.index.json")]),
        Some(v) => (
            format!("{base}.{v}.safetensors"),
            vec![format!("{base}.safetensors.index.{v}.json"), format!("{base}.{v}.safetensors.index.json")],
        ),
    }
}

/// Choose the weight file(s) of a component folder given its file names (`files`, relative to
/// the folder). `component` names the folder in errors (e.g. `unet`).
pub fn choose_weights(
    component: &str,
    files: &BTreeSet<String>,
    base: &str,
    variant: Option<&str>,
    policy: VariantPolicy,
) -> anyhow::Result<WeightChoice> {
    let find = |variant: Option<&str>| -> Option<WeightChoice> {
        let (single, indexes) = candidates(base, variant);
        if files.contains(&single) {
            return Some(WeightChoice::Single(single));
        }
        indexes.into_iter().find(|i| files.contains(i)).map(|index| WeightChoice::Sharded { index })
    };
    let order: Vec<Option<&str>> = match (variant, policy) {
        (None, _) => vec![None],
        (Some(v), VariantPolicy::Required) => vec![Some(v)],
        (Some(v), VariantPolicy::PlainFirst) => vec![None, Some(v)],
    };
    for v in &order {
        if let Some(choice) = find(*v) {
            return Ok(choice);
        }
    }

    let listing = if files.is_empty() {
        "it is empty".to_string()
    } else {
        format!("it holds {}", files.iter().cloned().collect::<Vec<_>>().join(", "))
    };
    let expected: Vec<String> = order
        .iter()
        .flat_map(|v| {
            let (single, indexes) = candidates(base, *v);
            std::iter::once(single).chain(indexes)
        })
        .collect();
    let has_safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
    let pickles: Vec<&String> = files
        .iter()
        .filter(|f| PICKLE_EXTENSIONS.iter().any(|ext| f.ends_with(&format!(".{ext}"))))
        .collect();
    if !pickles.is_empty() && !has_safetensors {
        bail!(
            "{component}/ holds only pickle weights ({}): lora reads safetensors only, because \
             loading a pickle (.bin/.ckpt/.pt) can run arbitrary code. Convert the model to \
             safetensors first, e.g. in Python: `{}.from_pretrained(PATH, subfolder=\"{component}\")\
             .save_pretrained(OUT, safe_serialization=True)`, or use a repository revision that \
             ships .safetensors files",
            pickles.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if component == "text_encoder" { "CLIPTextModel" } else if component == "vae" { "AutoencoderKL" } else { "UNet2DConditionModel" },
        );
    }
    if variant.is_none() {
        let variants: Vec<&String> =
            files.iter().filter(|f| f.starts_with(&format!("{base}.")) && f.ends_with(".safetensors")).collect();
        if !variants.is_empty() {
            bail!(
                "{component}/ has no {base}.safetensors, only variant weights ({}): set the \
                 variant (e.g. `variant = \"fp16\"`) to use them",
                variants.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    bail!("{component}/ has no weights: expected {} ({listing})", expected.join(" or "))
}

/// True when a component folder's file names include any weights (safetensors, a shard index,
/// or a pickle), so that "no weights at all" can be reported as a missing file.
pub(crate) fn has_weight_files(files: &BTreeSet<String>) -> bool {
    files.iter().any(|f| {
        f.ends_with(".safetensors")
            || (f.contains(".safetensors.index") && f.ends_with(".json"))
            || PICKLE_EXTENSIONS.iter().any(|ext| f.ends_with(&format!(".{ext}")))
    })
}

/// The shard file names listed by a `*.safetensors.index.json`, in first-use order.
pub(crate) fn shards_from_index(index_json: &str, index_name: &str) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(index_json)
        .with_context(|| format!("{index_name} is not a shard index (a JSON object with a `weight_map`)"))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in &index.weight_map {
        let path = Path::new(shard);
        if shard.is_empty()
            || path.is_absolute()
            || path.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("{index_name}: tensor `{tensor}` points to {shard:?}, which is not a file name inside the folder");
        }
        if !shards.contains(shard) {
            shards.push(shard.clone());
        }
    }
    if shards.is_empty() {
        bail!("{index_name}: the weight_map is empty");
    }
    Ok(shards)
}

/// Options for [`ComponentWeights::open`].
#[derive(Clone, Debug, Default)]
pub struct WeightOptions {
    /// Accept the old VAE attention names (`query`/`key`/`value`/`proj_attn` →
    /// `to_q`/`to_k`/`to_v`/`to_out.0`) and 1x1-conv shaped `[out, in, 1, 1]` projections.
    pub legacy_attention_names: bool,
    /// A name prefix that files may or may not carry: a request for `text_model.x` finds a
    /// stored `x` and the other way round (transformers ≥ 5 saves `CLIPTextModel` without the
    /// `text_model.` prefix that SD 1.x/2.x hub files have).
    pub optional_prefix: Option<String>,
}

struct StoredTensor {
    file: usize,
    stored_name: String,
    /// Rows `start..start + len` of the stored tensor's first dimension (a slice of a fused
    /// tensor such as OpenCLIP's `in_proj_weight`); `None` for the whole tensor.
    rows: Option<(usize, usize)>,
    /// The model sees the stored 2-D tensor transposed (OpenCLIP's `text_projection`, applied
    /// as `x @ P`, is transformers' `text_projection.weight` transposed).
    transpose: bool,
    /// The shape the model sees (the slice's shape when `rows` is set; transposed).
    shape: Vec<usize>,
    dtype: String,
}

/// One tensor of a renamed layout (see [`ComponentWeights::open_mapped`]): the name the model
/// asks for, the name stored in the file and optionally a row range of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MappedTensor {
    pub name: String,
    pub(crate) stored_name: String,
    pub rows: Option<(usize, usize)>,
    /// Read the stored 2-D tensor transposed.
    pub transpose: bool,
}

/// Names the stored tensor a missing model weight was expected as (for error messages).
pub(crate) type MissingHint = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

struct Inner {
    /// What the weights are, for error messages (e.g. `unet (…/diffusion_pytorch_model.safetensors)`).
    label: String,
    paths: Vec<PathBuf>,
    files: Vec<MmapedSafetensors>,
    /// Canonical name (as the model asks for it) → where it is stored.
    tensors: HashMap<String, StoredTensor>,
    optional_prefix: Option<String>,
    read: Mutex<HashSet<String>>,
    missing_hint: Option<MissingHint>,
}

impl Inner {
    /// The stored (canonical) key a requested name refers to, trying the optional prefix both ways.
    fn key<'a>(&'a self, name: &str) -> Option<(&'a String, &'a StoredTensor)> {
        if let Some(found) = self.tensors.get_key_value(name) {
            return Some(found);
        }
        let prefix = self.optional_prefix.as_deref().filter(|p| !p.is_empty())?;
        match name.strip_prefix(prefix) {
            Some(bare) => self.tensors.get_key_value(bare),
            None => self.tensors.get_key_value(&format!("{prefix}{name}")),
        }
    }
}

/// The safetensors weights of one component behind a checking `VarBuilder`: every read is
/// recorded, shapes are checked against what the model asks for, and dtypes are converted to
/// the model's (an fp16 file loads into an f32 model).
#[derive(Clone)]
pub struct ComponentWeights {
    inner: Arc<Inner>,
}

impl ComponentWeights {
    /// Open the safetensors `paths` (one file or all shards) of the component named `component`.
    /// The files are memory-mapped: they must not be modified while the weights are in use.
    pub fn open(component: &str, paths: &[PathBuf], options: &WeightOptions) -> anyhow::Result<Self> {
        if paths.is_empty() {
            bail!("{component}: no weight files given");
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors: HashMap<String, StoredTensor> = HashMap::new();
        for (file_index, path) in paths.iter().enumerate() {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
            if ext != "safetensors" {
                bail!("{component}: {} is not a .safetensors file; only safetensors weights are read", path.display());
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it
            // not being modified while mapped (documented on `open`).
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| anyhow::anyhow!("{component}: {} is not a valid safetensors file: {e}", path.display()))?;
            for (name, view) in st.tensors() {
                let canonical =
                    if options.legacy_attention_names { modern_attention_name(&name) } else { name.clone() };
                let stored = StoredTensor {
                    file: file_index,
                    stored_name: name.clone(),
                    rows: None,
                    transpose: false,
                    shape: view.shape().to_vec(),
                    dtype: format!("{:?}", view.dtype()),
                };
                if let Some(previous) = tensors.insert(canonical.clone(), stored) {
                    let first = &paths[previous.file];
                    bail!(
                        "{component}: tensor `{canonical}` is stored twice: as `{}` in {} and as `{name}` in {}",
                        previous.stored_name,
                        first.display(),
                        path.display()
                    );
                }
            }
            files.push(st);
        }
        let label = if paths.len() == 1 {
            format!("{component} ({})", paths[0].display())
        } else {
            format!("{component} ({} shards in {})", paths.len(), paths[0].parent().unwrap_or(Path::new("")).display())
        };
        Ok(Self {
            inner: Arc::new(Inner {
                label,
                paths: paths.to_vec(),
                files,
                tensors,
                optional_prefix: options.optional_prefix.clone(),
                read: Mutex::new(HashSet::new()),
                missing_hint: None,
            }),
        })
    }

    /// Open one safetensors file whose tensors are stored under other names (a single-file
    /// checkpoint): `tensors` says which stored tensor (or rows of it) each model weight is.
    /// Every stored name must exist; `hint` names what a missing model weight was expected as.
    pub(crate) fn open_mapped(
        component: &str,
        path: &Path,
        tensors: &[MappedTensor],
        options: &WeightOptions,
        hint: Option<MissingHint>,
    ) -> anyhow::Result<Self> {
        // SAFETY: as in `open`, the file is mapped read-only and must not change while in use.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| anyhow::anyhow!("{component}: {} is not a valid safetensors file: {e}", path.display()))?;
        let views: HashMap<String, (Vec<usize>, String)> =
            st.tensors().into_iter().map(|(name, view)| (name, (view.shape().to_vec(), format!("{:?}", view.dtype())))).collect();
        let mut stored_tensors: HashMap<String, StoredTensor> = HashMap::new();
        for mapped in tensors {
            let (shape, dtype) = views.get(&mapped.stored_name).with_context(|| {
                format!("{component}: tensor `{}` is not in {}", mapped.stored_name, path.display())
            })?;
            let mut shape = shape.clone();
            if let Some((start, len)) = mapped.rows {
                if shape.is_empty() || start + len > shape[0] {
                    bail!(
                        "{component}: rows {start}..{} of `{}` {shape:?} in {} do not exist",
                        start + len,
                        mapped.stored_name,
                        path.display()
                    );
                }
                shape[0] = len;
            }
            if mapped.transpose {
                if shape.len() != 2 {
                    bail!("{component}: `{}` {shape:?} in {} is not 2-D, so it cannot be read transposed", mapped.stored_name, path.display());
                }
                shape.reverse();
            }
            let canonical =
                if options.legacy_attention_names { modern_attention_name(&mapped.name) } else { mapped.name.clone() };
            let stored = StoredTensor { file: 0, stored_name: mapped.stored_name.clone(), rows: mapped.rows, transpose: mapped.transpose, shape, dtype: dtype.clone() };
            if let Some(previous) = stored_tensors.insert(canonical.clone(), stored) {
                bail!(
                    "{component}: `{canonical}` would be read from both `{}` and `{}` in {}",
                    previous.stored_name,
                    mapped.stored_name,
                    path.display()
                );
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                label: format!("{component} ({})", path.display()),
                paths: vec![path.to_path_buf()],
                files: vec![st],
                tensors: stored_tensors,
                optional_prefix: options.optional_prefix.clone(),
                read: Mutex::new(HashSet::new()),
                missing_hint: hint,
            }),
        })
    }

    /// A `VarBuilder` reading from these weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(CheckingBackend { inner: self.inner.clone() }), dtype, device.clone())
    }

    /// Build a model with [`Self::var_builder`], then fail if the files hold weights it did not read.
    pub fn build<M>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> anyhow::Result<M> {
        let model = build(self.var_builder(dtype, device))
            .map_err(|e| anyhow::anyhow!("building {} failed: {e}", self.inner.label))?;
        self.ensure_all_read()?;
        Ok(model)
    }

    /// [`Self::build`], also returning the tensors the model was built from by the names it asked
    /// for (the same storage, no copy), so that it can be rebuilt on another device
    /// (`models::offload`).
    /// With `record` false it is [`Self::build`] and the record is empty.
    pub(crate) fn build_recorded<M>(
        &self,
        record: bool,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> anyhow::Result<(M, crate::models::offload::Tensors)> {
        if !record {
            return Ok((self.build(dtype, device, build)?, Default::default()));
        }
        let (vb, seen) = crate::models::offload::recording(Box::new(CheckingBackend { inner: self.inner.clone() }), dtype, device);
        let model = build(vb).map_err(|e| anyhow::anyhow!("building {} failed: {e}", self.inner.label))?;
        self.ensure_all_read()?;
        Ok((model, crate::models::offload::take(seen)))
    }

    /// Canonical names of all stored tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Shape of a stored tensor by name (canonical, or with/without the optional prefix).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.inner.key(name).map(|(_, t)| t.shape.as_slice())
    }

    /// The weight files, in the order given to [`Self::open`].
    pub fn paths(&self) -> &[PathBuf] {
        &self.inner.paths
    }

    /// Stored tensors not read so far (canonical names, sorted), leaving out known buffers such
    /// as `position_ids`.
    pub fn unread(&self) -> Vec<String> {
        let read = self.inner.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut unread: Vec<String> = self
            .inner
            .tensors
            .keys()
            .filter(|name| !read.contains(*name))
            .filter(|name| !IGNORABLE_BUFFERS.iter().any(|b| name.rsplit('.').next() == Some(*b)))
            .cloned()
            .collect();
        unread.sort();
        unread
    }

    /// An error naming the stored tensors the model did not read (weights that do not belong to
    /// the network the config describes).
    pub(crate) fn ensure_all_read(&self) -> anyhow::Result<()> {
        let unread = self.unread();
        if unread.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 10;
        let mut list: Vec<String> = unread
            .iter()
            .take(SHOWN)
            .map(|name| {
                let stored = &self.inner.tensors[name];
                if stored.stored_name == *name {
                    format!("`{name}` {:?}", stored.shape)
                } else {
                    format!("`{}` {:?} (as `{name}`)", stored.stored_name, stored.shape)
                }
            })
            .collect();
        if unread.len() > SHOWN {
            list.push(format!("and {} more", unread.len() - SHOWN));
        }
        bail!(
            "{}: {} stored weight(s) are not used by the model built from config.json (does the \
             config match these weights?): {}",
            self.inner.label,
            unread.len(),
            list.join(", ")
        )
    }
}

/// `…attentions.N.query.weight` → `…attentions.N.to_q.weight` (and `key`, `value`,
/// `proj_attn`), as diffusers renames the old VAE attention blocks on load.
pub fn modern_attention_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() < 3 || !parts.contains(&"attentions") {
        return name.to_string();
    }
    let module = parts.len() - 2;
    let replacement = match parts[module] {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return name.to_string(),
    };
    let mut out: Vec<&str> = parts[..module].to_vec();
    out.push(replacement);
    out.push(parts[module + 1]);
    out.join(".")
}

/// True for an attention projection weight stored as a 1x1 convolution `[out, in, 1, 1]` while
/// the model asks for the linear `[out, in]`.
fn is_squeezable_projection(name: &str, stored: &[usize], wanted: &[usize]) -> bool {
    let projection = ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"].iter().any(|s| name.ends_with(s));
    projection && stored.len() == 4 && wanted.len() == 2 && stored[2] == 1 && stored[3] == 1 && stored[..2] == wanted[..]
}

struct CheckingBackend {
    inner: Arc<Inner>,
}

impl CheckingBackend {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (key, stored) = self.inner.key(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("weight `{name}` is missing from {}", self.inner.label))
        })?;
        let tensor = self.inner.files[stored.file]
            .load(&stored.stored_name, device)
            .and_then(|t| match stored.rows {
                // A fresh copy, so that the slice does not keep the whole fused tensor alive.
                Some((start, len)) => t.narrow(0, start, len)?.copy(),
                None => Ok(t),
            })
            .and_then(|t| if stored.transpose { t.t()?.contiguous() } else { Ok(t) })
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "reading weight `{}` ({} {:?}) from {}: {e}",
                    stored.stored_name,
                    stored.dtype,
                    stored.shape,
                    self.inner.paths[stored.file].display()
                ))
            })?
            .to_dtype(dtype)?;
        if let Ok(view) = self.inner.files[stored.file].get(&stored.stored_name) {
            release_pages(view.data());
        }
        self.inner.read.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        Ok(tensor)
    }
}

/// Give the mapped pages of a tensor that has been copied out back to the OS, so that a
/// component's file does not stay resident next to the converted weights while the rest of the
/// model loads (peak memory ≈ the model in its compute dtype plus one tensor). Reading the bytes
/// again would fault them back in from the file.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page <= 0 || bytes.is_empty() {
            return;
        }
        let page = page as usize;
        let start = bytes.as_ptr() as usize / page * page;
        let end = (bytes.as_ptr() as usize + bytes.len()).div_ceil(page) * page;
        // SAFETY: the range lies within (page-aligned bounds of) a read-only private file
        // mapping owned by the open `MmapedSafetensors`; MADV_DONTNEED on such a mapping only
        // drops resident pages, which later reads refill from the file. No reference into those
        // pages outlives this call except the mapping itself.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

impl SimpleBackend for CheckingBackend {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let wanted = shape.dims();
        if let Some((_, stored)) = self.inner.key(name) {
            let squeeze = is_squeezable_projection(name, &stored.shape, wanted);
            if stored.shape != wanted && !squeeze {
                return Err(candle_core::Error::Msg(format!(
                    "weight `{name}` has shape {:?} in {} but the model expects {:?}",
                    stored.shape,
                    self.inner.paths[stored.file].display(),
                    wanted
                )));
            }
        } else {
            let hint = self.inner.missing_hint.as_ref().and_then(|h| h(name)).map(|s| format!(" (stored as `{s}`)")).unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "weight `{name}`{hint} (expected shape {wanted:?}) is missing from {}",
                self.inner.label
            )));
        }
        let tensor = self.load(name, dtype, device)?;
        if tensor.dims() != wanted {
            return tensor.reshape(wanted);
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.key(name).is_some()
    }
}
