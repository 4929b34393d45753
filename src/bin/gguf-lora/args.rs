//! Flags several subcommands share, defined once so that they read and behave the same everywhere:
//! `--json`, `--threads`, and the value parsers that list a library type's possible values.

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use gguf_lora::adapter::gguf::FactorType;

/// `--json`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct JsonArg {
    /// Print exactly one JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `--threads`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ThreadsArg {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ThreadsArg {
    /// Runs `f` on a thread pool of the asked size.
    pub fn run<R: Send>(self, f: impl FnOnce() -> anyhow::Result<R> + Send) -> anyhow::Result<R> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads.unwrap_or(0))
            .build()
            .context("cannot start worker threads")?;
        pool.install(f)
    }
}

/// `--outtype` of `convert` and `bundle`: the library's [`FactorType`], values listed by clap.
pub fn factor_type_parser() -> impl TypedValueParser<Value = FactorType> {
    PossibleValuesParser::new(FactorType::NAMES).try_map(|s| s.parse::<FactorType>())
}
