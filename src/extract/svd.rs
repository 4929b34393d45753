//! Truncated SVD of one weight delta by a randomized range finder with power iterations (Halko,
//! Martinsson and Tropp 2011, algorithms 4.4 and 5.1), the dense parts done by faer on all of the
//! current rayon pool's threads.
//!
//! For `Δ` (`m × n`) and `k` wanted triplets: `Y = Δ·Ω` for a Gaussian `Ω` of `k + OVERSAMPLE`
//! columns, re-orthonormalized by QR after every product with `Δ` or `Δᵀ` through `POWER_ITERS`
//! power iterations (which sharpen a slowly decaying spectrum), then the SVD of the small
//! `Qᵀ·Δ` gives `Δ ≈ (Q·Ũ)·S·Vᵀ`. The kept part `U_r·S_r·V_rᵀ = U_r·U_rᵀ·Δ` is an orthogonal
//! projection of `Δ`, so `‖Δ − U_r·S_r·V_rᵀ‖² = ‖Δ‖² − Σ s_i²` and the energy reported is exact for the
//! factors written. When `k + OVERSAMPLE` reaches half the smaller dimension the random sketch saves
//! nothing and the SVD is computed exactly (in f64).
//!
//! The products with `Δ` run in f32 (they are the whole cost, ~`2(2q+2)·m·n·k` flops); the small SVD
//! runs in f64. `Ω` comes from a seeded generator, so a run is reproducible.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// Extra sketch columns beyond the wanted rank (Halko et al. recommend 5 to 10).
pub const OVERSAMPLE: usize = 10;
/// Power iterations. On a fine-tune-like delta (12 directions with σ_i = 0.8^i over a small full-rank
/// tail) cut at rank 8, B·A is within 7e-4 of the exact truncation with two, 6e-5 with three and 5e-6
/// with four (`tests/extract.rs`, numpy's SVD as the reference); each costs two more passes over Δ.
pub const POWER_ITERS: usize = 3;

/// The SVD of one small matrix did not converge (faer's error; not expected on finite input).
#[derive(Debug, thiserror::Error)]
#[error("the SVD did not converge")]
pub struct NoConvergence;

/// The leading `k` singular triplets of a matrix.
pub struct Truncated {
    /// `m × k` row-major, orthonormal columns.
    pub u: Vec<f32>,
    /// `k` singular values, non-increasing.
    pub s: Vec<f32>,
    /// `k × n` row-major (`Vᵀ`), orthonormal rows.
    pub vt: Vec<f32>,
    pub m: usize,
    pub n: usize,
    /// Whether the exact SVD was used instead of the sketch.
    pub exact: bool,
}

impl Truncated {
    pub fn k(&self) -> usize {
        self.s.len()
    }
}

/// The leading `min(k, m, n)` singular triplets of `delta` (`m × n`, row-major); `seed` picks the
/// random sketch.
pub fn truncated_svd(
    delta: &[f32],
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> Result<Truncated, NoConvergence> {
    assert_eq!(delta.len(), m * n, "delta is m × n");
    let kmax = m.min(n);
    let k = k.min(kmax);
    let l = (k + OVERSAMPLE).min(kmax);
    let a = MatRef::from_row_major_slice(delta, m, n);
    if k == 0 {
        return Ok(Truncated {
            u: Vec::new(),
            s: Vec::new(),
            vt: Vec::new(),
            m,
            n,
            exact: true,
        });
    }
    if 2 * l >= kmax {
        return exact(a, k);
    }
    let par = Par::rayon(0);
    let omega = gaussian(n, l, seed);
    let mut y = Mat::<f32>::zeros(m, l);
    matmul(y.as_mut(), Accum::Replace, a, omega.as_ref(), 1.0, par);
    let mut q = thin_q(y.as_ref());
    let mut z = Mat::<f32>::zeros(n, l);
    for _ in 0..POWER_ITERS {
        matmul(
            z.as_mut(),
            Accum::Replace,
            a.transpose(),
            q.as_ref(),
            1.0,
            par,
        );
        let qz = thin_q(z.as_ref());
        matmul(y.as_mut(), Accum::Replace, a, qz.as_ref(), 1.0, par);
        q = thin_q(y.as_ref());
    }
    // Small matrix Qᵀ·Δ (l × n), decomposed in f64.
    let mut b = Mat::<f32>::zeros(l, n);
    matmul(b.as_mut(), Accum::Replace, q.transpose(), a, 1.0, par);
    let b64 = Mat::<f64>::from_fn(l, n, |i, j| f64::from(b[(i, j)]));
    let svd = b64.thin_svd().map_err(|_| NoConvergence)?;
    let ub = Mat::<f32>::from_fn(l, k, |i, j| svd.U()[(i, j)] as f32);
    let mut u = Mat::<f32>::zeros(m, k);
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        ub.as_ref(),
        1.0,
        par,
    );
    let s = (0..k).map(|i| svd.S()[i] as f32).collect();
    let v = svd.V();
    Ok(Truncated {
        u: row_major(u.as_ref()),
        s,
        vt: (0..k)
            .flat_map(|i| (0..n).map(move |j| v[(j, i)] as f32))
            .collect(),
        m,
        n,
        exact: false,
    })
}

/// The exact thin SVD in f64, cut to `k` triplets.
fn exact(a: MatRef<'_, f32>, k: usize) -> Result<Truncated, NoConvergence> {
    let (m, n) = (a.nrows(), a.ncols());
    let a64 = Mat::<f64>::from_fn(m, n, |i, j| f64::from(a[(i, j)]));
    let svd = a64.thin_svd().map_err(|_| NoConvergence)?;
    let (u, v) = (svd.U(), svd.V());
    Ok(Truncated {
        u: (0..m)
            .flat_map(|i| (0..k).map(move |j| u[(i, j)] as f32))
            .collect(),
        s: (0..k).map(|i| svd.S()[i] as f32).collect(),
        vt: (0..k)
            .flat_map(|i| (0..n).map(move |j| v[(j, i)] as f32))
            .collect(),
        m,
        n,
        exact: true,
    })
}

/// An orthonormal basis of the columns of `y` (the thin Q of its QR decomposition).
fn thin_q(y: MatRef<'_, f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

fn row_major(m: MatRef<'_, f32>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

/// `rows × cols` standard normal values from SplitMix64 through Box–Muller: no dependency, and the
/// same sketch on every platform for one seed.
fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut uniform = move || ((next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut spare: Option<f64> = None;
    let mut normal = move || {
        if let Some(x) = spare.take() {
            return x;
        }
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        spare = Some(r * t.sin());
        r * t.cos()
    };
    let mut out = Mat::<f32>::zeros(rows, cols);
    for j in 0..cols {
        for i in 0..rows {
            out[(i, j)] = normal() as f32;
        }
    }
    out
}

/// A seed for a tensor's sketch from its name (FNV-1a), so results do not depend on tensor order.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `m × n` with singular values `sv` (and orthonormal random factors) plus `noise`·N(0,1).
    fn spectrum(m: usize, n: usize, sv: &[f64], noise: f64, seed: u64) -> Vec<f32> {
        let qu = thin_q(gaussian(m, sv.len(), seed).as_ref());
        let qv = thin_q(gaussian(n, sv.len(), seed + 1).as_ref());
        let g = gaussian(m, n, seed + 2);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = noise * f64::from(g[(i, j)]);
                for (c, s) in sv.iter().enumerate() {
                    acc += s * f64::from(qu[(i, c)]) * f64::from(qv[(j, c)]);
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    fn exact_values(d: &[f32], m: usize, n: usize) -> Vec<f64> {
        let a = Mat::<f64>::from_fn(m, n, |i, j| f64::from(d[i * n + j]));
        a.singular_values().unwrap()
    }

    #[test]
    fn randomized_matches_the_exact_svd_on_a_decaying_spectrum() {
        let (m, n) = (300, 200);
        let sv: Vec<f64> = (0..24).map(|i| 0.8f64.powi(i)).collect();
        let d = spectrum(m, n, &sv, 1e-3, 7);
        let t = truncated_svd(&d, m, n, 8, 1).unwrap();
        assert!(!t.exact, "the sketch path is what this tests");
        let want = exact_values(&d, m, n);
        for (i, (&got, &want)) in t.s.iter().zip(&want).enumerate() {
            let rel = (f64::from(got) - want).abs() / want;
            assert!(rel < 1e-4, "σ{i}: {got} vs {want}: {rel}");
        }
        // Orthonormal U columns.
        for a in 0..8 {
            for b in 0..8 {
                let dot: f64 = (0..m)
                    .map(|i| f64::from(t.u[i * 8 + a]) * f64::from(t.u[i * 8 + b]))
                    .sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "u{a}·u{b} = {dot}");
            }
        }
    }

    #[test]
    fn an_exactly_low_rank_delta_is_recovered() {
        let (m, n) = (128, 96);
        let d = spectrum(m, n, &[3.0, 2.0, 1.0, 0.5], 0.0, 3);
        let t = truncated_svd(&d, m, n, 4, 9).unwrap();
        assert!(!t.exact);
        let mut worst = 0f32;
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..4)
                    .map(|c| t.u[i * 4 + c] * t.s[c] * t.vt[c * n + j])
                    .sum();
                worst = worst.max((r - d[i * n + j]).abs());
            }
        }
        assert!(worst < 1e-5, "max |UΣVᵀ − Δ| = {worst}");
    }

    #[test]
    fn small_matrices_take_the_exact_path() {
        let d = spectrum(20, 12, &[2.0, 1.0, 0.25], 1e-2, 5);
        let t = truncated_svd(&d, 20, 12, 3, 0).unwrap();
        assert!(t.exact);
        let want = exact_values(&d, 20, 12);
        for i in 0..3 {
            assert!((f64::from(t.s[i]) - want[i]).abs() < 1e-5 * want[0]);
        }
        assert_eq!((t.u.len(), t.vt.len()), (20 * 3, 3 * 12));
    }
}
