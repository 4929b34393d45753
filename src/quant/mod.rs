//! ggml tensor types and their block codecs.
//!
//! One table ([`GgmlType::traits`]) describes every type once: its ggml id, name, block size, bytes per
//! block and its codecs ([`Codec`]). Each codec family lives in one file with its quantizer and
//! dequantizer side by side, mirroring ggml's `ggml-quants.c`; every function names the ggml function
//! whose bytes it reproduces. Size arithmetic goes through [`GgmlType::row_bytes`], which checks that a
//! row is a whole number of blocks.
//!
//! The entry points check sizes and dispatch through the table: [`dequantize_row`] / [`quantize_row`]
//! for one row, [`dequantize_rows`] / [`quantize_rows`] for a block of rows spread over rayon's threads,
//! [`convert_rows`] to re-encode rows from one type to another through a bounded f32 buffer. Callers
//! hand in row blocks of the size they can afford; nothing here copies a whole tensor. "Quantize" means
//! exactly what `ggml_quantize_chunk` does: the reference quantizer without an imatrix, the
//! importance-weighted `quantize_row_X_impl` with one (types without such a variant ignore it).

pub mod float;
pub mod grid;
pub mod iquants;
pub mod kquants;
mod lanes;
pub mod legacy;
pub mod search;
pub mod simd;
pub mod vec_dot;

use std::fmt;

use rayon::prelude::*;

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
    /// The codecs we have for it.
    pub codec: Codec,
}

/// Decodes whole blocks: `src` holds `dst.len() / block_size` blocks (ggml's `to_float`).
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);
/// Encodes one row of whole blocks the way `ggml_quantize_chunk` does without an importance matrix.
pub type QuantizeFn = fn(src: &[f32], dst: &mut [u8]);
/// Encodes one row with per-column importance weights (`quant_weights.len() == src.len()`), the way
/// `ggml_quantize_chunk` does when given an imatrix. Row-wide, not block-wise: some variants use
/// statistics of the whole row.
pub type QuantizeImatrixFn = fn(src: &[f32], dst: &mut [u8], quant_weights: &[f32]);

/// A type's codecs; `None` where we have none. A type with a quantizer but no importance-weighted one
/// ignores an imatrix, as ggml does (Q8_0, F16, BF16, F32).
#[derive(Clone, Copy, Debug)]
pub struct Codec {
    pub dequantize: Option<DequantizeFn>,
    pub quantize: Option<QuantizeFn>,
    pub quantize_imatrix: Option<QuantizeImatrixFn>,
}

impl Codec {
    /// No codec at all.
    pub const NONE: Codec = Codec {
        dequantize: None,
        quantize: None,
        quantize_imatrix: None,
    };
}

/// Why a codec call was refused. Every message names the ggml type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// We have no codec for this type in this direction.
    #[error("ggml type {ty} is not supported for {operation}")]
    Unsupported {
        ty: GgmlType,
        operation: &'static str,
    },
    /// The row length is not a multiple of the type's block size (or its byte size overflows).
    #[error("a row of {n_per_row} elements is not a whole number of {ty} blocks ({block_size} elements each)")]
    RowNotWholeBlocks {
        ty: GgmlType,
        n_per_row: usize,
        block_size: usize,
    },
    /// A buffer does not hold a whole number of rows (or the row length is zero).
    #[error("{ty}: {what} of {len} elements is not a whole number of rows of {n_per_row}")]
    NotWholeRows {
        ty: GgmlType,
        what: &'static str,
        len: usize,
        n_per_row: usize,
    },
    /// A buffer's length does not match the element count.
    #[error("{ty}: {what} has {got} {unit}, expected {expected}")]
    BufferLength {
        ty: GgmlType,
        what: &'static str,
        unit: &'static str,
        expected: usize,
        got: usize,
    },
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
    /// A `const fn`, so that the block sizes the codec files work in are checked against it when
    /// the crate compiles (see the asserts below).
    pub const fn traits(self) -> TypeTraits {
        use GgmlType::*;
        let (name, block_size, type_size, is_quantized, codec) = match self {
            F32 => ("f32", 1, 4, false, float::F32),
            F16 => ("f16", 1, 2, false, float::F16),
            Q4_0 => ("q4_0", 32, 2 + 16, true, legacy::Q4_0),
            Q4_1 => ("q4_1", 32, 2 + 2 + 16, true, legacy::Q4_1),
            Q5_0 => ("q5_0", 32, 2 + 4 + 16, true, legacy::Q5_0),
            Q5_1 => ("q5_1", 32, 2 + 2 + 4 + 16, true, legacy::Q5_1),
            Q8_0 => ("q8_0", 32, 2 + 32, true, legacy::Q8_0),
            Q8_1 => ("q8_1", 32, 2 + 2 + 32, true, legacy::Q8_1),
            Q2_K => (
                "q2_K",
                QK_K,
                QK_K / 16 + QK_K / 4 + 2 + 2,
                true,
                kquants::Q2_K,
            ),
            Q3_K => (
                "q3_K",
                QK_K,
                QK_K / 8 + QK_K / 4 + 12 + 2,
                true,
                kquants::Q3_K,
            ),
            Q4_K => ("q4_K", QK_K, 2 + 2 + 12 + QK_K / 2, true, kquants::Q4_K),
            Q5_K => (
                "q5_K",
                QK_K,
                2 + 2 + 12 + QK_K / 8 + QK_K / 2,
                true,
                kquants::Q5_K,
            ),
            Q6_K => (
                "q6_K",
                QK_K,
                QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
                true,
                kquants::Q6_K,
            ),
            Q8_K => ("q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2, true, kquants::Q8_K),
            IQ2_XXS => ("iq2_xxs", QK_K, 2 + QK_K / 8 * 2, true, Codec::NONE),
            IQ2_XS => (
                "iq2_xs",
                QK_K,
                2 + QK_K / 8 * 2 + QK_K / 32,
                true,
                Codec::NONE,
            ),
            IQ3_XXS => ("iq3_xxs", QK_K, 2 + 3 * (QK_K / 8), true, Codec::NONE),
            IQ1_S => ("iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16, true, Codec::NONE),
            IQ4_NL => ("iq4_nl", 32, 2 + 16, true, iquants::IQ4_NL),
            IQ3_S => (
                "iq3_s",
                QK_K,
                2 + 13 * (QK_K / 32) + QK_K / 64,
                true,
                Codec::NONE,
            ),
            IQ2_S => ("iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16, true, Codec::NONE),
            IQ4_XS => (
                "iq4_xs",
                QK_K,
                2 + 2 + QK_K / 64 + QK_K / 2,
                true,
                iquants::IQ4_XS,
            ),
            I8 => ("i8", 1, 1, false, Codec::NONE),
            I16 => ("i16", 1, 2, false, Codec::NONE),
            I32 => ("i32", 1, 4, false, Codec::NONE),
            I64 => ("i64", 1, 8, false, Codec::NONE),
            F64 => ("f64", 1, 8, false, Codec::NONE),
            IQ1_M => (
                "iq1_m",
                QK_K,
                QK_K / 8 + QK_K / 16 + QK_K / 32,
                true,
                Codec::NONE,
            ),
            BF16 => ("bf16", 1, 2, false, float::BF16),
            TQ1_0 => (
                "tq1_0",
                QK_K,
                2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5,
                true,
                Codec::NONE,
            ),
            TQ2_0 => ("tq2_0", QK_K, 2 + QK_K / 4, true, Codec::NONE),
            MXFP4 => ("mxfp4", 32, 1 + 16, true, Codec::NONE),
            NVFP4 => ("nvfp4", 64, 4 + 32, true, Codec::NONE),
            Q1_0 => ("q1_0", 128, 2 + 16, true, Codec::NONE),
            Q2_0 => ("q2_0", 64, 2 + 16, true, Codec::NONE),
        };
        TypeTraits {
            name,
            block_size,
            type_size,
            is_quantized,
            codec,
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

// ggml-common.h's `static_assert`s on the block structs, as the type table states them: a codec
// constant that disagrees with the table does not compile.
const _: () = {
    assert!(kquants::Q2_K_BYTES == GgmlType::Q2_K.traits().type_size);
    assert!(kquants::Q3_K_BYTES == GgmlType::Q3_K.traits().type_size);
    assert!(kquants::Q4_K_BYTES == GgmlType::Q4_K.traits().type_size);
    assert!(kquants::Q5_K_BYTES == GgmlType::Q5_K.traits().type_size);
    assert!(kquants::Q6_K_BYTES == GgmlType::Q6_K.traits().type_size);
    assert!(kquants::Q8_K_BYTES == GgmlType::Q8_K.traits().type_size);
    assert!(vec_dot::Q8_1_BYTES == GgmlType::Q8_1.traits().type_size);
};

/// Whether [`dequantize_row`] handles `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    ty.traits().codec.dequantize.is_some()
}

/// Whether [`quantize_row`] handles `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    ty.traits().codec.quantize.is_some()
}

/// Whether an imatrix changes how `ty` is quantized (ggml has a `quantize_row_X_impl` for it). For the
/// other quantizable types an imatrix is accepted and ignored, as `ggml_quantize_chunk` does.
pub fn has_imatrix_variant(ty: GgmlType) -> bool {
    ty.traits().codec.quantize_imatrix.is_some()
}

/// Elements per row when `bytes` hold whole rows of `n_per_row`: checks divisibility and overflow.
fn checked_row_bytes(ty: GgmlType, n_per_row: usize) -> Result<usize, QuantError> {
    ty.row_bytes(n_per_row as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or(QuantError::RowNotWholeBlocks {
            ty,
            n_per_row,
            block_size: ty.block_size(),
        })
}

fn expect_len(
    ty: GgmlType,
    what: &'static str,
    unit: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::BufferLength {
            ty,
            what,
            unit,
            expected,
            got,
        })
    }
}

/// The dequantizer of `ty`, or the error naming the type.
fn dequantizer(ty: GgmlType) -> Result<DequantizeFn, QuantError> {
    ty.traits().codec.dequantize.ok_or(QuantError::Unsupported {
        ty,
        operation: "dequantization",
    })
}

/// The quantizer to run for `ty`: the importance-weighted one when an imatrix is given and ggml has
/// one, else the reference one (which is what ggml does for types without an imatrix variant).
fn quantizer(ty: GgmlType, imatrix: Option<&[f32]>) -> Result<RowQuantizer<'_>, QuantError> {
    let codec = ty.traits().codec;
    match (imatrix, codec.quantize_imatrix, codec.quantize) {
        (Some(w), Some(f), _) => Ok(RowQuantizer::Imatrix(f, w)),
        (_, _, Some(f)) => Ok(RowQuantizer::Plain(f)),
        _ => Err(QuantError::Unsupported {
            ty,
            operation: "quantization",
        }),
    }
}

/// A row quantizer with its importance weights bound.
#[derive(Clone, Copy)]
enum RowQuantizer<'a> {
    Plain(QuantizeFn),
    Imatrix(QuantizeImatrixFn, &'a [f32]),
}

impl RowQuantizer<'_> {
    fn run(self, src: &[f32], dst: &mut [u8]) {
        match self {
            RowQuantizer::Imatrix(f, w) => f(src, dst, w),
            RowQuantizer::Plain(f) => f(src, dst),
        }
    }
}

/// Number of rows in `len` elements, when `len` is a whole number of rows of `n_per_row`.
fn whole_rows(
    ty: GgmlType,
    what: &'static str,
    len: usize,
    n_per_row: usize,
) -> Result<usize, QuantError> {
    if n_per_row == 0 || !len.is_multiple_of(n_per_row) {
        return Err(QuantError::NotWholeRows {
            ty,
            what,
            len,
            n_per_row,
        });
    }
    Ok(len / n_per_row)
}

/// Decodes one row: `src` is `ty`'s encoding of `dst.len()` elements; bit-identical to ggml's
/// `to_float`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let f = dequantizer(ty)?;
    let bytes = checked_row_bytes(ty, dst.len())?;
    expect_len(ty, "source row", "bytes", bytes, src.len())?;
    f(src, dst);
    Ok(())
}

/// Encodes one row of `src.len()` elements into `dst` exactly as `ggml_quantize_chunk` does, with the
/// per-column importance weights `imatrix` (one per element of the row) when given.
pub fn quantize_row(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
) -> Result<(), QuantError> {
    let q = quantizer(ty, imatrix)?;
    let bytes = checked_row_bytes(ty, src.len())?;
    expect_len(ty, "destination row", "bytes", bytes, dst.len())?;
    if let Some(w) = imatrix {
        expect_len(ty, "importance matrix", "weights", src.len(), w.len())?;
    }
    q.run(src, dst);
    Ok(())
}

/// Encodes every block of `src` as [`quantize_row`] encodes a row of that one block, with
/// `imatrix` per element (`src.len()` weights): how a fit quantizes the same block of many rows at
/// once. The legacy types fit the blocks side by side in vector lanes; the others run block by block.
pub fn quantize_blocks(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    imatrix: &[f32],
) -> Result<(), QuantError> {
    let bytes = checked_row_bytes(ty, src.len())?;
    expect_len(ty, "destination blocks", "bytes", bytes, dst.len())?;
    expect_len(ty, "importance matrix", "weights", src.len(), imatrix.len())?;
    if legacy::quantize_blocks_impl(ty, src, dst, imatrix).is_some() {
        return Ok(());
    }
    let (bs, bb) = (ty.block_size(), ty.type_size());
    for ((x, y), w) in src
        .chunks_exact(bs)
        .zip(dst.chunks_exact_mut(bb))
        .zip(imatrix.chunks_exact(bs))
    {
        quantize_row(ty, x, y, Some(w))?;
    }
    Ok(())
}

/// Rows per rayon task: enough elements (about 64 Ki) that scheduling costs nothing next to the codec.
fn rows_per_task(n_per_row: usize) -> usize {
    (65_536 / n_per_row.max(1)).max(1)
}

/// Decodes a block of whole rows of `n_per_row` elements in parallel: `src` holds
/// `dst.len() / n_per_row` encoded rows.
pub fn dequantize_rows(
    ty: GgmlType,
    src: &[u8],
    n_per_row: usize,
    dst: &mut [f32],
) -> Result<(), QuantError> {
    let f = dequantizer(ty)?;
    let row_bytes = checked_row_bytes(ty, n_per_row)?;
    let nrows = whole_rows(ty, "destination", dst.len(), n_per_row)?;
    expect_len(
        ty,
        "source rows",
        "bytes",
        nrows.saturating_mul(row_bytes),
        src.len(),
    )?;
    let per_task = rows_per_task(n_per_row);
    src.par_chunks(per_task * row_bytes)
        .zip(dst.par_chunks_mut(per_task * n_per_row))
        .for_each(|(s, d)| {
            for (sr, dr) in s.chunks_exact(row_bytes).zip(d.chunks_exact_mut(n_per_row)) {
                f(sr, dr);
            }
        });
    Ok(())
}

/// Encodes a block of whole rows of `n_per_row` elements in parallel, each as [`quantize_row`] would;
/// `imatrix` holds one weight per column (`n_per_row` of them) and applies to every row.
pub fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
) -> Result<(), QuantError> {
    let q = quantizer(ty, imatrix)?;
    let row_bytes = checked_row_bytes(ty, n_per_row)?;
    let nrows = whole_rows(ty, "source", src.len(), n_per_row)?;
    if let Some(w) = imatrix {
        expect_len(ty, "importance matrix", "weights", n_per_row, w.len())?;
    }
    expect_len(
        ty,
        "destination rows",
        "bytes",
        nrows.saturating_mul(row_bytes),
        dst.len(),
    )?;
    let per_task = rows_per_task(n_per_row);
    src.par_chunks(per_task * n_per_row)
        .zip(dst.par_chunks_mut(per_task * row_bytes))
        .for_each(|(s, d)| {
            for (sr, dr) in s.chunks_exact(n_per_row).zip(d.chunks_exact_mut(row_bytes)) {
                q.run(sr, dr);
            }
        });
    Ok(())
}

/// Elements of f32 scratch [`convert_rows`] uses per step (4 MiB), however large the tensor.
const CONVERT_BLOCK_ELEMENTS: usize = 1 << 20;

/// Re-encodes whole rows from `src_ty` to `dst_ty` (dequantize, then quantize as [`quantize_rows`]
/// does, with `imatrix` if given) through a bounded f32 buffer of a few rows at a time: what
/// `quantize --type` needs for every tensor it converts. `src` holds whole `src_ty` rows of
/// `n_per_row` elements and `dst` the same rows in `dst_ty`.
pub fn convert_rows(
    src_ty: GgmlType,
    src: &[u8],
    dst_ty: GgmlType,
    dst: &mut [u8],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
) -> Result<(), QuantError> {
    dequantizer(src_ty)?;
    quantizer(dst_ty, imatrix)?;
    let src_row = checked_row_bytes(src_ty, n_per_row)?;
    let dst_row = checked_row_bytes(dst_ty, n_per_row)?;
    if n_per_row == 0 || src_row == 0 || !src.len().is_multiple_of(src_row) {
        return Err(QuantError::NotWholeRows {
            ty: src_ty,
            what: "source",
            len: src.len(),
            n_per_row,
        });
    }
    let nrows = src.len() / src_row;
    expect_len(
        dst_ty,
        "destination rows",
        "bytes",
        nrows.saturating_mul(dst_row),
        dst.len(),
    )?;
    let rows_per_step = (CONVERT_BLOCK_ELEMENTS / n_per_row).max(1);
    let mut buf = vec![0f32; rows_per_step.min(nrows) * n_per_row];
    for (s, d) in src
        .chunks(rows_per_step * src_row)
        .zip(dst.chunks_mut(rows_per_step * dst_row))
    {
        let f = &mut buf[..s.len() / src_row * n_per_row];
        dequantize_rows(src_ty, s, n_per_row, f)?;
        quantize_rows(dst_ty, f, n_per_row, d, imatrix)?;
    }
    Ok(())
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

    #[test]
    fn unsupported_types_are_refused_by_name() {
        let e = dequantize_row(GgmlType::IQ2_XXS, &[0; 66], &mut [0.0; 256]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ggml type iq2_xxs is not supported for dequantization"
        );
        let e = quantize_row(GgmlType::IQ3_S, &[0.0; 256], &mut [0; 110], None).unwrap_err();
        assert!(
            matches!(
                e,
                QuantError::Unsupported {
                    ty: GgmlType::IQ3_S,
                    ..
                }
            ),
            "{e}"
        );
        assert!(quantize_rows(GgmlType::I32, &[0.0; 4], 4, &mut [0; 16], None).is_err());
        // Like ggml: Q8_1 has a reference quantizer but no `to_float`.
        assert!(can_quantize(GgmlType::Q8_1) && !can_dequantize(GgmlType::Q8_1));
    }

    #[test]
    fn sizes_are_checked_before_any_codec_runs() {
        let ty = GgmlType::Q4_0;
        let e = dequantize_row(ty, &[0; 18], &mut [0.0; 33]).unwrap_err();
        assert!(matches!(
            e,
            QuantError::RowNotWholeBlocks {
                n_per_row: 33,
                block_size: 32,
                ..
            }
        ));
        let e = dequantize_row(ty, &[0; 17], &mut [0.0; 32]).unwrap_err();
        assert_eq!(e.to_string(), "q4_0: source row has 17 bytes, expected 18");
        let e = quantize_row(ty, &[0.0; 32], &mut [0; 19], None).unwrap_err();
        assert!(matches!(
            e,
            QuantError::BufferLength {
                expected: 18,
                got: 19,
                ..
            }
        ));
        let e = quantize_row(ty, &[0.0; 64], &mut [0; 36], Some(&[1.0; 32])).unwrap_err();
        assert!(matches!(
            e,
            QuantError::BufferLength {
                what: "importance matrix",
                ..
            }
        ));
        let e = quantize_rows(ty, &[0.0; 96], 64, &mut [0; 54], None).unwrap_err();
        assert!(matches!(
            e,
            QuantError::NotWholeRows {
                len: 96,
                n_per_row: 64,
                ..
            }
        ));
        let e = dequantize_rows(ty, &[0; 36], 0, &mut []).unwrap_err();
        assert!(matches!(e, QuantError::NotWholeRows { n_per_row: 0, .. }));
        let e = dequantize_rows(ty, &[0; 35], 64, &mut [0.0; 64]).unwrap_err();
        assert!(matches!(
            e,
            QuantError::BufferLength {
                expected: 36,
                got: 35,
                ..
            }
        ));
    }

    #[test]
    fn imatrix_is_ignored_exactly_where_ggml_has_no_weighted_variant() {
        use GgmlType::*;
        for ty in [
            Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
        ] {
            assert!(has_imatrix_variant(ty), "{ty}");
        }
        for ty in [F32, F16, BF16, Q8_0] {
            assert!(can_quantize(ty) && !has_imatrix_variant(ty), "{ty}");
            let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
            let n = ty.row_bytes(64).unwrap() as usize;
            let (mut a, mut b) = (vec![0; n], vec![0; n]);
            quantize_row(ty, &x, &mut a, None).unwrap();
            quantize_row(ty, &x, &mut b, Some(&[0.5; 64])).unwrap();
            assert_eq!(a, b, "{ty}");
        }
    }

    #[test]
    fn parallel_rows_equal_row_by_row() {
        let n_per_row = 256;
        let x: Vec<f32> = (0..n_per_row * 300)
            .map(|i| ((i * 7919) % 1000) as f32 / 333.0 - 1.5)
            .collect();
        let w: Vec<f32> = (0..n_per_row).map(|i| 1.0 + (i % 5) as f32).collect();
        for ty in [GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::BF16] {
            let rb = ty.row_bytes(n_per_row as u64).unwrap() as usize;
            let mut all = vec![0u8; rb * 300];
            quantize_rows(ty, &x, n_per_row, &mut all, Some(&w)).unwrap();
            let mut deq = vec![0f32; x.len()];
            dequantize_rows(ty, &all, n_per_row, &mut deq).unwrap();
            for r in 0..300 {
                let mut row = vec![0u8; rb];
                quantize_row(ty, &x[r * n_per_row..][..n_per_row], &mut row, Some(&w)).unwrap();
                assert_eq!(row, all[r * rb..][..rb], "{ty} row {r}");
                let mut back = vec![0f32; n_per_row];
                dequantize_row(ty, &row, &mut back).unwrap();
                assert_eq!(back, deq[r * n_per_row..][..n_per_row], "{ty} row {r}");
            }
        }
    }

    /// Blocks of many rows in one call are each what a one-block row gives, at every SIMD level
    /// (lanes fill with blocks whose variance terms differ), weights per element.
    #[test]
    fn blocks_equal_one_block_rows() {
        use simd::{with_level, SimdLevel};
        let n = 256 * 7;
        let x: Vec<f32> = (0..n)
            .map(|i| (((i * 7919) % 1000) as f32 / 333.0 - 1.5) * (1.0 + (i / 256) as f32))
            .collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + ((i * 31) % 7) as f32).collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
        ] {
            let (bs, bb) = (ty.block_size(), ty.type_size());
            let mut want = vec![0u8; n / bs * bb];
            for ((xb, yb), wb) in x.chunks(bs).zip(want.chunks_mut(bb)).zip(w.chunks(bs)) {
                quantize_row(ty, xb, yb, Some(wb)).unwrap();
            }
            for level in SimdLevel::ALL
                .into_iter()
                .filter(|l| *l <= simd::detected())
            {
                let mut got = vec![0u8; want.len()];
                with_level(level, || quantize_blocks(ty, &x, &mut got, &w)).unwrap();
                assert_eq!(got, want, "{ty} at {level}");
            }
        }
    }

    #[test]
    fn convert_rows_equals_dequantize_then_quantize() {
        let n_per_row = 512;
        let nrows = 2100; // more than one step of the bounded buffer
        let x: Vec<f32> = (0..n_per_row * nrows)
            .map(|i| ((i * 2654435761usize) % 10007) as f32 / 5000.0 - 1.0)
            .collect();
        let mut f16 = vec![0u8; x.len() * 2];
        quantize_rows(GgmlType::F16, &x, n_per_row, &mut f16, None).unwrap();
        let mut back = vec![0f32; x.len()];
        dequantize_rows(GgmlType::F16, &f16, n_per_row, &mut back).unwrap();
        let w = vec![1.5f32; n_per_row];
        for imatrix in [None, Some(w.as_slice())] {
            let rb = GgmlType::Q5_0.row_bytes(n_per_row as u64).unwrap() as usize;
            let mut want = vec![0u8; rb * nrows];
            quantize_rows(GgmlType::Q5_0, &back, n_per_row, &mut want, imatrix).unwrap();
            let mut got = vec![0u8; rb * nrows];
            convert_rows(
                GgmlType::F16,
                &f16,
                GgmlType::Q5_0,
                &mut got,
                n_per_row,
                imatrix,
            )
            .unwrap();
            assert_eq!(got, want);
        }
        let e = convert_rows(
            GgmlType::F16,
            &f16[..3],
            GgmlType::Q8_0,
            &mut [],
            n_per_row,
            None,
        );
        assert!(matches!(e, Err(QuantError::NotWholeRows { .. })));
    }
}
