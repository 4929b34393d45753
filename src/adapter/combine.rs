//! Materializing a [`LoraTensor`]: reading its factors, combining pairs (stacked experts, fused
//! block-diagonal parts, concatenations), folding each pair's scale relative to the combined alpha
//! into its `B`, the llama-family RoPE permutation of `B` rows, and the conversion to the base
//! tensor's layout ([`LowRank`]) that merge and the runtime LoRA apply.

use std::ops::Range;

use super::matrix::Matrix;
use super::model::{
    scale_of, ConcatPart, Factor, FactorError, Layout, LoadedLora, LoraPair, LoraTensor, LowRank,
};
use super::AdapterError;
use crate::arch::TargetKind;

impl LoraTensor {
    /// The DoRA magnitude vector (`n_out` values), rows in GGUF order (RoPE-permuted like `B`).
    pub fn load_magnitude(&self) -> Result<Option<Vec<f32>>, AdapterError> {
        self.load_row_vector(self.dora_magnitude.as_ref())
    }

    /// The `lora_B.bias` vector (`n_out` values, to be multiplied by [`LoraTensor::scale`]), rows in
    /// GGUF order.
    pub fn load_lora_bias(&self) -> Result<Option<Vec<f32>>, AdapterError> {
        self.load_row_vector(self.lora_bias.as_ref())
    }

    fn load_row_vector(&self, f: Option<&Factor>) -> Result<Option<Vec<f32>>, AdapterError> {
        let Some(f) = f else { return Ok(None) };
        let v = f.load()?;
        let rows: Option<Range<usize>> = match &self.layout {
            Layout::Single(p) => p.b_rows.clone(),
            _ => None,
        };
        let data = match rows {
            Some(r) if r.end <= v.data.len() => v.data[r].to_vec(),
            Some(_) => return Err(shape_err(&self.target)),
            None => v.data,
        };
        let col = Matrix::new(data.len(), 1, data).ok_or_else(|| shape_err(&self.target))?;
        let col = match self.permute_heads {
            Some(n) => permute_rows(&col, n).ok_or_else(|| shape_err(&self.target))?,
            None => col,
        };
        Ok(Some(col.data))
    }

    /// Reads and combines the data: stacks experts, builds fused block-diagonal factors (folding
    /// each part's scale relative to the combined alpha into its `B` block), takes split rows, and
    /// applies the RoPE permutation to `B` rows.
    pub fn load(&self) -> Result<LoadedLora, AdapterError> {
        let alpha = self.alpha();
        let (a, mut b, n_expert, rank) = match &self.layout {
            Layout::Single(p) => {
                let (a, b) = load_pair(p)?;
                (a, b, 1, p.rank())
            }
            Layout::Experts(ps) => {
                let rank = self.rank();
                let mut a_data = Vec::new();
                let mut b_data = Vec::new();
                let (mut n_in, mut n_out) = (0, 0);
                for p in ps {
                    let (a, mut b) = load_pair(p)?;
                    if a.rows != rank {
                        return Err(FactorError::ExpertRank {
                            target: self.target.clone(),
                            source_name: p.source.clone(),
                            rank: a.rows,
                            expected: rank,
                        }
                        .into());
                    }
                    fold_ratio(&mut b, p.alpha, alpha);
                    n_in = a.cols;
                    n_out = b.rows;
                    a_data.extend_from_slice(&a.data);
                    b_data.extend_from_slice(&b.data);
                }
                let n = ps.len();
                (
                    Matrix::new(n * rank, n_in, a_data).ok_or_else(|| shape_err(&self.target))?,
                    Matrix::new(n * n_out, rank, b_data).ok_or_else(|| shape_err(&self.target))?,
                    n,
                    rank,
                )
            }
            Layout::Fused(parts) => {
                let rank = self.rank();
                let n_in = self.n_in();
                let n_out = self.n_out();
                let target_scale = scale_of(alpha, rank);
                let mut a = Matrix::zeros(rank, n_in);
                let mut b = Matrix::zeros(n_out, rank);
                let (mut r0, mut row0) = (0, 0);
                for part in parts {
                    if let Some(p) = &part.pair {
                        let (pa, pb) = load_pair(p)?;
                        if pa.cols != n_in {
                            // Parts read the same input: a part of another width cannot be stacked.
                            return Err(FactorError::FusedInputs {
                                target: self.target.clone(),
                                source_name: p.source.clone(),
                                n_in: pa.cols,
                                expected: n_in,
                            }
                            .into());
                        }
                        let factor = if target_scale == 0.0 {
                            0.0
                        } else {
                            (p.scale() / target_scale) as f32
                        };
                        let r = pa.rows;
                        a.data[r0 * n_in..(r0 + r) * n_in].copy_from_slice(&pa.data);
                        for i in 0..pb.rows {
                            for j in 0..r {
                                let v = pb.data[i * r + j];
                                b.data[(row0 + i) * rank + r0 + j] =
                                    if factor == 1.0 { v } else { v * factor };
                            }
                        }
                        r0 += r;
                    }
                    row0 += part.rows;
                }
                (a, b, 1, rank)
            }
            Layout::Concat(parts) => self.load_concat(parts, alpha)?,
        };
        if let Some(n_head) = self.permute_heads {
            let rows_per_expert = b.rows / n_expert;
            let mut out = Vec::with_capacity(b.data.len());
            for e in 0..n_expert {
                let block = b.rows_range(e * rows_per_expert..(e + 1) * rows_per_expert);
                let permuted =
                    permute_rows(&block, n_head).ok_or_else(|| FactorError::NotPermutable {
                        target: self.target.clone(),
                        rows: block.rows,
                        n_head,
                    })?;
                out.extend_from_slice(&permuted.data);
            }
            b.data = out;
        }
        Ok(LoadedLora {
            a,
            b,
            n_expert,
            rank,
            alpha,
        })
    }
    /// [`Layout::Concat`]: loads each part (with its own permutation, fusion and expert stacking)
    /// and stacks it in, folding `part scale × part's effective scale / combined scale` into its
    /// `B` block (left untouched when that factor is exactly 1).
    fn load_concat(
        &self,
        parts: &[ConcatPart],
        alpha: f64,
    ) -> Result<(Matrix, Matrix, usize, usize), AdapterError> {
        let (rank, n_expert, n_in, n_out) =
            (self.rank(), self.n_expert(), self.n_in(), self.n_out());
        let target_scale = scale_of(alpha, rank);
        let mut a = Matrix::zeros(n_expert * rank, n_in);
        let mut b = Matrix::zeros(n_expert * n_out, rank);
        let mut r0 = 0;
        for part in parts {
            let l = part.tensor.load()?;
            if (l.n_expert, l.n_in(), l.n_out()) != (n_expert, n_in, n_out) {
                return Err(FactorError::ConcatShape {
                    target: self.target.clone(),
                    source_name: part.tensor.source(),
                    n_expert: l.n_expert,
                    n_out: l.n_out(),
                    n_in: l.n_in(),
                    want_expert: n_expert,
                    want_out: n_out,
                    want_in: n_in,
                }
                .into());
            }
            let r = l.rank;
            let factor = if target_scale == 0.0 {
                0.0
            } else {
                (part.scale * l.scale() / target_scale) as f32
            };
            for e in 0..n_expert {
                let dst = (e * rank + r0) * n_in;
                a.data[dst..dst + r * n_in]
                    .copy_from_slice(&l.a.data[e * r * n_in..(e + 1) * r * n_in]);
                for i in 0..n_out {
                    let src = &l.b.data[(e * n_out + i) * r..(e * n_out + i + 1) * r];
                    let dst = &mut b.data[(e * n_out + i) * rank + r0..][..r];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = if factor == 1.0 { v } else { v * factor };
                    }
                }
            }
            r0 += r;
        }
        Ok((a, b, n_expert, rank))
    }

    /// The update in the base tensor's own row layout (see [`LowRank`]), with the DoRA magnitude
    /// when there is one. Token embeddings turn around: the adapter's `B·A` is `n_embd × n_vocab`,
    /// the base's rows are tokens, so the update in base layout is `Aᵀ·Bᵀ`.
    pub fn low_rank(&self) -> Result<LowRank, AdapterError> {
        let l = self.load()?;
        let scale = l.scale() as f32;
        let magnitude = self.load_magnitude()?;
        Ok(match self.kind {
            TargetKind::Linear | TargetKind::Experts => LowRank {
                a: l.a.data,
                b: l.b.data,
                rank: l.rank,
                n_expert: l.n_expert.max(1),
                scale,
                magnitude,
            },
            TargetKind::Embedding => {
                if magnitude.is_some() {
                    return Err(FactorError::DoraOnEmbedding {
                        target: self.target.clone(),
                    }
                    .into());
                }
                LowRank {
                    a: l.b.transposed().data,
                    b: l.a.transposed().data,
                    rank: l.rank,
                    n_expert: 1,
                    scale,
                    magnitude: None,
                }
            }
        })
    }
}

fn shape_err(target: &str) -> AdapterError {
    FactorError::Inconsistent {
        target: target.to_string(),
    }
    .into()
}

/// Multiplies `b` by `alpha_pair / alpha_target` (the scale ratio when both share a rank), so a pair
/// whose alpha differs from its tensor's keeps its exact effective scale.
fn fold_ratio(b: &mut Matrix, alpha_pair: f64, alpha_target: f64) {
    if alpha_pair != alpha_target {
        let f = if alpha_target == 0.0 {
            0.0
        } else {
            (alpha_pair / alpha_target) as f32
        };
        b.scale_in_place(f);
    }
}

fn load_pair(p: &LoraPair) -> Result<(Matrix, Matrix), AdapterError> {
    let a = p.a.load()?;
    let b = p.b.load()?;
    if a.rows != b.cols {
        return Err(FactorError::PairRank {
            source_name: p.source.clone(),
            a_rank: a.rows,
            b_rank: b.cols,
            a: p.a.describe(),
            b: p.b.describe(),
        }
        .into());
    }
    let b = match &p.b_rows {
        Some(r) if r.end <= b.rows => b.rows_range(r.clone()),
        Some(r) => {
            return Err(FactorError::BRows {
                source_name: p.source.clone(),
                rows: r.clone(),
                b_rows: b.rows,
            }
            .into())
        }
        None => b,
    };
    Ok((a, b))
}

/// `convert_hf_to_gguf`'s `LlamaModel.permute` on the rows of `m`:
/// `reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
/// Row `h·d + i·(d/2) + j` of the input becomes row `h·d + 2j + i` (`d = rows / n_head`).
/// `None` when the rows do not split into `n_head` heads of even size.
pub fn permute_rows(m: &Matrix, n_head: usize) -> Option<Matrix> {
    if n_head == 0 || !m.rows.is_multiple_of(n_head) || !(m.rows / n_head).is_multiple_of(2) {
        return None;
    }
    let d = m.rows / n_head;
    let half = d / 2;
    let mut data = Vec::with_capacity(m.data.len());
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                data.extend_from_slice(m.row(h * d + i * half + j));
            }
        }
    }
    Some(Matrix {
        rows: m.rows,
        cols: m.cols,
        data,
    })
}
