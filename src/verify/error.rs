//! Why a check could not run. Every message names the model file (or the tensor, or the adapter)
//! and what was expected.

use std::path::PathBuf;

use thiserror::Error;

use crate::adapter::AdapterError;
use crate::arch::ArchError;
use crate::gguf::GgufError;
use crate::merge::MergeError;
use crate::quant::QuantError;

/// Errors of `verify`: reading the models and adapters, running the forward pass, writing logits.
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Gguf(Box<GgufError>),
    /// The calibration pass of the in-memory merge failed.
    #[error(transparent)]
    Calibrate(Box<crate::calibrate::CalibrateError>),
    /// The in-memory merge (no `--merged` given) failed.
    #[error(transparent)]
    Merge(Box<MergeError>),
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The base GGUF could not be described for mapping a PEFT adapter.
    #[error("base model: {0}")]
    Base(ArchError),
    /// A model's metadata or tensors are not what the forward pass runs; `model` names the file.
    #[error("{model}: {problem}")]
    Model {
        model: String,
        problem: ModelProblem,
    },
    /// A weight tensor whose bytes cannot be decoded as its shape says.
    #[error("tensor {tensor}: {problem}")]
    Tensor {
        tensor: String,
        problem: TensorProblem,
    },
    /// A runtime LoRA term that does not fit the tensor it adapts.
    #[error("LoRA for {tensor}: {problem}")]
    Lora {
        tensor: String,
        problem: LoraProblem,
    },
    #[error("matmul: activation has {len} floats, expected {n_tok} x {n_in}")]
    Activation {
        len: usize,
        n_tok: usize,
        n_in: usize,
    },
    #[error("activations of {n_in} do not fit {ty} blocks")]
    ActivationBlocks { n_in: usize, ty: &'static str },
    #[error("verify needs at least one token and one configuration")]
    NoTokens,
    /// More positions than the session was made for.
    #[error("{need} positions do not fit the context of {n_ctx}")]
    ContextFull { n_ctx: usize, need: usize },
    #[error("token id {token} is out of range: the model has {n_vocab} tokens")]
    TokenOutOfRange { token: u32, n_vocab: usize },
    #[error("{merged} is a {merged_arch} model but the base {base} is {base_arch}")]
    ArchDiffers {
        merged: String,
        merged_arch: &'static str,
        base: String,
        base_arch: &'static str,
    },
    #[error("{merged} has {merged_vocab} tokens but the base {base} has {n_vocab}")]
    VocabDiffers {
        merged: String,
        merged_vocab: usize,
        base: String,
        n_vocab: usize,
    },
    /// The merged model's output head gives other logits than the base's (an `output.weight` of
    /// other rows): the logits cannot be compared token for token.
    #[error("{merged} gives {merged_vocab} logits per token but the base {base} gives {n_vocab}")]
    LogitsDiffer {
        merged: String,
        merged_vocab: usize,
        base: String,
        n_vocab: usize,
    },
    #[error("{merged}: the adapters adapt {tensor}, which the merged model does not have")]
    MergedMissing { merged: String, tensor: String },
    #[error(
        "the adapters adapt {tensor}, which the base model does not have (hint: wrong base model?)"
    )]
    BaseMissing { tensor: String },
    #[error("{}: {message} ({count} problem(s) mapping it onto the base)", path.display())]
    PeftMapping {
        path: PathBuf,
        message: String,
        count: usize,
    },
    #[error("{}: {what} cannot be applied at runtime by llama.cpp, so there is no runtime reference to verify against", path.display())]
    NotRuntime { path: PathBuf, what: String },
    #[error("cannot create a temporary directory for the merge: {0}")]
    TempDir(std::io::Error),
    #[error("cannot create {}: {error}", path.display())]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Output(crate::output::OutputError),
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl VerifyError {
    /// Whether the error says the forward pass does not run this kind of model (its
    /// architecture, its layout), rather than that something is broken.
    pub fn is_unrunnable_model(&self) -> bool {
        matches!(self, VerifyError::Model { .. })
    }
}

impl From<GgufError> for VerifyError {
    fn from(e: GgufError) -> VerifyError {
        VerifyError::Gguf(Box::new(e))
    }
}

impl From<MergeError> for VerifyError {
    fn from(e: MergeError) -> VerifyError {
        VerifyError::Merge(Box::new(e))
    }
}

/// What is wrong with a model for the forward pass.
#[derive(Debug, Error)]
pub enum ModelProblem {
    #[error("no general.architecture")]
    NoArchitecture,
    #[error("architecture {arch} is not supported by verify (supported: {supported})")]
    Unsupported { arch: String, supported: String },
    #[error("missing or non-integer {key}")]
    MissingUint { key: String },
    #[error("missing {key}")]
    MissingKey { key: String },
    #[error("implausible block_count {n_layer} / embedding_length {n_embd}")]
    Implausible { n_layer: usize, n_embd: usize },
    #[error("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")]
    Heads { n_head: usize, n_head_kv: usize },
    #[error("head size {head_dim} / rope dimension count {n_rot} are inconsistent")]
    HeadSize { head_dim: usize, n_rot: usize },
    #[error("rope scaling type {kind} is not supported by verify")]
    RopeScaling { kind: String },
    #[error("tensor {tensor} is missing ({arch} model)")]
    MissingTensor { tensor: String, arch: &'static str },
    #[error("tensor {tensor} has shape {dims:?}, expected {len} values")]
    VectorShape {
        tensor: String,
        dims: Vec<u64>,
        len: usize,
    },
    #[error("tensor {tensor} has shape {dims:?}, expected [{n_in}, N]")]
    LinearShape {
        tensor: String,
        dims: Vec<u64>,
        n_in: usize,
    },
    #[error("{tensor} has shape {dims:?}, expected [{n_embd}, n_vocab]")]
    EmbeddingShape {
        tensor: &'static str,
        dims: Vec<u64>,
        n_embd: usize,
    },
    #[error("{tensor} has {n} outputs, expected {want}")]
    Outputs {
        tensor: String,
        n: usize,
        want: usize,
    },
    #[error("{gate} and {up} differ in size")]
    GateUp { gate: String, up: String },
    #[error("fused {tensor} has an odd size")]
    OddFused { tensor: String },
    #[error("expert_count {n_expert} / expert_used_count {n_expert_used} are inconsistent")]
    Experts {
        n_expert: usize,
        n_expert_used: usize,
    },
    #[error("{tensor} has shape {dims:?}, expected [{n_in}, N, {n_expert}]")]
    ExpertShape {
        tensor: String,
        dims: Vec<u64>,
        n_in: usize,
        n_expert: usize,
    },
}

/// What is wrong with a weight tensor's bytes.
#[derive(Debug, Error)]
pub enum TensorProblem {
    #[error("row of {row_len} elements is not a whole number of {ty} blocks")]
    RowNotBlocks { row_len: usize, ty: &'static str },
    #[error("{len} bytes of data, expected {need:?} for {dims:?} {ty}")]
    DataSize {
        len: usize,
        need: Option<usize>,
        dims: Vec<u64>,
        ty: &'static str,
    },
    #[error("rows {first}..{end} out of range")]
    RowsOutOfRange { first: usize, end: usize },
    #[error("{ty} rows of {row_len} elements")]
    Blocks { ty: &'static str, row_len: usize },
    #[error("{0}")]
    Codec(QuantError),
}

/// How a runtime LoRA term does not fit its tensor (shapes in the adapter's terms: `A` is
/// `lora_a`, for the token embedding the per-token rows).
#[derive(Debug, Error)]
pub enum LoraProblem {
    #[error("A has {a} values and B {b}, expected {rank} x {n_in} and {n_out} x {rank}")]
    Shapes {
        a: usize,
        b: usize,
        rank: usize,
        n_in: usize,
        n_out: usize,
    },
    #[error("B has {b} values, expected {n_embd} x {rank}")]
    EmbeddingB {
        b: usize,
        n_embd: usize,
        rank: usize,
    },
    #[error("no row for token {token}")]
    NoRow { token: u32 },
    #[error("A has {a} values and B {b}, expected {n_vocab} x {rank} and {n_embd} x {rank}")]
    Tied {
        a: usize,
        b: usize,
        n_vocab: usize,
        n_embd: usize,
        rank: usize,
    },
}

/// `Result` with [`VerifyError`].
pub type Result<T, E = VerifyError> = std::result::Result<T, E>;
