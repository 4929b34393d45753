//! `gguf-lora convert ADAPTER -o OUT.gguf [--base BASE.gguf | --arch ARCH] [--outtype ...] [--json]`:
//! flags in, the library's [`gguf_lora::convert`] does the work, a table or one JSON object out.

use std::path::PathBuf;

use gguf_lora::adapter::gguf::FactorType;
use gguf_lora::convert::{convert, ConvertOptions, ConvertReport};

use crate::args::JsonArg;
use crate::table::{human_bytes, Table};
use crate::{print_stdout, Outcome};

/// Convert a PEFT LoRA adapter (or a GGUF LoRA, to re-type it) to a GGUF LoRA adapter for llama.cpp.
#[derive(clap::Args)]
pub struct Args {
    /// PEFT adapter directory, PEFT .safetensors file (adapter_config.json beside it), or GGUF LoRA.
    adapter: PathBuf,
    /// Output GGUF file (written atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// Base model GGUF: gives the architecture and head counts, and every target is checked against it.
    #[arg(long, conflicts_with = "arch")]
    base: Option<PathBuf>,
    /// Architecture (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, ...) when no base is
    /// at hand; llama-family q/k adapters still need --base for the head counts.
    #[arg(long)]
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
    let report = convert(&args.adapter, &args.output, &opts)?;
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

fn render(r: &ConvertReport) -> String {
    let mut out = format!(
        "{} → {} ({}, {} tensors, {}, adapter.lora.alpha = {})\n",
        r.input.display(),
        r.output.display(),
        r.arch,
        r.written.n_tensors,
        human_bytes(r.written.bytes),
        r.written.alpha
    );
    let mut t = Table::new(&["target", "source", ">rank", ">alpha", ">scale", "notes"]);
    for c in &r.tensors {
        let mut notes = Vec::new();
        if c.permuted {
            notes.push("rope-permuted".to_string());
        }
        if let Some((_, f)) = r.written.folded.iter().find(|(n, _)| *n == c.target) {
            notes.push(format!("scale folded into B (×{f:.6})"));
        }
        t.row(vec![
            c.target.clone(),
            c.source.clone(),
            c.rank.to_string(),
            format!("{}", c.alpha),
            format!("{:.6}", c.scale),
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
