//! The `gguf-lora` command line: clap definitions, output formatting and exit codes only.
//!
//! Each subcommand lives in its own module beside this file (`inspect.rs`, `merge.rs`, ...): an `Args`
//! struct (clap) and a `run(args) -> anyhow::Result<Outcome>` that calls the library and prints.
//! Flags several subcommands take are defined once in `args.rs` and `lora_args.rs`. This file only
//! installs the interrupt handler, dispatches, and maps outcomes and errors to exit codes.

mod args;
mod bundle;
mod convert;
mod extract;
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

/// How a subcommand that ran to the end went; errors are `Err` and exit with 1 (2 for a
/// [`UsageError`]).
pub enum Outcome {
    /// Exit 0.
    Success,
    /// A check that ran and failed (`inspect --base` incompatible, `verify` over thresholds): exit 3.
    CheckFailed,
}

/// The exit codes, part of the CLI contract (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Success,
    /// Bad input, I/O: the message on stderr names the file, the tensor and what was expected.
    Error,
    /// A usage error: what clap finds, and [`UsageError`]s found after parsing.
    Usage,
    /// A check that ran and failed.
    CheckFailed,
    /// Killed by this signal (exit 128 + its number, the shell convention: 130 for SIGINT, 143 for
    /// SIGTERM); temporary files are removed first.
    Signal(i32),
}

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Success => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::CheckFailed => 3,
            Exit::Signal(sig) => 128 + sig,
        }
    }
}

/// A usage error found after clap parsed the flags (a missing adapter, flags that do not go
/// together): exit 2, like clap's own.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

#[derive(Parser)]
#[command(name = "gguf-lora", version, about = "LoRA adapters for GGUF models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// In the order of the README: make an adapter, apply it, look at files, combine, requantize,
/// extract one from a fine-tune, check.
#[derive(Subcommand)]
enum Command {
    Convert(convert::Args),
    Merge(merge::Args),
    Inspect(inspect::Args),
    Bundle(bundle::Args),
    Quantize(quantize::Args),
    Extract(extract::Args),
    Verify(verify::Args),
    Tokenize(tokenize::Args),
    Rewrite(rewrite::Args),
}

/// On SIGINT, SIGTERM or SIGHUP: clear the progress bar, remove every temporary output file, say so
/// in one line, and exit 128 + the signal, holding the library's registry so that no file is
/// created or renamed in between. If the handler cannot be installed the run goes on with the
/// default behaviour (killed, a hidden `.NAME.PID-N.tmp` left behind).
fn install_signal_handler() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            progress::clear();
            let _held = gguf_lora::output::remove_live_temp_files();
            let name = match sig {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            eprintln!("gguf-lora: interrupted by {name}; no output was written");
            std::process::exit(Exit::Signal(sig).code());
        }
    });
}

/// glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after which
/// blocks of a few MiB come from the heap and stay in the resident set once freed. A merge frees
/// its calibration records (a 7B model's: 0.8 GB in 128 blocks of 2–11 MiB) before streaming, so a
/// fixed threshold is what gives that memory back: measured peak RSS 2.7 → 1.75 GB on the 7B-shaped
/// default merge.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    install_signal_handler();
    let result: anyhow::Result<Outcome> = match cli.command {
        Command::Bundle(args) => bundle::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Extract(args) => extract::run(args),
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
        Err(err) if err.downcast_ref::<UsageError>().is_some() => {
            // The form clap gives its own usage errors.
            eprintln!("error: {err}\n\nFor more information, try '--help'.");
            Exit::Usage
        }
        Err(err) => {
            eprintln!("gguf-lora: error: {err:#}");
            Exit::Error
        }
    };
    std::process::ExitCode::from(exit.code() as u8)
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

pub use args::factor_type_parser;

/// Writes `text` to stdout in one go, the one way every subcommand prints: a closed pipe surfaces
/// as an error that `main` ignores; any other failure (a full disk) is an error naming stdout.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        // The io::Error stays in the chain, so that `main` recognises a closed pipe.
        .map_err(|e| anyhow::Error::new(e).context("cannot write to stdout"))
}
