//! The merge plan: which base tensors each adapter touches, with which scale, and in which type each
//! merged tensor is written. Every check runs here, before anything is written, and every offending
//! tensor is collected into one error.

use std::collections::HashMap;

use crate::quant::GgmlType;

use super::types::{fit_type, is_writable, keep_type};
use super::{codec, AdapterInput, BaseTensor, MergeError, OutType, Update};

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
    /// Empty: copied byte for byte.
    pub ops: Vec<PlannedOp<'u>>,
}

impl TensorPlan<'_> {
    pub fn is_touched(&self) -> bool {
        !self.ops.is_empty()
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

/// Builds the plan, or one error listing every problem: architecture mismatches, adapter targets
/// missing from the base, shape mismatches, base types that cannot be read.
pub fn plan<'u>(
    base_arch: Option<&str>,
    base: &[BaseTensor<'_>],
    adapters: &'u [AdapterInput],
    outtype: OutType,
) -> Result<Vec<TensorPlan<'u>>, MergeError> {
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
        });
    }
    for (ai, adapter) in adapters.iter().enumerate() {
        if let (Some(want), Some(got)) = (base_arch, adapter.architecture.as_deref()) {
            if want != got {
                problems.push(format!(
                    "{}: architecture '{got}' but the base is '{want}'",
                    adapter.name
                ));
            }
        }
        for (target, update) in &adapter.updates {
            let Some(&bi) = by_name.get(target.as_str()) else {
                problems.push(format!(
                    "{}: tensor '{target}' does not exist in the base",
                    adapter.name
                ));
                continue;
            };
            let p = &mut plans[bi];
            if let Err(why) = check_shape(update, p.n_rows, p.n_cols) {
                problems.push(format!(
                    "{}: tensor '{target}': {why} (base shape {:?})",
                    adapter.name, base[bi].dims
                ));
                continue;
            }
            if !codec::can_dequantize(p.ty_in) {
                problems.push(format!(
                    "{}: tensor '{target}': base type {} cannot be read for merging",
                    adapter.name, p.ty_in
                ));
                continue;
            }
            let scale = match update {
                Update::LowRank(lr) => adapter.scale * lr.scale,
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
        return Err(MergeError::Plan(problems));
    }
    for p in plans.iter_mut().filter(|p| p.is_touched()) {
        let (ty, fallback) = match outtype {
            OutType::Keep => keep_type(p.ty_in, p.n_cols as u64),
            OutType::Type(t) => fit_type(t, p.n_cols as u64),
        };
        p.ty_out = ty;
        p.fallback = fallback;
    }
    Ok(plans)
}

/// Retargets a touched tensor to `target` (a promotion), with fallback.
pub fn retarget(p: &mut TensorPlan<'_>, target: GgmlType) {
    debug_assert!(is_writable(target));
    let (ty, fallback) = fit_type(target, p.n_cols as u64);
    p.ty_out = ty;
    p.fallback = fallback;
}

fn check_shape(update: &Update, n_rows: usize, n_cols: usize) -> Result<(), String> {
    match update {
        Update::LowRank(lr) => {
            if lr.rank == 0 {
                return Err("rank 0".into());
            }
            if lr.n_expert == 0 || !n_rows.is_multiple_of(lr.n_expert) {
                return Err(format!(
                    "{} experts do not divide {n_rows} rows",
                    lr.n_expert
                ));
            }
            if lr.a.len() != lr.n_expert * lr.rank * n_cols {
                return Err(format!(
                    "lora_a has {} values, expected rank {} × {n_cols}{}",
                    lr.a.len(),
                    lr.rank,
                    if lr.n_expert > 1 {
                        format!(" × {} experts", lr.n_expert)
                    } else {
                        String::new()
                    }
                ));
            }
            if lr.b.len() != n_rows * lr.rank {
                return Err(format!(
                    "lora_b has {} values, expected {n_rows} × rank {}",
                    lr.b.len(),
                    lr.rank
                ));
            }
            if let Some(m) = &lr.magnitude {
                if m.len() != n_rows {
                    return Err(format!(
                        "DoRA magnitude has {} values, expected {n_rows}",
                        m.len()
                    ));
                }
            }
            Ok(())
        }
        Update::Replace(v) | Update::Add(v) => {
            if v.len() != n_rows * n_cols {
                Err(format!("{} values, expected {}", v.len(), n_rows * n_cols))
            } else {
                Ok(())
            }
        }
    }
}
