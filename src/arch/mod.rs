//! Per-architecture knowledge, in one place: the [`Arch`] table (GGUF names, the aliases users type,
//! which architectures RoPE-permute `attn_q`/`attn_k`, which are MoE or gemma-family, which the
//! `verify` forward pass runs), the HF module → GGUF tensor maps ([`names`]), and what a conversion
//! knows about a base model ([`BaseInfo`], from a base GGUF or only `--arch`).
//!
//! The maps restate llama.cpp's `convert_hf_to_gguf.py` (`conversion/*.py`, gguf-py's
//! `tensor_mapping.py`) for the module paths LoRA trainers target. What the GGUF of each
//! architecture stores:
//! - `llama` (HF Llama, Mistral, Mixtral: `LlamaModel`, `undo_permute = True`): q/k rows permuted by
//!   `permute(n_head)` / `permute(n_head_kv)`; Mixtral experts `block_sparse_moe.experts.E.w1/w2/w3`
//!   stacked into `ffn_gate_exps` / `ffn_down_exps` / `ffn_up_exps`, the router
//!   `block_sparse_moe.gate` (transformers 5: `mlp.gate`) into `ffn_gate_inp`.
//! - `qwen2`, `qwen3`, `qwen2moe`, `qwen3moe`, `gemma`, `gemma2`, `gemma3`, `phi3`: no permutation.
//!   qwen MoE experts `mlp.experts.E.{gate,up,down}_proj` stacked into `ffn_*_exps`, shared expert
//!   into `ffn_*_shexp`.
//! - `phi3` keeps HF's fused `qkv_proj` as `attn_qkv` and `gate_up_proj` as `ffn_up` (rows: gate
//!   then up).
//!
//! What `--arch` cannot know without a base: the head counts the llama q/k permutation needs (so an
//! adapter touching `q_proj`/`k_proj` of a llama-family model needs `--base`), whether the base ties
//! its output to the embeddings (no `output.weight`), the expert count of partially adapted MoE
//! layers, and whether q/k/v are fused in the base. Those cases fail with an error asking for
//! `--base`; we never read an HF base directory.

mod base;
pub mod names;

pub use base::{ArchError, BaseError, BaseInfo, BaseTensor};
pub use names::{
    lora_target_kind, map_module, normalize_module_path, qkv_fused, qkv_parts, ModuleMap, Rope,
};

/// The GGUF architectures whose module paths we map, in the order messages list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// llama, and everything converted to it (mistral, mixtral, SmolLM, ...).
    Llama,
    Qwen2,
    Qwen2Moe,
    Qwen3,
    Qwen3Moe,
    Gemma,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Arch {
    /// Every architecture, in the order messages list them.
    pub const ALL: [Arch; 9] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen2Moe,
        Arch::Qwen3,
        Arch::Qwen3Moe,
        Arch::Gemma,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Phi3,
    ];

    /// The `general.architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Gemma => "gemma",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// The architecture whose `general.architecture` is exactly `name`.
    pub fn from_gguf(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The architecture a user means by `--arch NAME`: GGUF names in any case, plus the HF family
    /// names llama.cpp converts to `llama`.
    pub fn from_user(name: &str) -> Option<Arch> {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "mistral" | "mixtral" => Some(Arch::Llama),
            other => Arch::from_gguf(other),
        }
    }

    /// Whether the GGUF stores `attn_q`/`attn_k` RoPE-permuted (llama.cpp's converter runs
    /// `LlamaModel.permute` on them), so LoRA `B` rows must be permuted the same way. This is also
    /// why llama's forward pass uses NORM RoPE (adjacent pairs) and the others NEOX.
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }

    /// qwen MoE: `mlp.experts.E.*` are stacked experts and `mlp.gate` the router.
    pub fn is_moe(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Moe)
    }

    /// gemma, gemma2, gemma3: GELU, embeddings scaled by `sqrt(n_embd)`.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3)
    }

    /// phi3 fuses `gate_up_proj` into one `ffn_up` (gate rows first).
    pub fn fuses_gate_up(self) -> bool {
        self == Arch::Phi3
    }

    /// gemma3's converter cuts `token_embd` to the tokenizer's real vocabulary, so an embedding
    /// LoRA's `A` must be cut the same way.
    pub fn trims_embedding_vocab(self) -> bool {
        self == Arch::Gemma3
    }

    /// `"llama, qwen2, ..."` for messages (`verify`'s forward pass runs every one of them).
    pub fn list() -> String {
        Arch::ALL
            .into_iter()
            .map(Arch::name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of base tensor a LoRA targets; decides orientation and shape checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A 2-D projection (`attn_q`, `ffn_down`, `output`, ...).
    Linear,
    /// `token_embd.weight` (see the `adapter` module docs for its orientation).
    Embedding,
    /// A stacked 3-D expert tensor (`ffn_gate_exps`, ...).
    Experts,
}

impl TargetKind {
    /// The word reports use.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Linear => "linear",
            TargetKind::Embedding => "embedding",
            TargetKind::Experts => "experts",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_lists() {
        for a in Arch::ALL {
            assert_eq!(Arch::from_gguf(a.name()), Some(a));
            assert_eq!(Arch::from_user(&a.name().to_uppercase()), Some(a));
        }
        assert_eq!(Arch::from_user("Mistral"), Some(Arch::Llama));
        assert_eq!(Arch::from_gguf("mistral"), None);
        assert_eq!(
            Arch::list(),
            "llama, qwen2, qwen2moe, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3"
        );
        assert!(BaseInfo::from_arch("gpt2")
            .unwrap_err()
            .to_string()
            .contains("supported"));
    }
}
