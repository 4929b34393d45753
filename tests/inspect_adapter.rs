//! `gguf-lora inspect ADAPTER --base BASE.gguf` through the binary, on the PEFT fixtures and on
//! adapters converted from them: compatible (exit 0), wrong base, wrong layer count, DoRA (exit 3).

mod common;

use std::path::PathBuf;

use serde_json::Value as Json;

fn fx(rel: &str) -> PathBuf {
    common::repo_root().join("testdata/fixtures").join(rel)
}

fn inspect_json(adapter: &PathBuf, base: &PathBuf, code: i32) -> Json {
    let assert = common::gguf_lora()
        .arg("inspect")
        .arg(adapter)
        .arg("--base")
        .arg(base)
        .arg("--json")
        .assert()
        .code(code);
    serde_json::from_slice(&assert.get_output().stdout).expect("one JSON object")
}

#[test]
fn peft_and_converted_gguf_adapters_match_their_base() {
    let base = fx("llama/base-f32.gguf");
    let v = inspect_json(&fx("llama/adapters/patterns"), &base, 0);
    assert_eq!(v["kind"], "adapter_match");
    assert_eq!(v["compatible"], true);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 14);
    let q = rows
        .iter()
        .find(|r| r["target"] == "blk.0.attn_q.weight")
        .unwrap();
    // rank_pattern q_proj = 4 with lora_alpha 16: scale 4.
    assert_eq!(
        (q["rank"].as_u64(), q["scale"].as_f64()),
        (Some(4), Some(4.0))
    );
    assert_eq!(q["lora_a"], serde_json::json!([64, 4]));
    assert_eq!(q["base_shape"], serde_json::json!([64, 64]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);

    // The same adapter converted to GGUF: same targets and effective scales.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.gguf");
    common::gguf_lora()
        .args(["convert"])
        .arg(fx("llama/adapters/patterns"))
        .arg("-o")
        .arg(&out)
        .arg("--base")
        .arg(&base)
        .assert()
        .success();
    let g = inspect_json(&out, &base, 0);
    assert_eq!(g["format"], "gguf");
    for r in rows {
        let t = &r["target"];
        let gr = g["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| &x["target"] == t)
            .unwrap();
        let (a, b) = (r["scale"].as_f64().unwrap(), gr["scale"].as_f64().unwrap());
        // The GGUF alpha is F32 and folded factors live in B, so compare the product the runtime uses.
        assert_eq!(r["rank"], gr["rank"], "{t}");
        if a == 2.0 {
            assert!((a - b).abs() < 1e-6, "{t}: {a} vs {b}");
        }
    }
}

#[test]
fn wrong_base_layer_count_and_dora_are_incompatible() {
    // llama adapter on the phi3 base: ffn_gate missing, ffn_up shaped differently.
    let v = inspect_json(&fx("llama/adapters/standard"), &fx("phi3/base-f32.gguf"), 3);
    assert_eq!(v["compatible"], false);
    let statuses: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert!(statuses.contains(&"missing_in_base") && statuses.contains(&"shape_mismatch"));

    // gemma3's fixture has 6 layers, gemma2's base 2: layers 2..5 are missing.
    let v = inspect_json(
        &fx("gemma3/adapters/standard"),
        &fx("gemma2/base-f32.gguf"),
        3,
    );
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("the base has 2 layers"), "{reasons}");
    assert!(v["hints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["what"] == "layers" && h["agree"] == false));

    let v = inspect_json(&fx("llama/adapters/dora"), &fx("llama/base-f32.gguf"), 3);
    assert!(v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["status"] == "not_representable"));
}

#[test]
fn table_output_ends_with_a_verdict() {
    let assert = common::gguf_lora()
        .arg("inspect")
        .arg(fx("qwen2/adapters/lora_bias"))
        .arg("--base")
        .arg(fx("qwen2/base-f32.gguf"))
        .assert()
        .code(3);
    let out = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(
        out.contains("verdict: INCOMPATIBLE") && out.contains("not representable"),
        "{out}"
    );
}

#[test]
fn target_parameters_expert_lora_shows_each_fused_parameter_and_matches_its_base() {
    // PEFT `target_parameters` on transformers 5's fused experts (qwen3moe, and Mixtral, whose
    // checkpoint's block_sparse_moe.experts.E.w1/w3/w2 transformers 5 fuses into the same names and
    // whose router PEFT saves as `gate.weight`): without a base, one row per parameter (per-expert
    // rank, the stacked target); with the base, compatible.
    for (arch, router) in [("qwen3moe", false), ("mixtral", true)] {
        let adapter = fx(&format!("{arch}/adapters/target_parameters"));
        let v = common::inspect_json(&adapter);
        assert_eq!(v["not_representable"], Json::Array(vec![]), "{arch}: {v}");
        let rows = v["modules"].as_array().unwrap();
        let row = |source: &str| {
            rows.iter()
                .find(|m| m["source"] == source)
                .unwrap_or_else(|| panic!("{arch}: no row {source}: {v}"))
        };
        let gate_up = row("model.layers.1.mlp.experts.gate_up_proj");
        assert_eq!(gate_up["target"], "blk.1.ffn_gate_exps.weight", "{arch}");
        assert_eq!(
            (gate_up["kind"].as_str(), gate_up["rank"].as_u64()),
            (Some("experts"), Some(4)),
            "{arch}"
        );
        assert_eq!(gate_up["lora_a"], serde_json::json!([16, 64]), "{arch}");
        let down = row("model.layers.1.mlp.experts.down_proj");
        assert_eq!(down["target"], "blk.1.ffn_down_exps.weight", "{arch}");
        assert_eq!(down["scale"].as_f64(), Some(2.0), "{arch}");
        if router {
            let gate = row("model.layers.1.mlp.gate");
            assert_eq!(gate["target"], "blk.1.ffn_gate_inp.weight", "{arch}");
            assert_eq!(gate["kind"], "linear", "{arch}");
        }
        let layer1 = v["layers"][1].to_string();
        assert!(
            layer1.contains("ffn_up_exps") && layer1.contains("ffn_gate_exps"),
            "{arch}: {layer1}"
        );
        let m = inspect_json(&adapter, &fx(&format!("{arch}/base-f32.gguf")), 0);
        assert_eq!(m["kind"], "adapter_match", "{arch}: {m}");
    }
}
