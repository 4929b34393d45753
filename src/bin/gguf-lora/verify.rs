//! `gguf-lora verify BASE.gguf --lora ADAPTER... --merged MERGED.gguf [...]`: runs base, base + runtime
//! LoRA and the merged model over the same tokens ([`gguf_lora::verify`]) and prints how far apart
//! they are; exit 3 when a check fails.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use gguf_lora::gguf::GgufModel;
use gguf_lora::verify::forward::Model;
use gguf_lora::verify::{self, VerifyOptions, VerifyReport, DEFAULT_N_TOKENS};
use serde::Serialize;

use crate::args::{JsonArg, ThreadsArg};
use crate::lora_args::LoraArgs;
use crate::table::Table;
use crate::{print_stdout, Outcome};

/// Check that a merged model gives the logits of its base with the adapters applied at runtime.
#[derive(clap::Args)]
pub struct Args {
    /// Base model GGUF (or any shard of a split set).
    base: PathBuf,
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
    /// Length of the seeded token sequence.
    #[arg(long, default_value_t = DEFAULT_N_TOKENS)]
    n_tokens: usize,
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
    let base = GgufModel::open(&args.base)?;
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
        Some(t) if t.is_empty() => bail!("--tokens: no token ids given"),
        Some(t) => t.clone(),
        None => {
            if args.n_tokens == 0 || args.n_tokens > 4096 {
                bail!("--n-tokens must be between 1 and 4096");
            }
            verify::seeded_tokens(args.seed, args.n_tokens, n_vocab)
        }
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
            base: args.base.display().to_string(),
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
    let _ = writeln!(out, "base      {}", args.base.display());
    for (p, s) in adapters {
        let _ = writeln!(out, "adapter   {p} (scale {s})");
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
            format!("{:.3e}", s.mean_kl),
            format!("{:.3e}", s.max_kl),
            format!("{:.3}", s.top1_agreement),
        ]);
    }
    out.push_str(&t.render(0));
    let _ = writeln!(
        out,
        "share of the adapter's effect kept: {}",
        c.share_kept
            .map_or("n/a".to_string(), |s| format!("{s:.3}"))
    );
    let th = &c.thresholds;
    let _ = writeln!(
        out,
        "limits ({:?}): mean KL <= {:.3e} and <= {:.2} x KL(runtime||base), top-1 >= {:.2}, share >= {:.2}",
        r.merged_types.fidelity, th.max_kl, th.max_kl_ratio, th.min_top1, th.min_share
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
