//! Candidate output types for each merged tensor, and `--promote`.
//!
//! Before the merge streams, each touched tensor's planned type and the larger types that could
//! replace it (Q5_K, Q6_K, Q8_0, or the `--promote` type, each after fallbacks) are tried on a sample
//! of its rows (`MergeOptions::sample_rows`, spread evenly in runs of the rows its requantization
//! encodes together, see [`sample_runs`]): merge those rows exactly in f32, quantize, dequantize,
//! and compare. The sample keeps this pass a small fraction of the merge's
//! work while giving each type's error to a few percent; the report's per-tensor error for the type
//! finally written is then measured on every row during the merge itself.
//!
//! `--promote auto[:BUDGET]` is a greedy knapsack over these measurements: the value of moving a
//! tensor from type X to type Y is what it gets back of the adapter, `(loss_X − loss_Y) ×
//! elements`, the loss counting lost signal (`1 − share kept`) and added noise ([`loss`]), in
//! output space when the merge calibrated; its cost is the extra bytes; the best value per byte
//! is taken until the output would grow past the budget.
//!
//! Relative error alone treats every tensor alike, but tensors are not alike for the model's output:
//! measured on gemma3-270m Q4_K_M with a rank-16 adapter on all projections (mean KL to runtime LoRA
//! over 20 tokens), promoting only the residual-writing tensors (`attn_output`, `ffn_down`: Q4_K →
//! Q6_K, ×1.025 size) took KL from 0.111 to 0.075, while a relative-error-only greedy at ×1.05 that
//! spent half its budget on `attn_q/k/v` and `ffn_gate/up` reached only 0.088 (their errors pass
//! through q/k norms, softmax or the gated activation before reaching the residual stream). So the
//! value of a promotion is multiplied by [`sensitivity`]: 1 for tensors that write the residual
//! stream (and the embeddings/output head), 1/4 for the others.

use crate::quant::GgmlType;

use super::plan::{retarget, TensorPlan};
use super::report::Kept;
use super::stream::{sample_errors, sample_runs, ErrorSums, KeptSums, Phases};
use super::types::{bits_per_weight, fit_type};
use super::{CandidateReport, EngineError, InputTensor, MergeOptions, Promote};

/// Types always tried as promotions, besides `--promote TYPE`.
const LADDER: [GgmlType; 3] = [GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_0];

/// The types tried for a touched tensor, smallest first: its planned type, the [`LADDER`] and the
/// `--promote` types that would be larger, each after its fallback for the row length. Empty for
/// a tensor no adapter touches.
pub fn candidate_types(p: &TensorPlan<'_>, promote: &Promote) -> Vec<GgmlType> {
    if !p.is_touched() {
        return Vec::new();
    }
    let mut types = vec![p.ty_out];
    let extra: Vec<GgmlType> = match promote {
        Promote::Type(t) => vec![*t],
        Promote::Map(pairs) => pairs.iter().map(|&(_, to)| to).collect(),
        _ => Vec::new(),
    };
    for t in LADDER.iter().copied().chain(extra) {
        let (fit, _) = fit_type(t, p.n_cols as u64);
        if bits_per_weight(fit) > bits_per_weight(p.ty_out) && !types.contains(&fit) {
            types.push(fit);
        }
    }
    types.sort_by(|a, b| bits_per_weight(*a).total_cmp(&bits_per_weight(*b)));
    types
}

/// The rows of `p` candidate types are tried on (see [`sample_runs`]).
pub fn candidate_rows(p: &TensorPlan<'_>, opts: &MergeOptions) -> Vec<(usize, usize)> {
    sample_runs(p.n_rows, opts.sample_rows, p.requant.rows_together())
}

/// Tries every candidate type of every touched tensor on its sampled rows, before the merge
/// streams: what `--promote auto` needs to choose before anything is written. (Otherwise the
/// stream tries them on the same rows as it merges them, see [`stream::Sampling`].)
///
/// [`stream::Sampling`]: super::stream::Sampling
pub fn measure_candidates(
    base: &[InputTensor<'_>],
    plans: &[TensorPlan<'_>],
    types: &[Vec<GgmlType>],
    opts: &MergeOptions,
    phases: &Phases,
) -> Result<Vec<Vec<CandidateReport>>, EngineError> {
    let mut out = Vec::with_capacity(plans.len());
    for (p, types) in plans.iter().zip(types) {
        if types.is_empty() {
            out.push(Vec::new());
            continue;
        }
        let t = &base[p.index];
        let runs = candidate_rows(p, opts);
        let sums = sample_errors(p, &t.name, t.data, &runs, types, phases)?;
        // The sampled rows are spread over the whole tensor, so readahead brought in nearly all of
        // its pages: drop them now, or every touched tensor stays resident until it is written
        // (7B-shaped nearest merge: peak RSS 998 MiB, almost all of it the base's file pages).
        t.release_pages();
        out.push(candidate_reports(p, types, &sums));
    }
    Ok(out)
}

/// The candidate reports of `p` from each type's error sums (over sampled rows or all of them:
/// the sums are scaled to the whole tensor).
pub fn candidate_reports(
    p: &TensorPlan<'_>,
    types: &[GgmlType],
    sums: &[ErrorSums],
) -> Vec<CandidateReport> {
    let elements = (p.n_rows * p.n_cols) as f64;
    types
        .iter()
        .zip(sums)
        .map(|(&ty, s)| {
            let sums = s.headline().0;
            CandidateReport {
                ty: ty.name().to_string(),
                ggml_type: ty,
                bytes: tensor_bytes(ty, p),
                relative_error: s.relative(),
                kept: Kept {
                    share_kept: sums.share_kept(),
                    noise: sums.noise(),
                },
                sums: sums.scaled(elements / s.n.max(1) as f64),
            }
        })
        .collect()
}

fn tensor_bytes(ty: GgmlType, p: &TensorPlan<'_>) -> u64 {
    ty.row_bytes(p.n_cols as u64).unwrap_or(0) * p.n_rows as u64
}

/// Applies `--promote`; returns, per tensor, whether it was promoted.
pub fn apply(
    base: &[InputTensor<'_>],
    plans: &mut [TensorPlan<'_>],
    candidates: &[Vec<CandidateReport>],
    promote: &Promote,
) -> Vec<bool> {
    let mut promoted = vec![false; plans.len()];
    match promote {
        Promote::None => {}
        &Promote::Type(t) => {
            for p in plans.iter_mut().filter(|p| p.is_touched()) {
                let (fit, _) = fit_type(t, p.n_cols as u64);
                if bits_per_weight(fit) > bits_per_weight(p.ty_out) {
                    promoted[p.index] = true;
                    retarget(p, t);
                }
            }
        }
        Promote::Map(pairs) => {
            for p in plans.iter_mut().filter(|p| p.is_touched()) {
                let Some(&(_, to)) = pairs.iter().find(|(from, _)| *from == p.ty_in) else {
                    continue;
                };
                let (fit, _) = fit_type(to, p.n_cols as u64);
                if bits_per_weight(fit) > bits_per_weight(p.ty_out) {
                    promoted[p.index] = true;
                    retarget(p, to);
                }
            }
        }
        &Promote::Auto { budget } => {
            let base_bytes: u64 = base.iter().map(|t| t.data.len() as u64).sum();
            let mut left = (budget.max(0.0) * base_bytes as f64) as i128;
            // Chosen candidate per tensor: index into its list (0 = the planned type).
            let mut chosen = vec![0usize; plans.len()];
            loop {
                let mut best: Option<(f64, usize, usize)> = None;
                for (i, cands) in candidates.iter().enumerate() {
                    let Some(cur) = cands.get(chosen[i]) else {
                        continue;
                    };
                    let Some(e_cur) = loss(&cur.sums) else {
                        continue;
                    };
                    let elements = (plans[i].n_rows * plans[i].n_cols) as f64
                        * sensitivity(&base[plans[i].index].name);
                    for (j, c) in cands.iter().enumerate().skip(chosen[i] + 1) {
                        let cost = c.bytes as i128 - cur.bytes as i128;
                        let Some(e) = loss(&c.sums) else { continue };
                        let gain = (e_cur - e) * elements;
                        if cost <= 0 || cost > left || gain <= 0.0 {
                            continue;
                        }
                        let value = gain / cost as f64;
                        if best.is_none_or(|(v, _, _)| value > v) {
                            best = Some((value, i, j));
                        }
                    }
                }
                let Some((_, i, j)) = best else { break };
                left -= candidates[i][j].bytes as i128 - candidates[i][chosen[i]].bytes as i128;
                chosen[i] = j;
            }
            for (i, &j) in chosen.iter().enumerate() {
                if j > 0 {
                    promoted[i] = true;
                    retarget(&mut plans[i], candidates[i][j].ggml_type);
                }
            }
        }
    }
    promoted
}

/// What a choice loses, relative to the adapter's change: `noise² = (1 − share)² + perp²`, the
/// signal lost plus the error orthogonal to the adapter's change, counted alike (in output space
/// when the merge calibrated, where that is the tensor's output error). Counting the orthogonal
/// part at a quarter instead was measured worse: gemma3-270m Q4_K_M + rank-16 adapter, `--requant
/// nearest --promote auto`, mean KL to runtime 0.098 against 0.044. `None` when the delta is zero.
fn loss(s: &KeptSums) -> Option<f64> {
    s.noise().map(|n| n * n)
}

/// How much a unit of relative error in this tensor matters for the output, as a weight (see the
/// module docs): llama.cpp tensor names that write the residual stream get 1, the rest 1/4.
pub fn sensitivity(name: &str) -> f64 {
    let residual = ["attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp"];
    let role = name.split('.').nth(2).unwrap_or("");
    if residual.contains(&role) || name.starts_with("output.") || name.starts_with("token_embd.") {
        1.0
    } else {
        0.25
    }
}
