//! The GGUF reader: parses the header, metadata and tensor infos of one file with every count,
//! length and offset checked against the bytes that remain, and hands out tensor data as zero-copy
//! slices of a memory map.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{GgufError, GgufErrorKind, Result};
use super::value::{Array, Metadata, Value, ValueType};
use super::{
    pad, tensor_n_bytes, DEFAULT_ALIGNMENT, KEY_ALIGNMENT, MAGIC, MAX_ALIGNMENT, MAX_DIMS,
    MAX_KEY_LEN, MAX_NAME_LEN,
};
use crate::quant::GgmlType;

/// One tensor's entry in the tensor-info section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in ggml `ne` order: the fastest-varying dimension (a row's length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Start of the tensor's bytes, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a tensor with no dimensions, as in ggml).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of the tensor's data (without padding). Exact for infos from the reader or accepted by
    /// the writer, which both check the shape; saturates for a hand-made invalid shape.
    pub fn n_bytes(&self) -> u64 {
        tensor_n_bytes(&self.dims, self.ty).unwrap_or(u64::MAX)
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of all dimensions but the first).
    pub fn rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        self.ty.row_bytes(self.row_len()).unwrap_or(u64::MAX)
    }
}

/// Where the file's bytes live: a memory map, or memory for empty files and in-memory parsing.
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One parsed GGUF file. Metadata and tensor infos are owned; tensor data stays in the memory map.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    /// The open file behind a map, for copies the kernel makes without mapping ([`GgufFile::tensor_source`]).
    file: Option<File>,
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_offset: u64,
}

impl GgufFile {
    /// Opens and parses `path`, memory-mapping it.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |op, source| GgufError::new(path, GgufErrorKind::Io { op, error: source });
        let file = File::open(path).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        if meta.is_dir() {
            // Opening a directory succeeds on Linux; mapping it would fail with a puzzling ENODEV.
            return Err(GgufError::new(path, GgufErrorKind::IsDirectory));
        }
        let len = meta.len();
        let backing = if len == 0 {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and lives as long as the GgufFile. Like every mmap-based
            // model loader (llama.cpp included), we rely on the file not being truncated or rewritten
            // by another process while it is open; our own writer never writes over an input.
            Backing::Mmap(unsafe { Mmap::map(&file) }.map_err(|e| io("memory-map", e))?)
        };
        let mut parsed = GgufFile::parse(path.to_path_buf(), backing)?;
        parsed.file = Some(file);
        Ok(parsed)
    }

    /// Parses a GGUF image held in memory; `path` only names it in errors (used by tests and fuzzing).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(path.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<GgufFile> {
        let parsed = match Parser::new(backing.bytes()).parse() {
            Ok(p) => p,
            Err(kind) => return Err(GgufError::new(path, kind)),
        };
        Ok(GgufFile {
            path,
            backing,
            file: None,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index: parsed.index,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, a slice of the memory map (no copy). `info` must come from this file;
    /// the reader has checked that every tensor's data lies inside it.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.backing.bytes();
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.n_bytes())?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        let slice = range.and_then(|r| bytes.get(r));
        debug_assert!(slice.is_some(), "tensor info not from this file");
        slice.unwrap_or(&[])
    }

    /// The file a tensor's bytes live in and their offset in it, for a copy the kernel makes
    /// file to file (`None` for an image held in memory).
    pub fn tensor_source(&self, info: &TensorInfo) -> Option<(&File, u64)> {
        let offset = self.data_offset.checked_add(info.offset)?;
        self.file.as_ref().map(|f| (f, offset))
    }

    /// Tells the OS that this tensor's pages will not be read again soon, so that streaming through
    /// a large model (a copy, a merge) does not keep the whole file mapped in memory: the resident
    /// set stays near one tensor. A later read simply faults the pages back in from the file.
    /// Best effort: errors are ignored, and in-memory files are left alone.
    pub fn release_pages(&self, info: &TensorInfo) {
        self.release_slice_pages(self.tensor_data(info));
    }

    /// [`GgufFile::release_pages`] for any slice of this file's map (e.g. one piece of a large
    /// tensor being copied); a slice from elsewhere is ignored.
    pub fn release_slice_pages(&self, bytes: &[u8]) {
        #[cfg(unix)]
        if let Backing::Mmap(m) = &self.backing {
            let off = (bytes.as_ptr() as usize).wrapping_sub(m.as_ptr() as usize);
            if !bytes.is_empty()
                && off
                    .checked_add(bytes.len())
                    .is_some_and(|end| end <= m.len())
            {
                // SAFETY: the map is a read-only mapping of a file we never write; MADV_DONTNEED
                // only drops the mapped pages, and any later access reads the same bytes back
                // from the file, so outstanding slices keep seeing identical contents.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, bytes.len())
                };
            }
        }
    }

    /// Byte offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.backing.bytes().len() as u64
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_offset: u64,
}

/// A cursor over the file's bytes; every read is bounds-checked and names what it was reading.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type PResult<T> = std::result::Result<T, GgufErrorKind>;

/// Smallest possible key-value pair: key length (8) + 1 key byte + type (4) + a 1-byte value.
const MIN_KV_SIZE: u64 = 8 + 1 + 4 + 1;
/// Smallest possible tensor info: name length (8) + 1 name byte + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 1 + 4 + 4 + 8;

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Parser<'a> {
        Parser { bytes, pos: 0 }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> PResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufErrorKind::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        // n <= remaining <= usize::MAX, so the cast is lossless.
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> PResult<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> PResult<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> PResult<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what remains, so that
    /// reserving `count` slots is bounded by the file size; returns `count` as `usize`.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: impl FnOnce() -> String,
    ) -> PResult<usize> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|total| total <= self.remaining());
        if !fits {
            return Err(GgufErrorKind::CountTooLarge {
                what: what(),
                count,
                min_size,
                offset: self.pos as u64,
                available: self.remaining(),
            });
        }
        Ok(count as usize)
    }

    /// A GGUF string: `u64` length, then that many bytes of UTF-8 (no terminator).
    fn string(&mut self, what: &dyn Fn() -> String) -> PResult<&'a str> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufErrorKind::BadUtf8 { what: what() })
    }

    fn parse(mut self) -> PResult<Parsed> {
        let magic = self
            .take(4, || "magic".into())
            .map_err(|_| GgufErrorKind::BadMagic {
                found: self.bytes[..self.bytes.len().min(4)].to_vec(),
            })?;
        if magic != MAGIC {
            return Err(GgufErrorKind::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = self.u32(|| "version".into())?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(GgufErrorKind::BigEndian { version });
        }
        if !(2..=3).contains(&version) {
            return Err(GgufErrorKind::UnsupportedVersion { version });
        }
        let n_tensors = self.u64(|| "tensor count".into())?;
        let n_kv = self.u64(|| "metadata key-value count".into())?;

        let metadata = self.metadata(n_kv)?;
        let alignment = match metadata.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => u64::from(*a),
            Some(other) => {
                return Err(GgufErrorKind::WrongKeyType {
                    key: KEY_ALIGNMENT.into(),
                    expected: ValueType::U32,
                    found: other.type_name(),
                })
            }
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(GgufErrorKind::BadAlignment { alignment });
        }

        let (tensors, index) = self.tensor_infos(n_tensors)?;

        // The data section starts at the next multiple of the alignment (llama.cpp's loader seeks
        // there whenever the file has tensors).
        let data_offset = pad(self.pos as u64, alignment);
        let file_len = self.bytes.len() as u64;
        if !tensors.is_empty() && data_offset > file_len {
            return Err(GgufErrorKind::Truncated {
                what: "padding before the data section".into(),
                offset: self.pos as u64,
                needed: data_offset - self.pos as u64,
                available: self.remaining(),
            });
        }
        check_tensor_layout(&tensors, alignment, file_len.saturating_sub(data_offset))?;

        Ok(Parsed {
            version,
            alignment,
            metadata,
            tensors,
            index,
            data_offset,
        })
    }

    fn metadata(&mut self, n_kv: u64) -> PResult<Metadata> {
        let n = self.check_count(n_kv, MIN_KV_SIZE, || "metadata key-value".into())?;
        let mut metadata = Metadata::new();
        metadata.reserve(n);
        let mut seen = std::collections::HashSet::with_capacity(n);
        for i in 0..n_kv {
            let key = self.string(&|| format!("metadata key {i}"))?;
            if key.is_empty() {
                return Err(GgufErrorKind::BadKey {
                    index: i,
                    problem: "is empty".into(),
                });
            }
            if key.len() > MAX_KEY_LEN {
                return Err(GgufErrorKind::BadKey {
                    index: i,
                    problem: format!(
                        "is {} bytes long, at most {MAX_KEY_LEN} are allowed",
                        key.len()
                    ),
                });
            }
            if !seen.insert(key) {
                return Err(GgufErrorKind::DuplicateKey { key: key.into() });
            }
            let type_id = self.u32(|| format!("type of metadata key '{key}'"))?;
            let ty = value_type(key, type_id)?;
            let value = if ty == ValueType::Array {
                let elem_id = self.u32(|| format!("element type of metadata key '{key}'"))?;
                let elem = value_type(key, elem_id)?;
                if elem == ValueType::Array {
                    return Err(GgufErrorKind::NestedArray { key: key.into() });
                }
                let count = self.u64(|| format!("array length of metadata key '{key}'"))?;
                Value::Array(self.array_value(key, elem, count)?)
            } else {
                self.scalar(key, ty)?
            };
            metadata.push_unchecked(key.to_string(), value);
        }
        Ok(metadata)
    }

    fn scalar(&mut self, key: &str, ty: ValueType) -> PResult<Value> {
        let what = || format!("value of metadata key '{key}'");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array::<1>(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(bool_byte(key, self.array::<1>(what)?[0])?),
            ValueType::String => Value::String(self.string(&what)?.to_string()),
            ValueType::Array => unreachable!("arrays are read by the caller"),
        })
    }

    fn array_value(&mut self, key: &str, elem: ValueType, count: u64) -> PResult<Array> {
        let what = || format!("array of metadata key '{key}'");
        let n = self.check_count(count, elem.min_size() as u64, what)?;
        if elem == ValueType::String {
            // Checked above: n strings need at least 8·n bytes, so this reservation is bounded by the
            // file size, and the vocabulary (262,144 entries for gemma3) is read without regrowth.
            let mut out = Vec::with_capacity(n);
            for j in 0..n {
                let s = self.string(&|| format!("element {j} of metadata key '{key}'"))?;
                out.push(s.to_string());
            }
            return Ok(Array::String(out));
        }
        // Fixed-size elements: n·size bytes were checked to remain, so take them in one slice.
        let bytes = self.take((n * elem.min_size()) as u64, what)?;
        fn conv<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match elem {
            ValueType::U8 => Array::U8(bytes.to_vec()),
            ValueType::I8 => Array::I8(conv(bytes, i8::from_le_bytes)),
            ValueType::U16 => Array::U16(conv(bytes, u16::from_le_bytes)),
            ValueType::I16 => Array::I16(conv(bytes, i16::from_le_bytes)),
            ValueType::U32 => Array::U32(conv(bytes, u32::from_le_bytes)),
            ValueType::I32 => Array::I32(conv(bytes, i32::from_le_bytes)),
            ValueType::F32 => Array::F32(conv(bytes, f32::from_le_bytes)),
            ValueType::U64 => Array::U64(conv(bytes, u64::from_le_bytes)),
            ValueType::I64 => Array::I64(conv(bytes, i64::from_le_bytes)),
            ValueType::F64 => Array::F64(conv(bytes, f64::from_le_bytes)),
            ValueType::Bool => Array::Bool(
                bytes
                    .iter()
                    .map(|&b| bool_byte(key, b))
                    .collect::<PResult<_>>()?,
            ),
            ValueType::String | ValueType::Array => unreachable!("handled above"),
        })
    }

    fn tensor_infos(
        &mut self,
        n_tensors: u64,
    ) -> PResult<(Vec<TensorInfo>, HashMap<String, usize>)> {
        let n = self.check_count(n_tensors, MIN_TENSOR_INFO_SIZE, || "tensor info".into())?;
        let mut tensors = Vec::with_capacity(n);
        let mut index = HashMap::with_capacity(n);
        for i in 0..n_tensors {
            let name = self.string(&|| format!("name of tensor {i}"))?;
            if name.is_empty() {
                return Err(GgufErrorKind::BadTensorName {
                    index: i,
                    problem: "is empty".into(),
                });
            }
            if name.len() >= MAX_NAME_LEN {
                return Err(GgufErrorKind::BadTensorName {
                    index: i,
                    problem: format!(
                        "'{name}' is {} bytes long; ggml allows at most {}",
                        name.len(),
                        MAX_NAME_LEN - 1
                    ),
                });
            }
            if index.contains_key(name) {
                return Err(GgufErrorKind::DuplicateTensor { name: name.into() });
            }
            let n_dims = self.u32(|| format!("dimension count of tensor '{name}'"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufErrorKind::TooManyDims {
                    name: name.into(),
                    n_dims,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(self.u64(|| format!("dimension {d} of tensor '{name}'"))?);
            }
            let type_id = self.u32(|| format!("type of tensor '{name}'"))?;
            let ty =
                GgmlType::from_id(type_id).ok_or_else(|| GgufErrorKind::UnknownTensorType {
                    name: name.into(),
                    id: type_id,
                })?;
            check_shape(name, &dims, ty)?;
            let offset = self.u64(|| format!("data offset of tensor '{name}'"))?;
            index.insert(name.to_string(), tensors.len());
            tensors.push(TensorInfo {
                name: name.to_string(),
                dims,
                ty,
                offset,
            });
        }
        Ok((tensors, index))
    }
}

fn value_type(key: &str, id: u32) -> PResult<ValueType> {
    ValueType::from_id(id).ok_or_else(|| GgufErrorKind::UnknownValueType {
        key: key.into(),
        id,
    })
}

fn bool_byte(key: &str, byte: u8) -> PResult<bool> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(GgufErrorKind::BadBool {
            key: key.into(),
            byte,
        }),
    }
}

/// The shape checks of llama.cpp's loader: element count fits an `i64`, rows are whole blocks.
/// Shared by the reader and the writer so both accept exactly the same tensors.
pub(crate) fn check_shape(name: &str, dims: &[u64], ty: GgmlType) -> PResult<()> {
    if dims.len() > MAX_DIMS {
        return Err(GgufErrorKind::TooManyDims {
            name: name.into(),
            n_dims: dims.len() as u32,
        });
    }
    let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if n_elements.is_none_or(|n| n > i64::MAX as u64) || dims.iter().any(|&d| d > i64::MAX as u64) {
        return Err(GgufErrorKind::ShapeOverflow {
            name: name.into(),
            dims: dims.to_vec(),
        });
    }
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ty.block_size() as u64) {
        return Err(GgufErrorKind::RowNotBlockMultiple {
            name: name.into(),
            ty,
            row,
            block: ty.block_size(),
        });
    }
    Ok(())
}

/// Checks that each tensor's data lies inside the data section, does not overlap the previous one,
/// and sits exactly where llama.cpp's loader expects it.
fn check_tensor_layout(tensors: &[TensorInfo], alignment: u64, data_len: u64) -> PResult<()> {
    let mut expected = 0u64;
    let mut previous: Option<(&str, u64)> = None;
    for t in tensors {
        // check_shape has run, so the size is representable.
        let size = t.n_bytes();
        let end = t.offset.checked_add(size);
        if end.is_none_or(|e| e > data_len) {
            return Err(GgufErrorKind::TensorOutOfRange {
                name: t.name.clone(),
                offset: t.offset,
                size,
                data_len,
            });
        }
        if let Some((prev, prev_end)) = previous {
            if t.offset < prev_end && size > 0 {
                return Err(GgufErrorKind::TensorOverlap {
                    name: t.name.clone(),
                    offset: t.offset,
                    previous: prev.into(),
                    previous_end: prev_end,
                });
            }
        }
        if t.offset != expected {
            return Err(GgufErrorKind::TensorOffset {
                name: t.name.clone(),
                offset: t.offset,
                expected,
            });
        }
        // end <= data_len <= file size, so padding it cannot overflow.
        expected = pad(t.offset + size, alignment);
        previous = Some((&t.name, t.offset + size));
    }
    Ok(())
}
