//! LoRA files: read diffusers / PEFT / attention-processor / kohya safetensors into one
//! in-memory form, write diffusers (as the reference saves it), kohya and PEFT.
