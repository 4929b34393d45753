//! `gguf-lora verify BASE.gguf --lora ADAPTER... --merged MERGED.gguf [...]`: runs base, base + runtime
//! LoRA and the merged model over the same tokens ([`gguf_lora::verify`]) and prints how far apart
//! they are; exit 3 when a check fails.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use gguf_lora::gguf::GgufModel;
use gguf_lora::verify::forward::Model;
use gguf_lora::verify::{self, VerifyOptions, VerifyReport, DEFAULT_N_TOKENS};
use serde::Serialize;

use crate::args::{JsonArg, ModelArg, ThreadsArg};
use crate::lora_args::LoraArgs;
use crate::table::{fixed3, sci, short, Table};
use crate::{print_stdout, Outcome, UsageError};

/// Check that a merged model gives the logits of its base with the adapters applied at runtime.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    base: ModelArg,
    #[command(flatten)]
    lora: LoraArgs,
    /// The merged model to check; without it, the adapters are merged as `gguf-lora merge` does
    /// (each tensor keeps its type) into a temporary file and that merge is checked.
    #[arg(long)]
    merged: Option<PathBuf>,
    /// Token ids to run, comma-separated (one sequence from position 0).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["seed", "n_tokens"])]
    tokens: Option<Vec<u32>>,
    /// Seed of the deterministic token sequence used without --tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Length of the seeded token sequence (1 to 4096).
    #[arg(long, default_value_t = DEFAULT_N_TOKENS as u16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    n_tokens: u16,
    /// Max mean KL(runtime||merged) (default by the merged tensors' type).
    #[arg(long)]
    max_kl: Option<f64>,
    /// Max ratio KL(runtime||merged) / KL(runtime||base) (default by type).
    #[arg(long)]
    max_kl_ratio: Option<f64>,
    /// Min top-1 agreement between runtime and merged (default by type).
    #[arg(long)]
    min_top1: Option<f64>,
    /// Min share of the adapter's effect the merged model keeps (default by type).
    #[arg(long)]
    min_share: Option<f64>,
    /// Write base.npy, runtime.npy and merged.npy (float32 [tokens, vocab]) into this directory.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    #[command(flatten)]
    threads: ThreadsArg,
    #[command(flatten)]
    json: JsonArg,
}

/// `--json`: what was checked and the report.
#[derive(Serialize)]
struct JsonOut<'a> {
    base: String,
    merged: Option<String>,
    adapters: Vec<JsonAdapter<'a>>,
    passed: bool,
    report: &'a VerifyReport,
}

#[derive(Serialize)]
struct JsonAdapter<'a> {
    path: &'a str,
    /// f64 as the JSON has always had it (the f32 scale widened).
    scale: f64,
}

pub fn run(args: Args) -> Result<Outcome> {
    args.threads.run(|| check(&args))
}

fn check(args: &Args) -> Result<Outcome> {
    let adapters = args.lora.adapters()?;
    if args.tokens.as_ref().is_some_and(Vec::is_empty) {
        return Err(UsageError("--tokens: no token ids given".into()).into());
    }
    let base = GgufModel::open(args.base.path())?;
    // Architecture and shape checks first: they explain more than an adapter mismatch would.
    let n_vocab = Model::new(&base)?.n_vocab()?;
    // Without --merged: the merge `gguf-lora merge` would write (types kept), in a temporary file.
    let (_guard, merged) = match &args.merged {
        Some(p) => (None, GgufModel::open(p)?),
        None => {
            let (dir, m) = verify::merge_to_temp(&base, &adapters)?;
            (Some(dir), m)
        }
    };
    let lora = verify::load_adapters(&base, &adapters)?;
    let tokens = match &args.tokens {
        Some(t) => t.clone(),
        None => verify::seeded_tokens(args.seed, args.n_tokens.into(), n_vocab),
    };
    let opts = VerifyOptions {
        tokens,
        max_kl: args.max_kl,
        max_kl_ratio: args.max_kl_ratio,
        min_top1: args.min_top1,
        min_share: args.min_share,
    };
    let run = verify::run(&base, &lora, &merged, &opts)?;
    if let Some(dir) = &args.logits_out {
        run.write_logits(dir)
            .with_context(|| format!("--logits-out {}", dir.display()))?;
    }
    let report = &run.report;
    if args.json.json {
        let mut s = serde_json::to_string_pretty(&JsonOut {
            base: args.base.path().display().to_string(),
            merged: args.merged.as_ref().map(|p| p.display().to_string()),
            adapters: adapters
                .iter()
                .map(|(p, s)| JsonAdapter {
                    path: p,
                    scale: f64::from(*s),
                })
                .collect(),
            passed: report.passed(),
            report,
        })?;
        s.push('\n');
        print_stdout(&s)?;
        for f in &report.comparison.failures {
            eprintln!("verify: FAIL: {f}");
        }
    } else {
        print_stdout(&render(args, &adapters, report))?;
    }
    Ok(if report.passed() {
        Outcome::Success
    } else {
        Outcome::CheckFailed
    })
}

fn render(args: &Args, adapters: &[(String, f32)], r: &VerifyReport) -> String {
    let mut out = String::new();
    let c = &r.comparison;
    let _ = writeln!(out, "base      {}", args.base.path().display());
    for (p, s) in adapters {
        let _ = writeln!(out, "adapter   {p} (scale {})", short(f64::from(*s)));
    }
    match &args.merged {
        Some(m) => {
            let _ = writeln!(out, "merged    {}", m.display());
        }
        None => {
            let _ = writeln!(
                out,
                "merged    (gguf-lora merge, types kept, in a temporary file)"
            );
        }
    }
    let types: Vec<String> = r
        .merged_types
        .types
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    let _ = writeln!(
        out,
        "{} model, {} tokens, vocabulary {}, {} adapted tensors merged as {}",
        r.architecture,
        r.tokens.len(),
        r.n_vocab,
        r.adapted_tensors,
        types.join(", ")
    );
    let _ = writeln!(out);
    let mut t = Table::new(&["", ">max |Δlogit|", ">mean KL", ">max KL", ">top-1"]);
    for (label, s) in [
        ("runtime vs base", &c.base_vs_runtime),
        ("merged vs runtime", &c.merged_vs_runtime),
    ] {
        t.row(vec![
            label.into(),
            format!("{:.4}", s.max_abs_diff),
            sci(s.mean_kl),
            sci(s.max_kl),
            fixed3(s.top1_agreement),
        ]);
    }
    out.push_str(&t.render(0));
    let _ = writeln!(
        out,
        "share of the adapter's effect kept: {}",
        c.share_kept.map_or("n/a".to_string(), fixed3)
    );
    let th = &c.thresholds;
    // Only the limits that are on (an infinite maximum or a zero minimum checks nothing).
    let mut limits = Vec::new();
    if th.max_kl.is_finite() {
        limits.push(format!("mean KL <= {}", sci(th.max_kl)));
    }
    if th.max_kl_ratio.is_finite() {
        limits.push(format!("KL <= {:.2} x KL(runtime||base)", th.max_kl_ratio));
    }
    if th.min_top1 > 0.0 {
        limits.push(format!("top-1 >= {:.2}", th.min_top1));
    }
    if th.min_share > f64::NEG_INFINITY {
        limits.push(format!("share >= {:.2}", th.min_share));
    }
    let _ = writeln!(
        out,
        "limits for {}: {}",
        r.merged_types.fidelity.describe(),
        if limits.is_empty() {
            "none".to_string()
        } else {
            limits.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "time: base + runtime {:.2} s, merged {:.2} s",
        r.timings.base_and_runtime_s, r.timings.merged_s
    );
    for n in &c.notes {
        let _ = writeln!(out, "note: {n}");
    }
    if r.passed() {
        let _ = writeln!(out, "PASS");
    } else {
        for f in &c.failures {
            let _ = writeln!(out, "FAIL: {f}");
        }
    }
    out
}
