//! Architecture and hyperparameters of a model, read from GGUF metadata the way llama.cpp reads them
//! (`src/llama-model.cpp` `load_hparams` and each `src/models/<arch>.cpp` `load_arch_hparams`).

use super::error::{ModelProblem, Result, VerifyError};

use super::source::WeightSource;
use crate::arch::Arch;

/// How RoPE frequencies are computed (ggml `rope_yarn` inputs), per layer kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Rotated dimensions per head (`n_rot`).
    pub n_dims: usize,
    pub freq_base: f32,
    /// `1 / rope.scaling.factor` for linear and YaRN scaling, 1 otherwise.
    pub freq_scale: f32,
    /// YaRN extrapolation mix (1 for YaRN, 0 otherwise).
    pub ext_factor: f32,
    /// Magnitude scale of cos/sin (YaRN mscale, `rope.scaling.attn_factor`).
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Context length the model was trained with (YaRN correction dims).
    pub n_ctx_orig: u32,
}

/// Everything the forward pass needs besides the tensors.
#[derive(Clone, Debug)]
pub struct HParams {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub rms_eps: f32,
    /// RoPE of full-attention layers.
    pub rope: Rope,
    /// RoPE of sliding-window layers (gemma2/gemma3 use their own base).
    pub rope_swa: Rope,
    /// Per layer: sliding-window attention with window `n_swa` (key visible iff `q - k < n_swa`).
    pub is_swa: Vec<bool>,
    pub n_swa: usize,
    /// Query scale applied before the dot product (gemma*, phi3) ...
    pub q_scale: f32,
    /// ... or to the scores inside the softmax (llama, qwen).
    pub kq_scale: f32,
    /// gemma2: `cap * tanh(score / cap)` on attention scores (0 = off).
    pub attn_softcap: f32,
    /// gemma2/gemma3: `cap * tanh(logit / cap)` on the output logits (0 = off).
    pub final_softcap: f32,
    /// gemma*: token embeddings are multiplied by `sqrt(n_embd)`.
    pub embd_scale: f32,
    /// `{arch}.context_length`: the context the model was trained for (0 when the file has none).
    pub n_ctx_train: usize,
    /// Mixture of experts: experts per layer (0: every layer has a dense FFN) and experts each
    /// token is routed to.
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Whether the chosen experts' router weights are renormalized to sum to 1 (llama.cpp's
    /// `norm_w`: qwen3moe and Mixtral-style llama yes, qwen2moe no).
    pub expert_weights_norm: bool,
}

impl HParams {
    /// Reads the hyperparameters of the model in `src`; an architecture we do not implement is an error.
    pub fn read(src: &dyn WeightSource) -> Result<HParams> {
        let bad = |problem| VerifyError::Model {
            model: src.describe(),
            problem,
        };
        let arch_name = src
            .meta_str(crate::gguf::KEY_ARCH)
            .ok_or_else(|| bad(ModelProblem::NoArchitecture))?;
        let Some(arch) = Arch::from_gguf(&arch_name) else {
            return Err(bad(ModelProblem::Unsupported {
                arch: arch_name,
                supported: Arch::list(),
            }));
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let need_uint = |k: &str| -> Result<usize> {
            let v = src
                .meta_uint(&key(k))
                .ok_or_else(|| bad(ModelProblem::MissingUint { key: key(k) }))?;
            Ok(v as usize)
        };
        let n_layer = need_uint("block_count")?;
        let n_embd = need_uint("embedding_length")?;
        let n_head = need_uint("attention.head_count")?;
        let n_head_kv = src
            .meta_uint(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        // Sanity bounds before anything is sized from them.
        if n_layer == 0 || n_layer > 1024 || n_embd == 0 || n_embd > 1 << 20 {
            return Err(bad(ModelProblem::Implausible { n_layer, n_embd }));
        }
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_head > 4096 {
            return Err(bad(ModelProblem::Heads { n_head, n_head_kv }));
        }
        let head_dim_k = src
            .meta_uint(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        let head_dim_v = src
            .meta_uint(&key("attention.value_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        let n_rot = src
            .meta_uint(&key("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim_k);
        if head_dim_k == 0 || head_dim_k > 4096 || n_rot > head_dim_k || n_rot % 2 != 0 {
            return Err(bad(ModelProblem::HeadSize {
                head_dim: head_dim_k,
                n_rot,
            }));
        }
        let rms_eps = src
            .meta_f32(&key("attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| {
                bad(ModelProblem::MissingKey {
                    key: key("attention.layer_norm_rms_epsilon"),
                })
            })?;

        // RoPE, as llama_context's constructor resolves it from the training hyperparameters.
        let freq_base = src.meta_f32(&key("rope.freq_base")).unwrap_or(10000.0);
        let scaling = src
            .meta_str(&key("rope.scaling.type"))
            .unwrap_or_else(|| "linear".into());
        let factor = src
            .meta_f32(&key("rope.scaling.factor"))
            .or_else(|| src.meta_f32(&key("rope.scale_linear")))
            .unwrap_or(0.0);
        let mut freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        let mut ext_factor = 0.0f32;
        let mut attn_factor = 1.0f32;
        match scaling.as_str() {
            "none" => freq_scale = 1.0,
            "linear" | "longrope" => {}
            "yarn" => {
                ext_factor = 1.0;
                let get_mscale = |scale: f32, mscale: f32| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * mscale * scale.ln() + 1.0
                    }
                };
                let factor = 1.0 / freq_scale;
                let log_mul = src
                    .meta_f32(&key("rope.scaling.yarn_log_multiplier"))
                    .unwrap_or(0.0);
                attn_factor = if log_mul != 0.0 {
                    get_mscale(factor, 1.0) / get_mscale(factor, log_mul)
                } else {
                    get_mscale(factor, 1.0)
                };
                attn_factor *= 1.0 / (1.0 + 0.1 * factor.ln());
            }
            other => {
                return Err(bad(ModelProblem::RopeScaling {
                    kind: other.to_string(),
                }))
            }
        }
        attn_factor *= src
            .meta_f32(&key("rope.scaling.attn_factor"))
            .unwrap_or(1.0);
        let n_ctx_train = src.meta_uint(&key("context_length")).unwrap_or(0) as u32;
        let n_ctx_orig = src
            .meta_uint(&key("rope.scaling.original_context_length"))
            .map(|v| v as u32)
            .unwrap_or(n_ctx_train);
        let rope = Rope {
            n_dims: n_rot,
            freq_base,
            freq_scale,
            ext_factor,
            attn_factor,
            beta_fast: src
                .meta_f32(&key("rope.scaling.yarn_beta_fast"))
                .unwrap_or(32.0),
            beta_slow: src
                .meta_f32(&key("rope.scaling.yarn_beta_slow"))
                .unwrap_or(1.0),
            n_ctx_orig,
        };

        // Sliding-window layers (gemma2: every other layer, window 4096 by default; gemma3: 5 of 6).
        let mut is_swa = vec![false; n_layer];
        let mut n_swa = 0usize;
        let mut rope_swa = rope;
        let window = src.meta_uint(&key("attention.sliding_window"));
        let pattern_default = match arch {
            Arch::Gemma2 => {
                n_swa = window.unwrap_or(4096) as usize;
                // llama_model_gemma2: the SWA rope defaults to the full-attention one.
                rope_swa.freq_base = src
                    .meta_f32(&key("rope.freq_base_swa"))
                    .unwrap_or(freq_base);
                Some(2)
            }
            Arch::Gemma3 if window.unwrap_or(0) > 0 => {
                n_swa = window.unwrap_or(0) as usize;
                // llama_hparams defaults: base 10000, scale 1, whatever the global rope is.
                rope_swa.freq_base = src.meta_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0);
                rope_swa.freq_scale = 1.0;
                Some(6)
            }
            _ => None,
        };
        if let Some(default) = pattern_default {
            let pattern_key = key("attention.sliding_window_pattern");
            if let Some(flags) = src.meta_bool_array(&pattern_key) {
                for (dst, f) in is_swa.iter_mut().zip(flags) {
                    *dst = f;
                }
            } else {
                let n = src.meta_uint(&pattern_key).unwrap_or(default) as usize;
                // llama_hparams::set_swa_pattern (dense layer last in each group).
                for (il, dst) in is_swa.iter_mut().enumerate() {
                    *dst = n == 0 || il % n < n - 1;
                }
            }
        }

        // Attention scaling, per llama.cpp's graph for each architecture.
        let inv_sqrt_hd = 1.0 / (head_dim_k as f32).sqrt();
        let (q_scale, kq_scale) = match arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen2Moe | Arch::Qwen3 | Arch::Qwen3Moe => {
                (1.0, inv_sqrt_hd)
            }
            Arch::Phi3 | Arch::Gemma => (inv_sqrt_hd, 1.0),
            Arch::Gemma2 | Arch::Gemma3 => {
                // gemma_pytorch config: the 27B models scale by hidden/heads instead of head_dim;
                // llama.cpp recognises them by layer count.
                let is_27b = (arch == Arch::Gemma2 && n_layer == 46)
                    || (arch == Arch::Gemma3 && n_layer == 62);
                let s = if is_27b {
                    1.0 / ((n_embd / n_head) as f32).sqrt()
                } else {
                    inv_sqrt_hd
                };
                (s, 1.0)
            }
        };
        let attn_softcap = if arch == Arch::Gemma2 {
            src.meta_f32(&key("attn_logit_softcapping")).unwrap_or(50.0)
        } else {
            0.0
        };
        let final_softcap = match arch {
            Arch::Gemma2 => src
                .meta_f32(&key("final_logit_softcapping"))
                .unwrap_or(30.0),
            Arch::Gemma3 => src.meta_f32(&key("final_logit_softcapping")).unwrap_or(0.0),
            _ => 0.0,
        };
        let n_expert = src.meta_uint(&key("expert_count")).unwrap_or(0) as usize;
        let n_expert_used = src.meta_uint(&key("expert_used_count")).unwrap_or(0) as usize;
        if n_expert > 0 && (n_expert > 4096 || n_expert_used == 0 || n_expert_used > n_expert) {
            return Err(bad(ModelProblem::Experts {
                n_expert,
                n_expert_used,
            }));
        }
        let expert_weights_norm = arch != Arch::Qwen2Moe;
        let embd_scale = if arch.is_gemma() {
            (n_embd as f32).sqrt()
        } else {
            1.0
        };
        Ok(HParams {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            rms_eps,
            rope,
            rope_swa,
            is_swa,
            n_swa,
            q_scale,
            kq_scale,
            attn_softcap,
            final_softcap,
            embd_scale,
            n_ctx_train: n_ctx_train as usize,
            n_expert,
            n_expert_used,
            expert_weights_norm,
        })
    }
}
