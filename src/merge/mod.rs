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

mod codec;
mod engine;
pub mod file;
pub mod inputs;
mod kernel;
mod plan;
mod promote;
mod report;
pub mod types;

use crate::quant::GgmlType;

pub use engine::{ErrorSums, Phases};
pub use plan::matrix_shape;
pub use report::{CandidateReport, MergeReport, Summary, TensorReport, TypeOption, TypeSummary};

/// One base tensor as the merge reads it: zero-copy bytes straight from the mapped file.
pub struct BaseTensor<'a> {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: &'a [u8],
}

/// `delta = B·A` for one base tensor, in the base tensor's own row-major terms (rows = output
/// features, `n_cols = dims[0]`). Token-embedding adapters, stored transposed in GGUF, are turned
/// into this form by the reader, so one kernel serves all.
pub struct LowRank {
    /// `rank × n_cols`, row-major.
    pub a: Vec<f32>,
    /// `n_rows × rank`, row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    /// Stacked experts (`ffn_*_exps`): `a` holds one `rank × n_cols` block per expert and the rows of
    /// `b` follow the base's rows (expert-major). 1 for a plain matrix.
    pub n_expert: usize,
    /// The adapter's own effective scale (alpha/rank, or 1 when alpha is absent), without the user's.
    pub scale: f32,
    /// DoRA magnitude per output row; `None` for plain LoRA.
    pub magnitude: Option<Vec<f32>>,
}

/// What one adapter does to one base tensor.
pub enum Update {
    LowRank(LowRank),
    /// `modules_to_save`: the tensor is replaced by these values (`n_rows × n_cols`).
    Replace(Vec<f32>),
    /// LoRA bias: these values (× the user scale) are added.
    Add(Vec<f32>),
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

/// `--outtype`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OutType {
    /// Each merged tensor in its own base type.
    Keep,
    Type(GgmlType),
}

/// `--promote`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Promote {
    None,
    /// Every touched tensor to this type (with fallbacks), unless its planned type is already larger.
    Type(GgmlType),
    /// Touched tensors of the first type to the second (with fallbacks), e.g. only Q4_K → Q6_K.
    Map(&'static [(GgmlType, GgmlType)]),
    /// Per tensor, the promotions that buy the most fidelity per extra byte, until the output has
    /// grown by `budget` (a fraction: 0.05 = 5%) over the base.
    Auto {
        budget: f64,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct MergeOptions {
    pub outtype: OutType,
    pub promote: Promote,
    /// Rows per tensor on which candidate types are tried (for promotion and the report).
    pub sample_rows: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            outtype: OutType::Keep,
            promote: Promote::None,
            sample_rows: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The inputs do not fit together; one line per offending tensor or adapter.
    #[error("cannot merge:\n  {}", .0.join("\n  "))]
    Plan(Vec<String>),
    #[error("{0}")]
    Codec(String),
    /// An adapter cannot be read or applied.
    #[error("{0}")]
    Adapter(String),
    /// The sink (writer) failed.
    #[error("{0}")]
    Write(String),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

/// A checked plan with its output types chosen: what the writer needs to lay out the file.
pub struct Prepared<'a, 'u> {
    base: &'a [BaseTensor<'a>],
    adapters: &'u [AdapterInput],
    plans: Vec<plan::TensorPlan<'u>>,
    candidates: Vec<Vec<CandidateReport>>,
    promoted: Vec<bool>,
    phases: Phases,
}

/// Checks the inputs, plans the merge and chooses promotions. Nothing is written.
pub fn prepare<'a, 'u>(
    base_arch: Option<&str>,
    base: &'a [BaseTensor<'a>],
    adapters: &'u [AdapterInput],
    opts: &MergeOptions,
) -> Result<Prepared<'a, 'u>, MergeError> {
    let mut plans = plan::plan(base_arch, base, adapters, opts.outtype)?;
    let phases = Phases::default();
    let start = std::time::Instant::now();
    let candidates = promote::measure_candidates(base, &plans, opts)?;
    phases.sample.store(
        start.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let promoted = promote::apply(base, &mut plans, &candidates, opts.promote);
    Ok(Prepared {
        base,
        adapters,
        plans,
        candidates,
        promoted,
        phases,
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
    ) -> Result<MergeReport, MergeError>
    where
        S: FnMut(usize, &[u8]) -> Result<(), MergeError> + Send,
    {
        let start = std::time::Instant::now();
        let sums = engine::stream(self.base, &self.plans, sink, on_done, &self.phases)?;
        let mut report = report::build(
            self.base,
            self.adapters,
            &self.plans,
            &sums,
            self.candidates,
            &self.promoted,
        );
        report.summary.seconds = report::Seconds::from_phases(&self.phases, start.elapsed());
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
