//! The normalized adapter's data model: lazily loaded factors ([`Factor`]), LoRA pairs as trained
//! ([`LoraPair`]), how pairs combine into one adapted base tensor ([`Layout`], [`LoraTensor`]), and
//! the two materialized forms: [`LoadedLora`] (the adapter's own orientation, what a GGUF LoRA
//! stores) and [`LowRank`] (the update in the base tensor's row layout, what merge and the runtime
//! LoRA of `verify` apply). Reading and combining the data is [`super::combine`]'s job.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use super::matrix::Matrix;
use super::source::GgufSource;
use super::AdapterError;
use crate::arch::TargetKind;
use crate::safetensors_file::{SafetensorsFile, TensorEntry};

/// A factor that cannot be materialized, or factors that do not combine.
#[derive(Debug, thiserror::Error)]
pub enum FactorError {
    #[error("{}: tensor '{tensor}' does not hold {rows}×{cols} values", file.display())]
    Size {
        file: PathBuf,
        tensor: String,
        rows: usize,
        cols: usize,
    },
    /// `what` is "FILE: tensor 'NAME'" ([`Factor::describe`]).
    #[error("{what}: value {value} at row {row}, column {col} is not finite")]
    NonFinite {
        what: String,
        value: f32,
        row: usize,
        col: usize,
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
    #[error("{}: scratch file: {error}", dir.display())]
    Spool { dir: PathBuf, error: std::io::Error },
}

/// Where one 2-D factor's values live. Cheap to clone; data is read on [`Factor::load`].
#[derive(Clone, Debug)]
pub enum Factor {
    /// Held in memory (GGUF adapters after dequantization, synthesized zero blocks, tests).
    Owned(Arc<Matrix>),
    /// A tensor of a mapped safetensors file, read as `rows × cols` (its PyTorch shape, with
    /// leading dimensions of 1 folded away), or with a `window` the `rows × cols` block of it that
    /// the window selects.
    Safetensors {
        file: Arc<SafetensorsFile>,
        entry: TensorEntry,
        rows: usize,
        cols: usize,
        window: Option<Window>,
    },
    /// Rows `rows` of a GGUF adapter tensor (of a file or a bundle member; every dimension past
    /// `ne[0] = cols` folded into rows), dequantized on load and transposed when `transpose`
    /// (`token_embd`'s stored `lora_a`). Nothing is read until then, so a 7B adapter is never
    /// held in memory whole.
    Gguf {
        src: Arc<GgufSource>,
        tensor: String,
        rows: Range<usize>,
        cols: usize,
        transpose: bool,
    },
    /// `rows × cols` little-endian f32 at `offset` of a scratch file ([`Spool`]): factors computed
    /// here (extract) that wait for the writer without being held in memory.
    Spooled {
        spool: Arc<Spool>,
        offset: u64,
        rows: usize,
        cols: usize,
    },
}

/// Which elements of a 2-D safetensors tensor `full_cols` wide a [`Factor::Safetensors`] of
/// `rows × cols` reads: rows `row0..row0 + rows` and, in each, the columns `col0 + j·col_step` for
/// `j < cols`. PEFT's LoRA on fused expert parameters (`target_parameters`) keeps one expert's `A`
/// as a block of rows and its `B` as strided columns of one tensor shared by all experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub row0: usize,
    pub col0: usize,
    pub col_step: usize,
    pub full_cols: usize,
}

/// An anonymous scratch file (removed by the OS when the last handle closes, also on a crash or a
/// signal) that factors are appended to as f32 and read back one at a time.
#[derive(Debug)]
pub struct Spool {
    /// The file and its length so far.
    file: std::sync::Mutex<(std::fs::File, u64)>,
    /// Where it lives, for messages.
    dir: PathBuf,
}

impl Spool {
    /// A new scratch file in `dir` (the output's directory: it has room for the output anyway).
    pub fn new(dir: &std::path::Path) -> std::io::Result<Arc<Spool>> {
        Ok(Arc::new(Spool {
            file: std::sync::Mutex::new((tempfile::tempfile_in(dir)?, 0)),
            dir: dir.to_path_buf(),
        }))
    }

    /// Appends `m` and returns it as a factor.
    pub fn push(self: &Arc<Spool>, m: &Matrix) -> std::io::Result<Factor> {
        use std::io::{Seek, SeekFrom, Write};
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, len) = &mut *guard;
        let offset = *len;
        let bytes: &[u8] = bytemuck::cast_slice(&m.data);
        if cfg!(target_endian = "big") {
            return Err(std::io::Error::other(
                "scratch files need a little-endian host",
            ));
        }
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)?;
        *len += bytes.len() as u64;
        Ok(Factor::Spooled {
            spool: Arc::clone(self),
            offset,
            rows: m.rows,
            cols: m.cols,
        })
    }

    fn read(&self, offset: u64, rows: usize, cols: usize) -> std::io::Result<Matrix> {
        use std::io::{Read, Seek, SeekFrom};
        let mut data = vec![0f32; rows * cols];
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let file = &mut guard.0;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(bytemuck::cast_slice_mut(&mut data))?;
        Ok(Matrix { rows, cols, data })
    }
}

impl Factor {
    pub fn owned(m: Matrix) -> Factor {
        Factor::Owned(Arc::new(m))
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            Factor::Owned(m) => (m.rows, m.cols),
            Factor::Safetensors { rows, cols, .. } | Factor::Spooled { rows, cols, .. } => {
                (*rows, *cols)
            }
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
                window,
            } => {
                let size = || FactorError::Size {
                    file: file.path().to_path_buf(),
                    tensor: entry.name.clone(),
                    rows: *rows,
                    cols: *cols,
                };
                let data = match window {
                    None => file.to_f32(entry)?,
                    Some(w) => {
                        let (n_rows, n_cols, w) = (*rows, *cols, *w);
                        let at = (0..n_rows).flat_map(move |r| {
                            (0..n_cols)
                                .map(move |j| (w.row0 + r) * w.full_cols + w.col0 + j * w.col_step)
                        });
                        let last_col = (n_cols > 0).then(|| w.col0 + (n_cols - 1) * w.col_step);
                        if last_col.is_some_and(|c| c >= w.full_cols) {
                            return Err(size().into());
                        }
                        file.to_f32_at(entry, at)?.ok_or_else(size)?
                    }
                };
                Matrix::new(*rows, *cols, data).ok_or_else(size)?
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
            Factor::Spooled {
                spool,
                offset,
                rows,
                cols,
            } => spool
                .read(*offset, *rows, *cols)
                .map_err(|error| FactorError::Spool {
                    dir: spool.dir.clone(),
                    error,
                })?,
        };
        if let Some(i) = m.first_non_finite() {
            return Err(FactorError::NonFinite {
                what: self.describe(),
                value: m.data[i],
                row: i / m.cols.max(1),
                col: i % m.cols.max(1),
            }
            .into());
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
            Factor::Spooled { spool, offset, .. } => {
                format!("scratch file in {} at byte {offset}", spool.dir.display())
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

pub(super) fn scale_of(alpha: f64, rank: usize) -> f64 {
    if rank == 0 {
        0.0
    } else {
        alpha / rank as f64
    }
}

/// One adapter's update of one base tensor in that tensor's own row-major layout: `ΔW = scale·B·A`
/// with `A` `rank × n_cols` and `B` `n_rows × rank`, rows and columns those of the GGUF base tensor
/// (`n_cols = ne[0]`). For `token_embd` (rows are tokens) that is `B = Aᵀ` of the adapter (one row
/// of `rank` per token) and `A = Bᵀ`: the embedding of token `t` changes by `scale·B[t]·A`, and a
/// tied output head's logits by `scale·B·(A·h)`. What the merge kernel adds and what the runtime
/// LoRA of `verify` applies, so that both see one form.
#[derive(Clone, Debug)]
pub struct LowRank {
    /// `rank × n_cols` row-major (stacked experts: one such block per expert).
    pub a: Vec<f32>,
    /// `n_rows × rank` row-major; stacked experts: rows follow the base's (expert-major).
    pub b: Vec<f32>,
    pub rank: usize,
    /// Stacked experts; 1 for a plain matrix.
    pub n_expert: usize,
    /// The adapter's own effective scale (alpha/rank), without the user's.
    pub scale: f32,
    /// DoRA magnitude per output row; `None` for plain LoRA.
    pub magnitude: Option<Vec<f32>>,
}

impl LowRank {
    /// Rows of the base tensor it updates.
    pub fn n_rows(&self) -> usize {
        self.b.len().checked_div(self.rank).unwrap_or(0)
    }

    /// Columns of the base tensor it updates.
    pub fn n_cols(&self) -> usize {
        self.a
            .len()
            .checked_div(self.rank * self.n_expert.max(1))
            .unwrap_or(0)
    }

    /// Expert `e`'s blocks of `A` (`rank × n_cols`) and `B` (its rows × `rank`); for a plain matrix
    /// (`e` 0) the whole factors. `None` when `e` is out of range or the factors do not divide
    /// into `n_expert` blocks.
    pub fn expert_factors(&self, e: usize) -> Option<(&[f32], &[f32])> {
        let n = self.n_expert.max(1);
        let block = n.checked_mul(self.rank).filter(|&b| b > 0)?;
        if e >= n || !self.a.len().is_multiple_of(block) || !self.b.len().is_multiple_of(block) {
            return None;
        }
        let (a_len, b_len) = (self.a.len() / n, self.b.len() / n);
        Some((
            &self.a[e * a_len..(e + 1) * a_len],
            &self.b[e * b_len..(e + 1) * b_len],
        ))
    }
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

/// One part of a [`Layout::Fused`] target: its output rows, and its LoRA unless the adapter leaves
/// that part alone.
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
}
