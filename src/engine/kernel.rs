//! The merge's arithmetic kernel: add a scaled low-rank product `s · B·A` to a block of rows.
//!
//! Rank is small (4–128) and rows are long, so the product is never formed: each block of `ROWS` output
//! rows is updated strip by strip (16 columns at a time), the strip's accumulators stay in registers
//! while the rank loop streams the matching 16 columns of every row of `A`. Every element is computed
//! as `d + c₀·a₀ + c₁·a₁ + …` in rank order, whatever the blocking, so the result does not depend on
//! the number of threads or on where a row block starts: runs are reproducible bit for bit.

/// Columns per register strip: two AVX vectors or four SSE vectors per row.
const STRIP: usize = 16;
/// Rows updated together, so each load of an `A` strip is reused this many times.
const ROWS: usize = 4;

/// `out[i, j] += Σ_k (scale · b[i, k]) · a[k, j]` for `i < rows`, `j < n`, `k < rank`.
///
/// `out` is `rows × n` and `b` is `rows × rank` (the rows of `B` that belong to this block), `a` is
/// `rank × n`; all row-major. Panics if the slices are shorter than the shapes say (callers build them
/// from checked shapes).
pub fn add_low_rank(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, scale: f32) {
    let rows = out.len().checked_div(n).unwrap_or(0);
    assert!(out.len() == rows * n && b.len() >= rows * rank && a.len() >= rank * n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the only feature the wrapper enables.
            unsafe { add_low_rank_avx2(out, b, a, n, rank, scale) };
            return;
        }
    }
    add_low_rank_portable(out, b, a, n, rank, scale);
}

/// The same code compiled with AVX2 enabled, so the strip loops vectorize 8 lanes wide. Plain
/// multiply-then-add (no FMA contraction), so the bits equal the portable path's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_low_rank_avx2(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, s: f32) {
    add_low_rank_portable(out, b, a, n, rank, s)
}

#[inline(always)]
fn add_low_rank_portable(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, s: f32) {
    let mut coef = vec![0f32; ROWS * rank];
    for (block, rows_out) in out.chunks_mut(ROWS * n).enumerate() {
        let rows = rows_out.len() / n;
        let b_rows = &b[block * ROWS * rank..(block * ROWS + rows) * rank];
        for (c, bv) in coef.iter_mut().zip(b_rows) {
            *c = s * bv;
        }
        if rows == ROWS {
            block_rows::<ROWS>(rows_out, &coef, a, n, rank);
        } else {
            for (i, row) in rows_out.chunks_mut(n).enumerate() {
                block_rows::<1>(row, &coef[i * rank..(i + 1) * rank], a, n, rank);
            }
        }
    }
}

/// `R` rows at once: register strips of `R × STRIP` accumulators, then a scalar tail.
#[inline(always)]
fn block_rows<const R: usize>(out: &mut [f32], coef: &[f32], a: &[f32], n: usize, rank: usize) {
    let full = n / STRIP * STRIP;
    let mut c0 = 0;
    while c0 < full {
        let mut acc = [[0f32; STRIP]; R];
        for (i, acc_row) in acc.iter_mut().enumerate() {
            acc_row.copy_from_slice(&out[i * n + c0..i * n + c0 + STRIP]);
        }
        for k in 0..rank {
            let strip: &[f32; STRIP] = a[k * n + c0..k * n + c0 + STRIP]
                .try_into()
                .expect("strip length");
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let c = coef[i * rank + k];
                for j in 0..STRIP {
                    acc_row[j] += c * strip[j];
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate() {
            out[i * n + c0..i * n + c0 + STRIP].copy_from_slice(acc_row);
        }
        c0 += STRIP;
    }
    for i in 0..R {
        for j in full..n {
            let mut v = out[i * n + j];
            for k in 0..rank {
                v += coef[i * rank + k] * a[k * n + j];
            }
            out[i * n + j] = v;
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

    /// The naive triple loop, in the same per-element order (d + Σ_k c_k a_k).
    fn naive(out: &mut [f32], b: &[f32], a: &[f32], n: usize, rank: usize, s: f32) {
        let rows = out.len() / n;
        for i in 0..rows {
            for j in 0..n {
                let mut v = out[i * n + j];
                for k in 0..rank {
                    v += (s * b[i * rank + k]) * a[k * n + j];
                }
                out[i * n + j] = v;
            }
        }
    }

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
            let mut got = w.clone();
            let mut want = w.clone();
            add_low_rank(&mut got, &b, &a, n, rank, 0.37);
            naive(&mut want, &b, &a, n, rank, 0.37);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "rows {rows} n {n} rank {rank}"
            );
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
