//! The merge's fidelity report: per merged tensor, what went in and out and how much of the adapter
//! the requantization kept; per base type, the same pooled, with what each promotion would cost and
//! leave. Built once; the binary prints it as a table or serializes it as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::quant::GgmlType;

use super::plan::TensorPlan;
use super::stream::{add_opt, ErrorSums, KeptSums};
use super::{AdapterInput, InputTensor, Update};

/// Below this share of the adapter's effect kept, a type is said to lose much of the adapter (the
/// warning, and the smallest promotion suggested): the bar `verify` sets for 5–6-bit merges.
pub const KEPT_WARN: f64 = 0.7;

/// How much of the adapter a requantization kept, in the report's space (`measured_in`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Kept {
    /// `⟨q − w, Δ⟩/‖Δ‖²`: 1 keeps the adapter's change whole, 0 loses all of it.
    pub share_kept: Option<f64>,
    /// `‖q − w′‖/‖Δ‖`: lost signal and added noise together, relative to the adapter's change.
    pub noise: Option<f64>,
}

impl Kept {
    fn of(s: &KeptSums) -> Kept {
        Kept {
            share_kept: s.share_kept(),
            noise: s.noise(),
        }
    }
}

/// `"outputs"` (on held-out calibration tokens) or `"weights"`.
fn space(in_outputs: bool) -> &'static str {
    if in_outputs {
        "outputs"
    } else {
        "weights"
    }
}

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
    /// Share kept and noise on the sampled rows, in the tensor's `measured_in` space.
    #[serde(flatten)]
    pub kept: Kept,
    /// The headline sums on the sampled rows, scaled to the whole tensor (for pooling).
    #[serde(skip)]
    pub sums: KeptSums,
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
    /// Where share and noise are measured: `"outputs"` (the tensor's outputs on held-out
    /// calibration tokens, when the merge calibrated) or `"weights"`.
    pub measured_in: &'static str,
    /// What the written tensor keeps, on every row.
    #[serde(flatten)]
    pub kept: Kept,
    /// The same for plain round-to-nearest on the same rows, when the merge used another method.
    pub nearest: Option<Kept>,
    /// Share kept in weight space (`measured_in` may be outputs).
    pub weights_share_kept: Option<f64>,
    #[serde(skip)]
    pub sums: ErrorSums,
    /// The planned type and the promotions tried, smallest first.
    pub candidates: Vec<CandidateReport>,
    /// The output error of what was written relative to rounding to nearest, on the same held-out
    /// calibration tokens: `None` unless the tensor was calibrated and rounded otherwise. How a
    /// recoded tensor with no adapter's change to keep (a retyped output head) fared.
    pub output_error_vs_nearest: Option<f64>,
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
    #[serde(flatten)]
    pub kept: Kept,
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
    pub measured_in: &'static str,
    /// Pooled share kept and noise of what was written, and of plain rounding beside it.
    #[serde(flatten)]
    pub kept: Kept,
    pub nearest: Option<Kept>,
    pub options: Vec<TypeOption>,
    /// Whether what was written loses much of the adapter (share kept below [`KEPT_WARN`]).
    pub lossy: bool,
    /// The smallest promotion that keeps at least [`KEPT_WARN`], if one was measured.
    pub suggested_promotion: Option<String>,
}

/// What one adapter brought to the merge.
#[derive(Clone, Debug, Serialize)]
pub struct InputSummary {
    pub name: String,
    /// The user's scale.
    pub scale: f32,
    /// Base tensors it changes.
    pub tensors: usize,
    /// Smallest and largest rank of its low-rank updates (0 when it has none).
    pub min_rank: usize,
    pub max_rank: usize,
    /// Smallest and largest effective scale (alpha/rank) of its low-rank updates.
    pub min_lora_scale: f32,
    pub max_lora_scale: f32,
}

impl InputSummary {
    fn of(a: &AdapterInput) -> InputSummary {
        let mut s = InputSummary {
            name: a.name.clone(),
            scale: a.scale,
            tensors: a
                .updates
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            min_rank: 0,
            max_rank: 0,
            min_lora_scale: 0.0,
            max_lora_scale: 0.0,
        };
        let low_rank = a.updates.iter().filter_map(|(_, u)| match u {
            Update::LowRank { shape, scale, .. } => Some((shape.rank, *scale)),
            _ => None,
        });
        for (i, (rank, scale)) in low_rank.enumerate() {
            if i == 0 {
                (s.min_rank, s.max_rank) = (rank, rank);
                (s.min_lora_scale, s.max_lora_scale) = (scale, scale);
            }
            s.min_rank = s.min_rank.min(rank);
            s.max_rank = s.max_rank.max(rank);
            s.min_lora_scale = s.min_lora_scale.min(scale);
            s.max_lora_scale = s.max_lora_scale.max(scale);
        }
        s
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub adapters: Vec<String>,
    pub scales: Vec<f32>,
    /// Each adapter: its scale, how many tensors it changes, its ranks and alpha/rank.
    pub inputs: Vec<InputSummary>,
    pub tensors_merged: usize,
    /// Recoded to another type without an adapter touching them (`--token-embedding-type`).
    pub tensors_retyped: usize,
    pub tensors_copied: usize,
    pub tensors_fallback: usize,
    pub tensors_promoted: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub size_ratio: f64,
    /// Pooled over every merged tensor.
    pub relative_error: Option<f64>,
    pub measured_in: &'static str,
    #[serde(flatten)]
    pub kept: Kept,
    pub nearest: Option<Kept>,
    pub per_type: Vec<TypeSummary>,
    pub seconds: Seconds,
}

/// Where the time went. Phases are elapsed seconds summed over worker threads (on a busy machine
/// they include time spent waiting for a core, so compare shares, not totals): `sample` is trying
/// candidate types (for the report and `--promote`; in the stream, or before it for `--promote
/// auto`), the others the merge itself; `stream` is wall seconds; `write` is the writer thread's
/// busy time (copying untouched tensors and writing merged ones), overlapped with the rest.
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

/// Pooled fidelity of a set of tensors: weight-space error sums, headline sums, plain rounding's.
#[derive(Default)]
struct Pool {
    weights: KeptSums,
    headline: KeptSums,
    nearest: Option<KeptSums>,
    all_outputs: bool,
    any: bool,
}

impl Pool {
    fn push(&mut self, s: &ErrorSums) {
        let (h, n) = s.headline();
        self.all_outputs = (self.all_outputs || !self.any) && s.in_outputs();
        self.any = true;
        self.weights = self.weights.add(s.weights);
        self.headline = self.headline.add(h);
        self.nearest = add_opt(self.nearest, n);
    }
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
    let mut all = Pool::default();
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
        // A tensor recoded without an adapter (a retyped token_embd, or `quantize`) has no change
        // to keep: it is listed, but its error does not pool with the adapter's.
        if p.is_touched() {
            all.push(&s);
            groups.entry(p.ty_in).or_default().push(tensors.len());
        }
        let (headline, nearest) = s.headline();
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
            measured_in: space(s.in_outputs()),
            kept: Kept::of(&headline),
            nearest: nearest.as_ref().map(Kept::of),
            weights_share_kept: s.weights.share_kept(),
            output_error_vs_nearest: s
                .nearest_outputs
                // Output sums exist only where calibration statistics did (an untouched
                // tensor's change, and so `in_outputs`, is zero).
                .filter(|n| n.sq_noise > 0.0)
                .map(|n| (s.outputs.sq_noise / n.sq_noise).sqrt()),
            sums: s,
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
            inputs: adapters.iter().map(InputSummary::of).collect(),
            tensors_merged: plans.iter().filter(|p| p.is_touched()).count(),
            tensors_retyped: plans
                .iter()
                .filter(|p| p.is_recoded() && !p.is_touched())
                .count(),
            tensors_copied: plans.len() - tensors.len(),
            tensors_fallback: tensors.iter().filter(|t| t.fallback).count(),
            tensors_promoted: tensors.iter().filter(|t| t.promoted).count(),
            bytes_in,
            bytes_out,
            size_ratio: bytes_out as f64 / bytes_in.max(1) as f64,
            relative_error: all.weights.noise(),
            measured_in: space(all.all_outputs),
            kept: Kept::of(&all.headline),
            nearest: all.nearest.as_ref().map(Kept::of),
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
    let mut pool = Pool::default();
    for t in &group {
        pool.push(&t.sums);
    }
    let bytes_in: u64 = group.iter().map(|t| t.bytes_in).sum();
    let bytes_out: u64 = group.iter().map(|t| t.bytes_out).sum();
    let relative_error = pool.weights.noise();
    let kept = Kept::of(&pool.headline);
    let ratio = |group_bytes: u64| {
        (bytes_out_total - bytes_out + group_bytes) as f64 / bytes_in_total.max(1) as f64
    };
    let mut options = vec![TypeOption {
        choice: "written".into(),
        bytes: bytes_out,
        size_ratio: ratio(bytes_out),
        relative_error,
        kept,
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
        let mut headline = KeptSums::default();
        for t in &group {
            // Tensors where the target was not a candidate (already larger, or it did not fit)
            // keep their smallest candidate (= their planned type).
            let c = t
                .candidates
                .iter()
                .find(|c| &c.ty == target)
                .or_else(|| t.candidates.first());
            let (rel, b, h) = c.map_or((t.relative_error, t.bytes_out, t.sums.headline().0), |c| {
                (c.relative_error, c.bytes, c.sums)
            });
            let (e, d) = squares(rel, t.rms_delta, t.elements);
            e_all += e;
            d_all += d;
            bytes += b;
            headline = headline.add(h);
        }
        let kept = Kept::of(&headline);
        if suggested_promotion.is_none()
            && bytes > bytes_in
            && kept.share_kept.is_some_and(|k| k >= KEPT_WARN)
        {
            suggested_promotion = Some(target.clone());
        }
        options.push(TypeOption {
            choice: target.clone(),
            bytes,
            size_ratio: ratio(bytes),
            relative_error: pooled(e_all, d_all),
            kept,
        });
    }
    let lossy = kept.share_kept.is_some_and(|k| k < KEPT_WARN);
    TypeSummary {
        type_in: ty.name().into(),
        tensors: group.len(),
        elements: group.iter().map(|t| t.elements).sum(),
        bytes_in,
        bytes_out,
        relative_error,
        measured_in: space(pool.all_outputs),
        kept,
        nearest: pool.nearest.as_ref().map(Kept::of),
        options,
        lossy,
        suggested_promotion: if lossy { suggested_promotion } else { None },
    }
}
