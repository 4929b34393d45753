//! PEFT state-dict tensor names: which module a tensor belongs to and what it is (`lora_A`,
//! `lora_B`, embedding factors, DoRA magnitude, `lora_B.bias`, or a full weight).

/// The role of one tensor in a PEFT state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorRole {
    LoraA,
    LoraB,
    EmbeddingA,
    EmbeddingB,
    Magnitude,
    LoraBias,
    /// Anything else: a full weight (`modules_to_save`, resized embeddings, norms).
    Full,
}

/// Splits a PEFT tensor name into the module path inside the base model and the tensor's role:
/// `base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight` →
/// (`model.layers.0.mlp.up_proj`, `LoraA`).
pub fn parse_tensor_name(name: &str) -> (String, TensorRole) {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let parts: Vec<&str> = name.split('.').collect();
    let role_at = parts.iter().rposition(|p| {
        matches!(
            *p,
            "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector"
        )
    });
    if let Some(i) = role_at {
        let rest = &parts[i + 1..];
        // Allowed tails: nothing, weight, bias, ADAPTER, ADAPTER.weight, ADAPTER.bias.
        let tail_ok = match rest {
            [] | [_] => true,
            [_, last] => matches!(*last, "weight" | "bias"),
            _ => false,
        };
        if tail_ok {
            let is_bias = rest.last() == Some(&"bias");
            let role = match (parts[i], is_bias) {
                ("lora_A", false) => Some(TensorRole::LoraA),
                ("lora_B", false) => Some(TensorRole::LoraB),
                ("lora_B", true) => Some(TensorRole::LoraBias),
                ("lora_embedding_A", false) => Some(TensorRole::EmbeddingA),
                ("lora_embedding_B", false) => Some(TensorRole::EmbeddingB),
                ("lora_magnitude_vector", false) => Some(TensorRole::Magnitude),
                _ => None,
            };
            if let Some(role) = role {
                return (parts[..i].join("."), role);
            }
        }
    }
    // A full tensor: `<module>.weight` or `<module>.modules_to_save.<adapter>.weight`.
    let mut module: Vec<&str> = parts[..parts.len().saturating_sub(1)].to_vec();
    if let Some(i) = module.iter().position(|p| *p == "modules_to_save") {
        module.truncate(i);
    }
    (module.join("."), TensorRole::Full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_name_forms() {
        let cases = [
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "model.layers.0.self_attn.q_proj",
                TensorRole::LoraA,
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                "model.layers.0.self_attn.q_proj",
                TensorRole::LoraB,
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "model.embed_tokens",
                TensorRole::EmbeddingA,
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_B.default",
                "model.embed_tokens",
                TensorRole::EmbeddingB,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector",
                "model.layers.1.mlp.up_proj",
                TensorRole::Magnitude,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector.weight",
                "model.layers.1.mlp.up_proj",
                TensorRole::Magnitude,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias",
                "model.layers.1.mlp.up_proj",
                TensorRole::LoraBias,
            ),
            (
                "base_model.model.lm_head.weight",
                "lm_head",
                TensorRole::Full,
            ),
            (
                "base_model.model.lm_head.modules_to_save.default.weight",
                "lm_head",
                TensorRole::Full,
            ),
            (
                "model.layers.2.mlp.down_proj.lora_A.weight",
                "model.layers.2.mlp.down_proj",
                TensorRole::LoraA,
            ),
            (
                "base_model.model.model.norm.weight",
                "model.norm",
                TensorRole::Full,
            ),
        ];
        for (name, module, role) in cases {
            assert_eq!(
                parse_tensor_name(name),
                (module.to_string(), role),
                "{name}"
            );
        }
    }
}
