//! `merge`: bake LoRA adapters into a base model, keeping each tensor's quantization.
//!
//! For every base tensor an adapter touches: dequantize, add `Σ scaleᵢ·Bᵢ·Aᵢ` in f32 (DoRA magnitudes,
//! whole-tensor replacements from `modules_to_save` and LoRA biases applied exactly, in adapter order),
//! requantize once, and measure how much of the adapter the requantization kept. Every other tensor is
//! copied byte for byte. The streaming work is the [`crate::engine`]'s; this module turns adapters into
//! the engine's updates ([`inputs`]), parses the merge's options ([`MergeType`], [`Promote`]) and writes
//! the merged model's metadata ([`merge_model`]).

pub mod inputs;
mod options;

use std::path::PathBuf;

use crate::adapter::AdapterError;
use crate::arch::ArchError;
use crate::engine::file::{base_tensors, check_output, write_streamed, Output, Written};
use crate::engine::types::{majority_type, output_ftype};
use crate::engine::{prepare, EngineError, InputTensor};
use crate::gguf::{
    Array, GgufModel, Metadata, Value, KEY_ARCH, KEY_FILE_TYPE, KEY_QUANT_VERSION, KEY_TYPE,
};
use crate::quant::GgmlType;

pub use crate::engine::{
    AdapterInput, CandidateReport, InputStatsMap, MergeOptions, MergeReport, MergeType, Promote,
    RequantMethod, Summary, TensorReport, TypeOption, TypeSummary,
};
pub use options::{promote_key, OptionError};

/// Provenance keys the merge adds.
pub const KEY_TOOL_VERSION: &str = "gguf_lora.version";
pub const KEY_ADAPTERS: &str = "gguf_lora.merge.adapters";
pub const KEY_SCALES: &str = "gguf_lora.merge.scales";
pub const KEY_OUTTYPE: &str = "gguf_lora.merge.outtype";
pub const KEY_PROMOTE: &str = "gguf_lora.merge.promote";
/// Tensors given their own type (`--token-embedding-type`, `--output-tensor-type`): `NAME=TYPE,...`.
pub const KEY_RETYPE: &str = "gguf_lora.merge.retype";
/// How merged tensors were requantized: `nearest`, or `preserve` with its calibration.
pub const KEY_REQUANT: &str = "gguf_lora.merge.requant";

/// Why a merge did not happen; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The base GGUF is not a base model we can describe.
    #[error("{}: {error}", path.display())]
    Base { path: PathBuf, error: ArchError },
    /// The file to merge into is not a model.
    #[error("{}: general.type is \"{found}\", expected a model to merge into", path.display())]
    NotAModel { path: PathBuf, found: String },
    /// Problems with an adapter that the engine's plan cannot see, one line each.
    #[error("{}: cannot merge:\n  {}", path.display(), lines.join("\n  "))]
    Unmergeable { path: PathBuf, lines: Vec<String> },
    /// A LoRA bias on a tensor whose name does not end in `.weight`.
    #[error("{target}: a LoRA bias needs a '.weight' target")]
    BiasTarget { target: String },
    /// A full replacement tensor whose name maps to no base tensor.
    #[error("{adapter}: full tensor '{tensor}' maps to no base tensor")]
    UnmappedFull { adapter: String, tensor: String },
    #[error("{adapter}: the adapter changes no tensor")]
    NoChange { adapter: String },
}

/// The checks a merge makes before any work: the base is a model, the output can be written, and
/// every adapter fits the base (the plan's checks, every problem listed). [`merge_model`] makes
/// them itself; a caller with costly work to do first (the calibration pass) calls this before it.
pub fn check(
    model: &GgufModel,
    adapters: &[AdapterInput],
    outtype: MergeType,
    retype: &[(String, GgmlType)],
    output: &Output<'_>,
) -> Result<(), MergeError> {
    check_base(model, output)?;
    let base = base_tensors(model);
    let mut plans =
        crate::engine::plan::plan(model.metadata().get_str(KEY_ARCH), &base, adapters, outtype)?;
    crate::engine::plan::retype(&base, &mut plans, retype)?;
    Ok(())
}

fn check_base(model: &GgufModel, output: &Output<'_>) -> Result<(), MergeError> {
    if let Some(t) = model.metadata().get_str(KEY_TYPE).filter(|t| *t != "model") {
        return Err(MergeError::NotAModel {
            path: model.shards()[0].path().to_path_buf(),
            found: t.to_string(),
        });
    }
    Ok(check_output(model, output)?)
}

/// Merges `adapters` into `model` and writes the result. Returns the report and the files written.
pub fn merge_model(
    model: &GgufModel,
    adapters: &[AdapterInput],
    opts: &MergeOptions,
    output: &Output<'_>,
    on_done: &(dyn Fn(usize, u64) + Sync),
) -> Result<(MergeReport, Written), MergeError> {
    let meta0 = model.metadata();
    check_base(model, output)?;
    let base = base_tensors(model);
    let prepared = prepare(meta0.get_str(KEY_ARCH), &base, adapters, opts)?;
    let out_types = prepared.output_types();
    let metadata = merged_metadata(meta0, &base, &out_types, adapters, opts);
    Ok(write_streamed(
        model,
        &out_types,
        metadata,
        output,
        |sink| prepared.run(sink, on_done),
    )?)
}

/// What [`KEY_REQUANT`] says.
pub fn requant_key(r: &RequantMethod) -> String {
    match r {
        RequantMethod::Nearest { fallback: None } => "nearest".to_string(),
        RequantMethod::Nearest {
            fallback: Some(why),
        } => format!("nearest (the default could not calibrate: {why})"),
        RequantMethod::Preserve { calibration, .. } => format!("preserve ({calibration})"),
    }
}

/// The base's metadata with what a merged model must say: no adapter keys, `general.type` a model,
/// the right `general.file_type`, quantization version when quantized tensors appear, provenance.
fn merged_metadata(
    base_meta: &Metadata,
    base: &[InputTensor<'_>],
    out_types: &[GgmlType],
    adapters: &[AdapterInput],
    opts: &MergeOptions,
) -> Metadata {
    let mut m = base_meta.clone();
    let adapter_keys: Vec<String> = m
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k.starts_with("adapter."))
        .collect();
    for k in adapter_keys {
        m.remove(&k);
    }
    if m.get_str(KEY_TYPE).is_some_and(|t| t != "model") {
        m.set(KEY_TYPE, Value::String("model".into()));
    }
    // The file type describes the model's body: llama-quantize gives the token embeddings and the
    // output head their own types (gemma3-270m Q4_K_M: a Q8_0 token_embd larger than all Q4_K
    // tensors together), so they do not vote.
    let body =
        |t: &InputTensor<'_>| !(t.name.starts_with("token_embd.") || t.name.starts_with("output."));
    let elems = |t: &InputTensor<'_>| t.dims.iter().product::<u64>();
    let base_major = majority_type(
        base.iter()
            .filter(|t| body(t))
            .map(|t| (elems(t), t.dims.len(), t.ty)),
    );
    let out_major = majority_type(
        base.iter()
            .zip(out_types)
            .filter(|(t, _)| body(t))
            .map(|(t, &ty)| (elems(t), t.dims.len(), ty)),
    );
    if let Some(ft) = output_ftype(m.get_u32(KEY_FILE_TYPE), base_major, out_major) {
        m.set(KEY_FILE_TYPE, Value::U32(ft));
    }
    if out_types.iter().any(|t| t.traits().is_quantized) && !m.contains_key(KEY_QUANT_VERSION) {
        m.set(KEY_QUANT_VERSION, Value::U32(2));
    }
    m.set(
        KEY_TOOL_VERSION,
        Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    m.set(
        KEY_ADAPTERS,
        Value::Array(Array::String(
            adapters.iter().map(|a| a.name.clone()).collect(),
        )),
    );
    m.set(
        KEY_SCALES,
        Value::Array(Array::F32(adapters.iter().map(|a| a.scale).collect())),
    );
    m.set(KEY_OUTTYPE, Value::String(opts.outtype.to_string()));
    if let Some(p) = options::promote_key(&opts.promote) {
        m.set(KEY_PROMOTE, Value::String(p));
    }
    if !opts.retype.is_empty() {
        let spec: Vec<String> = opts
            .retype
            .iter()
            .map(|(name, ty)| format!("{name}={ty}"))
            .collect();
        m.set(KEY_RETYPE, Value::String(spec.join(",")));
    }
    m.set(KEY_REQUANT, Value::String(requant_key(&opts.requant)));
    m
}
