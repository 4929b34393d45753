//! Which type a merged tensor is written in: the base's own (`keep`), `--outtype`, or a promotion,
//! with llama-quantize's fallbacks when a row does not fit the target's block, and the
//! `general.file_type` (llama_ftype) that describes the result.

use crate::quant::GgmlType;

/// Types the merge can write (we have ggml's reference quantizer for them).
pub const WRITABLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether merged tensors can be written as `ty`.
pub fn is_writable(ty: GgmlType) -> bool {
    WRITABLE.contains(&ty) && crate::quant::can_quantize(ty)
}

/// A type name that is not one we write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown or unsupported output type '{name}' (expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k or q6_k)")]
pub struct TypeError {
    pub name: String,
}

/// The type we write whose ggml name (any case) is `name`.
pub fn parse_writable(name: &str) -> Result<GgmlType, TypeError> {
    match GgmlType::from_name(name) {
        Some(t) if is_writable(t) => Ok(t),
        _ => Err(TypeError {
            name: name.to_string(),
        }),
    }
}

/// The type a tensor whose rows hold `n_per_row` elements gets when `target` is asked for, and whether
/// that is a fallback. Mirrors `tensor_type_fallback` in llama.cpp `src/llama-quant.cpp`: a 256-block
/// K-quant that does not fit falls back to a 32-block type (Q2_K/Q3_K → Q4_0, Q4_K → Q5_0,
/// Q5_K → Q5_1, Q6_K → Q8_0), and whatever still does not fit becomes F16.
pub fn fit_type(target: GgmlType, n_per_row: u64) -> (GgmlType, bool) {
    if n_per_row.is_multiple_of(target.block_size() as u64) {
        return (target, false);
    }
    let fallback = match target {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if n_per_row.is_multiple_of(fallback.block_size() as u64) {
        (fallback, true)
    } else {
        (GgmlType::F16, true)
    }
}

/// The type `keep` writes for a base tensor of type `base`: itself when we can write it; otherwise
/// (i-quants, ternary and FP4 types, which need an importance matrix or have no reference quantizer
/// here) Q8_0, which loses none of the adapter; reported as a fallback.
pub fn keep_type(base: GgmlType, n_per_row: u64) -> (GgmlType, bool) {
    if is_writable(base) {
        (base, false)
    } else {
        let (t, _) = fit_type(GgmlType::Q8_0, n_per_row);
        (t, true)
    }
}

/// Bits per weight, to order types by size.
pub fn bits_per_weight(ty: GgmlType) -> f64 {
    ty.type_size() as f64 * 8.0 / ty.block_size() as f64
}

/// `llama_ftype` (llama.h) whose "mostly" type is `ty`; K-quants map to their `_M` mixes, the names
/// llama-quantize gives files made mostly of that type.
pub fn ftype_for(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q2_K => 10,
        GgmlType::Q3_K => 12,
        GgmlType::Q4_K => 15,
        GgmlType::Q5_K => 17,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

/// The type holding the most weights among the 2-D (matrix) tensors, ties to the lower id: what
/// `general.file_type` describes. `tensors` yields (element count, dims count, type).
pub fn majority_type(tensors: impl Iterator<Item = (u64, usize, GgmlType)>) -> Option<GgmlType> {
    let mut counts: std::collections::BTreeMap<GgmlType, u64> = Default::default();
    for (n, n_dims, ty) in tensors {
        if n_dims >= 2 {
            *counts.entry(ty).or_default() += n;
        }
    }
    counts
        .into_iter()
        .fold(None, |best: Option<(GgmlType, u64)>, (t, n)| match best {
            Some((_, bn)) if bn >= n => best,
            _ => Some((t, n)),
        })
        .map(|(t, _)| t)
}

/// `general.file_type` of the merged model. When the output's majority type is the base's, the base's
/// value stays (it may name a mix such as Q4_K_M that the majority alone cannot tell); otherwise the
/// ftype of the new majority type.
pub fn output_ftype(
    base_ftype: Option<u32>,
    base_majority: Option<GgmlType>,
    out_majority: Option<GgmlType>,
) -> Option<u32> {
    if base_majority == out_majority && base_ftype.is_some() {
        return base_ftype;
    }
    out_majority.and_then(ftype_for).or(base_ftype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType::*;

    #[test]
    fn fallbacks_follow_llama_quant() {
        assert_eq!(fit_type(Q4_K, 4096), (Q4_K, false));
        assert_eq!(fit_type(Q4_K, 640 + 32), (Q5_0, true));
        assert_eq!(fit_type(Q5_K, 96), (Q5_1, true));
        assert_eq!(fit_type(Q6_K, 96), (Q8_0, true));
        assert_eq!(fit_type(Q2_K, 96), (Q4_0, true));
        assert_eq!(fit_type(Q3_K, 96), (Q4_0, true));
        assert_eq!(fit_type(Q6_K, 100), (F16, true));
        assert_eq!(fit_type(Q8_0, 100), (F16, true));
        assert_eq!(fit_type(F32, 7), (F32, false));
        assert_eq!(keep_type(IQ4_XS, 256), (Q8_0, true));
        assert_eq!(keep_type(Q5_0, 96), (Q5_0, false));
    }

    #[test]
    fn ftype_keeps_the_base_mix_unless_the_majority_changes() {
        let tensors = vec![(1000, 2, Q4_K), (300, 2, Q6_K), (5000, 1, F32)];
        let maj = majority_type(tensors.into_iter());
        assert_eq!(maj, Some(Q4_K));
        assert_eq!(output_ftype(Some(15), maj, Some(Q4_K)), Some(15));
        assert_eq!(output_ftype(Some(15), maj, Some(Q8_0)), Some(7));
        assert_eq!(output_ftype(None, maj, Some(Q4_K)), Some(15));
    }
}
