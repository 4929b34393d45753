//! Why an adapter could not be read, combined or written. One enum per source format (PEFT, GGUF
//! LoRA file, named bundle) plus the errors of materializing factors, gathered in [`AdapterError`].
//! Every message names the file and the tensor.

use std::ops::Range;
use std::path::PathBuf;

use thiserror::Error;

use crate::gguf::GgufError;
use crate::quant::QuantError;
use crate::safetensors_file::SafetensorsError;

/// Errors from reading an adapter or materializing its tensors. The format errors are boxed: they
/// carry paths and names, and an error should stay small on the success path.
#[derive(Debug, Error)]
pub enum AdapterError {
    #[error(transparent)]
    Safetensors(Box<SafetensorsError>),
    #[error(transparent)]
    Gguf(Box<GgufError>),
    #[error(transparent)]
    Peft(Box<PeftError>),
    #[error(transparent)]
    LoraFile(Box<LoraFileError>),
    #[error(transparent)]
    Bundle(Box<BundleError>),
    #[error(transparent)]
    Factor(Box<FactorError>),
    /// A PEFT adapter was given where no base (nor `--arch`) says the architecture.
    #[error("{}: a PEFT adapter needs the base model's architecture: pass --base BASE.gguf (checks every tensor) or --arch ARCH", path.display())]
    PeftNeedsBase { path: PathBuf },
}

impl AdapterError {
    /// Whether the error is a NaN or infinite value found in a factor.
    pub fn is_non_finite(&self) -> bool {
        matches!(self, AdapterError::Factor(e) if matches!(**e, FactorError::NonFinite { .. }))
    }
}

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for AdapterError {
            fn from(e: $ty) -> AdapterError {
                AdapterError::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(
    Safetensors(SafetensorsError),
    Gguf(GgufError),
    Peft(PeftError),
    LoraFile(LoraFileError),
    Bundle(BundleError),
    Factor(FactorError),
);

/// A PEFT adapter (directory, or `.safetensors` with its config) that cannot be read.
#[derive(Debug, Error)]
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
    /// Tensors whose names or shapes make them unusable, one line each.
    #[error("{}: {}", path.display(), problems.join("; "))]
    Tensors {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// An `adapter_config.json` field that is wrong.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object")]
    NotAnObject,
    #[error("{field}: expected an object")]
    FieldNotAnObject { field: &'static str },
    #[error("peft_type is {0:?}; only LORA adapters can be read")]
    NotLora(String),
    /// A field of the wrong type or range: what was expected and what was found.
    #[error("{field}: expected {expected}, got {found}")]
    Field {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("pattern key {key:?} is not a regular expression we can evaluate: {error}")]
    Pattern { key: String, error: String },
}

/// A GGUF file that is not a LoRA adapter llama.cpp would load.
#[derive(Debug, Error)]
pub enum LoraFileError {
    #[error("{}: this is a named bundle of adapters ({names}); select one as {}#NAME", path.display(), path.display())]
    IsBundle { path: PathBuf, names: String },
    #[error("{}: general.type is {found:?}; expected \"adapter\" (is this a base model?)", path.display())]
    NotAnAdapter {
        path: PathBuf,
        found: Option<String>,
    },
    #[error("{}: adapter.type is {found:?}; expected \"lora\"", path.display())]
    NotLora {
        path: PathBuf,
        found: Option<String>,
    },
    #[error("{}: {key} is {found}, llama.cpp requires {expected}", path.display())]
    KeyType {
        path: PathBuf,
        key: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{}: tensor '{name}' has an unexpected suffix (llama.cpp accepts .lora_a, .lora_b and *_norm.weight)", path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{}: LoRA tensor pair for '{base}' is missing one component", path.display())]
    HalfPair { path: PathBuf, base: String },
    #[error("{}: '{a}' (ne {a_dims:?}) and '{b}' (ne {b_dims:?}): expected two 2-D tensors, or two 3-D expert tensors with the same expert count", path.display())]
    PairDims {
        path: PathBuf,
        a: String,
        a_dims: Vec<u64>,
        b: String,
        b_dims: Vec<u64>,
    },
    #[error("{}: '{a}' has zero experts", path.display())]
    ZeroExperts { path: PathBuf, a: String },
    #[error("{}: '{a}' (ne {a_dims:?}) and '{b}' (ne {b_dims:?}) do not form a LoRA pair (rank mismatch)", path.display())]
    PairRank {
        path: PathBuf,
        a: String,
        a_dims: Vec<u64>,
        b: String,
        b_dims: Vec<u64>,
    },
    /// Writing: the architecture is not known.
    #[error("{}: the architecture is unknown; pass --base BASE.gguf or --arch ARCH", path.display())]
    UnknownArch { path: PathBuf },
    /// Writing: nothing to write.
    #[error("{}: the adapter has no LoRA tensors", path.display())]
    NoTensors { path: PathBuf },
    /// Writing: a tensor could not be encoded.
    #[error("{tensor}: {error}")]
    Encode { tensor: String, error: QuantError },
}

/// A named bundle (or one member of it) that cannot be read.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("{}: general.type is {found:?}, not \"{}\": FILE#NAME selects an adapter of a named bundle (gguf-lora bundle --mode named)", file.display(), super::bundle::BUNDLE_TYPE)]
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
    #[error("{}: bundle layout version {version}; this build reads version {}", file.display(), super::bundle::VERSION)]
    Version { file: PathBuf, version: u32 },
    #[error("{}: {} is {count:?} but {} lists {names} adapters", file.display(), super::bundle::KEY_COUNT, super::bundle::KEY_NAMES)]
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

/// A factor that cannot be materialized, or factors that do not combine.
#[derive(Debug, Error)]
pub enum FactorError {
    #[error("{}: tensor '{tensor}' does not hold {rows}×{cols} values", file.display())]
    Size {
        file: PathBuf,
        tensor: String,
        rows: usize,
        cols: usize,
    },
    /// `what` is "FILE: tensor 'NAME'" ([`super::Factor::describe`]).
    #[error("{what}: value {value} at row {row}, column {col} is not finite")]
    NonFinite {
        what: String,
        value: f32,
        row: usize,
        col: usize,
    },
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
        error: QuantError,
    },
    #[error("{source_name}: lora_A has rank {a_rank} but lora_B has rank {b_rank} ({a} / {b})")]
    PairRank {
        source_name: String,
        a_rank: usize,
        b_rank: usize,
        a: String,
        b: String,
    },
    #[error("{source_name}: rows {rows:?} asked of a lora_B with {b_rows} rows")]
    BRows {
        source_name: String,
        rows: Range<usize>,
        b_rows: usize,
    },
    #[error("{target}: expert LoRA {source_name} has rank {rank}, others rank {expected}; stacked experts need one rank")]
    ExpertRank {
        target: String,
        source_name: String,
        rank: usize,
        expected: usize,
    },
    #[error("{target}: fused part {source_name} reads {n_in} inputs, the first part {expected}; fused LoRAs need one input width")]
    FusedInputs {
        target: String,
        source_name: String,
        n_in: usize,
        expected: usize,
    },
    #[error("{target}: {source_name} is {n_expert} experts of {n_out}×{n_in}, the first part {want_expert} experts of {want_out}×{want_in}; concatenated LoRAs need one shape")]
    ConcatShape {
        target: String,
        source_name: String,
        n_expert: usize,
        n_out: usize,
        n_in: usize,
        want_expert: usize,
        want_out: usize,
        want_in: usize,
    },
    #[error(
        "{target}: {rows} output rows cannot be split into {n_head} heads of two rotary halves"
    )]
    NotPermutable {
        target: String,
        rows: usize,
        n_head: usize,
    },
    #[error("{target}: DoRA on embeddings is not supported")]
    DoraOnEmbedding { target: String },
    #[error("{target}: inconsistent LoRA factor shapes")]
    Inconsistent { target: String },
}
