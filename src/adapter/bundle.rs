//! The named-bundle container layout: one GGUF holding several GGUF LoRA adapters, each kept bit
//! for bit. Its keys, stored tensor names and listing are defined here; reading one member back as
//! its own file is [`super::source::GgufSource`]'s job, writing a bundle is [`crate::bundle`]'s.
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

use std::path::{Path, PathBuf};

use crate::gguf::{Array, Metadata, Value, MAX_NAME_LEN};

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

/// A named bundle (or one member of it) that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: general.type is {found:?}, not \"{}\": FILE#NAME selects an adapter of a named bundle (gguf-lora bundle --mode named)", file.display(), BUNDLE_TYPE)]
    NotABundle {
        file: PathBuf,
        found: Option<String>,
    },
    #[error("{}: {key} is missing or not {expected}", file.display())]
    Key {
        file: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{}: bundle layout version {version}; this build reads version {}", file.display(), VERSION)]
    Version { file: PathBuf, version: u32 },
    #[error("{}: {} is {count:?} but {} lists {names} adapters", file.display(), KEY_COUNT, KEY_NAMES)]
    Count {
        file: PathBuf,
        count: Option<u32>,
        names: usize,
    },
    #[error("{}: the bundle has no adapter named '{name}' (it has: {})", file.display(), names.join(", "))]
    NoSuchMember {
        file: PathBuf,
        name: String,
        names: Vec<String>,
    },
    #[error("{}: adapter '{member}': {key} is missing", file.display())]
    MemberKey {
        file: PathBuf,
        member: String,
        key: String,
    },
    #[error("{}: adapter '{member}': tensor '{tensor}' should be stored as '{stored}', which is missing", file.display())]
    MemberTensor {
        file: PathBuf,
        member: String,
        tensor: String,
        stored: String,
    },
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
    pub fn read(file: &Path, m: &Metadata) -> Result<Listing, BundleError> {
        let key_err = |key: String, expected: &'static str| BundleError::Key {
            file: file.to_path_buf(),
            key,
            expected,
        };
        let ty = m.get_str(crate::gguf::KEY_TYPE);
        if ty != Some(BUNDLE_TYPE) {
            return Err(BundleError::NotABundle {
                file: file.to_path_buf(),
                found: ty.map(str::to_string),
            });
        }
        let version = m
            .get_u32(KEY_VERSION)
            .ok_or_else(|| key_err(KEY_VERSION.into(), "UINT32"))?;
        if version != VERSION {
            return Err(BundleError::Version {
                file: file.to_path_buf(),
                version,
            });
        }
        let names =
            strings(m, KEY_NAMES).ok_or_else(|| key_err(KEY_NAMES.into(), "ARRAY[STRING]"))?;
        if m.get_u32(KEY_COUNT) != Some(names.len() as u32) {
            return Err(BundleError::Count {
                file: file.to_path_buf(),
                count: m.get_u32(KEY_COUNT),
                names: names.len(),
            });
        }
        let mut adapters = Vec::with_capacity(names.len());
        for (index, name) in names.into_iter().enumerate() {
            let tensors = strings(m, &key(index, "tensors"))
                .ok_or_else(|| key_err(key(index, "tensors"), "ARRAY[STRING]"))?;
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
}
