//! The GGUF part of `inspect`: version, alignment, metadata (long arrays cut to their first items),
//! architecture and key hyperparameters, the tensor table and totals per type and per layer.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value as Json;

use crate::adapter::source::GgufSource;
use crate::gguf::{layer_of, Array, GgufError, GgufModel, Metadata, Placement, TensorInfo, Value};

/// Array values longer than this are shown as their length and first items.
pub const ARRAY_PREVIEW: usize = 8;

/// Hyperparameters shown, as `{architecture}.SUFFIX` keys (llama.cpp's `LLM_KV_*` names).
const HYPERPARAMETERS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "attention.sliding_window",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "expert_count",
    "expert_used_count",
    "vocab_size",
];

#[derive(Debug, Serialize)]
pub struct GgufReport {
    /// The path given.
    pub path: String,
    /// GGUF version of (the first shard of) the file.
    pub version: u32,
    pub alignment: u64,
    /// Total size of all shards in bytes.
    pub file_size: u64,
    pub shards: Vec<ShardSummary>,
    /// `general.type` (`model`, `adapter`, ...), when present.
    pub general_type: Option<String>,
    /// `general.architecture`, when present.
    pub architecture: Option<String>,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// Key hyperparameters by short name (the key without the architecture prefix); `vocab_size`
    /// falls back to the length of `tokenizer.ggml.tokens`.
    pub hyperparameters: serde_json::Map<String, Json>,
    pub metadata: Vec<MetadataEntry>,
    pub tensors: Vec<TensorRow>,
    pub totals_by_type: Vec<TypeTotal>,
    pub totals_by_layer: Vec<LayerTotal>,
    pub total: Total,
    /// For a named bundle (`gguf-lora bundle --mode named`): its adapters and their coverage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<crate::bundle::BundleListing>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardSummary {
    pub path: String,
    pub file_size: u64,
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata_count: usize,
    pub tensor_count: usize,
}

#[derive(Debug, Serialize)]
pub struct MetadataEntry {
    pub key: String,
    /// `u32`, `string`, `array[string]`, ...
    #[serde(rename = "type")]
    pub ty: String,
    /// The value; for arrays at most [`ARRAY_PREVIEW`] first items.
    pub value: Json,
    /// Number of elements, for arrays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<usize>,
    /// Whether `value` holds only the first items of a longer array.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// ggml `ne` order: the row length first.
    pub shape: Vec<u64>,
    pub elements: u64,
    pub bytes: u64,
    /// `N` of `blk.N.`, if the tensor belongs to a layer.
    pub layer: Option<u32>,
    /// Index of the shard holding it (0 for single files).
    pub shard: usize,
    /// Offset within its shard's data section.
    pub offset: u64,
}

#[derive(Debug, Serialize)]
pub struct TypeTotal {
    #[serde(rename = "type")]
    pub ty: String,
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct LayerTotal {
    /// The layer, or `null` for tensors outside the `blk.N.` layers.
    pub layer: Option<u32>,
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Total {
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

/// What the report reads of a GGUF file: its shards, its metadata (a split set's as one) and its
/// tensors with the shard holding each.
pub struct GgufView<'a> {
    pub shards: Vec<ShardSummary>,
    pub metadata: &'a Metadata,
    pub tensors: Vec<(usize, TensorInfo)>,
}

impl<'a> GgufView<'a> {
    /// An opened file or split set.
    pub fn of_model(model: &'a GgufModel) -> GgufView<'a> {
        GgufView {
            shards: model
                .shards()
                .iter()
                .map(|s| ShardSummary {
                    path: s.path().display().to_string(),
                    file_size: s.file_size(),
                    version: s.version(),
                    alignment: s.alignment(),
                    data_offset: s.data_offset(),
                    metadata_count: s.metadata().len(),
                    tensor_count: s.tensors().len(),
                })
                .collect(),
            metadata: model.metadata(),
            tensors: model.tensors().map(|(s, t)| (s, t.clone())).collect(),
        }
    }

    /// A GGUF adapter as its own file has it, laid out as the writer would write it: for a bundle
    /// member (`BUNDLE.gguf#NAME`), the file `bundle --extract` gives back, without writing it.
    pub fn of_source(src: &'a GgufSource) -> Result<GgufView<'a>, GgufError> {
        let descs: Vec<_> = src.tensors.iter().map(|t| (&t.info).into()).collect();
        let place = Placement::plan(
            &src.label,
            src.version,
            src.alignment(),
            &src.metadata,
            &descs,
        )?;
        let tensors = src
            .tensors
            .iter()
            .zip(&place.offsets)
            .map(|(t, &offset)| {
                (
                    0,
                    TensorInfo {
                        offset,
                        ..t.info.clone()
                    },
                )
            })
            .collect();
        Ok(GgufView {
            shards: vec![ShardSummary {
                path: src.label.display().to_string(),
                file_size: place.file_size,
                version: src.version,
                alignment: src.alignment(),
                data_offset: place.data_offset,
                metadata_count: src.metadata.len(),
                tensor_count: src.tensors.len(),
            }],
            metadata: &src.metadata,
            tensors,
        })
    }
}

/// Builds the report of a file's view.
pub fn report(path: &Path, view: &GgufView<'_>) -> GgufReport {
    let first = &view.shards[0];
    let meta = view.metadata;
    let architecture = meta.get_str("general.architecture").map(str::to_string);

    let mut hyperparameters = serde_json::Map::new();
    if let Some(arch) = &architecture {
        for suffix in HYPERPARAMETERS {
            if let Some(v) = meta.get(&format!("{arch}.{suffix}")) {
                hyperparameters.insert(suffix.to_string(), value_json(v, ARRAY_PREVIEW).0);
            }
        }
    }
    if !hyperparameters.contains_key("vocab_size") {
        if let Some(tokens) = meta.get_array("tokenizer.ggml.tokens") {
            hyperparameters.insert("vocab_size".into(), tokens.len().into());
        }
    }
    for key in ["tokenizer.ggml.model", "adapter.type", "adapter.lora.alpha"] {
        if let Some(v) = meta.get(key) {
            hyperparameters.insert(key.into(), value_json(v, ARRAY_PREVIEW).0);
        }
    }

    let metadata = meta
        .iter()
        .map(|(key, v)| {
            let (value, truncated) = value_json(v, ARRAY_PREVIEW);
            MetadataEntry {
                key: key.to_string(),
                ty: v.type_name(),
                value,
                len: v.as_array().map(Array::len),
                truncated,
            }
        })
        .collect();

    let tensors: Vec<TensorRow> = view
        .tensors
        .iter()
        .map(|&(shard, ref t)| TensorRow {
            name: t.name.clone(),
            ty: t.ty.name().to_string(),
            shape: t.dims.clone(),
            elements: t.n_elements(),
            bytes: t.n_bytes(),
            layer: layer_of(&t.name),
            shard,
            offset: t.offset,
        })
        .collect();

    let mut by_type: BTreeMap<(u32, String), TypeTotal> = BTreeMap::new();
    let mut by_layer: BTreeMap<Option<u32>, LayerTotal> = BTreeMap::new();
    for (_, t) in &view.tensors {
        let e = by_type
            .entry((t.ty.id(), t.ty.name().to_string()))
            .or_insert_with(|| TypeTotal {
                ty: t.ty.name().to_string(),
                tensors: 0,
                elements: 0,
                bytes: 0,
            });
        e.tensors += 1;
        e.elements += t.n_elements();
        e.bytes += t.n_bytes();
        let layer = layer_of(&t.name);
        let e = by_layer.entry(layer).or_insert_with(|| LayerTotal {
            layer,
            tensors: 0,
            elements: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.elements += t.n_elements();
        e.bytes += t.n_bytes();
    }
    let total = Total {
        tensors: tensors.len(),
        elements: tensors.iter().map(|t| t.elements).sum(),
        bytes: tensors.iter().map(|t| t.bytes).sum(),
    };

    GgufReport {
        path: path.display().to_string(),
        version: first.version,
        alignment: first.alignment,
        file_size: view.shards.iter().map(|s| s.file_size).sum(),
        shards: view.shards.clone(),
        general_type: meta.get_str("general.type").map(str::to_string),
        architecture,
        name: meta.get_str("general.name").map(str::to_string),
        hyperparameters,
        metadata,
        tensors,
        // Totals per type in ggml id order; per layer in layer order, non-layer tensors first.
        totals_by_type: by_type.into_values().collect(),
        totals_by_layer: by_layer.into_values().collect(),
        total,
        // A bundle whose listing does not parse is still shown as a GGUF file.
        bundle: crate::bundle::listing(path, meta).and_then(Result::ok),
    }
}

/// A metadata value as JSON, arrays cut to their first `preview` items; also whether it was cut.
/// Non-finite floats become `null` (JSON has no NaN).
pub fn value_json(v: &Value, preview: usize) -> (Json, bool) {
    let json = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        // Through the shortest decimal of the f32, so 1e-6f32 shows as 1e-6, not 9.99999997e-7.
        Value::F32(x) => x.to_string().parse::<f64>().unwrap_or(f64::from(*x)).into(),
        Value::F64(x) => (*x).into(),
        Value::Bool(x) => (*x).into(),
        Value::String(s) => s.clone().into(),
        Value::Array(a) => {
            let n = a.len().min(preview);
            let items = (0..n)
                .filter_map(|i| a.get(i))
                .map(|item| value_json(&item, preview).0)
                .collect();
            return (Json::Array(items), a.len() > preview);
        }
    };
    (json, false)
}
