//! The training noise schedule (betas and cumulative alphas), computed exactly as diffusers does
//! it with torch on CPU, so `alphas_cumprod` matches the reference bit for bit:
//! `torch.linspace` in f32 (each element one fused multiply-add from the nearer end),
//! `betas`, `1 - betas` in f32, and `torch.cumprod`, which accumulates f32 inputs in f64.

use super::SchedulerConfig;

/// `torch.linspace(start, end, n, dtype=float32)` on CPU, bit for bit: the step is computed in
/// f32, the first half counts up from `start` and the second half down from `end`, each element
/// a single fused multiply-add (how torch's kernel compiles on x86-64 with FMA).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of an f32 vector on CPU: the running product is kept in f64 and each output
/// rounded to f32.
pub(crate) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`), computed in
/// f64 and cast to f32 like `torch.tensor(betas, dtype=float32)`.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`: shift and scale sqrt(alpha_bar) so the last timestep
/// has zero SNR, then recover betas; all in f32 like torch.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("non-empty betas");
    let scale = first / (first - last);
    for s in sqrt_bar.iter_mut() {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The betas of a scheduler config (`trained_betas`, else `beta_schedule`), f32 like diffusers.
pub(crate) fn betas(cfg: &SchedulerConfig) -> anyhow::Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if n == 0 {
        anyhow::bail!("scheduler config: `num_train_timesteps` must be at least 1");
    }
    let betas = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            anyhow::bail!(
                "scheduler config: `trained_betas` has {} values but `num_train_timesteps` is {n}",
                trained.len()
            );
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            "scaled_linear" => torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => cosine_betas(n),
            other => anyhow::bail!(
                "scheduler config: `beta_schedule` \"{other}\" is not supported (expected linear, scaled_linear or squaredcos_cap_v2)"
            ),
        }
    };
    if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(b.is_finite() && **b >= 0.0 && **b < 1.0)) {
        anyhow::bail!("scheduler config: beta[{i}] = {b} is outside [0, 1)");
    }
    Ok(if cfg.rescale_betas_zero_snr == Some(true) { rescale_zero_terminal_snr(&betas) } else { betas })
}

/// `alphas_cumprod = cumprod(1 - betas)` (f32, torch's CPU cumprod).
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> anyhow::Result<Vec<f32>> {
    let alphas: Vec<f32> = betas(cfg)?.iter().map(|b| 1.0 - b).collect();
    Ok(torch_cumprod_f32(&alphas))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends_exactly() {
        let v = torch_linspace_f32(0.1, 0.7, 11);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[10], 0.7f32);
        assert!((v[5] - 0.4).abs() < 1e-7, "midpoint {}", v[5]);
        assert_eq!(torch_linspace_f32(0.3, 0.9, 1), vec![0.3f32]);
    }

    #[test]
    fn unknown_schedule_and_bad_trained_betas_are_named() {
        let cfg = SchedulerConfig { beta_schedule: "sigmoid2".into(), ..Default::default() };
        let err = betas(&cfg).unwrap_err().to_string();
        assert!(err.contains("beta_schedule") && err.contains("sigmoid2"), "{err}");
        let cfg = SchedulerConfig { trained_betas: Some(vec![0.1; 3]), ..Default::default() };
        let err = betas(&cfg).unwrap_err().to_string();
        assert!(err.contains("trained_betas"), "{err}");
    }

    #[test]
    fn trained_betas_override_the_schedule() {
        // Tolerance: exact (cumprod of three f32 values in f64, rounded once each).
        let cfg = SchedulerConfig {
            num_train_timesteps: 3,
            beta_schedule: "nonsense-is-ignored".into(),
            trained_betas: Some(vec![0.1, 0.2, 0.5]),
            ..Default::default()
        };
        let ac = alphas_cumprod(&cfg).unwrap();
        let a: Vec<f64> = [0.1f32, 0.2, 0.5].iter().map(|b| (1.0 - b) as f64).collect();
        assert_eq!(ac, vec![a[0] as f32, (a[0] * a[1]) as f32, (a[0] * a[1] * a[2]) as f32]);
    }

    #[test]
    fn cosine_schedule_is_capped_and_increasing() {
        let cfg = SchedulerConfig { beta_schedule: "squaredcos_cap_v2".into(), ..Default::default() };
        let b = betas(&cfg).unwrap();
        assert_eq!(b.len(), 1000);
        assert!(b.windows(2).all(|w| w[0] <= w[1]), "cosine betas must not decrease");
        assert_eq!(*b.last().unwrap(), 0.999f32, "the last beta is capped at 0.999");
    }

    #[test]
    fn zero_snr_rescale_ends_at_alpha_bar_zero() {
        let cfg = SchedulerConfig { rescale_betas_zero_snr: Some(true), ..SchedulerConfig::sd15() };
        let ac = alphas_cumprod(&cfg).unwrap();
        assert_eq!(*ac.last().unwrap(), 0.0, "terminal alpha_bar must be exactly 0");
        let plain = alphas_cumprod(&SchedulerConfig::sd15()).unwrap();
        // The first alpha_bar is kept (up to f32 rounding, tolerance 1e-6 relative).
        assert!((ac[0] - plain[0]).abs() <= 1e-6 * plain[0], "{} vs {}", ac[0], plain[0]);
    }
}
