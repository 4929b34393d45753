//! What an operation knows about the base model: from a base GGUF (architecture, head counts,
//! every tensor's shape and type) or from `--arch` alone (the architecture, nothing else).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Arch;
use crate::gguf::{GgufError, GgufModel, Value};
use crate::quant::GgmlType;

/// Why a base could not be described.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// `--arch` names no architecture we map.
    #[error("unknown architecture '{name}'; supported: {}", Arch::list())]
    Unknown { name: String },
    /// The file given as the base is an adapter.
    #[error("this is a LoRA adapter, not a base model")]
    AdapterNotBase,
    /// The base GGUF does not say its architecture.
    #[error("no general.architecture")]
    NoArchitecture,
}

/// Why a base model (`--base`, or the model merged into) could not be used; names the base file.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The base GGUF could not be read.
    #[error("{}: {}", path.display(), error.kind)]
    File { path: PathBuf, error: GgufError },
    /// The base GGUF is not a base model we can describe.
    #[error("{}: {error}", path.display())]
    Describe { path: PathBuf, error: ArchError },
    /// The base's architecture has no name map.
    #[error("{}: architecture '{arch}' has no HF→GGUF name map here; supported: {}", path.display(), Arch::list())]
    Unmapped { path: PathBuf, arch: String },
    /// `--arch` names no architecture we map.
    #[error(transparent)]
    UnknownArch(ArchError),
    /// Both `--base` and `--arch`.
    #[error("give either --base or --arch, not both (the base says its architecture)")]
    BaseAndArch,
}

/// One base tensor as the base GGUF describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseTensor {
    /// ggml order (`ne[0]` first).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// What a conversion knows about the base model.
#[derive(Clone, Debug, Default)]
pub struct BaseInfo {
    /// GGUF architecture name, as the base says it (it may be one we do not map: see
    /// [`BaseInfo::known_arch`]).
    pub arch: String,
    pub n_layer: Option<u32>,
    pub n_head: Option<u32>,
    pub n_head_kv: Option<u32>,
    pub n_embd: Option<u64>,
    /// `general.name` / `general.basename`, for identity hints.
    pub name: Option<String>,
    /// Every tensor of the base, when a base GGUF was given; `None` with `--arch` only.
    pub tensors: Option<BTreeMap<String, BaseTensor>>,
}

impl BaseInfo {
    /// `--arch ARCH` without a base file.
    pub fn from_arch(arch: &str) -> Result<BaseInfo, ArchError> {
        let known = Arch::from_user(arch).ok_or_else(|| ArchError::Unknown {
            name: arch.to_string(),
        })?;
        Ok(BaseInfo {
            arch: known.name().to_string(),
            ..BaseInfo::default()
        })
    }

    /// The architecture, when it is one we map.
    pub fn known_arch(&self) -> Option<Arch> {
        Arch::from_gguf(&self.arch)
    }

    pub fn tensor(&self, name: &str) -> Option<&BaseTensor> {
        self.tensors.as_ref()?.get(name)
    }

    /// What a base GGUF (single file or split set) says: architecture, head counts, every tensor.
    pub fn from_model(model: &GgufModel) -> Result<BaseInfo, ArchError> {
        let md = model.metadata();
        if md.get_str("general.type") == Some("adapter") {
            return Err(ArchError::AdapterNotBase);
        }
        let arch = md
            .get_str("general.architecture")
            .ok_or(ArchError::NoArchitecture)?
            .to_string();
        let scalar = |key: &str| -> Option<u64> {
            match md.get(key)? {
                Value::Array(a) => {
                    // Per-layer values (some architectures): usable only when all agree.
                    let vals: Vec<u64> = (0..a.len()).filter_map(|i| a.get(i)?.as_uint()).collect();
                    let first = *vals.first()?;
                    vals.iter().all(|v| *v == first).then_some(first)
                }
                v => v.as_uint(),
            }
        };
        let tensors = model
            .tensors()
            .map(|(_, t)| {
                (
                    t.name.clone(),
                    BaseTensor {
                        dims: t.dims.clone(),
                        ty: t.ty,
                    },
                )
            })
            .collect();
        Ok(BaseInfo {
            n_layer: scalar(&format!("{arch}.block_count")).map(|v| v as u32),
            n_head: scalar(&format!("{arch}.attention.head_count")).map(|v| v as u32),
            n_head_kv: scalar(&format!("{arch}.attention.head_count_kv")).map(|v| v as u32),
            n_embd: scalar(&format!("{arch}.embedding_length")),
            name: md
                .get_str("general.name")
                .or_else(|| md.get_str("general.basename"))
                .map(str::to_string),
            tensors: Some(tensors),
            arch,
        })
    }

    /// Opens a base GGUF (single file or any shard of a split set) and describes it.
    pub fn open(path: &Path) -> Result<(GgufModel, BaseInfo), BaseError> {
        let model = GgufModel::open(path).map_err(|error| BaseError::File {
            path: path.to_path_buf(),
            error,
        })?;
        let info = BaseInfo::from_model(&model).map_err(|error| BaseError::Describe {
            path: path.to_path_buf(),
            error,
        })?;
        Ok((model, info))
    }

    /// What `--base BASE.gguf` or `--arch ARCH` (at most one) say about the base, for mapping adapters
    /// onto it: a base must be of an architecture we map.
    pub fn resolve(base: Option<&Path>, arch: Option<&str>) -> Result<Option<BaseInfo>, BaseError> {
        match (base, arch) {
            (Some(_), Some(_)) => Err(BaseError::BaseAndArch),
            (Some(path), None) => {
                let (_, info) = BaseInfo::open(path)?;
                if info.known_arch().is_none() {
                    return Err(BaseError::Unmapped {
                        path: path.to_path_buf(),
                        arch: info.arch,
                    });
                }
                Ok(Some(info))
            }
            (None, Some(arch)) => BaseInfo::from_arch(arch)
                .map(Some)
                .map_err(BaseError::UnknownArch),
            (None, None) => Ok(None),
        }
    }

    /// Whether the base is known tensor by tensor (a base GGUF was given).
    pub fn has_tensors(&self) -> bool {
        self.tensors.is_some()
    }
}
