//! The non-linear 4-bit codecs IQ4_NL and IQ4_XS, quantizers and dequantizers bit-identical to ggml.
//!
//! Both map 4-bit indices through the same 16-entry table of levels (`kvalues_iq4nl`); IQ4_NL has one
//! f16 scale per 32 elements, IQ4_XS a super-block of 256 with an f16 scale and eight 6-bit sub-scales.
//! Their quantizers are what `ggml_quantize_chunk` runs (`quantize_iq4_nl` / `quantize_iq4_xs`, which
//! search 7 scales either side whether or not an imatrix is given; without one the weights are `x²`).

// Index loops mirror the C and walk several arrays in step; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use super::float::{read_f16, write_f16};
use super::search::{nearest_int, GROUP_MAX_EPS};
use super::{Codec, QK_K};

/// `kvalues_iq4nl` from `ggml-common.h`: the levels a 4-bit IQ4 index stands for.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements per IQ4_NL block (`QK4_NL`).
pub const QK4_NL: usize = 32;

/// Mirrors ggml's `best_index_int8`: the index of the table value nearest to `x` (binary search; a
/// tie goes to the upper value).
#[inline]
fn best_index_int8(val: &[i8; 16], x: f32) -> u8 {
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < val[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (val[mu - 1] as f32) < val[mu] as f32 - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// [`best_index_int8`] for `id * xb[j]` over a 32-element sub-block, branch-free so it vectorizes.
/// Same answers: strictly inside the table, the binary search ends at `mu` = the number of levels
/// `<= x` (the levels are strictly increasing), then picks the nearer neighbour, ties going up;
/// outside it clamps; a NaN falls through every comparison of the search and ends at 15.
#[inline(always)]
fn best_indices(values: &[i8; 16], id: f32, xb: &[f32], out: &mut [u8; IQ4_BLOCK]) {
    let vf: [f32; 16] = values.map(|v| v as f32);
    let mut x = [0f32; IQ4_BLOCK];
    for (xj, &v) in x.iter_mut().zip(xb) {
        *xj = id * v;
    }
    // Levels at or below each x, counted level by level so the loop runs across the 32 values.
    let mut count = [0i32; IQ4_BLOCK];
    for v in vf {
        for j in 0..IQ4_BLOCK {
            count[j] += (v <= x[j]) as i32;
        }
    }
    for j in 0..IQ4_BLOCK {
        let mu = count[j].clamp(1, 15) as usize;
        let (lo, hi) = (vf[mu - 1], vf[mu]);
        let near = if x[j] - lo < hi - x[j] { mu - 1 } else { mu };
        out[j] = if x[j] <= vf[0] {
            0
        } else if x[j] >= vf[15] || x[j].is_nan() {
            15
        } else {
            near as u8
        };
    }
}

/// Sub-block size of both IQ4 types' scale search.
const IQ4_BLOCK: usize = 32;
/// Scales tried either side of the first guess by `ggml_quantize_chunk` (`ntry = 7`).
const IQ4_NTRY: i32 = 7;

/// Where `quantize_iq4` puts a super-block's output.
struct Iq4Out<'a> {
    /// The f16 super-block scale.
    dh: &'a mut [u8],
    /// 4-bit indices, `super_block_size / 2` bytes.
    q4: &'a mut [u8],
    /// IQ4_XS only: the 2 high bits (u16 LE) and 4 low bits of each 6-bit sub-block scale.
    scales: Option<(&'a mut [u8], &'a mut [u8])>,
}

/// Mirrors `quantize_row_iq4_nl_impl` with `ntry = 7` (the only way `ggml_quantize_chunk` calls it)
/// for one super-block `x` of 32 (IQ4_NL) or 256 (IQ4_XS) values, with optional importance weights.
fn quantize_iq4(x: &[f32], out: Iq4Out<'_>, quant_weights: Option<&[f32]>) {
    let values = &KVALUES_IQ4NL;
    let super_block_size = x.len();
    let nb = super_block_size / IQ4_BLOCK;
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; QK_K / IQ4_BLOCK];
    let mut weight = [0f32; IQ4_BLOCK];

    let mut sigma2 = 0f32;
    for &v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / super_block_size as f32;

    out.q4.fill(0);
    write_f16(out.dh, 0.0);

    let mut max_scale = 0f32;
    let mut amax_scale = 0f32;
    for ib in 0..nb {
        let xb = &x[ib * IQ4_BLOCK..(ib + 1) * IQ4_BLOCK];
        let lb = &mut l[ib * IQ4_BLOCK..(ib + 1) * IQ4_BLOCK];
        match quant_weights {
            Some(qw) => {
                let qw = &qw[ib * IQ4_BLOCK..(ib + 1) * IQ4_BLOCK];
                for j in 0..IQ4_BLOCK {
                    weight[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
            }
            None => {
                for j in 0..IQ4_BLOCK {
                    weight[j] = xb[j] * xb[j];
                }
            }
        }
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut d = -max / values[0] as f32;
        let mut id = 1.0 / d;
        let mut sumqx = 0f32;
        let mut sumq2 = 0f32;
        let mut idx = [0u8; IQ4_BLOCK];
        best_indices(values, id, xb, &mut idx);
        lb.copy_from_slice(&idx);
        for j in 0..IQ4_BLOCK {
            let li = idx[j];
            let q = values[li as usize] as f32;
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -IQ4_NTRY..=IQ4_NTRY {
            id = (itry + values[0] as i32) as f32 / max;
            sumqx = 0.0;
            sumq2 = 0.0;
            best_indices(values, id, xb, &mut idx);
            for j in 0..IQ4_BLOCK {
                let li = idx[j];
                let q = values[li as usize] as f32;
                let w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        let abs_d = d.abs();
        if abs_d > amax_scale {
            amax_scale = abs_d;
            max_scale = d;
        }
    }

    if let Some((scales_h, scales_l)) = out.scales {
        let mut sh = 0u16;
        let d = -max_scale / 32.0;
        write_f16(out.dh, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for ib in 0..nb {
            let mut ls = nearest_int(id * scales[ib]);
            ls = ls.clamp(-32, 31);
            let dl = d * ls as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            let xb = &x[ib * IQ4_BLOCK..(ib + 1) * IQ4_BLOCK];
            let lb = &mut l[ib * IQ4_BLOCK..(ib + 1) * IQ4_BLOCK];
            for j in 0..IQ4_BLOCK {
                lb[j] = best_index_int8(values, idl * xb[j]);
            }
            let ls = (ls + 32) as u8;
            let (l_l, l_h) = (ls & 0xf, ls >> 4);
            if ib % 2 == 0 {
                scales_l[ib / 2] = l_l;
            } else {
                scales_l[ib / 2] |= l_l << 4;
            }
            sh |= (l_h as u16) << (2 * (ib % 8));
        }
        scales_h[..2].copy_from_slice(&sh.to_le_bytes());
    } else {
        write_f16(out.dh, scales[0]);
        let id = if scales[0] != 0.0 {
            1.0 / scales[0]
        } else {
            0.0
        };
        for j in 0..super_block_size {
            l[j] = best_index_int8(values, id * x[j]);
        }
    }

    for i in 0..super_block_size / 32 {
        for j in 0..16 {
            out.q4[16 * i + j] = l[32 * i + j] | (l[32 * i + 16 + j] << 4);
        }
    }
}

/// Mirrors `quantize_iq4_nl` for one row, as `ggml_quantize_chunk` runs it without an imatrix.
pub fn quantize_row_iq4_nl(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK4_NL).zip(y.chunks_exact_mut(IQ4_NL_BYTES)) {
        let (dh, q4) = yb.split_at_mut(2);
        let out = Iq4Out {
            dh,
            q4,
            scales: None,
        };
        quantize_iq4(xb, out, None);
    }
}

/// Mirrors `quantize_iq4_nl` for one row with per-column importance weights.
pub fn quantize_row_iq4_nl_imatrix(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    for ((xb, yb), qw) in x
        .chunks_exact(QK4_NL)
        .zip(y.chunks_exact_mut(IQ4_NL_BYTES))
        .zip(quant_weights.chunks_exact(QK4_NL))
    {
        let (dh, q4) = yb.split_at_mut(2);
        let out = Iq4Out {
            dh,
            q4,
            scales: None,
        };
        quantize_iq4(xb, out, Some(qw));
    }
}

/// Splits an IQ4_XS block into its fields.
fn iq4_xs_out(yb: &mut [u8]) -> Iq4Out<'_> {
    let (dh, rest) = yb.split_at_mut(2);
    let (scales_h, rest) = rest.split_at_mut(2);
    let (scales_l, q4) = rest.split_at_mut(4);
    Iq4Out {
        dh,
        q4,
        scales: Some((scales_h, scales_l)),
    }
}

/// Mirrors `quantize_iq4_xs` for one row, as `ggml_quantize_chunk` runs it without an imatrix
/// (also what `quantize_row_iq4_xs_ref` does).
pub fn quantize_row_iq4_xs(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(IQ4_XS_BYTES)) {
        quantize_iq4(xb, iq4_xs_out(yb), None);
    }
}

/// Mirrors `quantize_iq4_xs` for one row with per-column importance weights.
pub fn quantize_row_iq4_xs_imatrix(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    for ((xb, yb), qw) in x
        .chunks_exact(QK_K)
        .zip(y.chunks_exact_mut(IQ4_XS_BYTES))
        .zip(quant_weights.chunks_exact(QK_K))
    {
        quantize_iq4(xb, iq4_xs_out(yb), Some(qw));
    }
}

// block_iq4_nl: d (f16) | qs[16] (element j in the low nibble of byte j, j+16 in its high nibble)
const IQ4_NL_BYTES: usize = 18;

/// Mirrors `dequantize_row_iq4_nl`: `d * kvalues_iq4nl[q]`.
pub fn dequantize_row_iq4_nl(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(IQ4_NL_BYTES).zip(y.chunks_exact_mut(QK4_NL)) {
        let d = read_f16(&xb[0..2]);
        let (lo, hi) = yb.split_at_mut(QK4_NL / 2);
        for j in 0..QK4_NL / 2 {
            let q = xb[2 + j];
            lo[j] = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
            hi[j] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
        }
    }
}

// block_iq4_xs: d (f16) | scales_h (u16, 2 bits per sub-block) | scales_l[4] (4 bits per sub-block)
// | qs[128] (per 32-element sub-block: 16 bytes, low nibbles first half, high nibbles second half)
const IQ4_XS_BYTES: usize = 136;

/// Mirrors `dequantize_row_iq4_xs`: per 32-element sub-block `dl = d * (ls - 32)` with the 6-bit
/// sub-scale `ls`, then `dl * kvalues_iq4nl[q]`.
pub fn dequantize_row_iq4_xs(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in x.chunks_exact(IQ4_XS_BYTES).zip(y.chunks_exact_mut(QK_K)) {
        let d = read_f16(&xb[0..2]);
        let scales_h = u16::from_le_bytes([xb[2], xb[3]]) as i32;
        let scales_l = &xb[4..8];
        let qs = &xb[8..];
        for (ib, (ys, q)) in yb.chunks_exact_mut(32).zip(qs.chunks_exact(16)).enumerate() {
            let ls = ((scales_l[ib / 2] as i32 >> (4 * (ib % 2))) & 0xf)
                | (((scales_h >> (2 * ib)) & 3) << 4);
            let dl = d * (ls - 32) as f32;
            let (lo, hi) = ys.split_at_mut(16);
            for j in 0..16 {
                lo[j] = dl * KVALUES_IQ4NL[(q[j] & 0x0F) as usize] as f32;
                hi[j] = dl * KVALUES_IQ4NL[(q[j] >> 4) as usize] as f32;
            }
        }
    }
}

/// IQ4_NL's entry in the type table.
pub const IQ4_NL: Codec = Codec {
    dequantize: Some(dequantize_row_iq4_nl),
    quantize: Some(quantize_row_iq4_nl),
    quantize_imatrix: Some(quantize_row_iq4_nl_imatrix),
};

/// IQ4_XS's entry in the type table.
pub const IQ4_XS: Codec = Codec {
    dequantize: Some(dequantize_row_iq4_xs),
    quantize: Some(quantize_row_iq4_xs),
    quantize_imatrix: Some(quantize_row_iq4_xs_imatrix),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_free_best_indices_equal_the_binary_search() {
        // Every level, every midpoint (a tie), points just around them, far outside, inf and NaN.
        let mut probes = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1e9,
            1e9,
            0.0,
            -0.0,
        ];
        for w in KVALUES_IQ4NL.windows(2) {
            let (a, b) = (w[0] as f32, w[1] as f32);
            let mid = (a + b) / 2.0;
            for v in [a, b, mid] {
                probes.extend([
                    v,
                    f32::from_bits(v.to_bits() + 1),
                    f32::from_bits(v.to_bits() - 1),
                ]);
            }
        }
        for chunk in probes.chunks(IQ4_BLOCK) {
            let mut xb = [0f32; IQ4_BLOCK];
            xb[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0u8; IQ4_BLOCK];
            best_indices(&KVALUES_IQ4NL, 1.0, &xb, &mut out);
            for (x, got) in xb.iter().zip(out) {
                assert_eq!(got, best_index_int8(&KVALUES_IQ4NL, *x), "x = {x:e}");
            }
        }
    }
}
