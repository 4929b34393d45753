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
pub mod check;
mod combine;
pub mod gguf;
mod matrix;
mod model;
mod open;
pub mod peft;
pub mod source;

use std::path::PathBuf;

pub use bundle::BundleError;
pub use check::{check_against_base, Issue, IssueKind};
pub use combine::permute_rows;
pub use gguf::LoraFileError;
pub use matrix::Matrix;
pub use model::{
    ConcatPart, Factor, FactorError, FusedPart, Layout, LoadedLora, LoraPair, LoraTensor, LowRank,
    Spool, Window,
};
pub use peft::{ConfigError, PeftError};
pub use source::SourceError;

use crate::gguf::GgufError;
use crate::safetensors_file::SafetensorsError;
pub use open::{detect, open, split_scale, ArchMismatch, Opened, ScaleSuffix};

/// Errors from reading an adapter or materializing its tensors. The format errors are boxed: they
/// carry paths and names, and an error should stay small on the success path.
#[derive(Debug, thiserror::Error)]
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
    Source(Box<SourceError>),
    #[error(transparent)]
    Factor(Box<FactorError>),
    /// A GGUF adapter made for another architecture than the base's (see [`Opened::same_arch`]).
    #[error("{}: the adapter is for {}, the base is '{base}'", path.display(), quoted_or(adapter, "no stated architecture"))]
    ArchMismatch {
        path: PathBuf,
        adapter: Option<String>,
        base: String,
    },
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
    Source(SourceError),
    Factor(FactorError),
);

/// `'value'`, or `missing` when there is none: how messages show an optional name.
pub(crate) fn quoted_or(v: &Option<String>, missing: &str) -> String {
    v.as_ref()
        .map_or_else(|| missing.to_string(), |s| format!("'{s}'"))
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

impl SourceFormat {
    /// The word reports and provenance keys use.
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Peft => "peft",
            SourceFormat::Gguf => "gguf",
        }
    }
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

/// An adapter refused for writing as a GGUF LoRA: every offender listed, and what to do instead.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot convert: {summary}:\n{}\n{hint}", input.display(), lines.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n"))]
pub struct Refusal {
    pub input: PathBuf,
    pub summary: String,
    pub lines: Vec<String>,
    pub hint: String,
}

impl Refusal {
    /// Modules that do not fit the base.
    pub fn misfits(input: &std::path::Path, issues: &[Issue]) -> Option<Refusal> {
        if issues.is_empty() {
            return None;
        }
        let lines: Vec<String> = issues
            .iter()
            .map(|i| match &i.target {
                Some(t) => format!("{} → {t}: {}", i.source, i.message),
                None => format!("{}: {}", i.source, i.message),
            })
            .collect();
        Some(Refusal {
            input: input.to_path_buf(),
            summary: format!("{} module(s) do not fit", lines.len()),
            lines,
            hint: "nothing was written; check that the adapter was trained on this base model"
                .into(),
        })
    }

    /// What a GGUF LoRA cannot hold (DoRA, LoRA biases, full tensors).
    pub fn unrepresentable(input: &std::path::Path, adapter: &Adapter) -> Option<Refusal> {
        let lines = adapter.unrepresentable();
        if lines.is_empty() {
            return None;
        }
        Some(Refusal {
            input: input.to_path_buf(),
            summary: format!("{} tensor(s) cannot be expressed in a GGUF LoRA", lines.len()),
            lines,
            hint: "nothing was written; use `gguf-lora merge BASE.gguf --lora ADAPTER`, which applies DoRA, modules_to_save and LoRA biases exactly".into(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::TargetKind;

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

    /// Regression (issue 11): fused parts reading inputs of different widths made `load` panic on a
    /// slice copy; they are an error naming the part.
    #[test]
    fn fused_parts_of_other_input_widths_are_an_error() {
        let t = tensor(Layout::Fused(vec![
            FusedPart {
                rows: 2,
                pair: Some(pair(m(1, 3, |_, c| c as f32), m(2, 1, |_, _| 1.), 1.0)),
            },
            FusedPart {
                rows: 2,
                pair: Some(pair(m(1, 4, |_, c| c as f32), m(2, 1, |_, _| 1.), 1.0)),
            },
        ]));
        let err = t.load().unwrap_err();
        assert!(
            matches!(&err, AdapterError::Factor(e) if matches!(**e, FactorError::FusedInputs { n_in: 4, expected: 3, .. })),
            "{err}"
        );
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
