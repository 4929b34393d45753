//! The `gguf-lora` command line: clap definitions, output formatting and exit codes only.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes are part of the CLI contract (DESIGN.md): 0 ok, 1 error, 2 usage, 3 a check failed.
const EXIT_ERROR: u8 = 1;

#[derive(Parser)]
#[command(name = "gguf-lora", version, about = "LoRA adapters for GGUF models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
    #[allow(unreachable_code)]
    ExitCode::from(EXIT_ERROR)
}
