//! HF module path → GGUF base tensor name, per architecture (see the [`super`] docs for what each
//! architecture's GGUF stores).

use super::{Arch, TargetKind};

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
pub fn map_module(arch: Arch, module_path: &str) -> Option<ModuleMap> {
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
    let is_moe = arch.is_moe();
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
        "mlp.gate_up_proj" if arch.fuses_gate_up() => "ffn_up",
        // qwen MoE's router, and transformers 5 Mixtral's (`block_sparse_moe.gate` in 4).
        "mlp.gate" if is_moe || arch == Arch::Llama => "ffn_gate_inp",
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
        rope: if arch.permutes_qk() { rope } else { None },
    })
}

/// The GGUF block tensors (`blk.N.SHORT.weight`) a module map can produce: the 2-D weights
/// llama.cpp applies a runtime LoRA to (through `build_lora_mm`), besides `output.weight` and
/// `token_embd.weight`.
const LORA_BLOCK_TARGETS: [&str; 13] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "attn_qkv",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "ffn_gate_inp",
    "ffn_gate_shexp",
    "ffn_up_shexp",
    "ffn_down_shexp",
    "ffn_gate_inp_shexp",
];

/// Whether the GGUF tensor `name` is one a GGUF LoRA can adapt, and as what: the block projections
/// above and `output.weight` as linear, `token_embd.weight` as the embedding, `ffn_*_exps` as
/// stacked experts. `None` for everything else (norms, biases, other tensors).
pub fn lora_target_kind(name: &str) -> Option<TargetKind> {
    match name {
        "output.weight" => return Some(TargetKind::Linear),
        "token_embd.weight" => return Some(TargetKind::Embedding),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (layer, short) = rest.split_once('.')?;
    layer.parse::<u32>().ok()?;
    if LORA_BLOCK_TARGETS.contains(&short) {
        Some(TargetKind::Linear)
    } else if matches!(short, "ffn_gate_exps" | "ffn_up_exps" | "ffn_down_exps") {
        Some(TargetKind::Experts)
    } else {
        None
    }
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

    fn map(arch: &str, path: &str) -> Option<ModuleMap> {
        map_module(Arch::from_gguf(arch).unwrap(), path)
    }

    #[test]
    fn llama_family_maps_and_marks_rope() {
        let m = map("llama", "model.layers.3.self_attn.q_proj").unwrap();
        assert_eq!(m.target, "blk.3.attn_q.weight");
        assert_eq!((m.layer, m.rope), (Some(3), Some(Rope::Q)));
        let k = map("llama", "model.layers.0.self_attn.k_proj").unwrap();
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
            assert_eq!(map("llama", hf).unwrap().target, gguf, "{hf}");
        }
        assert_eq!(
            map("llama", "model.embed_tokens").unwrap().kind,
            TargetKind::Embedding
        );
        assert!(map("llama", "model.layers.0.self_attn.rotary_emb").is_none());
        assert!(map("llama", "model.norm").is_none());
    }

    #[test]
    fn non_llama_archs_do_not_permute() {
        for arch in ["qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"] {
            let m = map(arch, "model.layers.0.self_attn.q_proj").unwrap();
            assert_eq!(m.rope, None, "{arch}");
        }
    }

    #[test]
    fn phi3_fused_and_multimodal_prefixes() {
        assert_eq!(
            map("phi3", "model.layers.2.self_attn.qkv_proj")
                .unwrap()
                .target,
            "blk.2.attn_qkv.weight"
        );
        assert_eq!(
            map("phi3", "model.layers.2.mlp.gate_up_proj")
                .unwrap()
                .target,
            "blk.2.ffn_up.weight"
        );
        assert!(map("llama", "model.layers.2.mlp.gate_up_proj").is_none());
        assert_eq!(
            map("gemma3", "model.language_model.layers.4.mlp.down_proj")
                .unwrap()
                .target,
            "blk.4.ffn_down.weight"
        );
        assert_eq!(
            map("gemma3", "language_model.model.layers.4.mlp.down_proj")
                .unwrap()
                .target,
            "blk.4.ffn_down.weight"
        );
    }

    #[test]
    fn every_mapped_target_is_a_lora_target() {
        for (arch, path) in [
            ("llama", "model.layers.3.self_attn.q_proj"),
            ("llama", "model.layers.3.mlp.down_proj"),
            ("llama", "lm_head"),
            ("llama", "model.embed_tokens"),
            ("phi3", "model.layers.2.self_attn.qkv_proj"),
            ("qwen2moe", "model.layers.0.mlp.shared_expert.up_proj"),
            ("qwen2moe", "model.layers.0.mlp.experts.3.up_proj"),
        ] {
            let m = map(arch, path).unwrap();
            assert_eq!(lora_target_kind(&m.target), Some(m.kind), "{path}");
        }
        assert_eq!(lora_target_kind("blk.0.attn_norm.weight"), None);
        assert_eq!(lora_target_kind("blk.0.attn_q.bias"), None);
        assert_eq!(lora_target_kind("output_norm.weight"), None);
    }

    #[test]
    fn mixtral_router_maps_under_both_transformers_names() {
        // transformers 4 `block_sparse_moe.gate`, transformers 5 `mlp.gate` (MixtralTopKRouter).
        for hf in [
            "model.layers.1.block_sparse_moe.gate",
            "model.layers.1.mlp.gate",
        ] {
            let m = map("llama", hf).unwrap();
            assert_eq!(
                (m.target.as_str(), m.kind),
                ("blk.1.ffn_gate_inp.weight", TargetKind::Linear),
                "{hf}"
            );
        }
        // Dense architectures have no router to map it to.
        assert!(map("qwen3", "model.layers.1.mlp.gate").is_none());
    }

    #[test]
    fn experts_map_to_stacked_tensors() {
        let m = map("llama", "model.layers.1.block_sparse_moe.experts.7.w2").unwrap();
        assert_eq!(
            (m.target.as_str(), m.expert),
            ("blk.1.ffn_down_exps.weight", Some(7))
        );
        assert_eq!(m.kind, TargetKind::Experts);
        let m = map("qwen2moe", "model.layers.0.mlp.experts.3.up_proj").unwrap();
        assert_eq!(
            (m.target.as_str(), m.expert),
            ("blk.0.ffn_up_exps.weight", Some(3))
        );
        assert_eq!(
            map("qwen2moe", "model.layers.0.mlp.shared_expert.gate_proj")
                .unwrap()
                .target,
            "blk.0.ffn_gate_shexp.weight"
        );
        assert_eq!(
            map("qwen3moe", "model.layers.0.mlp.gate").unwrap().target,
            "blk.0.ffn_gate_inp.weight"
        );
    }
}
