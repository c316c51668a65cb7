//! `lora`: train LoRA adapters for Stable Diffusion from declarative TOML pipeline files.
//!
//! The modules follow the path a pipeline takes: `config` reads and checks the file, `models`
//! loads the diffusion stack, `data` reads and preprocesses the dataset, `adapters` injects and
//! saves LoRA weights, `schedulers` add and remove noise, `inference` samples images with a
//! loaded model (generate, validation), `train` runs the optimisation, `preflight` checks a
//! pipeline against model files and datasets before anything loads, `runner` strings the stages
//! together and `cli` is the command line on top. `layout`, `hub_id`, `vocab` and `util` are
//! leaves every layer may use (`tests/house_imports.rs` keeps the layers apart).
//!
//! The public surface is what the binary (`cli::main`) and the integration tests (`tests/`, one
//! binary) use: the modules are public because the tests reach into every area (parity with the
//! reference model by model, the runner end to end), and within them an item is `pub` only where a
//! test or the binary names it; everything else is `pub(crate)`.

pub mod adapters;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod hub_id;
pub mod inference;
pub mod layout;
pub mod models;
pub mod nn;
pub mod preflight;
pub mod report;
pub mod runner;
pub mod schedulers;
pub mod train;
pub mod util;
pub mod vocab;
