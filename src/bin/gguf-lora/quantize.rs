//! `gguf-lora quantize`: flags, imatrix loading, progress bar and the report as a table or JSON.

use std::path::{Path, PathBuf};

use std::fmt::Write;

use clap::Args as ClapArgs;
use gguf_lora::engine::file::Output;
use gguf_lora::engine::types::parse_writable;
use gguf_lora::gguf::GgufModel;
use gguf_lora::quantize::{imatrix, quantize_model, Action, QuantizeOptions, QuantizeReport};

use crate::args::{JsonArg, ThreadsArg};
use crate::progress::TensorProgress;
use crate::table::mib;
use crate::{print_stdout, Outcome};

/// Quantize a whole model to one type (ggml-exact, like `llama-quantize --pure`).
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Input model: a GGUF file or any shard of a gguf-split set.
    pub input: PathBuf,
    /// Output file (for a split input, the shards are named after it).
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Target type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k or q6_k.
    #[arg(long = "type", value_name = "TYPE")]
    pub ty: String,
    /// Importance matrix from llama-imatrix (GGUF, or the legacy .dat form).
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    #[command(flatten)]
    pub threads: ThreadsArg,
    /// Write one file even when the input is a split set.
    #[arg(long)]
    pub no_split: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let lower = args.ty.to_ascii_lowercase();
    if ["_s", "_m", "_l", "_xl"].iter().any(|m| lower.ends_with(m)) {
        anyhow::bail!(
            "--type {}: quantize writes one type everywhere (like llama-quantize --pure); the _S/_M/_L mixes are not offered, use e.g. --type {}",
            args.ty,
            lower.rsplit_once('_').map_or(lower.as_str(), |(t, _)| t)
        );
    }
    let target = parse_writable(&lower)?;
    args.threads.run(|| {
        let im = match &args.imatrix {
            Some(p) => Some(imatrix::read(p)?),
            None => None,
        };
        let model = GgufModel::open(&args.input)?;
        let opts = QuantizeOptions {
            target,
            imatrix: im.as_ref().zip(args.imatrix.as_deref()),
        };
        let others: Vec<&Path> = args.imatrix.iter().map(PathBuf::as_path).collect();
        let output = Output {
            path: &args.output,
            no_split: args.no_split,
            other_inputs: &others,
        };
        let progress = TensorProgress::new(&model);
        let report = quantize_model(&model, &opts, &output, &|i, b| progress.on_done(i, b))?;
        progress.finish();
        let text = if args.json.json {
            serde_json::to_string_pretty(&report)? + "\n"
        } else {
            render(&report)
        };
        print_stdout(&text)?;
        Ok(Outcome::Success)
    })
}

fn render(r: &QuantizeReport) -> String {
    let mut out = String::new();
    let s = &r.summary;
    let _ = writeln!(out, "wrote {}", r.outputs.join(", "));
    let _ = writeln!(
        out,
        "{} tensors: {} quantized to {}, {} fell back (row length not a multiple of the block), {} already {} (copied), {} left as they are; {} → {} (×{:.3})",
        s.tensors,
        s.quantized,
        s.target,
        s.fallback,
        s.copied,
        s.target,
        s.kept,
        mib(s.bytes_in),
        mib(s.bytes_out),
        s.size_ratio
    );
    if s.imatrix_applied > 0 || !s.imatrix_missing.is_empty() {
        let _ = writeln!(
            out,
            "importance matrix applied to {} tensors; no entry for {}{}",
            s.imatrix_applied,
            s.imatrix_missing.len(),
            if s.imatrix_missing.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.imatrix_missing.join(", "))
            }
        );
    }
    for t in r.tensors.iter().filter(|t| t.action == Action::Fallback) {
        let _ = writeln!(
            out,
            "  fallback: {:<36} row {:>6} → {}",
            t.name,
            t.dims.first().copied().unwrap_or(0),
            t.type_out
        );
    }
    out
}
