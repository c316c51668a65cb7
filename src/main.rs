//! The `lora` binary: parse the command line and hand it to `lora::cli`.
use std::process::ExitCode;

fn main() -> ExitCode {
    lora::cli::main()
}
