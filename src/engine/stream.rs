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
const BLOCK_ELEMS: usize = 32 * 1024;
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

/// Per-task working memory, reused from one row block to the next.
#[derive(Default)]
struct Buffers {
    base: Vec<f32>,
    merged: Vec<f32>,
    scratch: Vec<f32>,
    back: Vec<f32>,
    out: Vec<u8>,
    measure: MeasureBuffers,
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
    let Buffers {
        base,
        merged,
        scratch,
        ..
    } = bufs;
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
                // The update goes into its own buffer first so that, as in W + s·(B·A), the delta is
                // summed over the rank before it meets the (much larger) weight.
                scratch.clear();
                scratch.resize(rows * n, 0.0);
                // Stacked experts: each run of rows inside one expert uses that expert's A block.
                let per_expert = p.n_rows / lr.n_expert;
                let mut i = r0;
                while i < r0 + rows {
                    let e = i / per_expert;
                    let end = ((e + 1) * per_expert).min(r0 + rows);
                    add_low_rank(
                        &mut scratch[(i - r0) * n..(end - r0) * n],
                        &lr.b[i * r..end * r],
                        &lr.a[e * r * n..(e + 1) * r * n],
                        n,
                        r,
                        *scale,
                    );
                    i = end;
                }
                for (m, d) in merged.iter_mut().zip(scratch.iter()) {
                    *m += d;
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
/// exact values and the base (and, for a method other than plain rounding, plain rounding's).
fn requantize_and_measure(
    ty: GgmlType,
    requant: &Requant<'_>,
    rows: &RowBlock<'_>,
    out: &mut [u8],
    back: &mut Vec<f32>,
    m: &mut MeasureBuffers,
    phases: &Phases,
) -> Result<ErrorSums, EngineError> {
    let t = Instant::now();
    requant.encode(ty, rows, out)?;
    let t = lap(&phases.requantize, t);
    back.resize(rows.exact.len(), 0.0);
    codec::dequantize(ty, out, back, rows.n_cols)?;
    let stats = requant
        .stats()
        .filter(|s| s.n_cols == rows.n_cols && s.t_eval > 0);
    let (weights, outputs) = fidelity(rows, back, stats, m);
    let mut s = ErrorSums {
        n: rows.exact.len() as u64,
        weights,
        outputs,
        ..Default::default()
    };
    if !matches!(requant, Requant::Nearest { .. }) {
        let mut near_bytes = std::mem::take(&mut m.near_bytes);
        let mut near_back = std::mem::take(&mut m.near_back);
        near_bytes.resize(out.len(), 0);
        near_back.resize(rows.exact.len(), 0.0);
        Requant::default().encode(ty, rows, &mut near_bytes)?;
        codec::dequantize(ty, &near_bytes, &mut near_back, rows.n_cols)?;
        let (w, o) = fidelity(rows, &near_back, stats, m);
        s.nearest_weights = Some(w);
        s.nearest_outputs = stats.map(|_| o);
        m.near_bytes = near_bytes;
        m.near_back = near_back;
    }
    lap(&phases.measure, t);
    Ok(s)
}

/// Weight- and output-space sums of the requantized rows `back` against `rows` (output space only
/// with `stats`: each row's change and error mapped through the held-out calibration tokens).
fn fidelity(
    rows: &RowBlock<'_>,
    back: &[f32],
    stats: Option<&InputStats>,
    m: &mut MeasureBuffers,
) -> (KeptSums, KeptSums) {
    let n = rows.n_cols;
    let (mut weights, mut outputs) = (KeptSums::default(), KeptSums::default());
    m.d.resize(n, 0.0);
    m.e.resize(n, 0.0);
    for ((q, x), b) in back
        .chunks_exact(n)
        .zip(rows.exact.chunks_exact(n))
        .zip(rows.base.chunks_exact(n))
    {
        for i in 0..n {
            m.d[i] = x[i] - b[i];
            m.e[i] = q[i] - x[i];
        }
        weights.push(&m.d, &m.e);
        if let Some(st) = stats {
            m.pd.resize(st.t_eval, 0.0);
            m.pe.resize(st.t_eval, 0.0);
            st.project_eval(&m.d, &mut m.pd);
            st.project_eval(&m.e, &mut m.pe);
            outputs.push(&m.pd, &m.pe);
        }
    }
    (weights, outputs)
}

/// Recodes one tensor (merge and/or type change): its bytes in `p.ty_out` and its error sums.
pub fn merge_tensor(
    p: &TensorPlan<'_>,
    name: &str,
    data: &[u8],
    phases: &Phases,
) -> Result<(Vec<u8>, ErrorSums), EngineError> {
    let ops = load_ops(p, name)?;
    let n = p.n_cols;
    let out_row = row_bytes(p.ty_out, n)?;
    let rows_per_block = (BLOCK_ELEMS / n.max(1)).max(1);
    let mut out = vec![0u8; p.n_rows * out_row];
    let sums = out
        .par_chunks_mut(rows_per_block * out_row)
        .enumerate()
        .map_init(Buffers::default, |b, (bi, chunk)| {
            let r0 = bi * rows_per_block;
            let rows = chunk.len() / out_row;
            merged_rows(p, &ops, data, r0, rows, b, phases)?;
            let Buffers {
                base,
                merged,
                back,
                measure,
                ..
            } = b;
            let in_row = row_bytes(p.ty_in, n)?;
            let block = RowBlock {
                exact: exact(p, base, merged),
                base,
                r0,
                n_cols: n,
                base_bytes: (p.ty_in == p.ty_out).then(|| &data[r0 * in_row..(r0 + rows) * in_row]),
            };
            requantize_and_measure(p.ty_out, &p.requant, &block, chunk, back, measure, phases)
        })
        .try_reduce(ErrorSums::default, |a, b| Ok(a.add(b)))?;
    Ok((out, sums))
}

/// Rows at which candidate types are tried: `count` rows spread evenly (all rows if fewer).
pub fn sample_rows(n_rows: usize, count: usize) -> Vec<usize> {
    if n_rows <= count {
        return (0..n_rows).collect();
    }
    (0..count).map(|i| i * n_rows / count).collect()
}

/// Error sums of writing this tensor as each of `types`, measured on the sampled rows only.
pub fn sample_errors(
    p: &TensorPlan<'_>,
    name: &str,
    data: &[u8],
    rows: &[usize],
    types: &[GgmlType],
) -> Result<Vec<ErrorSums>, EngineError> {
    let ops = load_ops(p, name)?;
    let n = p.n_cols;
    let discard = Phases::default();
    let per_row: Vec<Vec<ErrorSums>> = rows
        .par_iter()
        .map_init(Buffers::default, |b, &r| {
            merged_rows(p, &ops, data, r, 1, b, &discard)?;
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
                        r0: r,
                        n_cols: n,
                        base_bytes: (ty == p.ty_in).then(|| &data[r * in_row..(r + 1) * in_row]),
                    };
                    out.resize(row_bytes(ty, n)?, 0);
                    requantize_and_measure(ty, &p.requant, &block, out, back, measure, &discard)
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    let mut total = vec![ErrorSums::default(); types.len()];
    for row in per_row {
        for (t, s) in total.iter_mut().zip(row) {
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

/// Runs every tensor through `plans` in order and hands the bytes to `sink` (on a writer thread) in
/// the same order; `on_done(index, bytes)` is called as each tensor is handed over (progress).
/// Returns the error sums of each recoded tensor, by index.
pub fn stream<'a, S>(
    base: &[InputTensor<'a>],
    plans: &[TensorPlan<'_>],
    mut sink: S,
    on_done: &(dyn Fn(usize, u64) + Sync),
    phases: &Phases,
) -> Result<Vec<Option<ErrorSums>>, EngineError>
where
    S: FnMut(usize, &[u8]) -> Result<(), EngineError> + Send,
{
    let (tx, rx) = mpsc::sync_channel::<(usize, Chunk<'a>)>(WINDOW);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), EngineError> {
            for (index, chunk) in rx {
                let t = Instant::now();
                sink(index, chunk.bytes())?;
                lap(&phases.write, t);
            }
            Ok(())
        });
        let mut sums = vec![None; plans.len()];
        let mut result = Ok(());
        for p in plans {
            let t = &base[p.index];
            let chunk = if p.is_recoded() {
                match merge_tensor(p, &t.name, t.data, phases) {
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
