//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction, f32 state), Lion
//! as `lion-pytorch` (kohya's `--optimizer_type Lion`), global-norm gradient clipping as
//! `torch.nn.utils.clip_grad_norm_`, and the optimizer state's safetensors checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum UpdateRule {
    /// torch's AdamW.
    #[default]
    AdamW,
    /// Lion (Chen et al. 2023) as `lion-pytorch`: `p ← p·(1 − lr·wd)`,
    /// `p ← p − lr·sign(β1·m + (1−β1)·g)`, then `m ← β2·m + (1−β2)·g`; one moment, no eps.
    Lion,
    /// AdamW with both moments kept in bitsandbytes' blockwise dynamic 8-bit form
    /// ([`super::quant8`]), as bnb's `AdamW8bit` (its CUDA kernel's rules, every parameter
    /// quantized): dequantize, AdamW's moment update in f32, `p ← p − lr/(1−β1^k)·m/(√v/√(1−β2^k) + eps)`,
    /// then `p ← p·(1 − lr·wd)`, requantize with the blocks' new absmax.
    AdamW8bit,
    /// Prodigy (Mishchenko & Defazio 2023) as `prodigyopt` 1.1: Adam whose step size `d` is
    /// estimated from the distance travelled (`lr` multiplies it and is left at 1). Decoupled
    /// weight decay; `beta3 = √β2`, `d0 = 1e-6`, unbounded growth.
    Prodigy { d_coef: f64, bias_correction: bool, safeguard_warmup: bool },
    /// transformers' `Adafactor` with `relative_step = False`, `warmup_init = False` (the lr
    /// comes from the schedule), no first moment: the second moment factored over the last two
    /// dimensions of every parameter of 2 or more, `β2t = 1 − k^−0.8`, eps (1e-30, 1e-3), updates
    /// clipped to RMS 1; with `scale_parameter` the lr is scaled by `max(1e-3, RMS(p))`.
    Adafactor { scale_parameter: bool },
}

impl UpdateRule {
    /// The name saved in the state file.
    fn name(self) -> &'static str {
        match self {
            UpdateRule::AdamW => "AdamW",
            UpdateRule::Lion => "Lion",
            UpdateRule::AdamW8bit => "AdamW8bit",
            UpdateRule::Prodigy { .. } => "Prodigy",
            UpdateRule::Adafactor { .. } => "Adafactor",
        }
    }
}

/// Optimizer hyperparameters (the learning rate is passed to every [`AdamW::step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub rule: UpdateRule,
    /// Keep an exponential moving average of the parameters with this decay cap, as diffusers'
    /// `EMAModel` (see [`ema_decay`]); `None` keeps none.
    pub ema_decay: Option<f64>,
    /// AdamW only: update every parameter in one pass over one flat host buffer
    /// ([`adamw_fused_host`]: the same arithmetic as the per-parameter tensor ops, bit for bit)
    /// instead of about ten tensor ops per parameter. CPU parameters only; the device kernel is
    /// issue 17's.
    pub fused: bool,
}

impl Default for AdamWConfig {
    /// The reference script's defaults: AdamW, betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, rule: UpdateRule::AdamW, ema_decay: None, fused: false }
    }
}

/// diffusers' `EMAModel.get_decay` (no warmup, `update_after_step` 0, `min_decay` 0): 0 for the
/// first update (the average becomes the parameters), then `(1 + k) / (10 + k)` capped at `cap`,
/// `k` = updates − 1.
pub fn ema_decay(cap: f64, optimization_step: usize) -> f64 {
    let k = optimization_step.saturating_sub(1);
    if k == 0 {
        return 0.0;
    }
    ((1.0 + k as f64) / (10.0 + k as f64)).min(cap).max(0.0)
}

/// Prodigy's starting step size (`d0`).
const PRODIGY_D0: f64 = 1e-6;

/// Prodigy's run-wide scalars (`group['d']`, `d_max`, `d_numerator`, `k`), f64 as Python's.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProdigyScalars {
    d: f64,
    d_max: f64,
    d_numerator: f64,
    k: usize,
}

impl Default for ProdigyScalars {
    fn default() -> Self {
        Self { d: PRODIGY_D0, d_max: PRODIGY_D0, d_numerator: 0.0, k: 0 }
    }
}

/// One trainable parameter and its state, by the names the state file uses.
struct ParamState {
    name: String,
    var: Var,
    /// The rule's buffers (`exp_avg`, `exp_avg_sq`, `s`, `p0`, the factored rows and columns, the
    /// 8-bit codes and block maxima) and, last, the moving average `ema`.
    slots: Vec<(&'static str, Tensor)>,
    /// Updates this parameter received (torch keeps one `step` per parameter).
    steps: usize,
}

impl ParamState {
    fn slot(&self, name: &str) -> &Tensor {
        &self.slots.iter().find(|(n, _)| *n == name).expect("a slot of this rule").1
    }

    fn set_slot(&mut self, name: &str, t: Tensor) {
        self.slots.iter_mut().find(|(n, _)| *n == name).expect("a slot of this rule").1 = t;
    }
}

/// The buffers `rule` keeps for a parameter `var`, zero (Prodigy's `p0`: the parameter).
fn initial_slots(rule: UpdateRule, var: &Var) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
    let dev = var.device();
    let dims = var.dims();
    let zeros = |shape: Vec<usize>| Tensor::zeros(shape, DType::F32, dev);
    Ok(match rule {
        UpdateRule::AdamW => vec![("exp_avg", zeros(dims.to_vec())?), ("exp_avg_sq", zeros(dims.to_vec())?)],
        UpdateRule::Lion => vec![("exp_avg", zeros(dims.to_vec())?)],
        UpdateRule::AdamW8bit => {
            let n = var.elem_count();
            let codes = || Tensor::zeros(n, DType::U8, dev);
            let maxima = || zeros(vec![super::quant8::blocks(n)]);
            vec![("exp_avg_q", codes()?), ("exp_avg_absmax", maxima()?), ("exp_avg_sq_q", codes()?), ("exp_avg_sq_absmax", maxima()?)]
        }
        UpdateRule::Prodigy { .. } => vec![
            ("exp_avg", zeros(dims.to_vec())?),
            ("exp_avg_sq", zeros(dims.to_vec())?),
            ("s", zeros(dims.to_vec())?),
            ("p0", var.as_tensor().to_dtype(DType::F32)?.copy()?),
        ],
        UpdateRule::Adafactor { .. } => {
            if dims.len() >= 2 {
                let row = dims[..dims.len() - 1].to_vec();
                let mut col = dims[..dims.len() - 2].to_vec();
                col.push(dims[dims.len() - 1]);
                vec![("exp_avg_sq_row", zeros(row)?), ("exp_avg_sq_col", zeros(col)?)]
            } else {
                vec![("exp_avg_sq", zeros(dims.to_vec())?)]
            }
        }
    })
}

/// The optimizer over candle `Var`s: torch's AdamW (amsgrad off, maximize off) or another
/// [`UpdateRule`].
///
/// AdamW, for update number k (1-based), with gradient g:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − lr/(1−β1^k) · m / (√v/√(1−β2^k) + eps)`.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    step_count: usize,
    /// EMAModel's `optimization_step`: updates the average took.
    ema_step: usize,
    prodigy: ProdigyScalars,
}

impl AdamW {
    /// An optimizer over `vars`; parameters are named `param.<index>` in saved state.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        let names = (0..vars.len()).map(|i| format!("param.{i}")).collect();
        Self::new_named(vars, names, cfg)
    }

    /// An optimizer over `vars` whose saved state uses `names` (e.g. PEFT parameter names), so a
    /// checkpoint loaded into a differently built model reports the parameter that does not fit.
    pub fn new_named(vars: Vec<Var>, names: Vec<String>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        if vars.len() != names.len() {
            candle_core::bail!("AdamW: {} vars but {} names", vars.len(), names.len());
        }
        let params = vars
            .into_iter()
            .zip(names)
            .map(|(var, name)| {
                let mut slots = initial_slots(cfg.rule, &var)?;
                // EMAModel starts from a copy of the parameters.
                if cfg.ema_decay.is_some() {
                    slots.push(("ema", var.as_tensor().to_dtype(DType::F32)?.copy()?));
                }
                Ok(ParamState { name, var, slots, steps: 0 })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, cfg, step_count: 0, ema_step: 0, prodigy: ProdigyScalars::default() })
    }

    /// The hyperparameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Number of updates done so far (restored by [`AdamW::load`]).
    pub fn step_count(&self) -> usize {
        self.step_count
    }

    /// Prodigy's current step-size estimate `d` (`None` for the other rules).
    pub fn prodigy_d(&self) -> Option<f64> {
        matches!(self.cfg.rule, UpdateRule::Prodigy { .. }).then_some(self.prodigy.d)
    }

    /// One update with this lr; `grads[i]` belongs to `vars[i]` (same shape). The update is
    /// computed in f32 and written back in the parameter's own dtype.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
        self.step_some(&grads, lr)
    }

    /// Like [`AdamW::step`], where a parameter without a gradient (`None`) is left untouched,
    /// its moments and bias-correction count included, as torch skips parameters whose
    /// `.grad` is `None`.
    pub fn step_some(&mut self, grads: &[Option<&Tensor>], lr: f64) -> candle_core::Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!("AdamW::step: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        for (p, g) in self.params.iter().zip(grads) {
            if let Some(g) = g {
                if g.dims() != p.var.dims() {
                    candle_core::bail!(
                        "AdamW::step: gradient for {} has shape {:?}, parameter has {:?}",
                        p.name,
                        g.dims(),
                        p.var.dims()
                    );
                }
            }
        }
        self.step_count += 1;
        match self.cfg.rule {
            UpdateRule::Prodigy { d_coef, bias_correction, safeguard_warmup } => self.prodigy_step(grads, lr, d_coef, bias_correction, safeguard_warmup)?,
            UpdateRule::AdamW if self.cfg.fused && self.params.iter().all(|p| p.var.device().is_cpu()) => {
                adamw_fused_host(&mut self.params, grads, lr, &self.cfg)?;
            }
            rule => {
                for (p, g) in self.params.iter_mut().zip(grads) {
                    let Some(g) = g else { continue };
                    p.steps += 1;
                    let g = g.to_dtype(DType::F32)?;
                    let new_param = match rule {
                        UpdateRule::Lion => lion_step(p, &g, lr, &self.cfg)?,
                        UpdateRule::AdamW8bit => adamw8bit_step(p, &g, lr, &self.cfg)?,
                        UpdateRule::Adafactor { scale_parameter } => adafactor_step(p, &g, lr, self.cfg.weight_decay, scale_parameter)?,
                        _ => adamw_step(p, &g, lr, &self.cfg)?,
                    };
                    p.var.set(&new_param.to_dtype(p.var.dtype())?)?;
                }
            }
        }
        // EMAModel.step after the optimizer's: every parameter, the decay by the update count.
        if let Some(cap) = self.cfg.ema_decay {
            self.ema_step += 1;
            let decay = ema_decay(cap, self.ema_step);
            for p in &mut self.params {
                let ema = p.slot("ema").clone();
                let param = p.var.as_tensor().to_dtype(DType::F32)?;
                p.set_slot("ema", (&ema - ((&ema - &param)? * (1.0 - decay))?)?);
            }
        }
        Ok(())
    }

    /// Prodigy's update over all parameters together (its `d` is one estimate for the group).
    fn prodigy_step(&mut self, grads: &[Option<&Tensor>], lr: f64, d_coef: f64, bias_correction: bool, safeguard_warmup: bool) -> candle_core::Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        let beta3 = beta2.sqrt();
        let sc = &mut self.prodigy;
        let d = sc.d;
        let bc = if bias_correction { (1.0 - beta2.powi(sc.k as i32 + 1)).sqrt() / (1.0 - beta1.powi(sc.k as i32 + 1)) } else { 1.0 };
        let dlr = d * lr * bc;
        sc.d_numerator *= beta3;
        let (mut delta_numerator, mut d_denom) = (0f64, 0f64);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let param = p.var.as_tensor().to_dtype(DType::F32)?;
            let p0 = p.slot("p0").clone();
            let dot = (&g * (&p0 - &param)?)?.sum_all()?.to_scalar::<f32>()? as f64;
            delta_numerator += (d / PRODIGY_D0) * dlr * dot;
            let m = ((p.slot("exp_avg") * beta1)? + (&g * (d * (1.0 - beta1)))?)?;
            let v = ((p.slot("exp_avg_sq") * beta2)? + (g.sqr()? * (d * d * (1.0 - beta2)))?)?;
            let coef = if safeguard_warmup { (d / PRODIGY_D0) * d } else { (d / PRODIGY_D0) * dlr };
            let s = ((p.slot("s") * beta3)? + (&g * coef)?)?;
            d_denom += s.abs()?.sum_all()?.to_scalar::<f32>()? as f64;
            p.set_slot("exp_avg", m);
            p.set_slot("exp_avg_sq", v);
            p.set_slot("s", s);
        }
        // prodigyopt returns here, its moments updated but neither d nor the parameters.
        if d_denom == 0.0 {
            return Ok(());
        }
        sc.d_numerator += delta_numerator;
        let d_hat = d_coef * sc.d_numerator / d_denom;
        let mut d_now = d;
        if d_now == PRODIGY_D0 {
            d_now = d_now.max(d_hat);
        }
        sc.d_max = sc.d_max.max(d_hat);
        // growth_rate = inf: the running maximum.
        let d_new = sc.d_max.max(d_now);
        for (p, g) in self.params.iter_mut().zip(grads) {
            if g.is_none() {
                continue;
            }
            p.steps += 1;
            let mut param = p.var.as_tensor().to_dtype(DType::F32)?;
            let denom = p.slot("exp_avg_sq").sqrt()?.affine(1.0, d_new * eps)?;
            if weight_decay != 0.0 {
                param = (&param + (&param * (-weight_decay * dlr))?)?;
            }
            let new_param = (&param + (p.slot("exp_avg").div(&denom)? * -dlr)?)?;
            p.var.set(&new_param.to_dtype(p.var.dtype())?)?;
        }
        sc.k += 1;
        sc.d = d_new;
        Ok(())
    }

    /// Bytes of state the optimizer keeps besides the parameters: every buffer of the rule (f32,
    /// or a byte a value for 8-bit codes) and the moving average when there is one.
    pub fn state_bytes(&self) -> usize {
        self.params.iter().flat_map(|p| p.slots.iter()).map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// The moving average of every parameter by name (`None` without `ema_decay`).
    pub fn ema_weights(&self) -> Option<HashMap<String, Tensor>> {
        self.cfg.ema_decay?;
        Some(self.params.iter().map(|p| (p.name.clone(), p.slot("ema").clone())).collect())
    }

    /// Save the step count, hyperparameters and every buffer as safetensors
    /// (`<buffer>.<name>`, e.g. `exp_avg.<name>`), atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut buffers: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
        for p in &self.params {
            for (prefix, t) in &p.slots {
                let (dtype, bytes) = match t.dtype() {
                    DType::U8 => (safetensors::Dtype::U8, t.flatten_all()?.to_vec1::<u8>()?),
                    _ => (safetensors::Dtype::F32, t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
                };
                buffers.push((format!("{prefix}.{}", p.name), t.dims().to_vec(), dtype, bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, dtype, bytes)| Ok((name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let mut metadata = HashMap::from([
            ("optimizer".to_string(), self.cfg.rule.name().to_string()),
            ("step".to_string(), self.step_count.to_string()),
            ("beta1".to_string(), self.cfg.beta1.to_string()),
            ("beta2".to_string(), self.cfg.beta2.to_string()),
            ("eps".to_string(), self.cfg.eps.to_string()),
            ("weight_decay".to_string(), self.cfg.weight_decay.to_string()),
            ("ema_step".to_string(), self.ema_step.to_string()),
        ]);
        if let UpdateRule::Prodigy { .. } = self.cfg.rule {
            // Rust's shortest round-trip formatting: the f64s come back bit for bit.
            let sc = self.prodigy;
            metadata.insert("prodigy.d".into(), sc.d.to_string());
            metadata.insert("prodigy.d_max".into(), sc.d_max.to_string());
            metadata.insert("prodigy.d_numerator".into(), sc.d_numerator.to_string());
            metadata.insert("prodigy.k".into(), sc.k.to_string());
        }
        for p in &self.params {
            metadata.insert(format!("step.{}", p.name), p.steps.to_string());
        }
        let bytes = crate::util::safetensors_bytes::serialize(views, Some(metadata))
            .with_context(|| format!("serialising optimizer state for {}", path.display()))?;
        crate::util::fs::write_atomic(path, &bytes)
            .with_context(|| format!("writing optimizer state {}", path.display()))?;
        Ok(())
    }

    /// Restore the state written by [`AdamW::save`]. Every buffer must be present with its
    /// shape; errors name the file, the parameter and both shapes.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading optimizer state {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let step: usize = meta
            .get("step")
            .with_context(|| format!("{}: no `step` in the metadata", path.display()))?
            .parse()
            .with_context(|| format!("{}: `step` is not an integer", path.display()))?;
        let saved_rule = meta.get("optimizer").map_or("AdamW", String::as_str);
        if saved_rule != self.cfg.rule.name() {
            bail!("{}: the state is {saved_rule}'s, but this run's optimizer is {}", path.display(), self.cfg.rule.name());
        }
        let expected: std::collections::HashSet<String> =
            self.params.iter().flat_map(|p| p.slots.iter().map(|(prefix, _)| format!("{prefix}.{}", p.name)).collect::<Vec<_>>()).collect();
        let unexpected: Vec<&str> = st.names().into_iter().filter(|n| !expected.contains(*n)).collect();
        if !unexpected.is_empty() {
            bail!("{}: optimizer state for unknown parameters: {}", path.display(), unexpected.join(", "));
        }
        let mut restored: Vec<Vec<Tensor>> = Vec::with_capacity(self.params.len());
        let mut param_steps = Vec::with_capacity(self.params.len());
        for p in &self.params {
            // Files without per-parameter counts: every parameter took every step.
            let steps = match meta.get(&format!("step.{}", p.name)) {
                Some(v) => v.parse().with_context(|| format!("{}: `step.{}` is not an integer", path.display(), p.name))?,
                None => step,
            };
            param_steps.push(steps);
            let mut tensors = Vec::with_capacity(p.slots.len());
            for (prefix, current) in &p.slots {
                let key = format!("{prefix}.{}", p.name);
                let view = st.tensor(&key).map_err(|_| anyhow::anyhow!("{}: missing optimizer state `{key}`", path.display()))?;
                let want = if current.dtype() == DType::U8 { safetensors::Dtype::U8 } else { safetensors::Dtype::F32 };
                if view.dtype() != want {
                    bail!("{}: `{key}` is {:?}, expected {want:?}", path.display(), view.dtype());
                }
                if view.shape() != current.dims() {
                    bail!("{}: `{key}` has shape {:?} but the parameter's needs {:?}", path.display(), view.shape(), current.dims());
                }
                let t = if want == safetensors::Dtype::U8 {
                    Tensor::from_vec(view.data().to_vec(), view.shape(), p.var.device())?
                } else {
                    let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    Tensor::from_vec(values, view.shape(), p.var.device())?
                };
                tensors.push(t);
            }
            restored.push(tensors);
        }
        if let UpdateRule::Prodigy { .. } = self.cfg.rule {
            let get = |k: &str| -> anyhow::Result<f64> {
                meta.get(k).with_context(|| format!("{}: no `{k}` in the metadata", path.display()))?.parse().with_context(|| format!("{}: `{k}` is not a number", path.display()))
            };
            self.prodigy = ProdigyScalars { d: get("prodigy.d")?, d_max: get("prodigy.d_max")?, d_numerator: get("prodigy.d_numerator")?, k: get("prodigy.k")? as usize };
        }
        for ((p, tensors), steps) in self.params.iter_mut().zip(restored).zip(param_steps) {
            p.steps = steps;
            for (slot, t) in p.slots.iter_mut().zip(tensors) {
                slot.1 = t;
            }
        }
        self.step_count = step;
        self.ema_step = meta.get("ema_step").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(())
    }
}

/// torch's AdamW on one parameter: the new value (f32).
fn adamw_step(p: &mut ParamState, g: &Tensor, lr: f64, cfg: &AdamWConfig) -> candle_core::Result<Tensor> {
    let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = *cfg;
    let k = p.steps as i32;
    let bias_correction1 = 1.0 - beta1.powi(k);
    let bias_correction2_sqrt = (1.0 - beta2.powi(k)).sqrt();
    let step_size = lr / bias_correction1;
    let param = p.var.as_tensor().to_dtype(DType::F32)?.affine(1.0 - lr * weight_decay, 0.0)?;
    let m = ((p.slot("exp_avg") * beta1)? + (g * (1.0 - beta1))?)?;
    let v = ((p.slot("exp_avg_sq") * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let denom = v.sqrt()?.affine(1.0 / bias_correction2_sqrt, eps)?;
    let update = (m.div(&denom)? * step_size)?;
    p.set_slot("exp_avg", m);
    p.set_slot("exp_avg_sq", v);
    param - update
}

/// [`adamw_step`] for every parameter with a gradient in one pass: the parameters, gradients and
/// both moments gathered into one flat f32 buffer each, one elementwise loop over all of them
/// (each element with its parameter's bias corrections), scattered back. Every operation is the
/// tensor version's, in the same order and in f32 (`x·a + 0` where candle's `affine` adds a zero,
/// which also gives zeros the same sign), so the results are the same bits.
fn adamw_fused_host(params: &mut [ParamState], grads: &[Option<&Tensor>], lr: f64, cfg: &AdamWConfig) -> candle_core::Result<()> {
    let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = *cfg;
    struct Segment {
        index: usize,
        len: usize,
        step_size: f32,
        inv_bc2: f32,
    }
    let (mut p_all, mut g_all, mut m_all, mut v_all) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut segments = Vec::new();
    for (index, (p, g)) in params.iter_mut().zip(grads).enumerate() {
        let Some(g) = g else { continue };
        p.steps += 1;
        let k = p.steps as i32;
        let bias_correction1 = 1.0 - beta1.powi(k);
        let bias_correction2_sqrt = (1.0 - beta2.powi(k)).sqrt();
        let before = p_all.len();
        p_all.extend(p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        g_all.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        m_all.extend(p.slot("exp_avg").flatten_all()?.to_vec1::<f32>()?);
        v_all.extend(p.slot("exp_avg_sq").flatten_all()?.to_vec1::<f32>()?);
        segments.push(Segment { index, len: p_all.len() - before, step_size: (lr / bias_correction1) as f32, inv_bc2: (1.0 / bias_correction2_sqrt) as f32 });
    }
    let (b1, omb1, b2, omb2) = (beta1 as f32, (1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
    let (decay, eps) = ((1.0 - lr * weight_decay) as f32, eps as f32);
    let mut at = 0;
    for seg in &segments {
        let range = at..at + seg.len;
        for i in range.clone() {
            let g = g_all[i];
            let param = p_all[i] * decay + 0.0;
            let m = (m_all[i] * b1 + 0.0) + (g * omb1 + 0.0);
            let v = (v_all[i] * b2 + 0.0) + ((g * g) * omb2 + 0.0);
            let denom = v.sqrt() * seg.inv_bc2 + eps;
            let update = (m / denom) * seg.step_size + 0.0;
            m_all[i] = m;
            v_all[i] = v;
            p_all[i] = param - update;
        }
        let p = &mut params[seg.index];
        let (dims, device) = (p.var.dims().to_vec(), p.var.device().clone());
        p.set_slot("exp_avg", Tensor::from_slice(&m_all[range.clone()], dims.as_slice(), &device)?);
        p.set_slot("exp_avg_sq", Tensor::from_slice(&v_all[range.clone()], dims.as_slice(), &device)?);
        p.var.set(&Tensor::from_slice(&p_all[range], dims.as_slice(), &device)?.to_dtype(p.var.dtype())?)?;
        at += seg.len;
    }
    Ok(())
}

/// lion-pytorch's Lion on one parameter.
fn lion_step(p: &mut ParamState, g: &Tensor, lr: f64, cfg: &AdamWConfig) -> candle_core::Result<Tensor> {
    let param = p.var.as_tensor().to_dtype(DType::F32)?.affine(1.0 - lr * cfg.weight_decay, 0.0)?;
    let m = p.slot("exp_avg").clone();
    let update = ((&m * cfg.beta1)? + (g * (1.0 - cfg.beta1))?)?.sign()?;
    p.set_slot("exp_avg", ((&m * cfg.beta2)? + (g * (1.0 - cfg.beta2))?)?);
    param - (update * lr)?
}

/// bitsandbytes' 8-bit blockwise AdamW on one parameter (on the host: dequantize, update,
/// requantize).
fn adamw8bit_step(p: &mut ParamState, g: &Tensor, lr: f64, cfg: &AdamWConfig) -> candle_core::Result<Tensor> {
    use super::quant8::{dequantize, quantize, BLOCK};
    thread_local! {
        static MAPS: (Vec<f32>, Vec<f32>) = (super::quant8::dynamic_map(true), super::quant8::dynamic_map(false));
    }
    let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = *cfg;
    let device = p.var.device().clone();
    let dims = p.var.dims().to_vec();
    let g = g.flatten_all()?.to_vec1::<f32>()?;
    let mut param = p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = param.len();
    let mut codes1 = p.slot("exp_avg_q").to_vec1::<u8>()?;
    let mut codes2 = p.slot("exp_avg_sq_q").to_vec1::<u8>()?;
    let mut absmax1 = p.slot("exp_avg_absmax").to_vec1::<f32>()?;
    let mut absmax2 = p.slot("exp_avg_sq_absmax").to_vec1::<f32>()?;
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    MAPS.with(|(signed, unsigned)| {
        dequantize(signed, &codes1, BLOCK, &absmax1, &mut m);
        dequantize(unsigned, &codes2, BLOCK, &absmax2, &mut v);
        // bnb's kernel works in f32 throughout, its bias corrections included.
        let k = p.steps as i32;
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let c1 = 1.0 - b1.powi(k);
        let c2 = (1.0 - b2.powi(k)).sqrt();
        let step_size = -(lr as f32) * c2 / c1;
        let eps_c2 = c2 * eps as f32;
        let decay = 1.0 - lr as f32 * weight_decay as f32;
        for i in 0..n {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            param[i] += step_size * (m[i] / (v[i].sqrt() + eps_c2));
            param[i] *= decay;
        }
        quantize(signed, &m, BLOCK, &mut codes1, &mut absmax1, true);
        quantize(unsigned, &v, BLOCK, &mut codes2, &mut absmax2, false);
    });
    let nb = absmax1.len();
    p.set_slot("exp_avg_q", Tensor::from_vec(codes1, n, &device)?);
    p.set_slot("exp_avg_sq_q", Tensor::from_vec(codes2, n, &device)?);
    p.set_slot("exp_avg_absmax", Tensor::from_vec(absmax1, nb, &device)?);
    p.set_slot("exp_avg_sq_absmax", Tensor::from_vec(absmax2, nb, &device)?);
    Tensor::from_vec(param, dims, &device)
}

/// transformers' Adafactor (`relative_step = False`, `warmup_init = False`, no first moment)
/// on one parameter.
fn adafactor_step(p: &mut ParamState, g: &Tensor, lr: f64, weight_decay: f64, scale_parameter: bool) -> candle_core::Result<Tensor> {
    use candle_core::D;
    const EPS1: f64 = 1e-30;
    const EPS2: f64 = 1e-3;
    const CLIP_THRESHOLD: f64 = 1.0;
    const DECAY_RATE: f64 = -0.8;
    let rms = |t: &Tensor| -> candle_core::Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64 / (t.elem_count() as f64).sqrt()) };
    let mut param = p.var.as_tensor().to_dtype(DType::F32)?;
    let lr = if scale_parameter { EPS2.max(rms(&param)?) * lr } else { lr };
    let beta2t = 1.0 - (p.steps as f64).powf(DECAY_RATE);
    let u = g.sqr()?.affine(1.0, EPS1)?;
    let update = if p.dims_factored() {
        let row = ((p.slot("exp_avg_sq_row") * beta2t)? + (u.mean(D::Minus1)? * (1.0 - beta2t))?)?;
        let col = ((p.slot("exp_avg_sq_col") * beta2t)? + (u.mean(D::Minus2)? * (1.0 - beta2t))?)?;
        let r = row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
        let c = col.sqrt()?.recip()?.unsqueeze(col.rank() - 1)?;
        p.set_slot("exp_avg_sq_row", row);
        p.set_slot("exp_avg_sq_col", col);
        r.broadcast_mul(&c)?.mul(g)?
    } else {
        let v = ((p.slot("exp_avg_sq") * beta2t)? + (u * (1.0 - beta2t))?)?;
        let update = v.sqrt()?.recip()?.mul(g)?;
        p.set_slot("exp_avg_sq", v);
        update
    };
    let update = (update.affine(1.0 / (rms(&update)? / CLIP_THRESHOLD).max(1.0), 0.0)? * lr)?;
    if weight_decay != 0.0 {
        param = (&param + (&param * (-weight_decay * lr))?)?;
    }
    param - update
}

impl ParamState {
    /// Whether Adafactor keeps this parameter's second moment factored.
    fn dims_factored(&self) -> bool {
        self.var.rank() >= 2
    }
}

/// `torch.nn.utils.clip_grad_norm_` (L2, `error_if_nonfinite=False`): returns the total norm of
/// all gradients before clipping and scales every gradient by `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let total_norm = global_grad_norm(grads)?;
    let clip_coef = (max_norm / (total_norm + 1e-6)).min(1.0);
    // torch multiplies even when the coefficient is clamped to 1; that is a no-op, skip it.
    if clip_coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(clip_coef, 0.0)?;
        }
    }
    Ok(total_norm)
}

/// The L2 norm of all gradients together (each gradient's squared sum accumulated in f64).
pub fn global_grad_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut sum_sq = 0f64;
    for g in grads {
        let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        sum_sq += s as f64;
    }
    Ok(sum_sq.sqrt())
}
