//! Datasets: sources (parquet, image folder + metadata.jsonl, sidecar captions), decoding,
//! preprocessing (resize, crop, flip, normalise) and batching.
