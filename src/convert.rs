//! `convert`: a PEFT LoRA (directory or `.safetensors` with its config beside it), or a GGUF LoRA to
//! re-type, into a GGUF LoRA adapter that llama.cpp loads with exactly PEFT's effective scales.
//!
//! The base model is described by a base GGUF (`--base`: architecture, head counts, every tensor's
//! name and shape, all checked) or only named (`--arch`: mapping by name, shapes from the adapter).
//! Everything is checked before the output is created; anything a GGUF LoRA cannot express (DoRA,
//! `modules_to_save`, LoRA biases), unknown modules, shape or rank problems and missing base tensors
//! are refused together in one error that lists every offender. Non-finite values are found while
//! streaming and abort the atomic write, so no output is left behind.

use std::path::{Path, PathBuf};

use crate::adapter::gguf::{self as gguf_adapter, OutType, WriteSummary};
use crate::adapter::{peft, Adapter, AdapterError, Issue, TargetKind};
use crate::arch::BaseInfo;
use crate::gguf::GgufModel;

/// What to convert against and how to write it.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Base GGUF (preferred): every target is checked against it.
    pub base: Option<PathBuf>,
    /// Architecture name when no base is given.
    pub arch: Option<String>,
    pub outtype: OutType,
}

/// Why a conversion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The base GGUF could not be used.
    #[error("{path}: {message}")]
    Base { path: PathBuf, message: String },
    /// Bad combination of options.
    #[error("{0}")]
    Usage(String),
    /// The adapter has tensors a GGUF LoRA cannot hold, or that do not fit the base.
    #[error("{input}: cannot convert: {summary}:\n{}\n{hint}", lines.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n"))]
    Refused {
        input: PathBuf,
        summary: String,
        lines: Vec<String>,
        hint: String,
    },
}

/// One converted target, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertedTensor {
    pub target: String,
    pub source: String,
    pub layer: Option<u32>,
    pub kind: &'static str,
    pub rank: usize,
    /// llama.cpp-convention alpha of this tensor (PEFT alpha, ×√r with rsLoRA).
    pub alpha: f64,
    /// PEFT's effective scale at user scale 1.
    pub scale: f64,
    /// Whether `lora_b` rows were RoPE-permuted.
    pub permuted: bool,
}

/// What `convert` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    pub input: PathBuf,
    pub output: PathBuf,
    pub base: Option<PathBuf>,
    pub arch: String,
    pub outtype: OutType,
    pub tensors: Vec<ConvertedTensor>,
    pub written: WriteSummary,
}

pub fn kind_name(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::Linear => "linear",
        TargetKind::Embedding => "embedding",
        TargetKind::Experts => "experts",
    }
}

/// Reads the base named by the options.
pub fn load_base(opts: &ConvertOptions) -> Result<Option<BaseInfo>, ConvertError> {
    match (&opts.base, &opts.arch) {
        (Some(_), Some(_)) => Err(ConvertError::Usage(
            "give either --base or --arch, not both (the base says its architecture)".into(),
        )),
        (Some(path), None) => {
            let model = GgufModel::open(path).map_err(|e| ConvertError::Base {
                path: path.clone(),
                message: e.kind.to_string(),
            })?;
            let info = BaseInfo::from_model(&model).map_err(|message| ConvertError::Base {
                path: path.clone(),
                message,
            })?;
            if !crate::arch::SUPPORTED.contains(&info.arch.as_str()) {
                return Err(ConvertError::Base {
                    path: path.clone(),
                    message: format!(
                        "architecture '{}' has no HF→GGUF name map here; supported: {}",
                        info.arch,
                        crate::arch::SUPPORTED.join(", ")
                    ),
                });
            }
            Ok(Some(info))
        }
        (None, Some(arch)) => BaseInfo::from_arch(arch)
            .map(Some)
            .map_err(ConvertError::Usage),
        (None, None) => Ok(None),
    }
}

/// Reads any adapter (PEFT or GGUF) mapped onto `base` and the problems found. A GGUF adapter needs
/// no base; with one, its architecture and tensors are checked against it.
pub fn read_adapter(
    input: &Path,
    base: Option<&BaseInfo>,
) -> Result<(Adapter, Vec<Issue>), ConvertError> {
    if peft::is_peft(input) {
        let base = base.ok_or_else(|| {
            ConvertError::Usage(format!(
                "{}: a PEFT adapter needs the base model's architecture: pass --base BASE.gguf (checks every tensor) or --arch ARCH",
                input.display()
            ))
        })?;
        Ok(peft::read(input, base)?)
    } else {
        let adapter = gguf_adapter::read(input)?;
        let mut issues = Vec::new();
        if let Some(base) = base {
            if adapter.arch.as_deref() != Some(base.arch.as_str()) {
                return Err(ConvertError::Base {
                    path: input.to_path_buf(),
                    message: format!(
                        "adapter architecture {:?} does not match the base's '{}'",
                        adapter.arch, base.arch
                    ),
                });
            }
            issues = crate::adapter::check_against_base(&adapter.tensors, base);
        }
        Ok((adapter, issues))
    }
}

/// Converts `input` to a GGUF LoRA at `output`.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let base = load_base(opts)?;
    let (adapter, issues) = read_adapter(input, base.as_ref())?;
    if !issues.is_empty() {
        let lines = issues
            .iter()
            .map(|i| match &i.target {
                Some(t) => format!("{} → {t}: {}", i.source, i.message),
                None => format!("{}: {}", i.source, i.message),
            })
            .collect::<Vec<_>>();
        return Err(ConvertError::Refused {
            input: input.to_path_buf(),
            summary: format!("{} module(s) do not fit", lines.len()),
            lines,
            hint: "nothing was written; check that the adapter was trained on this base model"
                .into(),
        });
    }
    let unrepresentable = adapter.unrepresentable();
    if !unrepresentable.is_empty() {
        return Err(ConvertError::Refused {
            input: input.to_path_buf(),
            summary: format!(
                "{} tensor(s) cannot be expressed in a GGUF LoRA",
                unrepresentable.len()
            ),
            lines: unrepresentable,
            hint: "nothing was written; use `gguf-lora merge BASE.gguf --lora ADAPTER`, which applies DoRA, modules_to_save and LoRA biases exactly".into(),
        });
    }
    let mut inputs: Vec<PathBuf> = vec![input.to_path_buf()];
    if let Ok((config, weights)) = peft::locate(input) {
        inputs.push(config);
        inputs.push(weights);
    }
    if let Some(b) = &opts.base {
        inputs.push(b.clone());
    }
    let input_refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let written = gguf_adapter::write(&adapter, output, &input_refs, opts.outtype)?;
    let tensors = adapter
        .tensors
        .iter()
        .map(|t| ConvertedTensor {
            target: t.target.clone(),
            source: t.source(),
            layer: t.layer,
            kind: kind_name(t.kind),
            rank: t.rank(),
            alpha: t.alpha(),
            scale: t.scale(),
            permuted: t.permute_heads.is_some(),
        })
        .collect();
    Ok(ConvertReport {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        base: opts.base.clone(),
        arch: adapter.arch.clone().unwrap_or_default(),
        outtype: opts.outtype,
        tensors,
        written,
    })
}
