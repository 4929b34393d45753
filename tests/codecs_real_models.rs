//! Every tensor of the real gemma3-270m (Q4_K_M: Q8_0, Q5_0, Q4_K, Q6_K, F32) and SmolLM2-135M (Q4_1,
//! Q8_0, F32) models, dequantized by us at every SIMD level this CPU runs, equals libggml's
//! `to_float` bit for bit.
//!
//! `testdata/codecs/model_tensor_hashes.py` locates the tensors with gguf-py and hashes libggml's
//! dequantization per tensor. We locate them with our own reader ([`GgufFile`]), check its tensor
//! table against gguf-py's (names, types, shapes, absolute offsets, sizes), then decode the bytes it
//! hands out a block of rows at a time and hash ours.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use gguf_lora::gguf::GgufFile;
use gguf_lora::quant::simd::with_level;
use gguf_lora::quant::{self, GgmlType};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// Rows decoded per call: a few MiB of f32, never the whole tensor.
const BLOCK_ELEMENTS: usize = 1 << 20;

fn check_model(model: &Path, expected_types: &[GgmlType]) {
    let env = common::interop();
    let script = common::repo_root().join("testdata/codecs/model_tensor_hashes.py");
    let json = env.python(&script, &[model.to_str().unwrap()]);
    let tensors: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert!(!tensors.is_empty());

    let file = GgufFile::open(model).unwrap();
    assert_eq!(
        file.tensors().len(),
        tensors.len(),
        "{}: tensor count",
        model.display()
    );

    let mut seen = BTreeSet::new();
    let mut mismatched = Vec::new();
    let mut buf = Vec::new();
    for t in &tensors {
        let name = t["name"].as_str().unwrap();
        let ty = GgmlType::from_name(t["type"].as_str().unwrap()).unwrap();
        let ne: Vec<u64> = t["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name}: not in our reader's table"));
        assert_eq!((info.ty, &info.dims), (ty, &ne), "{name}: type and shape");
        assert_eq!(
            file.data_offset() + info.offset,
            t["offset"].as_u64().unwrap(),
            "{name}: absolute offset"
        );
        assert_eq!(
            info.n_bytes(),
            t["n_bytes"].as_u64().unwrap(),
            "{name}: size"
        );
        assert!(
            quant::can_dequantize(ty),
            "{name}: {ty} cannot be dequantized"
        );
        seen.insert(ty);

        let data = file.tensor_data(info);
        let n_per_row = info.row_len() as usize;
        let row_bytes = info.row_bytes() as usize;
        let rows_per_block = (BLOCK_ELEMENTS / n_per_row).max(1);
        for level in common::simd_levels() {
            let mut hasher = Sha256::new();
            for block in data.chunks(rows_per_block * row_bytes) {
                let n = block.len() / row_bytes * n_per_row;
                buf.resize(n, 0f32);
                // Row by row, each rayon task setting the level on its own thread.
                block
                    .par_chunks(row_bytes)
                    .zip(buf.par_chunks_mut(n_per_row))
                    .for_each(|(src, dst)| {
                        with_level(level, || quant::dequantize_row(ty, src, dst)).unwrap();
                    });
                hasher.update(bytemuck::cast_slice::<f32, u8>(&buf));
            }
            let ours: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if ours != t["sha256"].as_str().unwrap() {
                mismatched.push(format!("{name} ({ty}) at {level}"));
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "{}: tensors whose dequantization differs from libggml's: {mismatched:?}",
        model.display()
    );
    let expected: BTreeSet<GgmlType> = expected_types.iter().copied().collect();
    assert_eq!(seen, expected, "{}: tensor types", model.display());
}

#[test]
fn gemma3_every_tensor_dequantizes_like_libggml() {
    require_interop!();
    use GgmlType::*;
    check_model(&common::interop().gemma, &[F32, Q5_0, Q4_K, Q8_0, Q6_K]);
}

#[test]
fn smollm2_every_tensor_dequantizes_like_libggml() {
    require_interop!();
    use GgmlType::*;
    check_model(&common::interop().smollm, &[F32, Q4_1, Q8_0]);
}
