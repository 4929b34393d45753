//! How a recoded tensor's exact f32 rows become bytes of its output type: one [`Requant`] strategy
//! per tensor plan. The engine hands each strategy a block of whole rows ([`RowBlock`]: the exact
//! values, the base's own values, and where the block sits in its tensor) and measures the result
//! the same way whatever the strategy. A new requantization method is one more variant here, with
//! whatever per-tensor state it needs (calibration statistics, ...) carried in the variant.

use super::preserve::{self, InputStats};
use super::{codec, EngineError};
use crate::quant::GgmlType;

/// An importance matrix for one tensor as llama-quantize applies it: `n_cols` weights per expert
/// (one expert for a plain matrix), expert `e` owning rows `e·rows_per_expert..(e+1)·rows_per_expert`.
#[derive(Clone, Copy, Debug)]
pub struct Importance<'u> {
    pub weights: &'u [f32],
    pub rows_per_expert: usize,
}

impl<'u> Importance<'u> {
    /// The weights that apply to row `row` of a tensor with `n_cols` columns.
    pub fn for_row(&self, row: usize, n_cols: usize) -> &'u [f32] {
        let e = row / self.rows_per_expert.max(1);
        &self.weights[e * n_cols..(e + 1) * n_cols]
    }
}

/// A block of whole rows of one tensor, ready to be requantized.
pub struct RowBlock<'b> {
    /// The values to encode (the exact merge, or the base's own values when nothing is added).
    pub exact: &'b [f32],
    /// The base tensor's own values for these rows (dequantized).
    pub base: &'b [f32],
    /// Index of the block's first row in its tensor.
    pub r0: usize,
    /// Elements per row.
    pub n_cols: usize,
    /// The base's own bytes for these rows when the output type is the base's: their grids are
    /// what [`Requant::Preserve`] can keep.
    pub base_bytes: Option<&'b [u8]>,
}

/// How one tensor's rows are requantized.
#[derive(Clone, Copy, Debug)]
pub enum Requant<'u> {
    /// Round to nearest as ggml does: the reference quantizer, or with an importance matrix the
    /// importance-weighted one (`ggml_quantize_chunk`), bit for bit.
    Nearest { importance: Option<Importance<'u>> },
    /// Keep the adapter's effect on the tensor's output over calibration inputs (see
    /// [`preserve`]); types without a known grid (IQ, floats) are rounded to nearest.
    Preserve { stats: &'u InputStats },
}

impl Default for Requant<'_> {
    fn default() -> Self {
        Requant::Nearest { importance: None }
    }
}

impl Requant<'_> {
    /// The importance weights, when the strategy uses some.
    pub fn importance(&self) -> Option<&Importance<'_>> {
        match self {
            Requant::Nearest { importance } => importance.as_ref(),
            Requant::Preserve { .. } => None,
        }
    }

    /// The calibration statistics, when the strategy has some (the report measures in output
    /// space with them).
    pub fn stats(&self) -> Option<&InputStats> {
        match self {
            Requant::Nearest { .. } => None,
            Requant::Preserve { stats } => Some(stats),
        }
    }

    /// Rows worth handing to [`Requant::encode`] at once: the preserving sweep runs
    /// [`preserve::LANES`] rows side by side.
    pub fn rows_together(&self) -> usize {
        match self {
            Requant::Nearest { .. } => 1,
            Requant::Preserve { .. } => preserve::LANES,
        }
    }

    /// Encodes `rows` as `ty` into `out` (whole rows of `ty`).
    pub fn encode(
        &self,
        ty: GgmlType,
        rows: &RowBlock<'_>,
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        match self {
            Requant::Nearest { importance } => codec::quantize(
                ty,
                rows.exact,
                out,
                rows.n_cols,
                rows.r0,
                importance.as_ref(),
            ),
            Requant::Preserve { stats }
                if preserve::supports(ty) && stats.n_cols == rows.n_cols =>
            {
                preserve::encode_rows(ty, stats, rows.exact, rows.base_bytes, out)
            }
            Requant::Preserve { .. } => {
                codec::quantize(ty, rows.exact, out, rows.n_cols, rows.r0, None)
            }
        }
    }
}
