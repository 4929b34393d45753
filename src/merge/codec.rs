//! The two codec calls the merge needs, in one place: dequantize rows of a base tensor to f32 and
//! quantize merged f32 rows to the output type, both through the crate's ggml-exact codecs.

use crate::quant::GgmlType;

use super::MergeError;

/// Dequantizes whole rows: `src` holds `dst.len() / n_per_row` rows of `ty`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), MergeError> {
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        other => return Err(MergeError::Codec(format!("cannot dequantize {other}"))),
    }
    Ok(())
}

/// Whether [`dequantize`] reads `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Quantizes whole rows of `n_per_row` elements to `ty` with ggml's reference quantizer.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    n_per_row: usize,
) -> Result<(), MergeError> {
    let _ = n_per_row;
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(*s).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(*s).to_le_bytes());
            }
        }
        other => return Err(MergeError::Codec(format!("cannot quantize to {other}"))),
    }
    Ok(())
}
