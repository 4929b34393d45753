//! The non-linear 4-bit codecs IQ4_NL and IQ4_XS: dequantizers bit-identical to ggml's `to_float`.
//!
//! Both map 4-bit indices through the same 16-entry table of levels (`kvalues_iq4nl`); IQ4_NL has one
//! f16 scale per 32 elements, IQ4_XS a super-block of 256 with an f16 scale and eight 6-bit sub-scales.

use super::float::read_f16;
use super::{Codec, QK_K};

/// `kvalues_iq4nl` from `ggml-common.h`: the levels a 4-bit IQ4 index stands for.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements per IQ4_NL block (`QK4_NL`).
pub const QK4_NL: usize = 32;

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
    quantize: None,
    quantize_imatrix: None,
};

/// IQ4_XS's entry in the type table.
pub const IQ4_XS: Codec = Codec {
    dequantize: Some(dequantize_row_iq4_xs),
    quantize: None,
    quantize_imatrix: None,
};
