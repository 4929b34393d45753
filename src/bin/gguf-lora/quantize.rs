//! `gguf-lora quantize`: flags, imatrix loading, progress bar and the report as a table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;
use gguf_lora::engine::file::Output;
use gguf_lora::gguf::GgufModel;
use gguf_lora::quant::GgmlType;
use gguf_lora::quantize::{imatrix, quantize_model, Action, QuantizeOptions, QuantizeReport};

use crate::args::{parse_target_type, JsonArg, ModelArg, OutArg, ThreadsArg};
use crate::progress::TensorProgress;
use crate::table::{human_bytes, plural};
use crate::{print_stdout, Outcome};

/// Quantize a whole model to one type (ggml-exact, like `llama-quantize --pure`).
#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub input: ModelArg,
    #[command(flatten)]
    pub out: OutArg,
    /// Target type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_K, q3_K, q4_K, q5_K or q6_K
    /// (any case).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_target_type)]
    pub ty: GgmlType,
    /// Importance matrix from llama-imatrix (GGUF, or the legacy .dat form).
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Type of token_embd.weight instead of --type, as llama-quantize's flag of the same name.
    #[arg(long, value_name = "TYPE", value_parser = parse_target_type)]
    pub token_embedding_type: Option<GgmlType>,
    /// Type of output.weight instead of --type, as llama-quantize's flag of the same name.
    #[arg(long, value_name = "TYPE", value_parser = parse_target_type)]
    pub output_tensor_type: Option<GgmlType>,
    #[command(flatten)]
    pub threads: ThreadsArg,
    /// Write one file even when the input is a split set.
    #[arg(long)]
    pub no_split: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    args.threads.run(|| {
        let im = match &args.imatrix {
            Some(p) => Some(imatrix::read(p)?),
            None => None,
        };
        let model = GgufModel::open(args.input.path())?;
        let opts = QuantizeOptions {
            target: args.ty,
            imatrix: im.as_ref().zip(args.imatrix.as_deref()),
            token_embedding_type: args.token_embedding_type,
            output_tensor_type: args.output_tensor_type,
        };
        let others: Vec<&Path> = args.imatrix.iter().map(PathBuf::as_path).collect();
        let output = Output {
            path: &args.out.output,
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

/// Fallbacks grouped by row length and type, then the summary.
fn render(r: &QuantizeReport) -> String {
    let mut out = String::new();
    let s = &r.summary;
    let mut fallbacks: BTreeMap<(u64, &str), usize> = BTreeMap::new();
    for t in r.tensors.iter().filter(|t| t.action == Action::Fallback) {
        let row = t.dims.first().copied().unwrap_or(0);
        *fallbacks.entry((row, t.type_out.as_str())).or_default() += 1;
    }
    for ((row, ty), n) in &fallbacks {
        let _ = writeln!(
            out,
            "fallback: {} with {row}-wide rows → {ty} (rows of {} need whole {}-element blocks)",
            plural(*n, "tensor"),
            s.target,
            GgmlType::from_name(&s.target).map_or(0, |t| t.block_size())
        );
    }
    if s.imatrix_applied > 0 || !s.imatrix_missing.is_empty() {
        let _ = writeln!(
            out,
            "importance matrix applied to {}; no entry for {}{}",
            plural(s.imatrix_applied, "tensor"),
            s.imatrix_missing.len(),
            if s.imatrix_missing.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.imatrix_missing.join(", "))
            }
        );
    }
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
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.size_ratio
    );
    let _ = writeln!(out, "wrote {}", r.outputs.join(", "));
    out
}
