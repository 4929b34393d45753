//! Scale searches shared by the ggml quantizers, bit-exact with `ggml-quants.c`.
//!
//! Each function here mirrors one `static` helper of ggml's `ggml-quants.c` (llama.cpp as vendored by
//! llama-cpp-python 0.3.36): given a group of values it picks the scale (and for the `qkx` family the
//! minimum) and the integer levels. They are written to perform the same `f32` operations in the same
//! order as ggml's scalar C, which libggml-base compiles with `-O3` and no `-march`/`-ffast-math`: no
//! FMA contraction and no reassociation of sums. Rust does neither by default, so plain `a * b + c` here
//! rounds exactly like the C. Integer-to-float conversions are spelled out (`l as f32`) where C
//! promotes implicitly, in the same places.
//!
//! Slices replace ggml's `(n, pointer)` pairs: `x.len()` is ggml's `n`, and the output slices must be at
//! least as long.
//!
//! Speed: each search is a chain of sequential sums that cannot be reordered without changing bits, so
//! a group cannot be vectorized within itself. [`super::lanes`] instead runs many independent groups
//! in lockstep, one per SIMD lane, each lane doing exactly the scalar operations in the scalar order.
//! The scalar functions here stay as the reference those lane versions are tested against, and for
//! callers with a single group (the scales of one super-block).

// Index loops mirror the C and walk several arrays in step; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

/// Rounds to the nearest integer, ties to even, the way ggml's `nearest_int` does: add 1.5·2²³ so the
/// FPU's round-to-nearest-even lands the integer in the low mantissa bits, then read them back.
///
/// Valid for `|fval| <= 4194303`; like ggml (whose `assert` is compiled out), larger or non-finite
/// inputs give the same meaningless but deterministic result as the C.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0_f32;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Groups whose largest magnitude is below this are treated as all zero (ggml's `GROUP_MAX_EPS`).
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// The weight `make_qx_quants` gives `x` when no importance weights are supplied.
#[inline(always)]
fn qx_weight(rmse_type: i32, x: f32) -> f32 {
    match rmse_type {
        1 => x * x,
        2 => 1.0,
        3 => x.abs(),
        _ => x.abs().sqrt(),
    }
}

/// Symmetric quantization of `x` to levels `-nmax..nmax-1`, stored in `l` offset by `nmax`; returns the
/// scale. Mirrors ggml's `make_qx_quants`.
///
/// `rmse_type` 0 takes the plain `max/-nmax` scale; a positive value searches 18 nearby scales for the
/// least weighted squared error, weighting by `qw` or, without it, by `x²` (1), 1 (2), `|x|` (3) or
/// `sqrt|x|` (other); a negative value returns early with the mean of the first fit and the plain scale.
pub fn make_qx_quants(
    nmax: i32,
    x: &[f32],
    l: &mut [i8],
    rmse_type: i32,
    qw: Option<&[f32]>,
) -> f32 {
    let n = x.len();
    let l = &mut l[..n];
    let qw = qw.map(|w| &w[..n]);
    let (max, amax) = first_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = (-nmax) as f32 / max;
    if rmse_type == 0 {
        for (li, &xi) in l.iter_mut().zip(x) {
            let q = nearest_int(iscale * xi);
            *li = (nmax + q.clamp(-nmax, nmax - 1)) as i8;
        }
        return 1.0 / iscale;
    }
    let (rmse_type, return_early) = if rmse_type < 0 {
        (-rmse_type, true)
    } else {
        (rmse_type, false)
    };
    let weight = |i: usize| match qw {
        Some(w) => w[i],
        None => qx_weight(rmse_type, x[i]),
    };
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = weight(i);
        let qf = q as f32;
        sumlx += w * x[i] * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 {
            0.5 * (scale + 1.0 / iscale)
        } else {
            1.0 / iscale
        };
    }
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) as f32;
            let w = weight(i);
            sumlx += w * x[i] * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let q = nearest_int(iscale * x[i]);
                l[i] = (nmax + q.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The value of largest magnitude in `x` and that magnitude, the first one on ties: ggml's
/// `if (ax > amax) { amax = ax; max = x[i]; }` loop. `(0, 0)` when every value is zero.
#[inline(always)]
pub(crate) fn first_absmax(x: &[f32]) -> (f32, f32) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &xi in x {
        let ax = xi.abs();
        if ax > amax {
            amax = ax;
            max = xi;
        }
    }
    (max, amax)
}

/// Symmetric quantization to `-nmax..nmax-1` (stored offset by `nmax`) refined by coordinate descent
/// on the `x²`-weighted error when `do_rmse`; returns the scale. Mirrors ggml's `make_q3_quants`.
pub fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len();
    let l = &mut l[..n];
    let (max, amax) = first_absmax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = (-nmax) as f32 / max;
    if do_rmse {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            l[i] = q as i8;
            let w = x[i] * x[i];
            let qf = q as f32;
            sumlx += w * x[i] * qf;
            suml2 += w * qf * qf;
        }
        for _itry in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = l[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                    if new_l != l[i] as i32 {
                        let nl = new_l as f32;
                        slx += w * x[i] * nl;
                        sl2 += w * nl * nl;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for li in l.iter_mut() {
            *li += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (li, &xi) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = (q + nmax) as i8;
    }
    1.0 / iscale
}

/// Where a `qkx` search takes its per-element weights from.
#[derive(Clone, Copy)]
enum QkxWeights<'a> {
    Given(&'a [f32]),
    /// `x²`, make_qkx3_quants' default when given no weights.
    Squares,
}

impl QkxWeights<'_> {
    #[inline(always)]
    fn at(self, x: &[f32], i: usize) -> f32 {
        match self {
            QkxWeights::Given(w) => w[i],
            QkxWeights::Squares => x[i] * x[i],
        }
    }
}

/// Shared body of `make_qkx2_quants` and `make_qkx3_quants`, which differ only in their default
/// weights and in how they detect a flat group (`max == min` versus `max <= min`; identical for
/// NaN-free input, kept apart anyway to follow the C).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn make_qkx_quants(
    nmax: i32,
    x: &[f32],
    weights: QkxWeights,
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    flat_is_le: bool,
) -> (f32, f32) {
    let n = x.len();
    let l = &mut l[..n];
    let laux = &mut laux[..n];
    if let QkxWeights::Given(w) = weights {
        assert!(w.len() >= n, "weights shorter than the group");
    }
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights.at(x, 0);
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights.at(x, i);
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    let flat = if flat_is_le { max <= min } else { max == min };
    if flat {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights.at(x, i) * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights.at(x, i);
            let qf = q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights.at(x, i) * diff;
            }
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Asymmetric quantization of `x` to levels `0..=nmax` with a minimum: tries `nstep + 1` scales
/// `(nmax + rmin + rdelta·is)/(max − min)`, refits scale and minimum by weighted least squares for
/// each, and keeps the one with the least weighted error (absolute when `use_mad`, else squared).
/// Returns `(scale, the_min)` where `the_min >= 0` is subtracted on dequantization (`x ≈ scale·l −
/// the_min`). `laux` is scratch of `x.len()` bytes. Mirrors ggml's `make_qkx2_quants`.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    make_qkx_quants(
        nmax,
        x,
        QkxWeights::Given(weights),
        l,
        laux,
        rmin,
        rdelta,
        nstep,
        use_mad,
        false,
    )
}

/// [`make_qkx2_quants`] with optional weights (`x²` when `None`); mirrors ggml's `make_qkx3_quants`,
/// used by the importance-weighted quantizers.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let weights = match weights {
        Some(w) => QkxWeights::Given(w),
        None => QkxWeights::Squares,
    };
    make_qkx_quants(
        nmax, x, weights, l, laux, rmin, rdelta, nstep, use_mad, true,
    )
}

/// Quantization of non-negative values (the sub-block scales and mins of a super-block) to levels
/// `0..=nmax` minimizing the `quant_weights`-weighted squared error: a scan of 8 nearby scales, then
/// coordinate descent. Returns the scale. Mirrors ggml's `make_qp_quants`.
pub fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len();
    let l = &mut l[..n];
    let qw = &quant_weights[..n];
    let mut max = 0.0f32;
    for &xi in x {
        // ggml's MAX(max, x[i]) is `max > x ? max : x`: a NaN x would win; keep that order.
        max = if max > xi { max } else { xi };
    }
    if max < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for (li, &xi) in l.iter_mut().zip(x) {
        *li = nearest_int(iscale * xi) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1f32 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        let w = qw[i];
        let qf = q as f32;
        sumlx += w * x[i] * qf;
        suml2 += w * qf * qf;
    }
    for _itry in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(0.49999997), 0);
        assert_eq!(nearest_int(-7.6), -8);
        assert_eq!(nearest_int(4194303.0), 4194303);
        assert_eq!(nearest_int(-4194303.0), -4194303);
    }

    use proptest::prelude::*;

    /// A group of `n` values: random, all equal, mostly zero or one-signed, at magnitude 10^exp.
    pub(crate) fn group(n: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (
            prop::collection::vec(-1.0f32..1.0, n),
            prop::collection::vec(0.0f32..10.0, n),
            0u8..5,
            -20i32..20,
        )
            .prop_map(|(v, w, kind, exp)| {
                let s = 10f32.powi(exp);
                let x = v
                    .iter()
                    .map(|&a| match kind {
                        0 => a * s,
                        1 => v[0] * s,
                        2 if a.abs() < 0.8 => 0.0,
                        2 => a * s,
                        3 => a.abs() * s,
                        _ => (a * 8.0).round() * 0.25,
                    })
                    .collect();
                (x, w)
            })
    }
}
