//! `lora schema`: print the JSON Schema of pipeline files (`schemas/pipeline.schema.json`).

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    print!("{}", crate::config::pipeline_schema_text());
    Ok(ExitCode::SUCCESS)
}
