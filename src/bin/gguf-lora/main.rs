//! The `gguf-lora` command line: clap definitions, output formatting and exit codes only.
//!
//! Each subcommand lives in its own module beside this file (`inspect.rs`, `merge.rs`, ...): an `Args`
//! struct (clap) and a `run(args) -> anyhow::Result<Outcome>` that calls the library and prints. This
//! file only dispatches and maps outcomes and errors to exit codes.

pub(crate) mod merge;
mod progress;
mod quantize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bundle;
mod convert;
mod inspect;
mod lora_args;
mod rewrite;
mod table;
mod tokenize;
mod verify;

/// How a subcommand that ran to the end went; errors are `Err` and exit with 1.
#[allow(dead_code)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// A check that ran and failed (`inspect --base` incompatible, `verify` over thresholds): exit 3.
    CheckFailed,
}

/// Exit codes are part of the CLI contract (DESIGN.md): 0 ok, 1 error, 2 usage (clap), 3 check failed.
const EXIT_ERROR: u8 = 1;
const EXIT_CHECK_FAILED: u8 = 3;

#[derive(Parser)]
#[command(name = "gguf-lora", version, about = "LoRA adapters for GGUF models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Bundle(bundle::Args),
    Convert(convert::Args),
    Inspect(inspect::Args),
    /// Bake LoRA adapters into a base GGUF, keeping each tensor's quantization.
    Merge(merge::Args),
    Rewrite(rewrite::Args),
    Verify(verify::Args),
    /// Quantize a whole model to one type (ggml-exact, like `llama-quantize --pure`).
    Quantize(quantize::Args),
    Tokenize(tokenize::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<Outcome> = match cli.command {
        Command::Bundle(args) => bundle::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Rewrite(args) => rewrite::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Tokenize(args) => tokenize::run(args),
    };
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::CheckFailed) => ExitCode::from(EXIT_CHECK_FAILED),
        // `gguf-lora inspect ... | head` closing the pipe early is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gguf-lora: error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes `text` to stdout in one go; a closed pipe surfaces as an error that `main` ignores.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
