//! [`GgufSource`]: the view every GGUF adapter is read through, a plain GGUF file (any shard of a
//! split set) or one member of a named bundle as its own file would have it, so that
//! `BUNDLE.gguf#NAME` works wherever a GGUF adapter file does.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::bundle::BundleError;
use super::bundle::{key, kv_prefix, stored_name, BundleEntry, Listing, BUNDLE_TYPE};
use super::matrix::Matrix;
use super::AdapterError;
use crate::gguf::{
    GgufError, GgufModel, GgufWriter, Metadata, TensorDesc, TensorInfo, DEFAULT_ALIGNMENT,
    KEY_ALIGNMENT,
};
use crate::quant;

/// Splits `BUNDLE.gguf#NAME` into the file and the adapter name. A path that exists as given is
/// never split (file names may contain `#`).
pub fn split_spec(spec: &Path) -> (PathBuf, Option<String>) {
    if spec.exists() {
        return (spec.to_path_buf(), None);
    }
    match spec.to_str().and_then(|s| s.rsplit_once('#')) {
        Some((file, name)) if !file.is_empty() && !name.is_empty() => {
            (PathBuf::from(file), Some(name.to_string()))
        }
        _ => (spec.to_path_buf(), None),
    }
}

/// A tensor of a GGUF adapter source that cannot be read as asked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: tensor '{tensor}': missing", label.display())]
    Missing { label: PathBuf, tensor: String },
    #[error("{}: tensor '{tensor}': rows {rows:?} asked of a tensor with {n_rows} rows", label.display())]
    Rows {
        label: PathBuf,
        tensor: String,
        rows: Range<usize>,
        n_rows: u64,
    },
    #[error("{}: tensor '{tensor}': data shorter than its shape", label.display())]
    Short { label: PathBuf, tensor: String },
    #[error("{}: tensor '{tensor}': {error}", label.display())]
    Decode {
        label: PathBuf,
        tensor: String,
        error: crate::quant::QuantError,
    },
}

/// One tensor of a [`GgufSource`]: its info under the adapter's own name, and where it is stored.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    /// Shape and type, `name` being the adapter's own tensor name (the offset is the stored one's).
    pub info: TensorInfo,
    /// Name in the opened file (differs inside a bundle).
    pub stored: String,
}

/// A GGUF adapter as its own file had it: a plain GGUF file, or one member of a named bundle.
pub struct GgufSource {
    /// The path, or `BUNDLE.gguf#NAME`, for messages and provenance.
    pub label: PathBuf,
    /// The file opened (the bundle for a member).
    pub file: PathBuf,
    pub model: GgufModel,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<SourceTensor>,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("label", &self.label)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufSource {
    /// Opens `spec`: a GGUF file (any shard of a split set), or `BUNDLE.gguf#NAME`.
    pub fn open(spec: &Path) -> Result<GgufSource, AdapterError> {
        let (file, member) = split_spec(spec);
        GgufSource::open_member(spec.to_path_buf(), file, member)
    }

    /// Opens `file`, or adapter `member` of the named bundle `file`; `label` names it in messages.
    pub fn open_member(
        label: PathBuf,
        file: PathBuf,
        member: Option<String>,
    ) -> Result<GgufSource, AdapterError> {
        let model = GgufModel::open(&file)?;
        match member {
            None => {
                let tensors = model
                    .tensors()
                    .map(|(_, t)| SourceTensor {
                        info: t.clone(),
                        stored: t.name.clone(),
                    })
                    .collect();
                let mut metadata = model.metadata().clone();
                if model.is_split() {
                    for k in [
                        crate::gguf::split::KEY_SPLIT_NO,
                        crate::gguf::split::KEY_SPLIT_COUNT,
                        crate::gguf::split::KEY_SPLIT_TENSORS,
                    ] {
                        metadata.remove(k);
                    }
                }
                Ok(GgufSource {
                    label,
                    version: model.shards()[0].version(),
                    file,
                    model,
                    metadata,
                    tensors,
                })
            }
            Some(name) => {
                let listing = Listing::read(&file, model.metadata())?;
                let Some(entry) = listing.adapters.iter().find(|a| a.name == name) else {
                    return Err(BundleError::NoSuchMember {
                        names: listing.names().iter().map(|n| n.to_string()).collect(),
                        file,
                        name,
                    }
                    .into());
                };
                let member = read_member(entry, &file, &model)?;
                Ok(GgufSource {
                    label,
                    file,
                    model,
                    version: member.0,
                    metadata: member.1,
                    tensors: member.2,
                })
            }
        }
    }

    /// The tensor's bytes (a zero-copy slice of the mapped file).
    pub fn data(&self, t: &SourceTensor) -> &[u8] {
        self.model.tensor_data(&t.stored).unwrap_or(&[])
    }

    pub fn tensor(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.iter().find(|t| t.info.name == name)
    }

    /// Lets the OS drop `t`'s mapped pages from the resident set (they are read back from the file
    /// if touched again): streaming passes call it when done with a tensor.
    pub fn release(&self, t: &SourceTensor) {
        if let (Some(s), Some(info)) =
            (self.model.shard_of(&t.stored), self.model.tensor(&t.stored))
        {
            self.model.shards()[s].release_pages(info);
        }
    }

    /// Rows `rows` of tensor `name` (every dimension past `ne[0]` folded into rows) as f32, then
    /// lets the OS drop the tensor's mapped pages, so streaming through an adapter keeps only what
    /// is being worked on resident.
    pub fn dequantize_rows(&self, name: &str, rows: Range<usize>) -> Result<Matrix, AdapterError> {
        let label = || self.label.clone();
        let tensor = || name.to_string();
        let t = self.tensor(name).ok_or_else(|| SourceError::Missing {
            label: label(),
            tensor: tensor(),
        })?;
        let (row_len, n_rows) = (t.info.row_len(), t.info.rows());
        if rows.start > rows.end || rows.end as u64 > n_rows {
            return Err(SourceError::Rows {
                label: label(),
                tensor: tensor(),
                rows,
                n_rows,
            }
            .into());
        }
        let row_bytes = t.info.row_bytes() as usize;
        let data = self.data(t);
        // The reader checked that the data holds exactly `n_rows` rows, so these bounds are too.
        let bytes = data
            .get(rows.start * row_bytes..rows.end * row_bytes)
            .ok_or_else(|| SourceError::Short {
                label: label(),
                tensor: tensor(),
            })?;
        let cols = row_len as usize;
        let mut out = vec![0f32; rows.len() * cols];
        quant::dequantize_rows(t.info.ty, bytes, cols.max(1), &mut out).map_err(|error| {
            SourceError::Decode {
                label: label(),
                tensor: tensor(),
                error,
            }
        })?;
        self.release(t);
        Matrix::new(rows.len(), cols, out).ok_or_else(|| {
            SourceError::Short {
                label: label(),
                tensor: tensor(),
            }
            .into()
        })
    }

    /// `general.alignment` of the adapter's own metadata (32 when absent).
    pub fn alignment(&self) -> u64 {
        self.metadata
            .get_u32(KEY_ALIGNMENT)
            .map_or(DEFAULT_ALIGNMENT, u64::from)
    }

    /// Whether the opened file is a named bundle (and no member was asked for).
    pub fn is_bundle(&self) -> bool {
        self.metadata.get_str(crate::gguf::KEY_TYPE) == Some(BUNDLE_TYPE)
    }

    /// Copies every tensor's bytes, in order, to `w` (releasing each one's pages once written);
    /// returns how many bytes.
    pub fn copy_tensors(&self, w: &mut GgufWriter) -> Result<u64, GgufError> {
        let mut bytes = 0;
        for t in &self.tensors {
            let data = self.data(t);
            bytes += data.len() as u64;
            w.write_tensor(data)?;
            self.release(t);
        }
        Ok(bytes)
    }

    /// Writes the adapter as its own GGUF file at `target` (atomically): its version, metadata and
    /// tensors in order, bytes copied.
    pub fn write(&self, target: &Path, inputs: &[&Path]) -> Result<u64, AdapterError> {
        let descs: Vec<TensorDesc> = self.tensors.iter().map(|t| (&t.info).into()).collect();
        let mut w = GgufWriter::create(
            target,
            inputs,
            self.version,
            self.alignment(),
            &self.metadata,
            &descs,
        )?;
        let bytes = self.copy_tensors(&mut w)?;
        w.finish()?;
        Ok(bytes)
    }
}

/// `(version, metadata, tensors)` of one member.
type Member = (u32, Metadata, Vec<SourceTensor>);

/// Rebuilds a member's own version, metadata and tensor list from the bundle.
fn read_member(entry: &BundleEntry, file: &Path, model: &GgufModel) -> Result<Member, BundleError> {
    let i = entry.index;
    let m = model.metadata();
    let version = m
        .get_u32(&key(i, "gguf_version"))
        .ok_or_else(|| BundleError::MemberKey {
            file: file.to_path_buf(),
            member: entry.name.clone(),
            key: key(i, "gguf_version"),
        })?;
    let prefix = kv_prefix(i);
    let mut metadata = Metadata::new();
    for (k, v) in m.iter() {
        if let Some(own) = k.strip_prefix(&prefix) {
            metadata.set(own, v.clone());
        }
    }
    let mut tensors = Vec::with_capacity(entry.tensors.len());
    for (j, name) in entry.tensors.iter().enumerate() {
        let stored = stored_name(i, j, name);
        let Some(info) = model.tensor(&stored) else {
            return Err(BundleError::MemberTensor {
                file: file.to_path_buf(),
                member: entry.name.clone(),
                tensor: name.clone(),
                stored,
            });
        };
        tensors.push(SourceTensor {
            info: TensorInfo {
                name: name.clone(),
                ..info.clone()
            },
            stored,
        });
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_at_the_last_hash_unless_the_path_exists() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("odd#name.gguf");
        std::fs::write(&odd, b"x").unwrap();
        assert_eq!(split_spec(&odd), (odd.clone(), None));
        let b = dir.path().join("b.gguf#style");
        assert_eq!(
            split_spec(&b),
            (dir.path().join("b.gguf"), Some("style".to_string()))
        );
        assert_eq!(split_spec(Path::new("x.gguf#")).1, None);
    }
}
