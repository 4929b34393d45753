//! The PEFT part of `inspect` (a directory, or a `.safetensors` with `adapter_config.json` beside it):
//! the config as it changes the adapter's effect, and one row per adapted module as the normalized
//! model sees it, without a base: GGUF target (where every supported architecture names it alike),
//! rank, PEFT's alpha, llama.cpp-convention alpha, effective scale, A/B shapes, and what a GGUF LoRA
//! could not hold (DoRA magnitudes, `lora_B.bias`, `modules_to_save` full weights). The weights file
//! itself is shown as a [`SafetensorsReport`] beside it. Reading goes through [`peft::read_raw`];
//! mapping through [`arch::map_module`].

use std::path::Path;

use serde::Serialize;

use super::adapter::{coverage_of, LayerCoverage};
use super::safetensors::{report as safetensors_report, SafetensorsReport};
use crate::adapter::{peft, AdapterError, Factor};
use crate::arch::{self, Arch, TargetKind};

#[derive(Debug, Serialize)]
pub struct PeftReport {
    pub path: String,
    pub config_path: String,
    pub weights_path: String,
    pub config: ConfigView,
    pub modules: Vec<ModuleRow>,
    /// Full replacement tensors (`modules_to_save`, resized embeddings, norms).
    pub full_tensors: Vec<FullRow>,
    /// Adapted targets per layer (layers `0..=max`, as far as the adapter shows them).
    pub layers: Vec<LayerCoverage>,
    /// Distinct ranks of the modules, ascending.
    pub ranks: Vec<usize>,
    /// One line per reason the adapter cannot be written as a GGUF LoRA (empty: it can).
    pub not_representable: Vec<String>,
    pub weights: SafetensorsReport,
}

/// The `adapter_config.json` fields that change what the adapter does.
#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub peft_type: Option<String>,
    pub r: u32,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In the config's order (PEFT takes the first matching key).
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    pub target_modules: Vec<String>,
    /// Parameters adapted directly (PEFT's `ParamWrapper`): fused expert weights.
    pub target_parameters: Vec<String>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    pub modules_to_save: Vec<String>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
    pub invocation_string: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ModuleRow {
    /// Module path inside the base model (`model.layers.0.self_attn.q_proj`).
    pub source: String,
    /// GGUF base tensor, when every supported architecture that knows the module names it alike.
    pub target: Option<String>,
    pub layer: Option<u32>,
    /// For one expert of a stacked MoE tensor: its index.
    pub expert: Option<usize>,
    /// `linear`, `embedding` or `experts`.
    pub kind: String,
    pub rank: usize,
    /// PEFT's `lora_alpha` for this module (after `alpha_pattern`).
    pub lora_alpha: f64,
    /// The `rank_pattern` / `alpha_pattern` keys that decided rank and alpha.
    pub rank_key: Option<String>,
    pub alpha_key: Option<String>,
    /// llama.cpp-convention alpha (scale = alpha / rank): `lora_alpha`, ×√rank with rsLoRA.
    pub alpha: f64,
    /// Effective scale at user scale 1 (PEFT's `scaling`).
    pub scale: f64,
    /// Shapes as stored (PyTorch order): A `[rank, n_in]`, B `[n_out, rank]`.
    pub lora_a: Vec<u64>,
    pub lora_b: Vec<u64>,
    pub dtype: String,
    pub dora: bool,
    pub lora_bias: bool,
    /// Whether a GGUF LoRA can hold this module as it is.
    pub representable: bool,
    /// Problems and notes, empty when there are none.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct FullRow {
    pub name: String,
    pub module: String,
    pub target: Option<String>,
    pub shape: Vec<u64>,
    pub dtype: String,
}

/// The GGUF target of an HF module path as every supported architecture that maps it agrees on;
/// `None` when none maps it or they disagree (then only a base or `--arch` can tell).
pub fn target_without_base(module: &str) -> Option<arch::ModuleMap> {
    let mut found: Option<arch::ModuleMap> = None;
    for a in Arch::ALL {
        if let Some(mut m) = arch::map_module(a, module) {
            // Whether q/k rows get RoPE-permuted depends on the architecture, not the name.
            m.rope = None;
            match &found {
                None => found = Some(m),
                Some(f) if *f == m => {}
                Some(_) => return None,
            }
        }
    }
    found
}

fn dtype_of(f: &Factor) -> String {
    match f {
        Factor::Safetensors { entry, .. } => format!("{:?}", entry.dtype),
        Factor::Owned(_) | Factor::Spooled { .. } => "f32".into(),
        Factor::Gguf { src, tensor, .. } => src
            .tensor(tensor)
            .map_or_else(|| "?".into(), |t| t.info.ty.to_string()),
    }
}

/// Reads the PEFT adapter at `path` and builds its report.
pub fn inspect_peft(path: &Path) -> Result<PeftReport, AdapterError> {
    let raw = peft::read_raw(path)?;
    let cfg = &raw.config;
    let mut modules = Vec::new();
    let mut not_representable = Vec::new();
    let wrapped = peft::wrappers(&raw).map_err(peft::PeftError::from)?;
    for md in &raw.modules {
        let (Some(a), Some(b)) = (&md.a, &md.b) else {
            continue; // read_raw refuses modules without both factors
        };
        let (stored_rank, n_in) = a.shape();
        let (n_out, _) = b.shape();
        let mut rank = stored_rank;
        // A LoRA on a fused expert parameter (target_parameters): shown as that parameter, with
        // the per-expert rank and the stacked tensor of expert 0's module.
        let fused = wrapped.iter().find(|w| std::ptr::eq(w.saved, md));
        let key = fused.map_or_else(|| md.path.clone(), |w| w.parameter_path());
        let map = match fused {
            Some(w) => {
                let short = w.expert_modules()[0];
                target_without_base(&format!("{}.0.{short}", w.module)).map(|mut m| {
                    m.expert = None;
                    m
                })
            }
            None => target_without_base(&md.path),
        };
        let (cfg_rank, rank_key) = cfg.rank_for(&key);
        let (lora_alpha, alpha_key) = cfg.alpha_for(&key);
        let mut notes = Vec::new();
        let mut representable = true;
        if fused.is_some() {
            let r = cfg_rank as usize;
            if stored_rank.is_multiple_of(r) {
                rank = r;
                notes.push(format!(
                    "fused expert parameter (target_parameters, saved as {}): {} experts of rank {r}{}",
                    md.path,
                    stored_rank / r,
                    if key.ends_with("gate_up_proj") {
                        "; gate rows → ffn_gate_exps, up rows → ffn_up_exps"
                    } else {
                        ""
                    }
                ));
            } else {
                notes.push(format!(
                    "fused expert parameter with {stored_rank} LoRA rows: not a whole number of experts of rank r = {r}"
                ));
                representable = false;
            }
        } else if cfg_rank as usize != rank {
            notes.push(format!(
                "tensors have rank {rank}, the config gives r = {cfg_rank}"
            ));
            representable = false;
        }
        match &map {
            None => {
                notes.push(
                    "no GGUF tensor known for this module (or the architectures disagree): inspect with --base"
                        .into(),
                );
                representable = false;
            }
            Some(m) if md.embedding != (m.kind == TargetKind::Embedding) => {
                notes.push(if md.embedding {
                    "embedding LoRA on a module that is not the token embedding".into()
                } else {
                    "linear LoRA on the token embedding; expected lora_embedding_A/B".into()
                });
                representable = false;
            }
            Some(_) => {}
        }
        if md.magnitude.is_some() {
            notes.push("DoRA magnitude: a GGUF LoRA cannot hold it; `merge` applies it".into());
            representable = false;
        }
        if md.bias.is_some() {
            notes.push("lora_B.bias: a GGUF LoRA cannot hold it; `merge` applies it".into());
            representable = false;
        }
        if !representable {
            not_representable.push(format!("{}: {}", md.path, notes.join("; ")));
        }
        let kind = match &map {
            Some(_) if fused.is_some() => TargetKind::Experts.name(),
            Some(m) => m.kind.name(),
            None if md.embedding => TargetKind::Embedding.name(),
            None => TargetKind::Linear.name(),
        };
        let alpha = cfg.llama_alpha(&key, rank as u32);
        modules.push(ModuleRow {
            source: key,
            target: map.as_ref().map(|m| m.target.clone()),
            layer: map.as_ref().and_then(|m| m.layer),
            expert: map.as_ref().and_then(|m| m.expert),
            kind: kind.to_string(),
            rank,
            lora_alpha,
            rank_key: rank_key.map(str::to_string),
            alpha_key: alpha_key.map(str::to_string),
            alpha,
            scale: if rank == 0 { 0.0 } else { alpha / rank as f64 },
            lora_a: vec![stored_rank as u64, n_in as u64],
            lora_b: vec![n_out as u64, stored_rank as u64],
            dtype: dtype_of(a),
            dora: md.magnitude.is_some(),
            lora_bias: md.bias.is_some(),
            representable,
            notes,
        });
    }
    let full_tensors: Vec<FullRow> = raw
        .full
        .iter()
        .map(|(name, module, f)| {
            let shape = match f {
                Factor::Safetensors { entry, .. } => {
                    entry.shape.iter().map(|d| *d as u64).collect()
                }
                Factor::Owned(_) | Factor::Gguf { .. } | Factor::Spooled { .. } => {
                    let (rows, cols) = f.shape();
                    vec![rows as u64, cols as u64]
                }
            };
            FullRow {
                name: name.clone(),
                module: module.clone(),
                target: target_without_base(module).map(|m| m.target),
                shape,
                dtype: dtype_of(f),
            }
        })
        .collect();
    for f in &full_tensors {
        not_representable.push(format!(
            "{}: full replacement tensor (modules_to_save, norms): a LoRA cannot hold it; `merge` applies it",
            f.name
        ));
    }
    let mut ranks: Vec<usize> = modules.iter().map(|m| m.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    // A fused gate_up_proj row adapts ffn_up_exps beside the ffn_gate_exps it names.
    let targets: Vec<(u32, String)> = modules
        .iter()
        .filter_map(|m| Some((m.layer?, m.target.clone()?, m)))
        .flat_map(|(l, t, m)| {
            let up = (m.kind == TargetKind::Experts.name() && m.source.ends_with(".gate_up_proj"))
                .then(|| (l, t.replace("_gate_exps", "_up_exps")));
            std::iter::once((l, t)).chain(up)
        })
        .collect();
    let layers = coverage_of(targets.iter().map(|(l, t)| (*l, t.as_str())), None);
    Ok(PeftReport {
        path: path.display().to_string(),
        config_path: raw.config_path.display().to_string(),
        weights_path: raw.weights.path().display().to_string(),
        config: ConfigView {
            peft_type: cfg.peft_type.clone(),
            r: cfg.r,
            lora_alpha: cfg.lora_alpha,
            use_rslora: cfg.use_rslora,
            rank_pattern: cfg
                .rank_pattern
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect(),
            alpha_pattern: cfg
                .alpha_pattern
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect(),
            target_modules: cfg.target_modules.clone(),
            target_parameters: cfg.target_parameters.clone(),
            fan_in_fan_out: cfg.fan_in_fan_out,
            use_dora: cfg.use_dora,
            lora_bias: cfg.lora_bias,
            modules_to_save: cfg.modules_to_save.clone(),
            alora_invocation_tokens: cfg.alora_invocation_tokens.clone(),
            invocation_string: cfg.invocation_string.clone(),
            base_model_name_or_path: cfg.base_model_name_or_path.clone(),
        },
        modules,
        full_tensors,
        layers,
        ranks,
        not_representable,
        weights: safetensors_report(raw.weights.path(), &raw.weights),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_without_a_base_where_architectures_agree() {
        let t = |p: &str| target_without_base(p).map(|m| m.target);
        assert_eq!(
            t("model.layers.3.self_attn.q_proj").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        // Only phi3 knows gate_up_proj, only the qwen MoE architectures know mlp.gate: one answer each.
        assert_eq!(
            t("model.layers.0.mlp.gate_up_proj").as_deref(),
            Some("blk.0.ffn_up.weight")
        );
        assert_eq!(
            t("model.layers.0.mlp.gate").as_deref(),
            Some("blk.0.ffn_gate_inp.weight")
        );
        let e = target_without_base("model.layers.1.block_sparse_moe.experts.5.w2").unwrap();
        assert_eq!(
            (e.target.as_str(), e.expert, e.kind),
            ("blk.1.ffn_down_exps.weight", Some(5), TargetKind::Experts)
        );
        // The q/k permutation is the architecture's business, not the name's.
        assert_eq!(
            target_without_base("model.layers.0.self_attn.k_proj").map(|m| m.rope),
            Some(None)
        );
        assert_eq!(t("model.layers.0.mlp.unknown_proj"), None);
        assert_eq!(t("transformer.h.0.attn.c_attn"), None);
    }
}
