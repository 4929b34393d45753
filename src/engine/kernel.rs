//! The merge's arithmetic kernel: add a scaled low-rank product `s · B·A` to a block of rows.
//!
//! Rank is small (4–128) and rows are long, so the product is never formed: each block of `ROWS`
//! output rows is updated strip by strip (two vector registers of columns at a time), the strip's
//! accumulators stay in registers while the rank loop streams the matching columns of every row of
//! `A`. Each element's update is
//! summed over the rank first, `((0 + c₀·a₀) + c₁·a₁) + …` in rank order, and only then added to the
//! weight, as in `W + s·(B·A)`: the (much larger) weight does not swallow the rank terms one by one,
//! and the result does not depend on the blocking, the number of threads or where a row block starts.

use crate::quant::simd::F32s;

/// Rows updated together, so each load of an `A` strip is reused this many times.
const ROWS: usize = 4;

crate::quant::simd::simd_dispatch! {
    /// `out[i, j] += Σ_k (scale · b[i, k]) · a[k, j]` for `i < rows`, `j < n`, `k < rank`, the sum
    /// over `k` formed before it is added.
    ///
    /// `out` is `rows × n` and `b` is `rows × rank` (the rows of `B` that belong to this block), `a`
    /// is `rank × n`; all row-major. Panics if the slices are shorter than the shapes say (callers
    /// build them from checked shapes). Every SIMD level gives the same bits: plain multiply-then-add,
    /// no FMA contraction.
    pub fn add_low_rank<L>(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, scale: f32) {
        // Two registers per row, so a block keeps 2·ROWS independent sums in flight (one register
        // per row would leave the adds waiting on their own latency).
        if <L::X2 as F32s>::LANES >= 32 {
            add_low_rank_strips::<32>(out, b, a, n, rank, scale)
        } else {
            add_low_rank_strips::<16>(out, b, a, n, rank, scale)
        }
    }
}

/// [`add_low_rank`] with register strips of `S` columns.
#[inline(always)]
fn add_low_rank_strips<const S: usize>(
    out: &mut [f32],
    b: &[f32],
    a: &[f32],
    n: usize,
    rank: usize,
    s: f32,
) {
    let rows = out.len().checked_div(n).unwrap_or(0);
    assert!(out.len() == rows * n && b.len() >= rows * rank && a.len() >= rank * n);
    if rank == 0 || rows == 0 {
        return; // nothing to add (and no chunks of zero length below)
    }
    let a = &a[..rank * n];
    // The block's coefficients `s·b[i, k]`, rank-major: the `R` of one rank step side by side.
    let mut coef = vec![0f32; ROWS * rank];
    for (block, rows_out) in out.chunks_mut(ROWS * n).enumerate() {
        let rows = rows_out.len() / n;
        let b_rows = &b[block * ROWS * rank..(block * ROWS + rows) * rank];
        if rows == ROWS {
            for (i, b_row) in b_rows.chunks_exact(rank).enumerate() {
                for (k, bv) in b_row.iter().enumerate() {
                    coef[k * ROWS + i] = s * bv;
                }
            }
            block_rows::<ROWS, S>(rows_out, &coef, a, n);
        } else {
            for (row, b_row) in rows_out.chunks_mut(n).zip(b_rows.chunks_exact(rank)) {
                for (c, bv) in coef.iter_mut().zip(b_row) {
                    *c = s * bv;
                }
                block_rows::<1, S>(row, &coef[..rank], a, n);
            }
        }
    }
}

/// `R` rows at once: register strips of `R × S` accumulators, then a scalar tail. `coef` holds
/// `R` coefficients per rank step, `a` one row of `n` per rank step.
#[inline(always)]
fn block_rows<const R: usize, const S: usize>(out: &mut [f32], coef: &[f32], a: &[f32], n: usize) {
    let full = n / S * S;
    let mut c0 = 0;
    while c0 < full {
        let mut acc = [[0f32; S]; R];
        for (a_row, c) in a.chunks_exact(n).zip(coef.chunks_exact(R)) {
            let strip: &[f32; S] = a_row[c0..c0 + S].try_into().expect("strip length");
            for i in 0..R {
                let ci = c[i];
                for j in 0..S {
                    acc[i][j] += ci * strip[j];
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate() {
            for (o, d) in out[i * n + c0..i * n + c0 + S].iter_mut().zip(acc_row) {
                *o += d;
            }
        }
        c0 += S;
    }
    for i in 0..R {
        for j in full..n {
            let mut v = 0f32;
            for (a_row, c) in a.chunks_exact(n).zip(coef.chunks_exact(R)) {
                v += c[i] * a_row[j];
            }
            out[i * n + j] += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::simd::{with_level, SimdLevel};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// The naive triple loop, in the same per-element order (d + (Σ_k c_k a_k)).
    fn naive(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, s: f32) {
        let rows = out.len() / n;
        for i in 0..rows {
            for j in 0..n {
                let mut v = 0f32;
                for k in 0..rank {
                    v += (s * b[i * rank + k]) * a[k * n + j];
                }
                out[i * n + j] += v;
            }
        }
    }

    /// Every SIMD level the CPU has gives the naive loop's bits.
    #[test]
    fn equals_naive_bit_for_bit_on_odd_shapes() {
        let mut seed = 7;
        for &(rows, n, rank) in &[
            (1, 1, 1),
            (3, 17, 2),
            (4, 16, 4),
            (9, 70, 5),
            (13, 256, 16),
            (5, 33, 0),
        ] {
            let a: Vec<f32> = (0..rank * n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed)).collect();
            let mut want = w.clone();
            naive(&mut want, &b, &a, n, rank, 0.37);
            for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                let mut got = w.clone();
                with_level(level, || add_low_rank(&mut got, &b, &a, n, rank, 0.37));
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "rows {rows} n {n} rank {rank} at {}",
                    level.name()
                );
            }
        }
    }

    #[test]
    fn row_blocks_give_the_same_bits_as_one_call() {
        let (rows, n, rank) = (11, 48, 3);
        let mut seed = 3;
        let a: Vec<f32> = (0..rank * n).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
        let mut whole = vec![0.5f32; rows * n];
        add_low_rank(&mut whole, &b, &a, n, rank, 2.0);
        let mut parts = vec![0.5f32; rows * n];
        for (r0, r1) in [(0, 3), (3, 10), (10, 11)] {
            add_low_rank(
                &mut parts[r0 * n..r1 * n],
                &b[r0 * rank..r1 * rank],
                &a,
                n,
                rank,
                2.0,
            );
        }
        assert_eq!(whole, parts);
    }
}
