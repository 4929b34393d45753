//! The streaming GGUF writer: header, metadata and tensor infos first (with every offset computed
//! here, in one place), then each tensor's bytes as the producer hands them over, padded to the
//! alignment. Peak memory is the caller's largest tensor, never the file. Output goes through
//! [`crate::output::AtomicOutput`]: a temporary file renamed onto the target by [`GgufWriter::finish`].

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{GgufError, GgufErrorKind, Result};
use super::reader::check_shape;
use super::value::{Array, Metadata, Value};
use super::{
    pad, tensor_n_bytes, DEFAULT_ALIGNMENT, KEY_ALIGNMENT, MAGIC, MAX_ALIGNMENT, MAX_KEY_LEN,
    MAX_NAME_LEN,
};
use crate::output::{AtomicOutput, OutputError};
use crate::quant::GgmlType;

/// A tensor to be written: its name, shape (ggml `ne` order) and type. The writer computes offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl From<&super::TensorInfo> for TensorDesc {
    fn from(t: &super::TensorInfo) -> TensorDesc {
        TensorDesc {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        }
    }
}

/// Test hook: milliseconds to sleep after each tensor, so an interrupt test can catch a write in
/// progress. It changes no byte written.
const SLOW_WRITE_ENV: &str = "GGUF_LORA_TEST_SLOW_WRITE_MS";

/// A GGUF file being written; see the module docs.
pub struct GgufWriter {
    out: AtomicOutput,
    path: PathBuf,
    alignment: u64,
    /// (name, bytes) of each declared tensor, in order.
    tensors: Vec<(String, u64)>,
    next: usize,
    /// Bytes written so far, for padding.
    position: u64,
    slow_write: Option<Duration>,
}

/// Where every byte of a GGUF file goes, decided once from what will be written: the start of the
/// data section, each tensor's offset in it and size, and the file size. [`GgufWriter::create`]
/// writes by it; [`Placement::plan`] also serves whoever must know a file's layout without writing it
/// (`inspect` of a bundle member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Bytes before the data section (header, metadata, tensor infos, padding).
    pub data_offset: u64,
    /// Each tensor's offset within the data section, in order.
    pub offsets: Vec<u64>,
    /// Each tensor's data bytes (without padding).
    pub sizes: Vec<u64>,
    /// Total bytes of the file.
    pub file_size: u64,
}

impl Placement {
    /// Checks a write request and lays it out: a running sum of each tensor's size padded to the
    /// alignment, exactly what llama.cpp's loader checks ("tensor '%s' has offset ..."). `target`
    /// names the file in errors. `alignment` must match `general.alignment` in `metadata` (32 when
    /// absent).
    pub fn plan(
        target: &Path,
        version: u32,
        alignment: u64,
        metadata: &Metadata,
        tensors: &[TensorDesc],
    ) -> Result<Placement> {
        let err = |kind| GgufError::new(target, kind);
        let invalid = |problem: String| err(GgufErrorKind::Write { problem });
        if !(2..=3).contains(&version) {
            return Err(invalid(format!("GGUF version {version} (we write 2 or 3)")));
        }
        if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(err(GgufErrorKind::BadAlignment { alignment }));
        }
        match metadata.get(KEY_ALIGNMENT) {
            None if alignment == DEFAULT_ALIGNMENT => {}
            None => {
                return Err(invalid(format!(
                    "alignment {alignment} requested but metadata has no {KEY_ALIGNMENT} (readers would assume {DEFAULT_ALIGNMENT})"
                )))
            }
            Some(Value::U32(a)) if u64::from(*a) == alignment => {}
            Some(other) => {
                return Err(invalid(format!(
                    "alignment {alignment} requested but metadata has {KEY_ALIGNMENT} = {}",
                    other.describe()
                )))
            }
        }
        // Header: magic, version, tensor count, key count.
        let mut head = 4 + 4 + 8 + 8u64;
        // Values need no check: the types rule out nested arrays, the only invalid value.
        let mut buf = Vec::new();
        for (key, value) in metadata.iter() {
            if key.is_empty() || key.len() > MAX_KEY_LEN {
                return Err(invalid(format!("metadata key of {} bytes", key.len())));
            }
            buf.clear();
            encode_kv(&mut buf, key, value);
            head += buf.len() as u64;
        }
        let mut names = HashSet::with_capacity(tensors.len());
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            if t.name.is_empty() || t.name.len() >= MAX_NAME_LEN {
                return Err(invalid(format!(
                    "tensor name '{}' is {} bytes long; ggml needs 1 to {}",
                    t.name,
                    t.name.len(),
                    MAX_NAME_LEN - 1
                )));
            }
            if !names.insert(t.name.as_str()) {
                return Err(err(GgufErrorKind::DuplicateTensor {
                    name: t.name.clone(),
                }));
            }
            check_shape(&t.name, &t.dims, t.ty).map_err(err)?;
            let size = tensor_n_bytes(&t.dims, t.ty)
                .ok_or_else(|| invalid(format!("tensor '{}' size overflows", t.name)))?;
            // Name (length-prefixed), dimension count, dims, type id, offset.
            head += 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8;
            offsets.push(offset);
            sizes.push(size);
            offset = offset
                .checked_add(size)
                .map(|end| pad(end, alignment))
                .ok_or_else(|| invalid("total tensor data size overflows".into()))?;
        }
        let data_offset = pad(head, alignment);
        Ok(Placement {
            data_offset,
            offsets,
            sizes,
            file_size: data_offset + offset,
        })
    }
}

impl GgufWriter {
    /// Checks the request ([`Placement::plan`]), creates the temporary file beside `target` and writes
    /// everything up to the data section. Refuses a `target` that is one of `inputs`.
    pub fn create(
        target: &Path,
        inputs: &[&Path],
        version: u32,
        alignment: u64,
        metadata: &Metadata,
        tensors: &[TensorDesc],
    ) -> Result<GgufWriter> {
        let layout = Placement::plan(target, version, alignment, metadata, tensors)?;
        let out = AtomicOutput::create(target, inputs).map_err(|e| output_error(target, e))?;
        let slow_write = std::env::var(SLOW_WRITE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let mut w = GgufWriter {
            out,
            path: target.to_path_buf(),
            alignment,
            tensors: tensors
                .iter()
                .zip(&layout.sizes)
                .map(|(t, &size)| (t.name.clone(), size))
                .collect(),
            next: 0,
            position: 0,
            slow_write,
        };
        w.write_head(version, metadata, tensors, &layout)?;
        Ok(w)
    }

    fn io_err(&self, error: std::io::Error) -> GgufError {
        GgufError::new(&self.path, GgufErrorKind::Io { op: "write", error })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| self.io_err(e))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn put_str(&mut self, s: &str) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    fn pad_to_alignment(&mut self) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut n = pad(self.position, self.alignment) - self.position;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn write_head(
        &mut self,
        version: u32,
        metadata: &Metadata,
        tensors: &[TensorDesc],
        layout: &Placement,
    ) -> Result<()> {
        self.put(MAGIC)?;
        self.put(&version.to_le_bytes())?;
        self.put(&(tensors.len() as u64).to_le_bytes())?;
        self.put(&(metadata.len() as u64).to_le_bytes())?;
        let mut buf = Vec::new();
        for (key, value) in metadata.iter() {
            buf.clear();
            encode_kv(&mut buf, key, value);
            self.put(&buf)?;
        }
        for (t, offset) in tensors.iter().zip(&layout.offsets) {
            self.put_str(&t.name)?;
            self.put(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                self.put(&d.to_le_bytes())?;
            }
            self.put(&t.ty.id().to_le_bytes())?;
            self.put(&offset.to_le_bytes())?;
        }
        self.pad_to_alignment()?;
        debug_assert_eq!(self.position, layout.data_offset);
        Ok(())
    }

    /// Writes the next tensor's bytes (in the order given to [`GgufWriter::create`]) and its padding.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        self.next_sized(data.len() as u64)?;
        self.put(data)?;
        self.end_tensor()?;
        if let Some(d) = self.slow_write {
            self.out.flush().map_err(|e| self.io_err(e))?;
            std::thread::sleep(d);
        }
        Ok(())
    }

    /// Writes the next tensor as `size` bytes of `src` from `offset`, copied by the kernel file to
    /// file; `Ok(false)`, having written nothing, where it cannot (the caller writes the bytes).
    pub fn copy_tensor_from(&mut self, src: &File, offset: u64, size: u64) -> Result<bool> {
        self.next_sized(size)?;
        if !self
            .out
            .copy_from(src, offset, size)
            .map_err(|e| self.io_err(e))?
        {
            return Ok(false);
        }
        self.position += size;
        self.end_tensor()?;
        Ok(true)
    }

    /// Writes the next tensor from consecutive pieces whose lengths add up to its size, calling
    /// `done(piece)` after each: a caller streaming a large tensor from a memory map releases each
    /// piece's pages as it goes, so the tensor is never resident all at once.
    pub fn write_tensor_pieces<'d>(
        &mut self,
        pieces: impl IntoIterator<Item = &'d [u8]>,
        mut done: impl FnMut(&'d [u8]),
    ) -> Result<()> {
        let (name, size) = self.next_declared()?;
        let mut written = 0u64;
        for piece in pieces {
            written += piece.len() as u64;
            if written > size {
                break;
            }
            self.put(piece)?;
            done(piece);
        }
        if written != size {
            return Err(self.write_err(format!(
                "tensor '{name}' has {written} or more bytes of data, expected {size}"
            )));
        }
        self.end_tensor()
    }

    /// The next declared tensor's name and size, or the error of writing more than declared.
    fn next_declared(&self) -> Result<(String, u64)> {
        self.tensors.get(self.next).cloned().ok_or_else(|| {
            self.write_err(format!(
                "more tensors written than the {} declared",
                self.tensors.len()
            ))
        })
    }

    /// Checks that the next declared tensor has `size` bytes, before any of them is written.
    fn next_sized(&self, size: u64) -> Result<()> {
        let (name, want) = self.next_declared()?;
        if size != want {
            return Err(self.write_err(format!(
                "tensor '{name}' has {size} bytes of data, expected {want}"
            )));
        }
        Ok(())
    }

    /// Pads after the tensor just written and moves on to the next.
    fn end_tensor(&mut self) -> Result<()> {
        self.pad_to_alignment()?;
        self.next += 1;
        Ok(())
    }

    fn write_err(&self, problem: String) -> GgufError {
        GgufError::new(&self.path, GgufErrorKind::Write { problem })
    }

    /// Name of the tensor [`GgufWriter::write_tensor`] expects next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.tensors.get(self.next).map(|(n, _)| n.as_str())
    }

    /// Checks every declared tensor was written, then flushes, syncs and renames into place.
    pub fn finish(self) -> Result<()> {
        if self.next != self.tensors.len() {
            return Err(GgufError::new(
                &self.path,
                GgufErrorKind::Write {
                    problem: format!(
                        "only {} of {} tensors were written",
                        self.next,
                        self.tensors.len()
                    ),
                },
            ));
        }
        let path = self.path;
        self.out.finish().map_err(|e| output_error(&path, e))
    }
}

fn output_error(target: &Path, e: OutputError) -> GgufError {
    let kind = match e {
        OutputError::SameAsInput { input, .. } => GgufErrorKind::OutputIsInput { input },
        OutputError::NotAFile { what, .. } => GgufErrorKind::OutputNotAFile { what },
        OutputError::Io { op, error, .. } => GgufErrorKind::Io { op, error },
    };
    GgufError::new(target, kind)
}

/// Appends the on-disk encoding of one key-value pair.
pub fn encode_kv(buf: &mut Vec<u8>, key: &str, value: &Value) {
    encode_str(buf, key);
    buf.extend_from_slice(&value.value_type().id().to_le_bytes());
    encode_value(buf, value);
}

fn encode_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn encode_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => buf.push(*v),
        Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => buf.push(u8::from(*v)),
        Value::String(s) => encode_str(buf, s),
        Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::Array(a) => {
            buf.extend_from_slice(&a.elem_type().id().to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                Array::U8(v) => buf.extend_from_slice(v),
                Array::I8(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::U16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::U32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::F32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::Bool(v) => v.iter().for_each(|x| buf.push(u8::from(*x))),
                Array::String(v) => v.iter().for_each(|s| encode_str(buf, s)),
                Array::U64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::F64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            }
        }
    }
}

/// Writes `model` to `target` unchanged (a split set becomes one file without its `split.*` keys):
/// the same version, alignment, metadata order and tensor order, so a single file comes back
/// byte-identical. Streams one tensor at a time from the memory maps.
pub fn copy_model(model: &super::GgufModel, target: &Path) -> Result<()> {
    let first = &model.shards()[0];
    let mut metadata = first.metadata().clone();
    if model.shards().len() > 1 {
        for key in [
            super::split::KEY_SPLIT_NO,
            super::split::KEY_SPLIT_COUNT,
            super::split::KEY_SPLIT_TENSORS,
        ] {
            metadata.remove(key);
        }
    }
    let descs: Vec<TensorDesc> = model.tensors().map(|(_, t)| TensorDesc::from(t)).collect();
    let inputs: Vec<&Path> = model.shards().iter().map(|s| s.path()).collect();
    let mut w = GgufWriter::create(
        target,
        &inputs,
        first.version(),
        first.alignment(),
        &metadata,
        &descs,
    )?;
    for (shard, t) in model.tensors() {
        let file = &model.shards()[shard];
        w.write_tensor(file.tensor_data(t))?;
        // Keep the resident set near one tensor rather than the whole input.
        file.release_pages(t);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn sample_metadata() -> Metadata {
        let mut m = Metadata::new();
        m.set("general.architecture", Value::String("llama".into()));
        m.set("general.alignment", Value::U32(64));
        m.set("a.bools", Value::Array(Array::Bool(vec![true, false])));
        m.set(
            "a.strs",
            Value::Array(Array::String(vec!["x".into(), String::new()])),
        );
        m.set("a.f64", Value::F64(-2.5));
        m
    }

    #[test]
    fn written_file_reads_back_with_llama_cpp_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.gguf");
        let descs = vec![
            TensorDesc {
                name: "a".into(),
                dims: vec![3],
                ty: GgmlType::F32,
            },
            TensorDesc {
                name: "b".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let mut w = GgufWriter::create(&target, &[], 3, 64, &sample_metadata(), &descs).unwrap();
        assert_eq!(w.next_tensor(), Some("a"));
        w.write_tensor(&[1u8; 12]).unwrap();
        assert!(w.write_tensor(&[0u8; 3]).is_err(), "wrong size is refused");
        w.write_tensor(&[2u8; 68]).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&target).unwrap();
        assert_eq!(f.metadata(), &sample_metadata());
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensors()[1].offset, 64);
        assert_eq!(f.tensor_data(&f.tensors()[1]), &[2u8; 68][..]);
        assert_eq!(f.file_size(), f.data_offset() + 64 + 128);
    }

    #[test]
    fn refuses_what_llama_cpp_would_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.gguf");
        let m = sample_metadata();
        let bad = |descs: Vec<TensorDesc>, align: u64| {
            GgufWriter::create(&target, &[], 3, align, &m, &descs).is_err()
        };
        let d = |name: &str, dims: Vec<u64>, ty| TensorDesc {
            name: name.into(),
            dims,
            ty,
        };
        assert!(bad(vec![d(&"x".repeat(64), vec![4], GgmlType::F32)], 64));
        assert!(bad(vec![d("x", vec![1, 1, 1, 1, 1], GgmlType::F32)], 64));
        assert!(bad(vec![d("x", vec![33], GgmlType::Q8_0)], 64));
        assert!(bad(
            vec![
                d("x", vec![4], GgmlType::F32),
                d("x", vec![4], GgmlType::F32)
            ],
            64
        ));
        assert!(bad(vec![], 32), "alignment disagrees with metadata");
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );
        let w =
            GgufWriter::create(&target, &[], 3, 64, &m, &[d("x", vec![4], GgmlType::F32)]).unwrap();
        assert!(w.finish().is_err(), "missing tensor data is refused");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
