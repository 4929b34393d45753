//! A transformer forward pass over GGUF weights, following llama.cpp's graphs
//! (`src/models/{llama,qwen2,qwen3,gemma,gemma2,gemma3,phi3}.cpp`) operation by operation.
//!
//! Activations are f32; weights are decoded block by block inside each product ([`matmul`]), so the
//! only large buffers are the K×vocab logits. Several *streams* (the same tokens under different
//! runtime-LoRA sets, e.g. none and the adapters) run through one pass: each weight is decoded once
//! and multiplied with every stream's activations, and only the LoRA terms and attention are per
//! stream.
//!
//! A [`Session`] keeps each stream's keys and values (its KV cache), so that tokens can be fed a
//! few at a time: generation costs one token per step, not a recompute of the whole sequence. The
//! final projection to the vocabulary is a separate step ([`Session::head`]) over any range of
//! positions, so that a long sequence never needs all of its positions × vocabulary logits at once.
//! [`Model::logits`] is a session fed everything at once.
//!
//! Where llama.cpp's CPU kernels differ from exact arithmetic on purpose we follow them: GELU goes
//! through ggml's f16 lookup table (`GGML_GELU_FP16`), RoPE angles are computed as in
//! `ggml_rope_cache_init`. Not emulated: the f16 KV cache (tests run llama.cpp with an f32 cache)
//! and the Q8 rounding of activations that ggml applies before products with quantized weights.

use super::error::{ModelProblem, Result, VerifyError};
use super::hparams::HParams;
use super::lora::{RuntimeLora, TOKEN_EMBD};
use super::matmul::{matmul, matmul_batched, Operand};
use super::ops::{apply_rope, attention, gelu_ggml, rms_norm, silu, KvRows};
use super::source::{TensorRef, WeightSource};
use crate::quant::vec_dot::{round_activations, vec_dot_type};

/// Sees the input of every product with a weight as the forward pass runs, layer by layer, with
/// each stream's runtime LoRA already applied to what came before: what a calibration pass needs
/// (the statistics of each linear's inputs in the adapted model). `x` holds the `n_tok` token rows
/// of `n_in` values of stream `stream` (its index in the `loras` given to [`Model::logits_with`]).
pub trait LinearInputs: Sync {
    fn observe(&self, tensor: &str, stream: usize, x: &[f32], n_in: usize);

    /// The input of expert `expert` of the stacked tensor `tensor` (`ffn_*_exps`): the rows of the
    /// tokens of stream `stream` routed to that expert, in token order. Unobserved by default.
    fn observe_expert(
        &self,
        _tensor: &str,
        _expert: usize,
        _stream: usize,
        _x: &[f32],
        _n_in: usize,
    ) {
    }

    /// Whether the pass should go on to the output head once the layers are done (a calibration
    /// pass that only needs the layers' inputs says no, and [`Model::logits_with`] returns no
    /// logits).
    fn wants_logits(&self) -> bool {
        true
    }
}

/// A model ready to run: its weights and hyperparameters.
pub struct Model<'a> {
    src: &'a dyn WeightSource,
    pub hp: HParams,
    /// Round activations as llama.cpp's CPU kernels do before each product (see
    /// [`Model::with_llama_cpp_activations`]).
    llama_cpp_activations: bool,
    /// Weight products through the GEMM ([`matmul_batched`]): see [`Model::batched_products`].
    batched: bool,
    /// Each layer's weights, by name prefix, released after each use (see
    /// [`Model::releasing_weights`]); empty when off.
    layer_tensors: Vec<Vec<String>>,
}

/// Logits of one stream: `n_tokens` rows of `n_vocab`.
#[derive(Clone, Debug)]
pub struct Logits {
    pub n_tokens: usize,
    pub n_vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.n_vocab..(t + 1) * self.n_vocab]
    }
}

/// Activations of all streams: `n_streams * n_tok` rows, for positions `pos0..pos0 + n_tok`.
struct Batch<'l> {
    n_tok: usize,
    pos0: usize,
    /// Context size the session was made for (phi3 picks its RoPE factors by it).
    n_ctx: usize,
    loras: &'l [Option<&'l RuntimeLora>],
    observer: Option<&'l dyn LinearInputs>,
}

impl Batch<'_> {
    fn rows(&self) -> usize {
        self.n_tok * self.loras.len()
    }
}

/// Shows `batch`'s observer the input `x` of a product with `tensor` (`n_in` values per row, the
/// streams one after another).
fn show_inputs(batch: &Batch, tensor: &str, x: &[f32], n_in: usize) {
    if let Some(obs) = batch.observer {
        for s in 0..batch.loras.len() {
            let rows = &x[s * batch.n_tok * n_in..(s + 1) * batch.n_tok * n_in];
            obs.observe(tensor, s, rows, n_in);
        }
    }
}

/// Hidden states after the output norm, as [`Session::feed`] returns them: per stream, `n_tok` rows
/// of `n_embd`, ready for [`Session::head`].
#[derive(Clone, Debug)]
pub struct Hidden {
    pub n_tok: usize,
    pub n_streams: usize,
    n_embd: usize,
    data: Vec<f32>,
}

impl Hidden {
    /// Rows `rows` of every stream, stream after stream.
    fn rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let e = self.n_embd;
        let mut out = Vec::with_capacity(self.n_streams * rows.len() * e);
        for s in 0..self.n_streams {
            let first = s * self.n_tok;
            out.extend_from_slice(&self.data[(first + rows.start) * e..(first + rows.end) * e]);
        }
        out
    }
}

/// One causal sequence per stream, run incrementally with a KV cache.
///
/// Streams are the same model under different runtime-LoRA sets (see the module doc); each may
/// read its own tokens (generation, where the streams' greedy choices differ), but all advance
/// together by the same number of positions.
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    loras: Vec<Option<&'m RuntimeLora>>,
    observer: Option<&'m dyn LinearInputs>,
    n_ctx: usize,
    pos: usize,
    /// `kv[layer][stream]`.
    kv: Vec<Vec<KvRows>>,
}

impl<'m, 'a> Session<'m, 'a> {
    /// Positions fed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn n_streams(&self) -> usize {
        self.loras.len()
    }

    /// Runs the next `tokens[s].len()` tokens of each stream `s` (all the same length) at the next
    /// positions, appending their keys and values to the cache.
    pub fn feed(&mut self, tokens: &[&[u32]]) -> Result<Hidden> {
        let n_tok = tokens.first().map_or(0, |t| t.len());
        if n_tok == 0 || tokens.len() != self.loras.len() || tokens.iter().any(|t| t.len() != n_tok)
        {
            return Err(VerifyError::NoTokens);
        }
        if self.pos + n_tok > self.n_ctx {
            return Err(VerifyError::ContextFull {
                n_ctx: self.n_ctx,
                need: self.pos + n_tok,
            });
        }
        let batch = Batch {
            n_tok,
            pos0: self.pos,
            n_ctx: self.n_ctx,
            loras: &self.loras,
            observer: self.observer,
        };
        let m = self.model;
        let x = m.embed(tokens, &batch)?;
        let mut x = x;
        for (il, kv) in self.kv.iter_mut().enumerate() {
            x = m.layer(il, x, &batch, kv)?;
            for name in m.layer_tensors.get(il).into_iter().flatten() {
                m.src.release(name);
            }
        }
        let n_embd = m.hp.n_embd;
        let norm = m.vector("output_norm.weight", n_embd)?;
        let h = rms_norm(&x, n_embd, &norm, m.hp.rms_eps);
        self.pos += n_tok;
        Ok(Hidden {
            n_tok,
            n_streams: self.loras.len(),
            n_embd,
            data: h,
        })
    }

    /// Logits of positions `rows` (indices into the rows of `hidden`), one [`Logits`] per stream.
    pub fn head(&self, hidden: &Hidden, rows: std::ops::Range<usize>) -> Result<Vec<Logits>> {
        if rows.is_empty() || rows.end > hidden.n_tok || hidden.n_streams != self.loras.len() {
            return Err(VerifyError::NoTokens);
        }
        let batch = Batch {
            n_tok: rows.len(),
            pos0: 0,
            n_ctx: self.n_ctx,
            loras: &self.loras,
            observer: self.observer,
        };
        self.model.head(&hidden.rows(rows), &batch)
    }

    /// Feeds one token per stream and returns each stream's logits for the next position.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let per_stream: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        let h = self.feed(&per_stream)?;
        Ok(self.head(&h, 0..1)?.into_iter().map(|l| l.data).collect())
    }
}

impl<'a> Model<'a> {
    /// Reads the hyperparameters; fails for architectures we do not implement.
    pub fn new(src: &'a dyn WeightSource) -> Result<Model<'a>> {
        let hp = HParams::read(src)?;
        Ok(Model {
            src,
            hp,
            llama_cpp_activations: false,
            batched: false,
            layer_tensors: Vec::new(),
        })
    }

    /// Releases each layer's mapped weights after the layer runs, so that a pass over a whole
    /// model holds one layer's pages, not the model's (the calibration pass, which reads each
    /// weight once; a later read maps the pages back from the page cache).
    pub fn releasing_weights(mut self) -> Model<'a> {
        let names = self.src.tensor_names();
        self.layer_tensors = (0..self.hp.n_layer)
            .map(|il| {
                let prefix = format!("blk.{il}.");
                names
                    .iter()
                    .filter(|n| n.starts_with(&prefix))
                    .cloned()
                    .collect()
            })
            .collect();
        self
    }

    /// Makes every product with a weight round its input activations the way llama.cpp's CPU
    /// backend does (to f16/bf16 for F16/BF16 weights, to Q8_0/Q8_1/Q8_K blocks for quantized
    /// ones). Off by default: verify compares exact products; on, our logits meet llama.cpp's on
    /// quantized models to summation order, which is how the tests pin the quantized forward pass.
    pub fn with_llama_cpp_activations(mut self, on: bool) -> Model<'a> {
        self.llama_cpp_activations = on;
        self
    }

    /// Computes weight products with many tokens by GEMM ([`matmul_batched`]): several times
    /// faster, to f32 accuracy, but a position's activations then depend on what it was batched
    /// with, so KV-cache sessions no longer reproduce a full pass bit for bit. For calibration,
    /// which runs each chunk once; verify keeps the default.
    pub fn batched_products(mut self) -> Model<'a> {
        self.batched = true;
        self
    }

    /// `W·x` with `x` rounded as llama.cpp would round it (when asked to).
    fn product(&self, w: TensorRef, x: &[f32], n_rows: usize) -> Result<Vec<f32>> {
        match vec_dot_type(w.ty).filter(|_| self.llama_cpp_activations) {
            Some(ty) => {
                let n_in = w.row_len();
                if ty.row_bytes(n_in as u64).is_none() {
                    return Err(VerifyError::ActivationBlocks {
                        n_in,
                        ty: ty.name(),
                    });
                }
                let xr = round_activations(ty, x, n_in)?;
                self.weight_product(w, &xr, n_rows)
            }
            None => self.weight_product(w, x, n_rows),
        }
    }

    fn weight_product(&self, w: TensorRef, x: &[f32], n_rows: usize) -> Result<Vec<f32>> {
        if self.batched {
            matmul_batched(&Operand::Tensor(w), x, n_rows)
        } else {
            matmul(&Operand::Tensor(w), x, n_rows)
        }
    }

    fn problem(&self, problem: ModelProblem) -> VerifyError {
        VerifyError::Model {
            model: self.src.describe(),
            problem,
        }
    }

    fn missing(&self, name: &str) -> VerifyError {
        self.problem(ModelProblem::MissingTensor {
            tensor: name.to_string(),
            arch: self.hp.arch.name(),
        })
    }

    pub fn n_vocab(&self) -> Result<usize> {
        Ok(self.weight(TOKEN_EMBD)?.n_rows())
    }

    fn weight(&self, name: &str) -> Result<TensorRef<'a>> {
        self.src.tensor(name).ok_or_else(|| self.missing(name))
    }

    /// A small tensor (norm, bias) as f32 with `len` values, if present.
    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        let Some(t) = self.src.tensor(name) else {
            return Ok(None);
        };
        if t.row_len() * t.n_rows() != len {
            return Err(self.problem(ModelProblem::VectorShape {
                tensor: name.to_string(),
                dims: t.dims.to_vec(),
                len,
            }));
        }
        Ok(Some(t.to_f32()?))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.opt_vector(name, len)?
            .ok_or_else(|| self.missing(name))
    }

    /// `W·x` (+ each stream's LoRA terms, + the bias `NAME.bias` if present): llama.cpp's
    /// `build_lora_mm` followed by the bias add.
    fn linear(
        &self,
        name: &str,
        x: &[f32],
        n_in: usize,
        batch: &Batch,
    ) -> Result<(Vec<f32>, usize)> {
        let w = self.weight(name)?;
        if w.row_len() != n_in || w.dims.len() > 2 {
            return Err(self.problem(ModelProblem::LinearShape {
                tensor: name.to_string(),
                dims: w.dims.to_vec(),
                n_in,
            }));
        }
        show_inputs(batch, name, x, n_in);
        let n_out = w.n_rows();
        let mut y = self.product(w, x, batch.rows())?;
        for (s, lora) in batch.loras.iter().enumerate() {
            if let Some(lora) = lora {
                lora.apply(
                    name,
                    x,
                    &mut y,
                    n_in,
                    n_out,
                    s * batch.n_tok..(s + 1) * batch.n_tok,
                )?;
            }
        }
        let bias_name = name.strip_suffix(".weight").map(|b| format!("{b}.bias"));
        if let Some(bias) = bias_name.and_then(|b| self.opt_vector(&b, n_out).transpose()) {
            let bias = bias?;
            for row in y.chunks_exact_mut(n_out) {
                for (v, b) in row.iter_mut().zip(&bias) {
                    *v += b;
                }
            }
        }
        Ok((y, n_out))
    }

    /// A session of one stream per entry of `loras` (`None` = the bare model) for up to `n_ctx`
    /// positions.
    pub fn session<'m>(
        &'m self,
        loras: &[Option<&'m RuntimeLora>],
        n_ctx: usize,
    ) -> Session<'m, 'a> {
        Session {
            model: self,
            loras: loras.to_vec(),
            observer: None,
            n_ctx,
            pos: 0,
            kv: vec![vec![KvRows::default(); loras.len()]; self.hp.n_layer],
        }
    }

    /// Logits for `tokens` (positions 0..K-1, one causal sequence) under each LoRA set of `loras`
    /// (`None` = the bare model); one [`Logits`] per entry.
    pub fn logits(&self, tokens: &[u32], loras: &[Option<&RuntimeLora>]) -> Result<Vec<Logits>> {
        self.logits_with(tokens, loras, None)
    }

    /// [`Model::logits`], showing `observer` the input of every product with a weight.
    pub fn logits_with(
        &self,
        tokens: &[u32],
        loras: &[Option<&RuntimeLora>],
        observer: Option<&dyn LinearInputs>,
    ) -> Result<Vec<Logits>> {
        if tokens.is_empty() || loras.is_empty() {
            return Err(VerifyError::NoTokens);
        }
        let mut session = self.session(loras, tokens.len());
        session.observer = observer;
        let per_stream = vec![tokens; loras.len()];
        let h = session.feed(&per_stream)?;
        if observer.is_some_and(|o| !o.wants_logits()) {
            return Ok(Vec::new());
        }
        session.head(&h, 0..tokens.len())
    }

    /// Runs each of `chunks` (its own causal sequence from position 0, as [`Model::logits_with`]
    /// runs one) through the layers only, layer-major: every chunk through layer 0, then every
    /// chunk through layer 1, and so on, calling `layer_done(il)` once all chunks are through layer
    /// `il`. What `observer` sees is what the chunk-major pass shows it, bit for bit (each chunk's
    /// products are the same), but a calibration can reduce one layer's records to statistics
    /// before the next layer's exist, and each layer's weights are decoded once, not per chunk.
    pub fn run_layers(
        &self,
        chunks: &[&[u32]],
        loras: &[Option<&RuntimeLora>],
        observer: &dyn LinearInputs,
        layer_done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        if chunks.is_empty() || chunks.iter().any(|c| c.is_empty()) || loras.is_empty() {
            return Err(VerifyError::NoTokens);
        }
        let batches: Vec<Batch> = chunks
            .iter()
            .map(|c| Batch {
                n_tok: c.len(),
                pos0: 0,
                n_ctx: c.len(),
                loras,
                observer: Some(observer),
            })
            .collect();
        let mut hidden = chunks
            .iter()
            .zip(&batches)
            .map(|(c, b)| self.embed(&vec![*c; loras.len()], b))
            .collect::<Result<Vec<_>>>()?;
        for il in 0..self.hp.n_layer {
            for (x, batch) in hidden.iter_mut().zip(&batches) {
                // Each chunk attends only within itself, so its keys and values live for one layer.
                let mut kv = vec![KvRows::default(); loras.len()];
                *x = self.layer(il, std::mem::take(x), batch, &mut kv)?;
            }
            for name in self.layer_tensors.get(il).into_iter().flatten() {
                self.src.release(name);
            }
            layer_done(il);
        }
        // The head is not run, but its input is shown: a calibration that recodes the output head
        // (or a tied embedding) weights its errors by what the head reads.
        let n_embd = self.hp.n_embd;
        let norm = self.vector("output_norm.weight", n_embd)?;
        let head = self.head_tensor();
        for (x, batch) in hidden.iter().zip(&batches) {
            let h = rms_norm(x, n_embd, &norm, self.hp.rms_eps);
            show_inputs(batch, head, &h, n_embd);
        }
        Ok(())
    }

    /// The tensor the output projection multiplies by: `output.weight`, or the token embedding
    /// when the model ties its head to it.
    fn head_tensor(&self) -> &'static str {
        if self.src.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            TOKEN_EMBD
        }
    }

    /// Token embeddings of every stream (get_rows, then the embedding LoRA, then gemma's scale).
    fn embed(&self, tokens: &[&[u32]], batch: &Batch) -> Result<Vec<f32>> {
        let (n_tok, n_embd) = (batch.n_tok, self.hp.n_embd);
        let embd = self.weight(TOKEN_EMBD)?;
        let n_vocab = embd.n_rows();
        if embd.row_len() != n_embd {
            return Err(self.problem(ModelProblem::EmbeddingShape {
                tensor: TOKEN_EMBD,
                dims: embd.dims.to_vec(),
                n_embd,
            }));
        }
        let mut x = vec![0f32; batch.rows() * n_embd];
        for (s, lora) in batch.loras.iter().enumerate() {
            let rows = &mut x[s * n_tok * n_embd..(s + 1) * n_tok * n_embd];
            for (t, &tok) in tokens[s].iter().enumerate() {
                if tok as usize >= n_vocab {
                    return Err(VerifyError::TokenOutOfRange {
                        token: tok,
                        n_vocab,
                    });
                }
                embd.decode_rows(tok as usize, 1, &mut rows[t * n_embd..(t + 1) * n_embd])?;
            }
            if let Some(lora) = lora {
                lora.apply_embedding(tokens[s], rows, n_embd)?;
            }
        }
        if self.hp.embd_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= self.hp.embd_scale);
        }
        Ok(x)
    }

    /// The output projection (and gemma's final soft-cap) of normed hidden rows `h`, stream after
    /// stream, `batch.n_tok` rows each.
    fn head(&self, h: &[f32], batch: &Batch) -> Result<Vec<Logits>> {
        let hp = &self.hp;
        let (n_tok, n_embd) = (batch.n_tok, hp.n_embd);
        let (mut logits, n_out) = if self.head_tensor() == "output.weight" {
            self.linear("output.weight", h, n_embd, batch)?
        } else {
            // Tied output: the token embedding is the projection. An embedding LoRA then changes the
            // output too, as it does in a merged model.
            show_inputs(batch, TOKEN_EMBD, h, n_embd);
            let embd = self.weight(TOKEN_EMBD)?;
            let n_vocab = embd.n_rows();
            let mut y = self.product(embd, h, batch.rows())?;
            for (s, lora) in batch.loras.iter().enumerate() {
                if let Some(lora) = lora {
                    lora.apply_tied_output(h, &mut y, n_embd, n_vocab, s * n_tok..(s + 1) * n_tok)?;
                }
            }
            (y, n_vocab)
        };
        if hp.final_softcap != 0.0 {
            let cap = hp.final_softcap;
            logits.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        Ok(logits
            .chunks_exact(n_tok * n_out)
            .map(|c| Logits {
                n_tokens: n_tok,
                n_vocab: n_out,
                data: c.to_vec(),
            })
            .collect())
    }

    /// One transformer block over the batch; appends the batch's keys and values to `kv` (one entry
    /// per stream) and attends over everything in it.
    fn layer(&self, il: usize, x: Vec<f32>, batch: &Batch, kv: &mut [KvRows]) -> Result<Vec<f32>> {
        let hp = &self.hp;
        let n_embd = hp.n_embd;
        let blk = |t: &str| format!("blk.{il}.{t}.weight");
        let (hd_k, hd_v) = (hp.head_dim_k, hp.head_dim_v);
        let (n_q, n_k, n_v) = (hp.n_head * hd_k, hp.n_head_kv * hd_k, hp.n_head_kv * hd_v);

        // Attention block.
        let norm = self.vector(&blk("attn_norm"), n_embd)?;
        let h = rms_norm(&x, n_embd, &norm, hp.rms_eps);
        let (mut q, mut k, v) = if self.src.tensor(&blk("attn_qkv")).is_some() {
            let (qkv, n_out) = self.linear(&blk("attn_qkv"), &h, n_embd, batch)?;
            if n_out != n_q + n_k + n_v {
                return Err(self.problem(ModelProblem::Outputs {
                    tensor: blk("attn_qkv"),
                    n: n_out,
                    want: n_q + n_k + n_v,
                }));
            }
            let mut q = Vec::with_capacity(batch.rows() * n_q);
            let mut k = Vec::with_capacity(batch.rows() * n_k);
            let mut v = Vec::with_capacity(batch.rows() * n_v);
            for row in qkv.chunks_exact(n_out) {
                q.extend_from_slice(&row[..n_q]);
                k.extend_from_slice(&row[n_q..n_q + n_k]);
                v.extend_from_slice(&row[n_q + n_k..]);
            }
            (q, k, v)
        } else {
            let check = |(y, n): (Vec<f32>, usize), want: usize, t: &str| -> Result<Vec<f32>> {
                if n != want {
                    return Err(self.problem(ModelProblem::Outputs {
                        tensor: blk(t),
                        n,
                        want,
                    }));
                }
                Ok(y)
            };
            (
                check(
                    self.linear(&blk("attn_q"), &h, n_embd, batch)?,
                    n_q,
                    "attn_q",
                )?,
                check(
                    self.linear(&blk("attn_k"), &h, n_embd, batch)?,
                    n_k,
                    "attn_k",
                )?,
                check(
                    self.linear(&blk("attn_v"), &h, n_embd, batch)?,
                    n_v,
                    "attn_v",
                )?,
            )
        };
        // Per-head RMS norms of q and k (qwen3, gemma3), before RoPE.
        if let Some(w) = self.opt_vector(&blk("attn_q_norm"), hd_k)? {
            q = rms_norm(&q, hd_k, &w, hp.rms_eps);
        }
        if let Some(w) = self.opt_vector(&blk("attn_k_norm"), hd_k)? {
            k = rms_norm(&k, hd_k, &w, hp.rms_eps);
        }
        let swa = hp.is_swa.get(il).copied().unwrap_or(false);
        let rope = if swa { hp.rope_swa } else { hp.rope };
        let factors = self.rope_factors(batch.n_ctx, rope.n_dims)?;
        // llama's q/k rows were permuted at conversion for NORM RoPE (adjacent pairs); the others
        // use NEOX (first half with second half): llama.cpp's `llama_model_rope_type`.
        let neox = !hp.arch.permutes_qk();
        let f = factors.as_deref();
        apply_rope(&mut q, n_q, hd_k, batch.n_tok, batch.pos0, &rope, f, neox);
        apply_rope(&mut k, n_k, hd_k, batch.n_tok, batch.pos0, &rope, f, neox);
        if hp.q_scale != 1.0 {
            q.iter_mut().for_each(|v| *v *= hp.q_scale);
        }
        let window = if swa { hp.n_swa } else { usize::MAX };
        let n_tok = batch.n_tok;
        for (s, cache) in kv.iter_mut().enumerate() {
            cache
                .k
                .extend_from_slice(&k[s * n_tok * n_k..(s + 1) * n_tok * n_k]);
            cache
                .v
                .extend_from_slice(&v[s * n_tok * n_v..(s + 1) * n_tok * n_v]);
        }
        let attn = attention(hp, &q, kv, n_tok, batch.pos0, window);
        let (mut o, _) = self.linear(&blk("attn_output"), &attn, hp.n_head * hd_v, batch)?;
        if let Some(w) = self.opt_vector(&blk("post_attention_norm"), n_embd)? {
            o = rms_norm(&o, n_embd, &w, hp.rms_eps);
        }
        let mut x = x;
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }

        // Feed-forward block.
        let norm = self.vector(&blk("ffn_norm"), n_embd)?;
        let h = rms_norm(&x, n_embd, &norm, hp.rms_eps);
        if self.src.tensor(&blk("ffn_gate_inp")).is_some() {
            let f = self.moe_ffn(il, &h, batch)?;
            for (a, b) in x.iter_mut().zip(&f) {
                *a += b;
            }
            return Ok(x);
        }
        let gelu = hp.arch.is_gemma();
        let act = |g: f32| if gelu { gelu_ggml(g) } else { silu(g) };
        let (up, n_up) = self.linear(&blk("ffn_up"), &h, n_embd, batch)?;
        let (mid, n_ff) = if self.src.tensor(&blk("ffn_gate")).is_some() {
            let (gate, n_gate) = self.linear(&blk("ffn_gate"), &h, n_embd, batch)?;
            if n_gate != n_up {
                return Err(self.problem(ModelProblem::GateUp {
                    gate: blk("ffn_gate"),
                    up: blk("ffn_up"),
                }));
            }
            let mid: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| act(*g) * u).collect();
            (mid, n_up)
        } else {
            // phi3: one fused projection, gate half first (ggml_swiglu).
            if n_up % 2 != 0 {
                return Err(self.problem(ModelProblem::OddFused {
                    tensor: blk("ffn_up"),
                }));
            }
            let n_ff = n_up / 2;
            let mut mid = Vec::with_capacity(batch.rows() * n_ff);
            for row in up.chunks_exact(n_up) {
                mid.extend(
                    row[..n_ff]
                        .iter()
                        .zip(&row[n_ff..])
                        .map(|(g, u)| act(*g) * u),
                );
            }
            (mid, n_ff)
        };
        let (mut f, _) = self.linear(&blk("ffn_down"), &mid, n_ff, batch)?;
        if let Some(w) = self.opt_vector(&blk("post_ffw_norm"), n_embd)? {
            f = rms_norm(&f, n_embd, &w, hp.rms_eps);
        }
        for (a, b) in x.iter_mut().zip(&f) {
            *a += b;
        }
        Ok(x)
    }

    /// The mixture-of-experts FFN of layer `il` on the normed rows `h`, as llama.cpp's
    /// `build_moe_ffn` computes it (softmax gating): the router's softmax over `ffn_gate_inp·h`, the
    /// `n_expert_used` most probable experts per token, their probabilities as weights (renormalized
    /// to sum to 1 where the architecture says so), and `Σ weight·down_e(silu(gate_e·h)·up_e·h)`;
    /// then qwen2moe's shared expert, a dense SiLU FFN scaled by `sigmoid(ffn_gate_inp_shexp·h)`.
    /// Each stream's expert LoRA applies to the tokens routed to that expert.
    fn moe_ffn(&self, il: usize, h: &[f32], batch: &Batch) -> Result<Vec<f32>> {
        let hp = &self.hp;
        let n_embd = hp.n_embd;
        let blk = |t: &str| format!("blk.{il}.{t}.weight");
        let n_expert = hp.n_expert;
        if n_expert == 0 {
            return Err(self.problem(ModelProblem::Experts {
                n_expert,
                n_expert_used: hp.n_expert_used,
            }));
        }
        let (logits, n_out) = self.linear(&blk("ffn_gate_inp"), h, n_embd, batch)?;
        if n_out != n_expert {
            return Err(self.problem(ModelProblem::Outputs {
                tensor: blk("ffn_gate_inp"),
                n: n_out,
                want: n_expert,
            }));
        }
        let rows = batch.rows();
        // Per row: the chosen experts, most probable first, and their weights.
        let k = hp.n_expert_used;
        let mut chosen: Vec<(usize, f32)> = Vec::with_capacity(rows * k);
        for row in logits.chunks_exact(n_expert) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            let probs: Vec<f32> = e.iter().map(|v| v * (1.0 / sum)).collect();
            let mut order: Vec<usize> = (0..n_expert).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top = &order[..k];
            let norm = if hp.expert_weights_norm {
                // ggml clamps the sum to f16's smallest normal before dividing.
                top.iter()
                    .map(|&i| probs[i])
                    .sum::<f32>()
                    .max(6.103_515_6e-5)
            } else {
                1.0
            };
            chosen.extend(top.iter().map(|&i| (i, probs[i] / norm)));
        }
        let up = self.weight(&blk("ffn_up_exps"))?;
        let gate = self.weight(&blk("ffn_gate_exps"))?;
        let down = self.weight(&blk("ffn_down_exps"))?;
        let n_ff = up.dims.get(1).copied().unwrap_or(0) as usize;
        let check = |t: &TensorRef, n_in: usize, n_rows: usize| -> Result<()> {
            if t.dims.len() != 3
                || t.row_len() != n_in
                || t.dims[1] as usize != n_rows
                || t.dims[2] as usize != n_expert
            {
                return Err(self.problem(ModelProblem::ExpertShape {
                    tensor: t.name.to_string(),
                    dims: t.dims.to_vec(),
                    n_in,
                    n_expert,
                }));
            }
            t.check_size()
        };
        check(&up, n_embd, n_ff)?;
        check(&gate, n_embd, n_ff)?;
        check(&down, n_ff, n_embd)?;
        // Each slot's output, summed in slot order afterwards as ggml adds the slot views.
        let mut slot_out = vec![0f32; rows * k * n_embd];
        for e in 0..n_expert {
            // Every stream's tokens routed to `e`, stream after stream (rows are stream-major), so
            // the expert's weights are decoded once for all streams and each stream's LoRA and
            // observer see a contiguous run.
            let routed: Vec<(usize, usize, f32)> = (0..rows)
                .flat_map(|r| {
                    let c = &chosen[r * k..(r + 1) * k];
                    c.iter()
                        .enumerate()
                        .filter(|(_, (ce, _))| *ce == e)
                        .map(move |(slot, (_, w))| (r, slot, *w))
                })
                .collect();
            if routed.is_empty() {
                continue;
            }
            let stream_of = |&(r, _, _): &(usize, usize, f32)| r / batch.n_tok.max(1);
            let stream_runs: Vec<std::ops::Range<usize>> = (0..batch.loras.len())
                .map(|s| {
                    routed.partition_point(|x| stream_of(x) < s)
                        ..routed.partition_point(|x| stream_of(x) <= s)
                })
                .collect();
            let xe: Vec<f32> = routed
                .iter()
                .flat_map(|&(r, _, _)| h[r * n_embd..(r + 1) * n_embd].iter().copied())
                .collect();
            let product = |t: &TensorRef, x: &[f32], n_in: usize, n_rows: usize| {
                let dims = [n_in as u64, n_rows as u64];
                let bytes = t.data.len() / n_expert;
                let slice = TensorRef {
                    name: t.name,
                    dims: &dims,
                    ty: t.ty,
                    data: &t.data[e * bytes..(e + 1) * bytes],
                };
                let mut y = self.product(slice, x, routed.len())?;
                for (s, run) in stream_runs.iter().enumerate() {
                    if run.is_empty() {
                        continue;
                    }
                    let xs = &x[run.start * n_in..run.end * n_in];
                    if let Some(obs) = batch.observer {
                        obs.observe_expert(t.name, e, s, xs, n_in);
                    }
                    if let Some(lora) = batch.loras[s] {
                        let ys = &mut y[run.start * n_rows..run.end * n_rows];
                        lora.apply_expert(t.name, e, xs, ys, n_in, n_rows)?;
                    }
                }
                Ok::<_, VerifyError>(y)
            };
            let u = product(&up, &xe, n_embd, n_ff)?;
            let g = product(&gate, &xe, n_embd, n_ff)?;
            let mid: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            let d = product(&down, &mid, n_ff, n_embd)?;
            for (i, &(r, slot, w)) in routed.iter().enumerate() {
                let dst = &mut slot_out[(r * k + slot) * n_embd..(r * k + slot + 1) * n_embd];
                for (o, v) in dst.iter_mut().zip(&d[i * n_embd..(i + 1) * n_embd]) {
                    *o = v * w;
                }
            }
        }
        let mut out = vec![0f32; rows * n_embd];
        for (r, dst) in out.chunks_exact_mut(n_embd).enumerate() {
            for slot in 0..k {
                let src = &slot_out[(r * k + slot) * n_embd..(r * k + slot + 1) * n_embd];
                for (o, v) in dst.iter_mut().zip(src) {
                    *o += v;
                }
            }
        }
        if self.src.tensor(&blk("ffn_up_shexp")).is_some() {
            let (up, n_up) = self.linear(&blk("ffn_up_shexp"), h, n_embd, batch)?;
            let (gate, n_gate) = self.linear(&blk("ffn_gate_shexp"), h, n_embd, batch)?;
            if n_gate != n_up {
                return Err(self.problem(ModelProblem::GateUp {
                    gate: blk("ffn_gate_shexp"),
                    up: blk("ffn_up_shexp"),
                }));
            }
            let mid: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            let (shared, _) = self.linear(&blk("ffn_down_shexp"), &mid, n_up, batch)?;
            let (g, n_g) = self.linear(&blk("ffn_gate_inp_shexp"), h, n_embd, batch)?;
            if n_g != 1 {
                return Err(self.problem(ModelProblem::Outputs {
                    tensor: blk("ffn_gate_inp_shexp"),
                    n: n_g,
                    want: 1,
                }));
            }
            for ((dst, src), &gv) in out
                .chunks_exact_mut(n_embd)
                .zip(shared.chunks_exact(n_embd))
                .zip(&g)
            {
                // ggml computes the sigmoid as silu(x)/x.
                let sig = silu(gv) / gv;
                for (o, v) in dst.iter_mut().zip(src) {
                    *o += v * sig;
                }
            }
        }
        Ok(out)
    }

    /// RoPE frequency factors: llama3's `rope_freqs`, or phi3's LongRoPE short/long factors chosen
    /// by context length as `llama_model::get_rope_factors` does (our context is the session's
    /// `n_ctx`: the K tokens of [`Model::logits`]).
    fn rope_factors(&self, n_ctx: usize, n_dims: usize) -> Result<Option<Vec<f32>>> {
        let name = if self.src.tensor("rope_freqs.weight").is_some() {
            "rope_freqs.weight"
        } else if n_ctx > self.hp.rope.n_ctx_orig as usize
            && self.src.tensor("rope_factors_long.weight").is_some()
        {
            "rope_factors_long.weight"
        } else if self.src.tensor("rope_factors_short.weight").is_some() {
            "rope_factors_short.weight"
        } else {
            return Ok(None);
        };
        self.opt_vector(name, n_dims / 2)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::adapter::LowRank;
    use crate::arch::Arch;
    use crate::verify::lora::LoraTerm;
    use crate::verify::source::{F32Source, MetaValue};
    use std::collections::BTreeMap;

    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        }
        pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    pub(crate) const N_EMBD: usize = 32;
    const N_FF: usize = 48;
    pub(crate) const N_VOCAB: usize = 50;

    /// A 2-layer llama-shaped model with GQA (4 heads, 2 KV heads of 8).
    pub(crate) fn tiny(arch: &str, tied: bool) -> F32Source {
        let mut rng = Rng(7);
        let mut m = F32Source::new();
        m.set("general.architecture", MetaValue::Str(arch.into()));
        let k = |s: &str| format!("{arch}.{s}");
        m.set(&k("block_count"), MetaValue::Uint(2));
        m.set(&k("embedding_length"), MetaValue::Uint(N_EMBD as u64));
        m.set(&k("attention.head_count"), MetaValue::Uint(4));
        m.set(&k("attention.head_count_kv"), MetaValue::Uint(2));
        m.set(&k("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5));
        m.set(&k("attention.sliding_window"), MetaValue::Uint(3));
        m.add(
            TOKEN_EMBD,
            &[N_EMBD as u64, N_VOCAB as u64],
            &rng.vec(N_EMBD * N_VOCAB),
        );
        if !tied {
            m.add(
                "output.weight",
                &[N_EMBD as u64, N_VOCAB as u64],
                &rng.vec(N_EMBD * N_VOCAB),
            );
        }
        let ones: Vec<f32> = (0..N_EMBD).map(|_| 1.0 + rng.next()).collect();
        m.add("output_norm.weight", &[N_EMBD as u64], &ones);
        for il in 0..2 {
            let n = |t: &str| format!("blk.{il}.{t}.weight");
            let e = N_EMBD as u64;
            m.add(&n("attn_norm"), &[e], &ones);
            m.add(&n("ffn_norm"), &[e], &ones);
            m.add(&n("attn_q"), &[e, e], &rng.vec(N_EMBD * N_EMBD));
            m.add(&n("attn_k"), &[e, 16], &rng.vec(N_EMBD * 16));
            m.add(&n("attn_v"), &[e, 16], &rng.vec(N_EMBD * 16));
            m.add(&n("attn_output"), &[e, e], &rng.vec(N_EMBD * N_EMBD));
            m.add(&n("ffn_gate"), &[e, N_FF as u64], &rng.vec(N_EMBD * N_FF));
            m.add(&n("ffn_up"), &[e, N_FF as u64], &rng.vec(N_EMBD * N_FF));
            m.add(&n("ffn_down"), &[N_FF as u64, e], &rng.vec(N_EMBD * N_FF));
            if arch == "gemma3" || arch == "qwen3" {
                m.add(&n("attn_q_norm"), &[8], &ones[..8]);
                m.add(&n("attn_k_norm"), &[8], &ones[..8]);
            }
            if arch == "gemma3" {
                m.add(&n("post_attention_norm"), &[e], &ones);
                m.add(&n("post_ffw_norm"), &[e], &ones);
            }
        }
        m
    }

    /// A term at user scale 1 whose own scale is `scale`.
    pub(crate) fn term(
        rng: &mut Rng,
        rank: usize,
        n_in: usize,
        n_out: usize,
        scale: f32,
    ) -> LoraTerm {
        LoraTerm {
            lr: LowRank {
                a: rng.vec(rank * n_in),
                b: rng.vec(n_out * rank),
                rank,
                n_expert: 1,
                scale,
                magnitude: None,
            },
            user_scale: 1.0,
        }
    }

    /// `W + scale·B·A` (W rows of n_in).
    fn merged(w: &[f32], t: &LoraTerm, n_in: usize) -> Vec<f32> {
        let n_out = w.len() / n_in;
        let (lr, s) = (&t.lr, t.scale());
        let mut out = w.to_vec();
        for o in 0..n_out {
            for i in 0..n_in {
                let d: f32 = (0..lr.rank)
                    .map(|r| lr.b[o * lr.rank + r] * lr.a[r * n_in + i])
                    .sum();
                out[o * n_in + i] += s * d;
            }
        }
        out
    }

    fn max_rel(a: &Logits, b: &Logits) -> f32 {
        let m = a.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.data
            .iter()
            .zip(&b.data)
            .fold(0f32, |d, (x, y)| d.max((x - y).abs()))
            / m
    }

    #[test]
    fn runtime_lora_equals_merged_weights_for_every_arch() {
        for arch in Arch::ALL.into_iter().map(Arch::name) {
            if arch == "phi3" {
                continue; // fused tensors: covered by the GGUF fixtures
            }
            let base = tiny(arch, arch.starts_with("gemma"));
            let mut rng = Rng(99);
            let mut lora = RuntimeLora::new();
            let mut merged_model = tiny(arch, arch.starts_with("gemma"));
            let e = N_EMBD;
            for (name, n_in, n_out) in [
                ("blk.0.attn_q.weight", e, e),
                ("blk.1.attn_v.weight", e, 16),
                ("blk.0.ffn_down.weight", N_FF, e),
                ("blk.1.ffn_gate.weight", e, N_FF),
            ] {
                let t = term(&mut rng, 4, n_in, n_out, 0.7);
                let w = base.tensor(name).unwrap().to_f32().unwrap();
                let dims = base.tensor(name).unwrap().dims.to_vec();
                merged_model.add(name, &dims, &merged(&w, &t, n_in));
                lora.add(name, t);
            }
            // A second adapter on a tensor already adapted.
            let t = term(&mut rng, 2, e, e, -0.3);
            let w = merged_model
                .tensor("blk.0.attn_q.weight")
                .unwrap()
                .to_f32()
                .unwrap();
            merged_model.add(
                "blk.0.attn_q.weight",
                &[e as u64, e as u64],
                &merged(&w, &t, e),
            );
            lora.add("blk.0.attn_q.weight", t);

            let tokens = [3u32, 17, 5, 49, 0, 22];
            let m = Model::new(&base).unwrap();
            let out = m.logits(&tokens, &[None, Some(&lora)]).unwrap();
            let mm = Model::new(&merged_model).unwrap();
            let merged_out = mm.logits(&tokens, &[None]).unwrap();
            assert!(max_rel(&out[1], &merged_out[0]) < 1e-5, "{arch}");
            assert!(
                max_rel(&out[0], &out[1]) > 1e-3,
                "{arch}: the adapter must change the logits"
            );
            // Streams are independent: the bare stream equals a pass without the LoRA stream.
            let alone = m.logits(&tokens, &[None]).unwrap();
            assert_eq!(alone[0].data, out[0].data, "{arch}");
        }
    }

    /// Records every observed input, in the order seen.
    struct Log(std::sync::Mutex<Vec<(String, Vec<f32>)>>);

    impl LinearInputs for Log {
        fn observe(&self, tensor: &str, _stream: usize, x: &[f32], _n_in: usize) {
            self.0
                .lock()
                .unwrap()
                .push((tensor.to_string(), x.to_vec()));
        }
    }

    /// The layer-major pass shows an observer exactly what chunk-major passes show it (the same
    /// values per tensor and chunk), layer by layer: a calibration reduces each layer's records
    /// when `layer_done` says the layer is through.
    #[test]
    fn layer_major_pass_observes_what_chunk_passes_do() {
        let tokens = [3u32, 17, 5, 49, 0, 22, 8, 8, 31];
        let chunks: Vec<&[u32]> = tokens.chunks(4).collect();
        for arch in ["llama", "gemma3"] {
            let base = tiny(arch, arch.starts_with("gemma"));
            let mut rng = Rng(5);
            let mut lora = RuntimeLora::new();
            lora.add(
                "blk.1.attn_q.weight",
                term(&mut rng, 4, N_EMBD, N_EMBD, 0.7),
            );
            let m = Model::new(&base).unwrap();
            let chunk_major = Log(Default::default());
            for c in &chunks {
                m.logits_with(c, &[Some(&lora)], Some(&chunk_major))
                    .unwrap();
            }
            let layer_major = Log(Default::default());
            let mut seen_at_layer_end = Vec::new();
            m.run_layers(&chunks, &[Some(&lora)], &layer_major, &mut |il| {
                seen_at_layer_end.push((il, layer_major.0.lock().unwrap().len()))
            })
            .unwrap();
            let by_tensor = |log: Log| {
                let mut m: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
                for (t, x) in log.0.into_inner().unwrap() {
                    m.entry(t).or_default().push(x);
                }
                m
            };
            let (want, got) = (by_tensor(chunk_major), by_tensor(layer_major));
            let n_layer = m.hp.n_layer;
            assert_eq!(seen_at_layer_end.len(), n_layer, "{arch}");
            // The head is not run, but its input is shown: every input matches, chunk by chunk,
            // the head's (the tied embedding on gemma3) among them.
            assert_eq!(want, got, "{arch}");
            let head = if arch == "gemma3" {
                TOKEN_EMBD
            } else {
                "output.weight"
            };
            assert_eq!(got[head].len(), chunks.len(), "{arch}");
            // After layer `il`, only layers up to `il` have been observed; the head after them all.
            let per_layer = got
                .iter()
                .filter(|(t, _)| t.starts_with("blk."))
                .map(|(_, v)| v.len())
                .sum::<usize>()
                / n_layer;
            for (il, seen) in seen_at_layer_end {
                assert_eq!(seen, (il + 1) * per_layer, "{arch}: after layer {il}");
            }
        }
    }

    /// The KV cache: feeding a sequence in pieces (one token at a time, or uneven chunks) gives
    /// exactly the logits of one pass over all of it, for every architecture, with sliding windows
    /// (the tiny models' window is 3) and runtime LoRA streams; streams reading different tokens
    /// give what separate sessions give.
    #[test]
    fn kv_cache_logits_equal_full_recompute() {
        let tokens = [3u32, 17, 5, 49, 0, 22, 8, 8, 31];
        for arch in Arch::ALL.into_iter().map(Arch::name) {
            if arch == "phi3" {
                continue; // fused tensors: the tiny model has none
            }
            let base = tiny(arch, arch.starts_with("gemma"));
            let mut rng = Rng(11);
            let mut lora = RuntimeLora::new();
            lora.add("blk.0.attn_k.weight", term(&mut rng, 4, N_EMBD, 16, 0.9));
            lora.add("blk.1.ffn_up.weight", term(&mut rng, 4, N_EMBD, N_FF, 0.9));
            let m = Model::new(&base).unwrap();
            let loras = [None, Some(&lora)];
            let full = m.logits(&tokens, &loras).unwrap();
            assert_ne!(
                full[0].data, full[1].data,
                "{arch}: the LoRA stream differs"
            );
            for pieces in [vec![1; tokens.len()], vec![4, 1, 3, 1]] {
                let mut session = m.session(&loras, tokens.len());
                let mut at = 0;
                for n in pieces {
                    let chunk = &tokens[at..at + n];
                    let h = session.feed(&[chunk, chunk]).unwrap();
                    let got = session.head(&h, 0..n).unwrap();
                    for (s, l) in got.iter().enumerate() {
                        let want = &full[s].data[at * N_VOCAB..(at + n) * N_VOCAB];
                        assert_eq!(
                            l.data,
                            want,
                            "{arch}: stream {s}, positions {at}..{}",
                            at + n
                        );
                    }
                    at += n;
                }
                assert_eq!(session.pos(), tokens.len());
                let err = session.feed(&[&[1], &[1]]).unwrap_err();
                assert!(matches!(err, VerifyError::ContextFull { .. }), "{err}");
            }
            // Streams with their own tokens, stepped one token at a time.
            let other = [9u32, 1, 44, 2, 30, 7, 7, 12, 0];
            let alone = m.logits(&other, &[Some(&lora)]).unwrap();
            let mut session = m.session(&loras, tokens.len());
            for t in 0..tokens.len() {
                let rows = session.step(&[tokens[t], other[t]]).unwrap();
                assert_eq!(rows[0], full[0].row(t), "{arch}: position {t}");
                assert_eq!(rows[1], alone[0].row(t), "{arch}: position {t}");
            }
        }
    }

    #[test]
    fn embedding_lora_adds_scaled_rows_and_reaches_tied_output() {
        let base = tiny("llama", false);
        let mut rng = Rng(5);
        let rank = 3;
        // In the base's layout B has one row of `rank` per token (the stored lora_a), A is
        // rank × n_embd.
        let t = LoraTerm {
            lr: LowRank {
                a: rng.vec(rank * N_EMBD),
                b: rng.vec(N_VOCAB * rank),
                rank,
                n_expert: 1,
                scale: 2.0,
                magnitude: None,
            },
            user_scale: 1.0,
        };
        let mut merged_model = tiny("llama", false);
        let w = base.tensor(TOKEN_EMBD).unwrap().to_f32().unwrap();
        let mut wm = w.clone();
        for v in 0..N_VOCAB {
            for o in 0..N_EMBD {
                let d: f32 = (0..rank)
                    .map(|r| t.lr.b[v * rank + r] * t.lr.a[r * N_EMBD + o])
                    .sum();
                wm[v * N_EMBD + o] += 2.0 * d;
            }
        }
        merged_model.add(TOKEN_EMBD, &[N_EMBD as u64, N_VOCAB as u64], &wm);
        let mut lora = RuntimeLora::new();
        lora.add(TOKEN_EMBD, t.clone());
        let tokens = [1u32, 2, 3, 40];
        let r = Model::new(&base)
            .unwrap()
            .logits(&tokens, &[Some(&lora)])
            .unwrap();
        let m = Model::new(&merged_model)
            .unwrap()
            .logits(&tokens, &[None])
            .unwrap();
        assert!(max_rel(&r[0], &m[0]) < 1e-5);

        // Tied: the merged embedding is also the output projection.
        let base = tiny("llama", true);
        let mut merged_model = tiny("llama", true);
        merged_model.add(TOKEN_EMBD, &[N_EMBD as u64, N_VOCAB as u64], &wm);
        let r = Model::new(&base)
            .unwrap()
            .logits(&tokens, &[Some(&lora)])
            .unwrap();
        let m = Model::new(&merged_model)
            .unwrap()
            .logits(&tokens, &[None])
            .unwrap();
        assert!(max_rel(&r[0], &m[0]) < 1e-5);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let m = tiny("gpt2", false);
        let err = Model::new(&m).err().unwrap().to_string();
        assert!(
            err.contains("architecture gpt2 is not supported by verify"),
            "{err}"
        );
    }
}
