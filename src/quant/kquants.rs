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
//! Speed without changing bits: the scale searches of all sub-blocks of a super-block run in SIMD
//! lanes (see [`super::search`]), and every quantizer and dequantizer is also compiled for AVX2 and
//! picked at run time when the CPU has it; only the vector width differs, never the operation order.
//! Rust never contracts `a * b + c` into an FMA, so the AVX2 build rounds exactly like ggml's SSE2 C.
//!
//! Lengths are the caller's contract: `x` holds whole 256-element super-blocks and `y` exactly the
//! matching number of bytes; a mismatch is a programming error and panics.

// Index loops mirror the C and walk several arrays in step; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use super::float::{read_f16, write_f16};
use super::search::{
    first_absmax, make_q3_quants_lanes, make_qkx_quants_lanes, make_qp_quants, make_qx_quants,
    make_qx_quants_lanes, nearest_int, GROUP_MAX_EPS,
};
use super::simd::avx2_dispatch;
use super::{Codec, QK_K};

/// Bytes per block of each type (`sizeof(block_qX_K)` in `ggml-common.h`).
pub const Q2_K_BYTES: usize = 84;
pub const Q3_K_BYTES: usize = 110;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;
pub const Q8_K_BYTES: usize = 292;

/// Pairs each 256-element super-block of `x` with its `B` bytes in `y`, after checking the lengths.
fn blocks_mut<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
    what: &str,
) -> impl Iterator<Item = (&'a [f32; QK_K], &'a mut [u8; B])> {
    assert!(
        x.len().is_multiple_of(QK_K) && y.len() == x.len() / QK_K * B,
        "{what}: {} values need {} bytes, got {}",
        x.len(),
        x.len() / QK_K * B,
        y.len()
    );
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

/// Every super-block of `x` with its bytes in `y` and its 256 importance weights: the row loop of
/// ggml's `quantize_qX_K` with an imatrix, where `x` is rows of `imatrix.len()` values and block `i`
/// of each row gets weights `imatrix[256 i..256 (i + 1)]`.
#[inline(always)]
fn blocks_with_weights<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
    imatrix: &'a [f32],
    what: &str,
) -> impl Iterator<Item = (&'a [f32; QK_K], &'a mut [u8; B], &'a [f32; QK_K])> {
    let n_per_row = imatrix.len();
    assert!(
        n_per_row > 0 && n_per_row.is_multiple_of(QK_K) && x.len().is_multiple_of(n_per_row),
        "{what}: the importance matrix has {n_per_row} values, which does not divide the {} \
         values into rows of whole super-blocks",
        x.len()
    );
    let blocks_per_row = n_per_row / QK_K;
    blocks_mut::<B>(x, y, what)
        .enumerate()
        .map(move |(i, (xb, yb))| {
            let qw = as_array(&imatrix[(i % blocks_per_row) * QK_K..][..QK_K]);
            (xb, yb, qw)
        })
}

/// Defines the four public row functions of one K-quant type around its block functions, each
/// compiled for AVX2 as well (see [`super::simd`]): the reference quantizer, the importance-weighted
/// one for rows of `quant_weights.len()` values (as ggml's `quantize_X` loops over rows), the pick
/// between the two that `ggml_quantize_chunk` makes (weighted by `imatrix`, one weight per column,
/// when given) and the dequantizer.
macro_rules! row_functions {
    ($ggml:literal, $bytes:ident, $quantize_block:ident, $dequantize_block:ident,
     $quantize_ref:ident, $quantize_impl:ident, $quantize:ident, $dequantize:ident) => {
        avx2_dispatch! {
            #[doc = concat!($ggml, " reference quantizer over whole super-blocks; mirrors ggml's `quantize_row_", $ggml, "_ref`.")]
            pub fn $quantize_ref(x: &[f32], y: &mut [u8]) {
                for (xb, yb) in blocks_mut::<$bytes>(x, y, $ggml) {
                    $quantize_block(xb, yb, None);
                }
            }
        }

        avx2_dispatch! {
            #[doc = concat!("Importance-weighted ", $ggml, " quantizer for rows of `quant_weights.len()` values; mirrors ggml's `quantize_row_", $ggml, "_impl` (as looped over rows by `quantize_", $ggml, "`).")]
            pub fn $quantize_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
                for (xb, yb, qw) in blocks_with_weights::<$bytes>(x, y, quant_weights, $ggml) {
                    $quantize_block(xb, yb, Some(qw));
                }
            }
        }

        #[doc = concat!($ggml, " quantizer as `ggml_quantize_chunk` runs it: weighted by `imatrix` (one weight per column) when given, the reference quantizer otherwise.")]
        pub fn $quantize(x: &[f32], y: &mut [u8], imatrix: Option<&[f32]>) {
            match imatrix {
                Some(qw) => $quantize_impl(x, y, qw),
                None => $quantize_ref(x, y),
            }
        }

        avx2_dispatch! {
            #[doc = concat!($ggml, " to f32; mirrors ggml's `dequantize_row_", $ggml, "`.")]
            pub fn $dequantize(x: &[u8], y: &mut [f32]) {
                for (xb, yb) in blocks_out::<$bytes>(x, y, $ggml) {
                    $dequantize_block(xb, yb);
                }
            }
        }
    };
}

/// One super-block as `LANES` groups of `N` values, lane-major: `out[i][k] = x[N*k + i]`, the layout
/// of the lane-parallel searches in [`super::search`].
#[inline(always)]
fn transpose<const LANES: usize, const N: usize>(x: &[f32; QK_K]) -> [[f32; LANES]; N] {
    let mut out = [[0f32; LANES]; N];
    for k in 0..LANES {
        for i in 0..N {
            out[i][k] = x[N * k + i];
        }
    }
    out
}

/// A super-block and its importance weights in lanes, as ggml's imatrix K-quantizers compute them:
/// `w = qw·sqrt(σ² + x²)` with `σ² = sigma2_scale·Σx²/256` (summed in element order; the scale is 1
/// for Q2_K, 2 for Q3_K to Q5_K), and each lane's weight sum. Returns `(xt, wt, sw)`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn imatrix_weights_lanes<const LANES: usize, const N: usize>(
    x: &[f32; QK_K],
    qw: &[f32; QK_K],
    sigma2_scale: f32,
) -> ([[f32; LANES]; N], [[f32; LANES]; N], [f32; LANES]) {
    let mut sumx2 = 0.0f32;
    for j in 0..QK_K {
        sumx2 += x[j] * x[j];
    }
    let sigma2 = sigma2_scale * sumx2 / QK_K as f32;
    let xt = transpose::<LANES, N>(x);
    let qwt = transpose::<LANES, N>(qw);
    let mut wt = [[0f32; LANES]; N];
    for i in 0..N {
        for k in 0..LANES {
            wt[i][k] = qwt[i][k] * (sigma2 + xt[i][k] * xt[i][k]).sqrt();
        }
    }
    let mut sw = [0f32; LANES];
    for i in 0..N {
        for k in 0..LANES {
            sw[k] += wt[i][k];
        }
    }
    (xt, wt, sw)
}

/// The inverse of [`transpose`] for levels.
#[inline(always)]
fn untranspose<T: Copy, const LANES: usize, const N: usize>(
    lt: &[[T; LANES]; N],
    levels: &mut [T; QK_K],
) {
    for k in 0..LANES {
        for i in 0..N {
            levels[N * k + i] = lt[i][k];
        }
    }
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
/// levels of the search.
#[inline(always)]
fn q2_k_requantize(x: &[f32; QK_K], y: &[u8; Q2_K_BYTES], levels: &mut [u8; QK_K]) {
    let d_all = read_f16(&y[Q2_D..]);
    let dmin_all = read_f16(&y[Q2_DMIN..]);
    for j in 0..QK_K / 16 {
        let sc = y[Q2_SCALES + j];
        let d = d_all * (sc & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * (sc >> 4) as f32;
        for ii in 0..16 {
            let l = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3);
            levels[16 * j + ii] = l as u8;
        }
    }
}

#[inline(always)]
fn quantize_block_q2_k_ref(x: &[f32; QK_K], y: &mut [u8; Q2_K_BYTES]) {
    const Q4SCALE: f32 = 15.0;
    let mut levels = [0u8; QK_K];
    let xt = transpose::<16, 16>(x);
    let mut wt = [[0f32; 16]; 16];
    for i in 0..16 {
        for k in 0..16 {
            wt[i][k] = xt[i][k].abs();
        }
    }
    let mut lt = [[0u8; 16]; 16];
    let mut laux = [[0f32; 16]; 16];
    let (scales, mins) =
        make_qkx_quants_lanes(3, &xt, &wt, &mut lt, &mut laux, -0.5, 0.1, 15, true, false);
    untranspose(&lt, &mut levels);

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
    q2_k_requantize(x, y, &mut levels);
    pack_2bit(&levels, &mut y[Q2_QS..Q2_QS + 64]);
}

#[inline(always)]
fn quantize_block_q2_k_impl(x: &[f32; QK_K], y: &mut [u8; Q2_K_BYTES], qw: &[f32; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut ls = [0u8; QK_K / 16];
    let mut lm = [0u8; QK_K / 16];

    let (xt, wt, sw) = imatrix_weights_lanes::<16, 16>(x, qw, 1.0);
    let mut lt = [[0u8; 16]; 16];
    let mut laux = [[0f32; 16]; 16];
    let (scales, mins) =
        make_qkx_quants_lanes(3, &xt, &wt, &mut lt, &mut laux, -0.9, 0.05, 36, false, true);
    untranspose(&lt, &mut levels);

    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    write_f16(&mut y[Q2_D..], dm);
    write_f16(&mut y[Q2_DMIN..], mm);
    for j in 0..QK_K / 16 {
        y[Q2_SCALES + j] = ls[j] | (lm[j] << 4);
    }
    q2_k_requantize(x, y, &mut levels);
    pack_2bit(&levels, &mut y[Q2_QS..Q2_QS + 64]);
}

#[inline(always)]
fn quantize_block_q2_k(x: &[f32; QK_K], y: &mut [u8; Q2_K_BYTES], qw: Option<&[f32; QK_K]>) {
    match qw {
        Some(qw) => quantize_block_q2_k_impl(x, y, qw),
        None => quantize_block_q2_k_ref(x, y),
    }
}

row_functions!(
    "q2_K",
    Q2_K_BYTES,
    quantize_block_q2_k,
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
fn q3_k_scale(scales: &[u8], j: usize) -> i8 {
    let low = if j < 8 {
        scales[j] & 0xF
    } else {
        scales[j - 8] >> 4
    };
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    (low | (high << 4)) as i8 - 32
}

/// Final levels and bit packing of a Q3_K block once its scales are stored (shared tail of
/// `quantize_row_q3_K_ref` and `quantize_row_q3_K_impl`).
#[inline(always)]
fn q3_k_finish(x: &[f32; QK_K], y: &mut [u8; Q3_K_BYTES], levels: &mut [i8; QK_K]) {
    let d_all = read_f16(&y[Q3_D..]);
    for j in 0..QK_K / 16 {
        let sc = q3_k_scale(&y[Q3_SCALES..Q3_SCALES + 12], j);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            levels[16 * j + ii] = (l + 4) as i8;
        }
    }

    // The high bit of the 1st 32 quants goes to bit 0 of hmask[0..32], the next 32 to bit 1, etc.
    let mut low = [0u8; QK_K];
    let hmask = &mut y[Q3_HMASK..Q3_HMASK + 32];
    hmask.fill(0);
    for j in 0..QK_K {
        let mut l = levels[j] as u8;
        if l > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            l -= 4;
        }
        low[j] = l;
    }
    pack_2bit(&low, &mut y[Q3_QS..Q3_QS + 64]);
}

#[inline(always)]
fn quantize_block_q3_k_ref(x: &[f32; QK_K], y: &mut [u8; Q3_K_BYTES]) {
    let xt = transpose::<16, 16>(x);
    let mut lt = [[0i8; 16]; 16];
    let mut laux = [[0f32; 16]; 16];
    let scales = make_q3_quants_lanes(4, &xt, &mut lt, &mut laux);
    let mut levels = [0i8; QK_K];
    untranspose(&lt, &mut levels);

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
    q3_k_finish(x, y, &mut levels);
}

#[inline(always)]
fn quantize_block_q3_k_impl(x: &[f32; QK_K], y: &mut [u8; Q3_K_BYTES], qw: &[f32; QK_K]) {
    let mut ls = [0i8; QK_K / 16];

    let (xt, wt, sw) = imatrix_weights_lanes::<16, 16>(x, qw, 2.0);
    let mut lt = [[0i8; 16]; 16];
    let mut laux = [[0f32; 16]; 16];
    let scales = make_qx_quants_lanes(4, &xt, &wt, &mut lt, &mut laux);
    let mut levels = [0i8; QK_K];
    untranspose(&lt, &mut levels);

    y[Q3_SCALES..Q3_SCALES + 12].fill(0);
    let d_block = make_qx_quants(32, &scales, &mut ls, 1, Some(&sw));
    for j in 0..QK_K / 16 {
        q3_k_put_scale(&mut y[Q3_SCALES..Q3_SCALES + 12], j, ls[j] as i32);
    }
    write_f16(&mut y[Q3_D..], d_block);
    q3_k_finish(x, y, &mut levels);
}

#[inline(always)]
fn quantize_block_q3_k(x: &[f32; QK_K], y: &mut [u8; Q3_K_BYTES], qw: Option<&[f32; QK_K]>) {
    match qw {
        Some(qw) => quantize_block_q3_k_impl(x, y, qw),
        None => quantize_block_q3_k_ref(x, y),
    }
}

row_functions!(
    "q3_K",
    Q3_K_BYTES,
    quantize_block_q3_k,
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
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
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
/// scale is zero keep the levels of the search.
#[inline(always)]
fn qk4_requantize(x: &[f32; QK_K], block: &[u8], nmax: i32, levels: &mut [u8; QK_K]) {
    let d_all = read_f16(&block[QK4_D..]);
    let dmin_all = read_f16(&block[QK4_DMIN..]);
    let scales = &block[QK4_SCALES..QK4_SCALES + 12];
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            levels[32 * j + ii] = l as u8;
        }
    }
}

/// The shared front of `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref`: per-sub-block scale and
/// min by `make_qkx2_quants`, then both quantized to 6 bits against their maxima.
#[inline(always)]
fn qk4_ref_scales(
    x: &[f32; QK_K],
    block: &mut [u8],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    levels: &mut [u8; QK_K],
) {
    let xt = transpose::<8, 32>(x);
    let mut sum_x2 = [0f32; 8];
    for i in 0..32 {
        for k in 0..8 {
            sum_x2[k] += xt[i][k] * xt[i][k];
        }
    }
    let mut wt = [[0f32; 8]; 32];
    for k in 0..8 {
        let av_x = (sum_x2[k] / 32.0).sqrt();
        for i in 0..32 {
            wt[i][k] = av_x + xt[i][k].abs();
        }
    }
    let mut lt = [[0u8; 8]; 32];
    let mut laux = [[0f32; 8]; 32];
    let (scales, mins) = make_qkx_quants_lanes(
        nmax, &xt, &wt, &mut lt, &mut laux, rmin, rdelta, nstep, false, false,
    );
    untranspose(&lt, levels);

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
    qk4_requantize(x, block, nmax, levels);
}

/// The shared front of `quantize_row_q4_K_impl` and `quantize_row_q5_K_impl`: importance-weighted
/// `make_qkx3_quants` per sub-block, then `make_qp_quants` for the 6-bit scales and mins.
/// `clamp_63` is Q5_K's extra (no-op) `MIN(63, ..)`, kept to follow the C.
#[inline(always)]
fn qk4_impl_scales(
    x: &[f32; QK_K],
    block: &mut [u8],
    qw: &[f32; QK_K],
    nmax: i32,
    clamp_63: bool,
    levels: &mut [u8; QK_K],
) {
    let mut ls = [0u8; QK_K / 32];
    let mut lm = [0u8; QK_K / 32];

    let (xt, wt, sw) = imatrix_weights_lanes::<8, 32>(x, qw, 2.0);
    let mut lt = [[0u8; 8]; 32];
    let mut laux = [[0f32; 8]; 32];
    let (scales, mins) = make_qkx_quants_lanes(
        nmax, &xt, &wt, &mut lt, &mut laux, -0.9, 0.05, 36, false, true,
    );
    untranspose(&lt, levels);

    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
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
    qk4_requantize(x, block, nmax, levels);
}

// ===================================== Q4_K =====================================
// block_q4_K: d, dmin, scales[12], qs[128] (two sub-blocks of 32 per 32 bytes: low then high nibble).
const Q4_QS: usize = 16;

#[inline(always)]
fn q4_k_pack(levels: &[u8; QK_K], y: &mut [u8; Q4_K_BYTES]) {
    let q = &mut y[Q4_QS..Q4_QS + QK_K / 2];
    for (jb, j) in (0..QK_K).step_by(64).enumerate() {
        for l in 0..32 {
            q[32 * jb + l] = levels[j + l] | (levels[j + l + 32] << 4);
        }
    }
}

#[inline(always)]
fn quantize_block_q4_k(x: &[f32; QK_K], y: &mut [u8; Q4_K_BYTES], qw: Option<&[f32; QK_K]>) {
    let mut levels = [0u8; QK_K];
    match qw {
        Some(qw) => qk4_impl_scales(x, y, qw, 15, false, &mut levels),
        None => qk4_ref_scales(x, y, 15, -1.0, 0.1, 20, &mut levels),
    }
    q4_k_pack(&levels, y);
}

row_functions!(
    "q4_K",
    Q4_K_BYTES,
    quantize_block_q4_k,
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
fn q5_k_pack(levels: &[u8; QK_K], y: &mut [u8; Q5_K_BYTES]) {
    let (qh, ql) = y[Q5_QH..].split_at_mut(32);
    qh.fill(0);
    let mut m1 = 1u8;
    let mut m2 = 2u8;
    for (nb, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = levels[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = levels[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * nb + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

#[inline(always)]
fn quantize_block_q5_k(x: &[f32; QK_K], y: &mut [u8; Q5_K_BYTES], qw: Option<&[f32; QK_K]>) {
    let mut levels = [0u8; QK_K];
    match qw {
        Some(qw) => qk4_impl_scales(x, y, qw, 31, true, &mut levels),
        None => qk4_ref_scales(x, y, 31, -0.5, 0.1, 15, &mut levels),
    }
    q5_k_pack(&levels, y);
}

row_functions!(
    "q5_K",
    Q5_K_BYTES,
    quantize_block_q5_k,
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

/// The shared body of `quantize_row_q6_K_ref` (`qw` None) and `quantize_row_q6_K_impl`.
#[inline(always)]
fn quantize_block_q6_k(x: &[f32; QK_K], y: &mut [u8; Q6_K_BYTES], qw: Option<&[f32; QK_K]>) {
    let xt = transpose::<16, 16>(x);
    let mut wt = [[0f32; 16]; 16];
    match qw {
        Some(qw) => wt = transpose::<16, 16>(qw),
        None => {
            for i in 0..16 {
                for k in 0..16 {
                    wt[i][k] = xt[i][k] * xt[i][k];
                }
            }
        }
    }
    let mut lt = [[0i8; 16]; 16];
    let mut laux = [[0f32; 16]; 16];
    let scales = make_qx_quants_lanes(32, &xt, &wt, &mut lt, &mut laux);
    let mut levels = [0i8; QK_K];
    untranspose(&lt, &mut levels);

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

    let d_all = read_f16(&y[Q6_D..]);
    for j in 0..QK_K / 16 {
        let d = d_all * (y[Q6_SCALES + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            levels[16 * j + ii] = (l + 32) as i8;
        }
    }

    let (ql, qh) = y[Q6_QL..Q6_SCALES].split_at_mut(Q6_QH - Q6_QL);
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let ql = &mut ql[64 * half..64 * half + 64];
        let qh = &mut qh[32 * half..32 * half + 32];
        for l in 0..32 {
            let l0 = levels[j + l] as u8;
            let l1 = levels[j + l + 32] as u8;
            let l2 = levels[j + l + 64] as u8;
            let l3 = levels[j + l + 96] as u8;
            ql[l] = (l0 & 0xF) | ((l2 & 0xF) << 4);
            ql[l + 32] = (l1 & 0xF) | ((l3 & 0xF) << 4);
            qh[l] = (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6);
        }
    }
}

row_functions!(
    "q6_K",
    Q6_K_BYTES,
    quantize_block_q6_k,
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

avx2_dispatch! {
    /// Q8_K to f32; mirrors ggml's `dequantize_row_q8_K`.
    pub fn dequantize_row_q8_k(x: &[u8], y: &mut [f32]) {
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_and_avx2_builds_give_the_same_bits() {
        // Rows with zeros, ties, outliers and wide magnitudes; the interop tests compare the dispatched
        // build with libggml, this pins the portable build to it.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let x: Vec<f32> = (0..4096)
            .map(|i| {
                let r = next();
                let v = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i % 7 {
                    0 => 0.0,
                    1 => (v * 16.0).round() * 0.5,
                    2 => v * 1e4,
                    _ => v * 10f32.powi((r % 13) as i32 - 6),
                }
            })
            .collect();
        let imatrix: Vec<f32> = (0..1024)
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
        for (quantize, dequantize, bytes) in codecs {
            for imat in [None, Some(&imatrix[..])] {
                let quantized = || {
                    let mut y = vec![0u8; x.len() / QK_K * bytes];
                    quantize(&x, &mut y, imat);
                    y
                };
                let dispatched = quantized();
                let portable = crate::quant::simd::portable_only(quantized);
                assert!(
                    portable == dispatched,
                    "{bytes}-byte blocks, imatrix {}",
                    imat.is_some()
                );
                let dequantized = || {
                    let mut y = vec![0f32; x.len()];
                    dequantize(&dispatched, &mut y);
                    y
                };
                let dispatched_f32 = dequantized();
                let portable_f32 = crate::quant::simd::portable_only(dequantized);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&portable_f32) == bits(&dispatched_f32),
                    "{bytes}-byte dequantize"
                );
            }
        }
    }
}
