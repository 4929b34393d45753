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

use crate::adapter::gguf::{self as gguf_adapter, FactorType, WriteSummary};
use crate::adapter::{self, peft, Adapter, AdapterError, Opened};
use crate::arch::{Arch, ArchError, BaseInfo};
use crate::gguf::{GgufError, GgufModel};

/// What to convert against and how to write it.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Base GGUF (preferred): every target is checked against it.
    pub base: Option<PathBuf>,
    /// Architecture name when no base is given.
    pub arch: Option<String>,
    pub outtype: FactorType,
}

/// Why a conversion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The base GGUF could not be read.
    #[error("{}: {}", path.display(), error.kind)]
    BaseFile { path: PathBuf, error: GgufError },
    /// The base GGUF is not a base model we can describe.
    #[error("{}: {error}", path.display())]
    Base { path: PathBuf, error: ArchError },
    /// The base's architecture has no name map.
    #[error("{}: architecture '{arch}' has no HF→GGUF name map here; supported: {}", path.display(), Arch::list(false))]
    UnmappedArch { path: PathBuf, arch: String },
    /// `--arch` names no architecture we map.
    #[error(transparent)]
    UnknownArch(ArchError),
    /// Both `--base` and `--arch`.
    #[error("give either --base or --arch, not both (the base says its architecture)")]
    BaseAndArch,
    /// A GGUF adapter made for another architecture than the base's.
    #[error("{}: adapter architecture {adapter:?} does not match the base's '{base}'", path.display())]
    ArchMismatch {
        path: PathBuf,
        adapter: Option<String>,
        base: String,
    },
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
    pub outtype: FactorType,
    pub tensors: Vec<ConvertedTensor>,
    pub written: WriteSummary,
}

/// Opens a base GGUF (single file or any shard of a split set) and describes it; the errors name
/// the base file.
pub fn open_base(path: &Path) -> Result<(GgufModel, BaseInfo), ConvertError> {
    let model = GgufModel::open(path).map_err(|error| ConvertError::BaseFile {
        path: path.to_path_buf(),
        error,
    })?;
    let info = BaseInfo::from_model(&model).map_err(|error| ConvertError::Base {
        path: path.to_path_buf(),
        error,
    })?;
    Ok((model, info))
}

/// Reads the base named by the options.
pub fn load_base(opts: &ConvertOptions) -> Result<Option<BaseInfo>, ConvertError> {
    match (&opts.base, &opts.arch) {
        (Some(_), Some(_)) => Err(ConvertError::BaseAndArch),
        (Some(path), None) => {
            let (_, info) = open_base(path)?;
            if info.known_arch().is_none() {
                return Err(ConvertError::UnmappedArch {
                    path: path.clone(),
                    arch: info.arch,
                });
            }
            Ok(Some(info))
        }
        (None, Some(arch)) => BaseInfo::from_arch(arch)
            .map(Some)
            .map_err(ConvertError::UnknownArch),
        (None, None) => Ok(None),
    }
}

/// Reads any adapter (PEFT or GGUF) mapped onto `base` with the problems found, refusing a GGUF
/// adapter made for another architecture than the base's (convert's and bundle's policy).
pub fn read_adapter(input: &Path, base: Option<&BaseInfo>) -> Result<Opened, ConvertError> {
    let opened = adapter::open(input, base)?;
    if let Some(m) = opened.arch_mismatch {
        return Err(ConvertError::ArchMismatch {
            path: input.to_path_buf(),
            adapter: m.adapter,
            base: m.base,
        });
    }
    Ok(opened)
}

/// Refuses an adapter with what a GGUF LoRA cannot hold (DoRA, LoRA biases, full tensors), listing
/// every offender.
pub fn refuse_unrepresentable(input: &Path, adapter: &Adapter) -> Result<(), ConvertError> {
    let unrepresentable = adapter.unrepresentable();
    if unrepresentable.is_empty() {
        return Ok(());
    }
    Err(ConvertError::Refused {
        input: input.to_path_buf(),
        summary: format!(
            "{} tensor(s) cannot be expressed in a GGUF LoRA",
            unrepresentable.len()
        ),
        lines: unrepresentable,
        hint: "nothing was written; use `gguf-lora merge BASE.gguf --lora ADAPTER`, which applies DoRA, modules_to_save and LoRA biases exactly".into(),
    })
}

/// Converts `input` to a GGUF LoRA at `output`.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let base = load_base(opts)?;
    let Opened {
        adapter, issues, ..
    } = read_adapter(input, base.as_ref())?;
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
    refuse_unrepresentable(input, &adapter)?;
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
            kind: t.kind.name(),
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
