//! Aspect-ratio buckets as kohya sd-scripts makes them (`library/model_util.py`
//! `make_bucket_resolutions`, `library/train_util.py` `BucketManager.select_bucket` and
//! `make_buckets` / `shuffle_buckets`): sizes of about `resolution²` pixels in steps of
//! `step`, each image resized to cover its bucket and cropped to it, every batch from one bucket.

use rand::seq::SliceRandom;

use super::rng::{rng_for, Stream};

/// kohya's `--min_bucket_reso`, `--max_bucket_reso`, `--bucket_reso_steps`, `--bucket_no_upscale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketOptions {
    pub min_reso: u32,
    pub max_reso: u32,
    pub step: u32,
    /// Never enlarge an image: its bucket is its own size (shrunk to `resolution²` pixels when
    /// larger) rounded down to `step`.
    pub no_upscale: bool,
}

impl Default for BucketOptions {
    /// kohya's defaults.
    fn default() -> Self {
        Self { min_reso: 256, max_reso: 1024, step: 64, no_upscale: false }
    }
}

/// kohya's `make_bucket_resolutions((resolution, resolution), min, max, step)`: the square of
/// `resolution` rounded down to `step`, and for every width from `min` to `max` in steps, the
/// largest height (a multiple of `step`, at most `max`) whose area stays within `resolution²`,
/// both ways round; sorted by (width, height). Sizes are (width, height).
pub fn bucket_resolutions(resolution: u32, o: &BucketOptions) -> Vec<(u32, u32)> {
    let max_area = resolution as u64 * resolution as u64;
    let step = o.step.max(1) as u64;
    let mut resos = std::collections::BTreeSet::new();
    let side = ((max_area as f64).sqrt() as u64 / step * step) as u32;
    resos.insert((side, side));
    let mut width = o.min_reso as u64;
    while width <= o.max_reso as u64 {
        let height = (o.max_reso as u64).min(max_area / width / step * step);
        if height >= o.min_reso as u64 {
            resos.insert((width as u32, height as u32));
            resos.insert((height as u32, width as u32));
        }
        width += step;
    }
    resos.into_iter().collect()
}

/// Where one image goes: its bucket (width, height), the size it is resized to before the crop
/// (covering the bucket) and the bucket's aspect-ratio error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
    pub ar_error: f64,
}

/// kohya's `select_bucket` for an image of `width` x `height`: without `no_upscale`, the
/// predefined size of the nearest aspect ratio (the first on a tie; the image's own size when it
/// is one), the image scaled by `int(x · scale + 0.5)` so that it covers it; with `no_upscale`,
/// the image (shrunk to `resolution²` pixels if larger) rounded down to `step`.
pub fn select_bucket(width: u32, height: u32, resos: &[(u32, u32)], resolution: u32, o: &BucketOptions) -> Assignment {
    let (w, h) = (width as f64, height as f64);
    let aspect = w / h;
    let round_half = |x: f64| (x + 0.5) as u32;
    let (bucket, resized) = if !o.no_upscale {
        let bucket = if resos.contains(&(width, height)) {
            (width, height)
        } else {
            let mut best = 0;
            let mut best_err = f64::INFINITY;
            for (i, &(bw, bh)) in resos.iter().enumerate() {
                let err = (bw as f64 / bh as f64 - aspect).abs();
                if err < best_err {
                    best = i;
                    best_err = err;
                }
            }
            resos[best]
        };
        let bucket_ar = bucket.0 as f64 / bucket.1 as f64;
        let scale = if aspect > bucket_ar { bucket.1 as f64 / h } else { bucket.0 as f64 / w };
        (bucket, (round_half(w * scale), round_half(h * scale)))
    } else {
        let max_area = resolution as f64 * resolution as f64;
        let step = o.step.max(1);
        let resized = if w * h > max_area {
            let rw = (max_area * aspect).sqrt();
            let rh = max_area / rw;
            let to_steps = |x: f64| {
                let x = round_half(x);
                x - x % step
            };
            let bw = to_steps(rw);
            let bh_of_w = to_steps(bw as f64 / aspect);
            let bh = to_steps(rh);
            let bw_of_h = to_steps(bh as f64 * aspect);
            if (bw as f64 / bh_of_w as f64 - aspect).abs() < (bw_of_h as f64 / bh as f64 - aspect).abs() {
                (bw, round_half(bw as f64 / aspect))
            } else {
                (round_half(bh as f64 * aspect), bh)
            }
        } else {
            (width, height)
        };
        ((resized.0 - resized.0 % step, resized.1 - resized.1 % step), resized)
    };
    Assignment { bucket, resized, ar_error: bucket.0 as f64 / bucket.1 as f64 - aspect }
}

/// A dataset's bucket layout: the used bucket sizes (sorted) and each example's bucket and
/// resize.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// The buckets that hold at least one example, sorted by (width, height).
    pub sizes: Vec<(u32, u32)>,
    /// Each example's index into `sizes`.
    pub of_example: Vec<usize>,
    /// Each example's size before the crop.
    pub resized: Vec<(u32, u32)>,
    /// Mean |aspect-ratio error| over the examples (kohya's `mean_img_ar_error`).
    pub mean_ar_error: f64,
}

impl Buckets {
    /// Assign every example (of the given (width, height)) to its bucket.
    pub fn assign(image_sizes: &[(u32, u32)], resolution: u32, o: &BucketOptions) -> Self {
        let resos = if o.no_upscale { Vec::new() } else { bucket_resolutions(resolution, o) };
        let picks: Vec<Assignment> = image_sizes.iter().map(|&(w, h)| select_bucket(w, h, &resos, resolution, o)).collect();
        let mut sizes: Vec<(u32, u32)> = picks.iter().map(|a| a.bucket).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let of_example = picks.iter().map(|a| sizes.binary_search(&a.bucket).expect("a bucket of the list")).collect();
        let mean_ar_error = if picks.is_empty() { 0.0 } else { picks.iter().map(|a| a.ar_error.abs()).sum::<f64>() / picks.len() as f64 };
        Self { sizes, of_example, resized: picks.iter().map(|a| a.resized).collect(), mean_ar_error }
    }

    /// Examples per bucket, in `sizes` order.
    pub fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.sizes.len()];
        for &b in &self.of_example {
            counts[b] += 1;
        }
        counts
    }

    /// Batches per epoch: each bucket's `ceil(count / batch_size)`, summed.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.counts().iter().map(|c| c.div_ceil(batch_size.max(1))).sum()
    }

    /// The batches of epoch `epoch`, as kohya's `shuffle_buckets`: the examples of each bucket
    /// shuffled, cut into batches (the last may be short), and the batches of all buckets
    /// shuffled together; every draw seeded by (seed, epoch). Without `shuffle`, buckets in size
    /// order and examples in dataset order.
    pub fn epoch_batches(&self, seed: u64, epoch: usize, batch_size: usize, shuffle: bool) -> Vec<Vec<usize>> {
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); self.sizes.len()];
        for (i, &b) in self.of_example.iter().enumerate() {
            members[b].push(i);
        }
        let mut batches = Vec::new();
        for (b, mut list) in members.into_iter().enumerate() {
            if shuffle {
                list.shuffle(&mut rng_for(seed, Stream::Bucket, epoch as u64, b as u64));
            }
            batches.extend(list.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
        }
        if shuffle {
            batches.shuffle(&mut rng_for(seed, Stream::Order, epoch as u64, 0));
        }
        batches
    }

    /// kohya's `ss_bucket_info`: `{"buckets": {"0": {"resolution": [w, h], "count": n}, ...},
    /// "mean_img_ar_error": e}`.
    pub fn kohya_info(&self) -> serde_json::Value {
        let buckets: serde_json::Map<String, serde_json::Value> = self
            .sizes
            .iter()
            .zip(self.counts())
            .enumerate()
            .map(|(i, (&(w, h), n))| (i.to_string(), serde_json::json!({"resolution": [w, h], "count": n})))
            .collect();
        serde_json::json!({"buckets": buckets, "mean_img_ar_error": self.mean_ar_error})
    }

    /// One line per bucket for `plan` and the log: `  640x384: 3 images`.
    pub fn layout_lines(&self) -> Vec<String> {
        self.sizes.iter().zip(self.counts()).map(|(&(w, h), n)| format!("{w}x{h}: {n} image{}", if n == 1 { "" } else { "s" })).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_default_buckets_at_512() {
        // kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: widths 256..1024
        // with height min(1024, floor(262144 / w / 64) · 64).
        let r = bucket_resolutions(512, &BucketOptions::default());
        for size in [(512, 512), (256, 1024), (1024, 256), (320, 768), (384, 640), (448, 576), (576, 448), (640, 384), (768, 320)] {
            assert!(r.contains(&size), "{size:?} missing from {r:?}");
        }
        assert!(r.iter().all(|&(w, h)| w as u64 * h as u64 <= 512 * 512 && w % 64 == 0 && h % 64 == 0));
    }
}
