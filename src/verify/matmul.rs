//! Matrix products of a weight matrix with a few token activations, on all cores.
//!
//! `y[t][o] = Σᵢ W[o][i]·x[t][i]` for the K tokens of a check. Weights are never decoded whole: each
//! rayon task decodes a block of W's rows into a reused buffer and dots it with every token, so memory
//! stays at (threads × block) floats however large W is, and each weight is decoded once per product.
//!
//! Two kernels. [`matmul`]: a row-by-token dot kernel, each output the same dot product whatever
//! the number of tokens, so a position's result does not depend on what it is batched with (verify's
//! KV-cache sessions rely on that, bit for bit). [`matmul_batched`]: with many tokens a GEMM per
//! block (faer, register-blocked, several times faster), whose summation order depends on the
//! shapes; for callers that only need the products to f32 accuracy (calibration's statistics).

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::error::{Result, VerifyError};
use super::source::TensorRef;

/// The left operand of a product: GGUF tensor rows (any type we decode) or plain f32 rows. (Not
/// [`crate::adapter::Matrix`], an owned dense matrix: this one only borrows rows.)
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    Tensor(TensorRef<'a>),
    F32 { rows: &'a [f32], n_in: usize },
}

impl Operand<'_> {
    pub fn n_in(&self) -> usize {
        match self {
            Operand::Tensor(t) => t.row_len(),
            Operand::F32 { n_in, .. } => *n_in,
        }
    }

    pub fn n_out(&self) -> usize {
        match self {
            Operand::Tensor(t) => t.n_rows(),
            Operand::F32 { rows, n_in } => rows.len() / n_in.max(&1),
        }
    }
}

/// Tokens from which [`matmul_batched`] uses the GEMM.
const GEMM_TOKENS: usize = 16;

/// Rows of W decoded per task: large enough to amortize task overhead (and, for the GEMM, its
/// packing of the tokens), small enough to give every core work on narrow matrices; for the dot
/// kernel also small enough to stay in cache.
fn block_rows(n_out: usize, n_in: usize, gemm: bool) -> usize {
    let by_balance = n_out.div_ceil(4 * rayon::current_num_threads()).max(1);
    if gemm {
        return by_balance.clamp(1, 256);
    }
    let by_cache = (256 * 1024 / 4 / n_in.max(1)).max(1);
    by_cache.min(by_balance).clamp(1, 256)
}

/// `x` is `n_tok` rows of `w.n_in()` floats; returns `n_tok` rows of `w.n_out()` floats, each
/// independent of the others (see the module doc).
pub fn matmul(w: &Operand, x: &[f32], n_tok: usize) -> Result<Vec<f32>> {
    product(w, x, n_tok, false)
}

/// [`matmul`] through a GEMM when there are many tokens: faster, to f32 accuracy, but a token's
/// result depends on the batch's shape.
pub fn matmul_batched(w: &Operand, x: &[f32], n_tok: usize) -> Result<Vec<f32>> {
    product(w, x, n_tok, n_tok >= GEMM_TOKENS)
}

fn product(w: &Operand, x: &[f32], n_tok: usize, gemm: bool) -> Result<Vec<f32>> {
    let (n_in, n_out) = (w.n_in(), w.n_out());
    if x.len() != n_tok * n_in {
        return Err(VerifyError::Activation {
            len: x.len(),
            n_tok,
            n_in,
        });
    }
    if let Operand::Tensor(t) = w {
        t.check_size()?;
    }
    let rows_per_block = block_rows(n_out, n_in, gemm);
    // Output transposed ([n_out][n_tok]) so that each block writes one contiguous chunk.
    let mut yt = vec![0f32; n_out * n_tok];
    yt.par_chunks_mut(rows_per_block * n_tok.max(1))
        .enumerate()
        .try_for_each_init(Vec::new, |buf: &mut Vec<f32>, (bi, out)| -> Result<()> {
            let first = bi * rows_per_block;
            let n_rows = out.len() / n_tok.max(1);
            let rows: &[f32] = match w {
                Operand::Tensor(t) => {
                    buf.resize(n_rows * n_in, 0.0);
                    t.decode_rows(first, n_rows, buf)?;
                    buf
                }
                Operand::F32 { rows, .. } => &rows[first * n_in..(first + n_rows) * n_in],
            };
            dot_block(rows, n_rows, x, n_tok, n_in, out, gemm);
            Ok(())
        })?;
    let mut y = vec![0f32; n_tok * n_out];
    for (o, row) in yt.chunks_exact(n_tok.max(1)).enumerate() {
        for (t, v) in row.iter().enumerate() {
            y[t * n_out + o] = *v;
        }
    }
    Ok(y)
}

/// `out[r][t] = dot(w[r], x[t])` for a block of rows, by the GEMM when `gemm`.
fn dot_block(
    w: &[f32],
    n_rows: usize,
    x: &[f32],
    n_tok: usize,
    n_in: usize,
    out: &mut [f32],
    gemm: bool,
) {
    if gemm {
        // Sequential: the blocks already run one per core.
        faer_matmul(
            MatMut::from_row_major_slice_mut(&mut out[..n_rows * n_tok], n_rows, n_tok),
            Accum::Replace,
            MatRef::from_row_major_slice(&w[..n_rows * n_in], n_rows, n_in),
            MatRef::from_row_major_slice(&x[..n_tok * n_in], n_tok, n_in).transpose(),
            1.0f32,
            Par::Seq,
        );
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { avx2::dot_block(w, n_rows, x, n_tok, n_in, out) };
            return;
        }
    }
    for r in 0..n_rows {
        let wr = &w[r * n_in..(r + 1) * n_in];
        for t in 0..n_tok {
            out[r * n_tok + t] = dot(wr, &x[t * n_in..(t + 1) * n_in]);
        }
    }
}

/// Plain dot product with 8 independent partial sums (vectorizes without fast-math).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the eight lanes of `v`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One weight row against four tokens: each weight load feeds four FMAs.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `w` and every `x[k]` must hold at least `n` floats:
    /// the loads of the first `n / 8 * 8` values go through raw pointers without bounds checks.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_1x4(w: &[f32], x: [&[f32]; 4], n: usize) -> [f32; 4] {
        let n8 = n / 8 * 8;
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let wp = w.as_ptr();
        let (p0, p1, p2, p3) = (x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr());
        let mut i = 0;
        while i < n8 {
            let wv = _mm256_loadu_ps(wp.add(i));
            a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p0.add(i)), a0);
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p1.add(i)), a1);
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p2.add(i)), a2);
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p3.add(i)), a3);
            i += 8;
        }
        let mut r = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
        for j in n8..n {
            for k in 0..4 {
                r[k] += w[j] * x[k][j];
            }
        }
        r
    }

    /// One weight row against one token.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `w` and `x` must hold at least `n` floats (the
    /// vector loads are not bounds-checked).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_1x1(w: &[f32], x: &[f32], n: usize) -> f32 {
        let n8 = n / 8 * 8;
        let mut a = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            a = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.as_ptr().add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                a,
            );
            i += 8;
        }
        let mut s = hsum(a);
        for j in n8..n {
            s += w[j] * x[j];
        }
        s
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; slices must hold `n_rows * n_in`, `n_tok * n_in` and
    /// `n_rows * n_tok` floats (checked by the asserts).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_block(
        w: &[f32],
        n_rows: usize,
        x: &[f32],
        n_tok: usize,
        n_in: usize,
        out: &mut [f32],
    ) {
        assert!(w.len() >= n_rows * n_in && x.len() >= n_tok * n_in);
        assert!(out.len() >= n_rows * n_tok);
        let xr = |t: usize| &x[t * n_in..(t + 1) * n_in];
        for r in 0..n_rows {
            let wr = &w[r * n_in..(r + 1) * n_in];
            let mut t = 0;
            while t + 4 <= n_tok {
                let v = dot_1x4(wr, [xr(t), xr(t + 1), xr(t + 2), xr(t + 3)], n_in);
                out[r * n_tok + t..r * n_tok + t + 4].copy_from_slice(&v);
                t += 4;
            }
            while t < n_tok {
                out[r * n_tok + t] = dot_1x1(wr, xr(t), n_in);
                t += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_products() {
        // Both kernels, with a few tokens and with many.
        for n_tok in [6, GEMM_TOKENS + 3] {
            for batched in [false, true] {
                matmul_matches_naive_products_at(n_tok, batched);
            }
        }
    }

    fn matmul_matches_naive_products_at(n_tok: usize, batched: bool) {
        let (n_in, n_out) = (37, 301);
        let w: Vec<f32> = (0..n_in * n_out)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..n_in * n_tok)
            .map(|i| ((i * 31) % 13) as f32 / 7.0 - 0.9)
            .collect();
        let product = if batched { matmul_batched } else { matmul };
        let y = product(&Operand::F32 { rows: &w, n_in }, &x, n_tok).unwrap();
        for t in 0..n_tok {
            for o in 0..n_out {
                let want: f64 = (0..n_in)
                    .map(|i| w[o * n_in + i] as f64 * x[t * n_in + i] as f64)
                    .sum();
                assert!((y[t * n_out + o] as f64 - want).abs() < 1e-4, "{t} {o}");
            }
        }
    }
}
