//! `gguf-lora verify` through the binary: it passes on correct merges (F32 and Q4_K-family outputs) and
//! fails with exit 3, naming the check, on wrong ones (adapter merged at another scale, a tensor left
//! out, a merge made on another base of the same architecture); bad input exits 1.
//!
//! Merged models come from `testdata/tools/keep_type_merge.py` (gguf-py + libggml's reference
//! quantizers), adapters from llama.cpp's `convert_lora_to_gguf.py` (fixtures) or gguf-py
//! (`random_lora.py`), so nothing here is checked against our own writer.

mod common;

use std::path::{Path, PathBuf};

fn fixture(arch: &str) -> PathBuf {
    common::repo_root().join("testdata/fixtures").join(arch)
}

fn tool(name: &str) -> PathBuf {
    common::repo_root().join("testdata/tools").join(name)
}

fn keep_type_merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::interop().python(&tool("keep_type_merge.py"), &args);
}

/// Runs verify; returns (exit code, stdout, stderr).
fn verify(args: &[&str]) -> (i32, String, String) {
    let out = common::gguf_lora()
        .arg("verify")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn f32_merges_pass_when_correct_and_fail_with_exit_3_when_wrong() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama").join("base-f32.gguf");
    let adapter = fixture("llama").join("adapters/standard/ref_convert.gguf");
    let p = |n: &str| dir.path().join(n);
    keep_type_merge(&base, &adapter, &p("ok.gguf"), &[]);
    keep_type_merge(&base, &adapter, &p("s08.gguf"), &["--scale", "0.8"]);
    keep_type_merge(
        &base,
        &adapter,
        &p("skip.gguf"),
        &["--skip", "blk.1.ffn_down.weight"],
    );
    // The same adapter merged into another model of the same architecture and shapes.
    let other = fixture("mistral").join("base-f32.gguf");
    keep_type_merge(&other, &adapter, &p("other.gguf"), &[]);
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (b, a) = (s(&base), s(&adapter));

    let (code, stdout, _) = verify(&[&b, "--lora", &a, "--merged", &s(&p("ok.gguf"))]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");

    // The same adapter selected from a named bundle (BUNDLE.gguf#NAME) is read by the one adapter
    // reader merge and convert use, and passes the same way.
    let bundle = p("named.gguf");
    common::gguf_lora()
        .args(["bundle", "--mode", "named", "-o", &s(&bundle)])
        .arg(format!("std={a}"))
        .assert()
        .success();
    let member = format!("{}#std", s(&bundle));
    let (code, stdout, stderr) = verify(&[&b, "--lora", &member, "--merged", &s(&p("ok.gguf"))]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");

    for (name, want) in [
        ("s08.gguf", "share of the adapter's effect kept"),
        ("skip.gguf", "mean KL(runtime||merged)"),
        ("other.gguf", "mean KL(runtime||merged)"),
    ] {
        let (code, stdout, _) = verify(&[&b, "--lora", &a, "--merged", &s(&p(name))]);
        assert_eq!(code, 3, "{name}: {stdout}");
        assert!(
            stdout.contains(&format!("FAIL: {want}")),
            "{name}: {stdout}"
        );
    }

    // The same wrong-scale merge is right for the adapter at that scale (llama.cpp's --lora-scaled).
    let (code, stdout, _) = verify(&[
        &b,
        "--lora-scaled",
        &format!("{a}:0.8"),
        "--merged",
        &s(&p("s08.gguf")),
    ]);
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn quantized_keep_type_merge_of_gemma3_passes_and_the_same_at_0_8_fails() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let adapter = p("r16.gguf");
    env.python(
        &tool("random_lora.py"),
        &[env.gemma.to_str().unwrap(), adapter.to_str().unwrap()],
    );
    keep_type_merge(&env.gemma, &adapter, &p("ok.gguf"), &[]);
    keep_type_merge(&env.gemma, &adapter, &p("s08.gguf"), &["--scale", "0.8"]);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (b, a) = (s(&env.gemma), s(&adapter));

    let (code, stdout, _) = verify(&[&b, "--lora", &a, "--merged", &s(&p("ok.gguf")), "--json"]);
    assert_eq!(code, 0, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["passed"], true);
    let types = v["report"]["merged_types"]["types"].as_object().unwrap();
    assert!(types.contains_key("q4_K"), "{types:?}");
    assert_eq!(v["report"]["merged_types"]["fidelity"], "bits4_or_less");
    let share = v["report"]["share_kept"].as_f64().unwrap();
    assert!(share > 0.55 && share < 1.0, "{share}");

    let (code, stdout, stderr) =
        verify(&[&b, "--lora", &a, "--merged", &s(&p("s08.gguf")), "--json"]);
    assert_eq!(code, 3, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["passed"], false);
    assert!(
        stderr.contains("FAIL: share of the adapter's effect kept"),
        "{stderr}"
    );
}

#[test]
fn logits_out_writes_npy_files_numpy_reads_and_json_is_one_object() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("qwen3").join("base-f32.gguf");
    let adapter = fixture("qwen3").join("adapters/standard/ref_convert.gguf");
    let merged = dir.path().join("m.gguf");
    keep_type_merge(&base, &adapter, &merged, &[]);
    let out = dir.path().join("logits");
    let (code, stdout, _) = verify(&[
        base.to_str().unwrap(),
        "--lora",
        adapter.to_str().unwrap(),
        "--merged",
        merged.to_str().unwrap(),
        "--seed",
        "7",
        "--n-tokens",
        "5",
        "--logits-out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tokens: Vec<u64> = v["report"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tokens.len(), 5);
    let code = r#"
import sys, numpy as np
d = sys.argv[1]
b, r, m = (np.load(f"{d}/{n}.npy") for n in ("base", "runtime", "merged"))
print(b.dtype, b.shape, r.shape, m.shape, float(np.abs(r - m).max()), float(np.abs(r - b).max()))
"#;
    let printed = common::interop().python_code(code, &[out.to_str().unwrap()]);
    let f: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(f[0], "float32", "{printed}");
    assert_eq!(
        &f[1..7],
        ["(5,", "256)", "(5,", "256)", "(5,", "256)"],
        "{printed}"
    );
    assert!(f[7].parse::<f64>().unwrap() < 1e-3, "{printed}");
    assert!(f[8].parse::<f64>().unwrap() > 1e-2, "{printed}");

    // The same seed gives the same tokens.
    let (_, again, _) = verify(&[
        base.to_str().unwrap(),
        "--lora",
        adapter.to_str().unwrap(),
        "--merged",
        merged.to_str().unwrap(),
        "--seed",
        "7",
        "--n-tokens",
        "5",
        "--json",
    ]);
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(w["report"]["tokens"], v["report"]["tokens"]);
}

#[test]
fn without_merged_the_merge_is_done_by_gguf_lora_merge_and_checked() {
    let base = fixture("llama").join("base-f32.gguf");
    let adapter = fixture("llama").join("adapters/standard/ref_convert.gguf");
    let (code, stdout, stderr) = verify(&[
        base.to_str().unwrap(),
        "--lora-scaled",
        &format!("{}:0.5", adapter.display()),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("gguf-lora merge, types kept"), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
}

#[test]
fn bad_input_exits_1_with_a_message() {
    require_interop!();
    let base = fixture("llama").join("base-f32.gguf");
    let adapter = fixture("llama").join("adapters/standard/ref_convert.gguf");
    let (b, a) = (base.to_str().unwrap(), adapter.to_str().unwrap());

    let (code, _, stderr) = verify(&[b, "--merged", b]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no adapter given"), "{stderr}");

    let (code, _, stderr) = verify(&[b, "--lora", a, "--merged", b, "--tokens", "1,99999"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("token id 99999 is out of range"),
        "{stderr}"
    );

    // An adapter for another model: its tensors do not fit the base.
    let gemma_adapter = fixture("gemma3").join("adapters/standard/ref_convert.gguf");
    let (code, _, stderr) = verify(&[b, "--lora", gemma_adapter.to_str().unwrap(), "--merged", b]);
    assert_eq!(code, 1, "{stderr}");

    // An architecture the forward pass does not implement.
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = dir.path().join("gpt2.gguf");
    let code_py = r#"
import os, sys
sys.path.insert(0, os.path.join(os.environ["GGUF_LORA_LLAMA_SRC"], "gguf-py"))
import gguf, numpy as np
w = gguf.GGUFWriter(sys.argv[1], "gpt2")
w.add_block_count(1)
w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;
    let env = common::interop();
    let out = std::process::Command::new(&env.python)
        .arg("-c")
        .arg(code_py)
        .arg(&gpt2)
        .env("GGUF_LORA_LLAMA_SRC", &env.llama_src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = gpt2.to_str().unwrap();
    let (code, _, stderr) = verify(&[g, "--lora", a, "--merged", g]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("architecture gpt2 is not supported by verify"),
        "{stderr}"
    );
}
