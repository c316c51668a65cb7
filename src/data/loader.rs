//! Batches for training: a seeded shuffled order per epoch (`drop_last = false`), each example
//! decoded and preprocessed in parallel (rayon) by a background thread that stays a few batches
//! ahead of the consumer. Every random draw derives from (seed, epoch, example), so the batches
//! are the same whatever the thread timing.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::seq::{IndexedRandom, SliceRandom};
use rayon::prelude::*;

use super::bucket::{BucketOptions, Buckets};
use super::caption::CaptionOptions;
use super::decode::{decode_example, image_size, DecodeOptions};
use super::rng::{rng_for, Stream};
use super::source::{Caption, Dataset};
use super::transform::{preprocess_to, Geometry, PreprocessOptions, Target};

/// How batches are made.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Seed of the order and of every augmentation and caption draw.
    pub seed: u64,
    /// Shuffle each epoch (the reference does); off keeps dataset order.
    pub shuffle: bool,
    /// Batches prepared ahead of the consumer (at least 1).
    pub prefetch_batches: usize,
    pub preprocess: PreprocessOptions,
    pub decode: DecodeOptions,
    /// Caption dropout and tag shuffling (off: captions as the dataset has them).
    pub captions: CaptionOptions,
    /// Aspect-ratio buckets around `preprocess.resolution` (off: every image cropped square).
    pub buckets: Option<BucketOptions>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            batch_size: 1,
            seed: 0,
            shuffle: true,
            prefetch_batches: 2,
            preprocess: PreprocessOptions::default(),
            decode: DecodeOptions::default(),
            captions: CaptionOptions::default(),
            buckets: None,
        }
    }
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, 3, H, W]` f32 in [-1, 1], on the CPU: `R`² without buckets, the batch's bucket with.
    pub pixel_values: Tensor,
    /// The caption drawn for each example.
    pub captions: Vec<String>,
    /// Each example's index in the dataset.
    pub indices: Vec<usize>,
    /// Each example's original size and crop offset (SDXL's time ids).
    pub geometry: Vec<Geometry>,
}

struct Inner {
    dataset: Arc<Dataset>,
    opts: LoaderOptions,
    /// The bucket layout, when `opts.buckets` is set.
    buckets: Option<Buckets>,
}

/// Seeded, prefetching batches over a dataset.
#[derive(Clone)]
pub struct DataLoader {
    inner: Arc<Inner>,
}

impl DataLoader {
    /// A loader over `dataset`; errors on an empty dataset or a zero batch size / resolution.
    pub fn new(dataset: Arc<Dataset>, opts: LoaderOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(!dataset.is_empty(), "dataset {} has no examples", dataset.description);
        anyhow::ensure!(opts.batch_size > 0, "batch size must be at least 1");
        anyhow::ensure!(opts.preprocess.resolution > 0, "resolution must be positive");
        let buckets = match &opts.buckets {
            Some(b) => {
                // Each image's size from its header (the dataset stage has screened them).
                let sizes = dataset
                    .examples
                    .par_iter()
                    .map(|e| image_size(e, &opts.decode).map_err(anyhow::Error::from))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Some(Buckets::assign(&sizes, opts.preprocess.resolution, b))
            }
            None => None,
        };
        Ok(Self { inner: Arc::new(Inner { dataset, opts, buckets }) })
    }

    /// The bucket layout (`None` without buckets).
    pub fn buckets(&self) -> Option<&Buckets> {
        self.inner.buckets.as_ref()
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.inner.dataset
    }

    /// `len(dataloader)`: `ceil(examples / batch_size)` (the last batch may be short); with
    /// buckets, that of each bucket, summed.
    pub fn batches_per_epoch(&self) -> usize {
        match &self.inner.buckets {
            Some(b) => b.batches_per_epoch(self.inner.opts.batch_size),
            None => self.inner.dataset.len().div_ceil(self.inner.opts.batch_size),
        }
    }

    /// The batches (dataset indices) of epoch `epoch`, in order.
    pub(crate) fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let o = &self.inner.opts;
        match &self.inner.buckets {
            Some(b) => b.epoch_batches(o.seed, epoch, o.batch_size, o.shuffle),
            None => self.epoch_order(epoch).chunks(o.batch_size).map(<[usize]>::to_vec).collect(),
        }
    }

    /// The dataset indices in the order epoch `epoch` visits them.
    pub(crate) fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.inner.dataset.len()).collect();
        if self.inner.opts.shuffle {
            order.shuffle(&mut rng_for(self.inner.opts.seed, Stream::Order, epoch as u64, 0));
        }
        order
    }

    /// Decode and preprocess example `index` as epoch `epoch` sees it: CHW pixels and caption.
    pub fn load_example(&self, epoch: usize, index: usize) -> anyhow::Result<(Vec<f32>, String)> {
        self.inner.load_example(epoch, index).map(|(pixels, caption, _)| (pixels, caption))
    }

    /// Example `index`'s pixels `[1, 3, H, W]` with the flip fixed, as the loader makes them under
    /// a center crop (which draws nothing): what the encode stage caches.
    pub(crate) fn fixed_pixels(&self, index: usize, image: &image::RgbImage, flip: bool) -> anyhow::Result<Tensor> {
        let pre = PreprocessOptions { flip_p: if flip { 1.0 } else { 0.0 }, ..self.inner.opts.preprocess };
        let target = self.inner.target(index, image);
        let (pixels, _) = preprocess_to(image, &target, &pre, &mut rng_for(0, Stream::Augment, 0, 0))?;
        let (w, h) = target.crop;
        Ok(Tensor::from_vec(pixels, (1, 3, h as usize, w as usize), &Device::Cpu)?)
    }

    /// Make the batch of these dataset indices for epoch `epoch` (examples in parallel).
    pub(crate) fn load_batch(&self, epoch: usize, indices: &[usize]) -> anyhow::Result<Batch> {
        self.inner.load_batch(epoch, indices)
    }

    /// The batches of epoch `epoch`, prepared by a background thread `prefetch_batches` ahead.
    /// Dropping the iterator stops the thread.
    pub fn epoch(&self, epoch: usize) -> EpochBatches {
        let chunks = self.epoch_batches(epoch);
        let remaining = chunks.len();
        let (tx, rx) = sync_channel(self.inner.opts.prefetch_batches.max(1));
        let inner = Arc::clone(&self.inner);
        let handle = std::thread::Builder::new()
            .name(format!("data-epoch-{epoch}"))
            .spawn(move || {
                for chunk in chunks {
                    let result = inner.load_batch(epoch, &chunk);
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the data loader thread");
        EpochBatches { rx: Some(rx), handle: Some(handle), remaining }
    }
}

impl Inner {
    fn load_example(&self, epoch: usize, index: usize) -> anyhow::Result<(Vec<f32>, String, Geometry)> {
        let example = self
            .dataset
            .examples
            .get(index)
            .with_context(|| format!("example {index} out of range ({} examples)", self.dataset.len()))?;
        let image = decode_example(example, &self.opts.decode)?;
        let mut aug_rng = rng_for(self.opts.seed, Stream::Augment, epoch as u64, index as u64);
        let (pixels, geometry) = preprocess_to(&image, &self.target(index, &image), &self.opts.preprocess, &mut aug_rng)
            .with_context(|| format!("preprocessing {}", example.origin))?;
        let caption = match &example.caption {
            Caption::One(s) => s.clone(),
            Caption::Choices(list) => {
                let mut rng = rng_for(self.opts.seed, Stream::Caption, epoch as u64, index as u64);
                list.choose(&mut rng).cloned().unwrap_or_default()
            }
        };
        let caption = if self.opts.captions.is_off() {
            caption
        } else {
            self.opts.captions.apply(&caption, &mut rng_for(self.opts.seed, Stream::CaptionTricks, epoch as u64, index as u64))
        };
        Ok((pixels, caption, geometry))
    }

    /// Example `index`'s resize and crop: its bucket, or the square of the resolution.
    fn target(&self, index: usize, image: &image::RgbImage) -> Target {
        match &self.buckets {
            Some(b) => Target { resized: b.resized[index], crop: b.sizes[b.of_example[index]], floor_center: true },
            None => Target::square(image.width(), image.height(), self.opts.preprocess.resolution),
        }
    }

    /// The (width, height) of batch `indices`' pixels.
    fn batch_size_px(&self, indices: &[usize]) -> (usize, usize) {
        let res = self.opts.preprocess.resolution as usize;
        match (&self.buckets, indices.first()) {
            (Some(b), Some(&i)) => {
                let (w, h) = b.sizes[b.of_example[i]];
                (w as usize, h as usize)
            }
            _ => (res, res),
        }
    }

    fn load_batch(&self, epoch: usize, indices: &[usize]) -> anyhow::Result<Batch> {
        let loaded: Vec<(Vec<f32>, String, Geometry)> = indices
            .par_iter()
            .map(|&i| self.load_example(epoch, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (w, h) = self.batch_size_px(indices);
        let mut data = Vec::with_capacity(indices.len() * 3 * w * h);
        let mut captions = Vec::with_capacity(indices.len());
        let mut geometry = Vec::with_capacity(indices.len());
        for (pixels, caption, g) in loaded {
            data.extend_from_slice(&pixels);
            captions.push(caption);
            geometry.push(g);
        }
        let pixel_values = Tensor::from_vec(data, (indices.len(), 3, h, w), &Device::Cpu)
            .context("the examples of a batch differ in size (a batch takes one bucket)")?;
        Ok(Batch { pixel_values, captions, indices: indices.to_vec(), geometry })
    }
}

/// The batches of one epoch, in order; an error ends the epoch.
pub struct EpochBatches {
    rx: Option<Receiver<anyhow::Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Iterator for EpochBatches {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let received = self.rx.as_ref()?.recv();
        match received {
            Ok(Ok(batch)) => {
                self.remaining -= 1;
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                self.remaining = 0;
                Some(Err(e))
            }
            Err(_) => {
                self.remaining = 0;
                Some(Err(anyhow::anyhow!("the data loader thread stopped unexpectedly")))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for EpochBatches {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, so it stops.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
