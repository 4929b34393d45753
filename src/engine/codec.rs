//! The two codec calls the engine needs, in one place: dequantize rows of a base tensor to f32 and
//! quantize merged f32 rows to the output type, through the crate's ggml-exact codecs (the reference
//! quantizers, or with an importance matrix the weighted ones: what `ggml_quantize_chunk` gives).
//!
//! Row by row on the calling thread: the merge already runs one row block per rayon task.

use crate::quant::{self, GgmlType};

use super::requant::Importance;
use super::EngineError;

/// Dequantizes whole rows of `n` elements: `src` holds `dst.len() / n` rows of `ty`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32], n: usize) -> Result<(), EngineError> {
    let row_bytes = row_bytes(ty, n)?;
    for (s, d) in src.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(n)) {
        quant::dequantize_row(ty, s, d)?;
    }
    Ok(())
}

/// Whether [`dequantize`] reads `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    quant::can_dequantize(ty)
}

/// Quantizes whole rows of `n` elements to `ty`; the rows are rows `r0..` of their tensor, which
/// picks each row's importance weights (per expert) when `importance` is given.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    n: usize,
    r0: usize,
    importance: Option<&Importance<'_>>,
) -> Result<(), EngineError> {
    let row_bytes = row_bytes(ty, n)?;
    for (i, (s, d)) in src
        .chunks_exact(n)
        .zip(dst.chunks_exact_mut(row_bytes))
        .enumerate()
    {
        let w = importance.map(|imp| imp.for_row(r0 + i, n));
        quant::quantize_row(ty, s, d, w)?;
    }
    Ok(())
}

/// Bytes of one row of `n` elements of `ty`, or the error saying it does not fit.
pub fn row_bytes(ty: GgmlType, n: usize) -> Result<usize, EngineError> {
    ty.row_bytes(n as u64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .ok_or(EngineError::RowDoesNotFit { n, ty })
}
