//! The K-quant block codecs (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K), bit-exact with ggml's `ggml-quants.c`.
//!
//! Each type keeps its quantizers and dequantizer side by side, each mirroring the ggml function its
//! doc names (llama.cpp as vendored by llama-cpp-python 0.3.36):
//! - `quantize_row_X_ref`: the deterministic reference quantizer, what `ggml_quantize_chunk` runs
//!   without an importance matrix;
//! - `quantize_row_X_impl`: the importance-weighted quantizer, what `ggml_quantize_chunk` runs with one;
//! - `quantize_row_X`: picks between the two from an `Option` imatrix;
//! - `dequantize_row_X`: ggml's `to_float`.
//!
//! Bytes are ggml's block layout (`ggml-common.h`), little-endian, read and written through byte offsets
//! so a block may sit at any alignment (GGUF data is only 32-byte aligned). The arithmetic follows
//! ggml's scalar C operation for operation: libggml-base, which holds these functions, is compiled with
//! `-O3` and no `-march`, so it has no FMA contraction and no reassociated sums (checked on the wheel's
//! `libggml-base.so`: not one `vfmadd`), and neither does Rust. Half-precision scales go through
//! [`super::float`]'s restatement of ggml's f16 conversions.
//!
//! Speed without changing bits: the scale searches of all sub-blocks of one or more consecutive
//! super-blocks run in SIMD lanes, one sub-block per lane ([`super::lanes`]; a pass covers as many
//! super-blocks as the level's two registers have lanes for: one or two at 16 lanes, two or four at
//! 32), and every quantizer and dequantizer is compiled once per SIMD level and picked at run time
//! ([`super::simd`]).
//!
//! Lengths are the caller's contract: `x` holds whole 256-element super-blocks and `y` exactly the
//! matching number of bytes; a mismatch is a programming error and panics.

// Index loops mirror the C and walk several arrays in step; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use super::float::{read_f16, write_f16};
use super::lanes::{
    in_passes, lanes_of, q3_fit, qkx_fit, quantize_run, qx_fit, to_lanes, Pass, QkxParams,
};
use super::search::{first_absmax, make_qp_quants, make_qx_quants, nearest_int, GROUP_MAX_EPS};
use super::simd::{simd_dispatch, F32s, Level};
use super::{Codec, QK_K};

/// Bytes per block of each type (`sizeof(block_qX_K)` in `ggml-common.h`).
pub const Q2_K_BYTES: usize = 84;
pub const Q3_K_BYTES: usize = 110;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;
pub const Q8_K_BYTES: usize = 292;

/// Checks that `x` is whole super-blocks and `y` exactly their `B`-byte blocks.
#[inline(always)]
fn check_blocks<const B: usize>(x: &[f32], y: &[u8], what: &str) {
    assert!(
        x.len().is_multiple_of(QK_K) && y.len() == x.len() / QK_K * B,
        "{what}: {} values need {} bytes, got {}",
        x.len(),
        x.len() / QK_K * B,
        y.len()
    );
}

/// Pairs each 256-element super-block of `x` with its `B` bytes in `y`, after checking the lengths.
fn blocks_mut<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
    what: &str,
) -> impl Iterator<Item = (&'a [f32; QK_K], &'a mut [u8; B])> {
    check_blocks::<B>(x, y, what);
    x.chunks_exact(QK_K)
        .zip(y.chunks_exact_mut(B))
        .map(|(xb, yb)| (as_array(xb), as_array_mut(yb)))
}

/// Pairs each `B`-byte block of `x` with its 256 outputs in `y`, after checking the lengths.
fn blocks_out<'a, const B: usize>(
    x: &'a [u8],
    y: &'a mut [f32],
    what: &str,
) -> impl Iterator<Item = (&'a [u8; B], &'a mut [f32; QK_K])> {
    assert!(
        x.len().is_multiple_of(B) && y.len() == x.len() / B * QK_K,
        "{what}: {} bytes decode to {} values, got room for {}",
        x.len(),
        x.len() / B * QK_K,
        y.len()
    );
    x.chunks_exact(B)
        .zip(y.chunks_exact_mut(QK_K))
        .map(|(xb, yb)| (as_array(xb), as_array_mut(yb)))
}

#[inline(always)]
fn as_array<T, const N: usize>(s: &[T]) -> &[T; N] {
    s.try_into().expect("chunks_exact yields whole chunks")
}

#[inline(always)]
fn as_array_mut<T, const N: usize>(s: &mut [T]) -> &mut [T; N] {
    s.try_into().expect("chunks_exact yields whole chunks")
}

/// Quantizes `x` into `y` with `p`, which encodes the super-blocks whose `groups`-per-block
/// sub-blocks fill `V::LANES` lanes (one or more whole super-blocks) at a time. With an imatrix, `x`
/// is rows of `imatrix.len()` values and block `i` of each row gets weights
/// `imatrix[256 i..256 (i + 1)]`: the row loop of ggml's `quantize_qX_K`.
#[inline(always)]
fn quantize_in_passes<L: Level, const B: usize, P: Pass>(
    x: &[f32],
    y: &mut [u8],
    imatrix: Option<&[f32]>,
    groups: usize,
    what: &str,
    p: &P,
) {
    check_blocks::<B>(x, y, what);
    let lanes = L::X2::LANES;
    let nb = lanes / groups;
    assert!(
        nb >= 1 && nb * groups == lanes,
        "whole super-blocks per pass"
    );
    match imatrix {
        None => in_passes::<L, P>(x, y, None, nb * QK_K, nb * B, p),
        Some(w) => {
            let n_per_row = w.len();
            assert!(
                n_per_row > 0
                    && n_per_row.is_multiple_of(QK_K)
                    && x.len().is_multiple_of(n_per_row),
                "{what}: the importance matrix has {n_per_row} values, which does not divide the {} \
                 values into rows of whole super-blocks",
                x.len()
            );
            for (xr, yr) in x
                .chunks_exact(n_per_row)
                .zip(y.chunks_exact_mut(n_per_row / QK_K * B))
            {
                in_passes::<L, P>(xr, yr, Some(w), nb * QK_K, nb * B, p);
            }
        }
    }
}

/// Defines the four public row functions of one K-quant type around its pass function, each
/// compiled once per SIMD level (see [`super::simd`]): the reference quantizer, the
/// importance-weighted one for rows of `quant_weights.len()` values (as ggml's `quantize_X` loops
/// over rows), the pick between the two that `ggml_quantize_chunk` makes (weighted by `imatrix`, one
/// weight per column, when given) and the dequantizer.
macro_rules! row_functions {
    ($ggml:literal, $bytes:ident, $groups:literal, $quantize_pass:ident, $dequantize_block:ident,
     $quantize_ref:ident, $quantize_impl:ident, $quantize:ident, $dequantize:ident) => {
        simd_dispatch! {
            #[doc = concat!($ggml, " reference quantizer over whole super-blocks; mirrors ggml's `quantize_row_", $ggml, "_ref`.")]
            pub fn $quantize_ref<L>(x: &[f32], y: &mut [u8]) {
                quantize_in_passes::<L, $bytes, _>(x, y, None, $groups, $ggml, &$quantize_pass);
            }
        }

        simd_dispatch! {
            #[doc = concat!("Importance-weighted ", $ggml, " quantizer for rows of `quant_weights.len()` values; mirrors ggml's `quantize_row_", $ggml, "_impl` (as looped over rows by `quantize_", $ggml, "`).")]
            pub fn $quantize_impl<L>(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
                quantize_in_passes::<L, $bytes, _>(
                    x, y, Some(quant_weights), $groups, $ggml, &$quantize_pass,
                );
            }
        }

        #[doc = concat!($ggml, " quantizer as `ggml_quantize_chunk` runs it: weighted by `imatrix` (one weight per column) when given, the reference quantizer otherwise.")]
        pub fn $quantize(x: &[f32], y: &mut [u8], imatrix: Option<&[f32]>) {
            match imatrix {
                Some(qw) => $quantize_impl(x, y, qw),
                None => $quantize_ref(x, y),
            }
        }

        simd_dispatch! {
            #[doc = concat!($ggml, " to f32; mirrors ggml's `dequantize_row_", $ggml, "`.")]
            pub fn $dequantize<L>(x: &[u8], y: &mut [f32]) {
                for (xb, yb) in blocks_out::<$bytes>(x, y, $ggml) {
                    $dequantize_block(xb, yb);
                }
            }
        }
    };
}

/// Names the pass function of a type as a [`Pass`], called statically (so inlined) by the row loop:
/// it searches in the level's two-register lanes `V` and requantizes runs in one-register lanes `W`.
macro_rules! pass_type {
    ($name:ident, $f:ident) => {
        struct $name;
        impl Pass for $name {
            #[inline(always)]
            fn pass<L: Level>(&self, x: &[f32], y: &mut [u8], weights: Option<&[f32]>) {
                $f::<L::X2, L::X1>(x, y, weights)
            }
        }
    };
}

/// The imatrix weights of a pass of super-blocks in lanes (`G` values per group), as ggml's
/// importance-weighted K-quantizers compute them: `w = qw·sqrt(σ² + x²)` with
/// `σ² = sigma2_scale·Σx²/256` per super-block (summed in element order; the scale is 1 for Q2_K, 2
/// for Q3_K to Q5_K), and each lane's weight sum in element order. Returns `(wt, Σw)`.
#[inline(always)]
fn imatrix_weights<V: F32s, const G: usize>(
    x: &[f32],
    qw: &[f32],
    sigma2_scale: f32,
    xt: &[V; G],
) -> ([V; G], V) {
    let groups_per_block = QK_K / G;
    let nb = V::LANES / groups_per_block;
    assert!(
        nb <= 4 && x.len() == nb * QK_K,
        "a pass of whole super-blocks"
    );
    // One sequential sum per super-block, the blocks' chains interleaved.
    let mut sumx2 = [0f32; 4];
    for j in 0..QK_K {
        for b in 0..nb {
            let v = x[QK_K * b + j];
            sumx2[b] += v * v;
        }
    }
    let mut sigma2 = [0f32; 32];
    for k in 0..V::LANES {
        sigma2[k] = sigma2_scale * sumx2[k / groups_per_block] / QK_K as f32;
    }
    let sigma2 = V::load(&sigma2);
    let qwt = to_lanes::<V, G>(qw);
    let mut wt = [V::splat(0.0); G];
    for i in 0..G {
        wt[i] = qwt[i] * (sigma2 + xt[i] * xt[i]).sqrt();
    }
    let mut sw = V::splat(0.0);
    for w in &wt {
        sw = sw + *w;
    }
    (wt, sw)
}

/// Packs 2-bit levels `l` (values 0..=3) into 64 bytes the way Q2_K and Q3_K store them: byte `l` of
/// each 32-byte half holds elements `l`, `l+32`, `l+64`, `l+96` of its 128 in bits 0-1, 2-3, 4-5, 6-7.
#[inline(always)]
fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] = levels[j + l]
                | (levels[j + l + 32] << 2)
                | (levels[j + l + 64] << 4)
                | (levels[j + l + 96] << 6);
        }
    }
}

// ===================================== Q2_K =====================================
// block_q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d: f16, dmin: f16.
const Q2_SCALES: usize = 0;
const Q2_QS: usize = 16;
const Q2_D: usize = 80;
const Q2_DMIN: usize = 82;

/// Final 2-bit levels of a Q2_K block from its stored scales and mins (shared tail of
/// `quantize_row_q2_K_ref` and `quantize_row_q2_K_impl`); sub-blocks whose scale is zero keep the
/// levels of the search, which `search_levels(j, out)` writes.
#[inline(always)]
fn q2_k_requantize<W: F32s>(
    x: &[f32; QK_K],
    y: &[u8; Q2_K_BYTES],
    levels: &mut [u8; QK_K],
    mut search_levels: impl FnMut(usize, &mut [u8]),
) {
    let d_all = read_f16(&y[Q2_D..]);
    let dmin_all = read_f16(&y[Q2_DMIN..]);
    for j in 0..QK_K / 16 {
        let sc = y[Q2_SCALES + j];
        let d = d_all * (sc & 0xF) as f32;
        if d == 0.0 {
            search_levels(j, &mut levels[16 * j..16 * j + 16]);
            continue;
        }
        let dm = dmin_all * (sc >> 4) as f32;
        let run = 16 * j..16 * j + 16;
        quantize_run::<W>(&x[run.clone()], Some(dm), d, 0, 3, 0, &mut levels[run]);
    }
}

/// The scales and mins of a `quantize_row_q2_K_ref` block from its sub-blocks' search results.
#[inline(always)]
fn q2_k_ref_scales(scales: &[f32], mins: &[f32], y: &mut [u8; Q2_K_BYTES]) {
    const Q4SCALE: f32 = 15.0;
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..QK_K / 16 {
            y[Q2_SCALES + j] = nearest_int(iscale * scales[j]) as u8;
        }
        write_f16(&mut y[Q2_D..], max_scale / Q4SCALE);
    } else {
        y[Q2_SCALES..Q2_SCALES + 16].fill(0);
        write_f16(&mut y[Q2_D..], 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..QK_K / 16 {
            let l = nearest_int(iscale * mins[j]);
            y[Q2_SCALES + j] |= (l << 4) as u8;
        }
        write_f16(&mut y[Q2_DMIN..], max_min / Q4SCALE);
    } else {
        write_f16(&mut y[Q2_DMIN..], 0.0);
    }
}

/// The scales and mins of a `quantize_row_q2_K_impl` block: `make_qp_quants` on each, weighted by
/// the sub-blocks' weight sums `sw`.
#[inline(always)]
fn q2_k_impl_scales(scales: &[f32], mins: &[f32], sw: &[f32], y: &mut [u8; Q2_K_BYTES]) {
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];
    let dm = make_qp_quants(15, scales, &mut ls, sw);
    let mm = make_qp_quants(15, mins, &mut lm, sw);
    write_f16(&mut y[Q2_D..], dm);
    write_f16(&mut y[Q2_DMIN..], mm);
    for j in 0..QK_K / 16 {
        y[Q2_SCALES + j] = ls[j] | (lm[j] << 4);
    }
}

/// `quantize_row_q2_K_ref` (`qw` None) or `quantize_row_q2_K_impl` on the super-blocks of one pass.
#[inline(always)]
fn q2_k_pass<V: F32s, W: F32s>(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    let xt = to_lanes::<V, 16>(x);
    let (wt, sw) = match qw {
        None => {
            let mut wt = xt;
            for w in &mut wt {
                *w = w.abs();
            }
            (wt, None)
        }
        Some(qw) => {
            let (wt, sw) = imatrix_weights::<V, 16>(x, qw, 1.0, &xt);
            (wt, Some(lanes_of(sw)))
        }
    };
    let params = match qw {
        None => QkxParams {
            rmin: -0.5,
            rdelta: 0.1,
            nstep: 15,
            use_mad: true,
            flat_is_le: false,
        },
        Some(_) => QKX3,
    };
    let mut laux = [V::splat(0.0); 16];
    let fit = qkx_fit(3, &xt, &wt, &mut laux, params);
    let (scales, mins) = (lanes_of(fit.scale), lanes_of(fit.the_min));
    for (b, (xb, yb)) in blocks_mut::<Q2_K_BYTES>(x, y, "q2_K").enumerate() {
        let (sc, mn) = (&scales[16 * b..][..16], &mins[16 * b..][..16]);
        match &sw {
            None => q2_k_ref_scales(sc, mn, yb),
            Some(sw) => q2_k_impl_scales(sc, mn, &sw[16 * b..][..16], yb),
        }
        let mut levels = [0u8; QK_K];
        q2_k_requantize::<W>(xb, yb, &mut levels, |j, out| {
            fit.lane_levels(16 * b + j, &xb[16 * j..][..16], out)
        });
        pack_2bit(&levels, &mut yb[Q2_QS..Q2_QS + 64]);
    }
}

/// The `make_qkx3_quants(…, -0.9f, 0.05f, 36, false)` call of the importance-weighted quantizers.
const QKX3: QkxParams = QkxParams {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
    flat_is_le: true,
};

pass_type!(Q2KPass, q2_k_pass);

row_functions!(
    "q2_K",
    Q2_K_BYTES,
    16,
    Q2KPass,
    dequantize_block_q2_k,
    quantize_row_q2_k_ref,
    quantize_row_q2_k_impl,
    quantize_row_q2_k,
    dequantize_row_q2_k
);

#[inline(always)]
fn dequantize_block_q2_k(xb: &[u8; Q2_K_BYTES], yb: &mut [f32; QK_K]) {
    let d = read_f16(&xb[Q2_D..]);
    let min = read_f16(&xb[Q2_DMIN..]);
    let scales = &xb[Q2_SCALES..Q2_SCALES + 16];
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &xb[Q2_QS + 32 * half..Q2_QS + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    yb[out] = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

// ===================================== Q3_K =====================================
// block_q3_K: hmask[32], qs[64], scales[12] (16 six-bit scales), d: f16.
const Q3_HMASK: usize = 0;
const Q3_QS: usize = 32;
const Q3_SCALES: usize = 96;
const Q3_D: usize = 108;

/// Stores six-bit scale `l` (0..=63) of sub-block `j` into Q3_K's 12-byte scale field (zeroed first):
/// low nibbles in bytes 0..8, high 2-bit pairs in bytes 8..12.
#[inline(always)]
fn q3_k_put_scale(scales: &mut [u8], j: usize, l: i32) {
    if j < 8 {
        scales[j] = (l & 0xF) as u8;
    } else {
        scales[j - 8] |= ((l & 0xF) << 4) as u8;
    }
    let high = l >> 4;
    scales[j % 4 + 8] |= (high << (2 * (j / 4))) as u8;
}

/// The signed scale of sub-block `j` from Q3_K's 12-byte scale field.
#[inline(always)]
pub(crate) fn q3_k_scale(scales: &[u8], j: usize) -> i8 {
    let low = if j < 8 {
        scales[j] & 0xF
    } else {
        scales[j - 8] >> 4
    };
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    (low | (high << 4)) as i8 - 32
}

/// Final levels and bit packing of a Q3_K block once its scales are stored (shared tail of
/// `quantize_row_q3_K_ref` and `quantize_row_q3_K_impl`); sub-blocks whose scale is zero keep the
/// (offset) levels of the search, which `search_levels(j, out)` writes.
#[inline(always)]
fn q3_k_finish<W: F32s>(
    x: &[f32; QK_K],
    y: &mut [u8; Q3_K_BYTES],
    mut search_levels: impl FnMut(usize, &mut [i8]),
) {
    let mut levels = [0u8; QK_K];
    let d_all = read_f16(&y[Q3_D..]);
    for j in 0..QK_K / 16 {
        let sc = q3_k_scale(&y[Q3_SCALES..Q3_SCALES + 12], j);
        let d = d_all * sc as f32;
        let run = 16 * j..16 * j + 16;
        if d == 0.0 {
            let mut l = [0i8; 16];
            search_levels(j, &mut l);
            for (o, v) in levels[run].iter_mut().zip(l) {
                *o = v as u8;
            }
            continue;
        }
        quantize_run::<W>(&x[run.clone()], None, d, -4, 3, 4, &mut levels[run]);
    }

    // The high bit of the 1st 32 quants goes to bit 0 of hmask[0..32], the next 32 to bit 1, etc.
    // Levels are 0..=7: ggml's `if (l > 3) { hmask |= ..; l -= 4; }` is bit 2 moved into hmask.
    let mut low = [0u8; QK_K];
    let mut hmask = [0u8; 32];
    for j in 0..QK_K {
        let l = levels[j];
        hmask[j % 32] |= (l >> 2) << (j / 32);
        low[j] = l & 3;
    }
    y[Q3_HMASK..Q3_HMASK + 32].copy_from_slice(&hmask);
    pack_2bit(&low, &mut y[Q3_QS..Q3_QS + 64]);
}

/// `quantize_row_q3_K_ref` on one super-block from its sub-blocks' `make_q3_quants` scales; the
/// search's levels come from `search_levels`.
#[inline(always)]
fn q3_k_ref_block<W: F32s>(
    x: &[f32; QK_K],
    y: &mut [u8; Q3_K_BYTES],
    scales: &[f32],
    search_levels: impl FnMut(usize, &mut [i8]),
) {
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..QK_K / 16 {
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }

    y[Q3_SCALES..Q3_SCALES + 12].fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0f32 / max_scale;
        for j in 0..QK_K / 16 {
            let l = nearest_int(iscale * scales[j]) as i8;
            let l = (l as i32).clamp(-32, 31) + 32;
            q3_k_put_scale(&mut y[Q3_SCALES..Q3_SCALES + 12], j, l);
        }
        write_f16(&mut y[Q3_D..], 1.0 / iscale);
    } else {
        write_f16(&mut y[Q3_D..], 0.0);
    }
    q3_k_finish::<W>(x, y, search_levels);
}

/// `quantize_row_q3_K_ref` (`qw` None) or `quantize_row_q3_K_impl` on the super-blocks of one pass.
#[inline(always)]
fn q3_k_pass<V: F32s, W: F32s>(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    let Some(qw) = qw else {
        let xt = to_lanes::<V, 16>(x);
        let fit = q3_fit::<V, 16>(4, &xt);
        let scales = lanes_of(fit.scale);
        for (b, (xb, yb)) in blocks_mut::<Q3_K_BYTES>(x, y, "q3_K").enumerate() {
            q3_k_ref_block::<W>(xb, yb, &scales[16 * b..][..16], |j, out| {
                fit.lane_levels(16 * b + j, out)
            });
        }
        return;
    };
    let xt = to_lanes::<V, 16>(x);
    let (wt, sw) = imatrix_weights::<V, 16>(x, qw, 2.0, &xt);
    let fit = qx_fit(4, &xt, &wt);
    let (scales, sw) = (lanes_of(fit.scale), lanes_of(sw));
    for (b, (xb, yb)) in blocks_mut::<Q3_K_BYTES>(x, y, "q3_K").enumerate() {
        let mut ls = [0i8; QK_K / 16];
        yb[Q3_SCALES..Q3_SCALES + 12].fill(0);
        let d_block = make_qx_quants(
            32,
            &scales[16 * b..][..16],
            &mut ls,
            1,
            Some(&sw[16 * b..][..16]),
        );
        for j in 0..QK_K / 16 {
            q3_k_put_scale(&mut yb[Q3_SCALES..Q3_SCALES + 12], j, ls[j] as i32);
        }
        write_f16(&mut yb[Q3_D..], d_block);
        q3_k_finish::<W>(xb, yb, |j, out| {
            fit.lane_levels(16 * b + j, &xb[16 * j..][..16], out)
        });
    }
}

pass_type!(Q3KPass, q3_k_pass);

row_functions!(
    "q3_K",
    Q3_K_BYTES,
    16,
    Q3KPass,
    dequantize_block_q3_k,
    quantize_row_q3_k_ref,
    quantize_row_q3_k_impl,
    quantize_row_q3_k,
    dequantize_row_q3_k
);

#[inline(always)]
fn dequantize_block_q3_k(xb: &[u8; Q3_K_BYTES], yb: &mut [f32; QK_K]) {
    let d_all = read_f16(&xb[Q3_D..]);
    let scale_bytes = &xb[Q3_SCALES..Q3_SCALES + 12];
    let hm = &xb[Q3_HMASK..Q3_HMASK + 32];
    let mut out = 0;
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &xb[Q3_QS + 32 * half..Q3_QS + 32 * half + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d_all * q3_k_scale(scale_bytes, is) as f32;
                is += 1;
                for l in 0..16 {
                    let k = 16 * part + l;
                    let low = ((q[k] >> shift) & 3) as i32;
                    let high = if hm[k] & m != 0 { 0 } else { 4 };
                    yb[out] = dl * (low - high) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

// ============================= Q4_K and Q5_K shared =============================
// Both start d: f16, dmin: f16, scales[12] (eight 6-bit scales and eight 6-bit mins).
const QK4_D: usize = 0;
const QK4_DMIN: usize = 2;
const QK4_SCALES: usize = 4;

/// Scale and min of sub-block `j` from the 12-byte field; mirrors ggml's `get_scale_min_k4`.
#[inline(always)]
pub(crate) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Stores scale `ls` and min `lm` of sub-block `j` into the 12-byte field, in the order ggml writes
/// them (sub-blocks 0..4 before 4..8), so earlier bytes need no clearing.
#[inline(always)]
fn put_scale_min_k4(q: &mut [u8], j: usize, ls: u8, lm: u8) {
    if j < 4 {
        q[j] = ls;
        q[j + 4] = lm;
    } else {
        q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
        q[j - 4] |= (ls >> 4) << 6;
        q[j] |= (lm >> 4) << 6;
    }
}

/// Final levels `0..=nmax` of a Q4_K/Q5_K block from its stored scales and mins; sub-blocks whose
/// scale is zero keep the levels of the search, which `search_levels(j, out)` writes.
#[inline(always)]
fn qk4_requantize<W: F32s>(
    x: &[f32; QK_K],
    block: &[u8],
    nmax: i32,
    levels: &mut [u8; QK_K],
    mut search_levels: impl FnMut(usize, &mut [u8]),
) {
    let d_all = read_f16(&block[QK4_D..]);
    let dmin_all = read_f16(&block[QK4_DMIN..]);
    let scales = &block[QK4_SCALES..QK4_SCALES + 12];
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = d_all * sc as f32;
        if d == 0.0 {
            search_levels(j, &mut levels[32 * j..32 * j + 32]);
            continue;
        }
        let dm = dmin_all * m as f32;
        let run = 32 * j..32 * j + 32;
        quantize_run::<W>(&x[run.clone()], Some(dm), d, 0, nmax, 0, &mut levels[run]);
    }
}

/// The scales and mins of a `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` block from its
/// sub-blocks' `make_qkx2_quants` results: both quantized to 6 bits against their maxima.
#[inline(always)]
fn qk4_ref_scales(scales: &[f32], mins: &[f32], block: &mut [u8]) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..QK_K / 32 {
        // C stores nearest_int's int in a uint8_t: negative values wrap, then MIN clamps them to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        put_scale_min_k4(&mut block[QK4_SCALES..QK4_SCALES + 12], j, ls, lm);
    }
    write_f16(&mut block[QK4_D..], max_scale / 63.0);
    write_f16(&mut block[QK4_DMIN..], max_min / 63.0);
}

/// The scales and mins of a `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl` block:
/// `make_qp_quants` on each, weighted by the sub-blocks' weight sums `sw`. `clamp_63` is Q5_K's
/// extra (no-op) `MIN(63, ..)`, kept to follow the C.
#[inline(always)]
fn qk4_impl_scales(scales: &[f32], mins: &[f32], sw: &[f32], clamp_63: bool, block: &mut [u8]) {
    let mut ls = [0u8; QK_K / 32];
    let mut lm = [0u8; QK_K / 32];
    let d_block = make_qp_quants(63, scales, &mut ls, sw);
    let m_block = make_qp_quants(63, mins, &mut lm, sw);
    for j in 0..QK_K / 32 {
        let (s, m) = if clamp_63 {
            (ls[j].min(63), lm[j].min(63))
        } else {
            (ls[j], lm[j])
        };
        put_scale_min_k4(&mut block[QK4_SCALES..QK4_SCALES + 12], j, s, m);
    }
    write_f16(&mut block[QK4_D..], d_block);
    write_f16(&mut block[QK4_DMIN..], m_block);
}

/// The shared body of the Q4_K and Q5_K quantizers (levels `0..=nmax`) on the super-blocks of one
/// pass: `make_qkx2_quants(32, nmax, …, rmin, rdelta, nstep, false)` per sub-block with
/// `w = av_x + |x|` (reference, `qw` None), or `make_qkx3_quants` with the imatrix weights; then the
/// scales, the final levels and `pack`.
#[inline(always)]
fn qk4_pass<V: F32s, W: F32s, const B: usize>(
    x: &[f32],
    y: &mut [u8],
    qw: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) {
    let xt = to_lanes::<V, 32>(x);
    let (wt, sw, params) = match qw {
        None => {
            let mut sum_x2 = V::splat(0.0);
            for v in &xt {
                sum_x2 = sum_x2 + *v * *v;
            }
            let av_x = (sum_x2 / V::splat(32.0)).sqrt();
            let params = QkxParams {
                rmin,
                rdelta,
                nstep,
                use_mad: false,
                flat_is_le: false,
            };
            let mut wt = xt;
            for w in &mut wt {
                *w = av_x + w.abs();
            }
            (wt, None, params)
        }
        Some(qw) => {
            let (wt, sw) = imatrix_weights::<V, 32>(x, qw, 2.0, &xt);
            (wt, Some(lanes_of(sw)), QKX3)
        }
    };
    let mut laux = [V::splat(0.0); 32];
    let fit = qkx_fit(nmax, &xt, &wt, &mut laux, params);
    let (scales, mins) = (lanes_of(fit.scale), lanes_of(fit.the_min));
    for (b, (xb, yb)) in blocks_mut::<B>(x, y, "q4_K/q5_K").enumerate() {
        let (sc, mn) = (&scales[8 * b..][..8], &mins[8 * b..][..8]);
        match &sw {
            None => qk4_ref_scales(sc, mn, yb),
            Some(sw) => qk4_impl_scales(sc, mn, &sw[8 * b..][..8], nmax == 31, yb),
        }
        let mut levels = [0u8; QK_K];
        qk4_requantize::<W>(xb, yb, nmax, &mut levels, |j, out| {
            fit.lane_levels(8 * b + j, &xb[32 * j..][..32], out)
        });
        if nmax == 15 {
            q4_k_pack(&levels, yb);
        } else {
            q5_k_pack(&levels, yb);
        }
    }
}

// ===================================== Q4_K =====================================
// block_q4_K: d, dmin, scales[12], qs[128] (two sub-blocks of 32 per 32 bytes: low then high nibble).
const Q4_QS: usize = 16;

#[inline(always)]
fn q4_k_pack(levels: &[u8; QK_K], y: &mut [u8]) {
    let q = &mut y[Q4_QS..Q4_QS + QK_K / 2];
    for (jb, j) in (0..QK_K).step_by(64).enumerate() {
        for l in 0..32 {
            q[32 * jb + l] = levels[j + l] | (levels[j + l + 32] << 4);
        }
    }
}

/// `quantize_row_q4_K_ref` (`make_qkx2_quants(32, 15, …, -1, 0.1, 20, false)`) or
/// `quantize_row_q4_K_impl` on the super-blocks of one pass.
#[inline(always)]
fn q4_k_pass<V: F32s, W: F32s>(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    qk4_pass::<V, W, Q4_K_BYTES>(x, y, qw, 15, -1.0, 0.1, 20);
}

pass_type!(Q4KPass, q4_k_pass);

row_functions!(
    "q4_K",
    Q4_K_BYTES,
    8,
    Q4KPass,
    dequantize_block_q4_k,
    quantize_row_q4_k_ref,
    quantize_row_q4_k_impl,
    quantize_row_q4_k,
    dequantize_row_q4_k
);

#[inline(always)]
fn dequantize_block_q4_k(xb: &[u8; Q4_K_BYTES], yb: &mut [f32; QK_K]) {
    let d = read_f16(&xb[QK4_D..]);
    let min = read_f16(&xb[QK4_DMIN..]);
    let scales = &xb[QK4_SCALES..QK4_SCALES + 12];
    for jb in 0..QK_K / 64 {
        let q = &xb[Q4_QS + 32 * jb..Q4_QS + 32 * jb + 32];
        let (sc, m) = get_scale_min_k4(2 * jb, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = get_scale_min_k4(2 * jb + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let out = &mut yb[64 * jb..64 * jb + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            out[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

// ===================================== Q5_K =====================================
// block_q5_K: d, dmin, scales[12], qh[32] (fifth bits), qs[128] (low nibbles, laid out as Q4_K's).
const Q5_QH: usize = 16;
const Q5_QS: usize = 48;

#[inline(always)]
fn q5_k_pack(levels: &[u8; QK_K], y: &mut [u8]) {
    // Levels are 0..=31: ggml's `if (l > 15) { l -= 16; qh[j] |= m; }` is bit 4 moved into qh,
    // written here without a data-dependent branch.
    let (qh, ql) = y[Q5_QH..].split_at_mut(32);
    let mut high = [0u8; 32];
    for (nb, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let l1 = levels[n + j];
            let l2 = levels[n + j + 32];
            high[j] |= ((l1 >> 4) << (2 * nb)) | ((l2 >> 4) << (2 * nb + 1));
            ql[32 * nb + j] = (l1 & 0xF) | ((l2 & 0xF) << 4);
        }
    }
    qh[..32].copy_from_slice(&high);
}

/// `quantize_row_q5_K_ref` (`make_qkx2_quants(32, 31, …, -0.5, 0.1, 15, false)`) or
/// `quantize_row_q5_K_impl` on the super-blocks of one pass.
#[inline(always)]
fn q5_k_pass<V: F32s, W: F32s>(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    qk4_pass::<V, W, Q5_K_BYTES>(x, y, qw, 31, -0.5, 0.1, 15);
}

pass_type!(Q5KPass, q5_k_pass);

row_functions!(
    "q5_K",
    Q5_K_BYTES,
    8,
    Q5KPass,
    dequantize_block_q5_k,
    quantize_row_q5_k_ref,
    quantize_row_q5_k_impl,
    quantize_row_q5_k,
    dequantize_row_q5_k
);

#[inline(always)]
fn dequantize_block_q5_k(xb: &[u8; Q5_K_BYTES], yb: &mut [f32; QK_K]) {
    let d = read_f16(&xb[QK4_D..]);
    let min = read_f16(&xb[QK4_DMIN..]);
    let scales = &xb[QK4_SCALES..QK4_SCALES + 12];
    let qh = &xb[Q5_QH..Q5_QH + 32];
    let mut u1 = 1u8;
    let mut u2 = 2u8;
    for jb in 0..QK_K / 64 {
        let ql = &xb[Q5_QS + 32 * jb..Q5_QS + 32 * jb + 32];
        let (sc, m) = get_scale_min_k4(2 * jb, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = get_scale_min_k4(2 * jb + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let out = &mut yb[64 * jb..64 * jb + 64];
        for l in 0..32 {
            let high = if qh[l] & u1 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0xF) + high) as f32 - m1;
        }
        for l in 0..32 {
            let high = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[32 + l] = d2 * ((ql[l] >> 4) + high) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

// ===================================== Q6_K =====================================
// block_q6_K: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (i8), d: f16.
const Q6_QL: usize = 0;
const Q6_QH: usize = 128;
const Q6_SCALES: usize = 192;
const Q6_D: usize = 208;

/// The shared tail of `quantize_row_q6_K_ref` and `quantize_row_q6_K_impl` on one block, from its
/// sub-blocks' `make_qx_quants` scales; sub-blocks whose stored scale is zero keep the levels of the
/// search, which `search_levels(j, out)` writes.
#[inline(always)]
fn q6_k_finish<W: F32s>(
    x: &[f32; QK_K],
    y: &mut [u8; Q6_K_BYTES],
    scales: &[f32],
    mut search_levels: impl FnMut(usize, &mut [i8]),
) {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..QK_K / 16 {
        let abs_scale = scales[ib].abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scales[ib];
        }
    }

    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        write_f16(&mut y[Q6_D..], 0.0);
        return;
    }

    let iscale = -128.0f32 / max_scale;
    write_f16(&mut y[Q6_D..], 1.0 / iscale);
    for ib in 0..QK_K / 16 {
        y[Q6_SCALES + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }

    let mut levels = [0u8; QK_K];
    let d_all = read_f16(&y[Q6_D..]);
    for j in 0..QK_K / 16 {
        let d = d_all * (y[Q6_SCALES + j] as i8) as f32;
        let run = 16 * j..16 * j + 16;
        if d == 0.0 {
            let mut l = [0i8; 16];
            search_levels(j, &mut l);
            for (o, v) in levels[run].iter_mut().zip(l) {
                *o = v as u8;
            }
            continue;
        }
        quantize_run::<W>(&x[run.clone()], None, d, -32, 31, 32, &mut levels[run]);
    }

    let (ql, qh) = y[Q6_QL..Q6_SCALES].split_at_mut(Q6_QH - Q6_QL);
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let ql = &mut ql[64 * half..64 * half + 64];
        let qh = &mut qh[32 * half..32 * half + 32];
        for l in 0..32 {
            let l0 = levels[j + l];
            let l1 = levels[j + l + 32];
            let l2 = levels[j + l + 64];
            let l3 = levels[j + l + 96];
            ql[l] = (l0 & 0xF) | ((l2 & 0xF) << 4);
            ql[l + 32] = (l1 & 0xF) | ((l3 & 0xF) << 4);
            qh[l] = (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6);
        }
    }
}

/// `quantize_row_q6_K_ref` (`qw` None: `make_qx_quants(16, 32, …, 1, NULL)`, whose weights are `x²`)
/// or `quantize_row_q6_K_impl` (the imatrix as weights) on the super-blocks of one pass.
#[inline(always)]
fn q6_k_pass<V: F32s, W: F32s>(x: &[f32], y: &mut [u8], qw: Option<&[f32]>) {
    let xt = to_lanes::<V, 16>(x);
    let wt = match qw {
        None => {
            let mut wt = xt;
            for w in &mut wt {
                *w = *w * *w;
            }
            wt
        }
        Some(qw) => to_lanes::<V, 16>(qw),
    };
    let fit = qx_fit(32, &xt, &wt);
    let scales = lanes_of(fit.scale);
    for (b, (xb, yb)) in blocks_mut::<Q6_K_BYTES>(x, y, "q6_K").enumerate() {
        q6_k_finish::<W>(xb, yb, &scales[16 * b..][..16], |j, out| {
            fit.lane_levels(16 * b + j, &xb[16 * j..][..16], out)
        });
    }
}

pass_type!(Q6KPass, q6_k_pass);

row_functions!(
    "q6_K",
    Q6_K_BYTES,
    16,
    Q6KPass,
    dequantize_block_q6_k,
    quantize_row_q6_k_ref,
    quantize_row_q6_k_impl,
    quantize_row_q6_k,
    dequantize_row_q6_k
);

#[inline(always)]
fn dequantize_block_q6_k(xb: &[u8; Q6_K_BYTES], yb: &mut [f32; QK_K]) {
    let d = read_f16(&xb[Q6_D..]);
    for half in 0..2 {
        let ql = &xb[Q6_QL + 64 * half..Q6_QL + 64 * half + 64];
        let qh = &xb[Q6_QH + 32 * half..Q6_QH + 32 * half + 32];
        let sc = &xb[Q6_SCALES + 8 * half..Q6_SCALES + 8 * half + 8];
        let out = &mut yb[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

// ===================================== Q8_K =====================================
// block_q8_K: d: f32, qs[256] (i8), bsums[16] (i16, sums of 16 quants). ggml uses it only for dot
// products, never as a tensor type written by ggml_quantize_chunk.
const Q8_D: usize = 0;
const Q8_QS: usize = 4;
const Q8_BSUMS: usize = 260;

/// Q8_K reference quantizer over whole super-blocks; mirrors ggml's `quantize_row_q8_K_ref`.
/// For an all-zero block ggml leaves `bsums` unwritten; we write zeros there.
pub fn quantize_row_q8_k_ref(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in blocks_mut::<Q8_K_BYTES>(x, y, "q8_K") {
        let (max, amax) = first_absmax(xb);
        if amax == 0.0 {
            yb.fill(0);
            continue;
        }
        let iscale = -127.0f32 / max;
        let qs = &mut yb[Q8_QS..Q8_QS + QK_K];
        for j in 0..QK_K {
            qs[j] = nearest_int(iscale * xb[j]).min(127) as i8 as u8;
        }
        for j in 0..QK_K / 16 {
            let mut sum = 0i32;
            for ii in 0..16 {
                sum += yb[Q8_QS + 16 * j + ii] as i8 as i32;
            }
            yb[Q8_BSUMS + 2 * j..Q8_BSUMS + 2 * j + 2].copy_from_slice(&(sum as i16).to_le_bytes());
        }
        yb[Q8_D..Q8_D + 4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Q8_K quantizer with the same signature as the other types; ggml has no importance-weighted
/// Q8_K, so `imatrix` is ignored.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [u8], _imatrix: Option<&[f32]>) {
    quantize_row_q8_k_ref(x, y);
}

simd_dispatch! {
    /// Q8_K to f32; mirrors ggml's `dequantize_row_q8_K`.
    pub fn dequantize_row_q8_k<L>(x: &[u8], y: &mut [f32]) {
        for (xb, yb) in blocks_out::<Q8_K_BYTES>(x, y, "q8_K") {
            dequantize_block_q8_k(xb, yb);
        }
    }
}

#[inline(always)]
fn dequantize_block_q8_k(xb: &[u8; Q8_K_BYTES], yb: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
    for j in 0..QK_K {
        yb[j] = d * (xb[Q8_QS + j] as i8) as f32;
    }
}

// ================================ type-table entries ================================

/// Q2_K's entry in the type table.
pub const Q2_K: Codec = Codec {
    dequantize: Some(dequantize_row_q2_k),
    quantize: Some(quantize_row_q2_k_ref),
    quantize_imatrix: Some(quantize_row_q2_k_impl),
};

/// Q3_K's entry in the type table.
pub const Q3_K: Codec = Codec {
    dequantize: Some(dequantize_row_q3_k),
    quantize: Some(quantize_row_q3_k_ref),
    quantize_imatrix: Some(quantize_row_q3_k_impl),
};

/// Q4_K's entry in the type table.
pub const Q4_K: Codec = Codec {
    dequantize: Some(dequantize_row_q4_k),
    quantize: Some(quantize_row_q4_k_ref),
    quantize_imatrix: Some(quantize_row_q4_k_impl),
};

/// Q5_K's entry in the type table.
pub const Q5_K: Codec = Codec {
    dequantize: Some(dequantize_row_q5_k),
    quantize: Some(quantize_row_q5_k_ref),
    quantize_imatrix: Some(quantize_row_q5_k_impl),
};

/// Q6_K's entry in the type table.
pub const Q6_K: Codec = Codec {
    dequantize: Some(dequantize_row_q6_k),
    quantize: Some(quantize_row_q6_k_ref),
    quantize_imatrix: Some(quantize_row_q6_k_impl),
};

/// Q8_K's entry in the type table: `quantize_row_q8_K_ref` is its `from_float_ref` (ggml's
/// `ggml_quantize_chunk` has no Q8_K case; the type exists for dot products) and it has no imatrix
/// variant.
pub const Q8_K: Codec = Codec {
    dequantize: Some(dequantize_row_q8_k),
    quantize: Some(quantize_row_q8_k_ref),
    quantize_imatrix: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_read_at_any_alignment() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut q = vec![0u8; 2 * Q5_K_BYTES + 1];
        quantize_row_q5_k_ref(&x, &mut q[1..]);
        let mut aligned = vec![0u8; 2 * Q5_K_BYTES];
        quantize_row_q5_k_ref(&x, &mut aligned);
        assert_eq!(&q[1..], &aligned[..]);
        let (mut a, mut b) = (vec![0f32; 512], vec![0f32; 512]);
        dequantize_row_q5_k(&q[1..], &mut a);
        dequantize_row_q5_k(&aligned, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        // Rows with zeros, ties, outliers and wide magnitudes, of 1 to 17 super-blocks (so passes of
        // 1, 2 or 4 blocks end padded), several rows per imatrix; the interop tests compare the
        // dispatched build with libggml, this pins every level to the portable one.
        use crate::quant::simd::{with_level, SimdLevel};
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let x: Vec<f32> = (0..17 * 3 * QK_K)
            .map(|i| {
                let r = next();
                let v = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match (i / 64) % 11 {
                    0 => 0.0,
                    1 => (v * 16.0).round() * 0.5,
                    2 => v * 1e4,
                    3 if i % 5 == 0 => f32::from_bits(r as u32 & 0xff7f_ffff),
                    _ => v * 10f32.powi((r % 13) as i32 - 6),
                }
            })
            .collect();
        let imatrix: Vec<f32> = (0..17 * QK_K)
            .map(|i| if i % 5 == 0 { 0.0 } else { (i % 11) as f32 })
            .collect();
        type Quantize = fn(&[f32], &mut [u8], Option<&[f32]>);
        type Dequantize = fn(&[u8], &mut [f32]);
        let codecs: [(Quantize, Dequantize, usize); 6] = [
            (quantize_row_q2_k, dequantize_row_q2_k, Q2_K_BYTES),
            (quantize_row_q3_k, dequantize_row_q3_k, Q3_K_BYTES),
            (quantize_row_q4_k, dequantize_row_q4_k, Q4_K_BYTES),
            (quantize_row_q5_k, dequantize_row_q5_k, Q5_K_BYTES),
            (quantize_row_q6_k, dequantize_row_q6_k, Q6_K_BYTES),
            (quantize_row_q8_k, dequantize_row_q8_k, Q8_K_BYTES),
        ];
        let levels: Vec<SimdLevel> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect();
        for (quantize, dequantize, bytes) in codecs {
            for blocks in [1, 2, 3, 5, 17] {
                let n = blocks * QK_K;
                let x = &x[..3 * n];
                for imat in [None, Some(&imatrix[..n])] {
                    let quantized = || {
                        let mut y = vec![0u8; x.len() / QK_K * bytes];
                        quantize(x, &mut y, imat);
                        y
                    };
                    let portable = with_level(SimdLevel::Portable, quantized);
                    for &level in &levels {
                        assert!(
                            with_level(level, quantized) == portable,
                            "{bytes}-byte blocks, {blocks} per row, imatrix {}, {level}",
                            imat.is_some()
                        );
                    }
                    let dequantized = || {
                        let mut y = vec![0f32; x.len()];
                        dequantize(&portable, &mut y);
                        y.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
                    };
                    let portable_f32 = with_level(SimdLevel::Portable, dequantized);
                    for &level in &levels {
                        assert!(
                            with_level(level, dequantized) == portable_f32,
                            "{bytes}-byte dequantize, {level}"
                        );
                    }
                }
            }
        }
    }
}
