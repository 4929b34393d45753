//! The merge on GGUF files: read the base (one file or a split set) through its memory maps, lay
//! out the output (same tensor order, each merged tensor's new type, metadata with a correct
//! `general.file_type` and the merge's provenance), and stream the engine's output into one atomic
//! writer per output shard. Nothing is renamed into place until every shard is complete.

use std::path::{Path, PathBuf};

use crate::gguf::split::{KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS};
use crate::gguf::{Array, GgufModel, GgufWriter, Metadata, TensorDesc, Value};
use crate::quant::GgmlType;

use super::types::{majority_type, output_ftype};
use super::{
    prepare, AdapterInput, BaseTensor, MergeError, MergeOptions, MergeReport, OutType, Promote,
};

pub const KEY_ARCH: &str = "general.architecture";
pub const KEY_FILE_TYPE: &str = "general.file_type";
pub const KEY_TYPE: &str = "general.type";
pub const KEY_QUANT_VERSION: &str = "general.quantization_version";
/// Provenance keys the merge adds.
pub const KEY_TOOL_VERSION: &str = "gguf_lora.version";
pub const KEY_ADAPTERS: &str = "gguf_lora.merge.adapters";
pub const KEY_SCALES: &str = "gguf_lora.merge.scales";
pub const KEY_OUTTYPE: &str = "gguf_lora.merge.outtype";
pub const KEY_PROMOTE: &str = "gguf_lora.merge.promote";

/// Bytes written at a time when copying an untouched tensor from the base's map.
const COPY_PIECE: usize = 8 << 20;

/// Where and how to write the merged model.
pub struct Output<'p> {
    /// `-o`: the file, or for a split output the name its shards are derived from.
    pub path: &'p Path,
    /// Write one file even when the base is a split set.
    pub no_split: bool,
    /// Other inputs (the adapter files) the output may not overwrite.
    pub other_inputs: &'p [&'p Path],
}

/// The files written, in shard order.
pub type Written = Vec<PathBuf>;

/// The base model's tensors as the engine reads them: zero-copy slices of the shards' maps.
pub fn base_tensors(model: &GgufModel) -> Vec<BaseTensor<'_>> {
    model
        .tensors()
        .map(|(shard, t)| BaseTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            data: model.shards()[shard].tensor_data(t),
        })
        .collect()
}

/// Output shard paths for a split set of `count` shards written to `out`: `out` itself when it
/// already names a shard (`X-00001-of-0000N.gguf`), otherwise `STEM-0000k-of-0000N.gguf` beside it.
pub fn shard_paths(out: &Path, count: usize) -> Vec<PathBuf> {
    let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("merged.gguf");
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    let suffix = format!("-00001-of-{count:05}");
    let prefix = stem.strip_suffix(&suffix).unwrap_or(stem);
    (1..=count)
        .map(|k| dir.join(format!("{prefix}-{k:05}-of-{count:05}.gguf")))
        .collect()
}

/// Merges `adapters` into `model` and writes the result. Returns the report and the files written.
pub fn merge_model(
    model: &GgufModel,
    adapters: &[AdapterInput],
    opts: &MergeOptions,
    output: &Output<'_>,
    on_done: &(dyn Fn(usize, u64) + Sync),
) -> Result<(MergeReport, Written), MergeError> {
    let meta0 = model.metadata();
    if let Some(t) = meta0.get_str(KEY_TYPE).filter(|t| *t != "model") {
        return Err(MergeError::Adapter(format!(
            "{}: general.type is \"{t}\", expected a model to merge into",
            model.shards()[0].path().display()
        )));
    }
    let base = base_tensors(model);
    let prepared = prepare(meta0.get_str(KEY_ARCH), &base, adapters, opts)?;
    let out_types = prepared.output_types();

    let mut metadata = merged_metadata(meta0, &base, &out_types, adapters, opts);
    let split = model.is_split() && !output.no_split;
    if !split {
        for key in [KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS] {
            metadata.remove(key);
        }
    }
    let shards = model.shards();
    let targets: Vec<PathBuf> = if split {
        shard_paths(output.path, shards.len())
    } else {
        vec![output.path.to_path_buf()]
    };
    let mut inputs: Vec<&Path> = shards.iter().map(|s| s.path()).collect();
    inputs.extend_from_slice(output.other_inputs);

    // Tensor index → output shard, and each shard's tensor descriptions with their new types.
    let mut shard_of = Vec::with_capacity(base.len());
    let mut descs: Vec<Vec<TensorDesc>> = vec![Vec::new(); targets.len()];
    for (i, (shard, t)) in model.tensors().enumerate() {
        let s = if split { shard } else { 0 };
        shard_of.push(s);
        descs[s].push(TensorDesc {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: out_types[i],
        });
    }
    let mut writers = Vec::with_capacity(targets.len());
    for (s, target) in targets.iter().enumerate() {
        let (source, meta) = if s == 0 {
            (&shards[0], &metadata)
        } else {
            // Later shards carry only their own `split.*` keys, which stay valid: same layout.
            (&shards[s], shards[s].metadata())
        };
        writers.push(GgufWriter::create(
            target,
            &inputs,
            source.version(),
            source.alignment(),
            meta,
            &descs[s],
        )?);
    }
    let infos: Vec<(usize, &crate::gguf::TensorInfo)> = model.tensors().collect();
    let report = {
        let writers = &mut writers;
        let shard_of = &shard_of;
        let infos = &infos;
        prepared.run(
            move |i, bytes| {
                let (shard, info) = infos[i];
                let file = &shards[shard];
                // Untouched tensors come straight from the map: write them in pieces and drop each
                // piece's pages once written, and the input pages of merged tensors once they are
                // done, so the base never accumulates in our resident set.
                writers[shard_of[i]].write_tensor_pieces(bytes.chunks(COPY_PIECE), |p| {
                    file.release_slice_pages(p)
                })?;
                file.release_pages(info);
                Ok(())
            },
            on_done,
        )?
    };
    for w in writers {
        w.finish()?;
    }
    Ok((report, targets))
}

/// The base's metadata with what a merged model must say: no adapter keys, `general.type` a model,
/// the right `general.file_type`, quantization version when quantized tensors appear, provenance.
fn merged_metadata(
    base_meta: &Metadata,
    base: &[BaseTensor<'_>],
    out_types: &[GgmlType],
    adapters: &[AdapterInput],
    opts: &MergeOptions,
) -> Metadata {
    let mut m = base_meta.clone();
    let adapter_keys: Vec<String> = m
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k.starts_with("adapter."))
        .collect();
    for k in adapter_keys {
        m.remove(&k);
    }
    if m.get_str(KEY_TYPE).is_some_and(|t| t != "model") {
        m.set(KEY_TYPE, Value::String("model".into()));
    }
    // The file type describes the model's body: llama-quantize gives the token embeddings and the
    // output head their own types (gemma3-270m Q4_K_M: a Q8_0 token_embd larger than all Q4_K
    // tensors together), so they do not vote.
    let body =
        |t: &BaseTensor<'_>| !(t.name.starts_with("token_embd.") || t.name.starts_with("output."));
    let elems = |t: &BaseTensor<'_>| t.dims.iter().product::<u64>();
    let base_major = majority_type(
        base.iter()
            .filter(|t| body(t))
            .map(|t| (elems(t), t.dims.len(), t.ty)),
    );
    let out_major = majority_type(
        base.iter()
            .zip(out_types)
            .filter(|(t, _)| body(t))
            .map(|(t, &ty)| (elems(t), t.dims.len(), ty)),
    );
    if let Some(ft) = output_ftype(m.get_u32(KEY_FILE_TYPE), base_major, out_major) {
        m.set(KEY_FILE_TYPE, Value::U32(ft));
    }
    if out_types.iter().any(|t| t.traits().is_quantized) && !m.contains_key(KEY_QUANT_VERSION) {
        m.set(KEY_QUANT_VERSION, Value::U32(2));
    }
    m.set(
        KEY_TOOL_VERSION,
        Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    m.set(
        KEY_ADAPTERS,
        Value::Array(Array::String(
            adapters.iter().map(|a| a.name.clone()).collect(),
        )),
    );
    m.set(
        KEY_SCALES,
        Value::Array(Array::F32(adapters.iter().map(|a| a.scale).collect())),
    );
    let outtype = match opts.outtype {
        OutType::Keep => "keep".to_string(),
        OutType::Type(t) => t.name().to_string(),
    };
    m.set(KEY_OUTTYPE, Value::String(outtype));
    let promote = match opts.promote {
        Promote::None => None,
        Promote::Type(t) => Some(t.name().to_string()),
        Promote::Map(pairs) => Some(
            pairs
                .iter()
                .map(|(a, b)| format!("{a}={b}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Promote::Auto { budget } => Some(format!("auto:{}", budget)),
    };
    if let Some(p) = promote {
        m.set(KEY_PROMOTE, Value::String(p));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_gguf_split() {
        let p = shard_paths(Path::new("/o/merged.gguf"), 3);
        assert_eq!(p[0], Path::new("/o/merged-00001-of-00003.gguf"));
        assert_eq!(p[2], Path::new("/o/merged-00003-of-00003.gguf"));
        let q = shard_paths(Path::new("m-00001-of-00002.gguf"), 2);
        assert_eq!(q[1], Path::new("m-00002-of-00002.gguf"));
    }
}
