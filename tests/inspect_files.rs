//! `gguf-lora inspect` on safetensors files, PEFT adapters (no base) and GGUF LoRA adapters, through
//! the binary: facts of the committed PEFT fixtures and of llama.cpp's converter output
//! (`ref_convert.gguf`) checked in the one JSON object; the tables; and hand-made malformed
//! safetensors files rejected with exit 1 and one line naming the file and the problem, under
//! `ulimit -v`.

mod common;

use std::path::{Path, PathBuf};

use common::{gguf_lora, inspect_json, inspect_limited, refusal_failures};
use serde_json::{json, Value};

fn fx(rel: &str) -> PathBuf {
    common::repo_root().join("testdata/fixtures").join(rel)
}

fn inspect_text(path: &Path) -> String {
    let out = gguf_lora().arg("inspect").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn module<'a>(v: &'a Value, source: &str) -> &'a Value {
    v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["source"] == source)
        .unwrap_or_else(|| panic!("no module {source}"))
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() < 1e-9
}

#[test]
fn peft_patterns_fixture_ranks_alphas_scales() {
    let v = inspect_json(&fx("llama/adapters/patterns"));
    assert_eq!(v["kind"], "peft");
    assert_eq!(v["config"]["r"], 8);
    assert_eq!(v["config"]["lora_alpha"], 16.0);
    assert_eq!(v["config"]["rank_pattern"]["q_proj"], 4);
    assert_eq!(v["config"]["alpha_pattern"]["v_proj"], 32.0);
    assert_eq!(v["modules"].as_array().unwrap().len(), 14);
    assert_eq!(v["ranks"], json!([4, 8, 12]));
    // rank_pattern q_proj = 4: 16 / 4.
    let q = module(&v, "model.layers.0.self_attn.q_proj");
    assert_eq!(q["target"], "blk.0.attn_q.weight");
    assert_eq!(q["rank"], 4);
    assert_eq!(q["rank_key"], "q_proj");
    assert!(close(&q["scale"], 4.0));
    assert_eq!(q["lora_a"], json!([4, 64]));
    assert_eq!(q["lora_b"], json!([64, 4]));
    // alpha_pattern v_proj = 32 at rank 8; the full module path beats nothing for o_proj of layer 0.
    let vp = module(&v, "model.layers.1.self_attn.v_proj");
    assert_eq!(
        (vp["lora_alpha"].as_f64(), vp["alpha_key"].as_str()),
        (Some(32.0), Some("v_proj"))
    );
    assert!(close(&vp["scale"], 4.0));
    assert!(close(
        &module(&v, "model.layers.0.self_attn.o_proj")["scale"],
        1.0
    ));
    assert!(close(
        &module(&v, "model.layers.1.self_attn.o_proj")["scale"],
        2.0
    ));
    let down = module(&v, "model.layers.1.mlp.down_proj");
    assert_eq!(down["rank"], 12);
    assert!(close(&down["scale"], 16.0 / 12.0));
    assert_eq!(down["lora_a"], json!([12, 128]));
    assert_eq!(v["not_representable"], json!([]));
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1]["targets"].as_array().unwrap().len(), 7);
    // The weights file view: 2 tensors per module, all F32.
    assert_eq!(v["weights"]["total"]["tensors"], 28);
    assert_eq!(v["weights"]["totals_by_dtype"][0]["dtype"], "F32");
    assert_eq!(v["weights"]["totals_by_dtype"][0]["tensors"], 28);
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_rank_where_the_reference_gguf_says_alpha_over_rank() {
    let v = inspect_json(&fx("llama/adapters/rslora"));
    assert_eq!(v["config"]["use_rslora"], true);
    for m in v["modules"].as_array().unwrap() {
        assert!(close(&m["scale"], 16.0 / 8f64.sqrt()), "{m}");
        assert!(close(&m["alpha"], 16.0 * 8f64.sqrt()), "{m}");
    }
    // llama.cpp's convert_lora_to_gguf.py wrote alpha 16 for the same adapter: the runtime then
    // scales by 16 / 8, which is the reference's known rsLoRA mis-scale. inspect shows the file as is.
    let g = inspect_json(&fx("llama/adapters/rslora/ref_convert.gguf"));
    assert_eq!(g["kind"], "gguf_adapter");
    assert_eq!(g["general_type"], "adapter");
    assert_eq!(g["adapter"]["alpha"], 16.0);
    assert_eq!(g["adapter"]["pairs"], 14);
    assert_eq!(g["adapter"]["ranks"], json!([8]));
    for t in g["adapter"]["tensors"].as_array().unwrap() {
        assert!(close(&t["scale"], 2.0), "{t}");
    }
    // The GGUF view is still there: 28 tensors.
    assert_eq!(g["total"]["tensors"], 28);
}

#[test]
fn reference_gguf_of_patterns_adapter_pairs_and_shapes() {
    let g = inspect_json(&fx("llama/adapters/patterns/ref_convert.gguf"));
    let a = &g["adapter"];
    assert_eq!(a["architecture"], "llama");
    assert_eq!(a["ranks"], json!([4, 8, 12]));
    let t = |name: &str| {
        a["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == name)
            .unwrap()
            .clone()
    };
    let q = t("blk.0.attn_q.weight");
    assert_eq!(
        (q["rank"].as_u64(), q["layer"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(q["lora_a"], json!([64, 4]));
    assert_eq!(q["lora_b"], json!([4, 64]));
    let d = t("blk.1.ffn_down.weight");
    assert_eq!(d["lora_a"], json!([128, 12]));
    assert_eq!(a["layers"].as_array().unwrap().len(), 2);
    assert_eq!(a["layers"][0]["targets"].as_array().unwrap().len(), 7);
}

#[test]
fn alora_invocation_tokens_in_config_and_reference_gguf() {
    let v = inspect_json(&fx("llama/adapters/alora"));
    let g = inspect_json(&fx("llama/adapters/alora/ref_convert.gguf"));
    assert_eq!(v["config"]["alora_invocation_tokens"], json!([44, 152]));
    assert_eq!(g["adapter"]["alora_invocation_tokens"], json!([44, 152]));
}

#[test]
fn embedding_and_lm_head_in_peft_and_reference_gguf() {
    let v = inspect_json(&fx("llama/adapters/embed_lm_head"));
    let e = module(&v, "model.embed_tokens");
    assert_eq!(
        (e["kind"].as_str(), e["target"].as_str()),
        (Some("embedding"), Some("token_embd.weight"))
    );
    assert_eq!(e["lora_a"], json!([8, 256]));
    assert_eq!(module(&v, "lm_head")["target"], "output.weight");
    let g = inspect_json(&fx("llama/adapters/embed_lm_head/ref_convert.gguf"));
    let t = g["adapter"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "token_embd.weight")
        .unwrap()
        .clone();
    // llama.cpp stores the embedding A transposed, ne = [rank, n_vocab].
    assert_eq!(t["kind"], "embedding");
    assert_eq!(t["lora_a"], json!([8, 256]));
    assert_eq!(g["adapter"]["layers"], json!([]));
    let text = inspect_text(&fx("llama/adapters/embed_lm_head/ref_convert.gguf"));
    assert!(text.contains("(no blk.N tensor adapted)"), "{text}");
}

#[test]
fn dora_lora_bias_and_modules_to_save_are_flagged() {
    let v = inspect_json(&fx("llama/adapters/dora"));
    assert_eq!(v["config"]["use_dora"], true);
    let mods = v["modules"].as_array().unwrap();
    assert!(mods
        .iter()
        .all(|m| m["dora"] == true && m["representable"] == false));
    assert_eq!(v["not_representable"].as_array().unwrap().len(), 14);
    assert!(inspect_text(&fx("llama/adapters/dora")).contains("NOT REPRESENTABLE (DoRA)"));

    let b = inspect_json(&fx("qwen2/adapters/lora_bias"));
    let biased: Vec<_> = b["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["lora_bias"] == true)
        .collect();
    assert!(!biased.is_empty());
    assert!(biased.iter().all(|m| m["representable"] == false));

    // The .safetensors path with its config beside it reads as the PEFT adapter.
    let s = inspect_json(&fx(
        "llama/adapters/modules_to_save/adapter_model.safetensors",
    ));
    assert_eq!(s["kind"], "peft");
    assert_eq!(s["config"]["modules_to_save"], json!(["lm_head"]));
    let full = s["full_tensors"].as_array().unwrap();
    assert_eq!(full.len(), 1);
    assert_eq!(full[0]["target"], "output.weight");
    assert_eq!(full[0]["shape"], json!([256, 64]));
    assert_eq!(s["not_representable"].as_array().unwrap().len(), 1);
}

#[test]
fn fused_and_expert_modules_map_without_a_base() {
    let p = inspect_json(&fx("phi3/adapters/standard"));
    let qkv = module(&p, "model.layers.0.self_attn.qkv_proj");
    assert_eq!(qkv["target"], "blk.0.attn_qkv.weight");
    assert_eq!(
        module(&p, "model.layers.0.mlp.gate_up_proj")["target"],
        "blk.0.ffn_up.weight"
    );
    let m = inspect_json(&fx("qwen2moe/adapters/standard"));
    let e = module(&m, "model.layers.0.mlp.experts.1.up_proj");
    assert_eq!(
        (
            e["kind"].as_str(),
            e["expert"].as_u64(),
            e["target"].as_str()
        ),
        (Some("experts"), Some(1), Some("blk.0.ffn_up_exps.weight"))
    );
    // Coverage lists a stacked target once, not once per expert.
    let l0: Vec<&str> = m["layers"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(l0.iter().filter(|t| **t == "ffn_up_exps").count(), 1);
}

#[test]
fn plain_safetensors_file_header_tensors_and_dtype_totals() {
    // A merged model next to an adapter_config.json has no LoRA tensors: a plain safetensors file.
    let v = inspect_json(&fx("llama/adapters/dora/merged.safetensors"));
    assert_eq!(v["kind"], "safetensors");
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 21);
    let lm = tensors
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(
        (lm["dtype"].as_str(), lm["bytes"].as_u64()),
        (Some("F32"), Some(65536))
    );
    assert_eq!(lm["shape"], json!([256, 64]));
    let file_size = std::fs::metadata(fx("llama/adapters/dora/merged.safetensors"))
        .unwrap()
        .len();
    assert_eq!(
        v["data_offset"].as_u64().unwrap() + v["total"]["bytes"].as_u64().unwrap(),
        file_size
    );

    // BF16 weights of a PEFT fixture, with its __metadata__, through the plain view of a copy.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("w.safetensors");
    std::fs::copy(
        fx("llama/adapters/standard_bf16/adapter_model.safetensors"),
        &copy,
    )
    .unwrap();
    let b = inspect_json(&copy);
    assert_eq!(b["kind"], "safetensors");
    assert_eq!(b["metadata"], json!({}));
    assert_eq!(
        b["totals_by_dtype"],
        json!([{"dtype": "BF16", "tensors": 28, "elements": 16384, "bytes": 32768}])
    );
    // The F32 fixture's header carries PEFT's `__metadata__` {"format": "pt"}.
    let copy32 = dir.path().join("w32.safetensors");
    std::fs::copy(
        fx("llama/adapters/standard/adapter_model.safetensors"),
        &copy32,
    )
    .unwrap();
    assert_eq!(inspect_json(&copy32)["metadata"], json!({"format": "pt"}));
    let text = inspect_text(&copy32);
    assert!(
        text.contains("Metadata (1 keys)") && text.contains("\"pt\""),
        "{text}"
    );
    let text = inspect_text(&copy);
    assert!(
        text.contains("Totals by dtype") && text.contains("BF16"),
        "{text}"
    );
}

#[test]
fn human_tables_are_aligned() {
    let text = inspect_text(&fx("llama/adapters/patterns"));
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Modules"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(table.len(), 15, "{text}");
    // Right-aligned "scale" column: every row ends that column at the same position.
    let end = table[0].find("scale").unwrap() + "scale".len();
    for row in &table[1..] {
        assert_ne!(row.as_bytes()[end - 1], b' ', "{row}");
        assert_eq!(row.as_bytes()[end], b' ', "{row}");
    }
    let g = inspect_text(&fx("llama/adapters/patterns/ref_convert.gguf"));
    assert!(
        g.contains("LoRA pairs (14)") && g.contains("Layer coverage"),
        "{g}"
    );
}

/// Safetensors bytes: length prefix, header text, data.
fn st(header: &str, data: &[u8]) -> Vec<u8> {
    st_raw(header.as_bytes(), data)
}

fn st_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn malformed() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let one = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut long_len = st(one, &[0; 8]);
    long_len[..8].copy_from_slice(&10_000u64.to_le_bytes());
    let mut huge_len = st(one, &[0; 8]);
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut truncated = st(one, &[0; 8]);
    truncated.truncate(20);
    vec![
        (
            "shorter_than_prefix",
            vec![1, 2, 3],
            "shorter than the 8-byte header length",
        ),
        (
            "truncated_header",
            truncated,
            "runs past the end of the file",
        ),
        (
            "header_length_beyond_file",
            long_len,
            "runs past the end of the file",
        ),
        ("header_length_huge", huge_len, "over the 100 MB limit"),
        (
            "bad_json",
            st(r#"{"a":{"dtype":"F32","#, &[]),
            "header is not JSON",
        ),
        (
            "not_an_object",
            st("[1,2]", &[]),
            "header is not a JSON object",
        ),
        (
            "non_utf8",
            st_raw(b"{\"\xff\xfe\":1}", &[]),
            "header is not UTF-8",
        ),
        (
            "unknown_dtype",
            st(
                r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
                &[0],
            ),
            "tensor 'a': unknown dtype \"Q4\"",
        ),
        (
            "shape_not_a_list",
            st(
                r#"{"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "tensor 'a': shape is not a list",
        ),
        (
            "missing_offsets",
            st(r#"{"a":{"dtype":"F32","shape":[2]}}"#, &[0; 8]),
            "tensor 'a': no data_offsets",
        ),
        (
            "metadata_not_strings",
            st(
                r#"{"__metadata__":{"n":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "__metadata__ is not an object of strings",
        ),
        (
            "shape_bytes_mismatch",
            st(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "tensor 'a': shape [3] of F32 needs 12 bytes, data_offsets [0, 8] hold 8",
        ),
        (
            "offsets_overlap",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            "data offsets overlap",
        ),
        (
            "offsets_backwards",
            st(
                r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
                &[0; 8],
            ),
            "tensor 'a'",
        ),
        (
            "offsets_past_end",
            st(
                r#"{"a":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#,
                &[0; 8],
            ),
            "tensor data does not end exactly at the end of the file",
        ),
        (
            "trailing_bytes",
            st(one, &[0; 12]),
            "tensor data does not end exactly at the end of the file",
        ),
        (
            "shape_overflow",
            st(
                r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "tensor 'a': shape [4611686018427387904, 8] overflows",
        ),
    ]
}

#[test]
fn malformed_safetensors_are_rejected_with_a_precise_message() {
    let cases = malformed();
    assert!(cases.len() >= 8);
    let failures = refusal_failures("safetensors", &cases);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn malformed_peft_adapters_name_the_file_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let src = fx("llama/adapters/standard");
    // Weights cut short; a config that is not JSON; a config with a bad r.
    let cut = dir.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        cut.join("adapter_config.json"),
    )
    .unwrap();
    let w = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(cut.join("adapter_model.safetensors"), &w[..w.len() - 100]).unwrap();
    let bad_cfg = dir.path().join("bad_cfg");
    std::fs::create_dir(&bad_cfg).unwrap();
    std::fs::write(bad_cfg.join("adapter_config.json"), "{\"r\": ").unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        bad_cfg.join("adapter_model.safetensors"),
    )
    .unwrap();
    let bad_r = dir.path().join("bad_r");
    std::fs::create_dir(&bad_r).unwrap();
    std::fs::write(bad_r.join("adapter_config.json"), "{\"r\": -3}").unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        bad_r.join("adapter_model.safetensors"),
    )
    .unwrap();
    for (path, file, expect) in [
        (
            &cut,
            "adapter_model.safetensors",
            "does not end exactly at the end of the file",
        ),
        (&bad_cfg, "adapter_config.json", "not JSON"),
        (
            &bad_r,
            "adapter_config.json",
            "r: expected a positive integer",
        ),
    ] {
        let out = inspect_limited(path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty());
        assert!(
            stderr.contains(&path.join(file).display().to_string())
                && stderr.contains(expect)
                && stderr.trim_end().lines().count() == 1,
            "{stderr}"
        );
    }
}
