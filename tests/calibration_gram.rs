//! The calibration pass against an independent reference: what enters each adapted tensor when the
//! base runs with the adapter applied at runtime (`calibrate::record_inputs`, the merge's
//! calibration, recorded exactly in f32 here), as input Gram matrices `XᵀX`, equals what PyTorch
//! forward hooks capture on the HF model with PEFT's adapter over the same tokens
//! (`testdata/calibration/`, made by `gram_reference.py`; provenance in its manifest).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use gguf_lora::calibrate::record_inputs;
use gguf_lora::gguf::GgufModel;
use gguf_lora::merge::inputs::open_adapter;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_f64(path: &Path) -> Vec<f64> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn input_grams_equal_pytorch_hooks_on_the_hf_model_with_peft() {
    let refs = root().join("testdata/calibration/llama-standard");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(refs.join("manifest.json")).unwrap()).unwrap();
    let tokens: Vec<u32> = manifest["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let grams = manifest["grams"].as_object().unwrap();
    let model = GgufModel::open(root().join("testdata/fixtures/llama/base-f32.gguf")).unwrap();
    let (input, adapter) = open_adapter(
        &root().join("testdata/fixtures/llama/adapters/standard"),
        &model,
        "standard".into(),
        1.0,
    )
    .unwrap();
    let targets: HashSet<String> = input.updates.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        targets.len(),
        grams.len(),
        "every adapted tensor has a reference"
    );
    let recorded = record_inputs::<f32>(&model, &[(&adapter, 1.0)], &tokens, &targets, 64).unwrap();
    let mut compared = HashSet::new();
    for r in &recorded {
        let n = r.n_in;
        assert_eq!(r.rows.len(), tokens.len() * n);
        let mut ours = vec![0f64; n * n];
        for x in r.rows.chunks_exact(n) {
            for i in 0..n {
                for j in 0..n {
                    ours[i * n + j] += x[i] as f64 * x[j] as f64;
                }
            }
        }
        for name in &r.tensors {
            let entry = &grams[name.as_str()];
            assert_eq!(entry["n_in"].as_u64().unwrap() as usize, n, "{name}");
            let theirs = read_f64(&refs.join(format!("{name}.f64")));
            assert_eq!(theirs.len(), n * n, "{name}");
            // f32 accuracy, relative to the Gram's scale (its largest diagonal entry).
            let scale = (0..n).map(|i| theirs[i * n + i]).fold(0f64, f64::max);
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= 1e-5 * scale,
                "{name}: worst |ours − PyTorch's| {worst:.3e} against scale {scale:.3e}"
            );
            compared.insert(name.clone());
        }
    }
    assert_eq!(compared, targets, "every adapted tensor compared");
}
