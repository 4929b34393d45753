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
//! a group cannot be vectorized within itself. The `*_lanes` variants instead run LANES independent
//! groups (the sub-blocks of a super-block) in lockstep, one per SIMD lane, each lane doing exactly the
//! scalar operations in the scalar order; data-dependent branches become per-lane selects. The 8-lane
//! `qkx` passes have hand-written AVX2 kernels, used when the CPU has AVX2 (the compiler would not keep
//! their 24 running sums in vectors). The scalar functions stay as the reference the lane versions are
//! tested against, and for callers with a single group.

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

/// [`make_qx_quants`] with `rmse_type` 1 and explicit weights (pass `x²` for ggml's `qw == NULL`: the
/// same value it computes inline) run on `LANES` independent groups in lockstep, one per lane:
/// `xt[i][k]` is value `i` of group `k`, `wt` its weight, `lt` receives the offset levels and `laux`
/// is scratch (signed levels as floats, which keeps the hot loop vectorizable). Every lane performs the scalar function's operations in its order (bit-identical
/// results); branches become per-lane selects. Returns the scales.
#[inline(always)]
pub fn make_qx_quants_lanes<const LANES: usize>(
    nmax: i32,
    xt: &[[f32; LANES]],
    wt: &[[f32; LANES]],
    lt: &mut [[i8; LANES]],
    laux: &mut [[f32; LANES]],
) -> [f32; LANES] {
    let n = xt.len();
    assert!(wt.len() == n && lt.len() == n && laux.len() == n);
    let (max, amax) = first_absmax_lanes(xt);
    let nmaxf = nmax as f32;
    let mut iscale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = (-nmax) as f32 / max[k];
    }
    let mut sumlx = [0f32; LANES];
    let mut suml2 = [0f32; LANES];
    for i in 0..n {
        let (x, w) = (&xt[i], &wt[i]);
        for k in 0..LANES {
            let q = nearest_int(iscale[k] * x[k]).clamp(-nmax, nmax - 1);
            lt[i][k] = (q + nmax) as i8;
            let qf = q as f32;
            sumlx[k] += w[k] * x[k] * qf;
            suml2[k] += w[k] * qf * qf;
        }
    }
    let mut scale = [0f32; LANES];
    let mut best = [0f32; LANES];
    for k in 0..LANES {
        scale[k] = if suml2[k] != 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        };
        best[k] = scale[k] * sumlx[k];
    }
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let factor = nmaxf + 0.1f32 * is as f32;
        for k in 0..LANES {
            iscale[k] = -factor / max[k];
        }
        let mut sumlx = [0f32; LANES];
        let mut suml2 = [0f32; LANES];
        for i in 0..n {
            let (x, w) = (&xt[i], &wt[i]);
            let mut qf = [0f32; LANES];
            for k in 0..LANES {
                qf[k] = nearest_int(iscale[k] * x[k]).clamp(-nmax, nmax - 1) as f32;
            }
            laux[i] = qf;
            for k in 0..LANES {
                sumlx[k] += w[k] * x[k] * qf[k];
            }
            for k in 0..LANES {
                suml2[k] += w[k] * qf[k] * qf[k];
            }
        }
        let mut accept = [false; LANES];
        for k in 0..LANES {
            accept[k] = suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best[k] * suml2[k];
            if accept[k] {
                scale[k] = sumlx[k] / suml2[k];
                best[k] = scale[k] * sumlx[k];
            }
        }
        if accept.iter().any(|&a| a) {
            for i in 0..n {
                for k in 0..LANES {
                    lt[i][k] = if accept[k] {
                        (laux[i][k] as i32 + nmax) as i8
                    } else {
                        lt[i][k]
                    };
                }
            }
        }
    }
    for k in 0..LANES {
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for l in lt.iter_mut() {
                l[k] = 0;
            }
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

/// [`first_absmax`] per lane, branch-free.
#[inline(always)]
fn first_absmax_lanes<const LANES: usize>(xt: &[[f32; LANES]]) -> ([f32; LANES], [f32; LANES]) {
    let mut max = [0f32; LANES];
    let mut amax = [0f32; LANES];
    for x in xt {
        for k in 0..LANES {
            let ax = x[k].abs();
            let bigger = ax > amax[k];
            amax[k] = if bigger { ax } else { amax[k] };
            max[k] = if bigger { x[k] } else { max[k] };
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

/// [`make_q3_quants`] with `do_rmse` run on `LANES` independent groups in lockstep, one per lane
/// (`xt[i][k]` is value `i` of group `k`; `lt` receives the offset levels; `laux` is scratch holding
/// the levels as floats, exact small integers that keep the loops vectorizable). Each lane performs the
/// scalar function's operations in its order, including its coordinate descent, which a lane leaves
/// (as the scalar loop breaks) after the first pass that changes nothing. Returns the scales.
#[inline(always)]
pub fn make_q3_quants_lanes<const LANES: usize>(
    nmax: i32,
    xt: &[[f32; LANES]],
    lt: &mut [[i8; LANES]],
    laux: &mut [[f32; LANES]],
) -> [f32; LANES] {
    let n = xt.len();
    assert!(lt.len() == n && laux.len() == n);
    let (max, amax) = first_absmax_lanes(xt);
    let mut iscale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = (-nmax) as f32 / max[k];
    }
    let lf = laux;
    let mut sumlx = [0f32; LANES];
    let mut suml2 = [0f32; LANES];
    for i in 0..n {
        let x = &xt[i];
        let mut q = [0f32; LANES];
        for k in 0..LANES {
            q[k] = nearest_int(iscale[k] * x[k]).clamp(-nmax, nmax - 1) as f32;
        }
        lf[i] = q;
        for k in 0..LANES {
            let w = x[k] * x[k];
            sumlx[k] += w * x[k] * q[k];
            suml2[k] += w * q[k] * q[k];
        }
    }
    let mut active = [true; LANES];
    for _itry in 0..5 {
        let mut changed = [false; LANES];
        for i in 0..n {
            let x = &xt[i];
            let l = &mut lf[i];
            for k in 0..LANES {
                let w = x[k] * x[k];
                let slx = sumlx[k] - w * x[k] * l[k];
                let sl2 = suml2[k] - w * l[k] * l[k];
                let new_l = nearest_int(x[k] * sl2 / slx).clamp(-nmax, nmax - 1) as f32;
                let slx2 = slx + w * x[k] * new_l;
                let sl22 = sl2 + w * new_l * new_l;
                let take = active[k]
                    && slx > 0.0
                    && new_l != l[k]
                    && sl22 > 0.0
                    && slx2 * slx2 * suml2[k] > sumlx[k] * sumlx[k] * sl22;
                l[k] = if take { new_l } else { l[k] };
                sumlx[k] = if take { slx2 } else { sumlx[k] };
                suml2[k] = if take { sl22 } else { suml2[k] };
                changed[k] |= take;
            }
        }
        for k in 0..LANES {
            active[k] &= changed[k];
        }
        if !active.iter().any(|&a| a) {
            break;
        }
    }
    let mut scale = [0f32; LANES];
    for k in 0..LANES {
        scale[k] = if suml2[k] > 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        };
    }
    for i in 0..n {
        for k in 0..LANES {
            lt[i][k] = (lf[i][k] as i32 + nmax) as i8;
        }
    }
    for k in 0..LANES {
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for l in lt.iter_mut() {
                l[k] = 0;
            }
        }
    }
    scale
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

/// The level pass of the `qkx` search, per lane: `l = clamp(nearest_int(iscale·(x − min)), 0, nmax)`
/// into `laux` (as floats), and the weighted sums `Σ w·l`, `Σ w·l·l`, `Σ w·l·x` in element order.
#[inline(always)]
fn qkx_levels_and_sums<const LANES: usize>(
    nmax: i32,
    xt: &[[f32; LANES]],
    wt: &[[f32; LANES]],
    iscale: &[f32; LANES],
    min: &[f32; LANES],
    laux: &mut [[f32; LANES]],
) -> ([f32; LANES], [f32; LANES], [f32; LANES]) {
    #[cfg(target_arch = "x86_64")]
    if LANES == 8 && super::simd::use_avx2() {
        // SAFETY: AVX2 is present (checked by use_avx2); the kernel reads and writes 8 floats per
        // element of slices whose lengths it asserts.
        let (a, b, c) = unsafe {
            avx2::qkx_levels_and_sums(
                nmax,
                xt.as_flattened(),
                wt.as_flattened(),
                iscale.as_slice(),
                min.as_slice(),
                laux.as_flattened_mut(),
            )
        };
        let widen = |v: [f32; 8]| std::array::from_fn(|k| v[k]);
        return (widen(a), widen(b), widen(c));
    }
    let mut sum_l = [0f32; LANES];
    let mut sum_l2 = [0f32; LANES];
    let mut sum_xl = [0f32; LANES];
    for i in 0..xt.len() {
        let (x, w) = (&xt[i], &wt[i]);
        let mut qf = [0f32; LANES];
        for k in 0..LANES {
            qf[k] = nearest_int(iscale[k] * (x[k] - min[k])).clamp(0, nmax) as f32;
        }
        laux[i] = qf;
        for k in 0..LANES {
            sum_l[k] += w[k] * qf[k];
            sum_l2[k] += w[k] * qf[k] * qf[k];
            sum_xl[k] += w[k] * qf[k] * x[k];
        }
    }
    (sum_l, sum_l2, sum_xl)
}

/// The error pass of the `qkx` search, per lane: `Σ w·e` with `d = scale·l + min − x` and `e = |d|`
/// (`use_mad`) or `d²`, in element order.
#[inline(always)]
fn qkx_weighted_error<const LANES: usize>(
    xt: &[[f32; LANES]],
    wt: &[[f32; LANES]],
    laux: &[[f32; LANES]],
    scale: &[f32; LANES],
    min: &[f32; LANES],
    use_mad: bool,
) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    if LANES == 8 && super::simd::use_avx2() {
        // SAFETY: as in qkx_levels_and_sums.
        let e = unsafe {
            avx2::qkx_weighted_error(
                xt.as_flattened(),
                wt.as_flattened(),
                laux.as_flattened(),
                scale.as_slice(),
                min.as_slice(),
                use_mad,
            )
        };
        return std::array::from_fn(|k| e[k]);
    }
    let mut error = [0f32; LANES];
    for i in 0..xt.len() {
        let (x, w) = (&xt[i], &wt[i]);
        for k in 0..LANES {
            let diff = scale[k] * laux[i][k] + min[k] - x[k];
            let diff = if use_mad { diff.abs() } else { diff * diff };
            error[k] += w[k] * diff;
        }
    }
    error
}

/// Hand-written AVX2 forms of the two `qkx` passes for 8 lanes: the compiler keeps the portable
/// loops' 24 running sums in scalar registers, these keep them in three vectors. Every lane does the
/// portable loop's operations in its order (IEEE multiply, add, subtract; no FMA), so the bits match.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `nearest_int` on 8 lanes, then clamped to `0..=nmax`, as floats.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nearest_clamped(v: __m256, nmax: __m256i) -> __m256 {
        let magic = _mm256_set1_ps(12_582_912.0);
        let bits = _mm256_castps_si256(_mm256_add_ps(v, magic));
        let q = _mm256_sub_epi32(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x0040_0000),
        );
        let q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), nmax);
        _mm256_cvtepi32_ps(q)
    }

    /// # Safety
    /// The CPU must support AVX2. `xt`, `wt` and `laux` hold `8 n` floats, `iscale` and `min` 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn qkx_levels_and_sums(
        nmax: i32,
        xt: &[f32],
        wt: &[f32],
        iscale: &[f32],
        min: &[f32],
        laux: &mut [f32],
    ) -> ([f32; 8], [f32; 8], [f32; 8]) {
        assert!(
            xt.len().is_multiple_of(8) && wt.len() == xt.len() && laux.len() == xt.len(),
            "lane slices"
        );
        assert!(iscale.len() == 8 && min.len() == 8, "lane parameters");
        // SAFETY (all loads and stores below): every pointer is 8 floats inside a slice whose
        // length was asserted above; unaligned access is allowed by loadu/storeu.
        unsafe {
            let isc = _mm256_loadu_ps(iscale.as_ptr());
            let mn = _mm256_loadu_ps(min.as_ptr());
            let nmax = _mm256_set1_epi32(nmax);
            let mut sum_l = _mm256_setzero_ps();
            let mut sum_l2 = _mm256_setzero_ps();
            let mut sum_xl = _mm256_setzero_ps();
            for i in (0..xt.len()).step_by(8) {
                let x = _mm256_loadu_ps(xt.as_ptr().add(i));
                let w = _mm256_loadu_ps(wt.as_ptr().add(i));
                let q = nearest_clamped(_mm256_mul_ps(isc, _mm256_sub_ps(x, mn)), nmax);
                _mm256_storeu_ps(laux.as_mut_ptr().add(i), q);
                let wq = _mm256_mul_ps(w, q);
                sum_l = _mm256_add_ps(sum_l, wq);
                sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wq, q));
                sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wq, x));
            }
            let mut out = [[0f32; 8]; 3];
            _mm256_storeu_ps(out[0].as_mut_ptr(), sum_l);
            _mm256_storeu_ps(out[1].as_mut_ptr(), sum_l2);
            _mm256_storeu_ps(out[2].as_mut_ptr(), sum_xl);
            (out[0], out[1], out[2])
        }
    }

    /// # Safety
    /// The CPU must support AVX2. `xt`, `wt` and `laux` hold `8 n` floats, `scale` and `min` 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn qkx_weighted_error(
        xt: &[f32],
        wt: &[f32],
        laux: &[f32],
        scale: &[f32],
        min: &[f32],
        use_mad: bool,
    ) -> [f32; 8] {
        assert!(
            xt.len().is_multiple_of(8) && wt.len() == xt.len() && laux.len() == xt.len(),
            "lane slices"
        );
        assert!(scale.len() == 8 && min.len() == 8, "lane parameters");
        // SAFETY: as in qkx_levels_and_sums.
        unsafe {
            let sc = _mm256_loadu_ps(scale.as_ptr());
            let mn = _mm256_loadu_ps(min.as_ptr());
            let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut error = _mm256_setzero_ps();
            for i in (0..xt.len()).step_by(8) {
                let x = _mm256_loadu_ps(xt.as_ptr().add(i));
                let w = _mm256_loadu_ps(wt.as_ptr().add(i));
                let l = _mm256_loadu_ps(laux.as_ptr().add(i));
                let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(sc, l), mn), x);
                let diff = if use_mad {
                    _mm256_and_ps(diff, abs_mask)
                } else {
                    _mm256_mul_ps(diff, diff)
                };
                error = _mm256_add_ps(error, _mm256_mul_ps(w, diff));
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), error);
            out
        }
    }
}

/// [`make_qkx2_quants`] (`flat_is_le` false) or [`make_qkx3_quants`] with given weights (`flat_is_le`
/// true) run on `LANES` independent groups in lockstep, one group per lane: `xt[i][k]` is value `i` of
/// group `k`, `wt` its weight, `lt` receives the levels (same layout) and `laux` is scratch (levels as
/// floats: narrowing to bytes in the hot loop keeps the compiler from vectorizing it). Each lane
/// performs exactly the scalar function's operations in its order, so results are bit-identical;
/// branches become per-lane selects, which lets the compiler keep the lanes in SIMD registers.
/// Returns `(scales, the_mins)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn make_qkx_quants_lanes<const LANES: usize>(
    nmax: i32,
    xt: &[[f32; LANES]],
    wt: &[[f32; LANES]],
    lt: &mut [[u8; LANES]],
    laux: &mut [[f32; LANES]],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    flat_is_le: bool,
) -> ([f32; LANES], [f32; LANES]) {
    let n = xt.len();
    assert!(n >= 1 && wt.len() == n && lt.len() == n && laux.len() == n);
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; LANES];
    for k in 0..LANES {
        sum_x[k] = sum_w[k] * xt[0][k];
    }
    for i in 1..n {
        let (x, w) = (&xt[i], &wt[i]);
        for k in 0..LANES {
            min[k] = if x[k] < min[k] { x[k] } else { min[k] };
            max[k] = if x[k] > max[k] { x[k] } else { max[k] };
            sum_w[k] += w[k];
            sum_x[k] += w[k] * x[k];
        }
    }
    let mut flat = [false; LANES];
    let mut flat_min = [0f32; LANES];
    for k in 0..LANES {
        if min[k] > 0.0 {
            min[k] = 0.0;
        }
        flat[k] = if flat_is_le {
            max[k] <= min[k]
        } else {
            max[k] == min[k]
        };
        flat_min[k] = min[k];
    }
    let nmaxf = nmax as f32;
    let mut iscale = [0f32; LANES];
    let mut scale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = nmaxf / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    qkx_levels_and_sums(nmax, xt, wt, &iscale, &min, laux);
    for i in 0..n {
        for k in 0..LANES {
            lt[i][k] = laux[i][k] as u8;
        }
    }
    let mut best_error = qkx_weighted_error(xt, wt, laux, &scale, &min, use_mad);
    if nstep >= 1 {
        for is in 0..=nstep {
            let factor = rmin + rdelta * is as f32 + nmaxf;
            for k in 0..LANES {
                iscale[k] = factor / (max[k] - min[k]);
            }
            let (sum_l, sum_l2, sum_xl) = qkx_levels_and_sums(nmax, xt, wt, &iscale, &min, laux);
            let mut this_scale = [0f32; LANES];
            let mut this_min = [0f32; LANES];
            let mut d_positive = [false; LANES];
            for k in 0..LANES {
                let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
                d_positive[k] = d > 0.0;
                let ts = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
                let tm = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
                let clamp_min = tm > 0.0;
                this_min[k] = if clamp_min { 0.0 } else { tm };
                this_scale[k] = if clamp_min { sum_xl[k] / sum_l2[k] } else { ts };
            }
            let cur_error = qkx_weighted_error(xt, wt, laux, &this_scale, &this_min, use_mad);
            let mut accept = [false; LANES];
            for k in 0..LANES {
                accept[k] = d_positive[k] && cur_error[k] < best_error[k];
                if accept[k] {
                    best_error[k] = cur_error[k];
                    scale[k] = this_scale[k];
                    min[k] = this_min[k];
                }
            }
            if accept.iter().any(|&a| a) {
                for i in 0..n {
                    for k in 0..LANES {
                        lt[i][k] = if accept[k] {
                            laux[i][k] as u8
                        } else {
                            lt[i][k]
                        };
                    }
                }
            }
        }
    }
    for k in 0..LANES {
        if flat[k] {
            scale[k] = 0.0;
            min[k] = flat_min[k];
            for l in lt.iter_mut() {
                l[k] = 0;
            }
        }
    }
    let mut the_min = [0f32; LANES];
    for k in 0..LANES {
        the_min[k] = -min[k];
    }
    (scale, the_min)
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
mod tests {
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
    fn group(n: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
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

    fn check_lanes(
        groups: &[(Vec<f32>, Vec<f32>)],
        qkx3: bool,
        nmax: i32,
        params: (f32, f32, i32, bool),
    ) {
        const LANES: usize = 8;
        let n = groups[0].0.len();
        let (rmin, rdelta, nstep, use_mad) = params;
        let mut xt = vec![[0f32; LANES]; n];
        let mut wt = vec![[0f32; LANES]; n];
        for (k, (x, w)) in groups.iter().enumerate() {
            for i in 0..n {
                xt[i][k] = x[i];
                wt[i][k] = w[i];
            }
        }
        let mut lt = vec![[0u8; LANES]; n];
        let mut laux = vec![[0f32; LANES]; n];
        let (scales, mins) = make_qkx_quants_lanes(
            nmax, &xt, &wt, &mut lt, &mut laux, rmin, rdelta, nstep, use_mad, qkx3,
        );
        for (k, (x, w)) in groups.iter().enumerate() {
            let mut l = vec![0u8; n];
            let mut laux = vec![0u8; n];
            let (scale, min) = if qkx3 {
                make_qkx3_quants(
                    nmax,
                    x,
                    Some(w),
                    &mut l,
                    &mut laux,
                    rmin,
                    rdelta,
                    nstep,
                    use_mad,
                )
            } else {
                make_qkx2_quants(nmax, x, w, &mut l, &mut laux, rmin, rdelta, nstep, use_mad)
            };
            assert_eq!(scales[k].to_bits(), scale.to_bits(), "lane {k} scale");
            assert_eq!(mins[k].to_bits(), min.to_bits(), "lane {k} min");
            let lane: Vec<u8> = lt.iter().map(|row| row[k]).collect();
            assert_eq!(lane, l, "lane {k} levels");
        }
    }

    proptest! {
        #[test]
        fn lanes_equal_scalar_qkx2_q4k(groups in prop::collection::vec(group(32), 8)) {
            check_lanes(&groups, false, 15, (-1.0, 0.1, 20, false));
        }

        #[test]
        fn lanes_equal_scalar_qkx2_q2k(groups in prop::collection::vec(group(16), 8)) {
            check_lanes(&groups, false, 3, (-0.5, 0.1, 15, true));
        }

        #[test]
        fn lanes_equal_scalar_qkx3(groups in prop::collection::vec(group(32), 8)) {
            check_lanes(&groups, true, 31, (-0.9, 0.05, 36, false));
        }
    }

    fn check_qx_lanes(groups: &[(Vec<f32>, Vec<f32>)], nmax: i32, given_weights: bool) {
        const LANES: usize = 16;
        let n = groups[0].0.len();
        let mut xt = vec![[0f32; LANES]; n];
        let mut wt = vec![[0f32; LANES]; n];
        for (k, (x, w)) in groups.iter().enumerate() {
            for i in 0..n {
                xt[i][k] = x[i];
                wt[i][k] = if given_weights { w[i] } else { x[i] * x[i] };
            }
        }
        let mut lt = vec![[0i8; LANES]; n];
        let mut laux = vec![[0f32; LANES]; n];
        let scales = make_qx_quants_lanes(nmax, &xt, &wt, &mut lt, &mut laux);
        for (k, (x, w)) in groups.iter().enumerate() {
            let mut l = vec![0i8; n];
            let scale = make_qx_quants(nmax, x, &mut l, 1, given_weights.then_some(&w[..]));
            assert_eq!(scales[k].to_bits(), scale.to_bits(), "lane {k} scale");
            let lane: Vec<i8> = lt.iter().map(|row| row[k]).collect();
            assert_eq!(lane, l, "lane {k} levels");
        }
    }

    proptest! {
        #[test]
        fn lanes_equal_scalar_qx_q6k(groups in prop::collection::vec(group(16), 16)) {
            check_qx_lanes(&groups, 32, false);
        }

        #[test]
        fn lanes_equal_scalar_qx_weighted(groups in prop::collection::vec(group(16), 16)) {
            check_qx_lanes(&groups, 4, true);
        }
    }

    proptest! {
        #[test]
        fn lanes_equal_scalar_q3(groups in prop::collection::vec(group(16), 16)) {
            const LANES: usize = 16;
            let mut xt = vec![[0f32; LANES]; 16];
            for (k, (x, _)) in groups.iter().enumerate() {
                for i in 0..16 {
                    xt[i][k] = x[i];
                }
            }
            let mut lt = vec![[0i8; LANES]; 16];
            let mut laux = vec![[0f32; LANES]; 16];
            let scales = make_q3_quants_lanes(4, &xt, &mut lt, &mut laux);
            for (k, (x, _)) in groups.iter().enumerate() {
                let mut l = vec![0i8; 16];
                let scale = make_q3_quants(4, x, &mut l, true);
                prop_assert_eq!(scales[k].to_bits(), scale.to_bits(), "lane {} scale", k);
                let lane: Vec<i8> = lt.iter().map(|row| row[k]).collect();
                prop_assert_eq!(lane, l, "lane {} levels", k);
            }
        }
    }
}
