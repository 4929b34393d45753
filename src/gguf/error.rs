//! The one error type of the GGUF container: what went wrong ([`GgufErrorKind`]) and in which file.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::value::ValueType;
use crate::quant::GgmlType;

/// A GGUF error: the file it concerns and what is wrong with it. Displays as `PATH: problem`.
#[derive(Debug, Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    /// The file read or written (the target, for writer errors).
    pub path: PathBuf,
    /// What is wrong (already part of the message, so not also reported as the error's source).
    pub kind: GgufErrorKind,
}

impl GgufError {
    pub fn new(path: impl Into<PathBuf>, kind: GgufErrorKind) -> GgufError {
        GgufError {
            path: path.into(),
            kind,
        }
    }
}

/// What is wrong with a GGUF file, or with a request to write one.
#[derive(Debug, Error)]
pub enum GgufErrorKind {
    /// An operating-system error while opening, reading, writing or renaming.
    #[error("cannot {op}: {error}")]
    Io { op: &'static str, error: io::Error },
    /// A directory where a GGUF file was expected.
    #[error("is a directory, expected a GGUF file")]
    IsDirectory,
    /// The file does not start with the magic bytes `GGUF`.
    #[error("not a GGUF file (starts with \"{}\" = {}, expected \"GGUF\")", found.escape_ascii(), hex(found))]
    BadMagic { found: Vec<u8> },
    /// The version looks byte-swapped: a big-endian GGUF file, which we do not read.
    #[error(
        "GGUF version {version:#010x} looks byte-swapped: big-endian GGUF files are not supported"
    )]
    BigEndian { version: u32 },
    /// A version other than 2 or 3 (1 had 32-bit counts and is retired; llama.cpp refuses it too).
    #[error("unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { version: u32 },
    /// The file ends before a field that must be there.
    #[error("truncated: {what} at byte {offset} needs {needed} bytes, but the file has only {available} left")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    /// A count read from disk is larger than the bytes left in the file could hold.
    #[error("{what} count {count} cannot fit in the {available} bytes left at byte {offset} (each needs at least {min_size} bytes)")]
    CountTooLarge {
        what: String,
        count: u64,
        min_size: u64,
        offset: u64,
        available: u64,
    },
    /// A metadata key is empty or longer than GGUF allows.
    #[error("metadata key {index} {problem}")]
    BadKey { index: u64, problem: String },
    /// The same metadata key appears twice (llama.cpp refuses such files).
    #[error("duplicate metadata key '{key}'")]
    DuplicateKey { key: String },
    /// A metadata value has a type id GGUF does not define.
    #[error("metadata key '{key}' has unknown value type id {id}")]
    UnknownValueType { key: String, id: u32 },
    /// An array of arrays: allowed by the spec, refused by llama.cpp, so refused here.
    #[error(
        "metadata key '{key}' is a nested array (arrays of arrays are not supported by llama.cpp)"
    )]
    NestedArray { key: String },
    /// A boolean byte other than 0 or 1.
    #[error("metadata key '{key}' has boolean byte {byte}, expected 0 or 1")]
    BadBool { key: String, byte: u8 },
    /// A string that is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: String },
    /// A metadata key that must have a given type has another one.
    #[error("metadata key '{key}' must be of type {expected} but is {found}")]
    WrongKeyType {
        key: String,
        expected: ValueType,
        found: String,
    },
    /// `general.alignment` is 0, not a power of two, or larger than 1 MiB.
    #[error(
        "general.alignment {alignment} is invalid: must be a power of two between 1 and 1 MiB"
    )]
    BadAlignment { alignment: u64 },
    /// A tensor name is empty or has 64 bytes or more (ggml's `GGML_MAX_NAME` is 64 including the NUL).
    #[error("tensor {index} name {problem}")]
    BadTensorName { index: u64, problem: String },
    /// The same tensor name appears twice.
    #[error("duplicate tensor name '{name}'")]
    DuplicateTensor { name: String },
    /// A tensor with more than 4 dimensions.
    #[error("tensor '{name}' has {n_dims} dimensions, at most 4 are allowed")]
    TooManyDims { name: String, n_dims: u32 },
    /// A tensor whose element count overflows (ggml requires it to fit in an `i64`).
    #[error("tensor '{name}' has a shape {dims:?} whose element count overflows")]
    ShapeOverflow { name: String, dims: Vec<u64> },
    /// A tensor type id that ggml does not define (or has retired).
    #[error("tensor '{name}' has unknown ggml type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    /// A row (`ne[0]` elements) that is not a whole number of the type's blocks.
    #[error("tensor '{name}' of type {ty} has {row} elements per row, not a multiple of the block size {block}")]
    RowNotBlockMultiple {
        name: String,
        ty: GgmlType,
        row: u64,
        block: usize,
    },
    /// Tensor data that reaches past the end of the file.
    #[error("tensor '{name}' data (offset {offset}, {size} bytes) runs past the end of the data section ({data_len} bytes)")]
    TensorOutOfRange {
        name: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    /// Tensor data that starts inside the previous tensor's data.
    #[error("tensor '{name}' data at offset {offset} overlaps tensor '{previous}' (which ends at {previous_end})")]
    TensorOverlap {
        name: String,
        offset: u64,
        previous: String,
        previous_end: u64,
    },
    /// Tensor data not where llama.cpp's loader requires it: right after the previous tensor, padded.
    #[error("tensor '{name}' has offset {offset}, expected {expected} (llama.cpp requires tensor data in tensor-info order, each padded to the alignment)")]
    TensorOffset {
        name: String,
        offset: u64,
        expected: u64,
    },
    /// A split set whose shards do not fit together.
    #[error("split set: {problem}")]
    Split { problem: String },
    /// The output path exists and is not a regular file (or is `-`).
    #[error("{what}; the output must be a regular file (it is written beside it and renamed into place when complete)")]
    OutputNotAFile { what: &'static str },
    /// The output path is one of the inputs.
    #[error("output is the same file as input {input}")]
    OutputIsInput { input: PathBuf },
    /// A request to the writer that would produce a file llama.cpp cannot load, or misuse of its order.
    #[error("cannot write: {problem}")]
    Write { problem: String },
}

/// Bytes as hex, space-separated (`d8 fb 24 b7`).
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shorthand used throughout the GGUF module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
