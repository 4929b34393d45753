//! `gguf-lora bundle ADAPTER[:SCALE]... -o OUT.gguf [--mode concat|named] [--base BASE.gguf] [--json]`
//! and `gguf-lora bundle --extract NAME BUNDLE.gguf -o OUT.gguf`: flags in, the library's
//! [`gguf_lora::bundle`] does the work, a table or one JSON object out.

use std::path::PathBuf;

use anyhow::bail;
use gguf_lora::adapter::gguf::FactorType;
use gguf_lora::bundle::{bundle, extract, BundleOptions, BundleReport, InputSpec, Mode};

use crate::args::JsonArg;
use crate::table::{human_bytes, Table};
use crate::{print_stdout, Outcome};

/// Put several LoRA adapters into one file: one standard adapter applying all of them (concat), or
/// a container to select (BUNDLE.gguf#NAME) and extract them from by name (named).
#[derive(clap::Args)]
pub struct Args {
    /// Adapters as [NAME=]PATH[:SCALE]: GGUF LoRA, PEFT directory or .safetensors, or BUNDLE.gguf#NAME.
    /// With --extract: the one bundle file.
    #[arg(value_name = "ADAPTER[:SCALE]", required = true)]
    adapters: Vec<String>,
    /// Output GGUF file (written atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// concat: one GGUF LoRA equal to applying every input at its scale; named: a container by name.
    #[arg(long, default_value = "concat", value_parser = mode_parser())]
    mode: Mode,
    /// Base model GGUF: every input is checked against it (architecture, tensor names, shapes).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Tensor type of a concat bundle's lora_a/lora_b (q8_0 falls back to f16 for short rows).
    #[arg(long, default_value = "f32", value_parser = crate::factor_type_parser())]
    outtype: FactorType,
    /// Write adapter NAME of the named bundle given as the one positional argument to --output.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["mode", "base", "outtype"])]
    extract: Option<String>,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let text = if let Some(name) = &args.extract {
        let [bundle_path] = args.adapters.as_slice() else {
            bail!("--extract NAME takes exactly one bundle file: gguf-lora bundle --extract NAME BUNDLE.gguf -o OUT.gguf");
        };
        let r = extract(&PathBuf::from(bundle_path), name, &args.output)?;
        if args.json.json {
            json(&r)?
        } else {
            format!(
                "{}#{} → {} ({} tensors, {})\n",
                r.bundle.display(),
                r.name,
                r.output.display(),
                r.n_tensors,
                human_bytes(r.bytes)
            )
        }
    } else {
        let specs = args
            .adapters
            .iter()
            .map(|s| InputSpec::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let opts = BundleOptions {
            mode: args.mode,
            base: args.base,
            outtype: args.outtype,
        };
        let r = bundle(&specs, &args.output, &opts)?;
        if args.json.json {
            json(&r)?
        } else {
            render(&r)
        }
    };
    print_stdout(&text)?;
    Ok(Outcome::Success)
}

/// `--mode`: the library's [`Mode`], with the possible values and their help listed by clap.
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new([
        PossibleValue::new("concat")
            .help("One standard GGUF LoRA applying all inputs at their scales"),
        PossibleValue::new("named").help(
            "A container of the inputs, each selectable (`BUNDLE.gguf#NAME`) and extractable by name",
        ),
    ])
    .try_map(|s| s.parse::<Mode>())
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

fn render(r: &BundleReport) -> String {
    let mode = r.mode.name();
    let mut out = format!(
        "{} bundle → {} ({}, {} adapters, {} tensors, {}{})\n",
        mode,
        r.output.display(),
        r.arch,
        r.adapters.len(),
        r.n_tensors,
        human_bytes(r.bytes),
        r.alpha
            .map(|a| format!(", adapter.lora.alpha = {a}"))
            .unwrap_or_default()
    );
    let mut t = Table::new(&[
        "name", "source", "format", ">scale", ">alpha", ">targets", ">rank",
    ]);
    for a in &r.adapters {
        let rank = if a.min_rank == a.max_rank {
            a.min_rank.to_string()
        } else {
            format!("{}..{}", a.min_rank, a.max_rank)
        };
        t.row(vec![
            a.name.clone(),
            a.source.display().to_string(),
            format!("{:?}", a.format).to_lowercase(),
            format!("{}", a.scale),
            format!("{}", a.alpha),
            a.n_targets.to_string(),
            rank,
        ]);
    }
    out.push_str(&t.render(2));
    if !r.targets.is_empty() {
        let mut t = Table::new(&["target", ">rank", "parts (adapter: rank × folded scale)"]);
        for c in &r.targets {
            t.row(vec![
                c.target.clone(),
                c.rank.to_string(),
                c.parts
                    .iter()
                    .map(|p| format!("{}: {} × {:.6}", p.adapter, p.rank, p.scale))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render(2));
    }
    out
}
