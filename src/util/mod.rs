//! Small shared helpers: atomic file writes (`fs`), Ctrl-C handling (`interrupt`), this
//! process's host memory (`memory`) and the opt-in step profiler (`profile`); `file_kind` names
//! special files (FIFOs, devices) for messages.

pub(crate) mod file_kind;
pub(crate) mod safetensors_bytes;
pub mod fs;
pub(crate) mod interrupt;
pub mod path;
pub mod memory;
pub mod profile;
pub mod time;
