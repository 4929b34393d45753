//! Adapters turned into what the engine applies ([`AdapterInput`]): per base tensor, an update in
//! the base tensor's own row layout ([`crate::adapter::LowRank`]) with the adapter's effective
//! scale, from the crate's one normalized adapter model ([`crate::adapter::open`]: GGUF LoRA files,
//! bundle members, PEFT directories mapped onto the base).
//!
//! Updates are lazy: their shapes are known up front (the plan checks them all before anything is
//! written) and their values are read from the adapter's file when their tensor is processed, so a
//! large adapter is never held in memory whole.
//!
//! What a GGUF LoRA cannot hold, merge applies exactly: DoRA magnitudes (per output row, RoPE-permuted
//! like `B` for llama-family q/k), `lora_B` biases (added, scaled, to the base's `.bias` tensor) and
//! full replacement tensors (`modules_to_save`).

use std::path::Path;

use crate::adapter::{self, Adapter, AdapterError, Factor, FactorError, IssueKind, LoraTensor};
use crate::arch::{BaseInfo, TargetKind};
use crate::engine::{LowRankShape, Update, Values};
use crate::gguf::GgufModel;

use super::{AdapterInput, MergeError};

/// Reads the adapter `spec` (GGUF LoRA, `BUNDLE.gguf#NAME`, PEFT directory or `.safetensors`)
/// against `base`.
pub fn read_adapter(
    spec: &Path,
    base: &GgufModel,
    name: String,
    user_scale: f32,
) -> Result<AdapterInput, MergeError> {
    Ok(open_adapter(spec, base, name, user_scale)?.0)
}

/// [`read_adapter`], also returning the normalized adapter itself (what a calibration pass applies
/// at runtime).
pub fn open_adapter(
    spec: &Path,
    base: &GgufModel,
    name: String,
    user_scale: f32,
) -> Result<(AdapterInput, Adapter), MergeError> {
    let info = BaseInfo::from_model(base).map_err(|error| MergeError::Base {
        path: base.shards()[0].path().to_path_buf(),
        error,
    })?;
    // GGUF adapters are read as they are: the plan checks architecture, names and shapes for every
    // adapter at once. PEFT adapters are mapped onto this base's names on the way in.
    let opened = adapter::open(spec, Some(&info))?;
    // Shape and presence problems are found (all at once, with the other adapters') by the plan;
    // only problems the plan cannot see stop here.
    let blocking: Vec<String> = opened
        .issues
        .iter()
        .filter(|i| {
            !matches!(
                i.status,
                IssueKind::MissingInBase | IssueKind::ShapeMismatch
            )
        })
        .map(|i| format!("{}: {}", i.source, i.message))
        .collect();
    if !blocking.is_empty() {
        return Err(MergeError::Unmergeable {
            path: spec.to_path_buf(),
            lines: blocking,
        });
    }
    let input = from_adapter(&opened.adapter, name, user_scale)?;
    Ok((input, opened.adapter))
}

/// Values of the factor `f`, read when needed.
fn lazy_vector(f: &Factor) -> Values<Vec<f32>> {
    let f = f.clone();
    Values::Lazy(Box::new(move || Ok(f.load()?.data)))
}

/// Elements of a vector factor as [`LoraTensor::load_lora_bias`] and `load_magnitude` give them
/// (the rows of `B` a split target takes).
fn vector_len(t: &LoraTensor, f: &Factor) -> usize {
    match &t.layout {
        adapter::Layout::Single(p) if p.b_rows.is_some() => {
            p.b_rows.as_ref().map_or(0, |r| r.len())
        }
        _ => {
            let (r, c) = f.shape();
            r * c
        }
    }
}

/// The shape [`LoraTensor::low_rank`] will give, without reading the factors.
fn shape_of(t: &LoraTensor) -> LowRankShape {
    let (rank, n_expert, n_in, n_out) = (t.rank(), t.n_expert().max(1), t.n_in(), t.n_out());
    let (a_len, b_len) = match t.kind {
        TargetKind::Linear | TargetKind::Experts => {
            (n_expert * rank * n_in, n_expert * n_out * rank)
        }
        // Turned around into the base's layout: A = Bᵀ (rank × n_embd), B = Aᵀ (n_vocab × rank).
        TargetKind::Embedding => (rank * n_out, n_in * rank),
    };
    LowRankShape {
        rank,
        n_expert,
        a_len,
        b_len,
        magnitude_len: t.dora_magnitude.as_ref().map(|m| vector_len(t, m)),
    }
}

/// Converts a normalized adapter into merge updates, each read when its tensor is processed.
pub fn from_adapter(
    adapter: &Adapter,
    name: String,
    user_scale: f32,
) -> Result<AdapterInput, MergeError> {
    let mut updates = Vec::new();
    for t in &adapter.tensors {
        if t.kind == TargetKind::Embedding && t.dora_magnitude.is_some() {
            return Err(AdapterError::from(FactorError::DoraOnEmbedding {
                target: t.target.clone(),
            })
            .into());
        }
        let scale = t.scale() as f32;
        let lazy = t.clone();
        updates.push((
            t.target.clone(),
            Update::LowRank {
                shape: shape_of(t),
                scale,
                values: Values::Lazy(Box::new(move || lazy.low_rank())),
            },
        ));
        if let Some(bias) = &t.lora_bias {
            let target = t
                .target
                .strip_suffix(".weight")
                .map(|s| format!("{s}.bias"))
                .ok_or_else(|| MergeError::BiasTarget {
                    target: t.target.clone(),
                })?;
            let lazy = t.clone();
            updates.push((
                target,
                Update::Add {
                    len: vector_len(t, bias),
                    // The bias is scaled by the LoRA's own scale here, by the user's in the engine.
                    values: Values::Lazy(Box::new(move || {
                        let v = lazy.load_lora_bias()?.unwrap_or_default();
                        Ok(v.iter().map(|x| x * scale).collect())
                    })),
                },
            ));
        }
    }
    for f in &adapter.full_tensors {
        let target = f.target.clone().ok_or_else(|| MergeError::UnmappedFull {
            adapter: name.clone(),
            tensor: f.source.clone(),
        })?;
        let (r, c) = f.data.shape();
        updates.push((
            target,
            Update::Replace {
                len: r * c,
                values: lazy_vector(&f.data),
            },
        ));
    }
    if updates.is_empty() {
        return Err(MergeError::NoChange { adapter: name });
    }
    Ok(AdapterInput {
        name,
        architecture: adapter.arch.clone(),
        scale: user_scale,
        updates,
    })
}
