//! Where the forward pass gets its weights and hyperparameters from.
//!
//! The forward code only sees [`WeightSource`]: metadata lookups and raw tensor bytes with their ggml
//! type and shape. [`crate::gguf::GgufModel`] implements it (zero-copy slices of the mmap); tests use
//! an in-memory [`F32Source`]. Rows are decoded on demand by [`decode_rows`], so no whole-model f32
//! copy ever exists.

use std::collections::HashMap;

use super::error::{Result, TensorProblem, VerifyError};
use crate::gguf::value::{Array, Value};
use crate::gguf::GgufModel;
use crate::quant::GgmlType;

/// One tensor as the forward pass needs it: ggml dims (`ne`, fastest first), type and bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    /// ggml `ne` order: `dims[0]` is the row length (the matmul input size).
    pub dims: &'a [u64],
    pub ty: GgmlType,
    pub data: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of `ne[1..]`).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    fn problem(&self, problem: TensorProblem) -> VerifyError {
        VerifyError::Tensor {
            tensor: self.name.to_string(),
            problem,
        }
    }

    /// Bytes per row, checked against the block size of the type.
    pub fn row_bytes(&self) -> Result<usize> {
        let n = self.ty.row_bytes(self.row_len() as u64).ok_or_else(|| {
            self.problem(TensorProblem::RowNotBlocks {
                row_len: self.row_len(),
                ty: self.ty.name(),
            })
        })?;
        Ok(n as usize)
    }

    /// Checks that the byte slice holds exactly `n_rows` rows; every decode relies on it.
    pub fn check_size(&self) -> Result<()> {
        let need = self.row_bytes()?.checked_mul(self.n_rows());
        if need != Some(self.data.len()) {
            return Err(self.problem(TensorProblem::DataSize {
                len: self.data.len(),
                need,
                dims: self.dims.to_vec(),
                ty: self.ty.name(),
            }));
        }
        Ok(())
    }

    /// Decodes rows `first..first + n` into `out` (`n * row_len` floats).
    pub fn decode_rows(&self, first: usize, n: usize, out: &mut [f32]) -> Result<()> {
        let rb = self.row_bytes()?;
        let len = self.row_len();
        let src = self.data.get(first * rb..(first + n) * rb).ok_or_else(|| {
            self.problem(TensorProblem::RowsOutOfRange {
                first,
                end: first + n,
            })
        })?;
        decode_rows(self.ty, src, len, &mut out[..n * len]).map_err(|p| self.problem(p))
    }

    /// The whole tensor as f32 (only for small tensors: norms, biases, LoRA factors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.row_len() * self.n_rows()];
        self.decode_rows(0, self.n_rows(), &mut out)?;
        Ok(out)
    }
}

/// Decodes whole rows of `ty` (`row_len` elements each) from `src` into `dst`.
pub fn decode_rows(
    ty: GgmlType,
    src: &[u8],
    row_len: usize,
    dst: &mut [f32],
) -> std::result::Result<(), TensorProblem> {
    let row_bytes = ty.row_bytes(row_len as u64).ok_or(TensorProblem::Blocks {
        ty: ty.name(),
        row_len,
    })? as usize;
    for (s, d) in src
        .chunks_exact(row_bytes)
        .zip(dst.chunks_exact_mut(row_len))
    {
        crate::quant::dequantize_row(ty, s, d).map_err(TensorProblem::Codec)?;
    }
    Ok(())
}

/// Read-only access to a model's metadata and tensors.
pub trait WeightSource: Sync {
    /// A metadata value as an unsigned integer of any width.
    fn meta_uint(&self, key: &str) -> Option<u64>;
    /// A metadata value as a float (any numeric type).
    fn meta_f32(&self, key: &str) -> Option<f32>;
    /// A metadata string.
    fn meta_str(&self, key: &str) -> Option<String>;
    /// A metadata array of booleans (or integers read as `!= 0`).
    fn meta_bool_array(&self, key: &str) -> Option<Vec<bool>>;
    /// The tensor called `name`, if present.
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>>;
    /// Every tensor name, in file order.
    fn tensor_names(&self) -> Vec<String>;
    /// Where the data comes from, for error messages.
    fn describe(&self) -> String;
    /// Lets the memory behind tensor `name` go (a mapped file's pages: any later read maps them
    /// back); nothing for in-memory sources.
    fn release(&self, _name: &str) {}
}

/// An in-memory model with f32 tensors; for tests and for weights built on the fly.
#[derive(Default)]
pub struct F32Source {
    pub meta: HashMap<String, MetaValue>,
    tensors: HashMap<String, (Vec<u64>, Vec<u8>)>,
}

/// A metadata value of [`F32Source`].
#[derive(Clone, Debug)]
pub enum MetaValue {
    Uint(u64),
    F32(f32),
    Str(String),
    Bools(Vec<bool>),
}

impl F32Source {
    pub fn new() -> F32Source {
        F32Source::default()
    }

    pub fn set(&mut self, key: &str, value: MetaValue) {
        self.meta.insert(key.to_string(), value);
    }

    /// Adds a tensor with ggml dims `dims` (row length first) and row-major values.
    pub fn add(&mut self, name: &str, dims: &[u64], values: &[f32]) {
        assert_eq!(
            dims.iter().product::<u64>() as usize,
            values.len(),
            "{name}"
        );
        self.tensors.insert(
            name.to_string(),
            (dims.to_vec(), bytemuck::cast_slice(values).to_vec()),
        );
    }
}

impl WeightSource for F32Source {
    fn meta_uint(&self, key: &str) -> Option<u64> {
        match self.meta.get(key)? {
            MetaValue::Uint(v) => Some(*v),
            _ => None,
        }
    }
    fn meta_f32(&self, key: &str) -> Option<f32> {
        match self.meta.get(key)? {
            MetaValue::F32(v) => Some(*v),
            MetaValue::Uint(v) => Some(*v as f32),
            _ => None,
        }
    }
    fn meta_str(&self, key: &str) -> Option<String> {
        match self.meta.get(key)? {
            MetaValue::Str(v) => Some(v.clone()),
            _ => None,
        }
    }
    fn meta_bool_array(&self, key: &str) -> Option<Vec<bool>> {
        match self.meta.get(key)? {
            MetaValue::Bools(v) => Some(v.clone()),
            _ => None,
        }
    }
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let (k, (dims, data)) = self.tensors.get_key_value(name)?;
        Some(TensorRef {
            name: k,
            dims,
            ty: GgmlType::F32,
            data,
        })
    }
    fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
    fn describe(&self) -> String {
        "in-memory model".to_string()
    }
}

impl WeightSource for GgufModel {
    fn meta_uint(&self, key: &str) -> Option<u64> {
        self.metadata().get_uint(key)
    }
    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.metadata().get(key)?.as_f64().map(|v| v as f32)
    }
    fn meta_str(&self, key: &str) -> Option<String> {
        self.metadata().get_str(key).map(str::to_string)
    }
    fn meta_bool_array(&self, key: &str) -> Option<Vec<bool>> {
        let array = self.metadata().get_array(key)?;
        Some(match array {
            Array::Bool(v) => v.clone(),
            other => (0..other.len())
                .map(|i| other.get(i).and_then(|v: Value| v.as_uint()).unwrap_or(0) != 0)
                .collect(),
        })
    }
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let info = GgufModel::tensor(self, name)?;
        Some(TensorRef {
            name: &info.name,
            dims: &info.dims,
            ty: info.ty,
            data: self.tensor_data(name)?,
        })
    }
    fn tensor_names(&self) -> Vec<String> {
        self.tensors().map(|(_, t)| t.name.clone()).collect()
    }
    fn describe(&self) -> String {
        self.shards()[0].path().display().to_string()
    }
    fn release(&self, name: &str) {
        if let (Some(i), Some(info)) = (self.shard_of(name), GgufModel::tensor(self, name)) {
            self.shards()[i].release_pages(info);
        }
    }
}
