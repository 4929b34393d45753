//! Adapters turned into what the merge applies ([`AdapterInput`]): per base tensor, `A`/`B` in the
//! base tensor's own row layout and the adapter's effective scale.
//!
//! GGUF LoRA files are read here against llama.cpp's loader rules (`src/llama-adapter.cpp`):
//! `general.type = adapter`, `adapter.type = lora`, pairs `NAME.lora_a` (ne `[n_in, rank]`) and
//! `NAME.lora_b` (ne `[rank, n_out]`), `*_norm.weight` tensors ignored, scale
//! `alpha / rank` with `rank = lora_b.ne[0]` (the user scale alone when alpha is 0 or absent), and
//! `token_embd` stored the other way round (`lora_a` ne `[rank, n_vocab]`, `lora_b` ne
//! `[rank, n_embd]`: the update of token `t`'s row is `B · A[t]`).

use std::path::Path;

use crate::gguf::GgufModel;
use crate::quant::{self, GgmlType};

use super::{AdapterInput, LowRank, MergeError, Update};

fn bad(path: &Path, what: String) -> MergeError {
    MergeError::Adapter(format!("{}: {what}", path.display()))
}

/// Reads a GGUF LoRA adapter file.
pub fn read_gguf_lora(
    path: &Path,
    name: String,
    user_scale: f32,
) -> Result<AdapterInput, MergeError> {
    let model = GgufModel::open(path)?;
    let m = model.metadata();
    match m.get_str("general.type") {
        Some("adapter") => {}
        other => {
            return Err(bad(
                path,
                format!(
                    "general.type is {other:?}, expected \"adapter\" (is this a LoRA adapter?)"
                ),
            ));
        }
    }
    match m.get_str("adapter.type") {
        Some("lora") => {}
        other => {
            return Err(bad(
                path,
                format!("adapter.type is {other:?}, expected \"lora\""),
            ))
        }
    }
    let alpha = m.get_f32("adapter.lora.alpha").unwrap_or(0.0);
    let architecture = m.get_str("general.architecture").map(str::to_string);
    let mut updates = Vec::new();
    for (_, t) in model.tensors() {
        let Some(target) = t.name.strip_suffix(".lora_a") else {
            if t.name.ends_with(".lora_b") || t.name.ends_with("_norm.weight") {
                continue;
            }
            return Err(bad(
                path,
                format!(
                    "tensor '{}' has an unexpected suffix (expected .lora_a or .lora_b)",
                    t.name
                ),
            ));
        };
        let b_name = format!("{target}.lora_b");
        let b_info = model
            .tensor(&b_name)
            .ok_or_else(|| bad(path, format!("'{}' has no matching '{b_name}'", t.name)))?;
        if t.dims.len() != 2 || b_info.dims.len() != 2 {
            return Err(bad(
                path,
                format!(
                    "'{target}': lora_a/lora_b must be 2-D, got {:?} and {:?}",
                    t.dims, b_info.dims
                ),
            ));
        }
        let rank = b_info.dims[0] as usize;
        let embedding = target.starts_with("token_embd");
        // Shapes, in ggml order: linear a [n_in, r], b [r, n_out]; token_embd a [r, n_vocab], b [r, n_embd].
        let consistent = if embedding {
            t.dims[0] as usize == rank
        } else {
            t.dims[1] as usize == rank
        };
        if rank == 0 || !consistent {
            return Err(bad(
                path,
                format!(
                    "'{target}': lora_a {:?} and lora_b {:?} do not share a rank",
                    t.dims, b_info.dims
                ),
            ));
        }
        let a = to_f32(path, &model, &t.name, t.ty, t.n_elements(), t.dims[0])?;
        let b = to_f32(
            path,
            &model,
            &b_name,
            b_info.ty,
            b_info.n_elements(),
            b_info.dims[0],
        )?;
        let (a, b) = if embedding {
            // Base rows are tokens: B' = lora_a as stored (n_vocab × r), A' = lora_bᵀ (r × n_embd).
            let n_embd = b_info.dims[1] as usize;
            (transpose(&b, n_embd, rank), a)
        } else {
            (a, b)
        };
        let scale = if alpha != 0.0 {
            alpha / rank as f32
        } else {
            1.0
        };
        updates.push((
            target.to_string(),
            Update::LowRank(LowRank {
                a,
                b,
                rank,
                scale,
                magnitude: None,
            }),
        ));
    }
    if updates.is_empty() {
        return Err(bad(
            path,
            "no LoRA tensors (NAME.lora_a / NAME.lora_b)".into(),
        ));
    }
    Ok(AdapterInput {
        name,
        architecture,
        scale: user_scale,
        updates,
    })
}

fn to_f32(
    path: &Path,
    model: &GgufModel,
    name: &str,
    ty: GgmlType,
    n: u64,
    row: u64,
) -> Result<Vec<f32>, MergeError> {
    let data = model
        .tensor_data(name)
        .ok_or_else(|| bad(path, format!("tensor '{name}' has no data")))?;
    // The element count is bounded by the mapped bytes the reader checked.
    let mut out = vec![0f32; n as usize];
    quant::dequantize_rows(ty, data, row as usize, &mut out)
        .map_err(|e| bad(path, format!("tensor '{name}': {e}")))?;
    Ok(out)
}

/// `m` is `rows × cols` row-major; returns `cols × rows`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}
