//! `gguf-lora extract BASE FINETUNED -o ADAPTER.gguf [--rank R|auto[:ENERGY]] [--max-rank R]
//! [--outtype T] [-t N] [--json]`: flags in, [`gguf_lora::extract`] does the work, a table or one JSON
//! object out.

use std::fmt::Write;
use std::path::PathBuf;

use gguf_lora::adapter::gguf::FactorType;
use gguf_lora::extract::{extract, ExtractOptions, ExtractReport, RankChoice, DEFAULT_MAX_RANK};

use crate::args::{JsonArg, OutArg, ThreadsArg};
use crate::progress::CountProgress;
use crate::table::{fixed3, human_bytes, plural, sci, Table};
use crate::{print_stdout, Outcome};

/// Extract a LoRA adapter from a fine-tuned model and its base (truncated SVD of each delta).
///
/// BASE and FINETUNED are GGUF models (any type, single or split) or HF safetensors checkpoints (a
/// directory with config.json and model.safetensors or model.safetensors.index.json, or the file).
/// Both must have the same architecture and shapes. The report gives, per tensor, the rank, the share
/// of the delta's energy (‖Δ‖²) kept and the relative residual; `gguf-lora verify BASE --lora ADAPTER
/// --merged FINETUNED` checks the result end to end.
#[derive(clap::Args)]
pub struct Args {
    /// The base model.
    #[arg(value_name = "BASE")]
    base: PathBuf,
    /// The fine-tuned model.
    #[arg(value_name = "FINETUNED")]
    finetuned: PathBuf,
    #[command(flatten)]
    out: OutArg,
    /// Rank of every tensor, or auto[:ENERGY]: per tensor the smallest rank keeping ENERGY of the
    /// delta's squared Frobenius norm (default 0.9), at most --max-rank.
    #[arg(long, default_value = "16", value_parser = parse_rank, value_name = "R|auto[:ENERGY]")]
    rank: RankChoice,
    /// Largest rank any tensor gets.
    #[arg(long, default_value_t = DEFAULT_MAX_RANK as u32, value_parser = clap::value_parser!(u32).range(1..), value_name = "R")]
    max_rank: u32,
    /// Tensor type of lora_a/lora_b (q8_0 falls back to f16 where rows are not multiples of 32).
    #[arg(long, default_value = "f32", value_parser = crate::factor_type_parser())]
    outtype: FactorType,
    /// Leave token_embd/output deltas out of the adapter (reported instead).
    #[arg(long)]
    no_embeddings: bool,
    #[command(flatten)]
    threads: ThreadsArg,
    #[command(flatten)]
    json: JsonArg,
}

fn parse_rank(s: &str) -> Result<RankChoice, String> {
    s.parse()
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let opts = ExtractOptions {
        rank: args.rank,
        max_rank: args.max_rank as usize,
        outtype: args.outtype,
        embeddings: !args.no_embeddings,
    };
    args.threads.run(|| {
        let progress = CountProgress::new("tensors");
        let on_tensor = |done: usize, total: usize| progress.set(done, total);
        let report = extract(
            &args.base,
            &args.finetuned,
            &args.out.output,
            &opts,
            &on_tensor,
        );
        progress.finish();
        let report = report?;
        let text = if args.json.json {
            let mut s = serde_json::to_string_pretty(&report)?;
            s.push('\n');
            s
        } else {
            render(&report)
        };
        print_stdout(&text)?;
        Ok(Outcome::Success)
    })
}

fn render(r: &ExtractReport) -> String {
    let t = &r.totals;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wrote {} ({}, {}, rank {}, {} extracted of {} compared, {} unchanged)",
        r.output.display(),
        r.arch,
        human_bytes(t.adapter_bytes),
        r.rank,
        t.tensors_extracted,
        t.tensors_compared,
        t.tensors_unchanged
    );
    let mut table = Table::new(&[
        "tensor",
        ">shape",
        "types",
        ">rank",
        ">energy",
        ">residual",
        ">|Δ|/|W|",
    ]);
    for x in &r.tensors {
        let types = if x.base_type == x.finetuned_type {
            x.base_type.clone()
        } else {
            format!("{}→{}", x.base_type, x.finetuned_type)
        };
        table.row(vec![
            x.name.clone(),
            if x.experts > 1 {
                format!("{}×{}×{}", x.experts, x.shape[0], x.shape[1])
            } else {
                format!("{}×{}", x.shape[0], x.shape[1])
            },
            types,
            x.rank.to_string(),
            fixed3(x.energy),
            sci(x.residual),
            sci(x.relative_delta),
        ]);
    }
    out.push_str(&table.render(2));
    let ranks = if t.min_rank == t.max_rank {
        t.min_rank.to_string()
    } else {
        format!("{}..{}", t.min_rank, t.max_rank)
    };
    let _ = writeln!(
        out,
        "total: energy kept {}, residual {}, ranks {ranks}; adapter {} = {:.2}% of the fine-tune ({})",
        fixed3(t.energy),
        sci(t.residual),
        human_bytes(t.adapter_bytes),
        100.0 * t.size_ratio,
        human_bytes(t.finetuned_bytes)
    );
    if !r.written.folded.is_empty() {
        let _ = writeln!(
            out,
            "adapter.lora.alpha = {}; {} whose rank differs {} rank/alpha folded into B",
            r.written.alpha,
            plural(r.written.folded.len(), "tensor"),
            if r.written.folded.len() == 1 {
                "carries"
            } else {
                "carry"
            }
        );
    }
    if !r.left_out.is_empty() {
        let _ = writeln!(out, "differ but not in the adapter:");
        let mut lt = Table::new(&["tensor", ">|Δ|/|W|", "why"]);
        for l in &r.left_out {
            lt.row(vec![
                l.name.clone(),
                sci(l.relative_delta),
                l.reason.to_string(),
            ]);
        }
        out.push_str(&lt.render(2));
    }
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}
