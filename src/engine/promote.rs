//! Candidate output types for each merged tensor, and `--promote`.
//!
//! Before the merge streams, each touched tensor's planned type and the types that could replace
//! it (Q5_K, Q6_K, Q8_0, or the `--promote` type, each after fallbacks; for `--promote auto` also
//! smaller ones, see [`DEMOTIONS`]) are tried on a sample
//! of its rows (`MergeOptions::sample_rows`, spread evenly in runs of the rows its requantization
//! encodes together, see [`sample_runs`]): merge those rows exactly in f32, quantize, dequantize,
//! and compare. The sample keeps this pass a small fraction of the merge's
//! work while giving each type's error to a few percent; the report's per-tensor error for the type
//! finally written is then measured on every row during the merge itself.
//!
//! `--promote auto[:BUDGET]` is a knapsack over these measurements ([`allocate`]): the value of
//! moving a tensor from type X to type Y is what it gets back of the adapter, `(loss_X − loss_Y) ×
//! elements`, the loss counting lost signal (`1 − share kept`) and added noise ([`loss`]), in
//! output space when the merge calibrated; its cost is the bytes it adds (or, for a demotion,
//! saves); the choice with the least summed loss within the budget is taken. So bytes can move
//! from tensors the base's recipe gave more bits than the adapter needs to those where it loses
//! most, and `auto:0` keeps the base's size.
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

/// Types `--promote auto` may move a touched tensor down to, to fund promotions elsewhere (after
/// each one's fallback for the row length), never below the smallest type of the base's touched
/// tensors (`floor_bits` of [`candidate_types`]): only the tensors the base's recipe gave more
/// bits (a Q4_K_M base's Q6_K and Q8_0) give some back. Letting a Q4_1 base's tensors move to
/// Q4_K's grid at fewer bits was measured worse: SmolLM2 Q4_1 with the fact adapter, default
/// merge `--promote auto`, 47 of 48 facts instead of 48, held-out KL 0.060 against 0.059.
const DEMOTIONS: [GgmlType; 2] = [GgmlType::Q5_K, GgmlType::Q4_K];

/// The types tried for a touched tensor: its planned type first, then the [`LADDER`] and the
/// `--promote` types that would be larger, smallest first, each after its fallback for the row
/// length; for `--promote auto` also the [`DEMOTIONS`] that would be smaller but no smaller than
/// `floor_bits` per weight. Empty for a tensor no adapter touches and for one whose type the user
/// chose ([`TensorPlan::retyped`]).
pub fn candidate_types(p: &TensorPlan<'_>, promote: &Promote, floor_bits: f64) -> Vec<GgmlType> {
    if !p.is_touched() || p.retyped {
        return Vec::new();
    }
    let planned = bits_per_weight(p.ty_out);
    let extra: Vec<GgmlType> = match promote {
        Promote::Type(t) => vec![*t],
        Promote::Map(pairs) => pairs.iter().map(|&(_, to)| to).collect(),
        _ => Vec::new(),
    };
    let fits = |types: &mut dyn Iterator<Item = GgmlType>, keep: &dyn Fn(f64) -> bool| {
        let mut out: Vec<GgmlType> = Vec::new();
        for t in types {
            let (fit, _) = fit_type(t, p.n_cols as u64);
            if keep(bits_per_weight(fit)) && fit != p.ty_out && !out.contains(&fit) {
                out.push(fit);
            }
        }
        out.sort_by(|a, b| bits_per_weight(*a).total_cmp(&bits_per_weight(*b)));
        out
    };
    let mut types = vec![p.ty_out];
    types.extend(fits(&mut LADDER.iter().copied().chain(extra), &|b| {
        b > planned
    }));
    if matches!(promote, Promote::Auto { .. }) {
        types.extend(fits(&mut DEMOTIONS.iter().copied(), &|b| {
            b < planned && b >= floor_bits
        }));
    }
    types
}

/// The fewest bits per weight among the planned types of the touched tensors: the floor of
/// [`DEMOTIONS`].
pub fn floor_bits(plans: &[TensorPlan<'_>]) -> f64 {
    plans
        .iter()
        .filter(|p| p.is_touched())
        .map(|p| bits_per_weight(p.ty_out))
        .fold(f64::INFINITY, f64::min)
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

pub fn tensor_bytes(ty: GgmlType, p: &TensorPlan<'_>) -> u64 {
    ty.row_bytes(p.n_cols as u64).unwrap_or(0) * p.n_rows as u64
}

/// Applies `--promote`; returns, per tensor, whether it was promoted. `freed` bytes (given back by
/// tensors retyped to a smaller type) add to `auto`'s budget.
pub fn apply(
    base: &[InputTensor<'_>],
    plans: &mut [TensorPlan<'_>],
    candidates: &[Vec<CandidateReport>],
    promote: &Promote,
    freed: i128,
) -> Vec<bool> {
    let mut promoted = vec![false; plans.len()];
    match promote {
        Promote::None => {}
        &Promote::Type(t) => {
            for p in plans.iter_mut().filter(|p| p.is_touched() && !p.retyped) {
                let (fit, _) = fit_type(t, p.n_cols as u64);
                if bits_per_weight(fit) > bits_per_weight(p.ty_out) {
                    promoted[p.index] = true;
                    retarget(p, t);
                }
            }
        }
        Promote::Map(pairs) => {
            for p in plans.iter_mut().filter(|p| p.is_touched() && !p.retyped) {
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
            let budget = (budget.max(0.0) * base_bytes as f64) as i128 + freed;
            let weights: Vec<f64> = plans
                .iter()
                .map(|p| (p.n_rows * p.n_cols) as f64 * sensitivity(&base[p.index].name))
                .collect();
            let chosen = allocate(&weights, candidates, budget);
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

/// `--promote auto`'s choice: per tensor, the index of its candidate (0 = the planned type) such
/// that the output grows by at most `budget` bytes and the summed loss ([`loss`] × the tensor's
/// `weights`: elements × [`sensitivity`]) is least. A Lagrangian relaxation: for a price `μ` per byte each tensor takes
/// the candidate minimizing `loss + μ·bytes`, and the smallest price whose choices fit is
/// searched; then what the budget still allows goes, best value per byte first, to promotions.
/// The price lets a tensor give bytes back (a demotion, where its loss grows least per byte
/// saved) to fund a promotion that buys more, so even `auto:0` can move bytes to where the
/// adapter needs them; with no demotion worth its loss it reduces to the greedy promotions alone.
fn allocate(weights: &[f64], candidates: &[Vec<CandidateReport>], budget: i128) -> Vec<usize> {
    // (bytes over the planned type, weighted loss) per candidate; tensors without a measurable
    // loss keep their planned type.
    let options: Vec<Vec<(i128, f64)>> = candidates
        .iter()
        .zip(weights)
        .map(|(cands, &weight)| {
            let losses: Option<Vec<f64>> = cands.iter().map(|c| loss(&c.sums)).collect();
            match (losses, cands.first()) {
                (Some(l), Some(planned)) => cands
                    .iter()
                    .zip(l)
                    .map(|(c, l)| (c.bytes as i128 - planned.bytes as i128, l * weight))
                    .collect(),
                _ => Vec::new(),
            }
        })
        .collect();
    let choose = |price: f64| -> Vec<usize> {
        options
            .iter()
            .map(|opts| {
                let mut best = 0;
                for (j, &(bytes, l)) in opts.iter().enumerate() {
                    let (b0, l0) = opts[best];
                    if l + price * (bytes as f64) < l0 + price * (b0 as f64) {
                        best = j;
                    }
                }
                best
            })
            .collect()
    };
    let grown = |chosen: &[usize]| -> i128 {
        chosen
            .iter()
            .zip(&options)
            .map(|(&j, o)| o.get(j).map_or(0, |c| c.0))
            .sum()
    };
    let mut chosen = choose(0.0);
    if grown(&chosen) > budget {
        // Bisect the price on a log scale between one that keeps every planned type's total
        // (the planned choice is always feasible, so a high enough price fits) and zero.
        let (mut lo, mut hi) = (1e-30f64, 1e30f64);
        for _ in 0..200 {
            let mid = (lo * hi).sqrt();
            if grown(&choose(mid)) > budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        chosen = choose(hi);
        if grown(&chosen) > budget {
            chosen = vec![0; options.len()];
        }
    }
    // Fill what is left, best loss bought per byte first.
    let mut left = budget - grown(&chosen);
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, opts) in options.iter().enumerate() {
            let Some(&(b_cur, l_cur)) = opts.get(chosen[i]) else {
                continue;
            };
            for (j, &(b, l)) in opts.iter().enumerate() {
                let (cost, gain) = (b - b_cur, l_cur - l);
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
        left -= options[i][j].0 - options[i][chosen[i]].0;
        chosen[i] = j;
    }
    chosen
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A candidate of `bytes` whose noise relative to the adapter's change is `noise`.
    fn cand(ty: GgmlType, bytes: u64, noise: f64) -> CandidateReport {
        CandidateReport {
            ty: ty.name().to_string(),
            ggml_type: ty,
            bytes,
            relative_error: Some(noise),
            kept: Kept {
                share_kept: Some(1.0),
                noise: Some(noise),
            },
            sums: KeptSums {
                sq_delta: 1.0,
                sq_noise: noise * noise,
                dot_kept: 1.0,
            },
        }
    }

    #[test]
    fn a_zero_budget_moves_bytes_from_where_they_buy_little_to_where_they_buy_much() {
        use GgmlType::*;
        // Tensor 0 (Q6_K) loses little by dropping to Q5_K; tensor 1 (Q4_K) gains much from Q5_K.
        let cands = vec![
            vec![cand(Q6_K, 1000, 0.20), cand(Q5_K, 900, 0.25)],
            vec![cand(Q4_K, 800, 0.60), cand(Q5_K, 900, 0.30)],
        ];
        assert_eq!(allocate(&[1.0, 1.0], &cands, 0), vec![1, 1]);
        // When the demotion costs more than the promotion buys, nothing moves.
        let costly = vec![
            vec![cand(Q6_K, 1000, 0.20), cand(Q5_K, 900, 0.70)],
            cands[1].clone(),
        ];
        assert_eq!(allocate(&[1.0, 1.0], &costly, 0), vec![0, 0]);
        // A budget pays for the promotion without the demotion.
        assert_eq!(allocate(&[1.0, 1.0], &costly, 100), vec![0, 1]);
        // The output never grows past the budget.
        let many = vec![
            vec![
                cand(Q4_K, 800, 0.6),
                cand(Q5_K, 900, 0.3),
                cand(Q8_0, 1500, 0.1)
            ];
            4
        ];
        for budget in [0, 50, 100, 250, 700, 2800] {
            let chosen = allocate(&[1.0; 4], &many, budget);
            let grown: i128 = chosen.iter().map(|&j| many[0][j].bytes as i128 - 800).sum();
            assert!(grown <= budget, "{budget}: {chosen:?}");
        }
        assert_eq!(allocate(&[1.0; 4], &many, 2800), vec![2; 4]);
    }
}
