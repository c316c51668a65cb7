//! Small shared helpers: atomic file writes (`fs`), Ctrl-C handling (`interrupt`) and the
//! opt-in step profiler (`profile`).

pub mod fs;
pub mod interrupt;
pub mod profile;
