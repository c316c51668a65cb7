//! LoRA adapters: `lora` finds target layers, initialises and injects branches; `format` reads
//! and writes LoRA files (diffusers, PEFT, old attention-processor and kohya forms).

pub mod format;
pub mod lora;
