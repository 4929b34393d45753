//! How a recoded tensor's exact f32 rows become bytes of its output type: one [`Requant`] strategy
//! per tensor plan. The engine hands each strategy a block of whole rows ([`RowBlock`]: the exact
//! values, the base's own values, and where the block sits in its tensor) and measures the result
//! the same way whatever the strategy. A new requantization method is one more variant here, with
//! whatever per-tensor state it needs (calibration statistics, ...) carried in the variant.

use std::sync::Arc;

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

impl<'b> RowBlock<'b> {
    /// Rows `range` of the block (counted from its first row), as a block of their own.
    pub fn rows(&self, range: std::ops::Range<usize>) -> RowBlock<'b> {
        let n = self.n_cols;
        let row_bytes = self
            .base_bytes
            .map(|b| b.len() / (self.exact.len() / n.max(1)).max(1));
        RowBlock {
            exact: &self.exact[range.start * n..range.end * n],
            base: &self.base[range.start * n..range.end * n],
            r0: self.r0 + range.start,
            n_cols: n,
            base_bytes: self
                .base_bytes
                .zip(row_bytes)
                .map(|(b, rb)| &b[range.start * rb..range.end * rb]),
        }
    }
}

/// How one tensor's rows are requantized.
#[derive(Clone, Copy, Debug)]
pub enum Requant<'u> {
    /// Round to nearest as ggml does: the reference quantizer, or with an importance matrix the
    /// importance-weighted one (`ggml_quantize_chunk`), bit for bit.
    Nearest { importance: Option<Importance<'u>> },
    /// Keep the adapter's effect on the tensor's output over calibration inputs (see
    /// [`preserve`]); types without a known grid (IQ, floats) are rounded to nearest. `stats`
    /// holds one entry per `rows_per_stats` rows: one for a matrix, one per expert for stacked
    /// experts; rows whose entry is `None` are rounded to nearest.
    Preserve {
        stats: &'u [Option<Arc<InputStats>>],
        rows_per_stats: usize,
    },
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

    /// The runs of `rows` (counted from its first row) that share one entry of the statistics, with
    /// that entry: the whole block for a matrix, one run per expert a stacked tensor's block spans.
    /// `None` where there are no statistics (nearest, an expert no token reached, another width).
    pub fn runs(&self, rows: &RowBlock<'_>) -> Vec<(std::ops::Range<usize>, Option<&InputStats>)> {
        let n_rows = rows.exact.len() / rows.n_cols.max(1);
        let Requant::Preserve {
            stats,
            rows_per_stats,
        } = self
        else {
            return vec![(0..n_rows, None)];
        };
        let mut runs = Vec::new();
        let mut r = 0;
        while r < n_rows {
            let at = rows.r0 + r;
            let end = n_rows.min(r + rows_per_stats - at % rows_per_stats);
            let s = stats
                .get(at / rows_per_stats)
                .and_then(|s| s.as_deref())
                .filter(|s| s.n_cols == rows.n_cols);
            runs.push((r..end, s));
            r = end;
        }
        runs
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
            Requant::Preserve { .. } => {
                let n_rows = rows.exact.len() / rows.n_cols.max(1);
                let row_bytes = out.len() / n_rows.max(1);
                for (run, stats) in self.runs(rows) {
                    let sub = rows.rows(run.clone());
                    let o = &mut out[run.start * row_bytes..run.end * row_bytes];
                    match stats {
                        Some(s) if preserve::supports(ty) => {
                            preserve::encode_rows(ty, s, sub.exact, sub.base_bytes, o)?
                        }
                        _ => codec::quantize(ty, sub.exact, o, sub.n_cols, sub.r0, None)?,
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_spanning_two_experts_is_split_at_the_boundary() {
        let n_cols = 32;
        let tokens: Vec<f32> = (0..64 * n_cols)
            .map(|i| ((i * 7) % 13) as f32 - 6.0)
            .collect();
        let s = Arc::new(InputStats::new(
            n_cols,
            &tokens,
            &[],
            &preserve::Weighting::default(),
        ));
        // Three experts of 32 rows; the second reached by no calibration token.
        let stats = vec![Some(Arc::clone(&s)), None, Some(s)];
        let requant = Requant::Preserve {
            stats: &stats,
            rows_per_stats: 32,
        };
        let values = vec![0f32; 48 * n_cols];
        let block = RowBlock {
            exact: &values,
            base: &values,
            r0: 24,
            n_cols,
            base_bytes: None,
        };
        let runs: Vec<(std::ops::Range<usize>, bool)> = requant
            .runs(&block)
            .into_iter()
            .map(|(r, s)| (r, s.is_some()))
            .collect();
        assert_eq!(runs, vec![(0..8, true), (8..40, false), (40..48, true)]);
        assert_eq!(block.rows(8..40).r0, 32);
        assert_eq!(requant.runs(&block.rows(0..8)).len(), 1);
    }
}
