//! The requantization that keeps the adapter: GPTQ-style error feedback, weighted by the inputs
//! each tensor really sees, onto the base's own grid where that is best.
//!
//! Why: the base's weights sit exactly on their grid and a trained adapter moves each by a few
//! percent of one step, so rounding each weight to nearest puts nearly all of them back (measured on
//! a fact-trained SmolLM2 adapter: 0% of the facts survive). What matters is the layer's output on
//! real inputs, so each row `w′ = w + ΔW` is quantized to minimize `‖X·(q − w′)‖² + λ‖q − w′‖²`
//! (`X`: the calibration activations entering the tensor, `t × n`; λ a damping that keeps the rest
//! in place): column by column, the error of each rounded weight is pushed onto the columns not yet
//! rounded, as the best ridge correction of the output (GPTQ/OBQ). A kept-grid weight can then move
//! by a whole step where that serves the output, and the adapter's effect survives as a sparse
//! pattern of moved codes.
//!
//! Token space. With `M_j = λI + Σ_{k>j} x_k x_kᵀ` (`x_k`: column `k` of `X`, over tokens) the
//! correction of column `k > j` after rounding `j` with error `e_j` is `e_j·x_kᵀ·p_j`,
//! `p_j = M_j⁻¹ x_j`; so a row keeps one `t`-vector `s = Σ e_j p_j` and column `k`'s target is
//! `w′_k + x_k·s`: `O(n·t)` per row instead of GPTQ's `O(n²)`, with the `p_j` computed once per
//! input by Sherman–Morrison in blocks (GEMMs, faer). The loss each rounding adds is
//! `λ(1 + x_jᵀp_j)·e_j²`, which is how each block chooses between the base's grid (codes move, the
//! block's scales stay) and a fresh grid fitted by ggml's own quantizer to the corrected targets:
//! whichever adds less. Two coordinate-descent sweeps over the rounded row (exact 1-D minimizers
//! on the grid) then take what the one-pass sweep left.
//!
//! The fit works in the [`DEFAULT_RANK`] leading directions of each input's token Gram (a thin
//! SVD of `X`) instead of every token, with the energy those directions miss in each channel
//! added to that channel's damping: the sweep's cost is linear in that width, and on held-out
//! text the narrower fit is as good (it also smooths a small calibration set's noise).

// Column sweeps index several per-column arrays (activations, feedback vectors, damping, codes)
// by the same column: index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

use crate::quant::grid::{has_grid, read_grid, write_codes, BlockGrid, MAX_BLOCK};
use crate::quant::{quantize_row, GgmlType};

use super::EngineError;

/// The default damping (see [`InputStats::new`]): a tenth of each channel's own energy plus a
/// hundredth of the mean, chosen on held-out tokens (tests/merge_preserve_types.rs and the fact
/// adapter's benchmark).
pub const DEFAULT_DAMP: f32 = 0.01;
pub const DEFAULT_DAMP_DIAG: f32 = 0.1;

/// Directions of each input's token Gram the fit keeps (the rest of each channel's energy joins
/// its damping, see [`InputStats::new`]). The sweep's cost is linear in it; measured against all
/// 448 fit tokens of the default 512 (llama.cpp judging, `scripts/bench-merge-quality.sh`): gemma3
/// Q4_K_M + rank-16 adapter, held-out KL 0.049 at 64 (0.052 at 32 and at 128, 0.055 at all) and
/// 23 s instead of 34 s wall; SmolLM2 facts, 0.917 of the facts either way, held-out KL 0.096
/// against 0.084.
pub const DEFAULT_RANK: usize = 64;

/// Columns per Sherman–Morrison block: the rank of each GEMM update of `M⁻¹`.
const SM_BLOCK: usize = 64;
/// Coordinate-descent sweeps after the error-feedback pass.
const CD_SWEEPS: usize = 2;
/// One calibration token in this many is held out of the fit, to measure on.
const EVAL_EVERY: usize = 8;

/// The calibration statistics of one linear input (shared by the tensors that read it: q/k/v,
/// gate/up), ready for [`encode_rows`].
pub struct InputStats {
    pub n_cols: usize,
    /// Tokens the fit uses.
    pub t: usize,
    /// `n_cols × t`: column `j`'s activations over the fit tokens.
    x: Vec<f32>,
    /// `n_cols × t`: `p_j = M_j⁻¹ x_j`.
    p: Vec<f32>,
    /// `1 + x_jᵀ p_j`: the loss weight of an error in column `j`.
    gain: Vec<f32>,
    /// `‖x_j‖²`.
    sq: Vec<f32>,
    /// The damping of column `j`, `D_j` (the diagonal added to `XᵀX`), and `√D_j`.
    damp: Vec<f32>,
    sd: Vec<f32>,
    pub lambda: f32,
    /// Held-out tokens (`n_cols × t_eval`), for measuring in output space.
    pub t_eval: usize,
    eval: Vec<f32>,
}

impl std::fmt::Debug for InputStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InputStats {{ n_cols: {}, t: {}, t_eval: {}, lambda: {} }}",
            self.n_cols, self.t, self.t_eval, self.lambda
        )
    }
}

impl InputStats {
    /// Statistics from `tokens` (token-major, `n_tok × n_cols`; f32, or bf16 as the calibration
    /// pass records them), the fit reduced to the `rank`
    /// leading directions of the tokens' Gram when that is fewer than the tokens (0: all tokens).
    /// The damping of column `j` is `D_j = damp_diag·‖x_j‖² + damp·mean_k ‖x_k‖²`: with fewer
    /// tokens than columns `XᵀX` is singular, and the diagonal term is the shrinkage that keeps
    /// each channel's own scale (real activations differ by orders of magnitude between channels). Every [`EVAL_EVERY`]-th token
    /// is kept for measuring; the rest are fitted.
    pub fn new<T: Copy>(
        n_cols: usize,
        tokens: &[T],
        damp: f32,
        damp_diag: f32,
        rank: usize,
    ) -> InputStats
    where
        f32: From<T>,
    {
        let n_tok = tokens.len() / n_cols.max(1);
        let is_eval = |i: usize| n_tok >= 2 * EVAL_EVERY && i % EVAL_EVERY == EVAL_EVERY - 1;
        let fit: Vec<usize> = (0..n_tok).filter(|&i| !is_eval(i)).collect();
        let held: Vec<usize> = (0..n_tok).filter(|&i| is_eval(i)).collect();
        let transpose = |rows: &[usize]| {
            let t = rows.len();
            let mut out = vec![0f32; n_cols * t];
            for (k, &i) in rows.iter().enumerate() {
                for (j, &v) in tokens[i * n_cols..(i + 1) * n_cols].iter().enumerate() {
                    out[j * t + k] = f32::from(v);
                }
            }
            out
        };
        let mut t = fit.len();
        let mut x = transpose(&fit);
        let eval = transpose(&held);
        let norms = |x: &[f32], t: usize| -> Vec<f32> {
            x.chunks_exact(t.max(1))
                .map(|c| c.iter().map(|v| v * v).sum())
                .collect()
        };
        let full_sq = norms(&x, t);
        let mean_sq = full_sq.iter().map(|&v| v as f64).sum::<f64>() / n_cols.max(1) as f64;
        let lambda = ((damp as f64) * mean_sq).max(1e-12);
        let mut damp_v: Vec<f32> = full_sq
            .iter()
            .map(|&q| (damp_diag as f64 * q as f64 + lambda) as f32)
            .collect();
        let mut sq = full_sq.clone();
        if rank > 0 && rank < t.min(n_cols) {
            if let Some(y) = principal_part(&x, n_cols, t, rank) {
                // The Gram's top `rank` directions stand for the tokens; what they miss of each
                // channel's energy joins its damping, so the diagonal of the weighting stays exact.
                x = y;
                t = rank;
                sq = norms(&x, t);
                for ((d, &full), &kept) in damp_v.iter_mut().zip(&full_sq).zip(&sq) {
                    *d += (full - kept).max(0.0);
                }
            }
        }
        let sd: Vec<f32> = damp_v.iter().map(|d| d.sqrt()).collect();
        // Scaled columns x̃_j = x_j/√D_j make the damping the identity.
        for (j, c) in x.chunks_exact_mut(t.max(1)).enumerate() {
            c.iter_mut().for_each(|v| *v /= sd[j]);
        }
        let (p, gain) = feedback_vectors(&x, n_cols, t, 1.0);
        InputStats {
            n_cols,
            t,
            x,
            p,
            gain,
            sq,
            damp: damp_v,
            sd,
            lambda: lambda as f32,
            t_eval: held.len(),
            eval,
        }
    }

    fn x(&self, j: usize) -> &[f32] {
        &self.x[j * self.t..(j + 1) * self.t]
    }

    fn p(&self, j: usize) -> &[f32] {
        &self.p[j * self.t..(j + 1) * self.t]
    }

    /// `Σ_j v_j·x_j` over the held-out tokens (`v·X_evalᵀ`, one value per token) into `out`.
    pub fn project_eval(&self, v: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        let te = self.t_eval;
        for (j, &vj) in v.iter().enumerate() {
            if vj != 0.0 {
                axpy(out, vj, &self.eval[j * te..(j + 1) * te]);
            }
        }
    }
}

/// The channels' coordinates in the `rank` leading directions of the token Gram: `Y = U_k·S_k`
/// from the thin SVD of `X` (`n × t`, channel-major), `n × rank`, so that `Y·Yᵀ` is the best
/// rank-`rank` approximation of the channels' Gram `X·Xᵀ`. `None` if the SVD fails.
fn principal_part(x: &[f32], n: usize, t: usize, rank: usize) -> Option<Vec<f32>> {
    let xm = Mat::<f64>::from_fn(n, t, |j, k| x[j * t + k] as f64);
    let svd = xm.thin_svd().ok()?;
    let (u, sv) = (svd.U(), svd.S());
    let mut y = vec![0f32; n * rank];
    for j in 0..n {
        for c in 0..rank {
            y[j * rank + c] = (u[(j, c)] * sv[c]) as f32;
        }
    }
    Some(y)
}

/// `p_j = (λI + Σ_{k>j} x_k x_kᵀ)⁻¹ x_j` and `1 + x_jᵀ p_j` for every column, going from the last
/// column to the first: within a block of columns by rank-one (Sherman–Morrison) corrections of
/// `P·x_j`, across blocks by one rank-`SM_BLOCK` GEMM update of `P = M⁻¹`. f64 throughout: `P`
/// spans `1/λ` to `1/‖X‖²`.
fn feedback_vectors(x: &[f32], n: usize, t: usize, lambda: f64) -> (Vec<f32>, Vec<f32>) {
    let mut p_out = vec![0f32; n * t];
    let mut gain = vec![1f32; n];
    if t == 0 {
        return (p_out, gain);
    }
    let mut pm = Mat::<f64>::from_fn(t, t, |i, j| if i == j { 1.0 / lambda } else { 0.0 });
    let par = Par::rayon(0);
    let mut j1 = n;
    while j1 > 0 {
        let j0 = j1.saturating_sub(SM_BLOCK);
        let b = j1 - j0;
        let xb = Mat::<f64>::from_fn(t, b, |i, c| x[(j0 + c) * t + i] as f64);
        let mut y = Mat::<f64>::zeros(t, b);
        matmul(&mut y, Accum::Replace, &pm, &xb, 1.0, par);
        // p_j = P_end·x_j − Σ_{k>j in block} p_k (p_kᵀ x_j)/(1 + a_k).
        let mut pb = Mat::<f64>::zeros(t, b);
        let mut inv_gain = vec![0f64; b];
        for c in (0..b).rev() {
            let mut pj: Vec<f64> = y.col_as_slice(c).to_vec();
            let xj = xb.col_as_slice(c);
            for k in c + 1..b {
                let pk = pb.col_as_slice(k);
                let coef = pk.iter().zip(xj).map(|(a, b)| a * b).sum::<f64>() * inv_gain[k];
                for (v, &q) in pj.iter_mut().zip(pk) {
                    *v -= coef * q;
                }
            }
            let a = pj.iter().zip(xj).map(|(a, b)| a * b).sum::<f64>();
            inv_gain[c] = 1.0 / (1.0 + a);
            gain[j0 + c] = (1.0 + a) as f32;
            for (o, &v) in p_out[(j0 + c) * t..(j0 + c + 1) * t].iter_mut().zip(&pj) {
                *o = v as f32;
            }
            pb.col_as_slice_mut(c).copy_from_slice(&pj);
        }
        // P ← P − Σ_k p_k p_kᵀ/(1 + a_k).
        let pd = Mat::<f64>::from_fn(t, b, |i, c| pb[(i, c)] * inv_gain[c]);
        matmul(&mut pm, Accum::Add, &pd, pb.transpose(), -1.0, par);
        j1 = j0;
    }
    (p_out, gain)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0.0;
    for v in acc {
        s += v;
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (v, &u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}

/// Whether [`encode_rows`] handles `ty` (others are rounded to nearest by the caller).
pub fn supports(ty: GgmlType) -> bool {
    has_grid(ty)
}

/// Per-row working memory.
struct Work {
    s: Vec<f32>,
    s_try: Vec<f32>,
    target: Vec<f32>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    zero: Vec<i32>,
    codes: Vec<i32>,
    try_codes: [i32; MAX_BLOCK],
    r: Vec<f32>,
    fresh: Vec<u8>,
    weights: Vec<f32>,
    /// The type's largest code (the same on every grid of one type).
    qmax: i32,
}

crate::quant::simd::simd_dispatch! {
    /// Encodes whole rows `exact` (`n_cols` each) as `ty` into `out`, keeping the adapter (see the
    /// module docs). `base` holds the same rows of the base in `ty` when the base is of that type:
    /// its blocks' grids are then candidates too.
    pub fn encode_rows<L>(
        ty: GgmlType,
        stats: &InputStats,
        exact: &[f32],
        base: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        encode_rows_impl(ty, stats, exact, base, out)
    }
}

#[inline(always)]
fn encode_rows_impl(
    ty: GgmlType,
    stats: &InputStats,
    exact: &[f32],
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(), EngineError> {
    let n = stats.n_cols;
    let bs = ty.block_size();
    let bb = ty.type_size();
    let row_bytes = n / bs * bb;
    let t = stats.t;
    let mut w = Work {
        s: vec![0.0; t],
        s_try: vec![0.0; t],
        target: vec![0.0; bs],
        scale: vec![0.0; n],
        offset: vec![0.0; n],
        zero: vec![0; n / bs],
        codes: vec![0; n],
        try_codes: [0; MAX_BLOCK],
        r: vec![0.0; t],
        fresh: vec![0; bb],
        weights: vec![0.0; bs],
        qmax: 0,
    };
    let mut grid = BlockGrid::default();
    let mut base_codes = [0i32; MAX_BLOCK];
    for (ri, (wrow, orow)) in exact
        .chunks_exact(n)
        .zip(out.chunks_exact_mut(row_bytes))
        .enumerate()
    {
        let brow = base.map(|b| &b[ri * row_bytes..(ri + 1) * row_bytes]);
        w.s.fill(0.0);
        for blk in 0..n / bs {
            let c0 = blk * bs;
            // Corrected targets of the block, with the feedback so far.
            for i in 0..bs {
                w.target[i] = wrow[c0 + i] + dot(stats.x(c0 + i), &w.s) / stats.sd[c0 + i];
            }
            // Option 1: a fresh grid, fitted by ggml's quantizer (weighted by the diagonal of H).
            for i in 0..bs {
                w.weights[i] = stats.sq[c0 + i] + stats.damp[c0 + i];
            }
            quantize_row(ty, &w.target, &mut w.fresh, Some(&w.weights))?;
            read_grid(ty, &w.fresh, &mut grid, &mut base_codes);
            w.s_try.copy_from_slice(&w.s);
            let fresh_loss = sweep_block(stats, c0, wrow, &grid, &mut w.s_try, &mut w.try_codes);
            let block_out = &mut orow[blk * bb..(blk + 1) * bb];
            let mut chosen_fresh = true;
            // Option 2: the base's own grid, codes free to move.
            if let Some(brow) = brow {
                let bblock = &brow[blk * bb..(blk + 1) * bb];
                let mut kept = BlockGrid::default();
                read_grid(ty, bblock, &mut kept, &mut base_codes);
                let mut s_kept = w.s.clone();
                let mut kept_codes = [0i32; MAX_BLOCK];
                let kept_loss = sweep_block(stats, c0, wrow, &kept, &mut s_kept, &mut kept_codes);
                if kept_loss <= fresh_loss {
                    chosen_fresh = false;
                    block_out.copy_from_slice(bblock);
                    w.s.copy_from_slice(&s_kept);
                    commit(&kept, c0, &kept_codes, &mut w);
                }
            }
            if chosen_fresh {
                block_out.copy_from_slice(&w.fresh);
                std::mem::swap(&mut w.s, &mut w.s_try);
                let codes = w.try_codes;
                commit(&grid, c0, &codes, &mut w);
            }
        }
        refine_row(stats, wrow, bs, &mut w);
        for blk in 0..n / bs {
            write_codes(
                ty,
                &mut orow[blk * bb..(blk + 1) * bb],
                &w.codes[blk * bs..(blk + 1) * bs],
            );
        }
    }
    Ok(())
}

/// Rounds the block at `c0` on `grid` column by column with error feedback into `s`; returns the
/// loss it adds (up to the common factor λ).
#[inline(always)]
fn sweep_block(
    stats: &InputStats,
    c0: usize,
    wrow: &[f32],
    grid: &BlockGrid,
    s: &mut [f32],
    codes: &mut [i32; MAX_BLOCK],
) -> f64 {
    let mut loss = 0f64;
    for i in 0..grid.len {
        let j = c0 + i;
        let target = wrow[j] + dot(stats.x(j), s) / stats.sd[j];
        let q = grid.nearest(i, target);
        codes[i] = q;
        let e = target - grid.value(i, q);
        if e != 0.0 {
            loss += (stats.gain[j] as f64) * (stats.damp[j] as f64) * (e as f64) * (e as f64);
            axpy(s, e * stats.sd[j], stats.p(j));
        }
    }
    loss
}

#[inline(always)]
fn commit(grid: &BlockGrid, c0: usize, codes: &[i32; MAX_BLOCK], w: &mut Work) {
    let n = grid.len;
    w.scale[c0..c0 + n].copy_from_slice(&grid.scale[..n]);
    w.offset[c0..c0 + n].copy_from_slice(&grid.offset[..n]);
    w.zero[c0 / n] = grid.zero;
    w.qmax = grid.qmax;
    w.codes[c0..c0 + n].copy_from_slice(&codes[..n]);
}

/// Coordinate descent on `‖X(q − w′)‖² + λ‖q − w′‖²` over the chosen grids: each weight in turn
/// moves to the grid point nearest its exact 1-D minimizer.
#[inline(always)]
fn refine_row(stats: &InputStats, wrow: &[f32], bs: usize, w: &mut Work) {
    let n = stats.n_cols;
    let value = |w: &Work, j: usize, q: i32| w.scale[j] * (q - w.zero[j / bs]) as f32 + w.offset[j];
    // r = X(q − w′) over the fit tokens, kept in the scaled basis: r = Σ_j x̃_j·√D_j·(q_j − w′_j).
    w.r.fill(0.0);
    for j in 0..n {
        let d = value(w, j, w.codes[j]) - wrow[j];
        if d != 0.0 {
            axpy(&mut w.r, d * stats.sd[j], stats.x(j));
        }
    }
    let qmax = w.qmax;
    for _ in 0..CD_SWEEPS {
        let mut moved = 0usize;
        for j in 0..n {
            let sc = w.scale[j];
            if sc == 0.0 || !sc.is_finite() {
                continue;
            }
            let v = value(w, j, w.codes[j]);
            let g = dot(stats.x(j), &w.r) * stats.sd[j] + stats.damp[j] * (v - wrow[j]);
            let best = v - g / (stats.sq[j] + stats.damp[j]);
            let q = (((best - w.offset[j]) / sc).round() as i32 + w.zero[j / bs]).clamp(0, qmax);
            if q != w.codes[j] {
                let nv = value(w, j, q);
                axpy(&mut w.r, (nv - v) * stats.sd[j], stats.x(j));
                w.codes[j] = q;
                moved += 1;
            }
        }
        if moved == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// `p_j` solves `(λI + Σ_{k>j} x_k x_kᵀ) p_j = x_j`.
    #[test]
    fn feedback_vectors_solve_their_systems() {
        let (n, t) = (150, 20);
        let mut seed = 3;
        let x: Vec<f32> = (0..n * t).map(|_| lcg(&mut seed)).collect();
        let lambda = 0.05;
        let (p, gain) = feedback_vectors(&x, n, t, lambda);
        for j in [0, 17, 63, 64, 65, 149] {
            let pj = &p[j * t..(j + 1) * t];
            let xj = &x[j * t..(j + 1) * t];
            for i in 0..t {
                let mut v = lambda * pj[i] as f64;
                for k in j + 1..n {
                    let xk = &x[k * t..(k + 1) * t];
                    let d: f64 = xk.iter().zip(pj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    v += xk[i] as f64 * d;
                }
                assert!(
                    (v - xj[i] as f64).abs() < 1e-3,
                    "column {j} row {i}: {v} vs {}",
                    xj[i]
                );
            }
            let a: f64 = xj.iter().zip(pj).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((gain[j] as f64 - 1.0 - a).abs() < 1e-3);
        }
    }

    // Encoding itself is tested against libggml's decoder and against rounding, for every type a
    // merge keeps, in tests/merge_preserve_types.rs.
}
