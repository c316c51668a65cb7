//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction, f32 state), Lion
//! as `lion-pytorch` (kohya's `--optimizer_type Lion`), global-norm gradient clipping as
//! `torch.nn.utils.clip_grad_norm_`, and the optimizer state's safetensors checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateRule {
    /// torch's AdamW.
    #[default]
    AdamW,
    /// Lion (Chen et al. 2023) as `lion-pytorch`: `p ← p·(1 − lr·wd)`,
    /// `p ← p − lr·sign(β1·m + (1−β1)·g)`, then `m ← β2·m + (1−β2)·g`; one moment, no eps.
    Lion,
}

impl UpdateRule {
    /// The name saved in the state file.
    fn name(self) -> &'static str {
        match self {
            UpdateRule::AdamW => "AdamW",
            UpdateRule::Lion => "Lion",
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
}

impl Default for AdamWConfig {
    /// The reference script's defaults: AdamW, betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, rule: UpdateRule::AdamW, ema_decay: None }
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

/// One trainable parameter with its first and second moment estimates (always f32).
struct ParamState {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates this parameter received (torch keeps one `step` per parameter).
    steps: usize,
    /// The moving average (`AdamWConfig::ema_decay`), f32.
    ema: Option<Tensor>,
}

/// torch's AdamW (amsgrad off, maximize off) over candle `Var`s.
///
/// For update number k (1-based), with gradient g:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − lr/(1−β1^k) · m / (√v/√(1−β2^k) + eps)`.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    step_count: usize,
    /// EMAModel's `optimization_step`: updates the average took.
    ema_step: usize,
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
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                // Lion keeps one moment: no second buffer.
                let exp_avg_sq = match cfg.rule {
                    UpdateRule::AdamW => zeros.clone(),
                    UpdateRule::Lion => Tensor::zeros(0, DType::F32, var.device())?,
                };
                // EMAModel starts from a copy of the parameters.
                let ema = match cfg.ema_decay {
                    Some(_) => Some(var.as_tensor().to_dtype(DType::F32)?.copy()?),
                    None => None,
                };
                Ok(ParamState { name, exp_avg: zeros, exp_avg_sq, var, steps: 0, ema })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, cfg, step_count: 0, ema_step: 0 })
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
        let AdamWConfig { beta1, beta2, eps, weight_decay, rule, .. } = self.cfg;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            p.steps += 1;
            if rule == UpdateRule::Lion {
                let g = g.to_dtype(DType::F32)?;
                let param = p.var.as_tensor().to_dtype(DType::F32)?.affine(1.0 - lr * weight_decay, 0.0)?;
                let update = ((&p.exp_avg * beta1)? + (&g * (1.0 - beta1))?)?.sign()?;
                let new_param = (param - (update * lr)?)?.to_dtype(p.var.dtype())?;
                p.var.set(&new_param)?;
                p.exp_avg = ((&p.exp_avg * beta2)? + (&g * (1.0 - beta2))?)?;
                continue;
            }
            let k = p.steps as i32;
            let bias_correction1 = 1.0 - beta1.powi(k);
            let bias_correction2_sqrt = (1.0 - beta2.powi(k)).sqrt();
            let step_size = lr / bias_correction1;
            let g = g.to_dtype(DType::F32)?;
            let param = p.var.as_tensor().to_dtype(DType::F32)?;
            let param = param.affine(1.0 - lr * weight_decay, 0.0)?;
            p.exp_avg = ((&p.exp_avg * beta1)? + (&g * (1.0 - beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = p.exp_avg_sq.sqrt()?.affine(1.0 / bias_correction2_sqrt, eps)?;
            let update = (p.exp_avg.div(&denom)? * step_size)?;
            let new_param = (param - update)?.to_dtype(p.var.dtype())?;
            p.var.set(&new_param)?;
        }
        // EMAModel.step after the optimizer's: every parameter, the decay by the update count.
        if let Some(cap) = self.cfg.ema_decay {
            self.ema_step += 1;
            let decay = ema_decay(cap, self.ema_step);
            for p in &mut self.params {
                if let Some(ema) = &p.ema {
                    let param = p.var.as_tensor().to_dtype(DType::F32)?;
                    p.ema = Some((ema - ((ema - &param)? * (1.0 - decay))?)?);
                }
            }
        }
        Ok(())
    }

    /// Bytes of state the optimizer keeps besides the parameters: AdamW's two moments, Lion's one,
    /// and the moving average when there is one (all f32).
    pub fn state_bytes(&self) -> usize {
        self.params.iter().map(|p| self.moments(p).iter().map(|(_, t)| t.elem_count() * 4).sum::<usize>()).sum()
    }

    /// The moving average of every parameter by name (`None` without `ema_decay`).
    pub fn ema_weights(&self) -> Option<HashMap<String, Tensor>> {
        self.cfg.ema_decay?;
        Some(self.params.iter().filter_map(|p| p.ema.clone().map(|e| (p.name.clone(), e))).collect())
    }

    /// The moments a parameter keeps under this rule, by the name they are saved under: AdamW's
    /// two, Lion's one.
    fn moments<'p>(&self, p: &'p ParamState) -> Vec<(&'static str, &'p Tensor)> {
        let mut m = match self.cfg.rule {
            UpdateRule::AdamW => vec![("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)],
            UpdateRule::Lion => vec![("exp_avg", &p.exp_avg)],
        };
        // The moving average travels with the optimizer's state (a checkpoint resumes it).
        if let Some(e) = &p.ema {
            m.push(("ema", e));
        }
        m
    }

    /// Save the step count, hyperparameters and moments as safetensors (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`), atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for p in &self.params {
            for (prefix, t) in self.moments(p) {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                buffers.push((format!("{prefix}.{}", p.name), t.dims().to_vec(), bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, bytes)| {
                Ok((name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?))
            })
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
        for p in &self.params {
            metadata.insert(format!("step.{}", p.name), p.steps.to_string());
        }
        let bytes = safetensors::serialize(views, Some(metadata))
            .with_context(|| format!("serialising optimizer state for {}", path.display()))?;
        crate::util::fs::write_atomic(path, &bytes)
            .with_context(|| format!("writing optimizer state {}", path.display()))?;
        Ok(())
    }

    /// Restore the state written by [`AdamW::save`]. Every parameter must be present with its
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
        let expected: std::collections::HashSet<String> = self
            .params
            .iter()
            .flat_map(|p| self.moments(p).into_iter().map(|(prefix, _)| format!("{prefix}.{}", p.name)).collect::<Vec<_>>())
            .collect();
        let unexpected: Vec<&str> = st.names().into_iter().filter(|n| !expected.contains(*n)).collect();
        if !unexpected.is_empty() {
            bail!("{}: optimizer state for unknown parameters: {}", path.display(), unexpected.join(", "));
        }
        let mut restored = Vec::with_capacity(self.params.len());
        let mut param_steps = Vec::with_capacity(self.params.len());
        for p in &self.params {
            // Files without per-parameter counts: every parameter took every step.
            let steps = match meta.get(&format!("step.{}", p.name)) {
                Some(v) => v.parse().with_context(|| format!("{}: `step.{}` is not an integer", path.display(), p.name))?,
                None => step,
            };
            param_steps.push(steps);
            let mut pair = Vec::with_capacity(2);
            let prefixes: Vec<&str> = self.moments(p).into_iter().map(|(prefix, _)| prefix).collect();
            for prefix in prefixes {
                let key = format!("{prefix}.{}", p.name);
                let view = st.tensor(&key).map_err(|_| {
                    anyhow::anyhow!("{}: missing optimizer state `{key}`", path.display())
                })?;
                if view.dtype() != safetensors::Dtype::F32 {
                    bail!("{}: `{key}` is {:?}, expected F32", path.display(), view.dtype());
                }
                if view.shape() != p.var.dims() {
                    bail!(
                        "{}: `{key}` has shape {:?} but the parameter has shape {:?}",
                        path.display(),
                        view.shape(),
                        p.var.dims()
                    );
                }
                let values: Vec<f32> =
                    view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                pair.push(Tensor::from_vec(values, view.shape(), p.var.device())?);
            }
            restored.push(pair);
        }
        for ((p, mut pair), steps) in self.params.iter_mut().zip(restored).zip(param_steps) {
            p.steps = steps;
            let prefixes: Vec<&str> = match (self.cfg.rule, p.ema.is_some()) {
                (UpdateRule::AdamW, ema) => ["exp_avg", "exp_avg_sq"].into_iter().chain(ema.then_some("ema")).collect(),
                (UpdateRule::Lion, ema) => ["exp_avg"].into_iter().chain(ema.then_some("ema")).collect(),
            };
            for (prefix, t) in prefixes.into_iter().zip(pair.drain(..)) {
                match prefix {
                    "exp_avg" => p.exp_avg = t,
                    "exp_avg_sq" => p.exp_avg_sq = t,
                    _ => p.ema = Some(t),
                }
            }
        }
        self.step_count = step;
        self.ema_step = meta.get("ema_step").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(())
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
