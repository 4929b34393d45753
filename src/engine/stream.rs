//! The per-tensor work and the streaming loop.
//!
//! A recoded tensor (touched by an adapter, or changing type as in `quantize`) is processed in blocks
//! of whole rows, in parallel (rayon): dequantize the block, add each update in f32 (if any),
//! requantize once to the output type (by the plan's [`Requant`] strategy), and measure on the
//! spot how far the quantized rows are from the exact f32 values. Only the block being worked on
//! exists in f32, never the whole tensor; an adapter's factors are read once per tensor. Tensors go to the writer strictly in file order through a bounded channel, so
//! while the writer thread copies or writes one tensor the next is being computed, and peak memory is
//! a few output tensors, never the model.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use rayon::prelude::*;

use crate::quant::GgmlType;

use super::codec::{self, row_bytes};
use super::kernel::add_low_rank;
use super::plan::TensorPlan;
use super::preserve::InputStats;
use super::requant::{Requant, RowBlock};
use super::{EngineError, InputTensor, LowRankShape, Update};
use crate::adapter::LowRank;

/// f32 values per row block: a block of dequantized rows plus its copy stay in L2.
pub(super) const BLOCK_ELEMS: usize = 32 * 1024;
/// Tensors in flight between the compute loop and the writer.
const WINDOW: usize = 2;

/// CPU time spent in each phase of the merge, summed over threads (nanoseconds), and the writer
/// thread's busy time: where a merge's time goes.
#[derive(Debug, Default)]
pub struct Phases {
    pub sample: AtomicU64,
    pub dequantize: AtomicU64,
    pub delta: AtomicU64,
    pub requantize: AtomicU64,
    pub measure: AtomicU64,
    pub write: AtomicU64,
}

/// Adds the time since `start` to `counter`; returns now.
fn lap(counter: &AtomicU64, start: Instant) -> Instant {
    let now = Instant::now();
    counter.fetch_add((now - start).as_nanos() as u64, Ordering::Relaxed);
    now
}

/// How a requantization compares with the exact merge in one space (the weights, or the tensor's
/// outputs on held-out calibration tokens): with `d` the adapter's change (exact − base) and `e`
/// the requantization's error (requantized − exact), `Σd²`, `Σe²` and `Σ(d + e)·d`, the change
/// written projected on the adapter's.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeptSums {
    pub sq_delta: f64,
    pub sq_noise: f64,
    pub dot_kept: f64,
}

impl KeptSums {
    pub fn add(self, o: KeptSums) -> KeptSums {
        KeptSums {
            sq_delta: self.sq_delta + o.sq_delta,
            sq_noise: self.sq_noise + o.sq_noise,
            dot_kept: self.dot_kept + o.dot_kept,
        }
    }

    /// The same sums for `factor` times as many values alike (a sample scaled to its tensor).
    pub fn scaled(self, factor: f64) -> KeptSums {
        KeptSums {
            sq_delta: self.sq_delta * factor,
            sq_noise: self.sq_noise * factor,
            dot_kept: self.dot_kept * factor,
        }
    }

    /// The sums of one row in weight space, straight from its requantized values `q`, exact values
    /// `x` and base values `b` (`d = x − b`, `e = q − x`), added to these.
    fn push_row(&mut self, q: &[f32], x: &[f32], b: &[f32]) {
        *self = self.add(row_sums(q, x, b));
    }

    fn push(&mut self, d: &[f32], e: &[f32]) {
        for (&d, &e) in d.iter().zip(e) {
            let (d, e) = (d as f64, e as f64);
            self.sq_delta += d * d;
            self.sq_noise += e * e;
            self.dot_kept += (d + e) * d;
        }
    }

    /// The share of the adapter's change the requantized tensor keeps, `⟨q − w, Δ⟩/‖Δ‖²` (1: all
    /// of it, 0: none); `None` when the delta is zero.
    pub fn share_kept(&self) -> Option<f64> {
        (self.sq_delta > 0.0).then(|| self.dot_kept / self.sq_delta)
    }

    /// `‖q − w′‖/‖Δ‖`: everything the requantization got wrong (lost signal and added noise),
    /// relative to the adapter's change; `None` when the delta is zero.
    pub fn noise(&self) -> Option<f64> {
        (self.sq_delta > 0.0).then(|| (self.sq_noise / self.sq_delta).sqrt())
    }
}

/// Values summed in f32 lanes before the lanes go into the f64 total: short enough that the f32
/// partial sums stay exact to a few ulps, long enough that the f64 work is a small part.
const SUM_CHUNK: usize = 256;
/// f32 lanes of the partial sums (one AVX-512 vector, two AVX vectors).
const SUM_LANES: usize = 16;

crate::quant::simd::simd_dispatch! {
    /// [`KeptSums`] of one row (see [`KeptSums::push_row`]), vectorized: the sums run in f32 lanes
    /// over chunks of [`SUM_CHUNK`] values and each chunk's lanes are added in f64, where a serial
    /// f64 sum would wait on its own additions.
    fn row_sums<L>(q: &[f32], x: &[f32], b: &[f32]) -> KeptSums {
        row_sums_portable(q, x, b)
    }
}

#[inline(always)]
fn row_sums_portable(q: &[f32], x: &[f32], b: &[f32]) -> KeptSums {
    let mut total = KeptSums::default();
    let chunks = q
        .chunks(SUM_CHUNK)
        .zip(x.chunks(SUM_CHUNK))
        .zip(b.chunks(SUM_CHUNK));
    for ((q, x), b) in chunks {
        let (mut sd, mut sn, mut sk) = ([0f32; SUM_LANES], [0f32; SUM_LANES], [0f32; SUM_LANES]);
        let full = q.len() / SUM_LANES * SUM_LANES;
        let lanes = q[..full]
            .chunks_exact(SUM_LANES)
            .zip(x[..full].chunks_exact(SUM_LANES))
            .zip(b[..full].chunks_exact(SUM_LANES));
        for ((q, x), b) in lanes {
            for j in 0..SUM_LANES {
                let (d, e) = (x[j] - b[j], q[j] - x[j]);
                sd[j] += d * d;
                sn[j] += e * e;
                sk[j] += (d + e) * d;
            }
        }
        for j in 0..SUM_LANES {
            total.sq_delta += sd[j] as f64;
            total.sq_noise += sn[j] as f64;
            total.dot_kept += sk[j] as f64;
        }
        for j in full..q.len() {
            let (d, e) = ((x[j] - b[j]) as f64, (q[j] - x[j]) as f64);
            total.sq_delta += d * d;
            total.sq_noise += e * e;
            total.dot_kept += (d + e) * d;
        }
    }
    total
}

/// A tensor's fidelity sums: in weight space always, in output space when the requantization had
/// calibration inputs (zero otherwise), for the method used and, when that was not plain rounding,
/// for round-to-nearest on the same rows (side by side in the report).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorSums {
    pub n: u64,
    pub weights: KeptSums,
    pub outputs: KeptSums,
    pub nearest_weights: Option<KeptSums>,
    pub nearest_outputs: Option<KeptSums>,
}

pub fn add_opt(a: Option<KeptSums>, b: Option<KeptSums>) -> Option<KeptSums> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.add(b)),
        (a, b) => a.or(b),
    }
}

impl ErrorSums {
    fn add(self, o: ErrorSums) -> ErrorSums {
        ErrorSums {
            n: self.n + o.n,
            weights: self.weights.add(o.weights),
            outputs: self.outputs.add(o.outputs),
            nearest_weights: add_opt(self.nearest_weights, o.nearest_weights),
            nearest_outputs: add_opt(self.nearest_outputs, o.nearest_outputs),
        }
    }

    pub fn rms_requant(&self) -> f64 {
        (self.weights.sq_noise / self.n.max(1) as f64).sqrt()
    }

    pub fn rms_delta(&self) -> f64 {
        (self.weights.sq_delta / self.n.max(1) as f64).sqrt()
    }

    /// RMS(requantized − exact) / RMS(delta); `None` when the delta is zero.
    pub fn relative(&self) -> Option<f64> {
        self.weights.noise()
    }

    /// The space the report speaks in: outputs when measured there, else weights.
    pub fn in_outputs(&self) -> bool {
        self.outputs.sq_delta > 0.0
    }

    /// The sums the report leads with (outputs when measured, else weights), and plain
    /// rounding's in the same space when it was measured beside.
    pub fn headline(&self) -> (KeptSums, Option<KeptSums>) {
        if self.in_outputs() {
            (self.outputs, self.nearest_outputs)
        } else {
            (self.weights, self.nearest_weights)
        }
    }
}

/// A worker thread's working memory, reused from one row block to the next and from one tensor to
/// the next (see [`with_buffers`]).
#[derive(Default)]
struct Buffers {
    base: Vec<f32>,
    merged: Vec<f32>,
    back: Vec<f32>,
    out: Vec<u8>,
    measure: MeasureBuffers,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Buffers> = std::cell::Cell::new(Buffers::default());
}

/// Runs `f` with this thread's [`Buffers`]. Kept per thread rather than per rayon task: a task's
/// buffers would be allocated, and zero-filled as they grow, for each of the many tasks a tensor is
/// split into. The buffers are taken out for the call, so a nested call on the same thread (were
/// rayon to run another task inside `f`) gets fresh ones instead of a double borrow.
fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    let mut b = BUFFERS.take();
    let r = f(&mut b);
    BUFFERS.set(b);
    r
}

/// Scratch for measuring one row: its change, its error and their outputs on held-out tokens.
#[derive(Default)]
struct MeasureBuffers {
    d: Vec<f32>,
    e: Vec<f32>,
    pd: Vec<f32>,
    pe: Vec<f32>,
    near_bytes: Vec<u8>,
    near_back: Vec<f32>,
}

/// One planned op with its values read: what the row loop applies.
enum LoadedOp<'p> {
    LowRank { scale: f32, lr: Cow<'p, LowRank> },
    Replace(Cow<'p, [f32]>),
    Add { scale: f32, values: Cow<'p, [f32]> },
}

/// Reads the values of every op of `p` once (an adapter's factors are read from its file now, not
/// before), checked against the shapes the plan checked so that the row loop can slice them.
fn load_ops<'p>(p: &'p TensorPlan<'_>, name: &str) -> Result<Vec<LoadedOp<'p>>, EngineError> {
    let mismatch = |got: String, want: String| EngineError::UpdateShape {
        tensor: name.to_string(),
        got,
        want,
    };
    p.ops
        .iter()
        .map(|op| {
            Ok(match op.update {
                Update::LowRank { shape, values, .. } => {
                    let lr = values.get()?;
                    let got = LowRankShape::of(&lr);
                    if got != *shape {
                        return Err(mismatch(got.to_string(), shape.to_string()));
                    }
                    LoadedOp::LowRank {
                        scale: op.scale,
                        lr,
                    }
                }
                Update::Replace { len, values } => {
                    let v = values.get()?;
                    if v.len() != *len {
                        return Err(mismatch(v.len().to_string(), len.to_string()));
                    }
                    LoadedOp::Replace(v)
                }
                Update::Add { len, values } => {
                    let v = values.get()?;
                    if v.len() != *len {
                        return Err(mismatch(v.len().to_string(), len.to_string()));
                    }
                    LoadedOp::Add {
                        scale: op.scale,
                        values: v,
                    }
                }
            })
        })
        .collect()
}

/// Rows `r0..r0 + rows` of the base (dequantized) and of the exact f32 merge; `merged` is left
/// empty when no adapter touches the tensor (the base rows are then the exact values: see [`exact`]).
fn merged_rows(
    p: &TensorPlan<'_>,
    ops: &[LoadedOp<'_>],
    data: &[u8],
    r0: usize,
    rows: usize,
    bufs: &mut Buffers,
    phases: &Phases,
) -> Result<(), EngineError> {
    let Buffers { base, merged, .. } = bufs;
    let t = Instant::now();
    let n = p.n_cols;
    let in_row = row_bytes(p.ty_in, n)?;
    base.resize(rows * n, 0.0);
    codec::dequantize(p.ty_in, &data[r0 * in_row..(r0 + rows) * in_row], base, n)?;
    let t = lap(&phases.dequantize, t);
    merged.clear();
    if !p.is_touched() {
        return Ok(());
    }
    merged.extend_from_slice(base);
    for op in ops {
        match op {
            LoadedOp::LowRank { scale, lr } => {
                let r = lr.rank;
                // Stacked experts: each run of rows inside one expert uses that expert's A block.
                // The kernel sums each element's update over the rank before adding it, as in
                // W + s·(B·A).
                let per_expert = p.n_rows / lr.n_expert;
                let mut i = r0;
                while i < r0 + rows {
                    let e = i / per_expert;
                    let end = ((e + 1) * per_expert).min(r0 + rows);
                    add_low_rank(
                        &mut merged[(i - r0) * n..(end - r0) * n],
                        &lr.b[i * r..end * r],
                        &lr.a[e * r * n..(e + 1) * r * n],
                        n,
                        r,
                        *scale,
                    );
                    i = end;
                }
                if let Some(mag) = &lr.magnitude {
                    // DoRA (PEFT `dora.py`): W' = m / ‖W + s·B·A‖_row · (W + s·B·A).
                    for (i, row) in merged.chunks_mut(n).enumerate() {
                        let norm = row
                            .iter()
                            .map(|&v| (v as f64) * (v as f64))
                            .sum::<f64>()
                            .sqrt();
                        let f = (mag[r0 + i] as f64 / norm) as f32;
                        for v in row.iter_mut() {
                            *v *= f;
                        }
                    }
                }
            }
            LoadedOp::Replace(values) => {
                merged.copy_from_slice(&values[r0 * n..(r0 + rows) * n]);
            }
            LoadedOp::Add { scale, values } => {
                for (m, v) in merged.iter_mut().zip(&values[r0 * n..(r0 + rows) * n]) {
                    *m += scale * v;
                }
            }
        }
    }
    lap(&phases.delta, t);
    Ok(())
}

/// The exact values to write: the merge, or the base rows themselves when nothing is added.
fn exact<'b>(p: &TensorPlan<'_>, base: &'b [f32], merged: &'b [f32]) -> &'b [f32] {
    if p.is_touched() {
        merged
    } else {
        base
    }
}

/// Requantizes `rows` into `out` as `ty` with `requant`, and returns the fidelity sums against the
/// exact values and the base (and, for a method other than plain rounding when `beside_nearest`,
/// plain rounding's: the report shows them side by side for the type written, not for candidates).
#[allow(clippy::too_many_arguments)]
fn requantize_and_measure(
    ty: GgmlType,
    requant: &Requant<'_>,
    rows: &RowBlock<'_>,
    out: &mut [u8],
    back: &mut Vec<f32>,
    m: &mut MeasureBuffers,
    phases: &Phases,
    beside_nearest: bool,
) -> Result<ErrorSums, EngineError> {
    let t = Instant::now();
    requant.encode(ty, rows, out)?;
    let t = lap(&phases.requantize, t);
    back.resize(rows.exact.len(), 0.0);
    codec::dequantize(ty, out, back, rows.n_cols)?;
    let runs = requant.runs(rows);
    let (weights, outputs) = fidelity_by_runs(rows, back, &runs, m, false);
    let mut s = ErrorSums {
        n: rows.exact.len() as u64,
        weights,
        outputs: outputs.unwrap_or_default(),
        ..Default::default()
    };
    if beside_nearest && !matches!(requant, Requant::Nearest { .. }) {
        let mut near_bytes = std::mem::take(&mut m.near_bytes);
        let mut near_back = std::mem::take(&mut m.near_back);
        near_bytes.resize(out.len(), 0);
        near_back.resize(rows.exact.len(), 0.0);
        Requant::default().encode(ty, rows, &mut near_bytes)?;
        codec::dequantize(ty, &near_bytes, &mut near_back, rows.n_cols)?;
        // One run's projection of the change is still in `m.pd`; several runs' are not.
        let (nw, no) = fidelity_by_runs(rows, &near_back, &runs, m, runs.len() == 1);
        s.nearest_weights = Some(nw);
        s.nearest_outputs = no;
        m.near_bytes = near_bytes;
        m.near_back = near_back;
    }
    lap(&phases.measure, t);
    Ok(s)
}

/// [`fidelity`] of each run of rows that shares statistics (a stacked tensor's experts each have
/// their own), summed; the output-space sums are `None` when no run has statistics (rows without
/// any are measured in weight space only).
fn fidelity_by_runs(
    rows: &RowBlock<'_>,
    back: &[f32],
    runs: &[(std::ops::Range<usize>, Option<&InputStats>)],
    m: &mut MeasureBuffers,
    delta_projected: bool,
) -> (KeptSums, Option<KeptSums>) {
    let n = rows.n_cols;
    let (mut weights, mut outputs) = (KeptSums::default(), None::<KeptSums>);
    for (run, stats) in runs {
        let stats = stats.filter(|s| s.t_eval > 0);
        let (w, o) = fidelity(
            &rows.rows(run.clone()),
            &back[run.start * n..run.end * n],
            stats,
            m,
            delta_projected,
        );
        weights = weights.add(w);
        if stats.is_some() {
            outputs = Some(outputs.unwrap_or_default().add(o));
        }
    }
    (weights, outputs)
}

/// Weight- and output-space sums of the requantized rows `back` against `rows` (output space only
/// with `stats`: the rows' change and error mapped through the held-out calibration tokens).
/// `delta_projected`: `m.pd` already holds the change's projection for these rows (it does not
/// depend on the requantization).
fn fidelity(
    rows: &RowBlock<'_>,
    back: &[f32],
    stats: Option<&InputStats>,
    m: &mut MeasureBuffers,
    delta_projected: bool,
) -> (KeptSums, KeptSums) {
    let n = rows.n_cols;
    let (mut weights, mut outputs) = (KeptSums::default(), KeptSums::default());
    for ((q, x), b) in back
        .chunks_exact(n)
        .zip(rows.exact.chunks_exact(n))
        .zip(rows.base.chunks_exact(n))
    {
        weights.push_row(q, x, b);
    }
    if let Some(st) = stats {
        let len = rows.exact.len();
        let projected = len / n.max(1) * st.t_eval;
        if !delta_projected {
            m.d.clear();
            m.d.extend(rows.exact.iter().zip(rows.base).map(|(x, b)| x - b));
            m.pd.resize(projected, 0.0);
            st.project_eval(&m.d, &mut m.pd);
        }
        m.e.clear();
        m.e.extend(back.iter().zip(rows.exact).map(|(q, x)| q - x));
        m.pe.resize(projected, 0.0);
        st.project_eval(&m.e, &mut m.pe);
        outputs.push(&m.pd, &m.pe);
    }
    (weights, outputs)
}

/// Candidate types a tensor is tried as while it is merged, on sampled runs of its rows (for the
/// report; `--promote auto`, which must choose before writing, tries them in a pass before the
/// stream instead): the rows are merged for the stream anyway, so trying a type costs its
/// requantization only. The type the tensor is written as is measured on every row.
pub struct Sampling {
    pub types: Vec<GgmlType>,
    pub runs: Vec<(usize, usize)>,
}

/// What the stream measured of one recoded tensor: the type written, on every row, and each
/// candidate type of its [`Sampling`] (in its order; empty without one).
#[derive(Clone, Debug, Default)]
pub struct TensorSums {
    pub written: ErrorSums,
    pub candidates: Vec<ErrorSums>,
}

impl TensorSums {
    fn add(self, o: TensorSums) -> TensorSums {
        let candidates = if self.candidates.is_empty() {
            o.candidates
        } else if o.candidates.is_empty() {
            self.candidates
        } else {
            self.candidates
                .into_iter()
                .zip(o.candidates)
                .map(|(a, b)| a.add(b))
                .collect()
        };
        TensorSums {
            written: self.written.add(o.written),
            candidates,
        }
    }
}

/// Recodes one tensor (merge and/or type change): its bytes in `p.ty_out` and its error sums,
/// with the candidate types of `sampling` tried on the way.
/// The bytes are written into `out` (a spare buffer, or empty), whatever it held.
pub fn merge_tensor(
    p: &TensorPlan<'_>,
    name: &str,
    data: &[u8],
    mut out: Vec<u8>,
    phases: &Phases,
    sampling: Option<&Sampling>,
) -> Result<(Vec<u8>, TensorSums), EngineError> {
    let ops = load_ops(p, name)?;
    let n = p.n_cols;
    let out_row = row_bytes(p.ty_out, n)?;
    let in_row = row_bytes(p.ty_in, n)?;
    let rows_per_block = (BLOCK_ELEMS / n.max(1)).max(p.requant.rows_together());
    out.clear();
    out.resize(p.n_rows * out_row, 0);
    let mut sums = out
        .par_chunks_mut(rows_per_block * out_row)
        .enumerate()
        .map(|(bi, chunk)| {
            with_buffers(|b| -> Result<TensorSums, EngineError> {
                let r0 = bi * rows_per_block;
                let rows = chunk.len() / out_row;
                merged_rows(p, &ops, data, r0, rows, b, phases)?;
                let Buffers {
                    base,
                    merged,
                    back,
                    out: scratch,
                    measure,
                } = b;
                let block = RowBlock {
                    exact: exact(p, base, merged),
                    base,
                    r0,
                    n_cols: n,
                    base_bytes: (p.ty_in == p.ty_out)
                        .then(|| &data[r0 * in_row..(r0 + rows) * in_row]),
                };
                let written = requantize_and_measure(
                    p.ty_out, &p.requant, &block, chunk, back, measure, phases, true,
                )?;
                let Some(sampling) = sampling else {
                    return Ok(TensorSums {
                        written,
                        candidates: Vec::new(),
                    });
                };
                let mut candidates = vec![ErrorSums::default(); sampling.types.len()];
                // Candidates' time is `sample`'s, not the merge's own phases'.
                let discard = Phases::default();
                // The sampled rows in this block: rows are requantized independently of the rows
                // beside them, so a run split between blocks measures as it would whole.
                for &(s0, len) in &sampling.runs {
                    let (a, z) = (s0.max(r0), (s0 + len).min(r0 + rows));
                    if a >= z {
                        continue;
                    }
                    let span = (a - r0) * n..(z - r0) * n;
                    for (sums, &ty) in candidates.iter_mut().zip(&sampling.types) {
                        if ty == p.ty_out {
                            continue;
                        }
                        let rows = RowBlock {
                            exact: &block.exact[span.clone()],
                            base: &block.base[span.clone()],
                            r0: a,
                            n_cols: n,
                            base_bytes: (ty == p.ty_in).then(|| &data[a * in_row..z * in_row]),
                        };
                        scratch.resize(row_bytes(ty, n)? * (z - a), 0);
                        let t = Instant::now();
                        let s = requantize_and_measure(
                            ty, &p.requant, &rows, scratch, back, measure, &discard, false,
                        )?;
                        lap(&phases.sample, t);
                        *sums = sums.add(s);
                    }
                }
                Ok(TensorSums {
                    written,
                    candidates,
                })
            })
        })
        .try_reduce(TensorSums::default, |a, b| Ok(a.add(b)))?;
    if let Some(sampling) = sampling {
        // The written type is measured on every row.
        sums.candidates
            .resize(sampling.types.len(), ErrorSums::default());
        for (c, &ty) in sums.candidates.iter_mut().zip(&sampling.types) {
            if ty == p.ty_out {
                *c = sums.written;
            }
        }
    }
    Ok((out, sums))
}

/// The rows candidate types are tried on, as `(first row, rows)`: about `count` rows spread evenly
/// over the tensor (all rows if fewer) in runs of `run` consecutive rows, the rows its
/// requantization encodes together ([`Requant::rows_together`]), so that a sampled row costs what
/// it costs in the stream.
pub fn sample_runs(n_rows: usize, count: usize, run: usize) -> Vec<(usize, usize)> {
    let run = run.clamp(1, count.max(1));
    if n_rows <= count {
        return (0..n_rows)
            .step_by(run)
            .map(|r| (r, run.min(n_rows - r)))
            .collect();
    }
    let n_runs = count.div_ceil(run);
    (0..n_runs)
        .map(|i| {
            let start = i * n_rows / n_runs;
            (start, run.min(n_rows - start))
        })
        .collect()
}

/// Error sums of writing this tensor as each of `types`, measured on the sampled runs of rows only.
pub fn sample_errors(
    p: &TensorPlan<'_>,
    name: &str,
    data: &[u8],
    runs: &[(usize, usize)],
    types: &[GgmlType],
    phases: &Phases,
) -> Result<Vec<ErrorSums>, EngineError> {
    let ops = load_ops(p, name)?;
    let n = p.n_cols;
    let discard = Phases::default();
    let per_run: Vec<Vec<ErrorSums>> = runs
        .par_iter()
        .map(|&(r0, rows)| {
            let start = Instant::now();
            let sums = with_buffers(|b| {
                merged_rows(p, &ops, data, r0, rows, b, &discard)?;
                let Buffers {
                    base,
                    merged,
                    back,
                    out,
                    measure,
                    ..
                } = b;
                let in_row = row_bytes(p.ty_in, n)?;
                types
                    .iter()
                    .map(|&ty| {
                        let block = RowBlock {
                            exact: exact(p, base, merged),
                            base,
                            r0,
                            n_cols: n,
                            base_bytes: (ty == p.ty_in)
                                .then(|| &data[r0 * in_row..(r0 + rows) * in_row]),
                        };
                        out.resize(row_bytes(ty, n)? * rows, 0);
                        requantize_and_measure(
                            ty, &p.requant, &block, out, back, measure, &discard, false,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
            lap(&phases.sample, start);
            sums
        })
        .collect::<Result<_, _>>()?;
    let mut total = vec![ErrorSums::default(); types.len()];
    for run in per_run {
        for (t, s) in total.iter_mut().zip(run) {
            *t = t.add(s);
        }
    }
    Ok(total)
}

/// Bytes handed to the writer: a base tensor's own bytes (copied) or a recoded tensor.
pub enum Chunk<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Chunk<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Borrowed(b) => b,
            Chunk::Owned(v) => v,
        }
    }
}

/// The spare buffer that fits `len` bytes most closely (else the largest, to grow), or a new one.
/// Every buffer is in flight or spare, so there are never more than the tensors in flight.
fn take_spare(spares: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    let fit = (0..spares.len())
        .filter(|&i| spares[i].capacity() >= len)
        .min_by_key(|&i| spares[i].capacity())
        .or_else(|| (0..spares.len()).max_by_key(|&i| spares[i].capacity()));
    fit.map_or_else(Vec::new, |i| spares.swap_remove(i))
}

/// Runs every tensor through `plans` in order and hands the bytes to `sink` (on a writer thread) in
/// the same order; `on_done(index, bytes)` is called as each tensor is handed over (progress).
/// `sampling[index]` (empty: none) are the candidate types tried on the way. Returns the sums of
/// each recoded tensor, by index.
pub fn stream<'a, S>(
    base: &[InputTensor<'a>],
    plans: &[TensorPlan<'_>],
    sampling: &[Option<Sampling>],
    mut sink: S,
    on_done: &(dyn Fn(usize, u64) + Sync),
    phases: &Phases,
) -> Result<Vec<Option<TensorSums>>, EngineError>
where
    S: FnMut(usize, &[u8]) -> Result<(), EngineError> + Send,
{
    let (tx, rx) = mpsc::sync_channel::<(usize, Chunk<'a>)>(WINDOW);
    // Written tensors' buffers come back to be filled again: a fresh buffer is fresh pages, each
    // faulted in and zeroed by the kernel, for every byte the merge writes.
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), EngineError> {
            for (index, chunk) in rx {
                let t = Instant::now();
                sink(index, chunk.bytes())?;
                lap(&phases.write, t);
                if let Chunk::Owned(v) = chunk {
                    let _ = spare_tx.send(v); // the loop below may have stopped: nothing to reuse
                }
            }
            Ok(())
        });
        let mut sums = vec![None; plans.len()];
        let mut result = Ok(());
        let mut spares = Vec::new();
        for p in plans {
            let t = &base[p.index];
            let chunk = if p.is_recoded() {
                spares.extend(spare_rx.try_iter());
                let len = row_bytes(p.ty_out, p.n_cols).map_or(0, |r| r * p.n_rows);
                let buffer = take_spare(&mut spares, len);
                let sampled = sampling.get(p.index).and_then(Option::as_ref);
                match merge_tensor(p, &t.name, t.data, buffer, phases, sampled) {
                    Ok((bytes, s)) => {
                        sums[p.index] = Some(s);
                        Chunk::Owned(bytes)
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            } else {
                Chunk::Borrowed(t.data)
            };
            let len = chunk.bytes().len() as u64;
            if tx.send((p.index, chunk)).is_err() {
                break; // the writer stopped: its error is reported below
            }
            on_done(p.index, len);
        }
        drop(tx);
        let written = writer.join().unwrap_or(Err(EngineError::WriterPanicked));
        result.and(written).map(|()| sums)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::simd::{with_level, SimdLevel};

    /// The row sums in plain f64, one value at a time.
    fn sums_f64(q: &[f32], x: &[f32], b: &[f32]) -> KeptSums {
        let mut s = KeptSums::default();
        for i in 0..q.len() {
            let (d, e) = ((x[i] - b[i]) as f64, (q[i] - x[i]) as f64);
            s.sq_delta += d * d;
            s.sq_noise += e * e;
            s.dot_kept += (d + e) * d;
        }
        s
    }

    /// The vectorized sums agree with plain f64 to f32 accuracy at every row length (full chunks,
    /// partial chunks, lane tails), and every SIMD level gives the same bits.
    #[test]
    fn row_sums_match_f64_at_every_level() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for n in [1, 15, 16, 17, 255, 256, 257, 2048, 11008 + 5] {
            // A trained adapter's change is a few percent of the weight; the error near one step.
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let x: Vec<f32> = b.iter().map(|&v| v + 0.02 * next()).collect();
            let q: Vec<f32> = x.iter().map(|&v| v + 0.05 * next()).collect();
            let want = sums_f64(&q, &x, &b);
            let portable = with_level(SimdLevel::Portable, || row_sums(&q, &x, &b));
            for (got, want) in [
                (portable.sq_delta, want.sq_delta),
                (portable.sq_noise, want.sq_noise),
                (portable.dot_kept, want.dot_kept),
            ] {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1e-12),
                    "n {n}: {got} against {want}"
                );
            }
            for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
                let got = with_level(level, || row_sums(&q, &x, &b));
                assert_eq!(
                    [got.sq_delta, got.sq_noise, got.dot_kept].map(f64::to_bits),
                    [portable.sq_delta, portable.sq_noise, portable.dot_kept].map(f64::to_bits),
                    "n {n} at {}",
                    level.name()
                );
            }
        }
    }

    /// A spare buffer is reused when one fits, the closest fit first, and grown from the largest
    /// otherwise.
    #[test]
    fn take_spare_prefers_the_closest_fit() {
        let mut spares = vec![Vec::with_capacity(100), Vec::with_capacity(40), Vec::new()];
        assert_eq!(take_spare(&mut spares, 30).capacity(), 40);
        assert_eq!(take_spare(&mut spares, 500).capacity(), 100);
        assert_eq!(take_spare(&mut spares, 0).capacity(), 0);
        assert!(take_spare(&mut spares, 10).capacity() == 0 && spares.is_empty());
    }
}
