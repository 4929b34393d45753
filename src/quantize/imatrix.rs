//! llama.cpp importance-matrix files, read into the per-column weights llama-quantize hands to
//! `ggml_quantize_chunk`.
//!
//! Two forms exist (llama.cpp `common/imatrix-loader.cpp`, written by `tools/imatrix/imatrix.cpp`):
//! - GGUF (`llama-imatrix` default): per weight `NAME.in_sum2` (F32, ne `[n_cols, n_experts]`, sums
//!   of squared activations) and `NAME.counts` (F32, one count per expert), plus the keys
//!   `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`. The weight of column `i` of
//!   expert `j` is `in_sum2[j][i] / lround(counts[j])` in f32, or 1 where the count is 0.
//! - legacy `.dat` (`--output-format dat`): `i32 n_entries`, then per entry `i32 len, name, i32 ncall,
//!   i32 nval, nval × f32` (already `sum/count·ncall`), then optionally `i32 chunk_count, i32 len,
//!   dataset`. The weight is `value / ncall` in f32 (the value itself when `ncall` is 0).
//!
//! All values must be finite, as llama-quantize requires. Every length read from the file is checked
//! against the bytes actually there before anything is allocated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::gguf::{GgufError, GgufFile};
use crate::quant::GgmlType;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const SUFFIX_SUMS: &str = ".in_sum2";
const SUFFIX_COUNTS: &str = ".counts";

/// An importance matrix as llama-quantize uses it.
#[derive(Debug, Default)]
pub struct Imatrix {
    /// Weight name → `n_cols × n_experts` weights (expert-major), normalized.
    pub entries: HashMap<String, Vec<f32>>,
    /// Text files the statistics were collected on (`imatrix.datasets`, or the legacy trailer).
    pub datasets: Vec<String>,
    /// Chunks the statistics were collected on (0 when the file does not say).
    pub chunk_count: u32,
    /// Whether the file is the legacy `.dat` form.
    pub legacy: bool,
}

/// An imatrix file that cannot be used: the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct ImatrixError {
    pub path: PathBuf,
    pub problem: ImatrixProblem,
}

/// What is wrong with an imatrix file.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixProblem {
    #[error("{0}")]
    Io(std::io::Error),
    /// The GGUF reader refused it (its message names the file again).
    #[error("{0}")]
    Gguf(GgufError),
    #[error("not an imatrix: missing imatrix.datasets / imatrix.chunk_count / imatrix.chunk_size")]
    NotAnImatrix,
    #[error("no imatrix entries (NAME.in_sum2 / NAME.counts tensors)")]
    NoEntries,
    #[error("entry '{name}': has only one of .in_sum2 and .counts")]
    HalfEntry { name: String },
    #[error("entry '{name}': in_sum2 and counts must be F32, got {sums} and {counts}")]
    EntryType {
        name: String,
        sums: GgmlType,
        counts: GgmlType,
    },
    #[error("entry '{name}': {sums} sums do not split into {counts} experts")]
    Experts {
        name: String,
        sums: usize,
        counts: usize,
    },
    #[error("truncated legacy imatrix: {what} needs {needed} bytes at offset {offset}, the file has {len}")]
    Truncated {
        what: String,
        needed: usize,
        offset: usize,
        len: usize,
    },
    #[error("legacy imatrix: {what} is {value}, expected at least {min}")]
    TooSmall { what: String, value: i32, min: i32 },
    #[error("entry '{name}' contains the non-finite value {value}")]
    NonFinite { name: String, value: f32 },
}

/// Reads an imatrix file of either form; the error names the file and what is wrong.
pub fn read(path: &Path) -> Result<Imatrix, ImatrixError> {
    let bad = |problem| ImatrixError {
        path: path.to_path_buf(),
        problem,
    };
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| bad(ImatrixProblem::Io(e)))?;
        // A file shorter than the magic is no GGUF; the legacy reader reports what is missing.
        let _ = f.read(&mut magic).map_err(|e| bad(ImatrixProblem::Io(e)))?;
    }
    let m = if &magic == GGUF_MAGIC {
        read_gguf(path).map_err(bad)?
    } else {
        let bytes = std::fs::read(path).map_err(|e| bad(ImatrixProblem::Io(e)))?;
        read_legacy(&bytes).map_err(bad)?
    };
    for (name, w) in &m.entries {
        if let Some(v) = w.iter().find(|v| !v.is_finite()) {
            return Err(bad(ImatrixProblem::NonFinite {
                name: name.clone(),
                value: *v,
            }));
        }
    }
    Ok(m)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_gguf(path: &Path) -> Result<Imatrix, ImatrixProblem> {
    let file = GgufFile::open(path).map_err(ImatrixProblem::Gguf)?;
    let meta = file.metadata();
    let datasets = match meta.get_array("imatrix.datasets") {
        Some(crate::gguf::Array::String(v)) => Some(v.clone()),
        _ => None,
    };
    let chunk_count = meta.get_u32("imatrix.chunk_count");
    let chunk_size = meta.get_u32("imatrix.chunk_size");
    // llama-quantize refuses a GGUF imatrix without these keys (it may not be an imatrix at all).
    let (Some(datasets), Some(chunk_count), Some(_)) = (datasets, chunk_count, chunk_size) else {
        return Err(ImatrixProblem::NotAnImatrix);
    };
    let mut pairs: HashMap<&str, (Option<usize>, Option<usize>)> = HashMap::new();
    for (i, t) in file.tensors().iter().enumerate() {
        if let Some(n) = t.name.strip_suffix(SUFFIX_SUMS) {
            pairs.entry(n).or_default().0 = Some(i);
        } else if let Some(n) = t.name.strip_suffix(SUFFIX_COUNTS) {
            pairs.entry(n).or_default().1 = Some(i);
        }
    }
    if pairs.is_empty() {
        return Err(ImatrixProblem::NoEntries);
    }
    let mut entries = HashMap::with_capacity(pairs.len());
    for (name, (sums, counts)) in pairs {
        let (Some(si), Some(ci)) = (sums, counts) else {
            return Err(ImatrixProblem::HalfEntry {
                name: name.to_string(),
            });
        };
        let (st, ct) = (&file.tensors()[si], &file.tensors()[ci]);
        if st.ty != GgmlType::F32 || ct.ty != GgmlType::F32 {
            return Err(ImatrixProblem::EntryType {
                name: name.to_string(),
                sums: st.ty,
                counts: ct.ty,
            });
        }
        let sums = f32s(file.tensor_data(st));
        let counts = f32s(file.tensor_data(ct));
        if counts.is_empty() || sums.is_empty() || !sums.len().is_multiple_of(counts.len()) {
            return Err(ImatrixProblem::Experts {
                name: name.to_string(),
                sums: sums.len(),
                counts: counts.len(),
            });
        }
        let ne0 = sums.len() / counts.len();
        let mut w = vec![0f32; sums.len()];
        for (j, &c) in counts.iter().enumerate() {
            // Loader: counts are rounded to integers (`std::lround`), then divided in f32.
            let count = c.round() as i64 as f32;
            for i in 0..ne0 {
                w[j * ne0 + i] = if count > 0.0 {
                    sums[j * ne0 + i] / count
                } else {
                    1.0
                };
            }
        }
        entries.insert(name.to_string(), w);
    }
    Ok(Imatrix {
        entries,
        datasets,
        chunk_count,
        legacy: false,
    })
}

/// A bounds-checked little-endian cursor over the legacy file.
struct Cursor<'b> {
    bytes: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'b [u8], ImatrixProblem> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| ImatrixProblem::Truncated {
                what: what.to_string(),
                needed: n,
                offset: self.pos,
                len: self.bytes.len(),
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32, ImatrixProblem> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len(&mut self, what: &str, min: i32) -> Result<usize, ImatrixProblem> {
        let v = self.i32(what)?;
        if v < min {
            return Err(ImatrixProblem::TooSmall {
                what: what.to_string(),
                value: v,
                min,
            });
        }
        Ok(v as usize)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

fn read_legacy(bytes: &[u8]) -> Result<Imatrix, ImatrixProblem> {
    let mut c = Cursor { bytes, pos: 0 };
    let n_entries = c.len("entry count", 1)?;
    let mut entries = HashMap::new();
    for k in 0..n_entries {
        let len = c.len("name length", 0)?;
        let name = String::from_utf8_lossy(c.take(len, "entry name")?).into_owned();
        let ncall = c.i32("call count")?;
        let nval = c.len(&format!("value count of entry {}", k + 1), 1)?;
        let raw = c.take(nval.saturating_mul(4), &format!("values of '{name}'"))?;
        let values = f32s(raw);
        let w = if ncall > 0 {
            // `entry.sums[i] / ncall` with ncall an int64: converted to float first.
            let n = ncall as i64 as f32;
            values.iter().map(|v| v / n).collect()
        } else {
            values
        };
        entries.insert(name, w);
    }
    let mut chunk_count = 0;
    let mut datasets = Vec::new();
    // The trailer (chunk count, dataset name) is optional, and a short one is ignored like llama.cpp.
    if !c.at_end() {
        if let Ok(n) = c.i32("chunk count") {
            chunk_count = n.max(0) as u32;
            if let Ok(len) = c.i32("dataset length") {
                if len > 0 {
                    if let Ok(d) = c.take(len as usize, "dataset") {
                        datasets.push(String::from_utf8_lossy(d).into_owned());
                    }
                }
            }
        }
    }
    Ok(Imatrix {
        entries,
        datasets,
        chunk_count,
        legacy: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_bytes(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((entries.len() as i32).to_le_bytes());
        for (name, ncall, vals) in entries {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((vals.len() as i32).to_le_bytes());
            for v in *vals {
                b.extend(v.to_le_bytes());
            }
        }
        if let Some((n, d)) = trailer {
            b.extend(n.to_le_bytes());
            b.extend((d.len() as i32).to_le_bytes());
            b.extend(d.as_bytes());
        }
        b
    }

    #[test]
    fn legacy_divides_by_ncall() {
        let b = legacy_bytes(
            &[("a.weight", 4, &[2.0, 6.0]), ("b.weight", 0, &[3.0])],
            Some((7, "wiki.txt")),
        );
        let m = read_legacy(&b).unwrap();
        assert_eq!(m.entries["a.weight"], vec![0.5, 1.5]);
        assert_eq!(m.entries["b.weight"], vec![3.0]);
        assert_eq!(m.chunk_count, 7);
        assert_eq!(m.datasets, vec!["wiki.txt".to_string()]);
    }

    #[test]
    fn legacy_truncated_or_huge_counts_are_errors() {
        let b = legacy_bytes(&[("a.weight", 1, &[2.0, 6.0])], None);
        assert!(read_legacy(&b[..b.len() - 1]).is_err());
        let mut huge = b.clone();
        // nval = i32::MAX: rejected by the length check, never allocated.
        let nval_at = 4 + 4 + 8 + 4;
        huge[nval_at..nval_at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(read_legacy(&huge).is_err());
        assert!(read_legacy(&0i32.to_le_bytes()).is_err());
    }
}
