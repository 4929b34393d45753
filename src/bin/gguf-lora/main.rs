//! The `gguf-lora` command line: clap definitions, output formatting and exit codes only.
//!
//! Each subcommand lives in its own module beside this file (`inspect.rs`, `merge.rs`, ...): an `Args`
//! struct (clap) and a `run(args) -> anyhow::Result<Outcome>` that calls the library and prints.
//! Flags several subcommands take are defined once in `args.rs` and `lora_args.rs`. This file only
//! installs the interrupt handler, dispatches, and maps outcomes and errors to exit codes.

mod args;
mod bundle;
mod convert;
mod inspect;
mod lora_args;
mod merge;
mod progress;
mod quantize;
mod rewrite;
mod table;
mod tokenize;
mod verify;

use clap::{Parser, Subcommand};

/// How a subcommand that ran to the end went; errors are `Err` and exit with 1.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// A check that ran and failed (`inspect --base` incompatible, `verify` over thresholds): exit 3.
    CheckFailed,
}

/// The exit codes, part of the CLI contract (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    /// Bad input, I/O: the message on stderr names the file, the tensor and what was expected.
    Error = 1,
    /// A usage error (clap exits with it by itself).
    #[allow(dead_code)]
    Usage = 2,
    /// A check that ran and failed.
    CheckFailed = 3,
    /// Interrupted by SIGINT, SIGTERM or SIGHUP (128 + SIGINT, the shell convention); temporary
    /// files are removed first.
    Interrupted = 130,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

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

/// On SIGINT, SIGTERM or SIGHUP: remove every temporary output file and exit, holding the library's
/// registry so that no file is created or renamed in between. If the handler cannot be installed
/// the run goes on; an interrupt then leaves a hidden `.NAME.PID-N.tmp` behind.
fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        let _held = gguf_lora::output::remove_live_temp_files();
        std::process::exit(Exit::Interrupted as i32);
    });
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    install_interrupt_handler();
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
    let exit = match result {
        Ok(Outcome::Success) => Exit::Success,
        Ok(Outcome::CheckFailed) => Exit::CheckFailed,
        // `gguf-lora inspect ... | head` closing the pipe early is not an error.
        Err(err) if is_broken_pipe(&err) => Exit::Success,
        Err(err) => {
            eprintln!("gguf-lora: error: {err:#}");
            Exit::Error
        }
    };
    exit.into()
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

pub use args::factor_type_parser;

/// Writes `text` to stdout in one go; a closed pipe surfaces as an error that `main` ignores.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
