//! The merge's fidelity report: per merged tensor, what went in and out and how much of the adapter
//! the requantization kept; per base type, the same pooled, with what each promotion would cost and
//! leave. Built once; the binary prints it as a table or serializes it as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::quant::GgmlType;

use super::plan::TensorPlan;
use super::stream::ErrorSums;
use super::{AdapterInput, InputTensor, Update};

/// Above this relative error (RMS(requantized − exact) / RMS(delta)) a type is said to lose much of
/// the adapter: the rounding is at least half as large as the adapter's own change.
pub const LOSSY: f64 = 0.5;

/// One candidate type for a merged tensor, measured on sampled rows.
#[derive(Clone, Debug, Serialize)]
pub struct CandidateReport {
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(skip)]
    pub ggml_type: GgmlType,
    /// Bytes the whole tensor takes in this type.
    pub bytes: u64,
    /// RMS(requantized − exact merge) / RMS(delta) on the sampled rows; null when the delta is 0.
    pub relative_error: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub type_in: String,
    pub type_out: String,
    /// The requested type did not fit the rows (llama-quantize's fallback was used).
    pub fallback: bool,
    /// Written larger than planned because of `--promote`.
    pub promoted: bool,
    pub adapters: Vec<String>,
    /// Rank of each low-rank update, in adapter order (0 for replacements and biases).
    pub ranks: Vec<usize>,
    pub dora: bool,
    pub elements: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rms_delta: f64,
    pub rms_error: f64,
    /// rms_error / rms_delta, on every row; null when the delta is 0.
    pub relative_error: Option<f64>,
    /// The planned type and the promotions tried, smallest first.
    pub candidates: Vec<CandidateReport>,
}

/// Choosing one type for every merged tensor of a base type: size and pooled error.
#[derive(Clone, Debug, Serialize)]
pub struct TypeOption {
    /// `"written"` (this run), `"planned"` (before promotion) or a promotion target such as `"q6_K"`.
    pub choice: String,
    pub bytes: u64,
    /// Whole-output size relative to the base if every tensor of this group took this choice.
    pub size_ratio: f64,
    pub relative_error: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TypeSummary {
    pub type_in: String,
    pub tensors: usize,
    pub elements: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Pooled over the group: sqrt(Σ requantization error² / Σ delta²).
    pub relative_error: Option<f64>,
    pub options: Vec<TypeOption>,
    /// Whether what was written loses much of the adapter (relative error above 0.5).
    pub lossy: bool,
    /// The smallest promotion that brings the group under the lossy line, if one was measured.
    pub suggested_promotion: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub adapters: Vec<String>,
    pub scales: Vec<f32>,
    pub tensors_merged: usize,
    pub tensors_copied: usize,
    pub tensors_fallback: usize,
    pub tensors_promoted: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub size_ratio: f64,
    /// Pooled over every merged tensor.
    pub relative_error: Option<f64>,
    pub per_type: Vec<TypeSummary>,
    pub seconds: Seconds,
}

/// Where the time went. Phases inside the merge are elapsed seconds summed over worker threads (on a
/// busy machine they include time spent waiting for a core, so compare shares, not totals); `sample`
/// (trying candidate types before streaming) and `stream` are wall seconds; `write` is the writer
/// thread's busy time (copying untouched tensors and writing merged ones), overlapped with the rest.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Seconds {
    pub sample: f64,
    pub dequantize: f64,
    pub delta: f64,
    pub requantize: f64,
    pub measure: f64,
    pub write: f64,
    pub stream: f64,
}

impl Seconds {
    pub fn from_phases(p: &super::Phases, stream: std::time::Duration) -> Seconds {
        let s = |a: &std::sync::atomic::AtomicU64| {
            a.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
        };
        Seconds {
            sample: s(&p.sample),
            dequantize: s(&p.dequantize),
            delta: s(&p.delta),
            requantize: s(&p.requantize),
            measure: s(&p.measure),
            write: s(&p.write),
            stream: stream.as_secs_f64(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub tensors: Vec<TensorReport>,
    pub summary: Summary,
}

fn pooled(sq_err: f64, sq_delta: f64) -> Option<f64> {
    (sq_delta > 0.0).then(|| (sq_err / sq_delta).sqrt())
}

pub fn build(
    base: &[InputTensor<'_>],
    adapters: &[AdapterInput],
    plans: &[TensorPlan<'_>],
    sums: &[Option<ErrorSums>],
    candidates: Vec<Vec<CandidateReport>>,
    promoted: &[bool],
) -> MergeReport {
    let bytes_in: u64 = base.iter().map(|t| t.data.len() as u64).sum();
    let mut bytes_out = 0u64;
    let mut tensors = Vec::new();
    let mut all = ErrorSums::default();
    let mut groups: BTreeMap<GgmlType, Vec<usize>> = BTreeMap::new();
    for (p, cands) in plans.iter().zip(candidates) {
        let t = &base[p.index];
        let out = p.ty_out.row_bytes(p.n_cols as u64).unwrap_or(0) * p.n_rows as u64;
        if !p.is_recoded() {
            bytes_out += t.data.len() as u64;
            continue;
        }
        bytes_out += out;
        let s = sums[p.index].unwrap_or_default();
        all.sq_requant += s.sq_requant;
        all.sq_delta += s.sq_delta;
        groups.entry(p.ty_in).or_default().push(tensors.len());
        tensors.push(TensorReport {
            name: t.name.clone(),
            type_in: p.ty_in.name().into(),
            type_out: p.ty_out.name().into(),
            fallback: p.fallback,
            promoted: promoted[p.index],
            adapters: p
                .ops
                .iter()
                .map(|o| adapters[o.adapter].name.clone())
                .collect(),
            ranks: p
                .ops
                .iter()
                .map(|o| match o.update {
                    Update::LowRank { shape, .. } => shape.rank,
                    _ => 0,
                })
                .collect(),
            dora: p
                .ops
                .iter()
                .any(|o| matches!(o.update, Update::LowRank { shape, .. } if shape.magnitude_len.is_some())),
            elements: (p.n_rows * p.n_cols) as u64,
            bytes_in: t.data.len() as u64,
            bytes_out: out,
            rms_delta: s.rms_delta(),
            rms_error: s.rms_requant(),
            relative_error: s.relative(),
            candidates: cands,
        });
    }
    let per_type = groups
        .into_iter()
        .map(|(ty, idx)| type_summary(ty, &idx, &tensors, bytes_in, bytes_out))
        .collect();
    MergeReport {
        summary: Summary {
            adapters: adapters.iter().map(|a| a.name.clone()).collect(),
            scales: adapters.iter().map(|a| a.scale).collect(),
            tensors_merged: tensors.len(),
            tensors_copied: plans.len() - tensors.len(),
            tensors_fallback: tensors.iter().filter(|t| t.fallback).count(),
            tensors_promoted: tensors.iter().filter(|t| t.promoted).count(),
            bytes_in,
            bytes_out,
            size_ratio: bytes_out as f64 / bytes_in.max(1) as f64,
            relative_error: all.relative(),
            per_type,
            seconds: Seconds::default(),
        },
        tensors,
    }
}

/// Squared error and squared delta recovered from a relative error measured on `elements` values
/// whose delta RMS is `rms_delta` (so sampled errors pool with the right weights).
fn squares(rel: Option<f64>, rms_delta: f64, elements: u64) -> (f64, f64) {
    let sq_delta = rms_delta * rms_delta * elements as f64;
    (rel.map_or(0.0, |r| r * r * sq_delta), sq_delta)
}

fn type_summary(
    ty: GgmlType,
    idx: &[usize],
    tensors: &[TensorReport],
    bytes_in_total: u64,
    bytes_out_total: u64,
) -> TypeSummary {
    let group: Vec<&TensorReport> = idx.iter().map(|&i| &tensors[i]).collect();
    let (mut sq_err, mut sq_delta) = (0.0, 0.0);
    for t in &group {
        let (e, d) = squares(t.relative_error, t.rms_delta, t.elements);
        sq_err += e;
        sq_delta += d;
    }
    let bytes_in: u64 = group.iter().map(|t| t.bytes_in).sum();
    let bytes_out: u64 = group.iter().map(|t| t.bytes_out).sum();
    let relative_error = pooled(sq_err, sq_delta);
    let ratio = |group_bytes: u64| {
        (bytes_out_total - bytes_out + group_bytes) as f64 / bytes_in_total.max(1) as f64
    };
    let mut options = vec![TypeOption {
        choice: "written".into(),
        bytes: bytes_out,
        size_ratio: ratio(bytes_out),
        relative_error,
    }];
    // Each candidate target (named by the first candidate list's types, which all tensors of a group
    // share unless fallbacks differ): every tensor takes its candidate of that rank, or stays.
    let mut targets: Vec<String> = Vec::new();
    for t in &group {
        for c in &t.candidates {
            let written_everywhere = group.iter().all(|g| g.type_out == c.ty);
            if !written_everywhere && !targets.contains(&c.ty) {
                targets.push(c.ty.clone());
            }
        }
    }
    let mut suggested_promotion = None;
    for target in &targets {
        let (mut e_all, mut d_all, mut bytes) = (0.0, 0.0, 0u64);
        for t in &group {
            // Tensors where the target was not a candidate (already larger, or it did not fit)
            // keep their smallest candidate (= their planned type).
            let c = t
                .candidates
                .iter()
                .find(|c| &c.ty == target)
                .or_else(|| t.candidates.first());
            let (rel, b) = c.map_or((t.relative_error, t.bytes_out), |c| {
                (c.relative_error, c.bytes)
            });
            let (e, d) = squares(rel, t.rms_delta, t.elements);
            e_all += e;
            d_all += d;
            bytes += b;
        }
        let rel = pooled(e_all, d_all);
        if suggested_promotion.is_none() && bytes > bytes_in && rel.is_some_and(|r| r <= LOSSY) {
            suggested_promotion = Some(target.clone());
        }
        options.push(TypeOption {
            choice: target.clone(),
            bytes,
            size_ratio: ratio(bytes),
            relative_error: rel,
        });
    }
    let lossy = relative_error.is_some_and(|r| r > LOSSY);
    TypeSummary {
        type_in: ty.name().into(),
        tensors: group.len(),
        elements: group.iter().map(|t| t.elements).sum(),
        bytes_in,
        bytes_out,
        relative_error,
        options,
        lossy,
        suggested_promotion: if lossy { suggested_promotion } else { None },
    }
}
