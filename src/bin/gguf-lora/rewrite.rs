//! `gguf-lora rewrite IN -o OUT` (hidden): reads a GGUF model, single file or split set, and writes
//! it back as one file without changes (a split set loses only its `split.*` keys). A single file
//! comes back byte-identical; tests use it to exercise the writer and the atomic output end to end.

use std::path::PathBuf;

use gguf_lora::gguf::{writer::copy_model, GgufModel};

use crate::Outcome;

/// Rewrite a GGUF model unchanged (joins a split set into one file).
#[derive(clap::Args)]
#[command(hide = true)]
pub struct Args {
    /// Input GGUF file, or any shard of a split set.
    input: PathBuf,
    /// Output GGUF file (written atomically; may not be an input).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let model = GgufModel::open(&args.input)?;
    copy_model(&model, &args.output)?;
    Ok(Outcome::Success)
}
