//! The GGUF container: a memory-mapped reader ([`GgufFile`]), split sets opened as one model
//! ([`GgufModel`]), metadata values ([`Value`], [`Metadata`]) and a streaming, atomic writer
//! ([`GgufWriter`]).
//!
//! The layout rules are llama.cpp's loader's (`ggml/src/gguf.cpp`), which are stricter than the
//! written spec: versions 2 and 3, no nested arrays, no duplicate keys or tensors, names under 64
//! bytes, at most 4 dimensions, rows made of whole blocks, `general.alignment` a `u32` power of two,
//! and tensor data laid out in tensor-info order, each tensor padded to the alignment. The reader
//! checks every count, length and offset against the bytes that remain before using it, so a
//! malformed file gets a precise error and never a large allocation; the writer computes the layout
//! in one place ([`GgufWriter::create`]) so what it writes always loads.
//!
//! Why our own code rather than the prescribed `gguf-rs-lib` crate (0.3.3), checked against its
//! source: its file reader copies tensor data into owned buffers and refuses `use_mmap` ("feature
//! unavailable"); its `MmapGGUFFile` maps a file but only checks magic and version, without parsing;
//! its stream writer has no temp-file-and-rename, so a failure leaves a partial file. We need
//! zero-copy slices of multi-GB models, errors that name the exact field that is wrong, streaming
//! writes whose peak memory is one tensor, atomic outputs, and rewrites that reproduce the input byte
//! for byte, all with llama.cpp's exact layout rules. We use its value-type numbering as a cross-check
//! (see the tests of [`value`]), which is why it is a dev-dependency and nothing more.

pub mod error;
pub mod reader;
pub mod split;
pub mod value;
pub mod writer;

pub use error::{GgufError, GgufErrorKind, Result};
pub use reader::{GgufFile, TensorInfo};
pub use split::GgufModel;
pub use value::{Array, Metadata, Value, ValueType};
pub use writer::{GgufWriter, Placement, TensorDesc};

use crate::quant::GgmlType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version we write.
pub const VERSION: u32 = 3;
/// Data alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest alignment we accept (llama.cpp's limit).
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// ggml's `GGML_MAX_NAME`: a tensor name must be shorter than this (it includes the NUL).
pub const MAX_NAME_LEN: usize = 64;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Longest metadata key the spec allows.
pub const MAX_KEY_LEN: usize = 65_535;
/// The metadata key holding the data alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// `general.architecture`: the model family (`llama`, `gemma3`, ...).
pub const KEY_ARCH: &str = "general.architecture";
/// `general.type`: `model`, `adapter`, or our `lora_bundle`.
pub const KEY_TYPE: &str = "general.type";
/// `general.file_type`: the `llama_ftype` describing the tensors' types.
pub const KEY_FILE_TYPE: &str = "general.file_type";
/// `general.quantization_version`, required once quantized tensors appear.
pub const KEY_QUANT_VERSION: &str = "general.quantization_version";

/// `n` rounded up to a multiple of `alignment` (ggml's `GGML_PAD`); `alignment` is a power of two.
/// Callers guarantee the result does not overflow (sizes are bounded by the file or checked first).
pub fn pad(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

/// Bytes of a tensor of shape `dims` (ggml `ne` order) and type `ty`, or `None` if a row is not a
/// whole number of blocks or the size overflows. A tensor with a zero dimension has 0 bytes.
pub fn tensor_n_bytes(dims: &[u64], ty: GgmlType) -> Option<u64> {
    let row = ty.row_bytes(dims.first().copied().unwrap_or(1))?;
    dims.iter()
        .skip(1)
        .try_fold(row, |acc, &d| acc.checked_mul(d))
}

/// The layer a tensor belongs to: `N` for names with a `blk.N.` component (llama.cpp's naming).
pub fn layer_of(name: &str) -> Option<u32> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "blk" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_sizes() {
        assert_eq!(pad(0, 32), 0);
        assert_eq!(pad(1, 32), 32);
        assert_eq!(pad(64, 64), 64);
        assert_eq!(tensor_n_bytes(&[64, 3], GgmlType::Q8_0), Some(2 * 34 * 3));
        assert_eq!(tensor_n_bytes(&[], GgmlType::F32), Some(4));
        assert_eq!(tensor_n_bytes(&[8, 0], GgmlType::F16), Some(0));
        assert_eq!(tensor_n_bytes(&[33], GgmlType::Q8_0), None);
        assert_eq!(tensor_n_bytes(&[1 << 40, 1 << 40], GgmlType::F32), None);
    }

    #[test]
    fn layers() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("v.blk.3.ffn_up.weight"), Some(3));
        assert_eq!(layer_of("token_embd.weight"), None);
        assert_eq!(layer_of("blk.x.attn"), None);
    }
}
