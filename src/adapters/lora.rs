//! LoRA injection: match target modules like PEFT, initialise A and B, attach branches to
//! `AdaptedLinear` layers, and collect the trainable tensors; apply LoRA files for inference.
//!
//! Target patterns (`LoraSpec::targets`, and the keys of `rank_pattern` / `alpha_pattern`):
//! - a plain pattern such as `to_q` or `attn1.to_out.0` matches a module whose full name equals
//!   it or ends with `.` + pattern (PEFT's rule for a list of names);
//! - `re:REGEX` matches a module whose *full* name matches REGEX entirely (PEFT's meaning of a
//!   `target_modules` string, `re.fullmatch`), e.g. `re:.*attn2\.to_(k|v)`.
//!
//! When several `rank_pattern` / `alpha_pattern` keys match one module, the longest key wins.
//! A target pattern or a rank/alpha pattern that matches no module is an error listing near names.
//!
//! Initialisation (seeded, deterministic; modules are initialised in order of their names, so
//! the result does not depend on the order a model lists its layers):
//! - `gaussian`: A ~ N(0, std = 1/r), B = 0 (PEFT's `init_lora_weights="gaussian"`);
//! - `kaiming` (PEFT's default): A ~ kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
//!   1/sqrt(in)), B = 0.
//!
//! Use a named RNG algorithm for stable results across crate versions, e.g.
//! [`InitRng`] (`chacha20::ChaCha8Rng`) seeded with `SeedableRng::seed_from_u64`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

pub use super::pattern::{near_names, ModulePattern};
use super::keys::{down_key};
use super::weights::LoraFormat;
use super::read::read_lora_file_for_use;
use super::weights::{Component, LoraModule, LoraWeights};
use crate::nn::{AdaptedConv2d, AdaptedLinear, LoraBranch};

/// The RNG we recommend for LoRA initialisation: a named algorithm, stable across versions.
pub type InitRng = chacha20::ChaCha8Rng;

/// How A is initialised (B always starts at zero, so the adapter starts as the identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// A ~ N(0, std = 1/r): `init_lora_weights="gaussian"`, what the reference script uses.
    Gaussian,
    /// A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)): PEFT's default.
    #[default]
    Kaiming,
}

/// What to inject: targets, rank, alpha and initialisation (PEFT's `LoraConfig` subset).
#[derive(Clone, Debug)]
pub struct LoraSpec {
    /// Target patterns (see the module docs for the syntax).
    pub targets: Vec<String>,
    /// Global rank r.
    pub rank: usize,
    /// Global alpha; the branch scale is alpha / r.
    pub alpha: f64,
    /// Per-pattern rank overrides.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-pattern alpha overrides.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub init: LoraInit,
    /// LoCon: rank and alpha of a branch on every convolution offered (kohya's `conv_dim` /
    /// `conv_alpha`); `rank_pattern` / `alpha_pattern` override them per module. `None`: no conv
    /// gets a branch.
    pub conv: Option<(usize, f64)>,
    /// DoRA (PEFT's `use_dora`): every branch also learns a magnitude per output channel.
    pub use_dora: bool,
}

impl Default for LoraSpec {
    /// The reference script's UNet adapter at its default rank 4.
    fn default() -> Self {
        Self::reference_unet(4)
    }
}

impl LoraSpec {
    /// The reference script's UNet adapter: r = alpha = `rank`, gaussian init,
    /// targets `to_k`, `to_q`, `to_v`, `to_out.0`.
    pub fn reference_unet(rank: usize) -> Self {
        Self {
            targets: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec(),
            rank,
            alpha: rank as f64,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init: LoraInit::Gaussian,
            conv: None,
            use_dora: false,
        }
    }

    /// The text-encoder adapter of the SDXL / DreamBooth scripts: `q_proj`, `k_proj`,
    /// `v_proj`, `out_proj`.
    pub fn reference_text_encoder(rank: usize) -> Self {
        Self {
            targets: ["q_proj", "k_proj", "v_proj", "out_proj"].map(String::from).to_vec(),
            ..Self::reference_unet(rank)
        }
    }
}

/// One injected branch the trainer optimises. The layer holds clones of these `Var`s'
/// tensors (shared storage), so `Var::set` updates the layer in place.
#[derive(Clone, Debug)]
pub struct TrainableLora {
    /// Full module name, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    /// A, `[r, in]`, f32.
    pub down: Var,
    /// B, `[out, r]`, f32.
    pub up: Var,
    /// DoRA's magnitude m, `[out]`, f32.
    pub magnitude: Option<Var>,
    pub alpha: f64,
    pub rank: usize,
}

impl TrainableLora {
    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
    /// PEFT's parameter name of A inside the model, adapter `default`
    /// (`<module>.lora_A.default.weight`), as `golden/train_step.safetensors` names it.
    pub fn peft_down_name(&self) -> String {
        format!("{}.lora_A.default.weight", self.module)
    }
    /// PEFT's parameter name of B inside the model (`<module>.lora_B.default.weight`).
    pub fn peft_up_name(&self) -> String {
        format!("{}.lora_B.default.weight", self.module)
    }
    /// PEFT's parameter name of DoRA's magnitude (`<module>.lora_magnitude_vector.default.weight`).
    pub fn peft_magnitude_name(&self) -> String {
        format!("{}.lora_magnitude_vector.default.weight", self.module)
    }
    /// The trainable tensors: A, B, and m for DoRA.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        [Some(&self.down), Some(&self.up), self.magnitude.as_ref()].into_iter().flatten()
    }
}


/// The value of the longest pattern key in `patterns` that matches `name`.
fn pattern_value<T: Copy>(patterns: &[(ModulePattern, T)], name: &str) -> Option<T> {
    patterns
        .iter()
        .filter(|(p, _)| p.matches(name))
        .max_by_key(|(p, _)| p.text().len())
        .map(|(_, v)| *v)
}

/// Keep in `spec`'s `rank_pattern` and `alpha_pattern` only the keys that match a module of
/// `names` that `spec.targets` selects (for one part of a model, when the patterns are shared
/// with another part). Returns the keys kept.
/// `convs` are convolutions that take a branch whatever the targets (LoCon).
pub(crate) fn keep_patterns_for<'a>(
    spec: &mut LoraSpec,
    names: impl IntoIterator<Item = &'a str>,
    convs: impl IntoIterator<Item = &'a str>,
) -> Result<std::collections::BTreeSet<String>> {
    let targets = spec.targets.iter().map(|t| ModulePattern::parse(t)).collect::<Result<Vec<_>>>()?;
    let mut targeted: Vec<&str> = names.into_iter().filter(|n| targets.iter().any(|t| t.matches(n))).collect();
    targeted.extend(convs);
    let hits = |k: &str| -> Result<bool> {
        let p = ModulePattern::parse(k)?;
        Ok(targeted.iter().any(|n| p.matches(n)))
    };
    let mut kept = std::collections::BTreeSet::new();
    let mut rank = BTreeMap::new();
    for (k, v) in std::mem::take(&mut spec.rank_pattern) {
        if hits(&k)? {
            kept.insert(k.clone());
            rank.insert(k, v);
        }
    }
    let mut alpha = BTreeMap::new();
    for (k, v) in std::mem::take(&mut spec.alpha_pattern) {
        if hits(&k)? {
            kept.insert(k.clone());
            alpha.insert(k, v);
        }
    }
    spec.rank_pattern = rank;
    spec.alpha_pattern = alpha;
    Ok(kept)
}

/// Resolved settings for one matched module.
#[derive(Clone, Debug, PartialEq)]
pub struct ModulePlan {
    pub module: String,
    pub rank: usize,
    pub alpha: f64,
}

/// Decide which of `names` get a branch, and with what rank and alpha. Errors name every
/// pattern that matched nothing, with near names.
pub fn plan_targets<'a>(names: impl IntoIterator<Item = &'a str> + Clone, spec: &LoraSpec) -> Result<Vec<ModulePlan>> {
    plan_layers(names, std::iter::empty(), spec)
}

/// [`plan_targets`] over linear layers (`names`, chosen by `spec.targets`) and convolutions
/// (`conv_names`, every one of them when `spec.conv` is set, at its rank and alpha unless a
/// pattern says otherwise). Linear plans come first, each group in name order.
pub(crate) fn plan_layers<'a>(
    names: impl IntoIterator<Item = &'a str> + Clone,
    conv_names: impl IntoIterator<Item = &'a str>,
    spec: &LoraSpec,
) -> Result<Vec<ModulePlan>> {
    if spec.rank == 0 {
        bail!("LoRA rank must be at least 1");
    }
    if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
        bail!("LoRA alpha must be a positive number, got {}", spec.alpha);
    }
    if spec.targets.is_empty() {
        bail!("no LoRA target modules given");
    }
    if let Some((r, a)) = spec.conv {
        if r == 0 || !(a.is_finite() && a > 0.0) {
            bail!("conv LoRA needs a rank of at least 1 and a positive alpha, got rank {r}, alpha {a}");
        }
    }
    let targets = spec.targets.iter().map(|t| ModulePattern::parse(t)).collect::<Result<Vec<_>>>()?;
    let mut rank_patterns = Vec::new();
    for (k, &r) in &spec.rank_pattern {
        if r == 0 {
            bail!("rank_pattern `{k}`: rank must be at least 1");
        }
        rank_patterns.push((ModulePattern::parse(k)?, r));
    }
    let mut alpha_patterns = Vec::new();
    for (k, &a) in &spec.alpha_pattern {
        if !(a.is_finite() && a > 0.0) {
            bail!("alpha_pattern `{k}`: alpha must be a positive number, got {a}");
        }
        alpha_patterns.push((ModulePattern::parse(k)?, a));
    }

    let mut sorted: Vec<&str> = names.clone().into_iter().collect();
    sorted.sort_unstable();
    let mut convs: Vec<&str> = conv_names.into_iter().collect();
    convs.sort_unstable();
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    let mut target_hits = vec![0usize; targets.len()];
    for &name in &sorted {
        let mut hit = false;
        for (i, t) in targets.iter().enumerate() {
            if t.matches(name) {
                target_hits[i] += 1;
                hit = true;
            }
        }
        if hit {
            plans.push(ModulePlan {
                module: name.to_string(),
                rank: pattern_value(&rank_patterns, name).unwrap_or(spec.rank),
                alpha: pattern_value(&alpha_patterns, name).unwrap_or(spec.alpha),
            });
        }
    }
    if let Some((conv_rank, conv_alpha)) = spec.conv {
        for &name in &convs {
            plans.push(ModulePlan {
                module: name.to_string(),
                rank: pattern_value(&rank_patterns, name).unwrap_or(conv_rank),
                alpha: pattern_value(&alpha_patterns, name).unwrap_or(conv_alpha),
            });
        }
    }
    for (t, hits) in targets.iter().zip(&target_hits) {
        if *hits == 0 {
            let conv_hint = if convs.iter().any(|n| t.matches(n)) {
                " (it matches convolutions, which take a branch through `conv_rank`, not the target list)"
            } else {
                ""
            };
            problems.push(format!(
                "LoRA target `{}` matches no module{conv_hint}; near names: {}",
                t.text(),
                near_names(t.text(), sorted.iter().copied()).join(", ")
            ));
        }
    }
    let targeted: Vec<&str> = plans.iter().map(|p| p.module.as_str()).collect();
    for (kind, pats) in [("rank_pattern", rank_patterns.iter().map(|(p, _)| p).collect::<Vec<_>>()), ("alpha_pattern", alpha_patterns.iter().map(|(p, _)| p).collect())] {
        for p in pats {
            if !targeted.iter().any(|n| p.matches(n)) {
                problems.push(format!(
                    "{kind} key `{}` matches no targeted module; near names: {}",
                    p.text(),
                    near_names(p.text(), targeted.iter().copied()).join(", ")
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(plans)
}

/// Draw A (`rank` rows of `in_features` values: a conv's fan-in `in·kh·kw`) as `init` says, as
/// f32 values in row-major order.
fn init_down<R: Rng + ?Sized>(init: LoraInit, rank: usize, in_features: usize, rng: &mut R) -> Result<Vec<f32>> {
    let n = rank * in_features;
    Ok(match init {
        LoraInit::Gaussian => {
            let normal = Normal::new(0f32, 1.0 / rank as f32).context("LoRA gaussian init")?;
            (0..n).map(|_| normal.sample(rng)).collect()
        }
        LoraInit::Kaiming => {
            // kaiming_uniform_(a = sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
            // = 1 / sqrt(fan_in), with fan_in = in_features.
            let bound = 1.0 / (in_features as f64).sqrt();
            (0..n)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect()
        }
    })
}

/// A layer LoRA can adapt.
pub enum LayerMut<'a> {
    Linear(&'a mut AdaptedLinear),
    Conv(&'a mut AdaptedConv2d),
}

impl LayerMut<'_> {
    fn name(&self) -> &str {
        match self {
            Self::Linear(l) => &l.name,
            Self::Conv(c) => &c.name,
        }
    }
    fn weight(&self) -> &Tensor {
        match self {
            Self::Linear(l) => &l.weight,
            Self::Conv(c) => &c.conv.weight,
        }
    }
    /// A's shape at rank `r`: `[r, in]`, or a conv's `[r, in, kh, kw]`.
    fn down_shape(&self, r: usize) -> Vec<usize> {
        match self {
            Self::Linear(l) => vec![r, l.in_features()],
            Self::Conv(c) => {
                let (r, i, kh, kw) = c.down_shape(r);
                vec![r, i, kh, kw]
            }
        }
    }
    fn out_features(&self) -> usize {
        self.weight().dims()[0]
    }
    fn push(&mut self, branch: LoraBranch) {
        match self {
            Self::Linear(l) => l.loras.push(branch),
            Self::Conv(c) => c.loras.push(branch),
        }
    }
}

/// Inject LoRA branches into the linear layers `spec` targets and return them for training.
///
/// Every matched layer gets one new branch whose tensors are the returned `Var`s' tensors
/// (f32, on the layer's device); scale alpha / r. Layers are initialised in name order.
pub fn inject<R: Rng + ?Sized>(linears: Vec<&mut AdaptedLinear>, spec: &LoraSpec, rng: &mut R) -> Result<Vec<TrainableLora>> {
    inject_layers(linears, Vec::new(), spec, rng)
}

/// [`inject`] into linear layers and, when `spec.conv` is set, every one of `convs` (LoCon),
/// initialised after the linear layers, each group in name order. A conv's A is
/// `[r, in, kh, kw]` (its kaiming bound uses fan-in `in·kh·kw`, as torch's for a conv weight).
/// With `spec.use_dora` each branch also gets DoRA's magnitude, initialised to `‖W‖` per output
/// channel (PEFT's init: B = 0, so `‖W + s·B A‖ = ‖W‖`).
pub fn inject_layers<R: Rng + ?Sized>(
    linears: Vec<&mut AdaptedLinear>,
    convs: Vec<&mut AdaptedConv2d>,
    spec: &LoraSpec,
    rng: &mut R,
) -> Result<Vec<TrainableLora>> {
    let mut by_name: BTreeMap<String, LayerMut<'_>> = BTreeMap::new();
    let mut conv_names = Vec::new();
    for layer in linears.into_iter().map(LayerMut::Linear).chain(convs.into_iter().map(LayerMut::Conv)) {
        let name = layer.name().to_string();
        if matches!(layer, LayerMut::Conv(_)) {
            conv_names.push(name.clone());
        }
        if by_name.insert(name.clone(), layer).is_some() {
            bail!("two layers share the module name `{name}`");
        }
    }
    let linear_names: Vec<String> = by_name.iter().filter(|(_, l)| matches!(l, LayerMut::Linear(_))).map(|(n, _)| n.clone()).collect();
    let plans = plan_layers(linear_names.iter().map(String::as_str), conv_names.iter().map(String::as_str), spec)?;
    let mut out = Vec::with_capacity(plans.len());
    for plan in plans {
        let layer = by_name.get_mut(&plan.module).expect("planned module exists");
        let shape = layer.down_shape(plan.rank);
        let fan_in: usize = shape[1..].iter().product();
        let out_f = layer.out_features();
        let device = layer.weight().device().clone();
        let down = Tensor::from_vec(init_down(spec.init, plan.rank, fan_in, rng)?, shape, &device)?;
        let up = Tensor::zeros((out_f, plan.rank), DType::F32, &device)?;
        let down = Var::from_tensor(&down)?;
        let up = Var::from_tensor(&up)?;
        let magnitude = if spec.use_dora {
            let w = layer.weight().to_dtype(DType::F32)?;
            Some(Var::from_tensor(&w.reshape((out_f, ()))?.sqr()?.sum(1)?.sqrt()?)?)
        } else {
            None
        };
        layer.push(LoraBranch {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: plan.alpha / plan.rank as f64,
            magnitude: magnitude.as_ref().map(|m| m.as_tensor().clone()),
        });
        out.push(TrainableLora { module: plan.module, down, up, magnitude, alpha: plan.alpha, rank: plan.rank });
    }
    Ok(out)
}

/// Snapshot trained branches as a [`LoraWeights`] for writing (tensors are copied, so later
/// training steps do not change it). `alpha` is kept per module.
/// `text_encoders`: the first and (SDXL) second text encoder's branches, in order.
pub fn trained_weights(unet: &[TrainableLora], text_encoders: &[&[TrainableLora]]) -> Result<LoraWeights> {
    let snapshot = |loras: &[TrainableLora]| -> Result<BTreeMap<String, LoraModule>> {
        loras
            .iter()
            .map(|l| {
                Ok((
                    l.module.clone(),
                    LoraModule {
                        down: l.down.as_tensor().to_dtype(DType::F32)?.copy()?,
                        up: l.up.as_tensor().to_dtype(DType::F32)?.copy()?,
                        alpha: Some(l.alpha),
                        magnitude: match &l.magnitude {
                            Some(m) => Some(m.as_tensor().to_dtype(DType::F32)?.copy()?),
                            None => None,
                        },
                    },
                ))
            })
            .collect()
    };
    anyhow::ensure!(text_encoders.len() <= 2, "{} text encoders: a LoRA file holds at most two", text_encoders.len());
    let te = |i: usize| text_encoders.get(i).map_or(Ok(BTreeMap::new()), |l| snapshot(l));
    Ok(LoraWeights { unet: snapshot(unet)?, text_encoder: te(0)?, text_encoder_2: te(1)?, ..LoraWeights::default() })
}

/// The shape `m`'s A takes on `layer` (its own, or a 1x1 conv's `[r, in, 1, 1]` ↔ a linear's
/// `[r, in]`), or `None` when it does not fit.
fn fitted_down_shape(layer: &LayerMut<'_>, m: &LoraModule) -> Option<Vec<usize>> {
    let r = m.rank();
    let want = layer.down_shape(r);
    let got = m.down.dims();
    let pointwise = |d: &[usize]| d[2..].iter().all(|&k| k == 1);
    let fits = got == want.as_slice() || (got[..2] == want[..2] && pointwise(got) && pointwise(&want));
    (fits && m.up.dims() == [layer.out_features(), r] && m.magnitude.as_ref().is_none_or(|g| g.dims() == [layer.out_features()])).then_some(want)
}

/// Match the modules of one component of a LoRA file to `layers` and check shapes. Returns
/// (index into layers, module, A's shape there) triples, or every problem found.
fn match_component<'w>(
    component: Component,
    format: Option<LoraFormat>,
    modules: &'w BTreeMap<String, LoraModule>,
    layers: &[LayerMut<'_>],
    problems: &mut Vec<String>,
) -> Vec<(usize, &'w LoraModule, Vec<usize>)> {
    let title = match component {
        Component::Unet => "UNet",
        Component::TextEncoder => "text encoder",
        Component::TextEncoder2 => "second text encoder",
    };
    let mut exact = BTreeMap::new();
    let mut underscored = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        exact.insert(layer.name(), i);
        underscored.insert(layer.name().replace('.', "_"), i);
    }
    let mut out = Vec::new();
    for (name, m) in modules {
        // Kohya names lose the dots; fall back to comparing with underscores.
        let idx = exact.get(name.as_str()).copied().or_else(|| underscored.get(&name.replace('.', "_")).copied());
        let key = format.map_or_else(|| name.clone(), |f| down_key(f, component, name));
        let Some(i) = idx else {
            problems.push(format!(
                "{title} LoRA module `{name}` (key `{key}`) matches no layer of the model; near names: {}",
                near_names(name, layers.iter().map(|l| l.name())).join(", ")
            ));
            continue;
        };
        let layer = &layers[i];
        let Some(shape) = fitted_down_shape(layer, m) else {
            let kind = if matches!(layer, LayerMut::Conv(_)) { "convolution" } else { "layer" };
            problems.push(format!(
                "{title} LoRA module `{name}` (key `{key}`): down {:?} / up {:?}{} do not fit {kind} `{}` with weight {:?} (down must be {:?} with r = rank, up [{}, r]{})",
                m.down.dims(),
                m.up.dims(),
                m.magnitude.as_ref().map_or(String::new(), |g| format!(" / DoRA magnitude {:?}", g.dims())),
                layer.name(),
                layer.weight().dims(),
                layer.down_shape(m.rank()),
                layer.out_features(),
                if m.magnitude.is_some() { format!(", magnitude [{}]", layer.out_features()) } else { String::new() },
            ));
            continue;
        };
        out.push((i, m, shape));
    }
    out
}

/// Attach the branches of `weights` to the given linear layers (the UNet's, then each text
/// encoder's in order), each scaled by its alpha / r times `scale`. Nothing is attached unless
/// every module matches a layer with fitting shapes.
pub fn apply_lora_weights(
    weights: &LoraWeights,
    unet: Vec<&mut AdaptedLinear>,
    text_encoders: Vec<Vec<&mut AdaptedLinear>>,
    scale: f64,
) -> Result<()> {
    apply_lora_layers(weights, unet, Vec::new(), text_encoders, scale)
}

/// [`apply_lora_weights`] with the UNet's convolutions too (LoCon modules).
pub fn apply_lora_layers(
    weights: &LoraWeights,
    unet: Vec<&mut AdaptedLinear>,
    unet_convs: Vec<&mut AdaptedConv2d>,
    text_encoders: Vec<Vec<&mut AdaptedLinear>>,
    scale: f64,
) -> Result<()> {
    let mut problems = Vec::new();
    let f = weights.source_format;
    let mut unet: Vec<LayerMut<'_>> = unet.into_iter().map(LayerMut::Linear).chain(unet_convs.into_iter().map(LayerMut::Conv)).collect();
    let mut text_encoders: Vec<Vec<LayerMut<'_>>> = text_encoders.into_iter().map(|l| l.into_iter().map(LayerMut::Linear).collect()).collect();
    let unet_plan = match_component(Component::Unet, f, &weights.unet, &unet, &mut problems);
    let mut te_plans = Vec::new();
    for (i, component) in [Component::TextEncoder, Component::TextEncoder2].into_iter().enumerate() {
        let modules = weights.component(component);
        match text_encoders.get(i) {
            Some(layers) => te_plans.push(match_component(component, f, modules, layers, &mut problems)),
            None if modules.is_empty() => te_plans.push(Vec::new()),
            None => problems.push(format!(
                "the LoRA has {} modules for a {} text encoder{}; this model has {} text encoder{}",
                modules.len(),
                if i == 0 { "first" } else { "second" },
                if i == 1 { " (SDXL)" } else { "" },
                text_encoders.len(),
                if text_encoders.len() == 1 { "" } else { "s" }
            )),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    let attach = |layer: &mut LayerMut<'_>, m: &LoraModule, shape: Vec<usize>| -> Result<()> {
        let device = layer.weight().device().clone();
        let magnitude = match &m.magnitude {
            Some(g) => Some(g.to_dtype(DType::F32)?.to_device(&device)?),
            None => None,
        };
        layer.push(LoraBranch {
            down: m.down.to_dtype(DType::F32)?.reshape(shape)?.to_device(&device)?,
            up: m.up.to_dtype(DType::F32)?.to_device(&device)?,
            scale: m.scale() * scale,
            magnitude,
        });
        Ok(())
    };
    for (i, m, shape) in unet_plan {
        attach(&mut unet[i], m, shape)?;
    }
    for (layers, plan) in text_encoders.iter_mut().zip(te_plans) {
        for (i, m, shape) in plan {
            attach(&mut layers[i], m, shape)?;
        }
    }
    Ok(())
}

/// Read a LoRA file in any supported format and attach it to the UNet and text encoder of
/// `sd` with strength `scale`. Several files may be applied one after another. A file with NaN
/// or infinite weights is refused, naming the tensors.
pub fn apply_lora_file(sd: &mut crate::models::StableDiffusion, path: &Path, scale: f64) -> Result<()> {
    let weights = read_lora_file_for_use(path)?;
    apply_lora_to_model(&weights, sd, scale).with_context(|| format!("cannot apply LoRA file {}", path.display()))
}

/// [`apply_lora_weights`] on a loaded model's UNet and text encoders; UNet modules named in the
/// original layout (kohya's SDXL files: `input_blocks.4.1.…`) are renamed for this UNet first.
pub fn apply_lora_to_model(weights: &LoraWeights, sd: &mut crate::models::StableDiffusion, scale: f64) -> Result<()> {
    let weights = super::ldm_names::to_diffusers_unet_names(weights, sd.unet.config())?;
    let (linears, convs) = sd.unet.layers_mut();
    apply_lora_layers(&weights, linears, convs, sd.text.linears_mut(), scale)
}

/// Overwrite the trainable tensors of `loras` with tensors named `{prefix}{peft name}`, e.g.
/// `before.` + `down_blocks.0….to_q.lora_A.default.weight` (goldens). Every branch must be
/// present with its exact shape; nothing is changed unless all are.
pub fn load_peft_tensors(
    loras: &[TrainableLora],
    tensors: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
) -> Result<()> {
    let mut staged = Vec::with_capacity(loras.len() * 2);
    let mut problems = Vec::new();
    for l in loras {
        let magnitude = l.magnitude.as_ref().map(|m| (m, l.peft_magnitude_name()));
        for (var, name) in [(&l.down, l.peft_down_name()), (&l.up, l.peft_up_name())].into_iter().chain(magnitude.iter().map(|(m, n)| (*m, n.clone()))) {
            let key = format!("{prefix}{name}");
            match tensors.get(&key) {
                None => problems.push(format!("tensor `{key}` is missing")),
                // The same values in PEFT's shape (a conv's B `[out, r, 1, 1]`, m `[1, out, 1, 1]`).
                Some(t) if t.elem_count() == var.elem_count() && t.dims().iter().filter(|&&d| d != 1).eq(var.dims().iter().filter(|&&d| d != 1)) => {
                    staged.push((var, t))
                }
                Some(t) => problems.push(format!("tensor `{key}` has shape {:?}, the LoRA parameter has {:?}", t.dims(), var.dims())),
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    for (var, t) in staged {
        var.set(&t.to_dtype(var.dtype())?.reshape(var.dims())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Overwrite the trainable tensors of `loras` with the modules of a LoRA file (e.g. to resume
/// from a checkpoint). The file must hold exactly the injected modules with the same shapes.
pub fn load_lora_modules(loras: &[TrainableLora], modules: &BTreeMap<String, LoraModule>) -> Result<()> {
    let mut problems = Vec::new();
    let injected: BTreeSet<&str> = loras.iter().map(|l| l.module.as_str()).collect();
    for name in modules.keys() {
        if !injected.contains(name.as_str()) {
            problems.push(format!("LoRA module `{name}` is not among the injected modules"));
        }
    }
    let mut tensors = std::collections::HashMap::new();
    for l in loras {
        match modules.get(&l.module) {
            None => problems.push(format!("LoRA module `{}` is missing", l.module)),
            Some(m) => {
                if let Some(a) = m.alpha {
                    if (a - l.alpha).abs() > 1e-9 * l.alpha.abs().max(1.0) {
                        problems.push(format!("LoRA module `{}` has alpha {a}, the injected branch {}", l.module, l.alpha));
                    }
                }
                if m.magnitude.is_some() != l.magnitude.is_some() {
                    problems.push(format!("LoRA module `{}` {} DoRA magnitude, the injected branch {}", l.module, if m.magnitude.is_some() { "has a" } else { "has no" }, if l.magnitude.is_some() { "has one" } else { "has none" }));
                    continue;
                }
                tensors.insert(l.peft_down_name(), m.down.clone());
                tensors.insert(l.peft_up_name(), m.up.clone());
                if let Some(g) = &m.magnitude {
                    tensors.insert(l.peft_magnitude_name(), g.clone());
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    load_peft_tensors(loras, &tensors, "")
}
