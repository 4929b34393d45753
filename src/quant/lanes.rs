//! The scale searches of [`super::search`] run on many independent groups at once, one group per
//! SIMD lane, bit-identical lane by lane to the scalar functions.
//!
//! A group is a sub-block of a super-block (K-quants) or a whole block (legacy types); consecutive
//! groups of a row sit in consecutive lanes, so one pass covers several super-blocks when the vector
//! is wide enough ([`in_passes`]). Each lane performs exactly the scalar function's operations in its
//! order; data-dependent branches become per-lane selects and a loop runs until no lane needs it.
//!
//! What is saved against a plain lane-by-lane transcription, without changing one result:
//! - The searches never copy levels on acceptance. They remember, per lane, the scale parameters
//!   the accepted levels were computed from, and [`QkxFit`] / [`QxFit`] recompute those levels with
//!   the same operations when (and where) a caller needs them: the K-quant codecs requantize every
//!   sub-block whose scale is non-zero anyway, so the search's levels are usually never needed.
//! - Levels are rounded with one vector rounding instruction ([`F32s::round_ne`]) instead of ggml's
//!   integer trick when the lane's values provably lie where the two agree (`|v| <= 4194303`, no
//!   NaN). The bound is checked per pass from the group's extremes: `v = iscale·(x − min)` is
//!   monotone in `x` under IEEE rounding, so it lies between its values at the group's smallest and
//!   largest `x`. Passes where some lane is out of range take the exact integer form.
//! - `make_qx_quants` tries 19 scales that do not depend on each other: their sums are computed in
//!   one pass over the data per pair of scales, and the accept decisions then made in ggml's order.

// Index loops walk several lane arrays in step, as the C walks its arrays.
#![allow(clippy::needless_range_loop)]

use super::search::GROUP_MAX_EPS;
use super::simd::{F32s, Level, Mask, NEAREST_INT_EXACT};

/// Values of one pass at most: 32 lanes of 32 values (four Q4_K super-blocks with AVX-512).
pub(crate) const MAX_PASS_VALUES: usize = 1024;
/// Encoded bytes of one pass at most (32 Q5_1 blocks, four Q5_K super-blocks).
pub(crate) const MAX_PASS_BYTES: usize = 1024;

/// `x` (`V::LANES` groups of `G` consecutive values) in lanes: element `i` of the result holds value
/// `i` of every group, group `k` in lane `k`.
#[inline(always)]
pub(crate) fn to_lanes<V: F32s, const G: usize>(x: &[f32]) -> [V; G] {
    assert!(x.len() == V::LANES * G, "lane layout");
    let mut out = [V::splat(0.0); G];
    for i in 0..G {
        out[i] = V::gather(&x[i..], G);
    }
    out
}

/// The inverse of [`to_lanes`] for levels (small non-negative integers held as floats), into bytes.
#[inline(always)]
pub(crate) fn levels_from_lanes<V: F32s, const G: usize>(lt: &[V; G], out: &mut [u8]) {
    let lanes = V::LANES;
    assert!(
        out.len() == lanes * G && lanes * G <= MAX_PASS_VALUES,
        "lane layout"
    );
    let mut flat = [0f32; MAX_PASS_VALUES];
    for (i, v) in lt.iter().enumerate() {
        v.store(&mut flat[i * lanes..]);
    }
    for (k, group) in out.chunks_exact_mut(G).enumerate() {
        for (i, o) in group.iter_mut().enumerate() {
            *o = flat[i * lanes + k] as u8;
        }
    }
}

/// Every lane of `v`, lanes past `V::LANES` zero.
#[inline(always)]
pub(crate) fn lanes_of<V: F32s>(v: V) -> [f32; 32] {
    let mut a = [0f32; 32];
    v.store(&mut a);
    a
}

/// One lane of `v`.
#[inline(always)]
fn lane<V: F32s>(v: V, k: usize) -> f32 {
    lanes_of(v)[k]
}

/// Whether lane `k` of `m` is set.
#[inline(always)]
fn lane_set<V: F32s>(m: V::Mask, k: usize) -> bool {
    lane(V::select(m, V::splat(1.0), V::splat(0.0)), k) != 0.0
}

/// A codec's work on one pass of blocks: `x` holds `V::LANES` groups' worth of values, `y` their
/// bytes, `weights` one importance weight per value when the codec is weighted. A trait with an
/// `#[inline(always)]` method rather than a closure, so that [`in_passes`] calls it statically and the
/// whole pass is compiled for the SIMD level of the row function around it (see
/// [`super::simd::simd_dispatch`]).
pub(crate) trait Pass {
    fn pass<L: Level>(&self, x: &[f32], y: &mut [u8], weights: Option<&[f32]>);
}

/// Runs `p` over `x` and `y` in pieces of `pass_values` values and `pass_bytes` bytes (whole blocks),
/// with the matching piece of `weights`; the last, shorter piece is padded with zeros (zero values,
/// zero weights: a flat group in every search) and only its real bytes are kept.
#[inline(always)]
pub(crate) fn in_passes<L: Level, P: Pass>(
    x: &[f32],
    y: &mut [u8],
    weights: Option<&[f32]>,
    pass_values: usize,
    pass_bytes: usize,
    p: &P,
) {
    assert!(pass_values <= MAX_PASS_VALUES && pass_bytes <= MAX_PASS_BYTES);
    if let Some(w) = weights {
        assert_eq!(w.len(), x.len(), "one weight per value");
    }
    let full = x.len() / pass_values;
    let (x_full, x_rest) = x.split_at(full * pass_values);
    let (y_full, y_rest) = y.split_at_mut(full * pass_bytes);
    for (i, (xs, ys)) in x_full
        .chunks_exact(pass_values)
        .zip(y_full.chunks_exact_mut(pass_bytes))
        .enumerate()
    {
        let ws = weights.map(|w| &w[i * pass_values..][..pass_values]);
        p.pass::<L>(xs, ys, ws);
    }
    if !x_rest.is_empty() {
        let mut xp = [0f32; MAX_PASS_VALUES];
        xp[..x_rest.len()].copy_from_slice(x_rest);
        let mut wp = [0f32; MAX_PASS_VALUES];
        if let Some(w) = weights {
            wp[..x_rest.len()].copy_from_slice(&w[full * pass_values..]);
        }
        let mut yp = [0u8; MAX_PASS_BYTES];
        let ws = weights.map(|_| &wp[..pass_values]);
        p.pass::<L>(&xp[..pass_values], &mut yp[..pass_bytes], ws);
        let n = y_rest.len();
        y_rest.copy_from_slice(&yp[..n]);
    }
}

/// The final levels of a run of values against one stored scale, as every K-quant computes them:
/// `out[i] = offset + clamp(nearest_int((x[i] + add) / d), lo, hi)` (or `x[i] / d` without `add`),
/// `W::LANES` values at a time; `x.len()` is a multiple of `W::LANES`.
#[inline(always)]
pub(crate) fn quantize_run<W: F32s>(
    x: &[f32],
    add: Option<f32>,
    d: f32,
    lo: i32,
    hi: i32,
    offset: i32,
    out: &mut [u8],
) {
    assert!(
        x.len().is_multiple_of(W::LANES) && out.len() == x.len(),
        "whole runs"
    );
    let dv = W::splat(d);
    let off = W::splat(offset as f32);
    for (xs, o) in x.chunks_exact(W::LANES).zip(out.chunks_exact_mut(W::LANES)) {
        let v = W::load(xs);
        let v = match add {
            Some(a) => (v + W::splat(a)) / dv,
            None => v / dv,
        };
        (v.nearest_clamp(lo, hi) + off).store_levels(o);
    }
}

// ===================================== qkx =====================================

/// The parameters of one `make_qkx2_quants` / `make_qkx3_quants` call site.
#[derive(Clone, Copy)]
pub(crate) struct QkxParams {
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
    /// Absolute instead of squared error.
    pub use_mad: bool,
    /// `make_qkx3_quants`' flat test (`max <= min`) instead of `make_qkx2_quants`' (`max == min`).
    pub flat_is_le: bool,
}

/// What a `qkx` search found for each lane: the returned scale and `the_min`, and what the levels
/// it would have left in `L` were computed from.
pub(crate) struct QkxFit<V: F32s> {
    pub scale: V,
    pub the_min: V,
    nmax: i32,
    /// The levels of an accepted step are `clamp(nearest_int(iscale·(x − lmin)), 0, nmax)`, with
    /// that step's `iscale` and the `min` it started from; flat lanes have all-zero levels.
    iscale: V,
    lmin: V,
    flat: V::Mask,
}

impl<V: F32s> QkxFit<V> {
    /// The levels ggml's search leaves in `L`, for every lane, as floats.
    #[inline(always)]
    pub fn levels(&self, xt: &[V], out: &mut [V]) {
        for (o, &x) in out.iter_mut().zip(xt) {
            let l = (self.iscale * (x - self.lmin)).nearest_clamp(0, self.nmax);
            *o = V::select(self.flat, V::splat(0.0), l);
        }
    }

    /// The levels ggml's search leaves in `L` for lane `k`, whose group is `x`.
    pub fn lane_levels(&self, k: usize, x: &[f32], out: &mut [u8]) {
        if lane_set::<V>(self.flat, k) {
            out[..x.len()].fill(0);
            return;
        }
        let (iscale, lmin) = (lane(self.iscale, k), lane(self.lmin, k));
        for (o, &v) in out.iter_mut().zip(x) {
            *o = super::search::nearest_int(iscale * (v - lmin)).clamp(0, self.nmax) as u8;
        }
    }
}

/// The levels of a `qkx` pass for `v = iscale·(x − min)`: the fast rounding when the pass is known to
/// be in range (`FAST`), ggml's integer trick otherwise. Both give the same floats (`+0.0` for zero:
/// `max_c(-0.0, +0.0)` is the `+0.0`).
#[inline(always)]
fn qkx_level<V: F32s, const FAST: bool>(v: V, nmax: i32, nmaxv: V) -> V {
    if FAST {
        v.round_ne().max_c(V::splat(0.0)).min_c(nmaxv)
    } else {
        v.nearest_clamp(0, nmax)
    }
}

/// Whether every lane of a `qkx` pass at `iscale` from `min` may take the fast rounding: its values
/// `iscale·(x − min)` all lie within `±NEAREST_INT_EXACT`, shown by its extremes `xmin` and `max`, and
/// its group holds no NaN. Lanes in `skip` (flat groups, whose levels are discarded) do not count.
#[inline(always)]
fn fast_ok<V: F32s>(iscale: V, xmin: V, min: V, max: V, nan: V::Mask, skip: V::Mask) -> bool {
    let lim = V::splat(NEAREST_INT_EXACT);
    let lo = (iscale * (xmin - min)).abs();
    let hi = (iscale * (max - min)).abs();
    let ok = skip | (!nan & lo.le(lim) & hi.le(lim));
    !(!ok).any()
}

/// The first error of the search: levels at `iscale`, error `Σ w·e(scale·l + min − x)`.
#[inline(always)]
fn qkx_first_error<V: F32s, const FAST: bool>(
    nmax: i32,
    xt: &[V],
    wt: &[V],
    iscale: V,
    scale: V,
    min: V,
    use_mad: bool,
) -> V {
    let nmaxv = V::splat(nmax as f32);
    let mut error = V::splat(0.0);
    for i in 0..xt.len() {
        let (x, w) = (xt[i], wt[i]);
        let l = qkx_level::<V, FAST>(iscale * (x - min), nmax, nmaxv);
        let diff = scale * l + min - x;
        let diff = if use_mad { diff.abs() } else { diff * diff };
        error = error + w * diff;
    }
    error
}

/// The level pass of one step: levels into `laux`, and `Σ w·l`, `Σ w·l·l`, `Σ w·l·x` in order.
#[inline(always)]
fn qkx_sums<V: F32s, const FAST: bool>(
    nmax: i32,
    xt: &[V],
    wt: &[V],
    iscale: V,
    min: V,
    laux: &mut [V],
) -> (V, V, V) {
    let nmaxv = V::splat(nmax as f32);
    let zero = V::splat(0.0);
    let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
    for i in 0..xt.len() {
        let (x, w) = (xt[i], wt[i]);
        let l = qkx_level::<V, FAST>(iscale * (x - min), nmax, nmaxv);
        laux[i] = l;
        let wl = w * l;
        sum_l = sum_l + wl;
        sum_l2 = sum_l2 + wl * l;
        sum_xl = sum_xl + wl * x;
    }
    (sum_l, sum_l2, sum_xl)
}

/// The error pass of one step over the levels in `laux`.
#[inline(always)]
fn qkx_error<V: F32s>(xt: &[V], wt: &[V], laux: &[V], scale: V, min: V, use_mad: bool) -> V {
    let mut error = V::splat(0.0);
    for i in 0..xt.len() {
        let (x, w) = (xt[i], wt[i]);
        let diff = scale * laux[i] + min - x;
        let diff = if use_mad { diff.abs() } else { diff * diff };
        error = error + w * diff;
    }
    error
}

/// [`super::search::make_qkx2_quants`] (`flat_is_le` false) or
/// [`super::search::make_qkx3_quants`] with given weights (`flat_is_le` true) on `V::LANES` groups:
/// `xt[i]` holds value `i` of every group, `wt[i]` its weights (see [`to_lanes`]); `laux` is scratch
/// of the same length.
#[inline(always)]
pub(crate) fn qkx_fit<V: F32s>(
    nmax: i32,
    xt: &[V],
    wt: &[V],
    laux: &mut [V],
    p: QkxParams,
) -> QkxFit<V> {
    let n = xt.len();
    assert!(n >= 1 && wt.len() == n && laux.len() == n, "group lengths");
    let zero = V::splat(0.0);
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = sum_w * xt[0];
    let mut nan = xt[0].ne(xt[0]);
    for i in 1..n {
        let (x, w) = (xt[i], wt[i]);
        min = x.min_c(min);
        max = x.max_c(max);
        sum_w = sum_w + w;
        sum_x = sum_x + w * x;
        nan = nan | x.ne(x);
    }
    let xmin = min;
    min = V::select(min.gt(zero), zero, min);
    let flat = if p.flat_is_le {
        max.le(min)
    } else {
        max.eq(min)
    };
    let flat_min = min;

    let nmaxf = nmax as f32;
    let mut iscale = V::splat(nmaxf) / (max - min);
    let mut scale = V::splat(1.0) / iscale;
    let (mut liscale, mut lmin) = (iscale, min);
    let mut best_error = if fast_ok(iscale, xmin, min, max, nan, flat) {
        qkx_first_error::<V, true>(nmax, xt, wt, iscale, scale, min, p.use_mad)
    } else {
        qkx_first_error::<V, false>(nmax, xt, wt, iscale, scale, min, p.use_mad)
    };
    if p.nstep >= 1 {
        for is in 0..=p.nstep {
            let factor = p.rmin + p.rdelta * is as f32 + nmaxf;
            iscale = V::splat(factor) / (max - min);
            let (sum_l, sum_l2, sum_xl) = if fast_ok(iscale, xmin, min, max, nan, flat) {
                qkx_sums::<V, true>(nmax, xt, wt, iscale, min, laux)
            } else {
                qkx_sums::<V, false>(nmax, xt, wt, iscale, min, laux)
            };
            let d = sum_w * sum_l2 - sum_l * sum_l;
            let d_positive = d.gt(zero);
            if !d_positive.any() {
                continue;
            }
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            let clamp_min = this_min.gt(zero);
            if clamp_min.any() {
                this_min = V::select(clamp_min, zero, this_min);
                this_scale = V::select(clamp_min, sum_xl / sum_l2, this_scale);
            }
            let cur_error = qkx_error(xt, wt, laux, this_scale, this_min, p.use_mad);
            let accept = d_positive & cur_error.lt(best_error);
            liscale = V::select(accept, iscale, liscale);
            lmin = V::select(accept, min, lmin);
            best_error = V::select(accept, cur_error, best_error);
            scale = V::select(accept, this_scale, scale);
            min = V::select(accept, this_min, min);
        }
    }
    scale = V::select(flat, zero, scale);
    min = V::select(flat, flat_min, min);
    QkxFit {
        scale,
        the_min: -min,
        nmax,
        iscale: liscale,
        lmin,
        flat,
    }
}

// ===================================== qx =====================================

/// What a `make_qx_quants` search found for each lane: the scale, and what its levels come from.
pub(crate) struct QxFit<V: F32s> {
    pub scale: V,
    nmax: i32,
    /// Levels are `nmax + clamp(nearest_int(iscale·x), -nmax, nmax - 1)`; all zero in `zero` lanes.
    iscale: V,
    zero: V::Mask,
}

impl<V: F32s> QxFit<V> {
    /// The (offset) levels ggml's search leaves in `L`, for every lane, as floats.
    #[inline(always)]
    pub fn levels(&self, xt: &[V], out: &mut [V]) {
        let nmaxv = V::splat(self.nmax as f32);
        for (o, &x) in out.iter_mut().zip(xt) {
            let l = (self.iscale * x).nearest_clamp(-self.nmax, self.nmax - 1) + nmaxv;
            *o = V::select(self.zero, V::splat(0.0), l);
        }
    }

    /// The (offset) levels ggml's search leaves in `L` for lane `k`, whose group is `x`.
    pub fn lane_levels(&self, k: usize, x: &[f32], out: &mut [i8]) {
        if lane_set::<V>(self.zero, k) {
            out[..x.len()].fill(0);
            return;
        }
        let iscale = lane(self.iscale, k);
        let nmax = self.nmax;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (nmax + super::search::nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    }
}

/// Scales tried per pass over the data by [`qx_fit`].
const QX_FUSED: usize = 2;

/// `Σ w·x·l` and `Σ w·l·l` (ggml's `sumlx`, `suml2`) for `K` scales in one pass, `wxt[i] = wt[i]·xt[i]`
/// precomputed (ggml's `w*x[i]*l` is `(w*x[i])*l`).
#[inline(always)]
fn qx_sums<V: F32s, const K: usize, const FAST: bool>(
    nmax: i32,
    xt: &[V],
    wt: &[V],
    wxt: &[V],
    iscale: [V; K],
) -> ([V; K], [V; K]) {
    let zero = V::splat(0.0);
    let (lo, hi) = (V::splat(-nmax as f32), V::splat((nmax - 1) as f32));
    let magic = V::splat(12_582_912.0);
    let mut sumlx = [zero; K];
    let mut suml2 = [zero; K];
    for i in 0..xt.len() {
        let (x, w, wx) = (xt[i], wt[i], wxt[i]);
        for s in 0..K {
            let v = iscale[s] * x;
            let l = if FAST {
                // (v + 1.5·2²³) − 1.5·2²³ rounds ties to even without producing -0.0.
                ((v + magic) - magic).min_c(hi).max_c(lo)
            } else {
                v.nearest_clamp(-nmax, nmax - 1)
            };
            sumlx[s] = sumlx[s] + wx * l;
            suml2[s] = suml2[s] + w * l * l;
        }
    }
    (sumlx, suml2)
}

/// Whether every lane of a `make_qx_quants` pass at each of `iscales` may take the fast rounding:
/// `|iscale·x| <= |iscale|·amax` within `±NEAREST_INT_EXACT` and no NaN in the group. Lanes in `skip`
/// (all-zero groups, whose levels are discarded) do not count.
#[inline(always)]
fn qx_fast_ok<V: F32s>(iscales: &[V], amax: V, nan: V::Mask, skip: V::Mask) -> bool {
    let lim = V::splat(NEAREST_INT_EXACT);
    let mut ok = !nan;
    for &is in iscales {
        ok = ok & (is.abs() * amax).le(lim);
    }
    !(!(ok | skip)).any()
}

/// [`super::search::make_qx_quants`] with `rmse_type` 1 and explicit weights (`x²` for ggml's
/// `qw == NULL`, the value it computes inline) on `V::LANES` groups of at most 32 values (layout as
/// [`to_lanes`]). Returns the scales and what the levels come from.
#[inline(always)]
pub(crate) fn qx_fit<V: F32s>(nmax: i32, xt: &[V], wt: &[V]) -> QxFit<V> {
    let n = xt.len();
    assert!(n <= 32 && wt.len() == n, "group lengths");
    let zero = V::splat(0.0);
    let mut max = zero;
    let mut amax = zero;
    let mut nan = zero.ne(zero);
    let mut wxt = [zero; 32];
    for i in 0..n {
        let x = xt[i];
        let ax = x.abs();
        let bigger = ax.gt(amax);
        amax = V::select(bigger, ax, amax);
        max = V::select(bigger, x, max);
        nan = nan | x.ne(x);
        wxt[i] = wt[i] * x;
    }
    let wxt = &wxt[..n];
    let zero_lane = amax.lt(V::splat(GROUP_MAX_EPS));
    let nmaxf = nmax as f32;
    // ggml's order: the plain scale first, then is = -9..=9 without 0; none depends on another.
    let mut iscales = [zero; 19];
    iscales[0] = V::splat(-nmax as f32) / max;
    let mut s = 1;
    for is in -9..=9 {
        if is != 0 {
            iscales[s] = V::splat(-(nmaxf + 0.1f32 * is as f32)) / max;
            s += 1;
        }
    }
    let mut sumlx = [zero; 19];
    let mut suml2 = [zero; 19];
    {
        let (a, b) = if qx_fast_ok(&iscales[..1], amax, nan, zero_lane) {
            qx_sums::<V, 1, true>(nmax, xt, wt, wxt, [iscales[0]])
        } else {
            qx_sums::<V, 1, false>(nmax, xt, wt, wxt, [iscales[0]])
        };
        sumlx[0] = a[0];
        suml2[0] = b[0];
    }
    for s0 in (1..19).step_by(QX_FUSED) {
        let mut group = [zero; QX_FUSED];
        group.copy_from_slice(&iscales[s0..s0 + QX_FUSED]);
        let (a, b) = if qx_fast_ok(&group, amax, nan, zero_lane) {
            qx_sums::<V, QX_FUSED, true>(nmax, xt, wt, wxt, group)
        } else {
            qx_sums::<V, QX_FUSED, false>(nmax, xt, wt, wxt, group)
        };
        sumlx[s0..s0 + QX_FUSED].copy_from_slice(&a);
        suml2[s0..s0 + QX_FUSED].copy_from_slice(&b);
    }
    let mut scale = V::select(suml2[0].ne(zero), sumlx[0] / suml2[0], zero);
    let mut best = scale * sumlx[0];
    let mut liscale = iscales[0];
    for s in 1..19 {
        let accept = suml2[s].gt(zero) & (sumlx[s] * sumlx[s]).gt(best * suml2[s]);
        let new_scale = sumlx[s] / suml2[s];
        scale = V::select(accept, new_scale, scale);
        best = V::select(accept, new_scale * sumlx[s], best);
        liscale = V::select(accept, iscales[s], liscale);
    }
    QxFit {
        scale: V::select(zero_lane, zero, scale),
        nmax,
        iscale: liscale,
        zero: zero_lane,
    }
}

// ===================================== q3 =====================================

/// What a `make_q3_quants` search found for each lane: the scale and the levels it leaves in `L`.
pub(crate) struct Q3Fit<V: F32s, const N: usize> {
    pub scale: V,
    nmax: i32,
    /// The signed levels, as floats.
    levels: [V; N],
    zero: V::Mask,
}

impl<V: F32s, const N: usize> Q3Fit<V, N> {
    /// The (offset) levels ggml's search leaves in `L` for lane `k`.
    pub fn lane_levels(&self, k: usize, out: &mut [i8]) {
        if lane_set::<V>(self.zero, k) {
            out[..N].fill(0);
            return;
        }
        for (o, l) in out.iter_mut().zip(&self.levels) {
            *o = (lane(*l, k) as i32 + self.nmax) as i8;
        }
    }
}

/// [`super::search::make_q3_quants`] with `do_rmse` on `V::LANES` groups of `N` values (layout as
/// [`to_lanes`]), including its coordinate descent, which a lane leaves (as the scalar loop breaks)
/// after the first sweep that changes nothing.
#[inline(always)]
pub(crate) fn q3_fit<V: F32s, const N: usize>(nmax: i32, xt: &[V; N]) -> Q3Fit<V, N> {
    let zero = V::splat(0.0);
    let mut max = zero;
    let mut amax = zero;
    // ggml's `w*x[i]*l` with `w = x[i]*x[i]`: `(w*x)` is the same product every time.
    let mut wt = [zero; N];
    let mut wxt = [zero; N];
    for i in 0..N {
        let x = xt[i];
        let ax = x.abs();
        let bigger = ax.gt(amax);
        amax = V::select(bigger, ax, amax);
        max = V::select(bigger, x, max);
        wt[i] = x * x;
        wxt[i] = wt[i] * x;
    }
    let iscale = V::splat(-nmax as f32) / max;
    let mut lf = [zero; N];
    let mut sumlx = zero;
    let mut suml2 = zero;
    for i in 0..N {
        let l = (iscale * xt[i]).nearest_clamp(-nmax, nmax - 1);
        lf[i] = l;
        sumlx = sumlx + wxt[i] * l;
        suml2 = suml2 + wt[i] * l * l;
    }
    let mut active = !zero.ne(zero);
    for _itry in 0..5 {
        let mut changed = zero.ne(zero);
        for i in 0..N {
            let (x, w, wx, l) = (xt[i], wt[i], wxt[i], lf[i]);
            let slx = sumlx - wx * l;
            let sl2 = suml2 - w * l * l;
            let new_l = (x * sl2 / slx).nearest_clamp(-nmax, nmax - 1);
            let slx2 = slx + wx * new_l;
            let sl22 = sl2 + w * new_l * new_l;
            let take = active
                & slx.gt(zero)
                & new_l.ne(l)
                & sl22.gt(zero)
                & (slx2 * slx2 * suml2).gt(sumlx * sumlx * sl22);
            lf[i] = V::select(take, new_l, l);
            sumlx = V::select(take, slx2, sumlx);
            suml2 = V::select(take, sl22, suml2);
            changed = changed | take;
        }
        active = active & changed;
        if !active.any() {
            break;
        }
    }
    let zero_lane = amax.lt(V::splat(GROUP_MAX_EPS));
    let scale = V::select(suml2.gt(zero), sumlx / suml2, zero);
    Q3Fit {
        scale: V::select(zero_lane, zero, scale),
        nmax,
        levels: lf,
        zero: zero_lane,
    }
}

#[cfg(test)]
mod tests {
    use super::super::search::{make_qkx2_quants, make_qkx3_quants, make_qx_quants};
    use super::super::simd::{simd_dispatch, with_level, SimdLevel};
    use super::*;
    use crate::quant::search::tests::group;
    use proptest::prelude::*;

    type Groups = Vec<(Vec<f32>, Vec<f32>)>;

    /// Scale bits, min bits (qkx) and levels of every group, from the lane search.
    type Found = Vec<(u32, u32, Vec<u8>)>;

    /// Scalar `make_qkx2_quants`/`make_qkx3_quants` on each group.
    fn qkx_scalar(groups: &Groups, nmax: i32, p: QkxParams) -> Found {
        groups
            .iter()
            .map(|(x, w)| {
                let n = x.len();
                let (mut l, mut laux) = (vec![0u8; n], vec![0u8; n]);
                let (s, m) = if p.flat_is_le {
                    make_qkx3_quants(
                        nmax,
                        x,
                        Some(w),
                        &mut l,
                        &mut laux,
                        p.rmin,
                        p.rdelta,
                        p.nstep,
                        p.use_mad,
                    )
                } else {
                    make_qkx2_quants(
                        nmax, x, w, &mut l, &mut laux, p.rmin, p.rdelta, p.nstep, p.use_mad,
                    )
                };
                (s.to_bits(), m.to_bits(), l)
            })
            .collect()
    }

    fn qkx_lanes_at<V: F32s>(groups: &Groups, nmax: i32, p: QkxParams) -> Found {
        let n = groups[0].0.len();
        let mut out = Vec::new();
        for chunk in groups.chunks(V::LANES) {
            // Groups beyond the chunk are zeros, as in a padded pass.
            let mut x = vec![0f32; V::LANES * n];
            let mut w = vec![0f32; V::LANES * n];
            for (k, (gx, gw)) in chunk.iter().enumerate() {
                x[k * n..][..n].copy_from_slice(gx);
                w[k * n..][..n].copy_from_slice(gw);
            }
            let (xt, wt) = (
                to_lanes::<V, 32>(&pad32(&x, n)),
                to_lanes::<V, 32>(&pad32(&w, n)),
            );
            let (xt, wt) = (&xt[..n], &wt[..n]);
            let mut laux = [V::splat(0.0); 32];
            let fit = qkx_fit(nmax, xt, wt, &mut laux[..n], p);
            let mut lt = [V::splat(0.0); 32];
            fit.levels(xt, &mut lt[..n]);
            let mut all = [V::splat(0.0); 32];
            all[..n].copy_from_slice(&lt[..n]);
            let mut levels = vec![0u8; V::LANES * 32];
            levels_from_lanes::<V, 32>(&all, &mut levels);
            for k in 0..chunk.len() {
                let mut lane_l = vec![0u8; n];
                fit.lane_levels(k, &x[k * n..][..n], &mut lane_l);
                let from_lanes: Vec<u8> = levels[k * 32..][..n].to_vec();
                assert_eq!(lane_l, from_lanes, "lane_levels and levels agree");
                out.push((
                    lane(fit.scale, k).to_bits(),
                    lane(fit.the_min, k).to_bits(),
                    lane_l,
                ));
            }
        }
        out
    }

    /// Groups of `n < 32` values re-spaced to 32 per group (the layout helpers are for `G = 32`).
    fn pad32(x: &[f32], n: usize) -> Vec<f32> {
        x.chunks_exact(n)
            .flat_map(|g| g.iter().copied().chain(std::iter::repeat_n(0.0, 32 - n)))
            .collect()
    }

    fn qx_lanes_at<V: F32s>(groups: &Groups, nmax: i32) -> Found {
        let n = groups[0].0.len();
        let mut out = Vec::new();
        for chunk in groups.chunks(V::LANES) {
            let mut x = vec![0f32; V::LANES * n];
            let mut w = vec![0f32; V::LANES * n];
            for (k, (gx, gw)) in chunk.iter().enumerate() {
                x[k * n..][..n].copy_from_slice(gx);
                w[k * n..][..n].copy_from_slice(gw);
            }
            let (xt, wt) = (
                to_lanes::<V, 32>(&pad32(&x, n)),
                to_lanes::<V, 32>(&pad32(&w, n)),
            );
            let fit = qx_fit(nmax, &xt[..n], &wt[..n]);
            let mut lt = [V::splat(0.0); 32];
            fit.levels(&xt[..n], &mut lt[..n]);
            let mut levels = vec![0u8; V::LANES * 32];
            levels_from_lanes::<V, 32>(&lt, &mut levels);
            for k in 0..chunk.len() {
                let mut lane_l = vec![0i8; n];
                fit.lane_levels(k, &x[k * n..][..n], &mut lane_l);
                let lane_l: Vec<u8> = lane_l.iter().map(|&v| v as u8).collect();
                assert_eq!(
                    lane_l,
                    levels[k * 32..][..n].to_vec(),
                    "lane_levels and levels"
                );
                out.push((lane(fit.scale, k).to_bits(), 0, lane_l));
            }
        }
        out
    }

    fn q3_lanes_at<V: F32s>(groups: &Groups) -> Found {
        let mut out = Vec::new();
        for chunk in groups.chunks(V::LANES) {
            let mut x = vec![0f32; V::LANES * 16];
            for (k, (gx, _)) in chunk.iter().enumerate() {
                x[k * 16..][..16].copy_from_slice(gx);
            }
            let xt = to_lanes::<V, 16>(&x);
            let fit = q3_fit::<V, 16>(4, &xt);
            for k in 0..chunk.len() {
                let mut l = [0i8; 16];
                fit.lane_levels(k, &mut l);
                let l: Vec<u8> = l.iter().map(|&v| v as u8).collect();
                out.push((lane(fit.scale, k).to_bits(), 0, l));
            }
        }
        out
    }

    simd_dispatch! {
        fn q3_lanes<L>(groups: &Groups) -> (Found, Found) {
            (q3_lanes_at::<L::X1>(groups), q3_lanes_at::<L::X2>(groups))
        }
    }

    fn check_q3(groups: &Groups) {
        let want: Found = groups
            .iter()
            .map(|(x, _)| {
                let mut l = vec![0i8; x.len()];
                let s = super::super::search::make_q3_quants(4, x, &mut l, true);
                (s.to_bits(), 0, l.iter().map(|&v| v as u8).collect())
            })
            .collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (x1, x2) = with_level(level, || q3_lanes(groups));
            assert_eq!(x1, want, "{level} one register");
            assert_eq!(x2, want, "{level} two registers");
        }
    }

    simd_dispatch! {
        fn qkx_lanes<L>(groups: &Groups, nmax: i32, p: QkxParams) -> (Found, Found) {
            (qkx_lanes_at::<L::X1>(groups, nmax, p), qkx_lanes_at::<L::X2>(groups, nmax, p))
        }
    }

    simd_dispatch! {
        fn qx_lanes<L>(groups: &Groups, nmax: i32) -> (Found, Found) {
            (qx_lanes_at::<L::X1>(groups, nmax), qx_lanes_at::<L::X2>(groups, nmax))
        }
    }

    fn check_qkx(groups: &Groups, nmax: i32, p: QkxParams) {
        let want = qkx_scalar(groups, nmax, p);
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (x1, x2) = with_level(level, || qkx_lanes(groups, nmax, p));
            assert_eq!(x1, want, "{level} one register");
            assert_eq!(x2, want, "{level} two registers");
        }
    }

    fn check_qx(groups: &Groups, nmax: i32, given_weights: bool) {
        let groups: Groups = groups
            .iter()
            .map(|(x, w)| {
                let w = if given_weights {
                    w.clone()
                } else {
                    x.iter().map(|v| v * v).collect()
                };
                (x.clone(), w)
            })
            .collect();
        let want: Found = groups
            .iter()
            .map(|(x, w)| {
                let mut l = vec![0i8; x.len()];
                let s = if given_weights {
                    make_qx_quants(nmax, x, &mut l, 1, Some(w))
                } else {
                    make_qx_quants(nmax, x, &mut l, 1, None)
                };
                (s.to_bits(), 0, l.iter().map(|&v| v as u8).collect())
            })
            .collect();
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let (x1, x2) = with_level(level, || qx_lanes(&groups, nmax));
            assert_eq!(x1, want, "{level} one register");
            assert_eq!(x2, want, "{level} two registers");
        }
    }

    const Q4K: QkxParams = QkxParams {
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
        flat_is_le: false,
    };
    const Q2K: QkxParams = QkxParams {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
        flat_is_le: false,
    };
    const QKX3: QkxParams = QkxParams {
        rmin: -0.9,
        rdelta: 0.05,
        nstep: 36,
        use_mad: false,
        flat_is_le: true,
    };

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn qkx2_lanes_equal_scalar_q4k(groups in prop::collection::vec(group(32), 1..40)) {
            check_qkx(&groups, 15, Q4K);
        }

        #[test]
        fn qkx2_lanes_equal_scalar_q2k(groups in prop::collection::vec(group(16), 1..40)) {
            check_qkx(&groups, 3, Q2K);
        }

        #[test]
        fn qkx3_lanes_equal_scalar(groups in prop::collection::vec(group(32), 1..40)) {
            check_qkx(&groups, 31, QKX3);
        }

        #[test]
        fn qx_lanes_equal_scalar_q6k(groups in prop::collection::vec(group(16), 1..40)) {
            check_qx(&groups, 32, false);
        }

        #[test]
        fn qx_lanes_equal_scalar_weighted(groups in prop::collection::vec(group(16), 1..40)) {
            check_qx(&groups, 4, true);
        }

        #[test]
        fn q3_lanes_equal_scalar(groups in prop::collection::vec(group(16), 1..40)) {
            check_q3(&groups);
        }
    }

    /// Groups that force the exact rounding path in some lanes (a NaN, values whose scaled range
    /// overflows) next to ordinary ones, and a `nstep` of 0 (no search at all).
    #[test]
    fn out_of_range_and_nan_lanes_equal_scalar() {
        let mut groups: Groups = Vec::new();
        for k in 0..40usize {
            let x: Vec<f32> = (0..32)
                .map(|i| match (k % 5, i) {
                    (0, 3) => f32::NAN,
                    (1, _) => {
                        f32::from_bits(0x7f00_0000 + (i as u32) * 977)
                            * if i % 2 == 0 { 1.0 } else { -1.0 }
                    }
                    (2, _) => (i as f32) * 1e-44,
                    (3, _) if i == 7 => f32::INFINITY,
                    _ => ((i * 37 + k) % 17) as f32 * 0.25 - 2.0,
                })
                .collect();
            let w: Vec<f32> = (0..32).map(|i| ((i + k) % 3) as f32).collect();
            groups.push((x, w));
        }
        check_qkx(&groups, 15, Q4K);
        check_qkx(&groups, 31, QKX3);
        check_qkx(&groups, 15, QkxParams { nstep: 0, ..Q4K });
        let g16: Groups = groups
            .iter()
            .map(|(x, w)| (x[..16].to_vec(), w[..16].to_vec()))
            .collect();
        check_qx(&g16, 32, false);
        check_qx(&g16, 4, true);
        check_q3(&g16);
    }
}
