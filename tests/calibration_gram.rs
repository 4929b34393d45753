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

/// Our recorded inputs of `fixture` with its standard adapter against the reference Grams in
/// `testdata/calibration/<refs>`: every reference has a record of the same tokens and every adapted
/// tensor (every expert of a stacked one that a token reached) a reference.
fn grams_equal_pytorch_hooks(fixture: &str, refs: &str) {
    let refs = root().join("testdata/calibration").join(refs);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(refs.join("manifest.json")).unwrap()).unwrap();
    let tokens: Vec<u32> = manifest["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let grams = manifest["grams"].as_object().unwrap();
    let dir = root().join("testdata/fixtures").join(fixture);
    let model = GgufModel::open(dir.join("base-f32.gguf")).unwrap();
    let (input, adapter) = open_adapter(
        &dir.join("adapters/standard"),
        &model,
        "standard".into(),
        1.0,
    )
    .unwrap();
    let targets: HashSet<String> = input.updates.iter().map(|(n, _)| n.clone()).collect();
    // An expert's reference is named `<stacked tensor>#<expert>`.
    let referenced: HashSet<String> = grams
        .keys()
        .map(|k| k.split('#').next().unwrap().to_string())
        .collect();
    assert_eq!(referenced, targets, "every adapted tensor has a reference");
    let recorded = record_inputs::<f32>(&model, &[(&adapter, 1.0)], &tokens, &targets, 64).unwrap();
    let mut compared = HashSet::new();
    for r in &recorded {
        let n = r.n_in;
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
            let routed = entry["tokens"].as_u64().unwrap() as usize;
            assert_eq!(r.rows.len(), routed * n, "{name}: tokens recorded");
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
    let want: HashSet<String> = grams.keys().cloned().collect();
    assert_eq!(compared, want, "every reference compared");
}

#[test]
fn input_grams_equal_pytorch_hooks_on_the_hf_model_with_peft() {
    grams_equal_pytorch_hooks("llama", "llama-standard");
}

/// The same on an MoE base: each expert's input is the rows of the tokens the router sends it, so
/// this checks the routing of the calibration pass as well as what each expert sees.
#[test]
fn each_expert_s_input_grams_equal_pytorch_hooks_on_the_routed_tokens() {
    grams_equal_pytorch_hooks("qwen3moe", "qwen3moe-standard");
}
