//! Per-architecture knowledge: which GGUF base tensor a Hugging Face module becomes, which
//! architectures RoPE-permute `attn_q`/`attn_k` rows, and the hyperparameters a conversion needs,
//! taken from the base GGUF (`--base`) or, with `--arch` alone, only what the adapter itself shows.
//!
//! The maps restate llama.cpp's `convert_hf_to_gguf.py` (`conversion/*.py`, gguf-py's
//! `tensor_mapping.py`) for the module paths LoRA trainers target. What the GGUF of each
//! architecture stores:
//! - `llama` (HF Llama, Mistral, Mixtral: `LlamaModel`, `undo_permute = True`): q/k rows permuted by
//!   `permute(n_head)` / `permute(n_head_kv)`; Mixtral experts `block_sparse_moe.experts.E.w1/w2/w3`
//!   stacked into `ffn_gate_exps` / `ffn_down_exps` / `ffn_up_exps`.
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

use std::collections::BTreeMap;

use crate::adapter::TargetKind;
use crate::gguf::{GgufModel, Value};
use crate::quant::GgmlType;

/// GGUF architectures whose module paths we map.
pub const SUPPORTED: &[&str] = &[
    "llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3",
];

/// Whether the GGUF of `arch` stores `attn_q`/`attn_k` RoPE-permuted (llama.cpp's converter runs
/// `LlamaModel.permute` on them), so LoRA `B` rows must be permuted the same way.
pub fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

/// One base tensor as the base GGUF describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseTensor {
    /// ggml order (`ne[0]` first).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// What a conversion knows about the base model.
#[derive(Clone, Debug, Default)]
pub struct BaseInfo {
    /// GGUF architecture name.
    pub arch: String,
    pub n_layer: Option<u32>,
    pub n_head: Option<u32>,
    pub n_head_kv: Option<u32>,
    pub n_embd: Option<u64>,
    /// `general.name` / `general.basename`, for identity hints.
    pub name: Option<String>,
    /// Every tensor of the base, when a base GGUF was given; `None` with `--arch` only.
    pub tensors: Option<BTreeMap<String, BaseTensor>>,
}

impl BaseInfo {
    /// `--arch ARCH` without a base file.
    pub fn from_arch(arch: &str) -> Result<BaseInfo, String> {
        let arch = canonical_arch(arch).ok_or_else(|| {
            format!(
                "unknown architecture '{arch}'; supported: {}",
                SUPPORTED.join(", ")
            )
        })?;
        Ok(BaseInfo {
            arch: arch.to_string(),
            ..BaseInfo::default()
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&BaseTensor> {
        self.tensors.as_ref()?.get(name)
    }

    /// What a base GGUF (single file or split set) says: architecture, head counts, every tensor.
    pub fn from_model(model: &GgufModel) -> Result<BaseInfo, String> {
        let md = model.metadata();
        if md.get_str("general.type") == Some("adapter") {
            return Err("this is a LoRA adapter, not a base model".into());
        }
        let arch = md
            .get_str("general.architecture")
            .ok_or("no general.architecture")?
            .to_string();
        let scalar = |key: &str| -> Option<u64> {
            match md.get(key)? {
                Value::Array(a) => {
                    // Per-layer values (some architectures): usable only when all agree.
                    let vals: Vec<u64> = (0..a.len()).filter_map(|i| a.get(i)?.as_uint()).collect();
                    let first = *vals.first()?;
                    vals.iter().all(|v| *v == first).then_some(first)
                }
                v => v.as_uint(),
            }
        };
        let tensors = model
            .tensors()
            .map(|(_, t)| {
                (
                    t.name.clone(),
                    BaseTensor {
                        dims: t.dims.clone(),
                        ty: t.ty,
                    },
                )
            })
            .collect();
        Ok(BaseInfo {
            n_layer: scalar(&format!("{arch}.block_count")).map(|v| v as u32),
            n_head: scalar(&format!("{arch}.attention.head_count")).map(|v| v as u32),
            n_head_kv: scalar(&format!("{arch}.attention.head_count_kv")).map(|v| v as u32),
            n_embd: scalar(&format!("{arch}.embedding_length")),
            name: md
                .get_str("general.name")
                .or_else(|| md.get_str("general.basename"))
                .map(str::to_string),
            tensors: Some(tensors),
            arch,
        })
    }

    /// Whether the base is known tensor by tensor (a base GGUF was given).
    pub fn has_tensors(&self) -> bool {
        self.tensors.is_some()
    }
}

/// The GGUF architecture name for a user-given `--arch` (GGUF names, plus HF family aliases).
pub fn canonical_arch(arch: &str) -> Option<&'static str> {
    let a = arch.to_ascii_lowercase();
    let alias = match a.as_str() {
        "mistral" | "mixtral" => "llama",
        other => other,
    };
    SUPPORTED.iter().copied().find(|s| *s == alias)
}

/// Which side of the attention a projection feeds, for the llama RoPE permutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    Q,
    K,
}

/// Where one HF module goes in the GGUF.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleMap {
    /// GGUF base tensor name (`blk.3.attn_q.weight`).
    pub target: String,
    pub layer: Option<u32>,
    pub kind: TargetKind,
    /// For an expert of a stacked MoE tensor: its index.
    pub expert: Option<usize>,
    pub rope: Option<Rope>,
}

/// Strips the prefixes multimodal wrappers put in front of the text model, as llama.cpp's converter
/// does (`model.language_model.` → `model.`, `language_model.` → ``).
pub fn normalize_module_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = path.strip_prefix("language_model.") {
        rest.to_string()
    } else {
        path.to_string()
    }
}

/// Maps an HF module path (after `base_model.model.`, e.g. `model.layers.0.self_attn.q_proj`) to its
/// GGUF tensor for `arch`; `None` when the module has no GGUF tensor we know.
pub fn map_module(arch: &str, module_path: &str) -> Option<ModuleMap> {
    let path = normalize_module_path(module_path);
    let plain = |target: &str, kind| ModuleMap {
        target: target.to_string(),
        layer: None,
        kind,
        expert: None,
        rope: None,
    };
    match path.as_str() {
        "model.embed_tokens" => return Some(plain("token_embd.weight", TargetKind::Embedding)),
        "lm_head" => return Some(plain("output.weight", TargetKind::Linear)),
        _ => {}
    }
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let is_moe = matches!(arch, "qwen2moe" | "qwen3moe");
    let mut rope = None;
    let mut expert = None;
    let short = match module {
        "self_attn.q_proj" => {
            rope = Some(Rope::Q);
            "attn_q"
        }
        "self_attn.k_proj" => {
            rope = Some(Rope::K);
            "attn_k"
        }
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" if !is_moe => "ffn_gate",
        "mlp.up_proj" if !is_moe => "ffn_up",
        "mlp.down_proj" if !is_moe => "ffn_down",
        "mlp.gate_up_proj" if arch == "phi3" => "ffn_up",
        "mlp.gate" if is_moe => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        "block_sparse_moe.gate" => "ffn_gate_inp",
        m => {
            let (e, which) = m
                .strip_prefix("block_sparse_moe.experts.")
                .or_else(|| m.strip_prefix("mlp.experts."))?
                .split_once('.')?;
            expert = Some(e.parse::<usize>().ok()?);
            match which {
                "w1" | "gate_proj" => "ffn_gate_exps",
                "w2" | "down_proj" => "ffn_down_exps",
                "w3" | "up_proj" => "ffn_up_exps",
                _ => return None,
            }
        }
    };
    Some(ModuleMap {
        target: format!("blk.{layer}.{short}.weight"),
        layer: Some(layer),
        kind: if expert.is_some() {
            TargetKind::Experts
        } else {
            TargetKind::Linear
        },
        expert,
        rope: if permutes_qk(arch) { rope } else { None },
    })
}

/// For a target that the base stores fused (`attn_qkv`) while the adapter has its parts, or the
/// reverse: the part names in row order.
pub fn qkv_parts(layer: u32) -> [String; 3] {
    ["attn_q", "attn_k", "attn_v"].map(|p| format!("blk.{layer}.{p}.weight"))
}

pub fn qkv_fused(layer: u32) -> String {
    format!("blk.{layer}.attn_qkv.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_family_maps_and_marks_rope() {
        let m = map_module("llama", "model.layers.3.self_attn.q_proj").unwrap();
        assert_eq!(m.target, "blk.3.attn_q.weight");
        assert_eq!((m.layer, m.rope), (Some(3), Some(Rope::Q)));
        let k = map_module("llama", "model.layers.0.self_attn.k_proj").unwrap();
        assert_eq!(k.rope, Some(Rope::K));
        for (hf, gguf) in [
            ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"),
            (
                "model.layers.1.self_attn.o_proj",
                "blk.1.attn_output.weight",
            ),
            ("model.layers.1.mlp.gate_proj", "blk.1.ffn_gate.weight"),
            ("model.layers.1.mlp.up_proj", "blk.1.ffn_up.weight"),
            ("model.layers.12.mlp.down_proj", "blk.12.ffn_down.weight"),
            ("lm_head", "output.weight"),
            ("model.embed_tokens", "token_embd.weight"),
        ] {
            assert_eq!(map_module("llama", hf).unwrap().target, gguf, "{hf}");
        }
        assert_eq!(
            map_module("llama", "model.embed_tokens").unwrap().kind,
            TargetKind::Embedding
        );
        assert!(map_module("llama", "model.layers.0.self_attn.rotary_emb").is_none());
        assert!(map_module("llama", "model.norm").is_none());
    }

    #[test]
    fn non_llama_archs_do_not_permute() {
        for arch in ["qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"] {
            let m = map_module(arch, "model.layers.0.self_attn.q_proj").unwrap();
            assert_eq!(m.rope, None, "{arch}");
        }
    }

    #[test]
    fn phi3_fused_and_multimodal_prefixes() {
        assert_eq!(
            map_module("phi3", "model.layers.2.self_attn.qkv_proj")
                .unwrap()
                .target,
            "blk.2.attn_qkv.weight"
        );
        assert_eq!(
            map_module("phi3", "model.layers.2.mlp.gate_up_proj")
                .unwrap()
                .target,
            "blk.2.ffn_up.weight"
        );
        assert!(map_module("llama", "model.layers.2.mlp.gate_up_proj").is_none());
        assert_eq!(
            map_module("gemma3", "model.language_model.layers.4.mlp.down_proj")
                .unwrap()
                .target,
            "blk.4.ffn_down.weight"
        );
        assert_eq!(
            map_module("gemma3", "language_model.model.layers.4.mlp.down_proj")
                .unwrap()
                .target,
            "blk.4.ffn_down.weight"
        );
    }

    #[test]
    fn experts_map_to_stacked_tensors() {
        let m = map_module("llama", "model.layers.1.block_sparse_moe.experts.7.w2").unwrap();
        assert_eq!(
            (m.target.as_str(), m.expert),
            ("blk.1.ffn_down_exps.weight", Some(7))
        );
        assert_eq!(m.kind, TargetKind::Experts);
        let m = map_module("qwen2moe", "model.layers.0.mlp.experts.3.up_proj").unwrap();
        assert_eq!(
            (m.target.as_str(), m.expert),
            ("blk.0.ffn_up_exps.weight", Some(3))
        );
        assert_eq!(
            map_module("qwen2moe", "model.layers.0.mlp.shared_expert.gate_proj")
                .unwrap()
                .target,
            "blk.0.ffn_gate_shexp.weight"
        );
        assert_eq!(
            map_module("qwen3moe", "model.layers.0.mlp.gate")
                .unwrap()
                .target,
            "blk.0.ffn_gate_inp.weight"
        );
    }

    #[test]
    fn arch_aliases() {
        assert_eq!(canonical_arch("Mistral"), Some("llama"));
        assert_eq!(canonical_arch("qwen3"), Some("qwen3"));
        assert!(BaseInfo::from_arch("gpt2")
            .unwrap_err()
            .contains("supported"));
    }
}
