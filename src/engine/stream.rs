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

/// Sums that give a tensor's fidelity: Σ(requantized − exact)², Σ(exact − base)², element count.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorSums {
    pub sq_requant: f64,
    pub sq_delta: f64,
    pub n: u64,
}

impl ErrorSums {
    fn add(self, o: ErrorSums) -> ErrorSums {
        ErrorSums {
            sq_requant: self.sq_requant + o.sq_requant,
            sq_delta: self.sq_delta + o.sq_delta,
            n: self.n + o.n,
        }
    }

    pub fn rms_requant(&self) -> f64 {
        (self.sq_requant / self.n.max(1) as f64).sqrt()
    }

    pub fn rms_delta(&self) -> f64 {
        (self.sq_delta / self.n.max(1) as f64).sqrt()
    }

    /// RMS(requantized − exact) / RMS(delta); `None` when the delta is zero.
    pub fn relative(&self) -> Option<f64> {
        (self.sq_delta > 0.0).then(|| (self.sq_requant / self.sq_delta).sqrt())
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

/// Requantizes `rows` into `out` as `ty` with `requant`, and returns the error sums against the
/// exact values and the base.
fn requantize_and_measure(
    ty: GgmlType,
    requant: &Requant<'_>,
    rows: &RowBlock<'_>,
    out: &mut [u8],
    back: &mut Vec<f32>,
    phases: &Phases,
) -> Result<ErrorSums, EngineError> {
    let t = Instant::now();
    requant.encode(ty, rows, out)?;
    let t = lap(&phases.requantize, t);
    back.resize(rows.exact.len(), 0.0);
    codec::dequantize(ty, out, back, rows.n_cols)?;
    let mut s = ErrorSums {
        n: rows.exact.len() as u64,
        ..Default::default()
    };
    for ((q, m), b) in back.iter().zip(rows.exact).zip(rows.base) {
        let e = (*q - *m) as f64;
        let d = (*m - *b) as f64;
        s.sq_requant += e * e;
        s.sq_delta += d * d;
    }
    lap(&phases.measure, t);
    Ok(s)
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
                base, merged, back, ..
            } = b;
            let in_row = row_bytes(p.ty_in, n)?;
            let block = RowBlock {
                exact: exact(p, base, merged),
                base,
                r0,
                n_cols: n,
                base_bytes: (p.ty_in == p.ty_out).then(|| &data[r0 * in_row..(r0 + rows) * in_row]),
            };
            requantize_and_measure(p.ty_out, &p.requant, &block, chunk, back, phases)
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
                    requantize_and_measure(ty, &p.requant, &block, out, back, &discard)
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
