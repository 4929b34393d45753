//! Plain float types (F32, F16, BF16): conversions bit-identical to ggml's scalar helpers.
//!
//! ggml converts with its own bit recipes (`ggml-impl.h`), not with hardware instructions, inside
//! `ggml_quantize_chunk` and the `to_float` type traits; the recipes differ from IEEE hardware only in
//! how NaNs come out, but that is enough to break bit-identity, so they are restated here. The f16 ↔ f32
//! helpers are also what every block codec uses for its `ggml_half` scales.

use super::Codec;

/// One f16 bit pattern to f32, mirroring ggml's `ggml_compute_fp16_to_fp32` (`GGML_FP16_TO_FP32`).
///
/// Exact for every finite value and infinity; a NaN keeps its payload and its signalling bit (IEEE
/// hardware conversion would set the quiet bit).
#[inline(always)]
pub fn fp16_to_fp32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);

    const EXP_OFFSET: u32 = 0xE0 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 0x1.0p-112f
    let normalized_value = f32::from_bits((two_w >> 4) + EXP_OFFSET) * exp_scale;

    const MAGIC_MASK: u32 = 126 << 23;
    let magic_bias = 0.5f32;
    let denormalized_value = f32::from_bits((two_w >> 17) | MAGIC_MASK) - magic_bias;

    const DENORMALIZED_CUTOFF: u32 = 1 << 27;
    let result = sign
        | if two_w < DENORMALIZED_CUTOFF {
            denormalized_value.to_bits()
        } else {
            normalized_value.to_bits()
        };
    f32::from_bits(result)
}

/// f32 to f16 bits, rounding to nearest even, mirroring ggml's `ggml_compute_fp32_to_fp16`
/// (`GGML_FP32_TO_FP16`): overflow gives ±inf, every NaN gives the canonical `0x7E00` with its sign.
#[inline(always)]
pub fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 0x1.0p+112f
    let scale_to_zero = f32::from_bits(0x0880_0000); // 0x1.0p-110f
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;

    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xFF00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }

    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xFF00_0000 {
            0x7E00
        } else {
            nonsign
        }) as u16
}

/// One bf16 bit pattern to f32, mirroring ggml's `ggml_compute_bf16_to_fp32` (a shift; exact).
#[inline]
pub fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 to bf16 bits, mirroring ggml's `ggml_compute_fp32_to_bf16` (`GGML_FP32_TO_BF16`): round to
/// nearest even on the raw bits (so overflow carries into ±inf), NaNs made quiet by setting bit 6 of
/// the truncated pattern, subnormals kept.
#[inline]
pub fn fp32_to_bf16(s: f32) -> u16 {
    let i = s.to_bits();
    if i & 0x7fff_ffff > 0x7f80_0000 {
        return ((i >> 16) | 64) as u16;
    }
    (i.wrapping_add(0x7fff + ((i >> 16) & 1)) >> 16) as u16
}

/// Reads the little-endian `ggml_half` at `b[0..2]` as f32.
#[inline(always)]
pub(crate) fn read_f16(b: &[u8]) -> f32 {
    fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]))
}

/// Writes `v` as a little-endian `ggml_half` into `b[0..2]`.
#[inline(always)]
pub(crate) fn write_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&fp32_to_fp16(v).to_le_bytes());
}

/// F32 rows are stored as they are: mirrors the `memcpy` of `ggml_quantize_chunk` for `GGML_TYPE_F32`.
pub fn quantize_row_f32(x: &[f32], y: &mut [u8]) {
    for (v, out) in x.iter().zip(y.chunks_exact_mut(4)) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}

/// Mirrors F32's `to_float` (a copy).
pub fn dequantize_row_f32(x: &[u8], y: &mut [f32]) {
    for (b, out) in x.chunks_exact(4).zip(y.iter_mut()) {
        *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Mirrors `ggml_fp32_to_fp16_row` (what `ggml_quantize_chunk` runs for `GGML_TYPE_F16`).
pub fn quantize_row_f16(x: &[f32], y: &mut [u8]) {
    for (v, out) in x.iter().zip(y.chunks_exact_mut(2)) {
        out.copy_from_slice(&fp32_to_fp16(*v).to_le_bytes());
    }
}

/// Mirrors `ggml_fp16_to_fp32_row` (F16's `to_float`).
pub fn dequantize_row_f16(x: &[u8], y: &mut [f32]) {
    for (b, out) in x.chunks_exact(2).zip(y.iter_mut()) {
        *out = fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// Mirrors `ggml_fp32_to_bf16_row_ref` (what `ggml_quantize_chunk` runs for `GGML_TYPE_BF16`).
pub fn quantize_row_bf16(x: &[f32], y: &mut [u8]) {
    for (v, out) in x.iter().zip(y.chunks_exact_mut(2)) {
        out.copy_from_slice(&fp32_to_bf16(*v).to_le_bytes());
    }
}

/// Mirrors `ggml_bf16_to_fp32_row` (BF16's `to_float`).
pub fn dequantize_row_bf16(x: &[u8], y: &mut [f32]) {
    for (b, out) in x.chunks_exact(2).zip(y.iter_mut()) {
        *out = bf16_to_fp32(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// F32's entry in the type table.
pub const F32: Codec = Codec {
    dequantize: Some(dequantize_row_f32),
    quantize: Some(quantize_row_f32),
    quantize_imatrix: None,
};

/// F16's entry in the type table (ggml has no importance-weighted F16).
pub const F16: Codec = Codec {
    dequantize: Some(dequantize_row_f16),
    quantize: Some(quantize_row_f16),
    quantize_imatrix: None,
};

/// BF16's entry in the type table (ggml has no importance-weighted BF16).
pub const BF16: Codec = Codec {
    dequantize: Some(dequantize_row_bf16),
    quantize: Some(quantize_row_bf16),
    quantize_imatrix: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_matches_ieee_round_to_nearest_even_for_every_non_nan_half() {
        for h in 0..=u16::MAX {
            let v = half::f16::from_bits(h);
            if v.is_nan() {
                assert!(fp16_to_fp32(h).is_nan());
                continue;
            }
            assert_eq!(fp16_to_fp32(h).to_bits(), v.to_f32().to_bits(), "{h:#06x}");
            assert_eq!(fp32_to_fp16(v.to_f32()), h, "{h:#06x}");
        }
    }

    #[test]
    fn fp32_to_fp16_rounds_ties_to_even_and_overflows_to_inf() {
        // 1 + 2^-11 lies halfway between 1 and the next half: ties to even (1.0).
        assert_eq!(fp32_to_fp16(1.0 + f32::powi(2.0, -11)), 0x3C00);
        // 1 + 3*2^-11 is halfway between two halves whose even neighbour is the upper one.
        assert_eq!(fp32_to_fp16(1.0 + 3.0 * f32::powi(2.0, -11)), 0x3C02);
        assert_eq!(fp32_to_fp16(65520.0), 0x7C00);
        assert_eq!(fp32_to_fp16(-1e30), 0xFC00);
        assert_eq!(fp32_to_fp16(f32::NAN), 0x7E00);
        assert_eq!(fp32_to_fp16(-f32::from_bits(0x7F80_0001)), 0xFE00);
        for x in [1e-3f32, -7.5, 3.1e4, 6.0e-8, 2.9e-8, 1.0e-9] {
            assert_eq!(fp32_to_fp16(x), half::f16::from_f32(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn fp32_to_fp16_rounds_like_ieee_around_every_halfway_point() {
        // Every f32 with a stride prime to 2^32, plus each halfway point between neighbouring halves
        // and its two f32 neighbours, and the subnormal and overflow edges, in both signs. ggml's
        // recipe must equal IEEE round-to-nearest-even (`half`) on all of them; NaNs are covered above.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(4099).collect();
        for h in 0..0x7C00u16 {
            let mid = (fp16_to_fp32(h) as f64 + fp16_to_fp32(h + 1) as f64) / 2.0;
            let mid = (mid as f32).to_bits();
            bits.extend([mid - 1, mid, mid + 1]);
        }
        bits.extend([
            0x7F80_0000,
            0x477F_E000,
            0x477F_F000,
            0x477F_EFFF,
            0x3380_0000,
        ]);
        for b in bits {
            for f in [f32::from_bits(b), -f32::from_bits(b)] {
                if !f.is_nan() {
                    let want = half::f16::from_f32(f).to_bits();
                    assert_eq!(fp32_to_fp16(f), want, "f32 {:#010x}", f.to_bits());
                }
            }
        }
    }

    #[test]
    fn bf16_rounds_ties_to_even_and_quiets_nan() {
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80); // tie, even stays
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82); // tie, rounds up to even
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(fp32_to_bf16(f32::MAX), 0x7F80); // carries into inf
        assert_eq!(fp32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0); // signalling NaN quieted
        assert_eq!(fp32_to_bf16(f32::from_bits(0xFFC1_2345)), 0xFFC1);
        assert_eq!(bf16_to_fp32(0xC0A0), -5.0);
    }
}
