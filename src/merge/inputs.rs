//! Adapters turned into what the merge applies ([`AdapterInput`]): per base tensor, `A`/`B` in the
//! base tensor's own row layout and the adapter's effective scale, from the crate's one normalized
//! adapter model ([`crate::adapter::Adapter`], read from GGUF LoRA files or PEFT directories mapped
//! onto the base).
//!
//! What a GGUF LoRA cannot hold, merge applies exactly: DoRA magnitudes (per output row, RoPE-permuted
//! like `B` for llama-family q/k), `lora_B` biases (added, scaled, to the base's `.bias` tensor) and
//! full replacement tensors (`modules_to_save`).

use std::path::Path;

use crate::adapter::{permute_rows, Adapter, Matrix, TargetKind};
use crate::arch::BaseInfo;
use crate::gguf::GgufModel;

use super::{AdapterInput, LowRank, MergeError, Update};

fn adapter_err(e: impl std::fmt::Display) -> MergeError {
    MergeError::Adapter(e.to_string())
}

/// Reads the adapter at `path` (GGUF LoRA, PEFT directory or `.safetensors`) against `base`.
pub fn read_adapter(
    path: &Path,
    base: &GgufModel,
    name: String,
    user_scale: f32,
) -> Result<AdapterInput, MergeError> {
    let info = BaseInfo::from_model(base)
        .map_err(|m| MergeError::Adapter(format!("{}: {m}", base.shards()[0].path().display())))?;
    // GGUF adapters are read as they are: the plan checks architecture, names and shapes for every
    // adapter at once. PEFT adapters are mapped onto this base's names on the way in.
    let (adapter, issues) = if crate::adapter::peft::is_peft(path) {
        crate::adapter::peft::read(path, &info).map_err(adapter_err)?
    } else {
        (
            crate::adapter::gguf::read(path).map_err(adapter_err)?,
            Vec::new(),
        )
    };
    // Shape and presence problems are found (all at once, with the other adapters') by the plan;
    // only problems the plan cannot see stop here.
    let blocking: Vec<String> = issues
        .iter()
        .filter(|i| {
            !matches!(
                i.status,
                crate::adapter::IssueKind::MissingInBase | crate::adapter::IssueKind::ShapeMismatch
            )
        })
        .map(|i| format!("{}: {}", i.source, i.message))
        .collect();
    if !blocking.is_empty() {
        return Err(MergeError::Adapter(format!(
            "{}: cannot merge:\n  {}",
            path.display(),
            blocking.join("\n  ")
        )));
    }
    from_adapter(&adapter, name, user_scale)
}

/// Converts a normalized adapter into merge updates.
pub fn from_adapter(
    adapter: &Adapter,
    name: String,
    user_scale: f32,
) -> Result<AdapterInput, MergeError> {
    let mut updates = Vec::new();
    for t in &adapter.tensors {
        let l = t.load().map_err(adapter_err)?;
        let scale = l.scale() as f32;
        let magnitude = match &t.dora_magnitude {
            None => None,
            Some(f) => {
                let m = f.load().map_err(adapter_err)?;
                let m = match t.permute_heads {
                    Some(n_head) => {
                        let col = Matrix::new(m.data.len(), 1, m.data).ok_or_else(|| {
                            MergeError::Adapter(format!("{}: DoRA magnitude shape", t.target))
                        })?;
                        permute_rows(&col, n_head).ok_or_else(|| {
                            MergeError::Adapter(format!(
                                "{}: DoRA magnitude cannot be RoPE-permuted",
                                t.target
                            ))
                        })?
                    }
                    None => m,
                };
                Some(m.data)
            }
        };
        let update = match t.kind {
            TargetKind::Linear | TargetKind::Experts => LowRank {
                a: l.a.data,
                b: l.b.data,
                rank: l.rank,
                n_expert: l.n_expert.max(1),
                scale,
                magnitude,
            },
            TargetKind::Embedding => {
                // The adapter's B·A is n_embd × n_vocab; the base rows are tokens, so the update in
                // base layout is Aᵀ·Bᵀ: B' = Aᵀ (n_vocab × r), A' = Bᵀ (r × n_embd).
                if magnitude.is_some() {
                    return Err(MergeError::Adapter(format!(
                        "{}: DoRA on embeddings is not supported",
                        t.target
                    )));
                }
                LowRank {
                    a: l.b.transposed().data,
                    b: l.a.transposed().data,
                    rank: l.rank,
                    n_expert: 1,
                    scale,
                    magnitude: None,
                }
            }
        };
        updates.push((t.target.clone(), Update::LowRank(update)));
        if let Some(bias) = &t.lora_bias {
            let target = t
                .target
                .strip_suffix(".weight")
                .map(|s| format!("{s}.bias"))
                .ok_or_else(|| {
                    MergeError::Adapter(format!(
                        "{}: a LoRA bias needs a '.weight' target",
                        t.target
                    ))
                })?;
            let values = bias
                .load()
                .map_err(adapter_err)?
                .data
                .iter()
                .map(|v| v * scale)
                .collect();
            updates.push((target, Update::Add(values)));
        }
    }
    for f in &adapter.full_tensors {
        let target = f.target.clone().ok_or_else(|| {
            MergeError::Adapter(format!(
                "{}: full tensor '{}' maps to no base tensor",
                name, f.source
            ))
        })?;
        updates.push((
            target,
            Update::Replace(f.data.load().map_err(adapter_err)?.data),
        ));
    }
    if updates.is_empty() {
        return Err(MergeError::Adapter(format!(
            "{name}: the adapter changes no tensor"
        )));
    }
    Ok(AdapterInput {
        name,
        architecture: adapter.arch.clone(),
        scale: user_scale,
        updates,
    })
}
