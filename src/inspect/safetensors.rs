//! The safetensors part of `inspect`: the header's `__metadata__`, one row per tensor (name, dtype,
//! shape, bytes, offset) and totals per dtype, all read through [`SafetensorsFile`] (which has
//! already checked every offset and size against the file).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::safetensors_file::SafetensorsFile;

#[derive(Debug, Serialize)]
pub struct SafetensorsReport {
    pub path: String,
    pub file_size: u64,
    /// Bytes of the 8-byte length prefix plus the JSON header (where the data section starts).
    pub data_offset: u64,
    /// The header's `__metadata__` string map, sorted by key.
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<SafetensorsRow>,
    pub totals_by_dtype: Vec<DtypeTotal>,
    pub total: super::gguf::Total,
}

#[derive(Debug, Serialize)]
pub struct SafetensorsRow {
    pub name: String,
    pub dtype: String,
    /// PyTorch order (slowest dimension first), as the file states it.
    pub shape: Vec<u64>,
    pub elements: u64,
    pub bytes: u64,
    /// Absolute offset of the data in the file.
    pub offset: u64,
}

#[derive(Debug, Serialize)]
pub struct DtypeTotal {
    pub dtype: String,
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

/// The report of an opened file; tensors in offset order.
pub fn report(path: &Path, file: &SafetensorsFile) -> SafetensorsReport {
    let tensors: Vec<SafetensorsRow> = file
        .tensors()
        .iter()
        .map(|t| {
            let range = t.byte_range();
            SafetensorsRow {
                name: t.name.clone(),
                dtype: format!("{:?}", t.dtype),
                shape: t.shape.iter().map(|d| *d as u64).collect(),
                elements: t.n_elements() as u64,
                bytes: range.len() as u64,
                offset: range.start as u64,
            }
        })
        .collect();
    let mut by_dtype: BTreeMap<String, DtypeTotal> = BTreeMap::new();
    for t in &tensors {
        let e = by_dtype
            .entry(t.dtype.clone())
            .or_insert_with(|| DtypeTotal {
                dtype: t.dtype.clone(),
                tensors: 0,
                elements: 0,
                bytes: 0,
            });
        e.tensors += 1;
        e.elements += t.elements;
        e.bytes += t.bytes;
    }
    let file_size = std::fs::metadata(path).map_or(0, |m| m.len());
    // The data section ends the file, so it starts where the tensors' bytes begin.
    let data_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    SafetensorsReport {
        path: path.display().to_string(),
        file_size,
        data_offset: file_size.saturating_sub(data_bytes),
        metadata: file.metadata().iter().cloned().collect(),
        total: super::gguf::Total {
            tensors: tensors.len(),
            elements: tensors.iter().map(|t| t.elements).sum(),
            bytes: data_bytes,
        },
        tensors,
        totals_by_dtype: by_dtype.into_values().collect(),
    }
}
