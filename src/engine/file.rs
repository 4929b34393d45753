//! The engine on GGUF files: the base (one file or a split set) read through its memory maps, and
//! the output laid out (same tensor order, each tensor's new type, the caller's metadata) and
//! written by one atomic writer per output shard. Nothing is renamed into place until every shard
//! is complete.

use std::path::{Path, PathBuf};

use crate::gguf::split::{KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS};
use crate::gguf::{GgufModel, GgufWriter, Metadata, TensorDesc};
use crate::quant::GgmlType;

use super::{EngineError, InputTensor};

/// Bytes written at a time when copying an untouched tensor from the base's map.
const COPY_PIECE: usize = 8 << 20;

/// Where and how to write the output model.
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
pub fn base_tensors(model: &GgufModel) -> Vec<InputTensor<'_>> {
    model
        .tensors()
        .map(|(shard, t)| InputTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            data: model.shards()[shard].tensor_data(t),
            map: Some(&model.shards()[shard]),
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

/// The sink a streaming run writes each tensor's bytes to, in file order: `(tensor index, bytes)`.
pub type Sink<'s> = dyn FnMut(usize, &[u8]) -> Result<(), EngineError> + Send + 's;

/// The files an output of `model` is written to: `output.path`, or one shard per input shard.
pub fn output_paths(model: &GgufModel, output: &Output<'_>) -> Written {
    if model.is_split() && !output.no_split {
        shard_paths(output.path, model.shards().len())
    } else {
        vec![output.path.to_path_buf()]
    }
}

/// Refuses, before any work, an output that could not be written: a target that is not a regular
/// file ([`crate::output::check_target`]) or that is one of the inputs.
pub fn check_output(model: &GgufModel, output: &Output<'_>) -> Result<(), EngineError> {
    let mut inputs: Vec<&Path> = model.shards().iter().map(|s| s.path()).collect();
    inputs.extend_from_slice(output.other_inputs);
    for target in output_paths(model, output) {
        crate::output::check_target(&target)?;
        crate::output::check_not_an_input(&target, &inputs)?;
    }
    Ok(())
}

/// Writes `model` with each tensor's new type (`out_types`, file order) and `metadata` (first shard;
/// later shards of a split output keep their own): lays out the output (one file, or one per input
/// shard unless `output.no_split`), opens one atomic writer per shard, and lets `run` push every
/// tensor's bytes in order through the sink it is given (each input tensor's pages are released once
/// written). Nothing is renamed into place unless `run` and every shard succeed.
pub fn write_streamed<R>(
    model: &GgufModel,
    out_types: &[GgmlType],
    mut metadata: Metadata,
    output: &Output<'_>,
    run: impl FnOnce(&mut Sink<'_>) -> Result<R, EngineError>,
) -> Result<(R, Written), EngineError> {
    let split = model.is_split() && !output.no_split;
    if !split {
        for key in [KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS] {
            metadata.remove(key);
        }
    }
    let shards = model.shards();
    let targets = output_paths(model, output);
    let mut inputs: Vec<&Path> = shards.iter().map(|s| s.path()).collect();
    inputs.extend_from_slice(output.other_inputs);

    // Tensor index → output shard, and each shard's tensor descriptions with their new types.
    let mut shard_of = Vec::with_capacity(out_types.len());
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
    let result = {
        let writers = &mut writers;
        let shard_of = &shard_of;
        let infos = &infos;
        let mut sink = move |i: usize, bytes: &[u8]| -> Result<(), EngineError> {
            let (shard, info) = infos[i];
            let file = &shards[shard];
            let writer = &mut writers[shard_of[i]];
            // An untouched tensor (its bytes are the base's own, in the map) is copied by the
            // kernel file to file, as `cp` copies: no page of it is faulted into this process.
            let base = file.tensor_data(info);
            let untouched =
                std::ptr::eq(bytes.as_ptr(), base.as_ptr()) && bytes.len() == base.len();
            if let Some((src, offset)) = file.tensor_source(info).filter(|_| untouched) {
                if writer.copy_tensor_from(src, offset, bytes.len() as u64)? {
                    return Ok(());
                }
            }
            // Otherwise write in pieces and drop each piece's pages once written, and the input
            // pages of recoded tensors once they are done, so the base never accumulates in our
            // resident set.
            writer
                .write_tensor_pieces(bytes.chunks(COPY_PIECE), |p| file.release_slice_pages(p))?;
            file.release_pages(info);
            Ok(())
        };
        run(&mut sink)?
    };
    for w in writers {
        w.finish()?;
    }
    Ok((result, targets))
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
