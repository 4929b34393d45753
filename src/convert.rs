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
use crate::adapter::{self, peft, AdapterError, Opened, Refusal};
use crate::arch::{BaseError, BaseInfo};

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
    #[error(transparent)]
    Base(#[from] BaseError),
    /// The adapter has tensors a GGUF LoRA cannot hold, or that do not fit the base.
    #[error(transparent)]
    Refused(#[from] Refusal),
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

/// Converts `input` to a GGUF LoRA at `output`.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let base = BaseInfo::resolve(opts.base.as_deref(), opts.arch.as_deref())?;
    let Opened {
        adapter, issues, ..
    } = adapter::open(input, base.as_ref())?.same_arch(input)?;
    if let Some(r) = Refusal::misfits(input, &issues) {
        return Err(r.into());
    }
    if let Some(r) = Refusal::unrepresentable(input, &adapter) {
        return Err(r.into());
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
