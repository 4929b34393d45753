//! `gguf-lora verify BASE.gguf --lora ADAPTER... --merged MERGED.gguf [...]`: runs base, base + runtime
//! LoRA and the merged model over the same tokens ([`gguf_lora::verify`]) and prints how far apart
//! they are; exit 3 when a check fails. The tokens are ids (`--tokens`), seeded random ids, or a text
//! (`--text`, `--text-file`) tokenized by the base model's own tokenizer as llama.cpp tokenizes it;
//! `--generate N` adds the three models' greedy continuations, side by side.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use gguf_lora::gguf::GgufModel;
use gguf_lora::tokenizer::Tokenizer;
use gguf_lora::verify::forward::Model;
use gguf_lora::verify::{
    self, Generation, VerifyOptions, VerifyReport, DEFAULT_CTX, DEFAULT_N_TOKENS,
};
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
    /// A text to run, tokenized by the base model's own tokenizer as llama.cpp does it (BOS as the
    /// model says; control-token texts such as <start_of_turn> become their ids).
    #[arg(long, conflicts_with_all = ["tokens", "seed", "n_tokens", "text_file"])]
    text: Option<String>,
    /// The same with the text read from a file (`-` for standard input).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tokens", "seed", "n_tokens"])]
    text_file: Option<PathBuf>,
    /// Positions per chunk: a longer input runs as consecutive chunks, each from position 0 (a
    /// text's BOS starts each), and every comparison is over all positions of all chunks. Clamped
    /// to the model's context length.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CTX as u32, value_parser = clap::value_parser!(u32).range(1..))]
    ctx: u32,
    /// Continue the input (its last chunk) greedily by N tokens under base, runtime LoRA and merged
    /// model, and show the three continuations side by side.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    generate: Option<u32>,
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

/// The input text of `--text` / `--text-file`, if one was given.
fn read_text(args: &Args) -> Result<Option<Vec<u8>>> {
    if let Some(t) = &args.text {
        if t.is_empty() {
            return Err(UsageError("--text: the text is empty".into()).into());
        }
        return Ok(Some(t.clone().into_bytes()));
    }
    let Some(path) = &args.text_file else {
        return Ok(None);
    };
    let bytes = if path.as_os_str() == "-" {
        use std::io::Read;
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("--text-file -: cannot read standard input")?;
        buf
    } else {
        std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?
    };
    if bytes.is_empty() {
        anyhow::bail!("{}: the text file is empty", path.display());
    }
    Ok(Some(bytes))
}

fn check(args: &Args) -> Result<Outcome> {
    let adapters = args.lora.adapters()?;
    if args.tokens.as_ref().is_some_and(Vec::is_empty) {
        return Err(UsageError("--tokens: no token ids given".into()).into());
    }
    let text = read_text(args)?;
    let base = GgufModel::open(args.base.path())?;
    let base_name = args.base.path().display().to_string();
    // Architecture and shape checks first: they explain more than an adapter mismatch would.
    let n_vocab = Model::new(&base)?.n_vocab()?;
    // The model's tokenizer: needed for a text; otherwise only nice to have (BOS, end of
    // generation, text of the continuations), so ids still run on a model whose tokenizer we lack.
    let tokenizer = Tokenizer::from_metadata(base.metadata());
    let tokens = match (&text, &args.tokens) {
        (Some(text), _) => {
            let tok = tokenizer
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{base_name}: {e}"))?;
            let ids = tok
                .tokenize(text, true, true)
                .with_context(|| format!("{base_name}: cannot tokenize the text"))?;
            if ids.is_empty() {
                anyhow::bail!("{base_name}: the text gives no tokens");
            }
            ids
        }
        (None, Some(t)) => t.clone(),
        (None, None) => verify::seeded_tokens(args.seed, args.n_tokens.into(), n_vocab),
    };
    let tokenizer = tokenizer.ok();
    // Without --merged: the merge `gguf-lora merge` would write (types kept), in a temporary file.
    let (_guard, merged) = match &args.merged {
        Some(p) => (None, GgufModel::open(p)?),
        None => {
            let (dir, m) = verify::merge_to_temp(&base, &adapters)?;
            (Some(dir), m)
        }
    };
    let lora = verify::load_adapters(&base, &adapters)?;
    let bos = tokenizer.as_ref().and_then(|t| t.specials().bos);
    let opts = VerifyOptions {
        chunk_start: bos.filter(|b| tokens.first() == Some(b)),
        tokens,
        ctx: args.ctx as usize,
        generate: args.generate.unwrap_or(0) as usize,
        stop: tokenizer
            .as_ref()
            .map(|t| t.eog().clone())
            .unwrap_or_default(),
        logits_out: args.logits_out.clone(),
        max_kl: args.max_kl,
        max_kl_ratio: args.max_kl_ratio,
        min_top1: args.min_top1,
        min_share: args.min_share,
    };
    let mut report =
        verify::run(&base, &lora, &merged, &opts).map_err(|e| match &args.logits_out {
            Some(dir)
                if matches!(
                    e,
                    verify::VerifyError::Write { .. }
                        | verify::VerifyError::Output(_)
                        | verify::VerifyError::CreateDir { .. }
                ) =>
            {
                anyhow::Error::new(e).context(format!("--logits-out {}", dir.display()))
            }
            _ => e.into(),
        })?;
    if let (Some(g), Some(tok)) = (&mut report.generation, &tokenizer) {
        g.add_text(tok)?;
    }
    let report = &report;
    if args.json.json {
        let mut s = serde_json::to_string_pretty(&JsonOut {
            base: base_name,
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
        let mut out = render(args, &adapters, report);
        if let Some(g) = &report.generation {
            out.push_str(&render_generation(g, report, tokenizer.as_ref())?);
        }
        print_stdout(&out)?;
    }
    Ok(if report.passed() {
        Outcome::Success
    } else {
        Outcome::CheckFailed
    })
}

/// The three continuations as text, then token by token in columns, the first position where
/// merged and runtime differ marked with `>>`.
fn render_generation(g: &Generation, r: &VerifyReport, tok: Option<&Tokenizer>) -> Result<String> {
    let mut out = String::new();
    let prompt = if r.chunks.len() > 1 {
        format!("the last chunk ({} positions)", g.prompt_tokens)
    } else {
        format!("the input ({} tokens)", g.prompt_tokens)
    };
    let _ = writeln!(
        out,
        "\ngreedy continuations of {prompt}, up to {} tokens:",
        g.requested
    );
    let rows = [
        ("base", &g.base),
        ("runtime", &g.runtime),
        ("merged", &g.merged),
    ];
    let Some(tok) = tok else {
        for (label, c) in rows {
            let ids: Vec<String> = c.tokens.iter().map(u32::to_string).collect();
            let _ = writeln!(out, "  {label:<8} {}", ids.join(","));
        }
        let _ = writeln!(
            out,
            "(no text: the model's tokenizer is not supported; ids shown)"
        );
        return Ok(out);
    };
    let d = g.first_divergence;
    for (label, c) in rows {
        // The divergence mark goes into runtime's and merged's text at the token where they part.
        let text = match d {
            Some(i) if label != "base" && i <= c.tokens.len() => format!(
                "{}>>{}",
                c.text_of(tok, 0..i)?,
                c.text_of(tok, i..c.tokens.len())?
            ),
            _ => c.text_of(tok, 0..c.tokens.len())?,
        };
        let end = if c.stopped {
            " [end of generation]"
        } else {
            ""
        };
        let _ = writeln!(out, "  {label:<8} {text:?}{end}");
    }
    match d {
        None => {
            let _ = writeln!(
                out,
                "merged and runtime agree on all {} tokens",
                g.runtime.tokens.len()
            );
        }
        Some(i) => {
            let _ = writeln!(
                out,
                "merged and runtime first differ at token {i} (marked >>)"
            );
        }
    }
    let piece = |c: &verify::Continuation, i: usize| -> Result<String> {
        Ok(match c.tokens.get(i) {
            Some(&id) => format!(
                "{id} {:?}",
                String::from_utf8_lossy(tok.token_to_piece(id, true)?)
            ),
            None => String::new(),
        })
    };
    let n = rows.iter().map(|(_, c)| c.tokens.len()).max().unwrap_or(0);
    let mut t = Table::new(&["", ">#", "base", "runtime", "merged"]);
    for i in 0..n {
        t.row(vec![
            if d == Some(i) {
                ">>".into()
            } else {
                String::new()
            },
            i.to_string(),
            piece(&g.base, i)?,
            piece(&g.runtime, i)?,
            piece(&g.merged, i)?,
        ]);
    }
    out.push_str(&t.render(2));
    Ok(out)
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
    if r.chunks.len() > 1 {
        let _ = writeln!(
            out,
            "run in {} chunks of at most {} positions; {} positions compared",
            r.chunks.len(),
            r.ctx,
            r.n_positions
        );
    }
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
