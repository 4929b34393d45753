//! A transformer forward pass over GGUF weights, following llama.cpp's graphs
//! (`src/models/{llama,qwen2,qwen3,gemma,gemma2,gemma3,phi3}.cpp`) operation by operation.
//!
//! Activations are f32; weights are decoded block by block inside each product ([`matmul`]), so the
//! only large buffers are the K×vocab logits. Several *streams* (the same tokens under different
//! runtime-LoRA sets, e.g. none and the adapters) run through one pass: each weight is decoded once
//! and multiplied with every stream's activations, and only the LoRA terms and attention are per
//! stream.
//!
//! Where llama.cpp's CPU kernels differ from exact arithmetic on purpose we follow them: GELU goes
//! through ggml's f16 lookup table (`GGML_GELU_FP16`), RoPE angles are computed as in
//! `ggml_rope_cache_init`. Not emulated: the f16 KV cache (tests run llama.cpp with an f32 cache)
//! and the Q8 rounding of activations that ggml applies before products with quantized weights.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::hparams::{Arch, HParams, Rope};
use super::lora::{RuntimeLora, TOKEN_EMBD};
use super::matmul::{matmul, Matrix};
use super::source::{TensorRef, WeightSource};
use crate::quant::GgmlType;

/// A model ready to run: its weights and hyperparameters.
pub struct Model<'a> {
    src: &'a dyn WeightSource,
    pub hp: HParams,
    /// Round activations as llama.cpp's CPU kernels do before each product (see
    /// [`Model::with_llama_cpp_activations`]).
    llama_cpp_activations: bool,
}

/// The type ggml's CPU backend converts activations to before a product with weights of `ty`
/// (`type_traits_cpu[ty].vec_dot_type`), when it is not f32.
fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    match ty {
        F16 => Some(F16),
        BF16 => Some(BF16),
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL => Some(Q8_0),
        Q4_1 | Q5_1 => Some(Q8_1),
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => Some(Q8_K),
        _ => None,
    }
}

/// Activation rows as ggml's kernels see them: encoded in `ty` and decoded again.
fn round_activations(ty: GgmlType, x: &[f32], n_in: usize) -> Result<Vec<f32>> {
    let row_bytes = ty
        .row_bytes(n_in as u64)
        .with_context(|| format!("activations of {n_in} do not fit {} blocks", ty.name()))?
        as usize;
    let mut bytes = vec![0u8; row_bytes];
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(n_in).zip(out.chunks_exact_mut(n_in)) {
        crate::quant::quantize_row(ty, src, &mut bytes, None)?;
        if ty == GgmlType::Q8_1 {
            // ggml has no to_float for Q8_1: blocks of d (f16), s (f16), 32 × i8.
            for (blk, d32) in bytes.chunks_exact(36).zip(dst.chunks_exact_mut(32)) {
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for (v, q) in d32.iter_mut().zip(&blk[4..]) {
                    *v = d * (*q as i8) as f32;
                }
            }
        } else {
            crate::quant::dequantize_row(ty, &bytes, dst)?;
        }
    }
    Ok(out)
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

/// Activations of all streams: `n_streams * n_tok` rows.
struct Batch<'l> {
    n_tok: usize,
    loras: &'l [Option<&'l RuntimeLora>],
}

impl Batch<'_> {
    fn rows(&self) -> usize {
        self.n_tok * self.loras.len()
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
        })
    }

    /// Makes every product with a weight round its input activations the way llama.cpp's CPU
    /// backend does (to f16/bf16 for F16/BF16 weights, to Q8_0/Q8_1/Q8_K blocks for quantized
    /// ones). Off by default: verify compares exact products; on, our logits meet llama.cpp's on
    /// quantized models to summation order, which is how the tests pin the quantized forward pass.
    pub fn with_llama_cpp_activations(mut self, on: bool) -> Model<'a> {
        self.llama_cpp_activations = on;
        self
    }

    /// `W·x` with `x` rounded as llama.cpp would round it (when asked to).
    fn product(&self, w: TensorRef, x: &[f32], n_rows: usize) -> Result<Vec<f32>> {
        match vec_dot_type(w.ty).filter(|_| self.llama_cpp_activations) {
            Some(ty) => {
                let xr = round_activations(ty, x, w.row_len())?;
                matmul(&Matrix::Tensor(w), &xr, n_rows)
            }
            None => matmul(&Matrix::Tensor(w), x, n_rows),
        }
    }

    pub fn n_vocab(&self) -> Result<usize> {
        Ok(self.weight(TOKEN_EMBD)?.n_rows())
    }

    fn weight(&self, name: &str) -> Result<TensorRef<'a>> {
        self.src.tensor(name).with_context(|| {
            format!(
                "{}: tensor {name} is missing ({} model)",
                self.src.describe(),
                self.hp.arch.name()
            )
        })
    }

    /// A small tensor (norm, bias) as f32 with `len` values, if present.
    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        let Some(t) = self.src.tensor(name) else {
            return Ok(None);
        };
        if t.row_len() * t.n_rows() != len {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {len} values",
                self.src.describe(),
                t.dims
            );
        }
        Ok(Some(t.to_f32()?))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.opt_vector(name, len)?.with_context(|| {
            format!(
                "{}: tensor {name} is missing ({} model)",
                self.src.describe(),
                self.hp.arch.name()
            )
        })
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
            bail!(
                "{}: tensor {name} has shape {:?}, expected [{n_in}, N]",
                self.src.describe(),
                w.dims
            );
        }
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

    /// Logits for `tokens` (positions 0..K-1, one causal sequence) under each LoRA set of `loras`
    /// (`None` = the bare model); one [`Logits`] per entry.
    pub fn logits(&self, tokens: &[u32], loras: &[Option<&RuntimeLora>]) -> Result<Vec<Logits>> {
        let hp = &self.hp;
        let n_tok = tokens.len();
        if n_tok == 0 || loras.is_empty() {
            bail!("verify needs at least one token and one configuration");
        }
        let batch = Batch { n_tok, loras };
        let n_embd = hp.n_embd;

        // Embeddings (get_rows, then the embedding LoRA, then gemma's scale).
        let embd = self.weight(TOKEN_EMBD)?;
        let n_vocab = embd.n_rows();
        if embd.row_len() != n_embd {
            bail!(
                "{}: {TOKEN_EMBD} has shape {:?}, expected [{n_embd}, n_vocab]",
                self.src.describe(),
                embd.dims
            );
        }
        let mut x = vec![0f32; batch.rows() * n_embd];
        for (s, lora) in loras.iter().enumerate() {
            let rows = &mut x[s * n_tok * n_embd..(s + 1) * n_tok * n_embd];
            for (t, &tok) in tokens.iter().enumerate() {
                if tok as usize >= n_vocab {
                    bail!("token id {tok} is out of range: the model has {n_vocab} tokens");
                }
                embd.decode_rows(tok as usize, 1, &mut rows[t * n_embd..(t + 1) * n_embd])?;
            }
            if let Some(lora) = lora {
                lora.apply_embedding(tokens, rows, n_embd)?;
            }
        }
        if hp.embd_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= hp.embd_scale);
        }

        for il in 0..hp.n_layer {
            x = self.layer(il, x, &batch)?;
        }

        let norm = self.vector("output_norm.weight", n_embd)?;
        let h = rms_norm(&x, n_embd, &norm, hp.rms_eps);
        let (mut logits, n_out) = if self.src.tensor("output.weight").is_some() {
            self.linear("output.weight", &h, n_embd, &batch)?
        } else {
            // Tied output: the token embedding is the projection. An embedding LoRA then changes the
            // output too, as it does in a merged model.
            let (mut y, n_out) = {
                let y = self.product(embd, &h, batch.rows())?;
                (y, n_vocab)
            };
            for (s, lora) in loras.iter().enumerate() {
                if let Some(lora) = lora {
                    tied_output_lora(
                        lora,
                        &h,
                        &mut y,
                        n_embd,
                        n_vocab,
                        s * n_tok..(s + 1) * n_tok,
                    )?;
                }
            }
            (y, n_out)
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

    fn layer(&self, il: usize, x: Vec<f32>, batch: &Batch) -> Result<Vec<f32>> {
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
                bail!(
                    "{}: {} has {n_out} outputs, expected {}",
                    self.src.describe(),
                    blk("attn_qkv"),
                    n_q + n_k + n_v
                );
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
                    bail!(
                        "{}: {} has {n} outputs, expected {want}",
                        self.src.describe(),
                        blk(t)
                    );
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
        let factors = self.rope_factors(batch.n_tok, rope.n_dims)?;
        let neox = hp.arch.rope_neox();
        let f = factors.as_deref();
        apply_rope(&mut q, n_q, hd_k, batch.n_tok, &rope, f, neox);
        apply_rope(&mut k, n_k, hd_k, batch.n_tok, &rope, f, neox);
        if hp.q_scale != 1.0 {
            q.iter_mut().for_each(|v| *v *= hp.q_scale);
        }
        let window = if swa { hp.n_swa } else { usize::MAX };
        let attn = attention(hp, &q, &k, &v, batch.n_tok, batch.loras.len(), window);
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
        let gelu = matches!(hp.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3);
        let act = |g: f32| if gelu { gelu_ggml(g) } else { silu(g) };
        let (up, n_up) = self.linear(&blk("ffn_up"), &h, n_embd, batch)?;
        let (mid, n_ff) = if self.src.tensor(&blk("ffn_gate")).is_some() {
            let (gate, n_gate) = self.linear(&blk("ffn_gate"), &h, n_embd, batch)?;
            if n_gate != n_up {
                bail!(
                    "{}: {} and {} differ in size",
                    self.src.describe(),
                    blk("ffn_gate"),
                    blk("ffn_up")
                );
            }
            let mid: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| act(*g) * u).collect();
            (mid, n_up)
        } else {
            // phi3: one fused projection, gate half first (ggml_swiglu).
            if n_up % 2 != 0 {
                bail!(
                    "{}: fused {} has an odd size",
                    self.src.describe(),
                    blk("ffn_up")
                );
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

    /// RoPE frequency factors: llama3's `rope_freqs`, or phi3's LongRoPE short/long factors chosen
    /// by context length as `llama_model::get_rope_factors` does (our context is the K tokens).
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

/// Tied output with an embedding LoRA: logits += scale·A_rows·(Bᵀ·h), i.e. the product with the
/// adapted embedding matrix `E + scale·A_rows·Bᵀ`.
fn tied_output_lora(
    lora: &RuntimeLora,
    h: &[f32],
    y: &mut [f32],
    n_embd: usize,
    n_vocab: usize,
    rows: std::ops::Range<usize>,
) -> Result<()> {
    for term in lora.get(TOKEN_EMBD) {
        let r = term.rank;
        if term.a.len() != n_vocab * r || term.b.len() != n_embd * r {
            bail!(
                "LoRA for {TOKEN_EMBD}: A has {} values and B {}, expected {n_vocab} x {r} and {n_embd} x {r}",
                term.a.len(),
                term.b.len()
            );
        }
        let mut bt_h = vec![0f32; rows.len() * r];
        for (i, t) in rows.clone().enumerate() {
            let ht = &h[t * n_embd..(t + 1) * n_embd];
            for (o, hv) in ht.iter().enumerate() {
                for j in 0..r {
                    bt_h[i * r + j] += term.b[o * r + j] * hv;
                }
            }
        }
        let d = matmul(
            &Matrix::F32 {
                rows: &term.a,
                n_in: r,
            },
            &bt_h,
            rows.len(),
        )?;
        for (dst, v) in y[rows.start * n_vocab..rows.end * n_vocab]
            .iter_mut()
            .zip(&d)
        {
            *dst += term.scale * v;
        }
    }
    Ok(())
}

/// ggml_rms_norm (sum of squares in f64) then the elementwise weight, on rows of `width`.
pub fn rms_norm(x: &[f32], width: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let sum: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let mean = (sum / width as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((d, v), g) in dst.iter_mut().zip(row).zip(w) {
            *d = v * scale * g;
        }
    }
    out
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// ggml's CPU GELU (tanh approximation) as computed with `GGML_GELU_FP16`: the input is rounded to
/// f16 and the table holds f16 results; saturated outside ±10.
pub fn gelu_ggml(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let xh = half::f16::from_f32(x).to_f32();
        let y = 0.5 * xh * (1.0 + (SQRT_2_OVER_PI * xh * (1.0 + GELU_COEF_A * xh * xh)).tanh());
        half::f16::from_f32(y).to_f32()
    }
}

/// ggml's `ggml_rope_yarn_corr_dims`.
fn yarn_corr_dims(rope: &Rope) -> [f32; 2] {
    let corr_dim = |n_rot: f32| {
        rope.n_dims as f32 * (rope.n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * rope.freq_base.ln())
    };
    let start = corr_dim(rope.beta_fast).floor();
    let end = corr_dim(rope.beta_slow).ceil();
    [start.max(0.0), end.min(rope.n_dims as f32 - 1.0)]
}

/// cos/sin per rotated pair for position `p`, as `ggml_rope_cache_init` + `rope_yarn` compute them.
fn rope_cache(p: usize, rope: &Rope, factors: Option<&[f32]>) -> Vec<(f32, f32)> {
    let theta_scale = rope.freq_base.powf(-2.0 / rope.n_dims as f32);
    let corr = yarn_corr_dims(rope);
    let mut theta = p as f32;
    (0..rope.n_dims / 2)
        .map(|i| {
            let ff = factors.map_or(1.0, |f| f[i]);
            let theta_extrap = theta / ff;
            let mut th = rope.freq_scale * theta_extrap;
            let mut mscale = rope.attn_factor;
            if rope.ext_factor != 0.0 {
                let i0 = (2 * i) as f32;
                let y = ((i0 / 2.0).floor() - corr[0]) / (corr[1] - corr[0]).max(0.001);
                let ramp = (1.0 - y.clamp(0.0, 1.0)) * rope.ext_factor;
                th = th * (1.0 - ramp) + theta_extrap * ramp;
                mscale *= 1.0 + 0.1 * (1.0 / rope.freq_scale).ln();
            }
            theta *= theta_scale;
            (th.cos() * mscale, th.sin() * mscale)
        })
        .collect()
}

/// Rotates the first `n_dims` of every head of `x`, whose rows hold `row_len / head_dim` heads; row
/// `r` is at position `r % n_tok` (each stream restarts at 0). NORM pairs adjacent values, NEOX pairs
/// `i` with `i + n_dims/2`.
fn apply_rope(
    x: &mut [f32],
    row_len: usize,
    head_dim: usize,
    n_tok: usize,
    rope: &Rope,
    factors: Option<&[f32]>,
    neox: bool,
) {
    let caches: Vec<Vec<(f32, f32)>> = (0..n_tok).map(|p| rope_cache(p, rope, factors)).collect();
    let half = rope.n_dims / 2;
    x.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
        let cache = &caches[r % n_tok];
        for head in row.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in cache.iter().enumerate() {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    });
}

/// Causal multi-head attention with GQA for each stream; `window` limits how far back a query sees
/// (`q - k < window`, llama.cpp's standard SWA). Scores get the soft-cap (gemma2) before the
/// scale-and-softmax, as `build_attn_mha` does.
fn attention(
    hp: &HParams,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_tok: usize,
    n_streams: usize,
    window: usize,
) -> Vec<f32> {
    let (hd_k, hd_v) = (hp.head_dim_k, hp.head_dim_v);
    let (n_head, n_kv) = (hp.n_head, hp.n_head_kv);
    let group = n_head / n_kv;
    let row_q = n_head * hd_k;
    let row_k = n_kv * hd_k;
    let row_v = n_kv * hd_v;
    let row_o = n_head * hd_v;
    let mut out = vec![0f32; n_streams * n_tok * row_o];
    out.par_chunks_mut(row_o).enumerate().for_each(|(r, dst)| {
        let (s, t) = (r / n_tok, r % n_tok);
        let base = s * n_tok;
        let first = if window == usize::MAX {
            0
        } else {
            (t + 1).saturating_sub(window)
        };
        let mut scores = vec![0f32; t + 1 - first];
        for h in 0..n_head {
            let kvh = h / group;
            let qh = &q[r * row_q + h * hd_k..r * row_q + (h + 1) * hd_k];
            for (j, sc) in (first..=t).zip(scores.iter_mut()) {
                let kr = (base + j) * row_k + kvh * hd_k;
                let mut s = super::matmul::dot(qh, &k[kr..kr + hd_k]);
                if hp.attn_softcap != 0.0 {
                    s = (s / hp.attn_softcap).tanh() * hp.attn_softcap;
                }
                *sc = s * hp.kq_scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc as f64;
            }
            let inv = (1.0 / sum) as f32;
            let oh = &mut dst[h * hd_v..(h + 1) * hd_v];
            for (j, p) in (first..=t).zip(&scores) {
                let vr = (base + j) * row_v + kvh * hd_v;
                for (o, vv) in oh.iter_mut().zip(&v[vr..vr + hd_v]) {
                    *o += p * inv * vv;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::lora::LoraTerm;
    use crate::verify::source::{F32Source, MetaValue};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    const N_EMBD: usize = 32;
    const N_FF: usize = 48;
    const N_VOCAB: usize = 50;

    /// A 2-layer llama-shaped model with GQA (4 heads, 2 KV heads of 8).
    fn tiny(arch: &str, tied: bool) -> F32Source {
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

    fn term(rng: &mut Rng, rank: usize, n_in: usize, n_out: usize, scale: f32) -> LoraTerm {
        LoraTerm {
            a: rng.vec(rank * n_in),
            b: rng.vec(n_out * rank),
            rank,
            scale,
        }
    }

    /// `W + scale·B·A` (W rows of n_in).
    fn merged(w: &[f32], t: &LoraTerm, n_in: usize) -> Vec<f32> {
        let n_out = w.len() / n_in;
        let mut out = w.to_vec();
        for o in 0..n_out {
            for i in 0..n_in {
                let d: f32 = (0..t.rank)
                    .map(|r| t.b[o * t.rank + r] * t.a[r * n_in + i])
                    .sum();
                out[o * n_in + i] += t.scale * d;
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
        for arch in Arch::SUPPORTED {
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

    #[test]
    fn embedding_lora_adds_scaled_rows_and_reaches_tied_output() {
        let base = tiny("llama", false);
        let mut rng = Rng(5);
        let rank = 3;
        // token_embd.lora_a is one row of `rank` per token.
        let t = LoraTerm {
            a: rng.vec(N_VOCAB * rank),
            b: rng.vec(N_EMBD * rank),
            rank,
            scale: 2.0,
        };
        let mut merged_model = tiny("llama", false);
        let w = base.tensor(TOKEN_EMBD).unwrap().to_f32().unwrap();
        let mut wm = w.clone();
        for v in 0..N_VOCAB {
            for o in 0..N_EMBD {
                let d: f32 = (0..rank)
                    .map(|r| t.b[o * rank + r] * t.a[v * rank + r])
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
    fn rope_keeps_norms_and_position_zero_is_identity() {
        let rope = Rope {
            n_dims: 8,
            freq_base: 10000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 4096,
        };
        for neox in [false, true] {
            let orig: Vec<f32> = (0..2 * 16).map(|i| i as f32 * 0.1 - 1.0).collect();
            let mut x = orig.clone();
            apply_rope(&mut x, 16, 8, 2, &rope, None, neox);
            assert_eq!(&x[..16], &orig[..16]);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x[16..24]) - n(&orig[16..24])).abs() < 1e-4);
            assert_ne!(&x[16..24], &orig[16..24]);
        }
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

    #[test]
    fn gelu_follows_ggml_table() {
        assert_eq!(gelu_ggml(-11.0), 0.0);
        assert_eq!(gelu_ggml(12.0), 12.0);
        assert!((gelu_ggml(1.0) - 0.8412).abs() < 1e-3);
    }
}
