//! The runner: the stage table (`stages`) over a resolved `plan`, fingerprints (`lock`), the
//! output folder held by one run (`run_dir`), resume and watch mode.

pub mod lock;
pub mod plan;
pub mod resolve;
pub mod resume;
pub mod run;
pub mod run_dir;
pub mod stages;
pub mod watch;
