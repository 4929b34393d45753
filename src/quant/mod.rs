//! ggml tensor types and their block codecs.
//!
//! One table ([`GgmlType::traits`]) describes every type once: its ggml id, name, block size, bytes per
//! block and which codecs we have. Each codec family lives in one file with its quantizer and
//! dequantizer side by side, mirroring ggml's `ggml-quants.c`; every function names the ggml function
//! whose bytes it reproduces. Size arithmetic goes through [`GgmlType::row_bytes`], which checks that a
//! row is a whole number of blocks.

use std::fmt;

/// A ggml tensor element type, numbered exactly as `enum ggml_type` in `ggml.h`.
/// Retired ids (4, 5, 31–33, 36–38) have no variant: a file that uses them is rejected.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
    Q2_0 = 42,
}

/// What ggml's `type_traits` says about a type: the facts needed to size and walk its data.
#[derive(Clone, Copy, Debug)]
pub struct TypeTraits {
    /// ggml's own name (`"q4_K"`, `"bf16"`, ...), as `ggml_type_name` prints it.
    pub name: &'static str,
    /// Elements per block (1 for plain scalar types).
    pub block_size: usize,
    /// Bytes per block.
    pub type_size: usize,
    /// Whether ggml counts it as quantized (`general.quantization_version` is then required).
    pub is_quantized: bool,
}

/// Super-block size of the K-quants (`QK_K` in ggml).
pub const QK_K: usize = 256;

impl GgmlType {
    /// Every type we know, in id order.
    pub const ALL: [GgmlType; 35] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
    ];

    /// The type with ggml id `id`, or `None` for unknown and retired ids.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| *t as u32 == id)
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The type whose ggml name (case-insensitive) is `name`: `q4_k`, `Q4_K`, `bf16`, ...
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .iter()
            .copied()
            .find(|t| t.traits().name.eq_ignore_ascii_case(name))
    }

    /// The one table of type facts; numbers from ggml's `type_traits` and `ggml-common.h` block structs.
    pub fn traits(self) -> TypeTraits {
        use GgmlType::*;
        let (name, block_size, type_size, is_quantized) = match self {
            F32 => ("f32", 1, 4, false),
            F16 => ("f16", 1, 2, false),
            Q4_0 => ("q4_0", 32, 2 + 16, true),
            Q4_1 => ("q4_1", 32, 2 + 2 + 16, true),
            Q5_0 => ("q5_0", 32, 2 + 4 + 16, true),
            Q5_1 => ("q5_1", 32, 2 + 2 + 4 + 16, true),
            Q8_0 => ("q8_0", 32, 2 + 32, true),
            Q8_1 => ("q8_1", 32, 2 + 2 + 32, true),
            Q2_K => ("q2_K", QK_K, QK_K / 16 + QK_K / 4 + 2 + 2, true),
            Q3_K => ("q3_K", QK_K, QK_K / 8 + QK_K / 4 + 12 + 2, true),
            Q4_K => ("q4_K", QK_K, 2 + 2 + 12 + QK_K / 2, true),
            Q5_K => ("q5_K", QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2, true),
            Q6_K => ("q6_K", QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, true),
            Q8_K => ("q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2, true),
            IQ2_XXS => ("iq2_xxs", QK_K, 2 + QK_K / 8 * 2, true),
            IQ2_XS => ("iq2_xs", QK_K, 2 + QK_K / 8 * 2 + QK_K / 32, true),
            IQ3_XXS => ("iq3_xxs", QK_K, 2 + 3 * (QK_K / 8), true),
            IQ1_S => ("iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16, true),
            IQ4_NL => ("iq4_nl", 32, 2 + 16, true),
            IQ3_S => ("iq3_s", QK_K, 2 + 13 * (QK_K / 32) + QK_K / 64, true),
            IQ2_S => ("iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16, true),
            IQ4_XS => ("iq4_xs", QK_K, 2 + 2 + QK_K / 64 + QK_K / 2, true),
            I8 => ("i8", 1, 1, false),
            I16 => ("i16", 1, 2, false),
            I32 => ("i32", 1, 4, false),
            I64 => ("i64", 1, 8, false),
            F64 => ("f64", 1, 8, false),
            IQ1_M => ("iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32, true),
            BF16 => ("bf16", 1, 2, false),
            TQ1_0 => (
                "tq1_0",
                QK_K,
                2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5,
                true,
            ),
            TQ2_0 => ("tq2_0", QK_K, 2 + QK_K / 4, true),
            MXFP4 => ("mxfp4", 32, 1 + 16, true),
            NVFP4 => ("nvfp4", 64, 4 + 32, true),
            Q1_0 => ("q1_0", 128, 2 + 16, true),
            Q2_0 => ("q2_0", 64, 2 + 16, true),
        };
        TypeTraits {
            name,
            block_size,
            type_size,
            is_quantized,
        }
    }

    pub fn name(self) -> &'static str {
        self.traits().name
    }

    pub fn block_size(self) -> usize {
        self.traits().block_size
    }

    pub fn type_size(self) -> usize {
        self.traits().type_size
    }

    /// Bytes of one row of `n_per_row` elements, or `None` when the row is not a whole number of
    /// blocks or the size overflows (ggml's `ggml_row_size` asserts the same divisibility).
    pub fn row_bytes(self, n_per_row: u64) -> Option<u64> {
        let t = self.traits();
        if !n_per_row.is_multiple_of(t.block_size as u64) {
            return None;
        }
        (n_per_row / t.block_size as u64).checked_mul(t.type_size as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_retired_ids_are_unknown() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000] {
            assert_eq!(GgmlType::from_id(retired), None);
        }
    }

    #[test]
    fn block_struct_sizes_match_ggml_common_h() {
        // static_asserts of ggml-common.h, restated.
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q5_K.type_size(), 176);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q3_K.type_size(), 110);
        assert_eq!(GgmlType::Q2_K.type_size(), 84);
        assert_eq!(GgmlType::Q8_K.type_size(), 292);
        assert_eq!(GgmlType::IQ4_XS.type_size(), 136);
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::Q4_K.row_bytes(640), None);
    }
}
