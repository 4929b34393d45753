//! Runtime LoRA, applied inside the forward pass exactly as llama.cpp applies it
//! (`src/llama-graph.cpp` `build_lora_mm`, `build_inp_embd`).
//!
//! Every adapted matrix computes `y = W·x + Σ scaleᵢ·Bᵢ·(Aᵢ·x)` over all loaded adapters, with
//! `scale = user × alpha / rank` (`user` when alpha is 0; `llama_adapter_lora_weight::get_scale`).
//! Each term is the adapter's update in the base tensor's own layout ([`LowRank`], the form merge
//! adds too). Token embeddings are the exception to the product: their rows are tokens, so the
//! delta of token `t` is `scale·B[t]·A` (llama.cpp's `get_rows` of the stored, transposed `lora_a`).

use std::collections::HashMap;

use super::error::{LoraProblem, Result, VerifyError};
use super::matmul::{matmul, Operand};
use crate::adapter::{Adapter, LowRank};

/// The tensor whose LoRA is applied at lookup rather than as a product.
pub const TOKEN_EMBD: &str = "token_embd.weight";

/// One adapter's low-rank update of one base tensor, at its user scale.
#[derive(Clone, Debug)]
pub struct LoraTerm {
    /// The update in the base tensor's layout (`A`: `rank × n_in`, `B`: `n_out × rank`; for
    /// [`TOKEN_EMBD`] `B` has one row of `rank` per token).
    pub lr: LowRank,
    /// The user's scale; the adapter's own is `lr.scale`.
    pub user_scale: f32,
}

impl LoraTerm {
    /// The effective scale: user scale × alpha / rank.
    pub fn scale(&self) -> f32 {
        self.user_scale * self.lr.scale
    }
}

/// All adapters to apply, grouped by the base tensor they adapt (GGUF names, `blk.0.attn_q.weight`).
#[derive(Clone, Debug, Default)]
pub struct RuntimeLora {
    terms: HashMap<String, Vec<LoraTerm>>,
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
        if term.scale() == 0.0 {
            return;
        }
        self.terms.entry(tensor.to_string()).or_default().push(term);
    }

    pub fn get(&self, tensor: &str) -> &[LoraTerm] {
        self.terms.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Adds every LoRA tensor of a normalized adapter (from [`crate::adapter::open`]) at
    /// `user_scale`. Full replacement tensors are not LoRA and are left out, as llama.cpp's loader
    /// skips a GGUF adapter's `*_norm.weight`; callers that must refuse them check
    /// [`Adapter::unrepresentable`].
    pub fn add_adapter(&mut self, adapter: &Adapter, user_scale: f32) -> Result<()> {
        for t in &adapter.tensors {
            let term = LoraTerm {
                lr: t.low_rank()?,
                user_scale,
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
        let xs = &x[rows.start * n_in..rows.end * n_in];
        let ys = &mut y[rows.start * n_out..rows.end * n_out];
        self.apply_to(tensor, None, xs, ys, n_in, n_out)
    }

    /// `y += Σ scale·B_e·(A_e·x)` for expert `expert` of the stacked tensor `tensor` (every row of
    /// `x`, `n_in` each, and of `y`, `n_out` each: the tokens routed to that expert), as llama.cpp's
    /// `build_lora_mm_id` applies an expert adapter.
    pub fn apply_expert(
        &self,
        tensor: &str,
        expert: usize,
        x: &[f32],
        y: &mut [f32],
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        self.apply_to(tensor, Some(expert), x, y, n_in, n_out)
    }

    fn apply_to(
        &self,
        tensor: &str,
        expert: Option<usize>,
        xs: &[f32],
        ys: &mut [f32],
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        let terms = self.get(tensor);
        let n_tok = xs.len() / n_in.max(1);
        if terms.is_empty() || n_tok == 0 {
            return Ok(());
        }
        for term in terms {
            let lr = &term.lr;
            // A plain term is applied whole, a stacked one per expert (never one for the other).
            let factors = match expert {
                Some(e) if lr.n_expert > 1 => lr.expert_factors(e),
                None if lr.n_expert <= 1 => lr.expert_factors(0),
                _ => None,
            }
            .filter(|(a, b)| a.len() == lr.rank * n_in && b.len() == n_out * lr.rank);
            let Some((a, b)) = factors else {
                return Err(VerifyError::Lora {
                    tensor: tensor.to_string(),
                    problem: LoraProblem::Shapes {
                        a: lr.a.len(),
                        b: lr.b.len(),
                        rank: lr.rank,
                        n_in,
                        n_out,
                    },
                });
            };
            let ax = matmul(&Operand::F32 { rows: a, n_in }, xs, n_tok)?;
            let bax = matmul(
                &Operand::F32 {
                    rows: b,
                    n_in: lr.rank,
                },
                &ax,
                n_tok,
            )?;
            let scale = term.scale();
            for (dst, d) in ys.iter_mut().zip(&bax) {
                *dst += scale * d;
            }
        }
        Ok(())
    }

    /// Adds the token-embedding deltas `scale·B[token]·A` to `embd` (rows of `n_embd`).
    pub fn apply_embedding(&self, tokens: &[u32], embd: &mut [f32], n_embd: usize) -> Result<()> {
        for term in self.get(TOKEN_EMBD) {
            let (lr, r) = (&term.lr, term.lr.rank);
            if lr.a.len() != n_embd * r {
                return Err(VerifyError::Lora {
                    tensor: TOKEN_EMBD.to_string(),
                    problem: LoraProblem::EmbeddingB {
                        b: lr.a.len(),
                        n_embd,
                        rank: r,
                    },
                });
            }
            let scale = term.scale();
            for (t, &tok) in tokens.iter().enumerate() {
                let b_row = lr.b.get(tok as usize * r..(tok as usize + 1) * r).ok_or(
                    VerifyError::Lora {
                        tensor: TOKEN_EMBD.to_string(),
                        problem: LoraProblem::NoRow { token: tok },
                    },
                )?;
                for (o, dst) in embd[t * n_embd..(t + 1) * n_embd].iter_mut().enumerate() {
                    // Σ_k A[k][o]·B[tok][k], in rank order.
                    let d: f32 = (0..r).map(|k| lr.a[k * n_embd + o] * b_row[k]).sum();
                    *dst += scale * d;
                }
            }
        }
        Ok(())
    }

    /// Tied output with an embedding LoRA: logits += scale·B·(A·h), the product with the adapted
    /// embedding matrix `E + scale·B·A`, over the token rows `rows` of `h` (rows of `n_embd`) and `y`
    /// (rows of `n_vocab`).
    pub fn apply_tied_output(
        &self,
        h: &[f32],
        y: &mut [f32],
        n_embd: usize,
        n_vocab: usize,
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        for term in self.get(TOKEN_EMBD) {
            let (lr, r) = (&term.lr, term.lr.rank);
            if lr.b.len() != n_vocab * r || lr.a.len() != n_embd * r {
                return Err(VerifyError::Lora {
                    tensor: TOKEN_EMBD.to_string(),
                    problem: LoraProblem::Tied {
                        a: lr.b.len(),
                        b: lr.a.len(),
                        n_vocab,
                        n_embd,
                        rank: r,
                    },
                });
            }
            let mut a_h = vec![0f32; rows.len() * r];
            for (i, t) in rows.clone().enumerate() {
                let ht = &h[t * n_embd..(t + 1) * n_embd];
                for (o, hv) in ht.iter().enumerate() {
                    for j in 0..r {
                        a_h[i * r + j] += lr.a[j * n_embd + o] * hv;
                    }
                }
            }
            let d = matmul(
                &Operand::F32 {
                    rows: &lr.b,
                    n_in: r,
                },
                &a_h,
                rows.len(),
            )?;
            let scale = term.scale();
            for (dst, v) in y[rows.start * n_vocab..rows.end * n_vocab]
                .iter_mut()
                .zip(&d)
            {
                *dst += scale * v;
            }
        }
        Ok(())
    }
}
