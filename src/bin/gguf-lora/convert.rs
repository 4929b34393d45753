//! `gguf-lora convert ADAPTER -o OUT.gguf [--base BASE.gguf | --arch ARCH] [--outtype ...] [--json]`:
//! flags in, the library's [`gguf_lora::convert`] does the work, a table or one JSON object out.

use std::path::PathBuf;

use gguf_lora::adapter::gguf::FactorType;
use gguf_lora::convert::{convert, ConvertOptions, ConvertReport};

use crate::args::{JsonArg, OutArg};
use crate::table::{human_bytes, short, Table};
use crate::{print_stdout, Outcome};

/// Convert a PEFT LoRA adapter (or a GGUF LoRA, to re-type it) to a GGUF LoRA adapter for llama.cpp.
///
/// --base BASE.gguf is the safe choice: every target is checked against the base's tensors. --arch
/// is enough when the adapter's own shapes say everything, which is not the case for a llama-family
/// model's q_proj/k_proj (their rows are RoPE-permuted by head, and the head counts come from the
/// base), a base that ties its output to the embeddings, or a partially adapted MoE layer: those
/// need --base.
#[derive(clap::Args)]
pub struct Args {
    /// PEFT adapter directory, PEFT .safetensors file (adapter_config.json beside it), or GGUF LoRA
    /// (or BUNDLE.gguf#NAME).
    adapter: PathBuf,
    #[command(flatten)]
    out: OutArg,
    /// Base model GGUF: gives the architecture and head counts, and every target is checked against
    /// it (-m/--model as llama.cpp spells it).
    #[arg(
        long,
        short = 'm',
        visible_alias = "model",
        conflicts_with = "arch",
        value_name = "BASE.gguf"
    )]
    base: Option<PathBuf>,
    /// Architecture when no base is at hand: llama, mistral, mixtral, qwen2, qwen2moe, qwen3, qwen3moe,
    /// gemma, gemma2, gemma3 or phi3 (see above for when --base is needed instead).
    #[arg(long, value_parser = parse_arch)]
    arch: Option<String>,
    /// Tensor type of lora_a/lora_b (q8_0 falls back to f16 where rows are not multiples of 32).
    #[arg(long, default_value = "f32", value_parser = crate::factor_type_parser())]
    outtype: FactorType,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let opts = ConvertOptions {
        base: args.base,
        arch: args.arch,
        outtype: args.outtype,
    };
    let report = convert(&args.adapter, &args.out.output, &opts)?;
    let text = if args.json.json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        render(&report)
    };
    print_stdout(&text)?;
    Ok(Outcome::Success)
}

/// `--arch`: an architecture we map (any case, HF family names too).
fn parse_arch(s: &str) -> Result<String, String> {
    gguf_lora::arch::BaseInfo::from_arch(s)
        .map(|b| b.arch)
        .map_err(|e| e.to_string())
}

fn render(r: &ConvertReport) -> String {
    let mut out = format!(
        "{} → {} ({}, {} tensors, {}, adapter.lora.alpha = {})\n",
        r.input.display(),
        r.output.display(),
        r.arch,
        r.written.n_tensors,
        human_bytes(r.written.bytes),
        short(f64::from(r.written.alpha))
    );
    let mut t = Table::new(&["target", "source", ">rank", ">alpha", ">scale", "notes"]);
    for c in &r.tensors {
        let mut notes = Vec::new();
        if c.permuted {
            notes.push("rope-permuted".to_string());
        }
        if let Some((_, f)) = r.written.folded.iter().find(|(n, _)| *n == c.target) {
            notes.push(format!("scale folded into B (×{})", short(*f)));
        }
        t.row(vec![
            c.target.clone(),
            c.source.clone(),
            c.rank.to_string(),
            short(c.alpha),
            short(c.scale),
            notes.join(", "),
        ]);
    }
    out.push_str(&t.render(2));
    if !r.written.f16_fallback.is_empty() {
        out.push_str(&format!(
            "  {} tensor(s) written as f16: rows not a multiple of 32 (as convert_lora_to_gguf.py does)\n",
            r.written.f16_fallback.len()
        ));
    }
    out
}
