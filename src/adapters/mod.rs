//! LoRA adapters: `lora` finds target layers, initialises and injects branches, and applies
//! LoRA files for inference; `format` reads and writes LoRA files (diffusers, PEFT, old
//! attention-processor and kohya forms); `inspect` describes a LoRA (format, base model guess,
//! ranks, alphas) for `lora inspect`; `kohya_hash` the model and file hashes of kohya's header,
//! `kohya_meta` its model facts, ModelSpec keys and tag counts.

pub mod format;
pub mod inspect;
pub mod kohya_hash;
pub mod kohya_meta;
pub mod lora;
pub mod pattern;

pub use format::{read_lora_file, read_lora_file_for_use, write_lora_file, Component, LoraFormat, LoraModule, LoraWeights, TrainingInfo};
pub use lora::{apply_lora_file, apply_lora_weights, inject, trained_weights, InitRng, LoraInit, LoraSpec, TrainableLora};
