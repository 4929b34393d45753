//! A memory-mapped `.safetensors` file: header parsed by the `safetensors` crate, tensors handed out
//! as zero-copy byte slices, and the float types LoRA adapters use (F32, F16, BF16) widened to f32.
//!
//! The crate's `read_metadata` already enforces what a hostile header could abuse: the 8-byte length
//! prefix is capped (100 MB) and checked against the file, the header must be UTF-8 JSON, every
//! shape × dtype size is computed with checked arithmetic and must equal its byte range, and the
//! ranges (sorted by offset) must run back to back from 0 to exactly the end of the file, so they can
//! neither overlap nor leave gaps. We add the rest: errors that name the file and the tensor,
//! dtype checks before conversion, and no allocation sized by the file beyond what the bytes hold.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// Errors of this module; every one names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The header is malformed (the crate's diagnosis is kept).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Header { path: PathBuf, reason: String },
    /// A tensor asked for by name is not in the file.
    #[error("{path}: tensor '{name}' not found")]
    NotFound { path: PathBuf, name: String },
    /// A tensor has a dtype we cannot read as a float.
    #[error("{path}: tensor '{name}' has dtype {dtype:?}; expected F32, F16 or BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
}

/// One tensor's header entry, with its byte range resolved against the whole file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    /// PyTorch order (slowest dimension first).
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements (the crate has checked that this does not overflow).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Absolute byte range of the data in the file.
    pub fn byte_range(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// A mapped safetensors file. Tensors are listed in file (offset) order.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: Vec<TensorEntry>,
    metadata: Vec<(String, String)>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. Another process truncating the
        // file while we read it could fault; that is the accepted trade of every mmap reader (ripgrep,
        // safetensors itself) and cannot corrupt memory we own.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_mmap(path, mmap)
    }

    fn from_mmap(path: &Path, mmap: Mmap) -> Result<SafetensorsFile, SafetensorsError> {
        let (header_len, tensors, metadata) =
            parse_header(&mmap).map_err(|reason| SafetensorsError::Header {
                path: path.to_path_buf(),
                reason,
            })?;
        let data_start = 8 + header_len;
        let tensors = tensors
            .into_iter()
            .map(|(name, dtype, shape, (s, e))| TensorEntry {
                name,
                dtype,
                shape,
                start: data_start + s,
                end: data_start + e,
            })
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in offset order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The `__metadata__` string map of the header, sorted by key.
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry, SafetensorsError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| SafetensorsError::NotFound {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The raw little-endian bytes of a tensor: a slice of the mapping, no copy.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        // The ranges were validated against the file length by the crate; `get` keeps this total
        // even if an entry from another file is passed by mistake.
        self.mmap.get(entry.start..entry.end).unwrap_or(&[])
    }

    /// The tensor's values widened to f32 (exactly: F16 and BF16 are subsets of F32).
    pub fn to_f32(&self, entry: &TensorEntry) -> Result<Vec<f32>, SafetensorsError> {
        let widen = self.widener(entry)?;
        let values = self
            .bytes(entry)
            .chunks_exact(widen.width)
            .map(|c| (widen.f)(c))
            .collect();
        self.release(entry);
        Ok(values)
    }

    /// Selected values of a tensor widened to f32: element `i` of the result is element `indices[i]`
    /// of the tensor in row-major order. `None` when an index is past the end. Reads only those
    /// elements, so taking one expert's strided block of a fused-expert LoRA factor costs that
    /// block, not the tensor.
    pub fn to_f32_at(
        &self,
        entry: &TensorEntry,
        indices: impl Iterator<Item = usize>,
    ) -> Result<Option<Vec<f32>>, SafetensorsError> {
        let widen = self.widener(entry)?;
        let bytes = self.bytes(entry);
        let mut out = Vec::with_capacity(indices.size_hint().0);
        for i in indices {
            let Some(c) = i
                .checked_mul(widen.width)
                .and_then(|at| bytes.get(at..at.checked_add(widen.width)?))
            else {
                return Ok(None);
            };
            out.push((widen.f)(c));
        }
        Ok(Some(out))
    }

    /// How one element of `entry` is widened to f32: the one place the float dtypes are decoded.
    fn widener(&self, entry: &TensorEntry) -> Result<Widener, SafetensorsError> {
        let (width, f): (usize, fn(&[u8]) -> f32) = match entry.dtype {
            Dtype::F32 => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => (2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            Dtype::BF16 => (2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            dtype => {
                return Err(SafetensorsError::Dtype {
                    path: self.path.clone(),
                    name: entry.name.clone(),
                    dtype,
                })
            }
        };
        Ok(Widener { width, f })
    }

    /// Hands the tensor's mapped pages back to the kernel once its values are copied out, so
    /// streaming through a large file keeps the resident set at about one tensor.
    pub fn release(&self, entry: &TensorEntry) {
        #[cfg(unix)]
        if entry.end > entry.start && entry.end <= self.mmap.len() {
            // SAFETY: the mapping is read-only and backed by the file, so after MADV_DONTNEED any
            // later access (including through slices handed out earlier) re-reads the same bytes
            // from the file; no memory we own changes. Errors only mean the pages stay resident.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    entry.start,
                    entry.end - entry.start,
                )
            };
        }
    }
}

type ParsedTensor = (String, Dtype, Vec<usize>, (usize, usize));
type ParsedHeader = (usize, Vec<ParsedTensor>, Vec<(String, String)>);

/// Parses the header with the crate; returns the header length, tensors sorted by offset, and the
/// sorted `__metadata__`.
fn parse_header(bytes: &[u8]) -> Result<ParsedHeader, String> {
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        safetensors::SafeTensorError::InvalidHeaderDeserialization => explain_bad_header(bytes),
        e @ (safetensors::SafeTensorError::TensorInvalidInfo
        | safetensors::SafeTensorError::ValidationOverflow) => {
            match header_json(bytes).as_ref().and_then(tensor_with_bad_size) {
                Some(detail) => detail,
                None => describe_error(&e),
            }
        }
        e => describe_error(&e),
    })?;
    let mut tensors: Vec<ParsedTensor> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.dtype, info.shape.clone(), info.data_offsets))
        .collect();
    tensors.sort_by(|a, b| a.3.cmp(&b.3).then_with(|| a.0.cmp(&b.0)));
    let mut metadata: Vec<(String, String)> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    metadata.sort();
    Ok((header_len, tensors, metadata))
}

/// The header as JSON, for diagnosing a header the crate refused; `None` if it is not even that.
fn header_json(bytes: &[u8]) -> Option<serde_json::Value> {
    let len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let text = std::str::from_utf8(bytes.get(8..8usize.checked_add(len)?)?).ok()?;
    serde_json::from_str(text).ok()
}

/// Names the first tensor whose shape × dtype size overflows or differs from its byte range.
fn tensor_with_bad_size(header: &serde_json::Value) -> Option<String> {
    for (name, entry) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype: Dtype = serde_json::from_value(entry.get("dtype")?.clone()).ok()?;
        let shape: Vec<u64> = serde_json::from_value(entry.get("shape")?.clone()).ok()?;
        let [begin, end]: [u64; 2] =
            serde_json::from_value(entry.get("data_offsets")?.clone()).ok()?;
        let size = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, d| acc.checked_mul(*d));
        match size {
            None => return Some(format!("tensor '{name}': shape {shape:?} overflows")),
            Some(n) if Some(n) != end.checked_sub(begin) => {
                return Some(format!(
                    "tensor '{name}': shape {shape:?} of {dtype:?} needs {n} bytes, data_offsets [{begin}, {end}] hold {}",
                    i128::from(end) - i128::from(begin)
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// Says what is wrong with a header the crate could not deserialize (it only reports that it could
/// not): JSON syntax with its position, an entry that is not a tensor description, or an unknown
/// dtype. Only called on a header the crate has already bounded and found to be UTF-8.
fn explain_bad_header(bytes: &[u8]) -> String {
    let generic = || "header is not the expected JSON".to_string();
    let Some(len) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
    else {
        return generic();
    };
    let Some(text) = bytes
        .get(8..8usize.saturating_add(len))
        .and_then(|b| std::str::from_utf8(b).ok())
    else {
        return generic();
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return format!("header is not JSON: {e}"),
    };
    let Some(obj) = value.as_object() else {
        return "header is not a JSON object".into();
    };
    for (name, entry) in obj {
        if name == "__metadata__" {
            if !entry
                .as_object()
                .is_some_and(|m| m.values().all(|v| v.is_string()))
            {
                return "__metadata__ is not an object of strings".into();
            }
            continue;
        }
        let Some(fields) = entry.as_object() else {
            return format!("tensor '{name}': expected an object with dtype, shape, data_offsets");
        };
        if let Some(dtype) = fields.get("dtype") {
            if serde_json::from_value::<Dtype>(dtype.clone()).is_err() {
                return format!("tensor '{name}': unknown dtype {dtype}");
            }
        }
        for key in ["dtype", "shape", "data_offsets"] {
            if !fields.contains_key(key) {
                return format!("tensor '{name}': no {key}");
            }
        }
        let Some(shape) = fields.get("shape").and_then(|s| s.as_array()) else {
            return format!("tensor '{name}': shape is not a list");
        };
        if !shape.iter().all(|d| d.as_u64().is_some()) {
            return format!(
                "tensor '{name}': shape {} is not a list of sizes",
                fields["shape"]
            );
        }
        let offsets_ok = fields
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .is_some_and(|o| o.len() == 2 && o.iter().all(|d| d.as_u64().is_some()));
        if !offsets_ok {
            return format!(
                "tensor '{name}': data_offsets {} is not a [begin, end] pair",
                fields["data_offsets"]
            );
        }
    }
    generic()
}

fn describe_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "header length over the 100 MB limit".into(),
        E::InvalidHeaderLength => "header length runs past the end of the file".into(),
        E::InvalidHeader => "header is not UTF-8".into(),
        E::InvalidHeaderStart => "header does not start with '{'".into(),
        E::InvalidHeaderDeserialization => "header is not the expected JSON".into(),
        E::InvalidOffset(name) => {
            format!("tensor '{name}': data offsets overlap, leave a gap or run backwards")
        }
        E::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        E::MetadataIncompleteBuffer => {
            "tensor data does not end exactly at the end of the file".into()
        }
        other => format!("{other:?}"),
    }
}

/// Parses an in-memory buffer the way [`SafetensorsFile::open`] parses a file and returns its entries
/// with absolute byte ranges; for tests and fuzzing.
pub fn check_bytes(bytes: &[u8]) -> Result<Vec<(TensorEntry, std::ops::Range<usize>)>, String> {
    let (header_len, tensors, _) = parse_header(bytes)?;
    Ok(tensors
        .into_iter()
        .map(|(name, dtype, shape, (s, e))| {
            let range = 8 + header_len + s..8 + header_len + e;
            let entry = TensorEntry {
                name,
                dtype,
                shape,
                start: range.start,
                end: range.end,
            };
            (entry, range)
        })
        .collect())
}

/// One float dtype's element width in bytes and its decoder (see [`SafetensorsFile::widener`]).
struct Widener {
    width: usize,
    f: fn(&[u8]) -> f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A safetensors file built by hand: header JSON, then data.
    fn build(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn reads_f32_f16_bf16() {
        let mut data = Vec::new();
        for v in [1.5f32, -2.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        for v in [0.25f32, 3.0] {
            data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        for v in [-0.5f32, 8.0] {
            data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"c":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},"__metadata__":{"format":"pt"}}"#;
        let f = write_tmp(&build(header, &data));
        let st = SafetensorsFile::open(f.path()).unwrap();
        let names: Vec<_> = st.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(st.to_f32(st.entry("a").unwrap()).unwrap(), [1.5, -2.0]);
        assert_eq!(st.to_f32(st.entry("b").unwrap()).unwrap(), [0.25, 3.0]);
        assert_eq!(st.to_f32(st.entry("c").unwrap()).unwrap(), [-0.5, 8.0]);
        assert_eq!(st.metadata(), [("format".to_string(), "pt".to_string())]);
    }

    #[test]
    fn rejects_bad_headers_naming_the_file() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "shorter"),
            (u64::MAX.to_le_bytes().to_vec(), "100 MB"),
            (
                build("{}", &[]).into_iter().take(9).collect(),
                "past the end",
            ),
            (build("{\"a\":", &[]), "JSON"),
            (
                build(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "tensor 'a': shape [2] of F32 needs 8 bytes, data_offsets [0, 4] hold 4",
            ),
            (
                build(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
                    &[0; 6],
                ),
                "overlap",
            ),
            (
                build(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 8],
                ),
                "end of the file",
            ),
            (
                build(
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "tensor 'a': shape [4611686018427387904, 8] overflows",
            ),
        ];
        for (bytes, want) in cases {
            let f = write_tmp(&bytes);
            let err = SafetensorsFile::open(f.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
            assert!(err.contains(&f.path().display().to_string()), "{err}");
        }
    }

    #[test]
    fn integer_dtype_is_refused_with_tensor_name() {
        let header = r#"{"ids":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
        let f = write_tmp(&build(header, &[0; 4]));
        let st = SafetensorsFile::open(f.path()).unwrap();
        let err = st.to_f32(st.entry("ids").unwrap()).unwrap_err().to_string();
        assert!(err.contains("'ids'") && err.contains("I32"), "{err}");
        assert!(st.entry("nope").is_err());
    }

    proptest::proptest! {
        /// Any corruption of a valid file (one byte changed, or cut short) parses or is refused, never
        /// panics, and what parses stays inside the buffer.
        #[test]
        fn corrupted_files_never_panic(pos in 0usize..200, byte in proptest::num::u8::ANY, cut in 0usize..220) {
            let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]}}"#;
            let mut bytes = build(header, &[7u8; 24]);
            if pos < bytes.len() {
                bytes[pos] = byte;
            }
            bytes.truncate(cut.min(bytes.len()));
            if let Ok(entries) = check_bytes(&bytes) {
                for (_, r) in entries {
                    proptest::prop_assert!(r.start <= r.end && r.end <= bytes.len());
                }
            }
        }
    }
}
