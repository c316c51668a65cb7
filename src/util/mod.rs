//! Small shared helpers: atomic file writes (`fs`) and Ctrl-C handling (`interrupt`).

pub mod fs;
pub mod interrupt;
