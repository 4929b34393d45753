//! Runtime LoRA, applied inside the forward pass exactly as llama.cpp applies it
//! (`src/llama-graph.cpp` `build_lora_mm`, `build_inp_embd`).
//!
//! Every adapted matrix computes `y = W·x + Σ scaleᵢ·Bᵢ·(Aᵢ·x)` over all loaded adapters, with
//! `scale = user × alpha / rank` (`user` when alpha is 0; `llama_adapter_lora_weight::get_scale`).
//! Token embeddings are the exception: their `lora_a` is stored transposed (one row of `rank` per
//! token), and the delta of token `t` is `scale·B·A[t]`.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use super::matmul::{matmul, Matrix};
use crate::adapter::{Adapter, TargetKind};

/// The tensor whose LoRA is applied at lookup rather than as a product.
pub const TOKEN_EMBD: &str = "token_embd.weight";

/// One adapter's low-rank update of one base tensor.
#[derive(Clone, Debug)]
pub struct LoraTerm {
    /// `rank × n_in` row-major; for [`TOKEN_EMBD`] `n_vocab × rank` (one row per token).
    pub a: Vec<f32>,
    /// `n_out × rank` row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    /// Effective scale (user scale × alpha / rank).
    pub scale: f32,
}

/// All adapters to apply, grouped by the base tensor they adapt (GGUF names, `blk.0.attn_q.weight`).
#[derive(Clone, Debug, Default)]
pub struct RuntimeLora {
    terms: HashMap<String, Vec<LoraTerm>>,
}

/// llama.cpp's effective scale: `user × alpha / rank`, or `user` when the adapter has no alpha.
pub fn effective_scale(user: f32, alpha: f32, rank: usize) -> f32 {
    if alpha != 0.0 {
        user * alpha / rank as f32
    } else {
        user
    }
}

impl RuntimeLora {
    pub fn new() -> RuntimeLora {
        RuntimeLora::default()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Base tensors with at least one term.
    pub fn tensors(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().map(String::as_str)
    }

    /// Adds a term for base tensor `tensor` (shapes are checked against the base at use).
    /// A zero scale adds nothing, as `llama_set_adapters_lora` skips such adapters.
    pub fn add(&mut self, tensor: &str, term: LoraTerm) {
        if term.scale == 0.0 {
            return;
        }
        self.terms.entry(tensor.to_string()).or_default().push(term);
    }

    pub fn get(&self, tensor: &str) -> &[LoraTerm] {
        self.terms.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Adds every LoRA tensor of a normalized adapter (read from a GGUF LoRA file by
    /// [`crate::adapter::gguf::read`] or from PEFT by [`crate::adapter::peft::read`]) at `user_scale`.
    /// Full replacement tensors are not LoRA and are left out, as llama.cpp's loader skips a GGUF
    /// adapter's `*_norm.weight`; callers that must refuse them check [`Adapter::unrepresentable`].
    pub fn add_adapter(&mut self, adapter: &Adapter, user_scale: f32) -> Result<()> {
        for t in &adapter.tensors {
            let loaded = t.load()?;
            let scale = user_scale * loaded.scale() as f32;
            let term = match t.kind {
                TargetKind::Linear => LoraTerm {
                    a: loaded.a.data,
                    b: loaded.b.data,
                    rank: loaded.rank,
                    scale,
                },
                // Normalized A is rank × n_vocab; the runtime looks rows up per token.
                TargetKind::Embedding => LoraTerm {
                    a: loaded.a.transposed().data,
                    b: loaded.b.data,
                    rank: loaded.rank,
                    scale,
                },
                TargetKind::Experts => bail!(
                    "{}: {} is a stacked expert tensor; verify does not run MoE models",
                    adapter.provenance.path.display(),
                    t.target
                ),
            };
            self.add(&t.target, term);
        }
        Ok(())
    }

    /// `y += Σ scale·B·(A·x)` for the terms of `tensor`, over the token rows `rows` of `x`/`y`
    /// (`x`: rows of `n_in`, `y`: rows of `n_out`).
    pub fn apply(
        &self,
        tensor: &str,
        x: &[f32],
        y: &mut [f32],
        n_in: usize,
        n_out: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        let terms = self.get(tensor);
        if terms.is_empty() || rows.is_empty() {
            return Ok(());
        }
        let n_tok = rows.len();
        let xs = &x[rows.start * n_in..rows.end * n_in];
        for term in terms {
            if term.a.len() != term.rank * n_in || term.b.len() != n_out * term.rank {
                bail!(
                    "LoRA for {tensor}: A has {} values and B {}, expected {} x {n_in} and {n_out} x {}",
                    term.a.len(),
                    term.b.len(),
                    term.rank,
                    term.rank
                );
            }
            let ax = matmul(
                &Matrix::F32 {
                    rows: &term.a,
                    n_in,
                },
                xs,
                n_tok,
            )?;
            let bax = matmul(
                &Matrix::F32 {
                    rows: &term.b,
                    n_in: term.rank,
                },
                &ax,
                n_tok,
            )?;
            for (dst, d) in y[rows.start * n_out..rows.end * n_out].iter_mut().zip(&bax) {
                *dst += term.scale * d;
            }
        }
        Ok(())
    }

    /// Adds the token-embedding deltas `scale·B·A[token]` to `embd` (rows of `n_embd`).
    pub fn apply_embedding(&self, tokens: &[u32], embd: &mut [f32], n_embd: usize) -> Result<()> {
        for term in self.get(TOKEN_EMBD) {
            if term.b.len() != n_embd * term.rank {
                bail!(
                    "LoRA for {TOKEN_EMBD}: B has {} values, expected {n_embd} x {}",
                    term.b.len(),
                    term.rank
                );
            }
            for (t, &tok) in tokens.iter().enumerate() {
                let a_row = term
                    .a
                    .get(tok as usize * term.rank..(tok as usize + 1) * term.rank)
                    .with_context(|| format!("LoRA for {TOKEN_EMBD}: no row for token {tok}"))?;
                for (o, dst) in embd[t * n_embd..(t + 1) * n_embd].iter_mut().enumerate() {
                    let b_row = &term.b[o * term.rank..(o + 1) * term.rank];
                    let d: f32 = b_row.iter().zip(a_row).map(|(b, a)| b * a).sum();
                    *dst += term.scale * d;
                }
            }
        }
        Ok(())
    }
}
