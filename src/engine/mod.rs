//! `merge`: bake LoRA adapters into a base model, keeping each tensor's quantization.
//!
//! For every base tensor an adapter touches: dequantize, add `Σ scaleᵢ·Bᵢ·Aᵢ` in f32 (DoRA magnitudes,
//! whole-tensor replacements from `modules_to_save` and LoRA biases applied exactly, in adapter order),
//! requantize once, and measure how much of the adapter the requantization kept. Every other tensor is
//! copied byte for byte. The work is split in two so the caller can lay out the output before any
//! byte is computed: [`prepare`] checks and plans everything (and chooses promotions), then
//! [`Prepared::run`] streams the tensors, in file order, to a sink.
//!
//! ```text
//! plan (checks, output types) → sample candidate types → promote → stream: dequantize → + s·B·A → requantize → sink
//! ```

//! The streaming engine shared by `merge` and `quantize`: each base tensor is either copied byte for
//! byte or *recoded*: dequantized row block by row block, updated in f32 (each adapter's
//! `scale·B·A`, DoRA magnitudes, replacements, biases), requantized once to its output type, and
//! measured against the exact f32 values on the spot. Tensors go to a sink in file order; peak
//! memory is a few output tensors and one tensor's adapter factors, never the model.
//!
//! The work is split in two so the caller can lay out the output before any byte is computed:
//! [`prepare`] (or [`prepare_recode`] without adapters) checks and plans everything and chooses
//! promotions, then [`Prepared::run`] streams. Where a requantization method plugs in is
//! [`requant`]: one strategy per tensor plan.
//!
//! ```text
//! plan (checks, output types) → sample candidate types → promote → stream: dequantize → + s·B·A → requantize → sink
//! ```
//!
//! Modules: [`plan`] (what happens to each tensor), [`requant`] (how exact rows become bytes),
//! [`stream`] (the per-tensor work and the ordered streaming loop), [`kernel`] (`+= s·B·A`),
//! [`codec`] (the two codec calls), [`promote`] (candidate types), [`report`], [`types`] (output
//! types and fallbacks), [`file`] (the GGUF output: shards, atomic writers).

mod codec;
pub mod file;
mod kernel;
pub mod plan;
pub mod preserve;
mod promote;
pub mod report;
pub mod requant;
mod stream;
pub mod types;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::adapter::{AdapterError, LowRank};
use crate::gguf::{GgufError, GgufFile};
use crate::quant::{GgmlType, QuantError};

pub use plan::{matrix_shape, PlanProblem, ShapeProblem};
use preserve::InputStats;
pub use report::{
    CandidateReport, InputSummary, MergeReport, Summary, TensorReport, TypeOption, TypeSummary,
};
pub use requant::{Importance, Requant};
pub use stream::{ErrorSums, Phases};

/// One base tensor as the engine reads it: zero-copy bytes straight from the mapped file.
pub struct InputTensor<'a> {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: &'a [u8],
    /// The mapped file `data` lies in, so its pages can be dropped from the resident set once a
    /// pass over them is done (`None`: bytes in memory).
    pub map: Option<&'a GgufFile>,
}

impl InputTensor<'_> {
    /// Drops the tensor's mapped pages from the resident set; a later read brings them back from
    /// the page cache, so this only bounds memory, never changes what is read.
    pub fn release_pages(&self) {
        if let Some(file) = self.map {
            file.release_slice_pages(self.data);
        }
    }
}

/// Reads an update's values from its adapter file; called when the tensor is processed.
pub type Loader<T> = Box<dyn Fn() -> Result<T, AdapterError> + Send + Sync>;

/// An update's values: in memory, or read from the adapter file (lazily, each time its tensor is
/// sampled or streamed) so that a large adapter is never held whole.
pub enum Values<T> {
    Ready(T),
    Lazy(Loader<T>),
}

impl Values<LowRank> {
    fn get(&self) -> Result<Cow<'_, LowRank>, AdapterError> {
        match self {
            Values::Ready(v) => Ok(Cow::Borrowed(v)),
            Values::Lazy(load) => Ok(Cow::Owned(load()?)),
        }
    }
}

impl Values<Vec<f32>> {
    fn get(&self) -> Result<Cow<'_, [f32]>, AdapterError> {
        match self {
            Values::Ready(v) => Ok(Cow::Borrowed(v)),
            Values::Lazy(load) => Ok(Cow::Owned(load()?)),
        }
    }
}

/// A low-rank update's shape, known before its values are read: what the plan checks and the report
/// shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowRankShape {
    pub rank: usize,
    pub n_expert: usize,
    /// Values of `A` (`n_expert·rank × n_cols`) and of `B` (`n_rows × rank`).
    pub a_len: usize,
    pub b_len: usize,
    /// Values of the DoRA magnitude, when there is one.
    pub magnitude_len: Option<usize>,
}

impl std::fmt::Display for LowRankShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {}, {} expert(s), A of {} values, B of {}",
            self.rank, self.n_expert, self.a_len, self.b_len
        )?;
        if let Some(m) = self.magnitude_len {
            write!(f, ", magnitude of {m}")?;
        }
        Ok(())
    }
}

impl LowRankShape {
    pub fn of(lr: &LowRank) -> LowRankShape {
        LowRankShape {
            rank: lr.rank,
            n_expert: lr.n_expert,
            a_len: lr.a.len(),
            b_len: lr.b.len(),
            magnitude_len: lr.magnitude.as_ref().map(Vec::len),
        }
    }
}

/// What one adapter does to one base tensor.
pub enum Update {
    /// `scale·B·A` in the base tensor's layout ([`LowRank`]), `scale` being the adapter's own
    /// effective scale (alpha/rank), known without reading the factors.
    LowRank {
        shape: LowRankShape,
        scale: f32,
        values: Values<LowRank>,
    },
    /// `modules_to_save`: the tensor is replaced by these `len` values (`n_rows × n_cols`).
    Replace {
        len: usize,
        values: Values<Vec<f32>>,
    },
    /// LoRA bias: these `len` values (× the user scale) are added.
    Add {
        len: usize,
        values: Values<Vec<f32>>,
    },
}

impl Update {
    /// A low-rank update already in memory.
    pub fn low_rank(lr: LowRank) -> Update {
        Update::LowRank {
            shape: LowRankShape::of(&lr),
            scale: lr.scale,
            values: Values::Ready(lr),
        }
    }

    /// A replacement already in memory.
    pub fn replace(values: Vec<f32>) -> Update {
        Update::Replace {
            len: values.len(),
            values: Values::Ready(values),
        }
    }

    /// An addition already in memory.
    pub fn add(values: Vec<f32>) -> Update {
        Update::Add {
            len: values.len(),
            values: Values::Ready(values),
        }
    }
}

/// One adapter, normalized against the base, with the user's scale.
pub struct AdapterInput {
    /// How the user named it (a path or `BUNDLE.gguf#NAME`); used in reports and provenance.
    pub name: String,
    /// `general.architecture` of the adapter, when it says.
    pub architecture: Option<String>,
    /// The user's scale (`--lora` = 1).
    pub scale: f32,
    /// (base tensor name, update), in the adapter's order.
    pub updates: Vec<(String, Update)>,
}

/// Which type each merged tensor is written in (`merge --outtype`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergeType {
    /// Each merged tensor in its own base type.
    Keep,
    Type(GgmlType),
}

/// `--promote`.
#[derive(Clone, Debug, PartialEq)]
pub enum Promote {
    None,
    /// Every touched tensor to this type (with fallbacks), unless its planned type is already larger.
    Type(GgmlType),
    /// Touched tensors of the first type to the second (with fallbacks), e.g. only Q4_K → Q6_K.
    Map(Vec<(GgmlType, GgmlType)>),
    /// Per tensor, the types that keep the most of the adapter with the output grown by at most
    /// `budget` (a fraction: 0.05 = 5%; 0 keeps the base's size) over the base: promotions, paid
    /// for by the budget or by demoting tensors the base's recipe gave more bits.
    Auto {
        budget: f64,
    },
}

/// Calibration statistics of one tensor: one entry for a matrix; for stacked experts one per
/// expert, in expert order (its rows are expert-major), `None` where no calibration token reached
/// the expert.
pub type TensorStats = Vec<Option<Arc<InputStats>>>;

/// Calibration statistics per base tensor name (tensors sharing an input share them).
pub type InputStatsMap = HashMap<String, TensorStats>;

/// How merged tensors are requantized (`merge --requant`).
#[derive(Clone, Debug)]
pub enum RequantMethod {
    /// ggml's round-to-nearest, bit for bit as `ggml_quantize_chunk`; `fallback` says why the
    /// default requantization gave way to it, when it did (provenance, report and a warning).
    Nearest { fallback: Option<String> },
    /// Keep the adapter's effect on each tensor's output ([`preserve`]), with these statistics;
    /// tensors without statistics (or of types without a known grid) are rounded to nearest.
    /// `calibration` says what the statistics come from (provenance and report).
    Preserve {
        stats: Arc<InputStatsMap>,
        calibration: String,
    },
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub outtype: MergeType,
    pub promote: Promote,
    /// Rows per tensor on which candidate types are tried (for promotion and the report).
    pub sample_rows: usize,
    pub requant: RequantMethod,
    /// Tensors written in a type of their own whether an adapter touches them or not
    /// (`--token-embedding-type`, `--output-tensor-type`); bytes one frees fund `--promote auto`.
    pub retype: Vec<(String, GgmlType)>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            outtype: MergeType::Keep,
            promote: Promote::None,
            sample_rows: 64,
            requant: RequantMethod::Nearest { fallback: None },
            retype: Vec::new(),
        }
    }
}

/// Why the engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The inputs do not fit together; one line per offending tensor or adapter.
    #[error("cannot merge:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Plan(Vec<PlanProblem>),
    #[error(transparent)]
    Codec(#[from] QuantError),
    #[error("a row of {n} elements does not fit type {ty}")]
    RowDoesNotFit { n: usize, ty: GgmlType },
    /// An adapter's values could not be read.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// An update's values, once read, do not have the shape the plan checked.
    #[error("tensor '{tensor}': the adapter's values ({got}) do not match their shape ({want})")]
    UpdateShape {
        tensor: String,
        got: String,
        want: String,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// The sink failed with an error of its own.
    #[error(transparent)]
    Sink(Box<dyn std::error::Error + Send + Sync>),
    #[error("the writer thread panicked")]
    WriterPanicked,
}

impl From<&str> for EngineError {
    fn from(s: &str) -> EngineError {
        EngineError::Sink(s.into())
    }
}

/// A checked plan with its output types chosen: what the writer needs to lay out the file.
pub struct Prepared<'a, 'u> {
    base: &'a [InputTensor<'a>],
    adapters: &'u [AdapterInput],
    plans: Vec<plan::TensorPlan<'u>>,
    candidates: Vec<Vec<CandidateReport>>,
    /// Candidate types the stream tries (when they were not tried before it), by tensor index.
    sampling: Vec<Option<stream::Sampling>>,
    promoted: Vec<bool>,
    phases: Phases,
}

/// Checks the inputs, plans the merge and chooses promotions. Nothing is written.
pub fn prepare<'a, 'u>(
    base_arch: Option<&str>,
    base: &'a [InputTensor<'a>],
    adapters: &'u [AdapterInput],
    opts: &'u MergeOptions,
) -> Result<Prepared<'a, 'u>, EngineError> {
    let mut plans = plan::plan(base_arch, base, adapters, opts.outtype)?;
    plan::retype(base, &mut plans, &opts.retype)?;
    if let RequantMethod::Preserve { stats, .. } = &opts.requant {
        // A retyped tensor no adapter touches is recoded too: where the calibration saw its input
        // (an output head), its rounding is weighted as a merged tensor's is.
        for p in plans.iter_mut().filter(|p| p.is_touched() || p.retyped) {
            let t = &base[p.index];
            if let Some(s) = stats.get(&t.name).filter(|s| !s.is_empty()) {
                let n_rows: u64 = t.dims.iter().skip(1).product();
                p.requant = Requant::Preserve {
                    stats: s,
                    rows_per_stats: (n_rows as usize / s.len()).max(1),
                };
            }
        }
    }
    let phases = Phases::default();
    // The candidates of each touched tensor are the planned type's, before any promotion.
    let floor = promote::floor_bits(&plans);
    let types: Vec<Vec<GgmlType>> = plans
        .iter()
        .map(|p| promote::candidate_types(p, &opts.promote, floor))
        .collect();
    // `--promote auto` chooses from the candidates before anything is written, so it tries them
    // in a pass of its own; otherwise the stream tries them on rows it merges anyway.
    let (candidates, sampling) = if matches!(opts.promote, Promote::Auto { .. }) {
        let c = promote::measure_candidates(base, &plans, &types, opts, &phases)?;
        (c, Vec::new())
    } else {
        let sampling = plans
            .iter()
            .zip(types)
            .map(|(p, types)| {
                (!types.is_empty()).then(|| stream::Sampling {
                    types,
                    runs: promote::candidate_rows(p, opts),
                })
            })
            .collect();
        (Vec::new(), sampling)
    };
    // What the retyped tensors give back (a demoted token_embd, touched or not) is budget `--promote
    // auto` can spend: they have no candidates, so the allocator does not count them otherwise.
    let freed: i128 = plans
        .iter()
        .filter(|p| p.retyped)
        .map(|p| base[p.index].data.len() as i128 - promote::tensor_bytes(p.ty_out, p) as i128)
        .sum();
    let promoted = promote::apply(base, &mut plans, &candidates, &opts.promote, freed);
    Ok(Prepared {
        base,
        adapters,
        plans,
        candidates,
        sampling,
        promoted,
        phases,
    })
}

/// What [`prepare_recode`] does to one tensor.
pub struct Recode<'u> {
    /// Output type; the input's own type copies the bytes unchanged.
    pub ty_out: GgmlType,
    /// `ty_out` replaced a requested type that did not fit the rows (for the report).
    pub fallback: bool,
    /// How its rows are requantized.
    pub requant: Requant<'u>,
}

/// A plan without adapters: each tensor of `base` written as `recode[i]` says (the engine behind
/// `quantize`). Tensors whose type changes are dequantized and quantized again, row block by row
/// block; the others are copied byte for byte. Fails, listing them, if some tensor must change type
/// but cannot be read or written.
pub fn prepare_recode<'a, 'u>(
    base: &'a [InputTensor<'a>],
    recode: Vec<Recode<'u>>,
) -> Result<Prepared<'a, 'u>, EngineError> {
    let mut plans = plan::plan(None, base, &[], MergeType::Keep)?;
    let mut problems = Vec::new();
    for ((p, r), t) in plans.iter_mut().zip(recode).zip(base) {
        p.ty_out = r.ty_out;
        p.fallback = r.fallback;
        p.requant = r.requant;
        if p.is_recoded() {
            problems.extend(plan::recode_problem(&t.name, p));
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::Plan(problems));
    }
    let n = plans.len();
    Ok(Prepared {
        base,
        adapters: &[],
        plans,
        candidates: (0..n).map(|_| Vec::new()).collect(),
        sampling: Vec::new(),
        promoted: vec![false; n],
        phases: Phases::default(),
    })
}

impl Prepared<'_, '_> {
    /// The type each base tensor is written as, in file order.
    pub fn output_types(&self) -> Vec<GgmlType> {
        self.plans.iter().map(|p| p.ty_out).collect()
    }

    /// Whether base tensor `index` is merged (otherwise copied).
    pub fn is_touched(&self, index: usize) -> bool {
        self.plans[index].is_touched()
    }

    /// Streams every tensor, in file order, to `sink(index, bytes)` (called on a writer thread while
    /// the next tensor is computed); `on_done(index, bytes)` reports progress. Returns the report.
    pub fn run<S>(
        self,
        sink: S,
        on_done: &(dyn Fn(usize, u64) + Sync),
    ) -> Result<MergeReport, EngineError>
    where
        S: FnMut(usize, &[u8]) -> Result<(), EngineError> + Send,
    {
        let start = std::time::Instant::now();
        let sums = stream::stream(
            self.base,
            &self.plans,
            &self.sampling,
            sink,
            on_done,
            &self.phases,
        )?;
        let mut candidates = self.candidates;
        if candidates.is_empty() {
            candidates = self
                .plans
                .iter()
                .map(|p| {
                    let sampled = self.sampling.get(p.index).and_then(Option::as_ref);
                    match (sampled, sums.get(p.index).and_then(Option::as_ref)) {
                        // The types are the plan's before promotion; a promotion changes only
                        // the type, so its rows and columns size the candidates alike.
                        (Some(s), Some(t)) => {
                            promote::candidate_reports(p, &s.types, &t.candidates)
                        }
                        _ => Vec::new(),
                    }
                })
                .collect();
        }
        let written: Vec<Option<ErrorSums>> =
            sums.into_iter().map(|s| s.map(|s| s.written)).collect();
        let mut report = report::build(
            self.base,
            self.adapters,
            &self.plans,
            &written,
            candidates,
            &self.promoted,
        );
        report.summary.seconds = report::Seconds::from_phases(&self.phases, start.elapsed());
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
