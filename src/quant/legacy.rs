//! The legacy 32-element block codecs Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1, bit-identical to ggml.
//!
//! Per type, side by side as in `ggml-quants.c`: the reference quantizer (`quantize_row_X_ref`, what
//! `ggml_quantize_chunk` runs without an importance matrix), the importance-weighted quantizer
//! (`quantize_row_X_impl`, what it runs with one) and the dequantizer (`dequantize_row_X`, the type's
//! `to_float`). Every function works on whole blocks; the registry in [`super`] checks the sizes.
//!
//! Bit-identity rests on doing the float operations in ggml's order with no fused multiply-add: the
//! `libggml-base.so` we compare with contains no FMA instruction at all (checked with `objdump`), and
//! Rust never contracts `a * b + c` on its own.

use super::float::{read_f16, write_f16};
use super::search::{make_qkx3_quants, make_qx_quants};
use super::Codec;

/// Elements per block of every legacy type (`QK4_0`, `QK4_1`, `QK5_0`, `QK5_1`, `QK8_0`, `QK8_1`).
pub const QK: usize = 32;

/// C's float → integer conversion as x86-64 executes it (`cvttss2si`/`cvttps2dq`): truncation toward
/// zero, and the "integer indefinite" `i32::MIN` for NaN and out-of-range values, where Rust's `as`
/// would saturate instead. ggml then narrows to `int8_t`/`uint8_t` by keeping the low byte, which the
/// callers do with `as i8`/`as u8`. Matters only for degenerate blocks (e.g. a tiny scale whose inverse
/// overflows to inf), but those must match too.
#[inline]
fn c_float_to_int(x: f32) -> i32 {
    if x.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&x) {
        i32::MIN
    } else {
        x as i32
    }
}

/// The value of largest magnitude in a block, keeping its sign (the first one wins a tie), as the
/// `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` loops of ggml compute it.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum of a block, starting from `FLT_MAX`/`-FLT_MAX` as ggml does.
#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `sigma2 = Σx²/n` over the whole row: the variance term of every legacy `quantize_row_X_impl`.
#[inline]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// The per-element weights of a block in the legacy `_impl` quantizers: `qw[j] * sqrtf(sigma2 + x[j]²)`.
#[inline]
fn block_weights(xb: &[f32], qw: &[f32], sigma2: f32) -> [f32; QK] {
    let mut weight = [0.0f32; QK];
    for j in 0..QK {
        weight[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
    }
    weight
}

/// Packs 32 5-bit levels into `qs` (low nibbles, element j and j+16 share a byte) and the `qh` bit
/// word, as the Q5 quantizers of ggml do.
#[inline]
fn pack_5bit(levels: &[u8; QK], qs: &mut [u8], qh_out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let xi0 = levels[j];
        let xi1 = levels[j + QK / 2];
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    qh_out[..4].copy_from_slice(&qh.to_le_bytes());
}

// ===================================== Q4_0 =====================================
// block_q4_0: d (f16) | qs[16] (element j in the low nibble of byte j, element j+16 in its high nibble)

const Q4_0_BYTES: usize = 18;

/// Mirrors `quantize_row_q4_0_ref`: `d = max / -8`, levels `min(15, (int8_t)(x/d + 8.5))`.
pub fn quantize_row_q4_0_ref(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q4_0_BYTES)) {
        let max = signed_absmax(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            // C: MIN(15, (int8_t)(x + 8.5f)) compared as int, then stored as uint8_t.
            let xi0 = (c_float_to_int(x0 + 8.5) as i8).min(15) as u8;
            let xi1 = (c_float_to_int(x1 + 8.5) as i8).min(15) as u8;
            yb[2 + j] = xi0 | (xi1 << 4);
        }
    }
}

/// Mirrors `quantize_row_q4_0_impl`: per block, `make_qx_quants(32, 8, x, L, 1, w)` with
/// `w = imatrix * sqrt(sigma2 + x²)`.
pub fn quantize_row_q4_0_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut l = [0i8; QK];
    for ((xb, yb), qw) in x
        .chunks_exact(QK)
        .zip(y.chunks_exact_mut(Q4_0_BYTES))
        .zip(quant_weights.chunks_exact(QK))
    {
        let weight = block_weights(xb, qw, sigma2);
        let d = make_qx_quants(8, xb, &mut l, 1, Some(&weight));
        write_f16(&mut yb[0..2], d);
        for j in 0..QK / 2 {
            yb[2 + j] = (l[j] as u8) | ((l[j + 16] as u8) << 4);
        }
    }
}

/// Mirrors `dequantize_row_q4_0`: `(q - 8) * d`.
pub fn dequantize_row_q4_0(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q4_0_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[2 + j];
            lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

// ===================================== Q4_1 =====================================
// block_q4_1: d (f16) | m (f16) | qs[16]

const Q4_1_BYTES: usize = 20;

/// Mirrors `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`, levels
/// `min(15, (int8_t)((x - min)/d + 0.5))`.
pub fn quantize_row_q4_1_ref(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q4_1_BYTES)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        write_f16(&mut yb[2..4], min);
        for j in 0..QK / 2 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[QK / 2 + j] - min) * id;
            let xi0 = (c_float_to_int(x0 + 0.5) as i8).min(15) as u8;
            let xi1 = (c_float_to_int(x1 + 0.5) as i8).min(15) as u8;
            yb[4 + j] = xi0 | (xi1 << 4);
        }
    }
}

/// Mirrors `quantize_row_q4_1_impl`: per block, `make_qkx3_quants(32, 15, x, w, L, &min, Laux, -0.9,
/// 0.05, 36, false)` with `w = imatrix * sqrt(sigma2 + x²)`; stores `d` and `m = -min`.
pub fn quantize_row_q4_1_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut l = [0u8; QK];
    let mut laux = [0u8; QK];
    for ((xb, yb), qw) in x
        .chunks_exact(QK)
        .zip(y.chunks_exact_mut(Q4_1_BYTES))
        .zip(quant_weights.chunks_exact(QK))
    {
        let weight = block_weights(xb, qw, sigma2);
        let (d, the_min) = make_qkx3_quants(
            15,
            xb,
            Some(&weight),
            &mut l,
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        write_f16(&mut yb[0..2], d);
        write_f16(&mut yb[2..4], -the_min);
        for j in 0..QK / 2 {
            yb[4 + j] = l[j] | (l[j + 16] << 4);
        }
    }
}

/// Mirrors `dequantize_row_q4_1`: `q * d + m`.
pub fn dequantize_row_q4_1(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q4_1_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let m = read_f16(&xb[2..4]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[4 + j];
            lo[j] = (q & 0x0F) as f32 * d + m;
            hi[j] = (q >> 4) as f32 * d + m;
        }
    }
}

// ===================================== Q5_0 =====================================
// block_q5_0: d (f16) | qh[4] (bit j = fifth bit of element j) | qs[16]

const Q5_0_BYTES: usize = 22;

/// Mirrors `quantize_row_q5_0_ref`: `d = max / -16`, levels `min(31, (int8_t)(x/d + 16.5))`.
pub fn quantize_row_q5_0_ref(x: &[f32], y: &mut [u8]) {
    let mut levels = [0u8; QK];
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q5_0_BYTES)) {
        let max = signed_absmax(xb);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        for (level, &v) in levels.iter_mut().zip(xb) {
            *level = (c_float_to_int(v * id + 16.5) as i8).min(31) as u8;
        }
        let (head, qs) = yb.split_at_mut(6);
        pack_5bit(&levels, qs, &mut head[2..6]);
    }
}

/// Reads the `qh` word of a Q5 block.
#[inline]
fn read_qh(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Mirrors `quantize_row_q5_0_impl`: per block, `make_qx_quants(32, 16, x, L, 1, w)` with
/// `w = imatrix * sqrt(sigma2 + x²)`.
pub fn quantize_row_q5_0_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut l = [0i8; QK];
    let mut levels = [0u8; QK];
    for ((xb, yb), qw) in x
        .chunks_exact(QK)
        .zip(y.chunks_exact_mut(Q5_0_BYTES))
        .zip(quant_weights.chunks_exact(QK))
    {
        let weight = block_weights(xb, qw, sigma2);
        let d = make_qx_quants(16, xb, &mut l, 1, Some(&weight));
        write_f16(&mut yb[0..2], d);
        for (level, &q) in levels.iter_mut().zip(&l) {
            *level = q as u8;
        }
        let (head, qs) = yb.split_at_mut(6);
        pack_5bit(&levels, qs, &mut head[2..6]);
    }
}

/// Mirrors `dequantize_row_q5_0`: `(q - 16) * d`.
pub fn dequantize_row_q5_0(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q5_0_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let qh = read_qh(&xb[2..6]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[6 + j];
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            lo[j] = (((q & 0x0F) as u32 | xh_0) as i32 - 16) as f32 * d;
            hi[j] = (((q >> 4) as u32 | xh_1) as i32 - 16) as f32 * d;
        }
    }
}

// ===================================== Q5_1 =====================================
// block_q5_1: d (f16) | m (f16) | qh[4] | qs[16]

const Q5_1_BYTES: usize = 24;

/// Mirrors `quantize_row_q5_1_ref`: `d = (max - min) / 31`, `m = min`, levels
/// `(uint8_t)((x - min)/d + 0.5)` (no clamp in ggml).
pub fn quantize_row_q5_1_ref(x: &[f32], y: &mut [u8]) {
    let mut levels = [0u8; QK];
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q5_1_BYTES)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        write_f16(&mut yb[2..4], min);
        for (level, &v) in levels.iter_mut().zip(xb) {
            *level = c_float_to_int((v - min) * id + 0.5) as u8;
        }
        let (head, qs) = yb.split_at_mut(8);
        pack_5bit(&levels, qs, &mut head[4..8]);
    }
}

/// Mirrors `quantize_row_q5_1_impl`: per block, `make_qkx3_quants(32, 31, x, w, L, &min, Laux, -0.9,
/// 0.05, 36, false)` with `w = imatrix * sqrt(sigma2 + x²)`; stores `d` and `m = -min`.
pub fn quantize_row_q5_1_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    let mut l = [0u8; QK];
    let mut laux = [0u8; QK];
    for ((xb, yb), qw) in x
        .chunks_exact(QK)
        .zip(y.chunks_exact_mut(Q5_1_BYTES))
        .zip(quant_weights.chunks_exact(QK))
    {
        let weight = block_weights(xb, qw, sigma2);
        let (d, the_min) = make_qkx3_quants(
            31,
            xb,
            Some(&weight),
            &mut l,
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        write_f16(&mut yb[0..2], d);
        write_f16(&mut yb[2..4], -the_min);
        let (head, qs) = yb.split_at_mut(8);
        pack_5bit(&l, qs, &mut head[4..8]);
    }
}

/// Mirrors `dequantize_row_q5_1`: `q * d + m`.
pub fn dequantize_row_q5_1(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q5_1_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        let m = read_f16(&xb[2..4]);
        let qh = read_qh(&xb[4..8]);
        let (lo, hi) = yb.split_at_mut(QK / 2);
        for j in 0..QK / 2 {
            let q = xb[8 + j];
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            lo[j] = ((q & 0x0F) as u32 | xh_0) as f32 * d + m;
            hi[j] = ((q >> 4) as u32 | xh_1) as f32 * d + m;
        }
    }
}

// ===================================== Q8_0 =====================================
// block_q8_0: d (f16) | qs[32] (int8). ggml has no importance-weighted Q8_0: `quantize_q8_0` ignores
// the imatrix.

const Q8_0_BYTES: usize = 34;

/// Mirrors `quantize_row_q8_0_ref`: `d = amax / 127`, `q = roundf(x / d)` (ties away from zero).
pub fn quantize_row_q8_0_ref(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_0_BYTES)) {
        let mut amax = 0.0f32;
        for &v in xb {
            amax = amax.max(v.abs());
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        for (q, &v) in yb[2..].iter_mut().zip(xb) {
            *q = c_float_to_int((v * id).round()) as u8;
        }
    }
}

/// Mirrors `dequantize_row_q8_0`: `q * d`.
pub fn dequantize_row_q8_0(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(Q8_0_BYTES).zip(y.chunks_exact_mut(QK)) {
        let d = read_f16(&xb[0..2]);
        for (out, &q) in yb.iter_mut().zip(&xb[2..]) {
            *out = (q as i8) as f32 * d;
        }
    }
}

// ===================================== Q8_1 =====================================
// block_q8_1: d (f16) | s = d * Σq (f16) | qs[32]. ggml has no `to_float` for Q8_1 (it only feeds dot
// products), so only the quantizer exists here.

const Q8_1_BYTES: usize = 36;

/// Mirrors `quantize_row_q8_1_ref`: as Q8_0, plus `s = Σq * d`.
pub fn quantize_row_q8_1_ref(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact_mut(Q8_1_BYTES)) {
        let mut amax = 0.0f32;
        for &v in xb {
            amax = amax.max(v.abs());
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(&mut yb[0..2], d);
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            let q0 = c_float_to_int((xb[j] * id).round()) as i8;
            let q1 = c_float_to_int((xb[QK / 2 + j] * id).round()) as i8;
            yb[4 + j] = q0 as u8;
            yb[4 + QK / 2 + j] = q1 as u8;
            sum += q0 as i32 + q1 as i32;
        }
        write_f16(&mut yb[2..4], sum as f32 * d);
    }
}

/// Q4_0's entry in the type table.
pub const Q4_0: Codec = Codec {
    dequantize: Some(dequantize_row_q4_0),
    quantize: Some(quantize_row_q4_0_ref),
    quantize_imatrix: Some(quantize_row_q4_0_impl),
};

/// Q4_1's entry in the type table.
pub const Q4_1: Codec = Codec {
    dequantize: Some(dequantize_row_q4_1),
    quantize: Some(quantize_row_q4_1_ref),
    quantize_imatrix: Some(quantize_row_q4_1_impl),
};

/// Q5_0's entry in the type table.
pub const Q5_0: Codec = Codec {
    dequantize: Some(dequantize_row_q5_0),
    quantize: Some(quantize_row_q5_0_ref),
    quantize_imatrix: Some(quantize_row_q5_0_impl),
};

/// Q5_1's entry in the type table.
pub const Q5_1: Codec = Codec {
    dequantize: Some(dequantize_row_q5_1),
    quantize: Some(quantize_row_q5_1_ref),
    quantize_imatrix: Some(quantize_row_q5_1_impl),
};

/// Q8_0's entry in the type table (`quantize_q8_0` ignores an imatrix).
pub const Q8_0: Codec = Codec {
    dequantize: Some(dequantize_row_q8_0),
    quantize: Some(quantize_row_q8_0_ref),
    quantize_imatrix: None,
};

/// Q8_1's entry in the type table: quantize only, like ggml (no `to_float`, no imatrix variant).
pub const Q8_1: Codec = Codec {
    dequantize: None,
    quantize: Some(quantize_row_q8_1_ref),
    quantize_imatrix: None,
};
