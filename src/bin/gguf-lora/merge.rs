//! `gguf-lora merge`: flags, adapter loading, progress bar and the report as a table or JSON.

use std::path::{Path, PathBuf};

use std::fmt::Write;

use clap::Args as ClapArgs;
use gguf_lora::engine::file::Output;
use gguf_lora::gguf::GgufModel;
use gguf_lora::merge::inputs::read_adapter;
use gguf_lora::merge::{merge_model, AdapterInput, MergeOptions, MergeReport, MergeType, Promote};
use serde::Serialize;

use crate::args::{JsonArg, ThreadsArg};
use crate::lora_args::LoraArgs;
use crate::progress::TensorProgress;
use crate::table::{fixed3, mib};
use crate::{print_stdout, Outcome};

/// Bake LoRA adapters into a base GGUF, keeping each tensor's quantization.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model: a GGUF file or any shard of a gguf-split set.
    pub base: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Output file (for a split base, the shards are named after it).
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Type of merged tensors: keep (each its base type) or a type; untouched tensors keep their bytes.
    #[arg(long, default_value = "keep")]
    pub outtype: String,
    /// Requantize touched tensors to a larger TYPE, only those of type FROM (FROM=TO[,...]), or choose per tensor with auto[:BUDGET] (size growth, default 5%).
    #[arg(long, value_name = "TYPE|FROM=TO|auto[:BUDGET]")]
    pub promote: Option<String>,
    #[command(flatten)]
    pub threads: ThreadsArg,
    /// Write one file even when the base is a split set.
    #[arg(long)]
    pub no_split: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

fn load_adapter(spec: &str, scale: f32, base: &GgufModel) -> anyhow::Result<AdapterInput> {
    let path = Path::new(spec);
    let name = path
        .file_name()
        .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
    Ok(read_adapter(path, base, name, scale)?)
}

#[derive(Serialize)]
struct JsonOut<'a> {
    outputs: Vec<String>,
    #[serde(flatten)]
    report: &'a MergeReport,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let outtype: MergeType = args.outtype.parse()?;
    let promote = match &args.promote {
        None => Promote::None,
        Some(p) => p.parse()?,
    };
    let opts = MergeOptions {
        outtype,
        promote,
        ..Default::default()
    };
    let specs = args.lora.adapters()?;
    args.threads.run(|| {
        let model = GgufModel::open(&args.base)?;
        let adapters = specs
            .iter()
            .map(|(s, scale)| load_adapter(s, *scale, &model))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let adapter_paths: Vec<&Path> = specs.iter().map(|(s, _)| Path::new(s.as_str())).collect();
        let progress = TensorProgress::new(&model);
        let on_done = |i: usize, b: u64| progress.on_done(i, b);
        let output = Output {
            path: &args.output,
            no_split: args.no_split,
            other_inputs: &adapter_paths,
        };
        let (report, written) = merge_model(&model, &adapters, &opts, &output, &on_done)?;
        progress.finish();
        let outputs: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        let text = if args.json.json {
            let mut s = serde_json::to_string_pretty(&JsonOut {
                outputs,
                report: &report,
            })?;
            s.push('\n');
            s
        } else {
            render(&report, &outputs)
        };
        print_stdout(&text)?;
        Ok(Outcome::Success)
    })
}

fn err_str(e: Option<f64>) -> String {
    e.map_or_else(|| "-".to_string(), fixed3)
}

fn render(r: &MergeReport, outputs: &[String]) -> String {
    let mut out = String::new();
    let s = &r.summary;
    let _ = writeln!(out, "wrote {}", outputs.join(", "));
    let _ = writeln!(
        out,
        "merged {} tensors, copied {} byte for byte; {} → {} (×{:.3}){}{}",
        s.tensors_merged,
        s.tensors_copied,
        mib(s.bytes_in),
        mib(s.bytes_out),
        s.size_ratio,
        if s.tensors_promoted > 0 {
            format!("; {} promoted", s.tensors_promoted)
        } else {
            String::new()
        },
        if s.tensors_fallback > 0 {
            format!(
                "; {} fell back to another type (row length not a multiple of the block)",
                s.tensors_fallback
            )
        } else {
            String::new()
        },
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "requantization error relative to the adapter's delta (RMS(requantized − exact merge) / RMS(delta)):");
    let _ = writeln!(
        out,
        "{:<8} {:>7} {:>10}  {:<40}",
        "type", "tensors", "error", "other choices for these tensors (error, whole-file size)"
    );
    for t in &s.per_type {
        let others: Vec<String> = t
            .options
            .iter()
            .skip(1)
            .map(|o| {
                format!(
                    "{} {} ×{:.3}",
                    o.choice,
                    err_str(o.relative_error),
                    o.size_ratio
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<8} {:>7} {:>10}  {}",
            t.type_in,
            t.tensors,
            err_str(t.relative_error),
            others.join(", ")
        );
    }
    for t in s.per_type.iter().filter(|t| t.lossy) {
        let fix = match &t.suggested_promotion {
            Some(p) => {
                let o = t.options.iter().find(|o| &o.choice == p);
                format!(
                    "; --promote {} would leave {} at ×{:.3} the base size (or try --promote auto)",
                    p.to_ascii_lowercase(),
                    err_str(o.and_then(|o| o.relative_error)),
                    o.map_or(0.0, |o| o.size_ratio)
                )
            }
            None => "; try --promote q8_0 or --promote auto".to_string(),
        };
        let _ = writeln!(

            out,
            "warning: the {} {} tensors lose much of the adapter to requantization (rounding error {}× the adapter's change){fix}",
            t.tensors,
            t.type_in,
            err_str(t.relative_error)
        );
    }
    let mut worst: Vec<_> = r
        .tensors
        .iter()
        .filter(|t| t.relative_error.is_some())
        .collect();
    worst.sort_by(|a, b| {
        b.relative_error
            .partial_cmp(&a.relative_error)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if worst
        .first()
        .and_then(|t| t.relative_error)
        .is_some_and(|e| e > 0.0)
    {
        let _ = writeln!(out);
        let _ = writeln!(out, "tensors that lose most (of {}):", r.tensors.len());
        for t in worst.iter().take(5) {
            let _ = writeln!(
                out,
                "  {:<36} {} → {}{}  error {}",
                t.name,
                t.type_in,
                t.type_out,
                if t.fallback { " (fallback)" } else { "" },
                err_str(t.relative_error)
            );
        }
    }
    out
}
