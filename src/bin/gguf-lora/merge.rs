//! `gguf-lora merge`: flags, adapter loading, progress bar and the report as a table or JSON.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use gguf_lora::gguf::GgufModel;
use gguf_lora::merge::file::{merge_model, Output};
use gguf_lora::merge::inputs::read_adapter;
use gguf_lora::merge::types::is_writable;
use gguf_lora::merge::{AdapterInput, MergeOptions, MergeReport, OutType, Promote};
use gguf_lora::quant::GgmlType;
use serde::Serialize;

use crate::lora_args::LoraArgs;
use crate::progress::TensorProgress;
use crate::Outcome;

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
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write one file even when the base is a split set.
    #[arg(long)]
    pub no_split: bool,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_type(s: &str) -> anyhow::Result<GgmlType> {
    match GgmlType::from_name(s) {
        Some(t) if is_writable(t) => Ok(t),
        _ => bail!("unknown or unsupported output type '{s}' (expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k or q6_k)"),
    }
}

fn parse_promote(s: &str) -> anyhow::Result<Promote> {
    if let Some(rest) = s.strip_prefix("auto") {
        let budget = match rest.strip_prefix(':') {
            None if rest.is_empty() => 0.05,
            Some(b) => {
                let (num, pct) = match b.strip_suffix('%') {
                    Some(n) => (n, true),
                    None => (b, false),
                };
                let v: f64 = num
                    .parse()
                    .with_context(|| format!("--promote {s}: budget '{b}' is not a number"))?;
                // "5%" and "5" both mean five percent; "0.05" means five percent too.
                let frac = if pct || v >= 1.0 { v / 100.0 } else { v };
                if !(frac.is_finite() && frac >= 0.0) {
                    bail!("--promote {s}: budget must be a size growth >= 0");
                }
                frac
            }
            None => bail!("--promote '{s}': expected auto or auto:BUDGET"),
        };
        return Ok(Promote::Auto { budget });
    }
    if s.contains('=') {
        let mut pairs = Vec::new();
        for pair in s.split(',') {
            let (from, to) = pair
                .split_once('=')
                .with_context(|| format!("--promote '{s}': expected FROM=TO[,FROM=TO...]"))?;
            let from = GgmlType::from_name(from)
                .with_context(|| format!("--promote '{s}': unknown type '{from}'"))?;
            pairs.push((from, parse_type(to)?));
        }
        // The options live for the whole run; leaking this small list keeps `Promote` `Copy`.
        return Ok(Promote::Map(Vec::leak(pairs)));
    }
    Ok(Promote::Type(parse_type(s)?))
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
    let outtype = match args.outtype.to_ascii_lowercase().as_str() {
        "keep" => OutType::Keep,
        t => OutType::Type(parse_type(t)?),
    };
    let promote = match &args.promote {
        None => Promote::None,
        Some(p) => parse_promote(&p.to_ascii_lowercase())?,
    };
    let opts = MergeOptions {
        outtype,
        promote,
        ..Default::default()
    };
    let specs = args.lora.adapters()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build()
        .context("cannot start worker threads")?;
    pool.install(|| {
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
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&JsonOut {
                    outputs,
                    report: &report
                })?
            );
        } else {
            print_human(&report, &outputs);
        }
        Ok(Outcome::Success)
    })
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn err_str(e: Option<f64>) -> String {
    e.map_or_else(|| "-".to_string(), |e| format!("{e:.3}"))
}

fn print_human(r: &MergeReport, outputs: &[String]) {
    let s = &r.summary;
    println!("wrote {}", outputs.join(", "));
    println!(
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
    println!();
    println!("requantization error relative to the adapter's delta (RMS(requantized − exact merge) / RMS(delta)):");
    println!(
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
        println!(
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
        println!(
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
        println!();
        println!("tensors that lose most (of {}):", r.tensors.len());
        for t in worst.iter().take(5) {
            println!(
                "  {:<36} {} → {}{}  error {}",
                t.name,
                t.type_in,
                t.type_out,
                if t.fallback { " (fallback)" } else { "" },
                err_str(t.relative_error)
            );
        }
    }
}
