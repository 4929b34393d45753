//! `gguf-lora merge`: flags, adapter loading, progress bar and the report as a table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args as ClapArgs, ValueEnum};
use gguf_lora::calibrate::{self, CalibrationText};
use gguf_lora::engine::file::Output;
use gguf_lora::engine::preserve;
use gguf_lora::gguf::GgufModel;
use gguf_lora::merge::inputs::open_adapter;
use gguf_lora::merge::{
    self, merge_model, requant_key, AdapterInput, MergeOptions, MergeReport, MergeType, Promote,
    RequantMethod, TensorReport,
};
use gguf_lora::quant::GgmlType;
use serde::Serialize;

use crate::args::{
    merge_type_parser, parse_adapter_weight, parse_promote, parse_target_type, JsonArg, ModelArg,
    OutArg, ThreadsArg,
};
use crate::lora_args::LoraArgs;
use crate::progress::TensorProgress;
use crate::table::{fixed3, human_bytes, short, Table};
use crate::{print_stdout, Outcome};

/// Bake LoRA adapters into a base GGUF, keeping each tensor's quantization.
///
/// Untouched tensors are copied byte for byte; touched ones are dequantized, merged in f32 and
/// requantized once to their own type (or --outtype), or to a larger one with --promote.
#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub base: ModelArg,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub out: OutArg,
    /// Type of merged tensors: keep (each its base type) or one type for all; untouched tensors
    /// keep their bytes.
    #[arg(long, default_value = "keep", value_parser = merge_type_parser(), ignore_case = true)]
    pub outtype: MergeType,
    /// Requantize touched tensors to a larger TYPE, only those of type FROM (FROM=TO[,...]), or
    /// choose per tensor with auto[:BUDGET] (size growth, default 5%; auto:0 keeps the base's
    /// size, moving bits from the tensors the base's recipe gave more to those that lose most of
    /// the adapter). Chooses types per tensor, so it does not go with --outtype.
    #[arg(
        long,
        value_name = "TYPE|FROM=TO|auto[:BUDGET]",
        value_parser = parse_promote,
        conflicts_with = "outtype"
    )]
    pub promote: Option<Promote>,
    /// Write token_embd.weight in this type, touched or not, as llama-quantize's flag of the same
    /// name does (gemma's Q8_0 embedding is 70% of the file: at q5_1 it frees enough for
    /// --promote auto:0 to give every merged tensor q8_0, at the cost of the embedding's own
    /// rounding; see the report).
    #[arg(long, value_name = "TYPE", value_parser = parse_target_type)]
    pub token_embedding_type: Option<GgmlType>,
    /// Write output.weight (the output head, when the model does not tie it to the embeddings) in
    /// this type, touched or not, as llama-quantize's flag of the same name does.
    #[arg(long, value_name = "TYPE", value_parser = parse_target_type)]
    pub output_tensor_type: Option<GgmlType>,
    #[command(flatten)]
    pub threads: ThreadsArg,
    /// How touched tensors are requantized: preserve keeps the adapter's effect on each tensor's
    /// output, weighted by the inputs it sees on calibration text (a trained adapter moves
    /// weights by a fraction of one quantization step, which rounding to nearest erases); nearest
    /// is ggml's round-to-nearest, bit for bit.
    #[arg(long, value_enum, default_value = "preserve")]
    pub requant: RequantArg,
    /// Text to calibrate on, tokenized by the base's tokenizer (your training data is best);
    /// default: a built-in mixed corpus of prose, dialogue, code and numbers.
    #[arg(long, value_name = "FILE.txt")]
    pub calibrate: Option<PathBuf>,
    /// Calibration tokens (the text is repeated if shorter) [default: 1024, or 512 for a base
    /// whose layers hold over 2B weights]
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub calibrate_tokens: Option<usize>,
    /// Share of the calibration's weight given to the directions the adapter itself reads its
    /// input along (0: the text's inputs alone). Raise it when the calibration text is unlike
    /// the data the adapter was trained on; lower it for an adapter that was not trained.
    #[arg(long, value_name = "W", default_value_t = preserve::DEFAULT_ADAPTER_WEIGHT, value_parser = parse_adapter_weight)]
    pub adapter_weight: f32,
    /// Tokens per forward chunk of the calibration pass.
    #[arg(long, value_name = "N", default_value_t = calibrate::DEFAULT_CTX, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=131_072))]
    pub ctx: usize,
    /// Write one file even when the base is a split set.
    #[arg(long)]
    pub no_split: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `merge --requant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RequantArg {
    Preserve,
    Nearest,
}

fn load_adapter(
    spec: &str,
    scale: f32,
    base: &GgufModel,
) -> anyhow::Result<(AdapterInput, gguf_lora::adapter::Adapter)> {
    let path = Path::new(spec);
    let name = path
        .file_name()
        .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
    Ok(open_adapter(path, base, name, scale)?)
}

/// The calibration of `--requant preserve`, from the flags.
fn calibration(
    args: &Args,
    model: &GgufModel,
    inputs: &[AdapterInput],
    opened: &[gguf_lora::adapter::Adapter],
    retype: &[(String, GgmlType)],
) -> anyhow::Result<RequantMethod> {
    let text = match &args.calibrate {
        Some(p) => Some((
            std::fs::read(p)
                .with_context(|| format!("{}: cannot read the calibration text", p.display()))?,
            p.display().to_string(),
        )),
        None => None,
    };
    let text = CalibrationText {
        text,
        max_tokens: args.calibrate_tokens,
        ctx: args.ctx,
        adapter_weight: args.adapter_weight,
    };
    let adapters: Vec<&gguf_lora::adapter::Adapter> = opened.iter().collect();
    Ok(calibrate::preserve_method(
        model,
        inputs,
        &adapters,
        args.outtype,
        retype,
        &text,
    )?)
}

#[derive(Serialize)]
struct JsonOut<'a> {
    outputs: Vec<String>,
    /// How merged tensors were requantized, as the output's metadata says.
    requant: String,
    #[serde(flatten)]
    report: &'a MergeReport,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let specs = args.lora.adapters()?;
    args.threads.run(|| {
        let model = GgufModel::open(args.base.path())?;
        let opened = specs
            .iter()
            .map(|(s, scale)| load_adapter(s, *scale, &model))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let adapter_paths: Vec<&Path> = specs.iter().map(|(s, _)| Path::new(s.as_str())).collect();
        let output = Output {
            path: &args.out.output,
            no_split: args.no_split,
            other_inputs: &adapter_paths,
        };
        let (adapters, opened): (Vec<AdapterInput>, Vec<gguf_lora::adapter::Adapter>) =
            opened.into_iter().unzip();
        let requant = match args.requant {
            RequantArg::Nearest => RequantMethod::Nearest { fallback: None },
            RequantArg::Preserve => {
                let retype = retypes(&args);
                merge::check(&model, &adapters, args.outtype, &retype, &output)?;
                calibration(&args, &model, &adapters, &opened, &retype)?
            }
        };
        if let RequantMethod::Nearest {
            fallback: Some(why),
        } = &requant
        {
            eprintln!(
                "gguf-lora: warning: the merge cannot calibrate on this base ({why}), so merged \
                 tensors are rounded to nearest and keep less of the adapter: see the report, \
                 and --promote auto or a wider --outtype to keep more"
            );
        }
        let opts = MergeOptions {
            outtype: args.outtype,
            promote: args.promote.clone().unwrap_or(Promote::None),
            requant,
            retype: retypes(&args),
            ..Default::default()
        };
        let progress = TensorProgress::new(&model);
        let on_done = |i: usize, b: u64| progress.on_done(i, b);
        let (report, written) = merge_model(&model, &adapters, &opts, &output, &on_done)?;
        progress.finish();
        let outputs: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        let text = if args.json.json {
            let mut s = serde_json::to_string_pretty(&JsonOut {
                outputs,
                requant: requant_key(&opts.requant),
                report: &report,
            })?;
            s.push('\n');
            s
        } else {
            render(
                &report,
                &outputs,
                &specs,
                args.promote.as_ref(),
                &requant_key(&opts.requant),
            )
        };
        print_stdout(&text)?;
        Ok(Outcome::Success)
    })
}

/// The tensors `--token-embedding-type` and `--output-tensor-type` name, with their types.
fn retypes(args: &Args) -> Vec<(String, GgmlType)> {
    [
        ("token_embd.weight", args.token_embedding_type),
        ("output.weight", args.output_tensor_type),
    ]
    .into_iter()
    .filter_map(|(name, ty)| Some((name.to_string(), ty?)))
    .collect()
}

fn err_str(e: Option<f64>) -> String {
    e.map_or_else(|| "-".to_string(), fixed3)
}

/// `a` or `a..b`.
fn range<T: PartialEq + std::fmt::Display>(lo: T, hi: T) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}..{hi}")
    }
}

fn render(
    r: &MergeReport,
    outputs: &[String],
    specs: &[(String, f32)],
    promote: Option<&Promote>,
    requant: &str,
) -> String {
    let mut out = String::new();
    let s = &r.summary;
    let _ = writeln!(out, "wrote {}", outputs.join(", "));

    // What went in.
    let mut t = Table::new(&["adapter", ">scale", ">alpha/rank", ">rank", ">tensors"]);
    for ((spec, scale), i) in specs.iter().zip(&s.inputs) {
        let note = match *scale {
            0.0 => " (zero: changes nothing)",
            x if x < 0.0 => " (negative: subtracts the adapter)",
            _ => "",
        };
        t.row(vec![
            format!("{spec}{note}"),
            short(f64::from(*scale)),
            range(
                short(f64::from(i.min_lora_scale)),
                short(f64::from(i.max_lora_scale)),
            ),
            range(i.min_rank, i.max_rank),
            i.tensors.to_string(),
        ]);
    }
    out.push_str(&t.render(0));

    let _ = writeln!(
        out,
        "merged {} tensors, {}copied {} byte for byte; {} → {} (×{:.3}){}{}",
        s.tensors_merged,
        match s.tensors_retyped {
            0 => String::new(),
            n => format!("retyped {n} untouched, "),
        },
        s.tensors_copied,
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.size_ratio,
        promotions_text(r),
        if s.tensors_fallback > 0 {
            format!(
                "; {} fell back to another type (row length not a multiple of the block)",
                s.tensors_fallback
            )
        } else {
            String::new()
        },
    );

    // Promotions made, per (from, to), with what they cost.
    if let Some(p) = promote {
        let mut moves: BTreeMap<(String, String), (usize, i128)> = BTreeMap::new();
        for t in r.tensors.iter().filter(|t| t.promoted) {
            let planned = planned_bytes(t);
            let e = moves
                .entry((t.type_in.clone(), t.type_out.clone()))
                .or_default();
            e.0 += 1;
            e.1 += t.bytes_out as i128 - planned as i128;
        }
        if moves.is_empty() {
            let _ = writeln!(
                out,
                "--promote {}: no tensor promoted (each merged tensor is already of that size or larger)",
                promote_text(p)
            );
        } else {
            let _ = writeln!(out, "\npromotions (--promote {}):", promote_text(p));
            let mut t = Table::new(&["", ">tensors", ">size change"]);
            for ((from, to), (n, bytes)) in &moves {
                let sign = if *bytes < 0 { "-" } else { "+" };
                t.row(vec![
                    format!("{from} → {to}"),
                    format!("×{n}"),
                    format!("{sign}{}", human_bytes(bytes.unsigned_abs() as u64)),
                ]);
            }
            out.push_str(&t.render(2));
        }
    }

    // Tensors given their own type with no adapter touching them: what they gave back or took,
    // and the rounding they got (which no adapter's share measures).
    for t in r.tensors.iter().filter(|t| t.adapters.is_empty()) {
        let delta = t.bytes_out as i128 - t.bytes_in as i128;
        let _ = writeln!(
            out,
            "{}: {} → {}{} (no adapter touches it), {}{}, RMS rounding error {:.2e}{}",
            t.name,
            t.type_in,
            t.type_out,
            if t.fallback { " (fallback)" } else { "" },
            if delta < 0 { "-" } else { "+" },
            human_bytes(delta.unsigned_abs() as u64),
            t.rms_error,
            match t.output_error_vs_nearest {
                Some(r) => format!(
                    "; weighted by the output head's inputs, its output error is ×{r:.2} of rounding to nearest"
                ),
                None => String::new(),
            },
        );
    }
    let _ = writeln!(out, "requantization: {requant}");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "adapter kept by the requantization ({}; kept = share of the adapter's change written, noise = everything the rounding got wrong relative to that change):",
        if s.measured_in == "outputs" {
            "measured on each tensor's outputs over held-out calibration tokens"
        } else {
            "measured on the weights"
        }
    );
    let mut table = Table::new(&[
        "type",
        ">tensors",
        ">kept",
        ">noise",
        ">nearest kept",
        ">noise",
        "choices that keep more (kept, whole-file size)",
    ]);
    for t in &s.per_type {
        let better = |k: Option<f64>| match (k, t.kept.share_kept) {
            (Some(k), Some(w)) => k > w,
            _ => false,
        };
        let others: Vec<String> = t
            .options
            .iter()
            .skip(1)
            .filter(|o| better(o.kept.share_kept))
            .map(|o| {
                format!(
                    "{} {} ×{:.3}",
                    o.choice,
                    err_str(o.kept.share_kept),
                    o.size_ratio
                )
            })
            .collect();
        table.row(vec![
            t.type_in.clone(),
            t.tensors.to_string(),
            err_str(t.kept.share_kept),
            err_str(t.kept.noise),
            err_str(t.nearest.and_then(|n| n.share_kept)),
            err_str(t.nearest.and_then(|n| n.noise)),
            if others.is_empty() {
                "-".to_string()
            } else {
                others.join(", ")
            },
        ]);
    }
    out.push_str(&table.render(0));
    for t in s.per_type.iter().filter(|t| t.lossy) {
        let fix = match &t.suggested_promotion {
            Some(p) => {
                let o = t.options.iter().find(|o| &o.choice == p);
                format!(
                    "; --promote {p} would keep {} at ×{:.3} the base size (or try --promote auto)",
                    err_str(o.and_then(|o| o.kept.share_kept)),
                    o.map_or(0.0, |o| o.size_ratio)
                )
            }
            None => "; try --promote q8_0 or --promote auto".to_string(),
        };
        let _ = writeln!(
            out,
            "warning: the {} {} {} only {} of the adapter's change{fix}",
            t.tensors,
            t.type_in,
            if t.tensors == 1 {
                "tensor keeps"
            } else {
                "tensors keep"
            },
            err_str(t.kept.share_kept)
        );
    }
    let mut worst: Vec<_> = r
        .tensors
        .iter()
        .filter(|t| t.kept.share_kept.is_some())
        .collect();
    worst.sort_by(|a, b| {
        let k = |t: &&gguf_lora::engine::TensorReport| t.kept.share_kept.unwrap_or(1.0);
        k(a).total_cmp(&k(b))
    });
    if worst
        .first()
        .and_then(|t| t.kept.share_kept)
        .is_some_and(|k| k < 0.95)
    {
        let _ = writeln!(out);
        let _ = writeln!(out, "tensors that keep least (of {}):", s.tensors_merged);
        for t in worst.iter().take(5) {
            let _ = writeln!(
                out,
                "  {:<36} {} → {}{}  kept {}  noise {}{}",
                t.name,
                t.type_in,
                t.type_out,
                if t.fallback { " (fallback)" } else { "" },
                err_str(t.kept.share_kept),
                err_str(t.kept.noise),
                t.nearest.map_or(String::new(), |n| format!(
                    "  (nearest: kept {}, noise {})",
                    err_str(n.share_kept),
                    err_str(n.noise)
                ))
            );
        }
    }
    out
}

/// "; N promoted[, M demoted]" for the tensors `--promote` gave another type than planned (a
/// demotion gives bytes back: `--promote auto` funds promotions with them).
fn promotions_text(r: &MergeReport) -> String {
    let moved = || r.tensors.iter().filter(|t| t.promoted);
    let demoted = moved().filter(|t| t.bytes_out < planned_bytes(t)).count();
    match (moved().count() - demoted, demoted) {
        (0, 0) => String::new(),
        (up, 0) => format!("; {up} promoted"),
        (up, down) => format!("; {up} promoted, {down} demoted"),
    }
}

/// The bytes `t` would have taken in its planned type, before `--promote` (its first candidate).
fn planned_bytes(t: &TensorReport) -> u64 {
    t.candidates.first().map_or(t.bytes_in, |c| c.bytes)
}

/// `--promote` as the user gave it, in the report's terms.
fn promote_text(p: &Promote) -> String {
    gguf_lora::merge::promote_key(p).unwrap_or_else(|| "none".into())
}
