//! The adapter view of a GGUF LoRA (`general.type = adapter`), shown beside its GGUF view: the
//! `lora_a`/`lora_b` pairs as llama.cpp's loader pairs them (through [`gguf_adapter::read`]), each
//! with its rank, alpha and the effective scale the runtime applies at user scale 1, plus the
//! distinct ranks, the file's alpha and per-layer coverage.

use std::path::Path;

use serde::Serialize;

use super::adapter::{coverage_of, ne_a, ne_b, LayerCoverage};
use super::gguf::{report as gguf_report, GgufReport, GgufView};
use crate::adapter::{gguf as gguf_adapter, Adapter};

/// A GGUF LoRA adapter: the GGUF view (flattened, as for any GGUF file) plus `adapter`.
#[derive(Debug, Serialize)]
pub struct GgufAdapterReport {
    #[serde(flatten)]
    pub gguf: GgufReport,
    pub adapter: LoraView,
}

#[derive(Debug, Serialize)]
pub struct LoraView {
    /// `adapter.lora.alpha` as stored; `null` when absent (llama.cpp then scales by the user scale
    /// alone, i.e. alpha = rank).
    pub alpha: Option<f64>,
    pub architecture: Option<String>,
    /// Number of `lora_a`/`lora_b` pairs.
    pub pairs: usize,
    /// Distinct ranks, ascending.
    pub ranks: Vec<usize>,
    pub alora_invocation_tokens: Option<Vec<u32>>,
    pub tensors: Vec<LoraRow>,
    /// Non-LoRA tensors llama.cpp accepts in an adapter (`*_norm.weight`).
    pub full_tensors: Vec<String>,
    pub layers: Vec<LayerCoverage>,
}

#[derive(Debug, Serialize)]
pub struct LoraRow {
    /// The adapted base tensor (`blk.0.attn_q.weight`).
    pub target: String,
    pub layer: Option<u32>,
    pub kind: String,
    pub rank: usize,
    /// The alpha the runtime uses for this tensor.
    pub alpha: f64,
    /// Effective scale at user scale 1 (`alpha / rank`).
    pub scale: f64,
    /// Shapes in ggml `ne` order, as stored.
    pub lora_a: Vec<u64>,
    pub lora_b: Vec<u64>,
    pub lora_a_type: String,
    pub lora_b_type: String,
}

/// Builds both views of the GGUF adapter at `path`: its file (`view`) and the adapter read from it.
pub fn report(path: &Path, view: &GgufView<'_>, adapter: &Adapter) -> GgufAdapterReport {
    let gguf = gguf_report(path, view);
    let type_of = |name: String| {
        view.tensors
            .iter()
            .find(|(_, t)| t.name == name)
            .map_or_else(|| "-".to_string(), |(_, t)| t.ty.name().to_string())
    };
    let tensors: Vec<LoraRow> = adapter
        .tensors
        .iter()
        .map(|t| LoraRow {
            target: t.target.clone(),
            layer: t.layer,
            kind: t.kind.name().to_string(),
            rank: t.rank(),
            alpha: t.alpha(),
            scale: t.scale(),
            lora_a: ne_a(t),
            lora_b: ne_b(t),
            lora_a_type: type_of(format!("{}{}", t.target, gguf_adapter::SUFFIX_A)),
            lora_b_type: type_of(format!("{}{}", t.target, gguf_adapter::SUFFIX_B)),
        })
        .collect();
    let mut ranks: Vec<usize> = tensors.iter().map(|t| t.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let n_layer = view
        .metadata
        .get_str(gguf_adapter::KEY_ARCH)
        .and_then(|a| view.metadata.get(&format!("{a}.block_count")))
        .and_then(|v| v.as_uint())
        .and_then(|n| u32::try_from(n).ok());
    GgufAdapterReport {
        adapter: LoraView {
            alpha: adapter.provenance.lora_alpha,
            architecture: adapter.arch.clone(),
            pairs: tensors.len(),
            ranks,
            alora_invocation_tokens: adapter.alora_invocation_tokens.clone(),
            layers: coverage_of(
                adapter
                    .tensors
                    .iter()
                    .filter_map(|t| Some((t.layer?, t.target.as_str()))),
                n_layer,
            ),
            full_tensors: adapter
                .full_tensors
                .iter()
                .map(|f| f.source.clone())
                .collect(),
            tensors,
        },
        gguf,
    }
}
