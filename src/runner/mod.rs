//! The runner: stages of a pipeline in order, fingerprints (`lock`), resume and watch mode.

pub mod lock;
pub mod run;
pub mod watch;
