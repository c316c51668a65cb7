//! LoRA adapters: `lora` finds target layers, initialises and injects branches, and applies
//! LoRA files for inference; a LoRA in memory is `weights`, its file keys `keys` (diffusers,
//! PEFT, old attention-processor and kohya forms), and `read` / `write` turn files into it and
//! back; `inspect` describes a LoRA (format, base model guess, ranks, alphas) for `lora inspect`;
//! `kohya_hash` the model and file hashes of kohya's header, `kohya_meta` the rest of it
//! (training settings, model facts, ModelSpec keys, tag counts); `ldm_names` the original-layout
//! UNet names kohya gives SDXL LoRAs.

pub mod inspect;
pub mod keys;
pub(crate) mod kohya_hash;
pub mod kohya_meta;
pub mod ldm_names;
pub mod lora;
pub mod pattern;
pub mod read;
pub mod weights;
pub mod write;

pub use weights::LoraFormat;
pub use kohya_meta::TrainingInfo;
pub use lora::{apply_lora_file, apply_lora_weights, inject, trained_weights, InitRng, LoraInit, LoraSpec, TrainableLora};
pub use read::{read_lora_file, read_lora_file_for_use};
pub use weights::{Component, LoraModule, LoraWeights};
pub use write::write_lora_file;
