//! What ggml's CPU backend does to activations before a product with quantized or half weights:
//! it encodes each activation row in the weight type's `vec_dot_type` and multiplies against that.
//! [`round_activations`] gives the f32 values such a product sees, so that a reference forward pass
//! can meet llama.cpp's logits on quantized models.

use super::{dequantize_row, quantize_row, GgmlType, QuantError};

/// The type ggml's CPU backend converts activations to before a product with weights of `ty`
/// (`type_traits_cpu[ty].vec_dot_type`), when it is not f32.
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    match ty {
        F16 => Some(F16),
        BF16 => Some(BF16),
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL => Some(Q8_0),
        Q4_1 | Q5_1 => Some(Q8_1),
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => Some(Q8_K),
        _ => None,
    }
}

/// Bytes of one Q8_1 block: `d` (f16), `s = d·Σq` (f16), 32 × i8.
pub(crate) const Q8_1_BYTES: usize = 36;

/// The values a row of Q8_1 blocks stands for, `d·q` (the stored sum `s` is only a shortcut of the
/// dot products). ggml has no `to_float` for Q8_1, an activation-only type, so the type table has
/// no dequantizer for it either; this is the decoding `vec_dot_q4_1_q8_1` implies.
pub fn decode_q8_1(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let blocks = dst.len() / 32;
    if !dst.len().is_multiple_of(32) || src.len() != blocks * Q8_1_BYTES {
        return Err(QuantError::BufferLength {
            ty: GgmlType::Q8_1,
            what: "source row",
            unit: "bytes",
            expected: blocks * Q8_1_BYTES,
            got: src.len(),
        });
    }
    for (blk, d32) in src.chunks_exact(Q8_1_BYTES).zip(dst.chunks_exact_mut(32)) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for (v, q) in d32.iter_mut().zip(&blk[4..]) {
            *v = d * (*q as i8) as f32;
        }
    }
    Ok(())
}

/// Activation rows of `n_in` as ggml's kernels see them: encoded in `ty` and decoded again.
pub fn round_activations(ty: GgmlType, x: &[f32], n_in: usize) -> Result<Vec<f32>, QuantError> {
    let row_bytes = ty
        .row_bytes(n_in as u64)
        .ok_or(QuantError::RowNotWholeBlocks {
            ty,
            n_per_row: n_in,
            block_size: ty.block_size(),
        })? as usize;
    let mut bytes = vec![0u8; row_bytes];
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(n_in).zip(out.chunks_exact_mut(n_in)) {
        quantize_row(ty, src, &mut bytes, None)?;
        if ty == GgmlType::Q8_1 {
            decode_q8_1(&bytes, dst)?;
        } else {
            dequantize_row(ty, &bytes, dst)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_1_decodes_to_d_times_q() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.07).collect();
        let mut bytes = vec![0u8; GgmlType::Q8_1.row_bytes(64).unwrap() as usize];
        quantize_row(GgmlType::Q8_1, &x, &mut bytes, None).unwrap();
        let mut y = vec![0f32; 64];
        decode_q8_1(&bytes, &mut y).unwrap();
        let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        assert_eq!(y[0], d * (bytes[4] as i8) as f32);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 0.02, "{a} {b}");
        }
        assert!(decode_q8_1(&bytes[..35], &mut y).is_err());
    }
}
