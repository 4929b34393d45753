//! `quantize`: a whole model to one type, as `llama-quantize --pure` does, bit for bit.
//!
//! A quantize is a merge without adapters: this module only decides each tensor's output type (and
//! importance weights) and hands the plan to the merge engine ([`crate::engine::prepare_recode`]),
//! which streams the tensors, recodes those that change type row block by row block in parallel, and
//! writes through the same atomic, split-aware writer ([`crate::engine::file::write_streamed`]).
//!
//! Which tensors change, following llama.cpp `src/llama-quant.cpp`:
//! - a tensor llama-quantize never quantizes keeps its type and bytes ([`allows_quantization`]:
//!   fewer than 2 dims, names not ending in `weight`, norms, MoE gates, position embeddings, ...);
//! - every other tensor goes to the target type, through llama-quantize's fallback when its rows do
//!   not fit the target's block ([`crate::engine::types::fit_type`]); a tensor already of the type it
//!   would get is copied byte for byte (llama-quantize does not requantize it either);
//! - we take one target type and apply no per-tensor mix: what `llama-quantize --pure` does (the
//!   `_S`/`_M`/`_L` mixes pick other types for some layers; they are not offered here), except that
//!   `--token-embedding-type` and `--output-tensor-type` give those two tensors their own, as they do
//!   in llama-quantize with `--pure` too ([`QuantizeOptions::target_for`]);
//! - `--type f32` dequantizes every tensor that is not F32, whatever its shape or name.
//!
//! Unlike llama-quantize, quantized inputs are requantized without asking (`--allow-requantize`).
//! The metadata is kept, with `general.file_type` set to the type's `llama_ftype`,
//! `general.quantization_version` = 2 and, with an imatrix, the `quantize.imatrix.*` keys
//! llama-quantize writes.

pub mod imatrix;

use std::path::Path;

use serde::Serialize;

use crate::engine::file::{base_tensors, check_output, write_streamed, Output, Written};
use crate::engine::types::{fit_type, ftype_for};
use crate::engine::{prepare_recode, EngineError, Importance, InputTensor, Recode, Requant};
use crate::gguf::{GgufModel, Value, KEY_FILE_TYPE, KEY_QUANT_VERSION, KEY_TYPE};
use crate::quant::GgmlType;

pub use imatrix::Imatrix;

pub const KEY_IMATRIX_FILE: &str = "quantize.imatrix.file";
pub const KEY_IMATRIX_DATASET: &str = "quantize.imatrix.dataset";
pub const KEY_IMATRIX_ENTRIES: &str = "quantize.imatrix.entries_count";
pub const KEY_IMATRIX_CHUNKS: &str = "quantize.imatrix.chunks_count";

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// Bad input: one line per problem, each naming the file or tensor.
    #[error("cannot quantize {file}:\n  {}", .problems.join("\n  "))]
    Input { file: String, problems: Vec<String> },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// `ggml_n_dims`: dimensions up to the last one larger than 1 (at least 1).
pub fn ggml_n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// Whether llama-quantize would quantize this tensor at all (`tensor_allows_quantization` in
/// `llama-quant.cpp`, default parameters; the GLM5-next-specific exclusions are not carried over).
/// `Err` says why not.
pub fn allows_quantization(name: &str, dims: &[u64]) -> Result<(), &'static str> {
    if ggml_n_dims(dims) < 2 {
        return Err("fewer than 2 dimensions");
    }
    if !name.ends_with("weight") {
        return Err("not a weight");
    }
    const NEVER: &[(&str, &str)] = &[
        ("_norm.weight", "norm"),
        ("ffn_gate_inp.weight", "expert gate"),
        ("ffn_gate_tid2eid.weight", "expert routing table"),
        ("altup", "altup"),
        ("laurel", "laurel"),
        ("per_layer_model_proj", "per-layer projection"),
        ("ssm_conv1d", "conv1d"),
        ("shortconv.conv.weight", "conv1d"),
        ("indexer.k_proj.weight", "indexer projection"),
        ("indexer.q_proj.weight", "indexer projection"),
        ("time_mix_first.weight", "RWKV"),
        ("time_mix_w0.weight", "RWKV"),
        ("time_mix_w1.weight", "RWKV"),
        ("time_mix_w2.weight", "RWKV"),
        ("time_mix_v0.weight", "RWKV"),
        ("time_mix_v1.weight", "RWKV"),
        ("time_mix_v2.weight", "RWKV"),
        ("time_mix_a0.weight", "RWKV"),
        ("time_mix_a1.weight", "RWKV"),
        ("time_mix_a2.weight", "RWKV"),
        ("time_mix_g1.weight", "RWKV"),
        ("time_mix_g2.weight", "RWKV"),
        ("time_mix_decay_w1.weight", "RWKV"),
        ("time_mix_decay_w2.weight", "RWKV"),
        ("time_mix_lerp_fused.weight", "RWKV"),
        ("attn_rel_b.weight", "relative position bias"),
        (".position_embd", "multimodal position embedding"),
        ("sam.pos_embd", "multimodal"),
        ("sam.neck.", "multimodal"),
        ("sam.net_", "multimodal"),
        (".rel_pos", "multimodal"),
        (".patch_embd", "multimodal"),
        (".patch_merger", "multimodal"),
        ("a.rvq.codebook", "audio codebook"),
        ("mm.a.code_embd", "audio codebook"),
    ];
    if let Some((_, why)) = NEVER.iter().find(|(pat, _)| name.contains(pat)) {
        return Err(why);
    }
    if name == "position_embd.weight" || name == "token_types.weight" {
        return Err("position embedding");
    }
    Ok(())
}

fn is_token_embd(name: &str) -> bool {
    name == "token_embd.weight" || name == "per_layer_token_embd.weight"
}

/// What happens to one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Quantized to the target type.
    Quantized,
    /// Its rows do not fit the target's block: written in llama-quantize's fallback type.
    Fallback,
    /// Already of the type it would get: bytes copied.
    Copied,
    /// llama-quantize leaves it alone (see `reason`): bytes copied.
    Kept,
}

/// The output type of one tensor for `target`, whether it is a fallback, and why it is kept if so.
pub fn choose_type(
    t: &InputTensor<'_>,
    target: GgmlType,
) -> (GgmlType, Action, Option<&'static str>) {
    if target == GgmlType::F32 {
        return if t.ty == GgmlType::F32 {
            (t.ty, Action::Copied, None)
        } else if crate::quant::can_dequantize(t.ty) {
            (GgmlType::F32, Action::Quantized, None)
        } else {
            (t.ty, Action::Kept, Some("not a float or quantized type"))
        };
    }
    if let Err(why) = allows_quantization(&t.name, &t.dims) {
        return (t.ty, Action::Kept, Some(why));
    }
    let (ty, fallback) = if target.traits().is_quantized {
        fit_type(target, t.dims.first().copied().unwrap_or(0))
    } else {
        (target, false)
    };
    let action = match (ty == t.ty, fallback) {
        (true, _) => Action::Copied,
        (false, true) => Action::Fallback,
        (false, false) => Action::Quantized,
    };
    (ty, action, None)
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_in: String,
    pub type_out: String,
    pub action: Action,
    /// Why a kept tensor is not quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Importance weights were applied.
    pub imatrix: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// RMS(written − input values) over the tensor; null when the bytes were copied.
    pub rms_error: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub target: String,
    pub file_type: Option<u32>,
    pub tensors: usize,
    pub quantized: usize,
    pub fallback: usize,
    pub copied: usize,
    pub kept: usize,
    /// Recoded tensors that had importance weights.
    pub imatrix_applied: usize,
    /// Recoded tensors the imatrix had no entry for (quantized without weights).
    pub imatrix_missing: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub size_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    pub outputs: Vec<String>,
    pub summary: Summary,
    pub tensors: Vec<TensorReport>,
}

/// What `quantize` is asked to do.
pub struct QuantizeOptions<'i> {
    pub target: GgmlType,
    /// The importance matrix and the path it was read from (recorded in the metadata).
    pub imatrix: Option<(&'i Imatrix, &'i Path)>,
    /// llama-quantize's `--token-embedding-type`: the type of `token_embd.weight` and
    /// `per_layer_token_embd.weight` instead of the target (it applies with `--pure` too).
    pub token_embedding_type: Option<GgmlType>,
    /// llama-quantize's `--output-tensor-type`: the type of `output.weight`.
    pub output_tensor_type: Option<GgmlType>,
}

impl QuantizeOptions<'_> {
    /// The type `t` is asked for: an override for the token embeddings or the output head
    /// (`llama_tensor_get_type`), else the target. Fallbacks for the row length come after.
    fn target_for(&self, t: &InputTensor<'_>) -> GgmlType {
        let own = if is_token_embd(&t.name) {
            self.token_embedding_type
        } else if t.name == "output.weight" {
            self.output_tensor_type
        } else {
            None
        };
        own.unwrap_or(self.target)
    }
}

/// Truncates like llama-quantize's 128-byte override strings (at a char boundary).
fn truncate_127(s: &str) -> String {
    let mut end = s.len().min(127);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Quantizes `model` to `opts.target` and writes it to `output`. Checks everything (types,
/// importance-matrix lengths) before the first byte is written.
pub fn quantize_model(
    model: &GgufModel,
    opts: &QuantizeOptions<'_>,
    output: &Output<'_>,
    on_done: &(dyn Fn(usize, u64) + Sync),
) -> Result<QuantizeReport, QuantizeError> {
    let file = model.shards()[0].path().display().to_string();
    let meta0 = model.metadata();
    if let Some(t) = meta0.get_str(KEY_TYPE).filter(|t| *t != "model") {
        return Err(QuantizeError::Input {
            file,
            problems: vec![format!("general.type is \"{t}\", expected a model")],
        });
    }
    check_output(model, output)?;
    let base = base_tensors(model);
    let mut problems = Vec::new();
    let mut recode = Vec::with_capacity(base.len());
    let mut rows = Vec::with_capacity(base.len());
    let mut missing = Vec::new();
    for t in &base {
        let (ty_out, action, reason) = choose_type(t, opts.target_for(t));
        let mut importance = None;
        let recoded = matches!(action, Action::Quantized | Action::Fallback);
        if let (true, Some((im, im_path))) = (recoded, opts.imatrix) {
            match im.entries.get(&t.name) {
                None => missing.push(t.name.clone()),
                Some(w) => {
                    let n_cols = t.dims.first().copied().unwrap_or(0) as usize;
                    let n_experts = t.dims.get(2).copied().unwrap_or(1) as usize;
                    let rows_per_expert = t.dims.get(1).copied().unwrap_or(1) as usize;
                    if Some(w.len()) == n_cols.checked_mul(n_experts) {
                        importance = Some(Importance {
                            weights: w.as_slice(),
                            rows_per_expert,
                        });
                    } else if !is_token_embd(&t.name) {
                        // llama-quantize aborts here too (except for token_embd, which it quantizes
                        // without weights).
                        problems.push(format!(
                            "tensor '{}': the imatrix {} has {} weights for it, expected {n_cols} columns × {n_experts} experts = {}",
                            t.name,
                            im_path.display(),
                            w.len(),
                            n_cols * n_experts
                        ));
                    }
                }
            }
        }
        rows.push((action, reason, importance.is_some()));
        recode.push(Recode {
            ty_out,
            fallback: action == Action::Fallback,
            requant: Requant::Nearest { importance },
        });
    }
    if !problems.is_empty() {
        return Err(QuantizeError::Input { file, problems });
    }
    let prepared = prepare_recode(&base, recode).map_err(|e| match e {
        EngineError::Plan(problems) => QuantizeError::Input {
            file: file.clone(),
            problems: problems.iter().map(ToString::to_string).collect(),
        },
        e => e.into(),
    })?;
    let out_types = prepared.output_types();

    let mut metadata = meta0.clone();
    let file_type = ftype_for(opts.target);
    if let Some(ft) = file_type {
        metadata.set(KEY_FILE_TYPE, Value::U32(ft));
    }
    metadata.set(KEY_QUANT_VERSION, Value::U32(2));
    if let Some((im, path)) = opts.imatrix {
        metadata.set(
            KEY_IMATRIX_FILE,
            Value::String(truncate_127(&path.display().to_string())),
        );
        if let Some(d) = im.datasets.first() {
            metadata.set(KEY_IMATRIX_DATASET, Value::String(truncate_127(d)));
        }
        metadata.set(KEY_IMATRIX_ENTRIES, Value::U32(im.entries.len() as u32));
        if im.chunk_count > 0 {
            metadata.set(KEY_IMATRIX_CHUNKS, Value::U32(im.chunk_count));
        }
    }

    let (merge_report, written): (_, Written) =
        write_streamed(model, &out_types, metadata, output, |sink| {
            prepared.run(sink, on_done)
        })?;

    // The engine's report lists the recoded tensors, in file order, with their measured error.
    let mut measured = merge_report.tensors.into_iter().peekable();
    let mut tensors = Vec::with_capacity(base.len());
    for ((t, &ty_out), &(action, reason, imatrix)) in base.iter().zip(&out_types).zip(&rows) {
        let m = measured.next_if(|m| m.name == t.name);
        tensors.push(TensorReport {
            name: t.name.clone(),
            dims: t.dims.clone(),
            type_in: t.ty.name().into(),
            type_out: ty_out.name().into(),
            action,
            reason,
            imatrix,
            bytes_in: t.data.len() as u64,
            bytes_out: m.as_ref().map_or(t.data.len() as u64, |m| m.bytes_out),
            rms_error: m.map(|m| m.rms_error),
        });
    }
    let count = |a: Action| tensors.iter().filter(|t| t.action == a).count();
    let bytes_in = merge_report.summary.bytes_in;
    let bytes_out = merge_report.summary.bytes_out;
    let summary = Summary {
        target: opts.target.name().into(),
        file_type,
        tensors: tensors.len(),
        quantized: count(Action::Quantized),
        fallback: count(Action::Fallback),
        copied: count(Action::Copied),
        kept: count(Action::Kept),
        imatrix_applied: tensors.iter().filter(|t| t.imatrix).count(),
        imatrix_missing: missing,
        bytes_in,
        bytes_out,
        size_ratio: bytes_out as f64 / bytes_in.max(1) as f64,
    };
    Ok(QuantizeReport {
        outputs: written.iter().map(|p| p.display().to_string()).collect(),
        summary,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-D expert tensor: each expert's rows get that expert's slice of the importance matrix,
    /// as llama-quantize's `imatrix + (row / nrows_per_expert) * n_per_row`.
    #[test]
    fn experts_get_their_own_importance_weights() {
        let (n, rows_per_expert, experts) = (256usize, 3usize, 2usize);
        let values: Vec<f32> = (0..n * rows_per_expert * experts)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let weights: Vec<f32> = (0..n * experts)
            .map(|i| {
                if i < n {
                    1.0 + (i % 5) as f32
                } else {
                    0.01 + (i % 3) as f32
                }
            })
            .collect();
        let base = vec![InputTensor {
            name: "blk.0.ffn_down_exps.weight".into(),
            dims: vec![n as u64, rows_per_expert as u64, experts as u64],
            ty: GgmlType::F32,
            data: &bytes,
            map: None,
        }];
        let ty = GgmlType::Q4_K;
        let recode = vec![Recode {
            ty_out: ty,
            fallback: false,
            requant: Requant::Nearest {
                importance: Some(Importance {
                    weights: &weights,
                    rows_per_expert,
                }),
            },
        }];
        let mut got = Vec::new();
        prepare_recode(&base, recode)
            .unwrap()
            .run(
                |_, b| {
                    got.extend_from_slice(b);
                    Ok(())
                },
                &|_, _| {},
            )
            .unwrap();
        let row_bytes = ty.row_bytes(n as u64).unwrap() as usize;
        let mut want = vec![0u8; row_bytes * rows_per_expert * experts];
        for (r, (src, dst)) in values.chunks(n).zip(want.chunks_mut(row_bytes)).enumerate() {
            let e = r / rows_per_expert;
            crate::quant::quantize_row(ty, src, dst, Some(&weights[e * n..(e + 1) * n])).unwrap();
        }
        assert_eq!(got, want);
        // The second expert's weights matter: with the first expert's, its rows come out different.
        let mut first_only = vec![0u8; row_bytes];
        crate::quant::quantize_row(
            ty,
            &values[3 * n..4 * n],
            &mut first_only,
            Some(&weights[..n]),
        )
        .unwrap();
        assert_ne!(&got[3 * row_bytes..4 * row_bytes], &first_only[..]);
    }

    #[test]
    fn n_dims_ignores_trailing_ones() {
        assert_eq!(ggml_n_dims(&[64]), 1);
        assert_eq!(ggml_n_dims(&[64, 1]), 1);
        assert_eq!(ggml_n_dims(&[64, 2, 1]), 2);
        assert_eq!(ggml_n_dims(&[1, 1]), 1);
    }

    #[test]
    fn llama_quantize_exclusions() {
        assert!(allows_quantization("blk.0.attn_q.weight", &[64, 64]).is_ok());
        assert!(allows_quantization("output.weight", &[64, 256]).is_ok());
        assert!(allows_quantization("blk.0.attn_norm.weight", &[64]).is_err());
        assert!(allows_quantization("blk.0.attn_q_norm.weight", &[64, 4]).is_err());
        assert!(allows_quantization("blk.0.ffn_gate_inp.weight", &[64, 8]).is_err());
        assert!(allows_quantization("blk.0.attn_q.bias", &[64, 64]).is_err());
        assert!(allows_quantization("position_embd.weight", &[64, 64]).is_err());
        assert!(allows_quantization("blk.0.attn_v.weight", &[64, 1]).is_err());
    }
}
