//! The one normalized in-memory LoRA adapter model that `convert`, `merge`, `bundle`, `inspect` and
//! `verify` all work on, whatever file it came from (PEFT directory, PEFT `.safetensors`, GGUF LoRA).
//!
//! # Orientation
//! Every LoRA is stored as trained: `A` is `rank × n_in`, `B` is `n_out × rank`, and the update is
//! `ΔW = scale · B·A` with `ΔW` shaped `n_out × n_in` like a PyTorch `nn.Linear` weight, which is also
//! the row layout of the GGUF base tensor (`ne = [n_in, n_out]`). Targets are GGUF base tensor names
//! (`blk.0.attn_q.weight`), and `B` rows are already in GGUF order (RoPE-permuted for llama-family
//! `attn_q`/`attn_k`) once a tensor is [loaded](LoraTensor::load).
//! Two special cases:
//! - `token_embd.weight` (PEFT `lora_embedding_A/B`): `A` is `rank × n_vocab`, `B` is `n_embd × rank`,
//!   so `B·A` is `n_embd × n_vocab`, the *transpose* of the GGUF row layout (`ne = [n_embd, n_vocab]`):
//!   the update to the embedding row of token `t` is `scale · B · A[:, t]`. The GGUF file stores this
//!   `A` transposed (`ne = [rank, n_vocab]`) so that llama.cpp can `get_rows` it.
//! - stacked MoE experts (`ffn_*_exps`): `A` is `(n_expert·rank) × n_in` and `B` is
//!   `(n_expert·n_out) × rank`, i.e. one block per expert in expert order, which is exactly the memory
//!   layout of the GGUF tensors `ne = [n_in, rank, n_expert]` and `[rank, n_out, n_expert]`.
//!
//! # Scale convention
//! Each tensor carries `alpha` in **llama.cpp's convention**: at user scale `s` the runtime applies
//! `s · alpha / rank · B·A`, where `rank` is that tensor's own rank (`lora_b.ne[0]`). So
//! [`LoadedLora::scale`] `= alpha / rank` is exactly what multiplies `B·A` at user scale 1 — PEFT's
//! `scaling`. From PEFT: `alpha = lora_alpha` (per module after `alpha_pattern`), or
//! `lora_alpha · √rank` with `use_rslora` (PEFT scales by `alpha/√r`). From a GGUF file:
//! `adapter.lora.alpha`, or `rank` when it is absent or 0 (llama.cpp then applies the user scale
//! unchanged). Writers that must use one alpha per file fold `alpha_i / alpha_file` into `B`.
//!
//! Tensor data stays in the source file (memory-mapped) until [`LoraTensor::load`] asks for it, so a
//! 7B adapter is never held in memory whole.

pub mod bundle;
pub mod gguf;
pub mod peft;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::arch::BaseInfo;
use crate::safetensors_file::{SafetensorsError, SafetensorsFile, TensorEntry};

/// A dense row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix over `data`; `None` when the length is not `rows × cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<Matrix> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Matrix { rows, cols, data })
    }

    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transposed(&self) -> Matrix {
        let mut data = Vec::with_capacity(self.data.len());
        for c in 0..self.cols {
            for r in 0..self.rows {
                data.push(self.data[r * self.cols + c]);
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }

    /// The rows in `range` as a new matrix.
    pub fn rows_range(&self, range: Range<usize>) -> Matrix {
        Matrix {
            rows: range.len(),
            cols: self.cols,
            data: self.data[range.start * self.cols..range.end * self.cols].to_vec(),
        }
    }

    pub fn scale_in_place(&mut self, factor: f32) {
        self.data.iter_mut().for_each(|v| *v *= factor);
    }

    /// Index of the first NaN or ±Inf value.
    pub fn first_non_finite(&self) -> Option<usize> {
        self.data.iter().position(|v| !v.is_finite())
    }

    /// `self · other` in f32 (f64 accumulation); for tests and small checks, not a BLAS.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows);
        let mut out = Matrix::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for j in 0..other.cols {
                let mut acc = 0f64;
                for k in 0..self.cols {
                    acc +=
                        self.data[i * self.cols + k] as f64 * other.data[k * other.cols + j] as f64;
                }
                out.data[i * other.cols + j] = acc as f32;
            }
        }
        out
    }
}

/// Errors from reading an adapter or materializing its tensors.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// Anything else wrong with the input; the message names the file and tensor.
    #[error("{0}")]
    Invalid(String),
}

/// Where one 2-D factor's values live. Cheap to clone; data is read on [`Factor::load`].
#[derive(Clone, Debug)]
pub enum Factor {
    /// Held in memory (GGUF adapters after dequantization, synthesized zero blocks, tests).
    Owned(Arc<Matrix>),
    /// A tensor of a mapped safetensors file, read as `rows × cols` (its PyTorch shape, with
    /// leading dimensions of 1 folded away).
    Safetensors {
        file: Arc<SafetensorsFile>,
        entry: TensorEntry,
        rows: usize,
        cols: usize,
    },
    /// Rows `rows` of a GGUF adapter tensor (of a file or a bundle member; every dimension past
    /// `ne[0] = cols` folded into rows), dequantized on load and transposed when `transpose`
    /// (`token_embd`'s stored `lora_a`). Nothing is read until then, so a 7B adapter is never
    /// held in memory whole.
    Gguf {
        src: Arc<bundle::GgufSource>,
        tensor: String,
        rows: Range<usize>,
        cols: usize,
        transpose: bool,
    },
}

impl Factor {
    pub fn owned(m: Matrix) -> Factor {
        Factor::Owned(Arc::new(m))
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            Factor::Owned(m) => (m.rows, m.cols),
            Factor::Safetensors { rows, cols, .. } => (*rows, *cols),
            Factor::Gguf {
                rows,
                cols,
                transpose,
                ..
            } => {
                if *transpose {
                    (*cols, rows.len())
                } else {
                    (rows.len(), *cols)
                }
            }
        }
    }

    /// The values as f32, checked to be finite (the error names the tensor and the first bad index).
    pub fn load(&self) -> Result<Matrix, AdapterError> {
        let m = match self {
            Factor::Owned(m) => (**m).clone(),
            Factor::Safetensors {
                file,
                entry,
                rows,
                cols,
            } => {
                let data = file.to_f32(entry)?;
                Matrix::new(*rows, *cols, data).ok_or_else(|| {
                    AdapterError::Invalid(format!(
                        "{}: tensor '{}' does not hold {rows}×{cols} values",
                        file.path().display(),
                        entry.name
                    ))
                })?
            }
            Factor::Gguf {
                src,
                tensor,
                rows,
                transpose,
                ..
            } => {
                let m = src.dequantize_rows(tensor, rows.clone())?;
                if *transpose {
                    m.transposed()
                } else {
                    m
                }
            }
        };
        if let Some(i) = m.first_non_finite() {
            return Err(AdapterError::Invalid(format!(
                "{}: value {} at row {}, column {} is not finite",
                self.describe(),
                m.data[i],
                i / m.cols.max(1),
                i % m.cols.max(1)
            )));
        }
        Ok(m)
    }

    /// "file: tensor 'name'" for messages.
    pub fn describe(&self) -> String {
        match self {
            Factor::Owned(_) => "in-memory tensor".to_string(),
            Factor::Safetensors { file, entry, .. } => {
                format!("{}: tensor '{}'", file.path().display(), entry.name)
            }
            Factor::Gguf { src, tensor, .. } => {
                format!("{}: tensor '{tensor}'", src.label.display())
            }
        }
    }
}

/// One LoRA pair as trained on one module.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// Where it came from: the PEFT module path (`model.layers.0.self_attn.q_proj`) or GGUF name.
    pub source: String,
    /// `rank × n_in`.
    pub a: Factor,
    /// `n_out × rank`.
    pub b: Factor,
    /// llama.cpp-convention alpha relative to this pair's own rank (scale = alpha / rank).
    pub alpha: f64,
    /// When the target is one slice of a fused source module (split targets), the rows of `B` that
    /// belong to it.
    pub b_rows: Option<Range<usize>>,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.a.shape().0
    }

    pub fn n_in(&self) -> usize {
        self.a.shape().1
    }

    pub fn n_out(&self) -> usize {
        match &self.b_rows {
            Some(r) => r.len(),
            None => self.b.shape().0,
        }
    }

    /// PEFT's `scaling` for this pair.
    pub fn scale(&self) -> f64 {
        scale_of(self.alpha, self.rank())
    }
}

fn scale_of(alpha: f64, rank: usize) -> f64 {
    if rank == 0 {
        0.0
    } else {
        alpha / rank as f64
    }
}

/// What kind of base tensor a LoRA targets; decides orientation and shape checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A 2-D projection (`attn_q`, `ffn_down`, `output`, ...).
    Linear,
    /// `token_embd.weight` (see the module docs for its orientation).
    Embedding,
    /// A stacked 3-D expert tensor (`ffn_gate_exps`, ...).
    Experts,
}

/// How the pairs of one target combine into the single A/B the target gets.
#[derive(Clone, Debug)]
pub enum Layout {
    /// One pair.
    Single(Box<LoraPair>),
    /// One pair per expert, stacked in expert order (all the same rank).
    Experts(Vec<LoraPair>),
    /// Separate LoRAs of parts of a fused base tensor (q, k, v into `attn_qkv`), in output-row
    /// order; `None` marks a part the adapter does not touch, with its row count. Combined exactly
    /// by rank concatenation: `A = [A₁; A₂; …]`, `B = blockdiag(B₁, B₂, …)`.
    Fused(Vec<FusedPart>),
    /// Several whole LoRAs of the same target applied together (PEFT's `cat` combination, our
    /// concat bundle): `A = [A₁; A₂; …]` row-stacked, `B = [c₁B₁ c₂B₂ …]` column-stacked, where
    /// `cᵢ` folds part `i`'s user scale times its own effective scale into its `B` block. Exact:
    /// `B·A = Σ cᵢ·Bᵢ·Aᵢ`. Stacked experts concatenate per expert.
    Concat(Vec<ConcatPart>),
}

/// One input of a [`Layout::Concat`]: a whole target as its own adapter has it, and the user scale
/// it is applied at.
#[derive(Clone, Debug)]
pub struct ConcatPart {
    pub tensor: LoraTensor,
    pub scale: f64,
}

#[derive(Clone, Debug)]
pub struct FusedPart {
    pub rows: usize,
    pub pair: Option<LoraPair>,
}

/// One adapted GGUF base tensor.
#[derive(Clone, Debug)]
pub struct LoraTensor {
    /// GGUF base tensor name, e.g. `blk.0.attn_q.weight`.
    pub target: String,
    /// Block index, when the tensor belongs to a block.
    pub layer: Option<u32>,
    pub kind: TargetKind,
    pub layout: Layout,
    /// llama-family RoPE permutation of `B` rows that `load` applies: the head count to use
    /// (`n_head` for `attn_q`, `n_head_kv` for `attn_k`), as `convert_hf_to_gguf`'s `permute`.
    pub permute_heads: Option<usize>,
    /// DoRA magnitude vector (`n_out`), when the source module used DoRA.
    pub dora_magnitude: Option<Factor>,
    /// `lora_B.bias` (`n_out`), when the source used `lora_bias`; the bias update is `scale · bias`.
    pub lora_bias: Option<Factor>,
}

/// A target's A/B with every transformation applied, ready to write or apply.
#[derive(Clone, Debug)]
pub struct LoadedLora {
    /// `(n_expert·rank) × n_in` (see the module docs for `token_embd`).
    pub a: Matrix,
    /// `(n_expert·n_out) × rank`.
    pub b: Matrix,
    pub n_expert: usize,
    pub rank: usize,
    /// llama.cpp-convention alpha for `rank`.
    pub alpha: f64,
}

impl LoadedLora {
    /// What multiplies `B·A` at user scale 1.
    pub fn scale(&self) -> f64 {
        scale_of(self.alpha, self.rank)
    }

    pub fn n_in(&self) -> usize {
        self.a.cols
    }

    pub fn n_out(&self) -> usize {
        self.b.rows / self.n_expert.max(1)
    }
}

impl LoraTensor {
    /// The pairs this tensor is built from.
    pub fn pairs(&self) -> Vec<&LoraPair> {
        match &self.layout {
            Layout::Single(p) => vec![p],
            Layout::Experts(ps) => ps.iter().collect(),
            Layout::Fused(parts) => parts.iter().filter_map(|p| p.pair.as_ref()).collect(),
            Layout::Concat(parts) => parts.iter().flat_map(|p| p.tensor.pairs()).collect(),
        }
    }

    /// Rank of the combined tensor (what llama.cpp reads from `lora_b.ne[0]`).
    pub fn rank(&self) -> usize {
        match &self.layout {
            Layout::Single(p) => p.rank(),
            Layout::Experts(ps) => ps.first().map_or(0, |p| p.rank()),
            Layout::Fused(parts) => parts
                .iter()
                .filter_map(|p| p.pair.as_ref())
                .map(|p| p.rank())
                .sum(),
            Layout::Concat(parts) => parts.iter().map(|p| p.tensor.rank()).sum(),
        }
    }

    pub fn n_expert(&self) -> usize {
        match &self.layout {
            Layout::Experts(ps) => ps.len(),
            Layout::Concat(parts) => parts.first().map_or(1, |p| p.tensor.n_expert()),
            _ => 1,
        }
    }

    pub fn n_in(&self) -> usize {
        self.pairs().first().map_or(0, |p| p.n_in())
    }

    pub fn n_out(&self) -> usize {
        match &self.layout {
            Layout::Fused(parts) => parts.iter().map(|p| p.rows).sum(),
            Layout::Concat(parts) => parts.first().map_or(0, |p| p.tensor.n_out()),
            _ => self.pairs().first().map_or(0, |p| p.n_out()),
        }
    }

    /// The llama.cpp-convention alpha `load` gives this tensor, without reading data: the first
    /// pair's, rescaled to the combined rank for fused tensors (other pairs' ratios are folded in B);
    /// the combined rank for concatenations (scale 1: every part's scale is folded in its B block).
    pub fn alpha(&self) -> f64 {
        match &self.layout {
            Layout::Single(p) => p.alpha,
            Layout::Experts(ps) => ps.first().map_or(0.0, |p| p.alpha),
            Layout::Fused(_) => {
                let pairs = self.pairs();
                match pairs.iter().find(|p| p.alpha != 0.0) {
                    Some(p) => p.scale() * self.rank() as f64,
                    None => 0.0,
                }
            }
            Layout::Concat(_) => self.rank() as f64,
        }
    }

    /// PEFT's effective scale of the combined tensor at user scale 1.
    pub fn scale(&self) -> f64 {
        scale_of(self.alpha(), self.rank())
    }

    /// Source names for messages: joined with `+` for fused parts; for stacked experts one name with
    /// the expert index as `*`.
    pub fn source(&self) -> String {
        if let Layout::Experts(ps) = &self.layout {
            if let Some(p) = ps.iter().find(|p| !p.source.starts_with('(')) {
                let generic = match p.source.split_once(".experts.") {
                    Some((head, tail)) => match tail.split_once('.') {
                        Some((_, rest)) => format!("{head}.experts.*.{rest}"),
                        None => p.source.clone(),
                    },
                    None => p.source.clone(),
                };
                return format!("{generic} ({} experts)", ps.len());
            }
        }
        self.pairs()
            .iter()
            .map(|p| p.source.as_str())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The DoRA magnitude vector (`n_out` values), rows in GGUF order (RoPE-permuted like `B`).
    pub fn load_magnitude(&self) -> Result<Option<Vec<f32>>, AdapterError> {
        self.load_row_vector(self.dora_magnitude.as_ref())
    }

    /// The `lora_B.bias` vector (`n_out` values, to be multiplied by [`LoraTensor::scale`]), rows in
    /// GGUF order.
    pub fn load_lora_bias(&self) -> Result<Option<Vec<f32>>, AdapterError> {
        self.load_row_vector(self.lora_bias.as_ref())
    }

    fn load_row_vector(&self, f: Option<&Factor>) -> Result<Option<Vec<f32>>, AdapterError> {
        let Some(f) = f else { return Ok(None) };
        let v = f.load()?;
        let rows: Option<Range<usize>> = match &self.layout {
            Layout::Single(p) => p.b_rows.clone(),
            _ => None,
        };
        let data = match rows {
            Some(r) if r.end <= v.data.len() => v.data[r].to_vec(),
            Some(_) => return Err(shape_err(&self.target)),
            None => v.data,
        };
        let col = Matrix::new(data.len(), 1, data).ok_or_else(|| shape_err(&self.target))?;
        let col = match self.permute_heads {
            Some(n) => permute_rows(&col, n).ok_or_else(|| shape_err(&self.target))?,
            None => col,
        };
        Ok(Some(col.data))
    }

    /// Reads and combines the data: stacks experts, builds fused block-diagonal factors (folding
    /// each part's scale relative to the combined alpha into its `B` block), takes split rows, and
    /// applies the RoPE permutation to `B` rows.
    pub fn load(&self) -> Result<LoadedLora, AdapterError> {
        let alpha = self.alpha();
        let (a, mut b, n_expert, rank) = match &self.layout {
            Layout::Single(p) => {
                let (a, b) = load_pair(p)?;
                (a, b, 1, p.rank())
            }
            Layout::Experts(ps) => {
                let rank = self.rank();
                let mut a_data = Vec::new();
                let mut b_data = Vec::new();
                let (mut n_in, mut n_out) = (0, 0);
                for p in ps {
                    let (a, mut b) = load_pair(p)?;
                    if a.rows != rank {
                        return Err(AdapterError::Invalid(format!(
                            "{}: expert LoRA {} has rank {}, others rank {rank}; stacked experts need one rank",
                            self.target, p.source, a.rows
                        )));
                    }
                    fold_ratio(&mut b, p.alpha, alpha);
                    n_in = a.cols;
                    n_out = b.rows;
                    a_data.extend_from_slice(&a.data);
                    b_data.extend_from_slice(&b.data);
                }
                let n = ps.len();
                (
                    Matrix::new(n * rank, n_in, a_data).ok_or_else(|| shape_err(&self.target))?,
                    Matrix::new(n * n_out, rank, b_data).ok_or_else(|| shape_err(&self.target))?,
                    n,
                    rank,
                )
            }
            Layout::Fused(parts) => {
                let rank = self.rank();
                let n_in = self.n_in();
                let n_out = self.n_out();
                let target_scale = scale_of(alpha, rank);
                let mut a = Matrix::zeros(rank, n_in);
                let mut b = Matrix::zeros(n_out, rank);
                let (mut r0, mut row0) = (0, 0);
                for part in parts {
                    if let Some(p) = &part.pair {
                        let (pa, pb) = load_pair(p)?;
                        let factor = if target_scale == 0.0 {
                            0.0
                        } else {
                            (p.scale() / target_scale) as f32
                        };
                        let r = pa.rows;
                        a.data[r0 * n_in..(r0 + r) * n_in].copy_from_slice(&pa.data);
                        for i in 0..pb.rows {
                            for j in 0..r {
                                let v = pb.data[i * r + j];
                                b.data[(row0 + i) * rank + r0 + j] =
                                    if factor == 1.0 { v } else { v * factor };
                            }
                        }
                        r0 += r;
                    }
                    row0 += part.rows;
                }
                (a, b, 1, rank)
            }
            Layout::Concat(parts) => self.load_concat(parts, alpha)?,
        };
        if let Some(n_head) = self.permute_heads {
            let rows_per_expert = b.rows / n_expert;
            let mut out = Vec::with_capacity(b.data.len());
            for e in 0..n_expert {
                let block = b.rows_range(e * rows_per_expert..(e + 1) * rows_per_expert);
                let permuted = permute_rows(&block, n_head).ok_or_else(|| {
                    AdapterError::Invalid(format!(
                        "{}: {} output rows cannot be split into {n_head} heads of two rotary halves",
                        self.target, block.rows
                    ))
                })?;
                out.extend_from_slice(&permuted.data);
            }
            b.data = out;
        }
        Ok(LoadedLora {
            a,
            b,
            n_expert,
            rank,
            alpha,
        })
    }
}

impl LoraTensor {
    /// [`Layout::Concat`]: loads each part (with its own permutation, fusion and expert stacking)
    /// and stacks it in, folding `part scale × part's effective scale / combined scale` into its
    /// `B` block (left untouched when that factor is exactly 1).
    fn load_concat(
        &self,
        parts: &[ConcatPart],
        alpha: f64,
    ) -> Result<(Matrix, Matrix, usize, usize), AdapterError> {
        let (rank, n_expert, n_in, n_out) =
            (self.rank(), self.n_expert(), self.n_in(), self.n_out());
        let target_scale = scale_of(alpha, rank);
        let mut a = Matrix::zeros(n_expert * rank, n_in);
        let mut b = Matrix::zeros(n_expert * n_out, rank);
        let mut r0 = 0;
        for part in parts {
            let l = part.tensor.load()?;
            if (l.n_expert, l.n_in(), l.n_out()) != (n_expert, n_in, n_out) {
                return Err(AdapterError::Invalid(format!(
                    "{}: {} is {} experts of {}×{}, the first part {} experts of {}×{}; concatenated LoRAs need one shape",
                    self.target,
                    part.tensor.source(),
                    l.n_expert,
                    l.n_out(),
                    l.n_in(),
                    n_expert,
                    n_out,
                    n_in
                )));
            }
            let r = l.rank;
            let factor = if target_scale == 0.0 {
                0.0
            } else {
                (part.scale * l.scale() / target_scale) as f32
            };
            for e in 0..n_expert {
                let dst = (e * rank + r0) * n_in;
                a.data[dst..dst + r * n_in]
                    .copy_from_slice(&l.a.data[e * r * n_in..(e + 1) * r * n_in]);
                for i in 0..n_out {
                    let src = &l.b.data[(e * n_out + i) * r..(e * n_out + i + 1) * r];
                    let dst = &mut b.data[(e * n_out + i) * rank + r0..][..r];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = if factor == 1.0 { v } else { v * factor };
                    }
                }
            }
            r0 += r;
        }
        Ok((a, b, n_expert, rank))
    }
}

fn shape_err(target: &str) -> AdapterError {
    AdapterError::Invalid(format!("{target}: inconsistent LoRA factor shapes"))
}

/// Multiplies `b` by `alpha_pair / alpha_target` (the scale ratio when both share a rank), so a pair
/// whose alpha differs from its tensor's keeps its exact effective scale.
fn fold_ratio(b: &mut Matrix, alpha_pair: f64, alpha_target: f64) {
    if alpha_pair != alpha_target {
        let f = if alpha_target == 0.0 {
            0.0
        } else {
            (alpha_pair / alpha_target) as f32
        };
        b.scale_in_place(f);
    }
}

fn load_pair(p: &LoraPair) -> Result<(Matrix, Matrix), AdapterError> {
    let a = p.a.load()?;
    let b = p.b.load()?;
    if a.rows != b.cols {
        return Err(AdapterError::Invalid(format!(
            "{}: lora_A has rank {} but lora_B has rank {} ({} / {})",
            p.source,
            a.rows,
            b.cols,
            p.a.describe(),
            p.b.describe()
        )));
    }
    let b = match &p.b_rows {
        Some(r) if r.end <= b.rows => b.rows_range(r.clone()),
        Some(r) => {
            return Err(AdapterError::Invalid(format!(
                "{}: rows {r:?} asked of a lora_B with {} rows",
                p.source, b.rows
            )))
        }
        None => b,
    };
    Ok((a, b))
}

/// `convert_hf_to_gguf`'s `LlamaModel.permute` on the rows of `m`:
/// `reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
/// Row `h·d + i·(d/2) + j` of the input becomes row `h·d + 2j + i` (`d = rows / n_head`).
/// `None` when the rows do not split into `n_head` heads of even size.
pub fn permute_rows(m: &Matrix, n_head: usize) -> Option<Matrix> {
    if n_head == 0 || !m.rows.is_multiple_of(n_head) || !(m.rows / n_head).is_multiple_of(2) {
        return None;
    }
    let d = m.rows / n_head;
    let half = d / 2;
    let mut data = Vec::with_capacity(m.data.len());
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                data.extend_from_slice(m.row(h * d + i * half + j));
            }
        }
    }
    Some(Matrix {
        rows: m.rows,
        cols: m.cols,
        data,
    })
}

/// A full tensor an adapter replaces rather than adapts (`modules_to_save`, resized embeddings,
/// mergekit norm tensors). `convert` cannot express it; `merge` can apply it.
#[derive(Clone, Debug)]
pub struct FullTensor {
    /// Name in the source file.
    pub source: String,
    /// GGUF tensor it replaces, when the name maps.
    pub target: Option<String>,
    pub data: Factor,
}

/// Which file format an adapter was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Peft,
    Gguf,
}

/// Where an adapter came from and what its source config said, for inspect output and for the
/// provenance keys a written GGUF carries.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Provenance {
    pub path: PathBuf,
    pub format: Option<SourceFormat>,
    /// Source `r` (PEFT config) when known.
    pub r: Option<u32>,
    /// Source `lora_alpha` (PEFT) or `adapter.lora.alpha` (GGUF) as written there.
    pub lora_alpha: Option<f64>,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// `target_modules` as the config wrote it (list entries, or one regex string).
    pub target_modules: Vec<String>,
    pub rank_pattern: Vec<(String, u32)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// `base_model_name_or_path` (PEFT) or `general.base_model.0.name`-style hints (GGUF).
    pub base_model: Option<String>,
}

/// The normalized adapter.
#[derive(Clone, Debug, Default)]
pub struct Adapter {
    /// GGUF architecture name (`llama`, `qwen2`, ...) when known.
    pub arch: Option<String>,
    pub tensors: Vec<LoraTensor>,
    /// Full replacement tensors (see [`FullTensor`]).
    pub full_tensors: Vec<FullTensor>,
    /// aLoRA invocation token ids (`adapter.alora.invocation_tokens`).
    pub alora_invocation_tokens: Option<Vec<u32>>,
    pub provenance: Provenance,
}

impl Adapter {
    /// What a plain GGUF LoRA cannot express, one line per offending source tensor: DoRA magnitudes,
    /// LoRA biases, full replacement tensors. Empty when the adapter is a pure LoRA.
    pub fn unrepresentable(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.tensors {
            if t.dora_magnitude.is_some() {
                out.push(format!("{} (DoRA lora_magnitude_vector)", t.source()));
            }
            if t.lora_bias.is_some() {
                out.push(format!("{} (lora_B.bias)", t.source()));
            }
        }
        for f in &self.full_tensors {
            out.push(format!(
                "{} (full tensor: modules_to_save or extra weight)",
                f.source
            ));
        }
        out
    }

    pub fn tensor(&self, target: &str) -> Option<&LoraTensor> {
        self.tensors.iter().find(|t| t.target == target)
    }
}

/// Why an adapted module cannot become a correct GGUF LoRA tensor against this base.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Issue {
    /// Source module path or tensor name.
    pub source: String,
    /// GGUF target, when the module maps.
    pub target: Option<String>,
    pub status: IssueKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// No GGUF tensor for this module in this architecture.
    UnknownModule,
    /// The base has no such tensor.
    MissingInBase,
    /// Shapes disagree with the base tensor.
    ShapeMismatch,
    /// Rank in the tensors disagrees with the config (`r` / `rank_pattern`).
    RankMismatch,
    /// Needs facts only a base GGUF gives (head counts for the llama q/k permutation, ...).
    NeedsBase,
    /// An aLoRA whose invocation is given as text only.
    NeedsTokens,
}

/// Checks every target against the base GGUF: present, and shaped as llama.cpp's loader will check.
pub fn check_against_base(tensors: &[LoraTensor], base: &BaseInfo) -> Vec<Issue> {
    let mut issues = Vec::new();
    if !base.has_tensors() {
        return issues;
    }
    for t in tensors {
        let issue = |status, message: String| Issue {
            source: t.source(),
            target: Some(t.target.clone()),
            status,
            message,
        };
        let Some(bt) = base.tensor(&t.target) else {
            let message = if t.target == "output.weight"
                && base.tensor("token_embd.weight").is_some()
            {
                "the base ties its output to token_embd (no output.weight): a lm_head LoRA has nothing to apply to in llama.cpp; use `gguf-lora merge` on an untied base or train without lm_head".to_string()
            } else {
                format!("the base has no tensor {}", t.target)
            };
            issues.push(issue(IssueKind::MissingInBase, message));
            continue;
        };
        let want: Vec<u64> = match t.kind {
            TargetKind::Linear => vec![t.n_in() as u64, t.n_out() as u64],
            TargetKind::Embedding => vec![t.n_out() as u64, t.n_in() as u64],
            TargetKind::Experts => vec![t.n_in() as u64, t.n_out() as u64, t.n_expert() as u64],
        };
        if bt.dims != want {
            issues.push(issue(
                IssueKind::ShapeMismatch,
                format!(
                    "the adapter needs a base tensor with ne = {want:?}, the base's {} has ne = {:?}",
                    t.target, bt.dims
                ),
            ));
        }
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Matrix {
        let mut data = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                data.push(f(r, c));
            }
        }
        Matrix::new(rows, cols, data).unwrap()
    }

    fn pair(a: Matrix, b: Matrix, alpha: f64) -> LoraPair {
        LoraPair {
            source: "x".into(),
            a: Factor::owned(a),
            b: Factor::owned(b),
            alpha,
            b_rows: None,
        }
    }

    fn tensor(layout: Layout) -> LoraTensor {
        LoraTensor {
            target: "blk.0.attn_qkv.weight".into(),
            layer: Some(0),
            kind: TargetKind::Linear,
            layout,
            permute_heads: None,
            dora_magnitude: None,
            lora_bias: None,
        }
    }

    #[test]
    fn permutation_matches_numpy_reshape_swapaxes() {
        // 2 heads of 4 rows: numpy gives [0,2,1,3, 4,6,5,7] for
        // arange(8).reshape(2, 2, 2).swapaxes(1, 2).reshape(8).
        let x = m(8, 1, |r, _| r as f32);
        let p = permute_rows(&x, 2).unwrap();
        assert_eq!(p.data, [0., 2., 1., 3., 4., 6., 5., 7.]);
        // 1 head of 6 rows: arange(6).reshape(1, 2, 3).swapaxes(1, 2) -> [0,3,1,4,2,5].
        let y = m(6, 2, |r, c| (r * 10 + c) as f32);
        let p = permute_rows(&y, 1).unwrap();
        assert_eq!(
            p.data,
            [0., 1., 30., 31., 10., 11., 40., 41., 20., 21., 50., 51.]
        );
        assert!(permute_rows(&y, 4).is_none());
        assert!(permute_rows(&m(6, 1, |_, _| 0.), 2).is_none()); // head size 3 is odd
    }

    #[test]
    fn fused_block_diagonal_reproduces_each_part_with_its_scale() {
        // q: rank 2, alpha 4 (scale 2); v: rank 1, alpha 3 (scale 3); k untouched (2 rows).
        let aq = m(2, 3, |r, c| (r + c) as f32 + 1.0);
        let bq = m(2, 2, |r, c| (r * 2 + c) as f32 - 1.5);
        let av = m(1, 3, |_, c| c as f32 * 0.5);
        let bv = m(3, 1, |r, _| r as f32 + 0.25);
        let t = tensor(Layout::Fused(vec![
            FusedPart {
                rows: 2,
                pair: Some(pair(aq.clone(), bq.clone(), 4.0)),
            },
            FusedPart {
                rows: 2,
                pair: None,
            },
            FusedPart {
                rows: 3,
                pair: Some(pair(av.clone(), bv.clone(), 3.0)),
            },
        ]));
        assert_eq!(t.rank(), 3);
        assert_eq!(t.n_out(), 7);
        let l = t.load().unwrap();
        let delta = l.b.matmul(&l.a);
        let s = l.scale() as f32;
        let dq = bq.matmul(&aq);
        let dv = bv.matmul(&av);
        for c in 0..3 {
            for r in 0..2 {
                assert!((delta.data[r * 3 + c] * s - 2.0 * dq.data[r * 3 + c]).abs() < 1e-5);
                assert_eq!(delta.data[(2 + r) * 3 + c], 0.0);
            }
            for r in 0..3 {
                assert!((delta.data[(4 + r) * 3 + c] * s - 3.0 * dv.data[r * 3 + c]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn experts_stack_in_order_and_fold_differing_alpha() {
        let a0 = m(1, 2, |_, c| c as f32 + 1.0);
        let b0 = m(2, 1, |r, _| r as f32 + 1.0);
        let t = tensor(Layout::Experts(vec![
            pair(a0.clone(), b0.clone(), 2.0),
            pair(a0.clone(), b0.clone(), 4.0),
        ]));
        let l = t.load().unwrap();
        assert_eq!((l.n_expert, l.rank, l.alpha), (2, 1, 2.0));
        assert_eq!(l.a.data, [1., 2., 1., 2.]);
        assert_eq!(l.b.data, [1., 2., 2., 4.]);
    }

    #[test]
    fn concat_stacks_parts_and_folds_user_times_own_scale() {
        // Part 1: rank 2, alpha 4 (scale 2) at user scale 0.5; part 2: rank 1, alpha 3 (scale 3)
        // at user scale -2. The concatenation has rank 3, alpha 3 (scale 1).
        let (a1, b1) = (
            m(2, 3, |r, c| (r + c) as f32 + 1.0),
            m(4, 2, |r, c| (r * 2 + c) as f32 - 1.5),
        );
        let (a2, b2) = (
            m(1, 3, |_, c| c as f32 * 0.5),
            m(4, 1, |r, _| r as f32 + 0.25),
        );
        let part = |a: &Matrix, b: &Matrix, alpha, scale| ConcatPart {
            tensor: tensor(Layout::Single(Box::new(pair(a.clone(), b.clone(), alpha)))),
            scale,
        };
        let t = tensor(Layout::Concat(vec![
            part(&a1, &b1, 4.0, 0.5),
            part(&a2, &b2, 3.0, -2.0),
        ]));
        assert_eq!((t.rank(), t.n_in(), t.n_out(), t.alpha()), (3, 3, 4, 3.0));
        let l = t.load().unwrap();
        assert_eq!(l.a.rows_range(0..2), a1);
        assert_eq!(l.a.rows_range(2..3), a2);
        let delta = l.b.matmul(&l.a);
        let (d1, d2) = (b1.matmul(&a1), b2.matmul(&a2));
        for i in 0..delta.data.len() {
            let want = 1.0 * d1.data[i] - 6.0 * d2.data[i];
            assert!((delta.data[i] * l.scale() as f32 - want).abs() < 1e-5);
        }
        // Experts concatenate per expert.
        let ex = |alpha| {
            tensor(Layout::Experts(vec![
                pair(
                    m(1, 2, |_, c| c as f32 + 1.0),
                    m(2, 1, |r, _| r as f32 + 1.0),
                    alpha,
                ),
                pair(
                    m(1, 2, |_, c| c as f32 + 3.0),
                    m(2, 1, |r, _| r as f32 + 5.0),
                    alpha,
                ),
            ]))
        };
        let t = tensor(Layout::Concat(vec![
            ConcatPart {
                tensor: ex(1.0),
                scale: 1.0,
            },
            ConcatPart {
                tensor: ex(2.0),
                scale: 1.0,
            },
        ]));
        let l = t.load().unwrap();
        assert_eq!((l.n_expert, l.rank), (2, 2));
        assert_eq!(l.a.data, [1., 2., 1., 2., 3., 4., 3., 4.]);
        assert_eq!(l.b.data, [1., 2., 2., 4., 5., 10., 6., 12.]);
    }

    #[test]
    fn rank_mismatch_and_non_finite_are_errors() {
        let t = tensor(Layout::Single(Box::new(pair(
            m(2, 3, |_, _| 1.),
            m(4, 3, |_, _| 1.),
            1.0,
        ))));
        assert!(t.load().unwrap_err().to_string().contains("rank 2"));
        let t = tensor(Layout::Single(Box::new(pair(
            m(1, 2, |_, c| if c == 1 { f32::NAN } else { 0. }),
            m(2, 1, |_, _| 1.),
            1.0,
        ))));
        assert!(t.load().unwrap_err().to_string().contains("not finite"));
    }

    #[test]
    fn dora_magnitude_and_bias_follow_the_b_row_permutation() {
        let mut t = tensor(Layout::Single(Box::new(pair(
            m(1, 2, |_, _| 1.),
            m(8, 1, |r, _| r as f32),
            1.0,
        ))));
        t.permute_heads = Some(2);
        t.dora_magnitude = Some(Factor::owned(m(1, 8, |_, c| c as f32)));
        let l = t.load().unwrap();
        let mag = t.load_magnitude().unwrap().unwrap();
        // The magnitude of each output row travels with that row of B.
        assert_eq!(l.b.data, mag);
        assert_eq!(mag, [0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(t.load_lora_bias().unwrap(), None);
    }
}
