//! The held-out split (`validation.loss_split`): a seeded choice of examples kept out of
//! training, on which the loss is measured with fixed noise.

use super::rng::{rng_for, Stream};
use super::source::Dataset;
use rand::seq::SliceRandom;

/// Split `dataset` into (training, held-out): `ceil(fraction · n)` examples held out, at least one,
/// leaving at least one to train on; chosen by a seeded shuffle, each part in dataset order.
pub fn split(dataset: &Dataset, fraction: f64, seed: u64) -> anyhow::Result<(Dataset, Dataset)> {
    let n = dataset.len();
    anyhow::ensure!(fraction > 0.0 && fraction < 1.0, "validation.loss_split = {fraction} must be in (0, 1)");
    anyhow::ensure!(n >= 2, "validation.loss_split needs at least 2 examples, the dataset has {n}");
    let held = ((fraction * n as f64).ceil() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, Stream::HoldOut, 0, 0));
    let mut out: Vec<bool> = vec![false; n];
    for &i in &order[..held] {
        out[i] = true;
    }
    let part = |keep: bool, what: &str| Dataset {
        examples: dataset.examples.iter().zip(&out).filter(|(_, &o)| o == keep).map(|(e, _)| e.clone()).collect(),
        description: format!("{} ({what})", dataset.description),
        groups: dataset.groups.clone(),
    };
    Ok((part(false, "training part"), part(true, &format!("{held} held out"))))
}
