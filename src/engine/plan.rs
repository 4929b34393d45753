//! The plan: which base tensors each adapter touches, with which scale, in which type each recoded
//! tensor is written and by which requantization strategy. Every check runs here, before anything
//! is written, and every offending tensor is collected into one error.

use std::collections::HashMap;

use crate::quant::GgmlType;

use super::requant::Requant;
use super::types::{fit_type, is_writable, keep_type};
use super::{codec, AdapterInput, EngineError, InputTensor, MergeType, Update};

/// One update of one base tensor, from one adapter.
pub struct PlannedOp<'u> {
    /// Index of the adapter in the merge's input list.
    pub adapter: usize,
    /// Full scale applied to `B·A`: user scale × the adapter's effective scale (alpha/rank).
    pub scale: f32,
    pub update: &'u Update,
}

/// What happens to one base tensor.
pub struct TensorPlan<'u> {
    /// Position in the base's tensor order (= output order).
    pub index: usize,
    /// Elements per row (ggml `ne[0]`).
    pub n_cols: usize,
    /// Rows (product of the other dims).
    pub n_rows: usize,
    pub ty_in: GgmlType,
    /// Output type, after fallbacks.
    pub ty_out: GgmlType,
    /// The requested type did not fit this tensor (or cannot be written) and `ty_out` replaced it.
    pub fallback: bool,
    /// Empty: no adapter changes this tensor (copied byte for byte unless `ty_out` differs).
    pub ops: Vec<PlannedOp<'u>>,
    /// How the exact rows become `ty_out` bytes.
    pub requant: Requant<'u>,
    /// The user gave this tensor its type ([`retype`]): `--promote` leaves it alone.
    pub retyped: bool,
}

impl TensorPlan<'_> {
    /// An adapter changes this tensor.
    pub fn is_touched(&self) -> bool {
        !self.ops.is_empty()
    }

    /// The tensor's bytes are computed (an adapter touches it or it changes type), not copied.
    pub fn is_recoded(&self) -> bool {
        self.is_touched() || self.ty_out != self.ty_in
    }
}

/// Rows and columns of a base tensor as a matrix: ggml `ne[0]` is the row length, the other dims
/// multiply into rows.
pub fn matrix_shape(dims: &[u64]) -> Option<(usize, usize)> {
    let n_cols = *dims.first()?;
    let n_rows = dims[1..]
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))?;
    Some((usize::try_from(n_rows).ok()?, usize::try_from(n_cols).ok()?))
}

/// Why a plan cannot run, one per offending adapter or tensor.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanProblem {
    #[error("{adapter}: architecture '{got}' but the base is '{want}'")]
    Architecture {
        adapter: String,
        got: String,
        want: String,
    },
    #[error("{adapter}: tensor '{target}' does not exist in the base")]
    NotInBase { adapter: String, target: String },
    #[error("{adapter}: tensor '{target}': {problem} (base shape {dims:?})")]
    Shape {
        adapter: String,
        target: String,
        problem: ShapeProblem,
        dims: Vec<u64>,
    },
    #[error("{adapter}: tensor '{target}': base type {ty} cannot be read for merging")]
    BaseUnreadable {
        adapter: String,
        target: String,
        ty: GgmlType,
    },
    #[error("tensor '{tensor}': type {ty} cannot be read")]
    Unreadable { tensor: String, ty: GgmlType },
    /// A tensor given its own output type (`--token-embedding-type`, `--output-tensor-type`) that
    /// the base does not have.
    #[error("cannot give '{tensor}' its own type: the base has no such tensor{}", if tensor.starts_with("output.") { " (a model that ties its output head to token_embd.weight has none)" } else { "" })]
    RetypeNotInBase { tensor: String },
    #[error("tensor '{tensor}': cannot be written as {ty} (rows of {n_cols})")]
    Unwritable {
        tensor: String,
        ty: GgmlType,
        n_cols: usize,
    },
}

/// How an update's shape disagrees with its base tensor's.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ShapeProblem {
    #[error("rank 0")]
    RankZero,
    #[error("{n_expert} experts do not divide {n_rows} rows")]
    Experts { n_expert: usize, n_rows: usize },
    #[error("lora_a has {len} values, expected rank {rank} × {n_cols}{}", if *.n_expert > 1 { format!(" × {} experts", .n_expert) } else { String::new() })]
    LoraA {
        len: usize,
        rank: usize,
        n_cols: usize,
        n_expert: usize,
    },
    #[error("lora_b has {len} values, expected {n_rows} × rank {rank}")]
    LoraB {
        len: usize,
        n_rows: usize,
        rank: usize,
    },
    #[error("DoRA magnitude has {len} values, expected {n_rows}")]
    Magnitude { len: usize, n_rows: usize },
    #[error("{len} values, expected {expected}")]
    Values { len: usize, expected: usize },
}

/// Builds the plan, or one error listing every problem: architecture mismatches, adapter targets
/// missing from the base, shape mismatches, base types that cannot be read.
pub fn plan<'u>(
    base_arch: Option<&str>,
    base: &[InputTensor<'_>],
    adapters: &'u [AdapterInput],
    outtype: MergeType,
) -> Result<Vec<TensorPlan<'u>>, EngineError> {
    let mut problems = Vec::new();
    let by_name: HashMap<&str, usize> = base
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut plans: Vec<TensorPlan<'u>> = Vec::with_capacity(base.len());
    for (index, t) in base.iter().enumerate() {
        let (n_rows, n_cols) = matrix_shape(&t.dims).unwrap_or((0, 0));
        plans.push(TensorPlan {
            index,
            n_cols,
            n_rows,
            ty_in: t.ty,
            ty_out: t.ty,
            fallback: false,
            ops: Vec::new(),
            requant: Requant::default(),
            retyped: false,
        });
    }
    for (ai, adapter) in adapters.iter().enumerate() {
        if let (Some(want), Some(got)) = (base_arch, adapter.architecture.as_deref()) {
            if want != got {
                problems.push(PlanProblem::Architecture {
                    adapter: adapter.name.clone(),
                    got: got.to_string(),
                    want: want.to_string(),
                });
            }
        }
        for (target, update) in &adapter.updates {
            let Some(&bi) = by_name.get(target.as_str()) else {
                problems.push(PlanProblem::NotInBase {
                    adapter: adapter.name.clone(),
                    target: target.clone(),
                });
                continue;
            };
            let p = &mut plans[bi];
            if let Err(problem) = check_shape(update, p.n_rows, p.n_cols) {
                problems.push(PlanProblem::Shape {
                    adapter: adapter.name.clone(),
                    target: target.clone(),
                    problem,
                    dims: base[bi].dims.clone(),
                });
                continue;
            }
            if !codec::can_dequantize(p.ty_in) {
                problems.push(PlanProblem::BaseUnreadable {
                    adapter: adapter.name.clone(),
                    target: target.clone(),
                    ty: p.ty_in,
                });
                continue;
            }
            let scale = match update {
                Update::LowRank { scale, .. } => adapter.scale * scale,
                _ => adapter.scale,
            };
            p.ops.push(PlannedOp {
                adapter: ai,
                scale,
                update,
            });
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::Plan(problems));
    }
    for p in plans.iter_mut().filter(|p| p.is_touched()) {
        let (ty, fallback) = match outtype {
            MergeType::Keep => keep_type(p.ty_in, p.n_cols as u64),
            MergeType::Type(t) => fit_type(t, p.n_cols as u64),
        };
        p.ty_out = ty;
        p.fallback = fallback;
    }
    Ok(plans)
}

/// Gives the named tensors their own output type (with fallback), touched by an adapter or not, as
/// llama-quantize's `--token-embedding-type`/`--output-tensor-type` do: an untouched one is
/// requantized from its dequantized values, by the merge's method where it has statistics for the
/// tensor (the output head's input) and to nearest otherwise. A retyped tensor keeps that type
/// (`--promote` does not choose for it). Every problem is listed.
pub fn retype(
    base: &[InputTensor<'_>],
    plans: &mut [TensorPlan<'_>],
    retypes: &[(String, GgmlType)],
) -> Result<(), EngineError> {
    let mut problems = Vec::new();
    for (name, ty) in retypes {
        let Some(p) = plans.iter_mut().find(|p| base[p.index].name == *name) else {
            problems.push(PlanProblem::RetypeNotInBase {
                tensor: name.clone(),
            });
            continue;
        };
        let (fit, fallback) = fit_type(*ty, p.n_cols as u64);
        p.ty_out = fit;
        p.fallback = fallback;
        p.retyped = true;
        problems.extend(recode_problem(name, p));
    }
    if !problems.is_empty() {
        return Err(EngineError::Plan(problems));
    }
    Ok(())
}

/// Why tensor `name` cannot be recoded as `p` plans: its base type cannot be read, or its output type
/// cannot be written at its row length.
pub fn recode_problem(name: &str, p: &TensorPlan<'_>) -> Option<PlanProblem> {
    if !codec::can_dequantize(p.ty_in) {
        return Some(PlanProblem::Unreadable {
            tensor: name.to_string(),
            ty: p.ty_in,
        });
    }
    if !is_writable(p.ty_out) || codec::row_bytes(p.ty_out, p.n_cols).is_err() {
        return Some(PlanProblem::Unwritable {
            tensor: name.to_string(),
            ty: p.ty_out,
            n_cols: p.n_cols,
        });
    }
    None
}

/// Retargets a touched tensor to `target` (a promotion), with fallback.
pub fn retarget(p: &mut TensorPlan<'_>, target: GgmlType) {
    debug_assert!(is_writable(target));
    let (ty, fallback) = fit_type(target, p.n_cols as u64);
    p.ty_out = ty;
    p.fallback = fallback;
}

/// Checks an update's declared shape against its base tensor's.
pub fn check_shape(update: &Update, n_rows: usize, n_cols: usize) -> Result<(), ShapeProblem> {
    match update {
        Update::LowRank { shape, .. } => {
            if shape.rank == 0 {
                return Err(ShapeProblem::RankZero);
            }
            if shape.n_expert == 0 || !n_rows.is_multiple_of(shape.n_expert) {
                return Err(ShapeProblem::Experts {
                    n_expert: shape.n_expert,
                    n_rows,
                });
            }
            if shape.a_len != shape.n_expert * shape.rank * n_cols {
                return Err(ShapeProblem::LoraA {
                    len: shape.a_len,
                    rank: shape.rank,
                    n_cols,
                    n_expert: shape.n_expert,
                });
            }
            if shape.b_len != n_rows * shape.rank {
                return Err(ShapeProblem::LoraB {
                    len: shape.b_len,
                    n_rows,
                    rank: shape.rank,
                });
            }
            if let Some(len) = shape.magnitude_len {
                if len != n_rows {
                    return Err(ShapeProblem::Magnitude { len, n_rows });
                }
            }
            Ok(())
        }
        Update::Replace { len, .. } | Update::Add { len, .. } => {
            if *len != n_rows * n_cols {
                Err(ShapeProblem::Values {
                    len: *len,
                    expected: n_rows * n_cols,
                })
            } else {
                Ok(())
            }
        }
    }
}
