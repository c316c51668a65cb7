//! Small shared helpers: atomic file writes, device and dtype selection.

pub mod fs;
