//! Flags several subcommands share, defined once so that they read and behave the same everywhere:
//! the model (`BASE.gguf` or `-m/--model`, as llama.cpp takes it), `-o/--output/--output-file`,
//! `--json`, `-t/--threads`, and the value parsers that list a library type's possible values and
//! turn a bad value into a usage error (exit 2) before anything runs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use gguf_lora::adapter::gguf::FactorType;
use gguf_lora::engine::types::{parse_writable, WRITABLE};
use gguf_lora::merge::{MergeType, Promote};
use gguf_lora::quant::GgmlType;

/// The model a subcommand reads: positional, or `-m/--model` (llama.cpp's spelling).
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct ModelArg {
    /// Model: a GGUF file or any shard of a gguf-split set.
    #[arg(value_name = "MODEL.gguf")]
    positional: Option<PathBuf>,
    /// The model, as llama.cpp's tools take it (same as the positional argument).
    #[arg(short = 'm', long = "model", value_name = "MODEL.gguf")]
    model: Option<PathBuf>,
}

impl ModelArg {
    pub fn path(&self) -> &Path {
        // The group requires exactly one of the two.
        self.positional
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or(Path::new(""))
    }
}

/// `-o/--output/--output-file`.
#[derive(clap::Args, Debug, Clone)]
pub struct OutArg {
    /// Output file: written to a temporary file beside it and renamed into place when complete (for
    /// a split input, the shards are named after it).
    #[arg(
        short = 'o',
        long = "output",
        visible_alias = "output-file",
        value_name = "OUT.gguf"
    )]
    pub output: PathBuf,
}

/// `--json`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct JsonArg {
    /// Print exactly one JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `-t/--threads`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ThreadsArg {
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
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

/// The type names users may give, as ggml spells them.
fn writable_names() -> Vec<&'static str> {
    WRITABLE.iter().map(|t| t.name()).collect()
}

/// `merge --outtype`: `keep` or a type we write (any case), values listed by clap.
pub fn merge_type_parser() -> impl TypedValueParser<Value = MergeType> {
    let mut names = vec!["keep"];
    names.extend(writable_names());
    PossibleValuesParser::new(names).try_map(|s| s.parse::<MergeType>())
}

/// `merge --promote`.
pub fn parse_promote(s: &str) -> Result<Promote, String> {
    s.parse::<Promote>().map_err(|e| e.to_string())
}

/// `merge --adapter-weight`: a share, 0 to 1 (beyond 1 the adapter's directions would outweigh
/// every input the text gives).
pub fn parse_adapter_weight(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(w) if (0.0..=1.0).contains(&w) => Ok(w),
        Ok(_) => Err(format!("{s}: expected a share from 0 to 1")),
        Err(_) => Err(format!("{s}: not a number")),
    }
}

/// `quantize --type`: one type we write; the llama-quantize mixes (`q4_k_m`, ...) get a pointer to
/// the plain type.
pub fn parse_target_type(s: &str) -> Result<GgmlType, String> {
    let lower = s.to_ascii_lowercase();
    if ["_s", "_m", "_l", "_xl"].iter().any(|m| lower.ends_with(m)) {
        return Err(format!(
            "quantize writes one type everywhere (like llama-quantize --pure); the _S/_M/_L mixes are not offered, use e.g. --type {}",
            lower.rsplit_once('_').map_or(lower.as_str(), |(t, _)| t)
        ));
    }
    parse_writable(&lower).map_err(|e| e.to_string())
}
