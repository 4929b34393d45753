//! Reading a PEFT adapter's files before it meets an architecture: where the config and weights
//! are, and every tensor classified by module and role, with the shape problems that make a tensor
//! unusable collected into one error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::{ConfigError, PeftConfig};
use super::names::{parse_tensor_name, TensorRole};
use crate::adapter::AdapterError;
use crate::adapter::Factor;
use crate::safetensors_file::SafetensorsFile;

/// A PEFT adapter (directory, or `.safetensors` with its config) that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{}: only adapter_model.bin (a PyTorch pickle) is there; save the adapter with safetensors (PEFT's default, save_pretrained(safe_serialization=True))", dir.display())]
    PickleOnly { dir: PathBuf },
    #[error("{}: no adapter_model.safetensors in this directory", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: no adapter_config.json in this directory", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("{}: expected adapter_config.json beside it (PEFT writes it next to the weights)", path.display())]
    NoConfigBeside { path: PathBuf },
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {error}", path.display())]
    ReadConfig {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Config { path: PathBuf, error: ConfigError },
    /// A LoRA on fused expert parameters (`target_parameters`) that does not fit.
    #[error(transparent)]
    ExpertParams(Box<super::params::ParamError>),
    /// Tensors whose names or shapes make them unusable, one line each.
    #[error("{}: {}", path.display(), problems.join("; "))]
    Tensors {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl From<super::params::ParamError> for PeftError {
    fn from(e: super::params::ParamError) -> PeftError {
        PeftError::ExpertParams(Box::new(e))
    }
}

/// Locates `adapter_config.json` and the safetensors file for a PEFT directory or a `.safetensors`
/// file with its config beside it.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf), PeftError> {
    let here = || path.to_path_buf();
    if path.is_dir() {
        let config = path.join("adapter_config.json");
        let weights = path.join("adapter_model.safetensors");
        if !weights.is_file() {
            if path.join("adapter_model.bin").is_file() {
                return Err(PeftError::PickleOnly { dir: here() });
            }
            return Err(PeftError::NoWeights { dir: here() });
        }
        if !config.is_file() {
            return Err(PeftError::NoConfig { dir: here() });
        }
        Ok((config, weights))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = dir.join("adapter_config.json");
        if !config.is_file() {
            return Err(PeftError::NoConfigBeside { path: here() });
        }
        Ok((config, path.to_path_buf()))
    } else {
        Err(PeftError::NotFound { path: here() })
    }
}

/// One PEFT module's tensors before mapping.
#[derive(Clone, Debug, Default)]
pub struct PeftModule {
    /// Module path inside the base model (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    pub embedding: bool,
    pub a: Option<Factor>,
    pub b: Option<Factor>,
    pub magnitude: Option<Factor>,
    pub bias: Option<Factor>,
}

/// A PEFT adapter as read, before it meets an architecture.
#[derive(Debug)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub config_path: PathBuf,
    pub weights: Arc<SafetensorsFile>,
    /// Modules in name order.
    pub modules: Vec<PeftModule>,
    /// Full tensors by source name.
    pub full: Vec<(String, String, Factor)>,
}

/// Reads the config and classifies every tensor; shape problems that make a tensor unusable are
/// errors listing every offender.
pub fn read_raw(path: &Path) -> Result<PeftAdapter, AdapterError> {
    let (config_path, weights_path) = locate(path)?;
    let text = std::fs::read_to_string(&config_path).map_err(|error| PeftError::ReadConfig {
        path: config_path.clone(),
        error,
    })?;
    let config = PeftConfig::parse(&text).map_err(|error| PeftError::Config {
        path: config_path.clone(),
        error,
    })?;
    let file = Arc::new(SafetensorsFile::open(&weights_path)?);
    let mut modules: BTreeMap<String, PeftModule> = BTreeMap::new();
    let mut full = Vec::new();
    let mut problems = Vec::new();
    for entry in file.tensors() {
        // PEFT saves the targeted embedding/lm_head base weights themselves (`save_embedding_layers`)
        // as `<module>.base_layer.weight`: unchanged base weights, not part of the update (the
        // reference converter skips them too). A resized vocabulary shows in the LoRA shapes.
        if entry.name.ends_with(".base_layer.weight") {
            continue;
        }
        let (module, role) = parse_tensor_name(&entry.name);
        let shape = &entry.shape;
        let factor = |rows: usize, cols: usize| Factor::Safetensors {
            file: file.clone(),
            entry: entry.clone(),
            rows,
            cols,
            window: None,
        };
        let want_2d = || -> Option<(usize, usize)> {
            match shape.as_slice() {
                [r, c] => Some((*r, *c)),
                _ => None,
            }
        };
        let want_1d = || -> Option<usize> {
            match shape.as_slice() {
                [n] => Some(*n),
                [1, n] | [n, 1] => Some(*n),
                _ => None,
            }
        };
        let m = || PeftModule {
            path: module.clone(),
            ..PeftModule::default()
        };
        match role {
            TensorRole::LoraA
            | TensorRole::LoraB
            | TensorRole::EmbeddingA
            | TensorRole::EmbeddingB => {
                let Some((r, c)) = want_2d() else {
                    problems.push(format!(
                        "tensor '{}' has shape {shape:?}; expected 2 dimensions (convolution LoRA is not supported)",
                        entry.name
                    ));
                    continue;
                };
                let md = modules.entry(module.clone()).or_insert_with(m);
                let embedding = matches!(role, TensorRole::EmbeddingA | TensorRole::EmbeddingB);
                md.embedding |= embedding;
                let slot = if matches!(role, TensorRole::LoraA | TensorRole::EmbeddingA) {
                    &mut md.a
                } else {
                    &mut md.b
                };
                if slot.is_some() {
                    problems.push(format!(
                        "module '{module}' has two {} tensors (several adapters in one file?); last: '{}'",
                        role.name(), entry.name
                    ));
                }
                *slot = Some(factor(r, c));
            }
            TensorRole::Magnitude | TensorRole::LoraBias => {
                let Some(n) = want_1d() else {
                    problems.push(format!(
                        "tensor '{}' has shape {shape:?}; expected a vector",
                        entry.name
                    ));
                    continue;
                };
                let md = modules.entry(module.clone()).or_insert_with(m);
                let f = Some(factor(1, n));
                if role == TensorRole::Magnitude {
                    md.magnitude = f;
                } else {
                    md.bias = f;
                }
            }
            TensorRole::Full => {
                let (r, c) = match shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    _ => {
                        problems.push(format!(
                            "tensor '{}' has shape {shape:?}; expected a LoRA factor or a 1-D/2-D weight",
                            entry.name
                        ));
                        continue;
                    }
                };
                full.push((entry.name.clone(), module, factor(r, c)));
            }
        }
    }
    for md in modules.values() {
        match (&md.a, &md.b) {
            (Some(a), Some(b)) => {
                let (ra, _) = a.shape();
                let (_, rb) = b.shape();
                if ra != rb {
                    problems.push(format!(
                        "module '{}': lora_A has rank {ra} ({}), lora_B has rank {rb} ({})",
                        md.path,
                        describe_shape(a),
                        describe_shape(b)
                    ));
                } else if ra == 0 {
                    problems.push(format!("module '{}': rank 0", md.path));
                }
            }
            (None, Some(_)) => {
                problems.push(format!("module '{}': lora_B without lora_A", md.path))
            }
            (Some(_), None) => {
                problems.push(format!("module '{}': lora_A without lora_B", md.path))
            }
            (None, None) => {
                problems.push(format!(
                    "module '{}': {} without lora_A/lora_B",
                    md.path,
                    if md.magnitude.is_some() {
                        "lora_magnitude_vector"
                    } else {
                        "lora_B.bias"
                    }
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(PeftError::Tensors {
            path: weights_path,
            problems,
        }
        .into());
    }
    Ok(PeftAdapter {
        config,
        config_path,
        weights: file,
        modules: modules.into_values().collect(),
        full,
    })
}

fn describe_shape(f: &Factor) -> String {
    let (r, c) = f.shape();
    match f {
        Factor::Safetensors { entry, .. } => format!("'{}' {r}×{c}", entry.name),
        Factor::Owned(_) | Factor::Spooled { .. } => format!("{r}×{c}"),
        Factor::Gguf { tensor, .. } => format!("'{tensor}' {r}×{c}"),
    }
}
