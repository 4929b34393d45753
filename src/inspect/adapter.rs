//! `inspect ADAPTER --base BASE.gguf`: how a LoRA adapter (PEFT or GGUF) lines up with a base model.
//! One row per adapted module (source name, GGUF target, layer, kind, rank, alpha, effective scale,
//! A/B shapes against the base tensor's shape and type, status), per-layer coverage, identity hints
//! beyond names and shapes, and a verdict: compatible only when every row is `ok`.

use std::path::Path;

use serde::Serialize;

use crate::adapter::{self, Adapter, IssueKind, LoraTensor, Opened, SourceFormat};
use crate::arch::BaseError;
use crate::arch::{BaseInfo, TargetKind};
use crate::gguf::GgufModel;

/// A row's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    MissingInBase,
    ShapeMismatch,
    RankMismatch,
    NonFinite,
    NotRepresentable,
    UnknownModule,
    NeedsBase,
    NeedsTokens,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::MissingInBase => "missing in base",
            Status::ShapeMismatch => "shape mismatch",
            Status::RankMismatch => "rank mismatch",
            Status::NonFinite => "non-finite",
            Status::NotRepresentable => "not representable",
            Status::UnknownModule => "unknown module",
            Status::NeedsBase => "needs base",
            Status::NeedsTokens => "needs token ids",
        }
    }
}

/// One adapted module.
#[derive(Clone, Debug, Serialize)]
pub struct MatchRow {
    pub source: String,
    pub target: Option<String>,
    pub layer: Option<u32>,
    pub kind: String,
    pub rank: Option<usize>,
    /// llama.cpp-convention alpha.
    pub alpha: Option<f64>,
    /// Effective scale at user scale 1 (PEFT's `scaling`).
    pub scale: Option<f64>,
    /// Shapes as GGUF writes them (ggml `ne` order).
    pub lora_a: Option<Vec<u64>>,
    pub lora_b: Option<Vec<u64>>,
    pub base_shape: Option<Vec<u64>>,
    pub base_type: Option<String>,
    pub status: Status,
    pub message: String,
}

/// Adapted targets of one base layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCoverage {
    pub layer: u32,
    /// Short names (`attn_q`, `ffn_down`, ...).
    pub targets: Vec<String>,
}

/// A fact both files state; `agree` is `None` when one side does not say.
#[derive(Clone, Debug, Serialize)]
pub struct Hint {
    pub what: String,
    pub adapter: Option<String>,
    pub base: Option<String>,
    pub agree: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdapterMatchReport {
    pub adapter: String,
    pub format: String,
    pub base: String,
    pub arch: String,
    pub rows: Vec<MatchRow>,
    pub base_layers: Option<u32>,
    pub layers: Vec<LayerCoverage>,
    pub hints: Vec<Hint>,
    pub compatible: bool,
    /// One line per reason when not compatible.
    pub reasons: Vec<String>,
}

pub(crate) fn ne_a(t: &LoraTensor) -> Vec<u64> {
    let (r, i, e) = (t.rank() as u64, t.n_in() as u64, t.n_expert() as u64);
    match t.kind {
        TargetKind::Linear => vec![i, r],
        TargetKind::Embedding => vec![r, i],
        TargetKind::Experts => vec![i, r, e],
    }
}

pub(crate) fn ne_b(t: &LoraTensor) -> Vec<u64> {
    let (r, o, e) = (t.rank() as u64, t.n_out() as u64, t.n_expert() as u64);
    match t.kind {
        TargetKind::Experts => vec![r, o, e],
        _ => vec![r, o],
    }
}

/// Why an adapter could not be matched against a base.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
}

/// Builds the matching report of `adapter` (PEFT or GGUF) against `base`.
pub fn match_report(
    adapter_path: &Path,
    base_path: &Path,
) -> Result<AdapterMatchReport, MatchError> {
    let (model, base) = BaseInfo::open(base_path)?;
    // A GGUF adapter of another architecture still gets a full table; the mismatch is a reason.
    let Opened {
        adapter,
        issues,
        arch_mismatch,
        ..
    } = adapter::open(adapter_path, Some(&base))?;
    let arch_mismatch =
        arch_mismatch.map(|m| format!("adapter architecture {:?}, base '{}'", m.adapter, m.base));

    let mut rows = Vec::new();
    for t in &adapter.tensors {
        let bt = base.tensor(&t.target);
        let issue = issues
            .iter()
            .find(|i| i.target.as_deref() == Some(t.target.as_str()));
        let (status, message) = match issue {
            Some(i) => (status_of(i.status), i.message.clone()),
            None if t.dora_magnitude.is_some() => (
                Status::NotRepresentable,
                "DoRA magnitude: a GGUF LoRA cannot hold it; `merge` applies it".into(),
            ),
            None if t.lora_bias.is_some() => (
                Status::NotRepresentable,
                "lora_B.bias: a GGUF LoRA cannot hold it; `merge` applies it".into(),
            ),
            None => match t.load() {
                Ok(_) => (Status::Ok, String::new()),
                Err(e) if e.is_non_finite() => (Status::NonFinite, e.to_string()),
                Err(e) => (Status::RankMismatch, e.to_string()),
            },
        };
        rows.push(MatchRow {
            source: t.source(),
            target: Some(t.target.clone()),
            layer: t.layer,
            kind: t.kind.name().to_string(),
            rank: Some(t.rank()),
            alpha: Some(t.alpha()),
            scale: Some(t.scale()),
            lora_a: Some(ne_a(t)),
            lora_b: Some(ne_b(t)),
            base_shape: bt.map(|b| b.dims.clone()),
            base_type: bt.map(|b| b.ty.name().to_string()),
            status,
            message,
        });
    }
    // Problems with no tensor in the model (unknown modules, config rank mismatches, ...).
    for i in &issues {
        if i.target
            .as_ref()
            .is_some_and(|t| adapter.tensor(t).is_some())
        {
            continue;
        }
        rows.push(MatchRow {
            source: i.source.clone(),
            target: i.target.clone(),
            layer: i.target.as_deref().and_then(crate::gguf::layer_of),
            kind: "-".into(),
            rank: None,
            alpha: None,
            scale: None,
            lora_a: None,
            lora_b: None,
            base_shape: i
                .target
                .as_deref()
                .and_then(|t| base.tensor(t))
                .map(|b| b.dims.clone()),
            base_type: None,
            status: status_of(i.status),
            message: i.message.clone(),
        });
    }
    for f in &adapter.full_tensors {
        rows.push(MatchRow {
            source: f.source.clone(),
            target: f.target.clone(),
            layer: f.target.as_deref().and_then(crate::gguf::layer_of),
            kind: "full".into(),
            rank: None,
            alpha: None,
            scale: None,
            lora_a: None,
            lora_b: None,
            base_shape: f.target.as_deref().and_then(|t| base.tensor(t)).map(|b| b.dims.clone()),
            base_type: f
                .target
                .as_deref()
                .and_then(|t| base.tensor(t))
                .map(|b| b.ty.name().to_string()),
            status: Status::NotRepresentable,
            message: "full replacement tensor (modules_to_save, norms): a LoRA cannot hold it; `merge` applies it".into(),
        });
    }

    let layers = coverage(&adapter, base.n_layer);
    let hints = hints(&adapter, &base, &model);
    let mut reasons: Vec<String> = Vec::new();
    if let Some(m) = arch_mismatch {
        reasons.push(m);
    }
    let bad: Vec<&MatchRow> = rows.iter().filter(|r| r.status != Status::Ok).collect();
    if !bad.is_empty() {
        let mut counts: Vec<(Status, usize)> = Vec::new();
        for r in &bad {
            match counts.iter_mut().find(|(s, _)| *s == r.status) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.status, 1)),
            }
        }
        for (s, n) in counts {
            reasons.push(format!("{n} module(s) {}", s.name()));
        }
    }
    if let Some(n) = base.n_layer {
        if let Some(max) = adapter.tensors.iter().filter_map(|t| t.layer).max() {
            if max >= n {
                reasons.push(format!(
                    "the adapter adapts layer {max}, the base has {n} layers (0..{})",
                    n.saturating_sub(1)
                ));
            }
        }
    }
    if adapter.tensors.is_empty() && adapter.full_tensors.is_empty() {
        reasons.push("the adapter has no tensors".into());
    }
    Ok(AdapterMatchReport {
        adapter: adapter_path.display().to_string(),
        format: match adapter.provenance.format {
            Some(SourceFormat::Gguf) => "gguf".into(),
            _ => "peft".into(),
        },
        base: base_path.display().to_string(),
        arch: base.arch.clone(),
        compatible: reasons.is_empty(),
        rows,
        base_layers: base.n_layer,
        layers,
        hints,
        reasons,
    })
}

fn status_of(k: IssueKind) -> Status {
    match k {
        IssueKind::UnknownModule => Status::UnknownModule,
        IssueKind::MissingInBase => Status::MissingInBase,
        IssueKind::ShapeMismatch => Status::ShapeMismatch,
        IssueKind::RankMismatch => Status::RankMismatch,
        IssueKind::NeedsBase => Status::NeedsBase,
        IssueKind::NeedsTokens => Status::NeedsTokens,
    }
}

fn coverage(adapter: &Adapter, n_layer: Option<u32>) -> Vec<LayerCoverage> {
    coverage_of(
        adapter
            .tensors
            .iter()
            .filter_map(|t| Some((t.layer?, t.target.as_str()))),
        n_layer,
    )
}

/// Per-layer coverage from `(layer, GGUF target)` pairs: layers `0..max(n_layer, highest + 1)`,
/// each with its targets' short names (`attn_q`, `ffn_down`, ...), empty for untouched layers.
pub(crate) fn coverage_of<'a>(
    targets: impl Iterator<Item = (u32, &'a str)>,
    n_layer: Option<u32>,
) -> Vec<LayerCoverage> {
    let targets: Vec<(u32, &str)> = targets.collect();
    let max = targets.iter().map(|(l, _)| *l).max();
    let n = match (n_layer, max) {
        (Some(n), Some(m)) => n.max(m + 1),
        (Some(n), None) => n,
        (None, Some(m)) => m + 1,
        (None, None) => 0,
    };
    (0..n)
        .map(|layer| {
            let prefix = format!("blk.{layer}.");
            // Stacked experts appear once per expert in a PEFT adapter; list each target once.
            let mut names: Vec<String> = Vec::new();
            for (_, t) in targets.iter().filter(|(l, _)| *l == layer) {
                let short = t
                    .strip_prefix(&prefix)
                    .unwrap_or(t)
                    .trim_end_matches(".weight")
                    .to_string();
                if !names.contains(&short) {
                    names.push(short);
                }
            }
            LayerCoverage {
                layer,
                targets: names,
            }
        })
        .collect()
}

fn hints(adapter: &Adapter, base: &BaseInfo, model: &GgufModel) -> Vec<Hint> {
    let mut out = Vec::new();
    let both = |what: &str, a: Option<String>, b: Option<String>, agree: Option<bool>| Hint {
        what: what.to_string(),
        agree: agree.or_else(|| match (&a, &b) {
            (Some(x), Some(y)) => Some(x == y),
            _ => None,
        }),
        adapter: a,
        base: b,
    };
    // A PEFT adapter records no architecture of its own (it is mapped with the base's), so only a
    // GGUF adapter's can agree or differ.
    let own_arch = match adapter.provenance.format {
        Some(SourceFormat::Gguf) => adapter.arch.clone(),
        _ => None,
    };
    out.push(both(
        "architecture",
        own_arch,
        Some(base.arch.clone()),
        None,
    ));
    // Base model name: PEFT's base_model_name_or_path against the GGUF's general.name/basename and
    // general.base_model.0.name. Names differ in form (hub ids, paths), so compare loosely.
    let md = model.metadata();
    let base_names: Vec<String> = [
        "general.name",
        "general.basename",
        "general.base_model.0.name",
    ]
    .iter()
    .filter_map(|k| md.get_str(k).map(str::to_string))
    .collect();
    let a_name = adapter.provenance.base_model.clone();
    let agree = a_name.as_ref().and_then(|a| {
        if base_names.is_empty() {
            return None;
        }
        let tail = a.rsplit('/').next().unwrap_or(a).to_ascii_lowercase();
        Some(base_names.iter().any(|b| {
            let b = b.to_ascii_lowercase();
            !tail.is_empty() && (b.contains(&tail) || tail.contains(&b))
        }))
    });
    out.push(both(
        "base model name",
        a_name,
        (!base_names.is_empty()).then(|| base_names.join(" / ")),
        agree,
    ));
    let vocab_base = base
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1))
        .copied();
    let vocab_adapter = adapter
        .tensors
        .iter()
        .find(|t| t.kind == TargetKind::Embedding)
        .map(|t| t.n_in() as u64)
        .or_else(|| adapter.tensor("output.weight").map(|t| t.n_out() as u64));
    out.push(both(
        "vocabulary size",
        vocab_adapter.map(|v| v.to_string()),
        vocab_base.map(|v| v.to_string()),
        None,
    ));
    // Hidden size seen by the adapter: the input width of any attention/MLP input projection.
    let hidden_adapter = adapter
        .tensors
        .iter()
        .find(|t| {
            [
                "attn_q", "attn_k", "attn_v", "attn_qkv", "ffn_up", "ffn_gate",
            ]
            .iter()
            .any(|s| t.target.contains(&format!(".{s}.")))
        })
        .map(|t| t.n_in() as u64);
    out.push(both(
        "embedding length",
        hidden_adapter.map(|v| v.to_string()),
        base.n_embd.map(|v| v.to_string()),
        None,
    ));
    out.push(both(
        "heads (q / kv)",
        None,
        base.n_head
            .map(|h| format!("{h} / {}", base.n_head_kv.unwrap_or(h))),
        None,
    ));
    out.push(both(
        "layers",
        adapter
            .tensors
            .iter()
            .filter_map(|t| t.layer)
            .max()
            .map(|m| format!("adapts up to layer {m}")),
        base.n_layer.map(|n| format!("{n} layers")),
        match (
            adapter.tensors.iter().filter_map(|t| t.layer).max(),
            base.n_layer,
        ) {
            (Some(m), Some(n)) => Some(m < n),
            _ => None,
        },
    ));
    out
}
