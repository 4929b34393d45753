//! The named-bundle container (one GGUF holding several GGUF LoRA adapters, each kept bit for bit)
//! and [`GgufSource`], the view every GGUF adapter is read through, so that `BUNDLE.gguf#NAME` works
//! wherever a GGUF adapter file does.
//!
//! Layout (the full description, with an example, is in `docs/FORMAT.md`):
//! - `general.type = "lora_bundle"` (llama.cpp refuses to load it as an adapter, rightly: its tensor
//!   names are not base tensor names), `general.architecture` = the adapters' shared architecture,
//!   `gguf_lora.bundle.version = 1`, `gguf_lora.bundle.count`, `gguf_lora.bundle.names`.
//! - per adapter `i` (0-based, in bundle order), under `gguf_lora.bundle.{i}.`: `name`,
//!   `architecture`, `alpha` (its `adapter.lora.alpha`, 0 when absent), `scale` (the scale given
//!   when bundling; recorded, never applied), `source`, `format` (`gguf`/`peft`), `gguf_version`,
//!   `targets` and `ranks` (the base tensors it adapts and the rank of each: its coverage),
//!   `tensors` (its tensor names in its own order) and `kv.<KEY>` for every metadata key of its own
//!   file, in order and with its own type.
//! - its tensors keep their type, shape and bytes; tensor `j` named `N` is stored as `a{i}.N` when
//!   that fits ggml's 63-byte limit (and `N` does not start with `#`), else as `a{i}.#{j}`.
//!
//! Extraction rebuilds the adapter's file from exactly those pieces: its GGUF version, its metadata
//! (alignment included), its tensors in order with their bytes. A file written with llama.cpp's
//! layout rules (as gguf-py and our writer do) comes back byte for byte.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{AdapterError, Matrix};
use crate::gguf::{
    Array, GgufModel, GgufWriter, Metadata, TensorDesc, TensorInfo, Value, DEFAULT_ALIGNMENT,
    KEY_ALIGNMENT, MAX_NAME_LEN,
};
use crate::quant;

/// `general.type` of a named bundle.
pub const BUNDLE_TYPE: &str = "lora_bundle";
pub const KEY_VERSION: &str = "gguf_lora.bundle.version";
pub const KEY_COUNT: &str = "gguf_lora.bundle.count";
pub const KEY_NAMES: &str = "gguf_lora.bundle.names";
/// Layout version written.
pub const VERSION: u32 = 1;

/// `gguf_lora.bundle.{i}.{field}`.
pub fn key(i: usize, field: &str) -> String {
    format!("gguf_lora.bundle.{i}.{field}")
}

/// The prefix of adapter `i`'s own metadata keys.
pub fn kv_prefix(i: usize) -> String {
    key(i, "kv.")
}

/// Name in the bundle of adapter `i`'s tensor `j`, named `name` in its own file.
pub fn stored_name(i: usize, j: usize, name: &str) -> String {
    let plain = format!("a{i}.{name}");
    if plain.len() < MAX_NAME_LEN && !name.starts_with('#') {
        plain
    } else {
        format!("a{i}.#{j}")
    }
}

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
        let model = GgufModel::open(&file).map_err(|e| AdapterError::Invalid(e.to_string()))?;
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
                    return Err(AdapterError::Invalid(format!(
                        "{}: the bundle has no adapter named '{name}' (it has: {})",
                        file.display(),
                        listing.names().join(", ")
                    )));
                };
                let member = entry.member(&file, &model)?;
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
        let invalid = |m: String| {
            AdapterError::Invalid(format!("{}: tensor '{name}': {m}", self.label.display()))
        };
        let t = self.tensor(name).ok_or_else(|| invalid("missing".into()))?;
        let (row_len, n_rows) = (t.info.row_len(), t.info.rows());
        if rows.start > rows.end || rows.end as u64 > n_rows {
            return Err(invalid(format!(
                "rows {rows:?} asked of a tensor with {n_rows} rows"
            )));
        }
        let row_bytes = t.info.row_bytes() as usize;
        let data = self.data(t);
        // The reader checked that the data holds exactly `n_rows` rows, so these bounds are too.
        let bytes = data
            .get(rows.start * row_bytes..rows.end * row_bytes)
            .ok_or_else(|| invalid("data shorter than its shape".into()))?;
        let cols = row_len as usize;
        let mut out = vec![0f32; rows.len() * cols];
        quant::dequantize_rows(t.info.ty, bytes, cols.max(1), &mut out)
            .map_err(|e| invalid(e.to_string()))?;
        self.release(t);
        Matrix::new(rows.len(), cols, out).ok_or_else(|| invalid("shape".into()))
    }

    /// `general.alignment` of the adapter's own metadata (32 when absent).
    pub fn alignment(&self) -> u64 {
        self.metadata
            .get_u32(KEY_ALIGNMENT)
            .map_or(DEFAULT_ALIGNMENT, u64::from)
    }

    /// Whether the opened file is a named bundle (and no member was asked for).
    pub fn is_bundle(&self) -> bool {
        self.metadata.get_str(super::gguf::KEY_TYPE) == Some(BUNDLE_TYPE)
    }

    /// Writes the adapter as its own GGUF file at `target` (atomically): its version, metadata and
    /// tensors in order, bytes copied.
    pub fn write(&self, target: &Path, inputs: &[&Path]) -> Result<u64, AdapterError> {
        let gerr = |e: crate::gguf::GgufError| AdapterError::Invalid(e.to_string());
        let descs: Vec<TensorDesc> = self.tensors.iter().map(|t| (&t.info).into()).collect();
        let mut w = GgufWriter::create(
            target,
            inputs,
            self.version,
            self.alignment(),
            &self.metadata,
            &descs,
        )
        .map_err(gerr)?;
        let mut bytes = 0;
        for t in &self.tensors {
            let data = self.data(t);
            bytes += data.len() as u64;
            w.write_tensor(data).map_err(gerr)?;
            self.release(t);
        }
        w.finish().map_err(gerr)?;
        Ok(bytes)
    }
}

/// One adapter of a named bundle, as its metadata lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BundleEntry {
    pub index: usize,
    pub name: String,
    pub architecture: Option<String>,
    pub alpha: Option<f32>,
    pub scale: Option<f32>,
    pub source: Option<String>,
    pub format: Option<String>,
    /// Adapted base tensors and their ranks.
    pub targets: Vec<String>,
    pub ranks: Vec<u32>,
    /// Tensor names in the adapter's own file.
    pub tensors: Vec<String>,
}

/// The adapters a named bundle lists.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listing {
    pub version: u32,
    pub adapters: Vec<BundleEntry>,
}

fn strings(m: &Metadata, key: &str) -> Option<Vec<String>> {
    match m.get(key)? {
        Value::Array(Array::String(v)) => Some(v.clone()),
        _ => None,
    }
}

impl Listing {
    /// Reads the listing of the bundle whose metadata is `m` (`file` for messages). Counts are
    /// checked against what the metadata holds, never trusted for allocation.
    pub fn read(file: &Path, m: &Metadata) -> Result<Listing, AdapterError> {
        let bad = |what: String| AdapterError::Invalid(format!("{}: {what}", file.display()));
        if m.get_str(super::gguf::KEY_TYPE) != Some(BUNDLE_TYPE) {
            return Err(bad(format!(
                "general.type is {:?}, not \"{BUNDLE_TYPE}\": FILE#NAME selects an adapter of a named bundle (gguf-lora bundle --mode named)",
                m.get_str(super::gguf::KEY_TYPE)
            )));
        }
        let version = m
            .get_u32(KEY_VERSION)
            .ok_or_else(|| bad(format!("{KEY_VERSION} is missing or not UINT32")))?;
        if version != VERSION {
            return Err(bad(format!(
                "bundle layout version {version}; this build reads version {VERSION}"
            )));
        }
        let names = strings(m, KEY_NAMES)
            .ok_or_else(|| bad(format!("{KEY_NAMES} is missing or not ARRAY[STRING]")))?;
        if m.get_u32(KEY_COUNT) != Some(names.len() as u32) {
            return Err(bad(format!(
                "{KEY_COUNT} is {:?} but {KEY_NAMES} lists {} adapters",
                m.get_u32(KEY_COUNT),
                names.len()
            )));
        }
        let mut adapters = Vec::with_capacity(names.len());
        for (index, name) in names.into_iter().enumerate() {
            let tensors = strings(m, &key(index, "tensors")).ok_or_else(|| {
                bad(format!(
                    "{} is missing or not ARRAY[STRING]",
                    key(index, "tensors")
                ))
            })?;
            let targets = strings(m, &key(index, "targets")).unwrap_or_default();
            let ranks = match m.get(&key(index, "ranks")) {
                Some(Value::Array(Array::U32(r))) => r.clone(),
                _ => Vec::new(),
            };
            adapters.push(BundleEntry {
                index,
                name,
                architecture: m.get_str(&key(index, "architecture")).map(str::to_string),
                alpha: m.get_f32(&key(index, "alpha")),
                scale: m.get_f32(&key(index, "scale")),
                source: m.get_str(&key(index, "source")).map(str::to_string),
                format: m.get_str(&key(index, "format")).map(str::to_string),
                targets,
                ranks,
                tensors,
            });
        }
        Ok(Listing { version, adapters })
    }

    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }
}

/// `(version, metadata, tensors)` of one member.
type Member = (u32, Metadata, Vec<SourceTensor>);

impl BundleEntry {
    /// Rebuilds the member's own version, metadata and tensor list from the bundle.
    fn member(&self, file: &Path, model: &GgufModel) -> Result<Member, AdapterError> {
        let i = self.index;
        let bad = |what: String| {
            AdapterError::Invalid(format!(
                "{}: adapter '{}': {what}",
                file.display(),
                self.name
            ))
        };
        let m = model.metadata();
        let version = m
            .get_u32(&key(i, "gguf_version"))
            .ok_or_else(|| bad(format!("{} is missing", key(i, "gguf_version"))))?;
        let prefix = kv_prefix(i);
        let mut metadata = Metadata::new();
        for (k, v) in m.iter() {
            if let Some(own) = k.strip_prefix(&prefix) {
                metadata.set(own, v.clone());
            }
        }
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (j, name) in self.tensors.iter().enumerate() {
            let stored = stored_name(i, j, name);
            let info = model.tensor(&stored).ok_or_else(|| {
                bad(format!(
                    "tensor '{name}' should be stored as '{stored}', which is missing"
                ))
            })?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_stay_under_the_ggml_limit() {
        assert_eq!(
            stored_name(0, 3, "blk.0.attn_q.weight.lora_a"),
            "a0.blk.0.attn_q.weight.lora_a"
        );
        let long = format!("{}.lora_a", "x".repeat(55));
        assert_eq!(long.len(), 62);
        assert_eq!(stored_name(12, 7, &long), "a12.#7");
        assert_eq!(stored_name(1, 2, "#5"), "a1.#2");
    }

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
