//! The two codec calls the merge needs, in one place: dequantize rows of a base tensor to f32 and
//! quantize merged f32 rows to the output type, through the crate's ggml-exact codecs (the reference
//! quantizers: no importance matrix, so the result is what `ggml_quantize_chunk` gives).
//!
//! Row by row on the calling thread: the merge already runs one row block per rayon task.

use crate::quant::{self, GgmlType};

use super::MergeError;

fn codec_error(e: quant::QuantError) -> MergeError {
    MergeError::Codec(e.to_string())
}

/// Dequantizes whole rows of `n` elements: `src` holds `dst.len() / n` rows of `ty`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32], n: usize) -> Result<(), MergeError> {
    let row_bytes = row_bytes(ty, n)?;
    for (s, d) in src.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(n)) {
        quant::dequantize_row(ty, s, d).map_err(codec_error)?;
    }
    Ok(())
}

/// Whether [`dequantize`] reads `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    quant::can_dequantize(ty)
}

/// Quantizes whole rows of `n` elements to `ty` with ggml's reference quantizer.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8], n: usize) -> Result<(), MergeError> {
    let row_bytes = row_bytes(ty, n)?;
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(row_bytes)) {
        quant::quantize_row(ty, s, d, None).map_err(codec_error)?;
    }
    Ok(())
}

/// Bytes of one row of `n` elements of `ty`, or the error saying it does not fit.
pub fn row_bytes(ty: GgmlType, n: usize) -> Result<usize, MergeError> {
    ty.row_bytes(n as u64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .ok_or_else(|| MergeError::Codec(format!("a row of {n} elements does not fit type {ty}")))
}
