//! `gguf-lora inspect` through the binary: JSON is exactly one object with the facts of the file;
//! the human output is aligned tables; split sets show as one model.

mod common;

use common::{gguf_lora, inspect_json};
use serde_json::Value;

#[test]
fn json_of_gguf_py_fixture() {
    let j = inspect_json(&common::repo_root().join("testdata/gguf/all_types.gguf"));
    assert_eq!(j["kind"], "gguf");
    assert_eq!(j["version"], 3);
    assert_eq!(j["alignment"], 64);
    assert_eq!(j["architecture"], "llama");
    assert_eq!(j["hyperparameters"]["block_count"], 1);
    assert_eq!(j["hyperparameters"]["context_length"], 128);
    let meta = j["metadata"].as_array().unwrap();
    assert_eq!(meta.len(), 29);
    let entry = |k: &str| meta.iter().find(|m| m["key"] == k).unwrap().clone();
    assert_eq!(entry("test.u64")["value"], u64::MAX);
    assert_eq!(entry("test.i8")["type"], "i8");
    assert_eq!(
        entry("test.f32")["value"],
        0.1,
        "f32 shown by its shortest decimal"
    );
    assert_eq!(entry("test.arr_string")["type"], "array[string]");
    assert_eq!(entry("test.arr_string")["len"], 4);
    assert_eq!(
        entry("test.arr_string")["value"],
        serde_json::json!(["a", "", "ü", "<0x0A>"])
    );
    let tensors = j["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 6);
    assert_eq!(tensors[3]["name"], "blk.1.q4_k");
    assert_eq!(tensors[3]["type"], "q4_K");
    assert_eq!(tensors[3]["shape"], serde_json::json!([256, 2]));
    assert_eq!(tensors[3]["bytes"], 288);
    assert_eq!(tensors[3]["layer"], 1);
    assert_eq!(tensors[4]["layer"], Value::Null);
    assert_eq!(j["total"]["bytes"], 12 + 32 + 136 + 288 + 48 + 8);
    let by_layer = j["totals_by_layer"].as_array().unwrap();
    assert_eq!(by_layer.len(), 3);
    assert_eq!(by_layer[0]["layer"], Value::Null);
    assert_eq!(by_layer[1]["tensors"], 3);
    let by_type = j["totals_by_type"].as_array().unwrap();
    assert_eq!(
        by_type
            .iter()
            .map(|t| t["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["f32", "f16", "q8_0", "q4_K", "i32", "bf16"]
    );
}

#[test]
fn json_of_gemma3_cuts_long_arrays() {
    require_interop!();
    let j = inspect_json(&common::interop().gemma);
    assert_eq!(j["architecture"], "gemma3");
    let h = &j["hyperparameters"];
    assert_eq!(h["block_count"], 18);
    assert_eq!(h["embedding_length"], 640);
    assert_eq!(h["attention.head_count"], 4);
    assert_eq!(h["attention.head_count_kv"], 1);
    assert_eq!(h["vocab_size"], 262144);
    assert_eq!(h["rope.freq_base"], 1000000.0);
    let tokens = j["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "tokenizer.ggml.tokens")
        .unwrap();
    assert_eq!(tokens["len"], 262144);
    assert_eq!(tokens["truncated"], true);
    assert_eq!(tokens["value"].as_array().unwrap().len(), 8);
    assert_eq!(tokens["value"][2], "<bos>");
    assert_eq!(j["total"]["tensors"], 236);
    assert_eq!(j["totals_by_layer"].as_array().unwrap().len(), 19);
    let types: Vec<&str> = j["totals_by_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["f32", "q5_0", "q8_0", "q4_K", "q6_K"]);
    let sum: u64 = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(j["total"]["bytes"], sum);
}

#[test]
fn human_output_is_aligned_tables() {
    require_interop!();
    let out = gguf_lora()
        .arg("inspect")
        .arg(&common::interop().gemma)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("architecture  gemma3"), "{text}");
    assert!(text.contains("GGUF v3, alignment 32"));
    assert!(
        text.contains("[262144] \"<pad>\", \"<eos>\", \"<bos>\""),
        "long arrays: length and first items"
    );
    for section in [
        "Hyperparameters",
        "Metadata (33 keys)",
        "Tensors (236,",
        "Totals by type",
        "Totals by layer",
    ] {
        assert!(text.contains(section), "{section}");
    }
    // In the tensor table every row's type column starts where the header's does.
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("Tensors ("))
        .unwrap()
        + 1;
    let col = lines[start].find("type").unwrap();
    let rows: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    assert_eq!(rows.len(), 236);
    for row in rows {
        assert_eq!(row.as_bytes()[col - 1], b' ', "{row}");
        assert_ne!(row.as_bytes()[col], b' ', "{row}");
    }
    assert!(text.contains("  token_embd.weight "));
}

#[test]
fn split_set_inspects_as_one_model() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new(env.tools.join("llama-gguf-split"))
        .args(["--split", "--split-max-tensors", "150"])
        .arg(&env.smollm)
        .arg(dir.path().join("smol"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    let j = inspect_json(&dir.path().join("smol-00001-of-00002.gguf"));
    let single = inspect_json(&env.smollm);
    assert_eq!(j["shards"].as_array().unwrap().len(), 2);
    assert_eq!(j["total"], single["total"]);
    assert_eq!(j["totals_by_type"], single["totals_by_type"]);
    assert_eq!(j["hyperparameters"], single["hyperparameters"]);
    assert_eq!(j["tensors"][150]["shard"], 1);
    assert_eq!(j["tensors"][150]["name"], single["tensors"][150]["name"]);
    let out = gguf_lora()
        .arg("inspect")
        .arg(dir.path().join("smol-00002-of-00002.gguf"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("2 files") && text.contains("Shards") && text.contains("shard"),
        "{text}"
    );
}

#[test]
fn a_directory_without_an_adapter_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = gguf_lora().arg("inspect").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&dir.path().display().to_string())
            && stderr.contains("no adapter_model.safetensors"),
        "{stderr}"
    );
}
