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
//! The fit works in the [`DEFAULT_RANK`] leading directions of each input's token Gram (a randomized thin
//! SVD of `X`) instead of every token, with the energy those directions miss in each channel
//! added to that channel's damping: the sweep's cost is linear in that width, and on held-out
//! text the narrower fit is as good (it also smooths a small calibration set's noise).

// Column sweeps index several per-column arrays (activations, feedback vectors, damping, codes)
// by the same column: index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::quant::grid::{has_grid, read_grid, write_codes, BlockGrid, MAX_BLOCK};
use crate::quant::simd::{F32s, Mask};
use crate::quant::{quantize_blocks, GgmlType};

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
/// against 0.084 (measured when the rank was chosen; the vector-lane sweep's float order gives
/// 0.052 and 0.095 at 64 on today's fixtures, README's table).
pub const DEFAULT_RANK: usize = 64;

/// The default weight of the adapter's own input directions (see [`InputStats::new`]): together
/// they carry this share of the fit tokens' energy. Measured through llama.cpp
/// (testdata/merge_quality/judge.py), default merge on 512 tokens of the built-in corpus: the
/// fact-trained SmolLM2 adapter answers 0.917 of its facts at 0 (the tokens alone), 1.000 at 0.03 (runtime:
/// 1.000) and 0.979 at 0.1; KL to the runtime LoRA 0.54 → 0.22 on the fact sentences and 0.099 →
/// 0.066 on held-out text at 0.03. The cost, on adapters whose directions say nothing (random
/// ones, gemma3 Q4_K_M, seeds 0–3 of testdata/tools/random_lora.py): held-out KL 0.050 on average
/// at 0 (0.044–0.067), 0.059 at 0.03 (0.051–0.076), 0.058 at 0.1; round to nearest 0.079. One
/// adapter's number moves by 0.01–0.03 with any change of the fit (0.001 alone moves
/// tests/merge_gemma.rs's 0.078 to 0.088), so only the average says much. Users merge trained
/// adapters, so the default serves them.
pub const DEFAULT_ADAPTER_WEIGHT: f32 = 0.03;

/// How a tensor's rounding errors are weighted: the input's statistics, shrunk toward the
/// diagonal, plus the adapter's own input directions (see [`InputStats::new`]).
#[derive(Clone, Copy, Debug)]
pub struct Weighting {
    /// Damping: `damp_diag` of each channel's own energy plus `damp` of the mean.
    pub damp: f32,
    pub damp_diag: f32,
    /// Directions of each input's Gram the fit keeps (0: all tokens).
    pub rank: usize,
    /// Share of the fit tokens' energy the adapter's directions carry (0: none).
    pub adapter: f32,
}

/// The damping of a tied embedding's own energy, in place of [`DEFAULT_DAMP_DIAG`] (see
/// [`Weighting::for_tied_embedding`]). Measured through llama.cpp (judge.py, held-out KL to the
/// runtime LoRA), `--promote auto:0 --token-embedding-type q5_1`, the head weighted at 0.1 / 1 / 3 /
/// 10 / 30: SmolLM2 Q4_1 + the fact adapter 0.059 / 0.060 / 0.059 / 0.060 / 0.061 (rounding the
/// embedding to nearest: 0.069); gemma3 Q4_K_M + its fact adapter 0.046 / 0.034 / 0.030 / 0.028 /
/// 0.035 (nearest 0.041); gemma3 + a random rank-16 adapter 0.021 / 0.021 / 0.021 / 0.022 / 0.022
/// (nearest 0.029).
pub const TIED_EMBEDDING_DAMP_DIAG: f32 = 3.0;

impl Weighting {
    /// The weighting of an embedding the output head is tied to, whose statistics are the head's
    /// input: its rounding also changes every token's lookup, which those statistics do not see, so
    /// each channel is held to its own energy more firmly ([`TIED_EMBEDDING_DAMP_DIAG`]), between
    /// the head's best fit and plain rounding.
    pub fn for_tied_embedding(self) -> Weighting {
        Weighting {
            damp_diag: TIED_EMBEDDING_DAMP_DIAG,
            ..self
        }
    }
}

impl Default for Weighting {
    fn default() -> Self {
        Weighting {
            damp: DEFAULT_DAMP,
            damp_diag: DEFAULT_DAMP_DIAG,
            rank: DEFAULT_RANK,
            adapter: DEFAULT_ADAPTER_WEIGHT,
        }
    }
}

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
    /// Couplings within each chunk of columns (see [`chunk_couplings`]), `n_cols × CHUNK`.
    gp: Vec<f32>,
    gx: Vec<f32>,
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
    /// pass records them), the fit reduced to the `w.rank` leading directions of the tokens' Gram
    /// when that is fewer than the tokens (0: all tokens). The damping of column `j` is
    /// `D_j = damp_diag·‖x_j‖² + damp·mean_k ‖x_k‖²`: with fewer tokens than columns `XᵀX` is
    /// singular, and the diagonal term is the shrinkage that keeps each channel's own scale (real
    /// activations differ by orders of magnitude between channels). Every [`EVAL_EVERY`]-th token
    /// is kept for measuring; the rest are fitted.
    ///
    /// `adapter_rows` (`k × n_cols`, row-major) are the directions the adapters read this input
    /// along: each row of `A`, times its column of `B`'s norm and the scale, so that their Gram is
    /// that of `ΔW`. They join the fit as `k` more tokens carrying `w.adapter` of the fit tokens'
    /// energy together. Why: a trained adapter's effect depends on where inputs fall along its
    /// `A`, and the inputs it was trained on (facts, a task's prompts) are not in a generic
    /// calibration text; without this term the fit puts its errors there freely.
    pub fn new<T: Copy>(
        n_cols: usize,
        tokens: &[T],
        adapter_rows: &[f32],
        w: &Weighting,
    ) -> InputStats
    where
        f32: From<T>,
    {
        let (damp, damp_diag, rank) = (w.damp, w.damp_diag, w.rank);
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
        let fit_energy: f64 = full_sq.iter().map(|&v| v as f64).sum();
        let mean_sq = fit_energy / n_cols.max(1) as f64;
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
        // The adapter's directions join after the reduction and outside the damping: they are
        // k more columns of the fit, not a claim on the tokens' leading directions or on how
        // the rest of the base is held in place.
        let k = adapter_rows.len() / n_cols.max(1);
        let adapter_energy: f64 = adapter_rows.iter().map(|&v| v as f64 * v as f64).sum();
        if k > 0 && w.adapter > 0.0 && adapter_energy > 0.0 {
            let scale = (w.adapter as f64 * fit_energy / adapter_energy).sqrt() as f32;
            let mut with = vec![0f32; n_cols * (t + k)];
            for j in 0..n_cols {
                let row = &mut with[j * (t + k)..(j + 1) * (t + k)];
                row[..t].copy_from_slice(&x[j * t..(j + 1) * t]);
                for i in 0..k {
                    row[t + i] = adapter_rows[i * n_cols + j] * scale;
                }
            }
            x = with;
            t += k;
            sq = norms(&x, t);
        }
        let sd: Vec<f32> = damp_v.iter().map(|d| d.sqrt()).collect();
        // Scaled columns x̃_j = x_j/√D_j make the damping the identity.
        for (j, c) in x.chunks_exact_mut(t.max(1)).enumerate() {
            c.iter_mut().for_each(|v| *v /= sd[j]);
        }
        let (p, gain) = feedback_vectors(&x, n_cols, t, 1.0);
        let (gp, gx) = chunk_couplings(&x, &p, n_cols, t);
        InputStats {
            n_cols,
            t,
            x,
            p,
            gain,
            gp,
            gx,
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

    /// Whole rows `v` (`n_cols` each) mapped through the held-out tokens: `out = v·X_evalᵀ`, one
    /// row of `t_eval` values per row of `v` (a GEMM, sequential: callers run one per thread).
    pub fn project_eval(&self, v: &[f32], out: &mut [f32]) {
        let (n, te) = (self.n_cols, self.t_eval);
        let rows = v.len() / n.max(1);
        if rows == 0 || te == 0 {
            return;
        }
        matmul(
            MatMut::from_row_major_slice_mut(&mut out[..rows * te], rows, te),
            Accum::Replace,
            MatRef::from_row_major_slice(&v[..rows * n], rows, n),
            MatRef::from_row_major_slice(&self.eval, n, te),
            1.0f32,
            Par::Seq,
        );
    }
}

/// The channels' coordinates in the `rank` leading directions of the token Gram: `Y ≈ U_k·S_k`
/// of the thin SVD of `X` (`n × t`, channel-major), `n × rank`, so that `Y·Yᵀ` is (nearly) the best
/// rank-`rank` approximation of the channels' Gram `X·Xᵀ`. `None` if the SVD fails.
///
/// By a randomized range finder (Halko, Martinsson & Tropp 2011, with [`POWER_ITERATIONS`] power
/// iterations and [`OVERSAMPLE`] extra directions, a seeded test matrix so merges are
/// reproducible): all GEMMs and one small SVD, where a full thin SVD of `X` cost a quarter of a
/// calibrated merge's CPU. An approximation only shifts energy between the fit and the damping:
/// the caller adds what `Y` misses of each channel to that channel's damping.
fn principal_part(x: &[f32], n: usize, t: usize, rank: usize) -> Option<Vec<f32>> {
    let width = (rank + OVERSAMPLE).min(n).min(t);
    let xm = Mat::<f64>::from_fn(n, t, |j, k| x[j * t + k] as f64);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let omega = Mat::<f64>::from_fn(t, width, |_, _| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    });
    let orth = |m: Mat<f64>| m.qr().compute_thin_Q();
    let mut q = orth(&xm * &omega);
    for _ in 0..POWER_ITERATIONS {
        let z = orth(xm.transpose() * &q);
        q = orth(&xm * &z);
    }
    // X ≈ Q·(QᵀX), and QᵀX is small: its SVD gives X's leading directions.
    let small = q.transpose() * &xm;
    let svd = small.thin_svd().ok()?;
    let u = &q * svd.U();
    let sv = svd.S();
    let kept = rank.min(width);
    let mut y = vec![0f32; n * rank];
    for j in 0..n {
        for c in 0..kept {
            y[j * rank + c] = (u[(j, c)] * sv[c]) as f32;
        }
    }
    Some(y)
}

/// Extra directions the range finder of [`principal_part`] carries beyond the rank it keeps.
const OVERSAMPLE: usize = 16;
/// Power iterations of [`principal_part`]: each sharpens the separation of the leading directions
/// from the tail (activations' spectra decay slowly).
const POWER_ITERATIONS: usize = 2;

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

/// How rounding column `j` moves the later columns `k` of its chunk of [`CHUNK`] (`k` counted from
/// the chunk's start, zero for `k` up to `j`): `gp[j·CHUNK + k] = x̃_k·p_j` in the sweep's
/// feedback, `gx[j·CHUNK + k] = x̃_k·x̃_j` in the coordinate descent's residual.
fn chunk_couplings(x: &[f32], p: &[f32], n: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
    let mut gp = vec![0f32; n * CHUNK];
    let mut gx = vec![0f32; n * CHUNK];
    if t == 0 {
        return (gp, gx);
    }
    for j in 0..n {
        let c0 = j / CHUNK * CHUNK;
        let (xj, pj) = (&x[j * t..(j + 1) * t], &p[j * t..(j + 1) * t]);
        for k in j + 1..(c0 + CHUNK).min(n) {
            let xk = &x[k * t..(k + 1) * t];
            gp[j * CHUNK + k - c0] = dot(xk, pj);
            gx[j * CHUNK + k - c0] = dot(xk, xj);
        }
    }
    (gp, gx)
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

/// Rows encoded side by side, one per lane. Each row's sweep is a serial chain (every rounding
/// feeds the next column's target), but rows are independent: running `LANES` of them in step
/// turns the chain's dot products into vector operations over rows.
pub const LANES: usize = 16;

/// Columns per feedback chunk. Within a chunk the feedback between columns goes through the
/// precomputed couplings ([`chunk_couplings`]), so each row's `t`-vector is read and updated once
/// per chunk (matrix–vector products over independent columns) instead of once per column.
const CHUNK: usize = 32;

/// One value per lane (row), in memory. Codes are kept as floats too (small integers, exact), so
/// that every lane operation is one vector instruction at every level.
type Lanes = [f32; LANES];

/// Whether [`encode_rows`] handles `ty` (others are rounded to nearest by the caller).
pub fn supports(ty: GgmlType) -> bool {
    has_grid(ty)
}

/// One block's grid for each lane's row, element-major.
struct GridLanes {
    scale: [Lanes; MAX_BLOCK],
    offset: [Lanes; MAX_BLOCK],
    zero: Lanes,
}

impl GridLanes {
    fn new() -> Box<GridLanes> {
        Box::new(GridLanes {
            scale: [[0.0; LANES]; MAX_BLOCK],
            offset: [[0.0; LANES]; MAX_BLOCK],
            zero: [0.0; LANES],
        })
    }

    /// Lane `r` takes `g`.
    fn set(&mut self, r: usize, g: &BlockGrid) {
        for i in 0..g.len {
            self.scale[i][r] = g.scale[i];
            self.offset[i][r] = g.offset[i];
        }
        self.zero[r] = g.zero as f32;
    }

    /// Lane `r` (no row) decodes everything to zero.
    fn clear(&mut self, r: usize) {
        for i in 0..MAX_BLOCK {
            self.scale[i][r] = 0.0;
            self.offset[i][r] = 0.0;
        }
        self.zero[r] = 0.0;
    }
}

/// Working memory of one group of rows, lane-major (`[column][lane]`).
struct GroupWork {
    /// The exact values `w′`.
    w: Vec<Lanes>,
    /// Each row's feedback `t`-vector `s`, and the same after trying each grid on a block.
    s: Vec<Lanes>,
    s_fresh: Vec<Lanes>,
    s_kept: Vec<Lanes>,
    /// `x̃_j·s` over the current block at its start.
    block_start: Vec<Lanes>,
    /// The chosen grids and codes, per column (`zero` per block).
    scale: Vec<Lanes>,
    offset: Vec<Lanes>,
    zero: Vec<Lanes>,
    codes: Vec<Lanes>,
    codes_fresh: Vec<Lanes>,
    codes_kept: Vec<Lanes>,
    fresh_grid: Box<GridLanes>,
    kept_grid: Box<GridLanes>,
    /// Each lane's freshly quantized block.
    fresh_bytes: Vec<u8>,
    /// The coordinate descent's residual `X(q − w′)` per row.
    r: Vec<Lanes>,
    chunk: ChunkWork,
    /// One row's corrected targets of a block, and the block's weights for ggml's quantizer.
    targets: Vec<f32>,
    weights: Vec<f32>,
    block_grid: BlockGrid,
    block_codes: [i32; MAX_BLOCK],
}

/// Per-chunk scratch: projections at the chunk's start, corrections within it, and the changes
/// each column made.
struct ChunkWork {
    base: [Lanes; CHUNK],
    corr: [Lanes; CHUNK],
    change: [Lanes; CHUNK],
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
        encode_rows_impl::<L::X16>(ty, stats, exact, base, out)
    }
}

#[inline(always)]
fn encode_rows_impl<V: F32s>(
    ty: GgmlType,
    stats: &InputStats,
    exact: &[f32],
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(), EngineError> {
    debug_assert_eq!(V::LANES, LANES);
    let n = stats.n_cols;
    let bs = ty.block_size();
    let bb = ty.type_size();
    let row_bytes = n / bs * bb;
    let t = stats.t;
    let lanes_of = |len: usize| vec![[0f32; LANES]; len];
    let mut g = GroupWork {
        w: lanes_of(n),
        s: lanes_of(t),
        s_fresh: lanes_of(t),
        s_kept: lanes_of(t),
        block_start: lanes_of(bs),
        scale: lanes_of(n),
        offset: lanes_of(n),
        zero: lanes_of(n / bs),
        codes: lanes_of(n),
        codes_fresh: lanes_of(bs),
        codes_kept: lanes_of(bs),
        fresh_grid: GridLanes::new(),
        kept_grid: GridLanes::new(),
        fresh_bytes: vec![0; LANES * bb],
        r: lanes_of(t),
        chunk: ChunkWork {
            base: [[0.0; LANES]; CHUNK],
            corr: [[0.0; LANES]; CHUNK],
            change: [[0.0; LANES]; CHUNK],
        },
        targets: vec![0.0; LANES * bs],
        weights: vec![0.0; LANES * bs],
        block_grid: BlockGrid::default(),
        block_codes: [0; MAX_BLOCK],
    };
    let mut qmax = 0;
    for (gi, (group, out_group)) in exact
        .chunks(LANES * n)
        .zip(out.chunks_mut(LANES * row_bytes))
        .enumerate()
    {
        let rows = group.len() / n;
        for (j, wj) in g.w.iter_mut().enumerate() {
            *wj = [0.0; LANES];
            for r in 0..rows {
                wj[r] = group[r * n + j];
            }
        }
        g.s.iter_mut().for_each(|v| *v = [0.0; LANES]);
        let base_group =
            base.map(|b| &b[gi * LANES * row_bytes..gi * LANES * row_bytes + rows * row_bytes]);
        for blk in 0..n / bs {
            let c0 = blk * bs;
            project::<V>(stats, c0, &g.s, &mut g.block_start);
            // Option 1: a fresh grid per row, fitted by ggml's quantizer to the corrected targets
            // (weighted by the diagonal of H).
            for r in 0..rows {
                for i in 0..bs {
                    g.weights[r * bs + i] = stats.sq[c0 + i] + stats.damp[c0 + i];
                    g.targets[r * bs + i] = g.w[c0 + i][r] + g.block_start[i][r] / stats.sd[c0 + i];
                }
            }
            quantize_blocks(
                ty,
                &g.targets[..rows * bs],
                &mut g.fresh_bytes[..rows * bb],
                &g.weights[..rows * bs],
            )?;
            for r in 0..LANES {
                if r >= rows {
                    g.fresh_grid.clear(r);
                    continue;
                }
                let fresh = &g.fresh_bytes[r * bb..(r + 1) * bb];
                read_grid(ty, fresh, &mut g.block_grid, &mut g.block_codes);
                g.fresh_grid.set(r, &g.block_grid);
                qmax = g.block_grid.qmax;
            }
            g.s_fresh.copy_from_slice(&g.s);
            let mut fresh_loss = [0f32; LANES];
            sweep_block::<V>(
                stats,
                c0,
                bs,
                &g.w,
                (&g.fresh_grid, qmax as f32),
                &g.block_start,
                &mut g.s_fresh,
                &mut g.codes_fresh,
                &mut fresh_loss,
                &mut g.chunk,
            );
            // Option 2: the base's own grid, codes free to move.
            let Some(bg) = base_group else {
                take_block::<V>(&mut g, blk, bs, None);
                for r in 0..rows {
                    let at = r * row_bytes + blk * bb;
                    out_group[at..at + bb].copy_from_slice(&g.fresh_bytes[r * bb..(r + 1) * bb]);
                }
                continue;
            };
            for r in 0..LANES {
                if r >= rows {
                    g.kept_grid.clear(r);
                    continue;
                }
                let at = r * row_bytes + blk * bb;
                read_grid(ty, &bg[at..at + bb], &mut g.block_grid, &mut g.block_codes);
                g.kept_grid.set(r, &g.block_grid);
            }
            g.s_kept.copy_from_slice(&g.s);
            let mut kept_loss = [0f32; LANES];
            sweep_block::<V>(
                stats,
                c0,
                bs,
                &g.w,
                (&g.kept_grid, qmax as f32),
                &g.block_start,
                &mut g.s_kept,
                &mut g.codes_kept,
                &mut kept_loss,
                &mut g.chunk,
            );
            // Each row takes the grid that added less loss: its bytes, codes and feedback.
            let keep = V::load(&kept_loss).le(V::load(&fresh_loss));
            take_block::<V>(&mut g, blk, bs, Some(keep));
            for r in 0..rows {
                let at = r * row_bytes + blk * bb;
                let block_out = &mut out_group[at..at + bb];
                if kept_loss[r] <= fresh_loss[r] {
                    block_out.copy_from_slice(&bg[at..at + bb]);
                } else {
                    block_out.copy_from_slice(&g.fresh_bytes[r * bb..(r + 1) * bb]);
                }
            }
        }
        refine::<V>(stats, bs, qmax as f32, &mut g);
        for r in 0..rows {
            for blk in 0..n / bs {
                for i in 0..bs {
                    g.block_codes[i] = g.codes[blk * bs + i][r] as i32;
                }
                let at = r * row_bytes + blk * bb;
                write_codes(ty, &mut out_group[at..at + bb], &g.block_codes[..bs]);
            }
        }
    }
    Ok(())
}

/// The block `blk` takes, lane by lane, the kept grid's codes and feedback where `keep` is set and
/// the fresh grid's elsewhere (everywhere without a kept grid).
#[inline(always)]
fn take_block<V: F32s>(g: &mut GroupWork, blk: usize, bs: usize, keep: Option<V::Mask>) {
    let c0 = blk * bs;
    let pick = |kept: &Lanes, fresh: &Lanes, out: &mut Lanes| match keep {
        Some(m) => V::select(m, V::load(kept), V::load(fresh)).store(out),
        None => *out = *fresh,
    };
    for i in 0..bs {
        let (kept, fresh) = (&*g.kept_grid, &*g.fresh_grid);
        pick(&kept.scale[i], &fresh.scale[i], &mut g.scale[c0 + i]);
        pick(&kept.offset[i], &fresh.offset[i], &mut g.offset[c0 + i]);
        pick(&g.codes_kept[i], &g.codes_fresh[i], &mut g.codes[c0 + i]);
    }
    pick(&g.kept_grid.zero, &g.fresh_grid.zero, &mut g.zero[blk]);
    for k in 0..g.s.len() {
        pick(&g.s_kept[k], &g.s_fresh[k], &mut g.s[k]);
    }
}

/// `out[i] = x̃_{j0+i}·v[·]` for every lane: the projections of each row's `t`-vector on the
/// columns from `j0` (independent dot products, so they overlap in the pipeline).
#[inline(always)]
fn project<V: F32s>(stats: &InputStats, j0: usize, v: &[Lanes], out: &mut [Lanes]) {
    let t = stats.t;
    let v = &v[..t];
    for (i, o) in out.iter_mut().enumerate() {
        let x = stats.x(j0 + i);
        let zero = V::splat(0.0);
        let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
        let mut k = 0;
        while k + 4 <= t {
            a0 = a0 + V::splat(x[k]) * V::load(&v[k]);
            a1 = a1 + V::splat(x[k + 1]) * V::load(&v[k + 1]);
            a2 = a2 + V::splat(x[k + 2]) * V::load(&v[k + 2]);
            a3 = a3 + V::splat(x[k + 3]) * V::load(&v[k + 3]);
            k += 4;
        }
        while k < t {
            a0 = a0 + V::splat(x[k]) * V::load(&v[k]);
            k += 1;
        }
        ((a0 + a1) + (a2 + a3)).store(o);
    }
}

/// `v[k] += Σ_i change[i]·cols[(j0 + i)·t + k]` for every lane: each row's `t`-vector moved by
/// the changes of the columns from `j0` (`cols`: the stats' `x` or `p`, channel-major).
#[inline(always)]
fn accumulate<V: F32s>(cols: &[f32], t: usize, j0: usize, change: &[Lanes], v: &mut [Lanes]) {
    // Two sums in flight per `k`.
    let pairs = change.len() / 2;
    for (k, vk) in v.iter_mut().enumerate() {
        let (mut even, mut odd) = (V::load(vk), V::splat(0.0));
        for i in 0..pairs {
            let (a, b) = (2 * i, 2 * i + 1);
            even = even + V::splat(cols[(j0 + a) * t + k]) * V::load(&change[a]);
            odd = odd + V::splat(cols[(j0 + b) * t + k]) * V::load(&change[b]);
        }
        if change.len() % 2 == 1 {
            let a = change.len() - 1;
            even = even + V::splat(cols[(j0 + a) * t + k]) * V::load(&change[a]);
        }
        (even + odd).store(vk);
    }
}

/// `corr[k] += coupling[k]·change` for the chunk's columns after `i`: how one column's rounding
/// moves the targets of the rest of its chunk.
#[inline(always)]
fn couple<V: F32s>(coupling: &[f32], i: usize, m: usize, change: V, corr: &mut [Lanes; CHUNK]) {
    for k in i + 1..m {
        (V::load(&corr[k]) + V::splat(coupling[k]) * change).store(&mut corr[k]);
    }
}

/// The code whose value is nearest `v` on each lane's grid (`scale·(q − zero) + offset`, `q` in
/// `0..=qmax`), or `fallback` where the grid has no usable scale (as [`BlockGrid::nearest`], ties
/// to even).
#[inline(always)]
fn nearest<V: F32s>(scale: V, offset: V, zero: V, qmax: V, v: V, fallback: V) -> V {
    let usable = scale.ne(V::splat(0.0)) & scale.abs().lt(V::splat(f32::INFINITY));
    let q = (((v - offset) / scale).round_ne() + zero)
        .max_c(V::splat(0.0))
        .min_c(qmax);
    V::select(usable, q, fallback)
}

/// Rounds the block at `c0` (`len` columns) on `grid`, column by column with error feedback into
/// each lane's `s`; `start` is `x̃_j·s` over the block at its start. Adds each lane's loss (up to
/// the common factor λ) to `loss`, and leaves the codes in `codes`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sweep_block<V: F32s>(
    stats: &InputStats,
    c0: usize,
    len: usize,
    w: &[Lanes],
    (grid, qmax): (&GridLanes, f32),
    start: &[Lanes],
    s: &mut [Lanes],
    codes: &mut [Lanes],
    loss: &mut Lanes,
    cw: &mut ChunkWork,
) {
    let (zero, qmax) = (V::load(&grid.zero), V::splat(qmax));
    let mut total = V::load(loss);
    for ch in (0..len).step_by(CHUNK) {
        let m = CHUNK.min(len - ch);
        let j0 = c0 + ch;
        if ch == 0 {
            cw.base[..m].copy_from_slice(&start[..m]);
        } else {
            project::<V>(stats, j0, s, &mut cw.base[..m]);
        }
        cw.corr = [[0.0; LANES]; CHUNK];
        for i in 0..m {
            let (j, e) = (j0 + i, ch + i);
            let sd = V::splat(stats.sd[j]);
            let weight = V::splat(stats.gain[j] * stats.damp[j]);
            let target = V::load(&w[j]) + (V::load(&cw.base[i]) + V::load(&cw.corr[i])) / sd;
            let (sc, off) = (V::load(&grid.scale[e]), V::load(&grid.offset[e]));
            let q = nearest(sc, off, zero, qmax, target, zero);
            q.store(&mut codes[e]);
            let err = target - (sc * (q - zero) + off);
            total = total + weight * (err * err);
            let change = err * sd;
            couple(
                &stats.gp[j * CHUNK..(j + 1) * CHUNK],
                i,
                m,
                change,
                &mut cw.corr,
            );
            change.store(&mut cw.change[i]);
        }
        accumulate::<V>(&stats.p, stats.t, j0, &cw.change[..m], s);
    }
    total.store(loss);
}

/// Coordinate descent on `‖X(q − w′)‖² + λ‖q − w′‖²` over the chosen grids, every lane: each
/// weight in turn moves to the grid point nearest its exact 1-D minimizer.
#[inline(always)]
fn refine<V: F32s>(stats: &InputStats, bs: usize, qmax: f32, g: &mut GroupWork) {
    let n = stats.n_cols;
    let t = stats.t;
    let qmax = V::splat(qmax);
    // The grid at column `j`: scale, offset and zero, and the value of code `q` on it.
    let grid = |g: &GroupWork, j: usize| {
        (
            V::load(&g.scale[j]),
            V::load(&g.offset[j]),
            V::load(&g.zero[j / bs]),
        )
    };
    let value = |(sc, off, zero): (V, V, V), q: V| sc * (q - zero) + off;
    // r = X(q − w′) over the fit tokens, kept in the scaled basis: r = Σ_j x̃_j·√D_j·(q_j − w′_j).
    g.r.iter_mut().for_each(|v| *v = [0.0; LANES]);
    for j0 in (0..n).step_by(CHUNK) {
        let m = CHUNK.min(n - j0);
        for i in 0..m {
            let j = j0 + i;
            let v = value(grid(g, j), V::load(&g.codes[j]));
            ((v - V::load(&g.w[j])) * V::splat(stats.sd[j])).store(&mut g.chunk.change[i]);
        }
        accumulate::<V>(&stats.x, t, j0, &g.chunk.change[..m], &mut g.r);
    }
    for _ in 0..CD_SWEEPS {
        let mut moved = false;
        for j0 in (0..n).step_by(CHUNK) {
            let m = CHUNK.min(n - j0);
            project::<V>(stats, j0, &g.r, &mut g.chunk.base[..m]);
            g.chunk.corr = [[0.0; LANES]; CHUNK];
            for i in 0..m {
                let j = j0 + i;
                let (sd, damp) = (V::splat(stats.sd[j]), V::splat(stats.damp[j]));
                let curvature = V::splat(stats.sq[j] + stats.damp[j]);
                let gj = grid(g, j);
                let old = V::load(&g.codes[j]);
                let v = value(gj, old);
                let residual = V::load(&g.chunk.base[i]) + V::load(&g.chunk.corr[i]);
                let grad = residual * sd + damp * (v - V::load(&g.w[j]));
                let best = v - grad / curvature;
                let q = nearest(gj.0, gj.1, gj.2, qmax, best, old);
                q.store(&mut g.codes[j]);
                moved |= q.ne(old).any();
                let change = (value(gj, q) - v) * sd;
                couple(
                    &stats.gx[j * CHUNK..(j + 1) * CHUNK],
                    i,
                    m,
                    change,
                    &mut g.chunk.corr,
                );
                change.store(&mut g.chunk.change[i]);
            }
            accumulate::<V>(&stats.x, t, j0, &g.chunk.change[..m], &mut g.r);
        }
        if !moved {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_row, quantize_row};

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

    /// Rows share a group only for speed: each lane must compute exactly what the row would
    /// alone (a lane mixup or a leak between lanes changes some row's bytes).
    #[test]
    fn rows_encode_the_same_alone_and_in_a_group() {
        let (n, n_tok, rows) = (512, 96, LANES + 3);
        let mut seed = 11;
        let tokens: Vec<f32> = (0..n_tok * n).map(|_| lcg(&mut seed)).collect();
        let stats = InputStats::new(
            n,
            &tokens,
            &[],
            &Weighting {
                rank: 32,
                ..Weighting::default()
            },
        );
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
        ] {
            let row_bytes = n / ty.block_size() * ty.type_size();
            let base_w: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed)).collect();
            let mut base = vec![0u8; rows * row_bytes];
            for (w, b) in base_w.chunks(n).zip(base.chunks_mut(row_bytes)) {
                quantize_row(ty, w, b, None).unwrap();
            }
            // A small delta on the base, as an adapter makes.
            let exact: Vec<f32> = base_w.iter().map(|w| w + 0.02 * lcg(&mut seed)).collect();
            let mut together = vec![0u8; rows * row_bytes];
            encode_rows(ty, &stats, &exact, Some(&base), &mut together).unwrap();
            for r in 0..rows {
                let mut alone = vec![0u8; row_bytes];
                let (w, b) = (
                    &exact[r * n..(r + 1) * n],
                    &base[r * row_bytes..(r + 1) * row_bytes],
                );
                encode_rows(ty, &stats, w, Some(b), &mut alone).unwrap();
                assert!(
                    alone == together[r * row_bytes..(r + 1) * row_bytes],
                    "{ty:?} row {r} differs alone and in a group"
                );
            }
        }
    }

    /// The adapter's directions are kept where the tokens do not reach: with tokens confined to
    /// the first half of the channels and the adapter reading the other half, the merged rows'
    /// error along the adapter's direction must shrink when its rows join the fit, and the
    /// error the tokens see must not grow past what the extra columns cost.
    #[test]
    fn adapter_rows_hold_the_error_along_the_adapter_s_input() {
        let (n, n_tok, rows) = (256, 128, 8);
        let mut seed = 5;
        let tokens: Vec<f32> = (0..n_tok * n)
            .map(|i| if i % n < n / 2 { lcg(&mut seed) } else { 0.0 })
            .collect();
        let a: Vec<f32> = (0..n)
            .map(|j| if j >= n / 2 { lcg(&mut seed) } else { 0.0 })
            .collect();
        let ty = GgmlType::Q4_1;
        let row_bytes = n / ty.block_size() * ty.type_size();
        let exact: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed)).collect();
        let error_of = |adapter: f32| {
            let w = Weighting {
                adapter,
                ..Weighting::default()
            };
            let stats = InputStats::new(n, &tokens, &a, &w);
            let mut out = vec![0u8; rows * row_bytes];
            encode_rows(ty, &stats, &exact, None, &mut out).unwrap();
            let (mut along_a, mut on_tokens) = (0f64, 0f64);
            for (r, b) in out.chunks(row_bytes).enumerate() {
                let mut q = vec![0f32; n];
                dequantize_row(ty, b, &mut q).unwrap();
                let e: Vec<f32> = q.iter().zip(&exact[r * n..]).map(|(q, w)| q - w).collect();
                along_a += (dot(&e, &a) as f64).powi(2);
                for tok in tokens.chunks(n) {
                    on_tokens += (dot(&e, tok) as f64).powi(2);
                }
            }
            (along_a, on_tokens)
        };
        let (a0, t0) = error_of(0.0);
        let (a1, t1) = error_of(0.1);
        assert!(
            a1 < 0.1 * a0,
            "error along A: {a1} with the rows, {a0} without"
        );
        assert!(
            t1 < 1.5 * t0,
            "error on the tokens: {t1} with the rows, {t0} without"
        );
    }

    // Encoding itself is tested against libggml's decoder and against rounding, for every type a
    // merge keeps, in tests/merge_preserve_types.rs.
}
