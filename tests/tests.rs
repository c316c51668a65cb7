//! The integration tests, one binary (`cargo test --test tests`): each module is one area, so a
//! change links the world once, not once per file. Filter by module: `cargo test --test tests
//! train_golden`, or several: `cargo test --test tests -- config_schema config_broken`.

mod support;

mod adapters_cli;
mod bench_cli;
mod cli_json;
mod adapters_diffusers_loads;
mod adapters_format;
mod adapters_kohya_meta;
mod adapters_ui_keys;
mod adapters_injection;
mod adapters_unet_golden;
mod config_broken;
mod config_schema;
mod config_editor_schema;
mod data_cache;
mod data_captions;
mod data_decode;
mod device_parity;
mod data_hub;
mod data_loader;
mod data_parquet_variants;
mod data_sources;
mod data_transform;
mod loading_hub;
mod loading_pipeline;
mod loading_tokenizer;
mod loading_weights;
mod models_bench;
mod models_config;
mod models_lora;
mod models_parity;
mod optim_golden;
mod optim_lion;
mod report_outputs;
mod run_tiny;
mod sched_generate;
mod sched_golden;
mod sched_oracle;
mod sd2_parity;
mod sdxl_parity;
mod train_lr_min;
mod train_golden;
mod train_precision;
mod train_checkpointing;
mod loading_single_file;
mod run_heldout;
mod run_single_file;
mod runner_full_disk;
mod runner_kill;
mod runner_stages;
mod runner_safety;
mod runner_signals;
mod house_imports;
mod inference_validation;
