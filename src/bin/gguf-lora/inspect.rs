//! `gguf-lora inspect FILE [--json]`: prints what the library's [`gguf_lora::inspect`] found (GGUF
//! model or adapter, safetensors file, PEFT adapter, or an adapter matched against `--base`), as
//! aligned tables or as exactly one JSON object.

use std::fmt::Write;
use std::path::PathBuf;

use gguf_lora::inspect::adapter::{match_report, AdapterMatchReport};
use gguf_lora::inspect::gguf::GgufReport;
use gguf_lora::inspect::gguf_adapter::GgufAdapterReport;
use gguf_lora::inspect::peft::PeftReport;
use gguf_lora::inspect::safetensors::SafetensorsReport;
use gguf_lora::inspect::{inspect, Report};
use serde_json::Value as Json;

use crate::args::JsonArg;
use crate::table::{human_bytes, plural, short as num, Table};
use crate::{print_stdout, Outcome};

/// Longest string value shown in the human output before it is cut.
const MAX_TEXT: usize = 72;
/// The coverage of an adapter of no `blk.N` tensor.
const NO_LAYERS: &str = "(no blk.N tensor adapted)";

/// Show what is in a GGUF model or adapter (single file or split set), a safetensors file or a PEFT
/// LoRA adapter.
#[derive(clap::Args)]
pub struct Args {
    /// GGUF file (or any shard of a split set), .safetensors file, or PEFT adapter directory.
    file: PathBuf,
    /// Base model GGUF: match the adapter FILE (PEFT or GGUF) against it; exit 3 if incompatible
    /// (-m/--model as llama.cpp spells it).
    #[arg(long, short = 'm', visible_alias = "model", value_name = "BASE.gguf")]
    base: Option<PathBuf>,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let report = match &args.base {
        Some(base) => Report::AdapterMatch(match_report(&args.file, base)?),
        None => inspect(&args.file)?,
    };
    let outcome = match &report {
        Report::AdapterMatch(r) if !r.compatible => Outcome::CheckFailed,
        _ => Outcome::Success,
    };
    let text = if args.json.json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        match &report {
            Report::Gguf(r) => render_gguf(r),
            Report::GgufAdapter(r) => render_gguf_adapter(r),
            Report::Safetensors(r) => render_safetensors(r),
            Report::Peft(r) => render_peft(r),
            Report::AdapterMatch(r) => render_match(r),
        }
    };
    print_stdout(&text)?;
    Ok(outcome)
}

fn render_gguf(r: &GgufReport) -> String {
    let mut out = String::new();
    let mut head = Table::new(&["", ""]);
    head.row(vec!["file".into(), r.path.clone()]);
    head.row(vec![
        "format".into(),
        format!(
            "GGUF v{}, alignment {}, {} file{}, {}",
            r.version,
            r.alignment,
            r.shards.len(),
            if r.shards.len() == 1 { "" } else { "s" },
            human_bytes(r.file_size)
        ),
    ]);
    for (label, v) in [
        ("type", &r.general_type),
        ("architecture", &r.architecture),
        ("name", &r.name),
    ] {
        if let Some(v) = v {
            head.row(vec![label.into(), v.clone()]);
        }
    }
    out.push_str(&head.render(0));

    if let Some(b) = &r.bundle {
        let _ = writeln!(
            out,
            "\nNamed bundle: {}; select one as {}#NAME",
            plural(b.adapters.len(), "adapter"),
            r.path
        );
        let mut t = Table::new(&[
            "name", "format", ">alpha", ">scale", ">targets", ">rank", ">layers", "modules",
        ]);
        for a in &b.adapters {
            let (lo, hi) = (a.entry.ranks.iter().min(), a.entry.ranks.iter().max());
            let rank = match (lo, hi) {
                (Some(l), Some(h)) if l == h => l.to_string(),
                (Some(l), Some(h)) => format!("{l}..{h}"),
                _ => "-".into(),
            };
            let layers = match (a.layers.first(), a.layers.last()) {
                (Some(f), Some(l)) => format!("{} ({f}..{l})", a.layers.len()),
                _ => "0".into(),
            };
            let opt = |v: Option<f32>| v.map_or_else(|| "-".into(), |x| x.to_string());
            t.row(vec![
                a.entry.name.clone(),
                a.entry.format.clone().unwrap_or_default(),
                opt(a.entry.alpha),
                opt(a.entry.scale),
                a.entry.targets.len().to_string(),
                rank,
                layers,
                a.modules.join(","),
            ]);
        }
        out.push_str(&t.render(2));
    }

    if r.shards.len() > 1 {
        let _ = writeln!(out, "\nShards");
        let mut t = Table::new(&[">#", "path", ">size", ">keys", ">tensors"]);
        // Numbered as in the shard file names (NAME-00001-of-0000N.gguf).
        for (i, s) in r.shards.iter().enumerate() {
            t.row(vec![
                (i + 1).to_string(),
                s.path.clone(),
                human_bytes(s.file_size),
                s.metadata_count.to_string(),
                s.tensor_count.to_string(),
            ]);
        }
        out.push_str(&t.render(2));
    }

    if !r.hyperparameters.is_empty() {
        let _ = writeln!(out, "\nHyperparameters");
        let mut t = Table::new(&["key", "value"]);
        for (k, v) in &r.hyperparameters {
            t.row(vec![k.clone(), json_text(v)]);
        }
        out.push_str(&t.render(2));
    }

    let _ = writeln!(out, "\nMetadata ({} keys)", r.metadata.len());
    let mut t = Table::new(&["key", "type", "value"]);
    for m in &r.metadata {
        let value = match m.len {
            Some(n) => {
                let items = match &m.value {
                    Json::Array(items) => {
                        items.iter().map(json_text).collect::<Vec<_>>().join(", ")
                    }
                    other => json_text(other),
                };
                let more = if m.truncated { ", ..." } else { "" };
                format!("[{n}] {items}{more}")
            }
            None => json_text(&m.value),
        };
        t.row(vec![m.key.clone(), m.ty.clone(), cut(&value, MAX_TEXT * 2)]);
    }
    out.push_str(&t.render(2));

    let _ = writeln!(
        out,
        "\nTensors ({}, {} elements, {})",
        r.total.tensors,
        r.total.elements,
        human_bytes(r.total.bytes)
    );
    let split = r.shards.len() > 1;
    let mut t = if split {
        Table::new(&["name", "type", "shape", ">bytes", ">layer", ">shard"])
    } else {
        Table::new(&["name", "type", "shape", ">bytes", ">layer"])
    };
    for x in &r.tensors {
        let shape = dims(&x.shape);
        let mut row = vec![
            x.name.clone(),
            x.ty.clone(),
            shape,
            x.bytes.to_string(),
            x.layer.map_or_else(|| "-".into(), |l| l.to_string()),
        ];
        if split {
            row.push((x.shard + 1).to_string());
        }
        t.row(row);
    }
    out.push_str(&t.render(2));

    render_totals(
        &mut out,
        "type",
        r.totals_by_type
            .iter()
            .map(|x| (x.ty.clone(), x.tensors, x.elements, x.bytes)),
    );

    render_totals(
        &mut out,
        ">layer",
        r.totals_by_layer.iter().map(|x| {
            let layer = x.layer.map_or_else(|| "-".into(), |l| l.to_string());
            (layer, x.tensors, x.elements, x.bytes)
        }),
    );
    out
}

/// A JSON scalar as text: strings quoted with escapes and cut, numbers as they are.
fn json_text(v: &Json) -> String {
    match v {
        Json::String(s) => cut(&format!("{s:?}"), MAX_TEXT),
        Json::Null => "null".into(),
        other => other.to_string(),
    }
}

/// `s` cut to at most `max` characters, with `...` marking the cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

fn shape(s: &Option<Vec<u64>>) -> String {
    s.as_deref().map_or_else(|| "-".into(), dims)
}

fn render_match(r: &AdapterMatchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "adapter  {} ({})", r.adapter, r.format);
    let _ = writeln!(out, "base     {} ({})", r.base, r.arch);
    let _ = writeln!(out, "\nModules ({})", r.rows.len());
    let mut t = Table::new(&[
        "source", "target", ">layer", "kind", ">rank", ">alpha", ">scale", "lora_a", "lora_b",
        "base", "type", "status",
    ]);
    let num = |v: Option<f64>| v.map_or_else(|| "-".into(), num);
    for row in &r.rows {
        t.row(vec![
            row.source.clone(),
            row.target.clone().unwrap_or_else(|| "-".into()),
            row.layer.map_or_else(|| "-".into(), |l| l.to_string()),
            row.kind.clone(),
            row.rank.map_or_else(|| "-".into(), |v| v.to_string()),
            num(row.alpha),
            num(row.scale),
            shape(&row.lora_a),
            shape(&row.lora_b),
            shape(&row.base_shape),
            row.base_type.clone().unwrap_or_else(|| "-".into()),
            row.status.name().to_string(),
        ]);
    }
    out.push_str(&t.render(2));
    let problems: Vec<_> = r.rows.iter().filter(|x| !x.message.is_empty()).collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\nProblems");
        for p in problems {
            let _ = writeln!(out, "  {}: {}", p.source, p.message);
        }
    }
    let _ = writeln!(
        out,
        "\nLayer coverage ({} base layers)",
        r.base_layers.map_or_else(|| "?".into(), |n| n.to_string())
    );
    out.push_str(&coverage_table(&r.layers, None));
    let _ = writeln!(out, "\nIdentity");
    let mut t = Table::new(&["", "adapter", "base", ""]);
    for h in &r.hints {
        t.row(vec![
            h.what.clone(),
            h.adapter.clone().unwrap_or_else(|| "-".into()),
            h.base.clone().unwrap_or_else(|| "-".into()),
            match h.agree {
                Some(true) => "agree".into(),
                Some(false) => "DIFFER".into(),
                None => String::new(),
            },
        ]);
    }
    out.push_str(&t.render(2));
    if r.compatible {
        let _ = writeln!(out, "\nverdict: compatible");
    } else {
        let _ = writeln!(out, "\nverdict: INCOMPATIBLE");
        for reason in &r.reasons {
            let _ = writeln!(out, "  - {reason}");
        }
    }
    out
}

fn dims(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" x ")
}

/// Per-layer coverage: a row per layer with its adapted targets; without layers, `if_empty` (or
/// the bare header).
fn coverage_table(
    layers: &[gguf_lora::inspect::adapter::LayerCoverage],
    if_empty: Option<&str>,
) -> String {
    if let (true, Some(text)) = (layers.is_empty(), if_empty) {
        return format!("  {text}\n");
    }
    let mut t = Table::new(&[">layer", ">n", "targets"]);
    for l in layers {
        t.row(vec![
            l.layer.to_string(),
            l.targets.len().to_string(),
            if l.targets.is_empty() {
                "(none)".into()
            } else {
                l.targets.join(" ")
            },
        ]);
    }
    t.render(2)
}

fn render_gguf_adapter(r: &GgufAdapterReport) -> String {
    let mut out = render_gguf(&r.gguf);
    let a = &r.adapter;
    let _ = writeln!(out, "\nLoRA adapter");
    let mut head = Table::new(&["", ""]);
    head.row(vec![
        "alpha".into(),
        a.alpha
            .map_or_else(|| "absent (runtime scale = user scale)".into(), num),
    ]);
    head.row(vec!["pairs".into(), a.pairs.to_string()]);
    head.row(vec![
        "ranks".into(),
        a.ranks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    ]);
    if let Some(tokens) = &a.alora_invocation_tokens {
        head.row(vec![
            "aLoRA invocation".into(),
            tokens
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    if !a.full_tensors.is_empty() {
        head.row(vec!["full tensors".into(), a.full_tensors.join(" ")]);
    }
    out.push_str(&head.render(2));
    let _ = writeln!(out, "\nLoRA pairs ({})", a.pairs);
    let mut t = Table::new(&[
        "target", ">layer", "kind", ">rank", ">alpha", ">scale", "lora_a", "lora_b", "types",
    ]);
    for x in &a.tensors {
        t.row(vec![
            x.target.clone(),
            x.layer.map_or_else(|| "-".into(), |l| l.to_string()),
            x.kind.clone(),
            x.rank.to_string(),
            num(x.alpha),
            num(x.scale),
            dims(&x.lora_a),
            dims(&x.lora_b),
            format!("{}/{}", x.lora_a_type, x.lora_b_type),
        ]);
    }
    out.push_str(&t.render(2));
    let _ = writeln!(out, "\nLayer coverage");
    out.push_str(&coverage_table(&a.layers, Some(NO_LAYERS)));
    out
}

/// The tensor table and totals of a safetensors file (also the weights part of a PEFT report).
fn safetensors_tables(r: &SafetensorsReport, out: &mut String) {
    let _ = writeln!(
        out,
        "\nTensors ({}, {} elements, {})",
        r.total.tensors,
        r.total.elements,
        human_bytes(r.total.bytes)
    );
    let mut t = Table::new(&["name", "dtype", "shape", ">bytes"]);
    for x in &r.tensors {
        t.row(vec![
            x.name.clone(),
            x.dtype.clone(),
            dims(&x.shape),
            x.bytes.to_string(),
        ]);
    }
    out.push_str(&t.render(2));
    render_totals(
        out,
        "dtype",
        r.totals_by_dtype
            .iter()
            .map(|x| (x.dtype.clone(), x.tensors, x.elements, x.bytes)),
    );
}

fn render_safetensors(r: &SafetensorsReport) -> String {
    let mut out = String::new();
    let mut head = Table::new(&["", ""]);
    head.row(vec!["file".into(), r.path.clone()]);
    head.row(vec![
        "format".into(),
        format!(
            "safetensors, header {} bytes, {}",
            r.data_offset,
            human_bytes(r.file_size)
        ),
    ]);
    out.push_str(&head.render(0));
    if !r.metadata.is_empty() {
        let _ = writeln!(out, "\nMetadata ({} keys)", r.metadata.len());
        let mut t = Table::new(&["key", "value"]);
        for (k, v) in &r.metadata {
            t.row(vec![k.clone(), cut(&format!("{v:?}"), MAX_TEXT * 2)]);
        }
        out.push_str(&t.render(2));
    }
    safetensors_tables(r, &mut out);
    out
}

fn render_peft(r: &PeftReport) -> String {
    let mut out = String::new();
    let c = &r.config;
    let mut head = Table::new(&["", ""]);
    head.row(vec!["adapter".into(), r.path.clone()]);
    head.row(vec!["config".into(), r.config_path.clone()]);
    head.row(vec![
        "weights".into(),
        format!("{} ({})", r.weights_path, human_bytes(r.weights.file_size)),
    ]);
    out.push_str(&head.render(0));

    let _ = writeln!(out, "\nConfig");
    let mut t = Table::new(&["key", "value"]);
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let map = |m: &serde_json::Map<String, Json>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let rows: Vec<(&str, String)> = vec![
        (
            "peft_type",
            c.peft_type.clone().unwrap_or_else(|| "-".into()),
        ),
        ("r", c.r.to_string()),
        ("lora_alpha", num(c.lora_alpha)),
        ("use_rslora", c.use_rslora.to_string()),
        ("rank_pattern", map(&c.rank_pattern)),
        ("alpha_pattern", map(&c.alpha_pattern)),
        ("target_modules", list(&c.target_modules)),
        ("target_parameters", list(&c.target_parameters)),
        ("use_dora", c.use_dora.to_string()),
        ("lora_bias", c.lora_bias.to_string()),
        ("modules_to_save", list(&c.modules_to_save)),
        ("fan_in_fan_out", c.fan_in_fan_out.to_string()),
        (
            "alora_invocation_tokens",
            c.alora_invocation_tokens.as_ref().map_or_else(
                || "-".into(),
                |t| t.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
            ),
        ),
        (
            "base_model_name_or_path",
            c.base_model_name_or_path
                .clone()
                .unwrap_or_else(|| "-".into()),
        ),
    ];
    for (k, v) in rows {
        t.row(vec![k.into(), cut(&v, MAX_TEXT * 2)]);
    }
    if let Some(s) = &c.invocation_string {
        t.row(vec![
            "invocation_string".into(),
            cut(&format!("{s:?}"), MAX_TEXT),
        ]);
    }
    out.push_str(&t.render(2));

    let _ = writeln!(
        out,
        "\nModules ({}; ranks {}; GGUF targets as every supported architecture names them)",
        r.modules.len(),
        r.ranks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut t = Table::new(&[
        "source", "target", ">layer", "kind", ">rank", ">alpha", ">scale", "lora_A", "lora_B",
        "dtype", "status",
    ]);
    for m in &r.modules {
        let mut flags = Vec::new();
        if m.dora {
            flags.push("DoRA");
        }
        if m.lora_bias {
            flags.push("bias");
        }
        let status = if m.representable {
            "ok".to_string()
        } else if flags.is_empty() {
            "NOT REPRESENTABLE".to_string()
        } else {
            format!("NOT REPRESENTABLE ({})", flags.join(", "))
        };
        t.row(vec![
            m.source.clone(),
            m.target.clone().unwrap_or_else(|| "?".into()),
            m.layer.map_or_else(|| "-".into(), |l| l.to_string()),
            m.kind.clone(),
            m.rank.to_string(),
            num(m.alpha),
            num(m.scale),
            dims(&m.lora_a),
            dims(&m.lora_b),
            m.dtype.clone(),
            status,
        ]);
    }
    out.push_str(&t.render(2));

    if !r.full_tensors.is_empty() {
        let _ = writeln!(
            out,
            "\nFull tensors ({}; modules_to_save or norms: not representable as LoRA)",
            r.full_tensors.len()
        );
        let mut t = Table::new(&["name", "target", "shape", "dtype"]);
        for f in &r.full_tensors {
            t.row(vec![
                f.name.clone(),
                f.target.clone().unwrap_or_else(|| "?".into()),
                dims(&f.shape),
                f.dtype.clone(),
            ]);
        }
        out.push_str(&t.render(2));
    }
    let _ = writeln!(out, "\nLayer coverage");
    out.push_str(&coverage_table(&r.layers, Some(NO_LAYERS)));
    if r.not_representable.is_empty() {
        let _ = writeln!(out, "\nGGUF LoRA: representable (convert can write it)");
    } else {
        let _ = writeln!(
            out,
            "\nGGUF LoRA: NOT representable ({}); `merge` can apply what a LoRA cannot hold",
            r.not_representable.len()
        );
        for line in &r.not_representable {
            let _ = writeln!(out, "  - {line}");
        }
    }
    safetensors_tables(&r.weights, &mut out);
    out
}

/// A "Totals by KEY" table: one row per (key, tensors, elements, bytes). A `>` before the key's
/// header right-aligns its column, as in [`Table::new`].
fn render_totals(
    out: &mut String,
    key: &'static str,
    rows: impl Iterator<Item = (String, usize, u64, u64)>,
) {
    let _ = writeln!(out, "\nTotals by {}", key.trim_start_matches('>'));
    let mut t = Table::new(&[key, ">tensors", ">elements", ">bytes", ">size"]);
    for (k, tensors, elements, bytes) in rows {
        t.row(vec![
            k,
            tensors.to_string(),
            elements.to_string(),
            bytes.to_string(),
            human_bytes(bytes),
        ]);
    }
    out.push_str(&t.render(2));
}
