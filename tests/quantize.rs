//! `gguf-lora quantize` against llama.cpp's own `llama-quantize --pure` (same F32 input, same imatrix
//! from `llama-imatrix`, GGUF and legacy .dat): every tensor byte-identical and the metadata equal,
//! checked with gguf-py (testdata/quantize/compare.py), never by our own reader. The input model is
//! written by gguf-py (testdata/quantize/make_model.py): rows of 256 (K-quant blocks) and of 640
//! (which forces llama-quantize's fallbacks).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gguf_lora, interop, listing, repo_root};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn script(name: &str) -> PathBuf {
    repo_root().join("testdata/quantize").join(name)
}

/// The test model (optionally with `q8_tensor` stored as Q8_0 by libggml), written into `dir`.
fn make_model(dir: &Path, name: &str, q8_tensor: Option<&str>) -> PathBuf {
    let out = dir.join(name);
    let fixture = repo_root().join("testdata/fixtures/llama/base-f32.gguf");
    let mut args = vec![s(&fixture).to_string(), s(&out).to_string()];
    if let Some(t) = q8_tensor {
        args.extend(["--q8-tensor".into(), t.into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    interop().python(&script("make_model.py"), &args);
    out
}

fn tool(name: &str) -> Command {
    Command::new(interop().tools.join(name))
}

fn run_ok(mut c: Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn llama_quantize(input: &Path, out: &Path, ftype: &str, imatrix: Option<&Path>) {
    llama_quantize_with(input, out, ftype, imatrix, &[]);
}

fn llama_quantize_with(
    input: &Path,
    out: &Path,
    ftype: &str,
    imatrix: Option<&Path>,
    extra: &[&str],
) {
    let mut c = tool("llama-quantize");
    c.arg("--pure");
    c.args(extra);
    if let Some(im) = imatrix {
        c.args(["--imatrix", s(im)]);
    }
    c.args([s(input), s(out), ftype, "2"]);
    run_ok(c);
}

fn ours(input: &Path, out: &Path, ty: &str, imatrix: Option<&Path>) -> Value {
    let mut c = gguf_lora();
    c.args(["quantize", s(input), "-o", s(out), "--type", ty, "--json"]);
    if let Some(im) = imatrix {
        c.args(["--imatrix", s(im)]);
    }
    let out = c.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out).unwrap()
}

fn compare(a: &Path, b: &Path) -> Value {
    let out = interop().python(&script("compare.py"), &[s(a), s(b)]);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// Asserts every tensor has the same type and bytes in both files, and the metadata is the same.
fn assert_identical(cmp: &Value, what: &str) {
    assert_eq!(cmp["only_ours"], Value::Array(vec![]), "{what}");
    assert_eq!(cmp["only_theirs"], Value::Array(vec![]), "{what}");
    let tensors = cmp["tensors"].as_object().unwrap();
    assert!(!tensors.is_empty());
    for (name, t) in tensors {
        assert_eq!(t["ours"], t["theirs"], "{what}: {name}: types differ");
        assert_eq!(t["identical"], true, "{what}: {name}: bytes differ");
    }
    assert_eq!(
        cmp["meta_diff"],
        Value::Array(vec![]),
        "{what}: {}",
        cmp["meta"]
    );
}

fn actions(report: &Value) -> Vec<(String, String, String)> {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["type_out"].as_str().unwrap().to_string(),
                t["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (our --type, llama-quantize ftype name). K-quants: the _M name; with --pure only its default
/// type is used, and general.file_type is the same number we write.
const TYPES: &[(&str, &str)] = &[
    ("q8_0", "Q8_0"),
    ("q4_0", "Q4_0"),
    ("q4_1", "Q4_1"),
    ("q5_0", "Q5_0"),
    ("q5_1", "Q5_1"),
    ("q2_k", "Q2_K"),
    ("q3_k", "Q3_K_M"),
    ("q4_k", "Q4_K_M"),
    ("q5_k", "Q5_K_M"),
    ("q6_k", "Q6_K"),
    ("f16", "F16"),
    ("bf16", "BF16"),
];

#[test]
fn every_type_equals_llama_quantize_pure() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    for (ty, ftype) in TYPES {
        let theirs = dir.path().join(format!("l-{ty}.gguf"));
        let mine = dir.path().join(format!("o-{ty}.gguf"));
        llama_quantize(&model, &theirs, ftype, None);
        let report = ours(&model, &mine, ty, None);
        assert_identical(&compare(&mine, &theirs), ty);
        // The report says which tensors fell back and which were left alone.
        for (name, ty_out, action) in actions(&report) {
            if name.ends_with("_norm.weight") {
                assert_eq!(
                    (ty_out.as_str(), action.as_str()),
                    ("f32", "kept"),
                    "{ty} {name}"
                );
            } else if name.contains("ffn_down") && ty.ends_with("_k") {
                // 640-element rows: llama-quantize's fallback table.
                let want = match *ty {
                    "q2_k" | "q3_k" => "q4_0",
                    "q4_k" => "q5_0",
                    "q5_k" => "q5_1",
                    _ => "q8_0",
                };
                assert_eq!(
                    (ty_out.as_str(), action.as_str()),
                    (want, "fallback"),
                    "{ty} {name}"
                );
            } else {
                assert_eq!(action, "quantized", "{ty} {name}");
                assert!(ty_out.eq_ignore_ascii_case(ty), "{ty} {name} {ty_out}");
            }
        }
    }
}

/// `--token-embedding-type` and `--output-tensor-type` choose those two tensors' types as
/// llama-quantize's flags do (with `--pure` too), the other tensors following `--type`.
#[test]
fn token_embedding_and_output_types_equal_llama_quantize() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    for (ty, ftype, embd, output) in [
        ("q4_0", "Q4_0", "q8_0", "q6_k"),
        ("q6_k", "Q6_K", "q5_1", "f16"),
    ] {
        let theirs = dir.path().join(format!("l-{ty}.gguf"));
        let mine = dir.path().join(format!("o-{ty}.gguf"));
        let flags = [
            "--token-embedding-type",
            embd,
            "--output-tensor-type",
            output,
        ];
        llama_quantize_with(&model, &theirs, ftype, None, &flags);
        let mut c = gguf_lora();
        c.args([
            "quantize",
            s(&model),
            "-o",
            s(&mine),
            "--type",
            ty,
            "--json",
        ]);
        let out = c.args(flags).assert().success().get_output().stdout.clone();
        let report: Value = serde_json::from_slice(&out).unwrap();
        assert_identical(&compare(&mine, &theirs), ty);
        let types: std::collections::HashMap<String, String> = actions(&report)
            .into_iter()
            .map(|(name, ty_out, _)| (name, ty_out.to_ascii_lowercase()))
            .collect();
        assert_eq!(types["token_embd.weight"], embd, "{ty}");
        assert_eq!(types["output.weight"], output, "{ty}");
        assert_eq!(types["blk.0.attn_q.weight"], ty, "{ty}");
    }
}

#[test]
fn imatrix_gguf_and_dat_equal_llama_quantize() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    let text = script("imatrix.txt");
    let mut ims = Vec::new();
    for (name, format) in [("im.gguf", "gguf"), ("im.dat", "dat")] {
        let im = dir.path().join(name);
        let mut c = tool("llama-imatrix");
        c.args(["-m", s(&model), "-f", s(&text), "-o", s(&im), "-c", "64"]);
        c.args(["--no-ppl", "--output-format", format, "-t", "2"]);
        run_ok(c);
        ims.push(im);
    }
    for (ty, ftype) in [
        ("q4_k", "Q4_K_M"),
        ("q2_k", "Q2_K"),
        ("q3_k", "Q3_K_M"),
        ("q5_k", "Q5_K_M"),
        ("q6_k", "Q6_K"),
        ("q4_0", "Q4_0"),
        ("q5_1", "Q5_1"),
    ] {
        let plain = dir.path().join(format!("o-{ty}.gguf"));
        ours(&model, &plain, ty, None);
        for im in &ims {
            let tag = im.file_name().unwrap().to_str().unwrap();
            let theirs = dir.path().join(format!("l-{ty}-{tag}.gguf"));
            let mine = dir.path().join(format!("o-{ty}-{tag}.gguf"));
            llama_quantize(&model, &theirs, ftype, Some(im));
            let report = ours(&model, &mine, ty, Some(im));
            assert_identical(&compare(&mine, &theirs), &format!("{ty} {tag}"));
            assert!(report["summary"]["imatrix_applied"].as_u64().unwrap() >= 14);
            // The weights changed the result (they were not silently ignored).
            let vs_plain = compare(&mine, &plain);
            let changed = vs_plain["tensors"]
                .as_object()
                .unwrap()
                .values()
                .filter(|t| t["identical"] == false)
                .count();
            // Q8_0 (q6_k's fallback) has no importance-weighted quantizer in ggml.
            let weighted = report["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["imatrix"] == true && t["type_out"] != "q8_0")
                .count();
            assert!(weighted >= 12, "{ty} {tag}: {weighted}");
            assert_eq!(changed, weighted, "{ty} {tag}");
        }
    }
}

#[test]
fn output_loads_and_runs_in_llama_cpp() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    let q = dir.path().join("q4k.gguf");
    ours(&model, &q, "q4_k", None);
    let code = r#"
import sys, numpy as np
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False)
m.eval([1, 15, 42, 77, 100])
x = np.array(m.scores[:5])
assert x.shape[1] == 256 and np.isfinite(x).all() and x.std() > 0, x
print("ok", m.metadata.get("general.file_type"))
"#;
    let out = interop().python_code(code, &[s(&q)]);
    assert!(out.contains("ok 15"), "{out}");
}

#[test]
fn f32_round_trip_and_a_tensor_of_the_type_is_copied() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    // blk.0.attn_q.weight is already Q8_0 (quantized by libggml).
    let model = make_model(dir.path(), "mq8.gguf", Some("blk.0.attn_q.weight"));
    let q8 = dir.path().join("q8.gguf");
    let report = ours(&model, &q8, "q8_0", None);
    let attn_q = actions(&report)
        .into_iter()
        .find(|(n, _, _)| n == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(attn_q.2, "copied");
    let cmp = compare(&q8, &model);
    assert_eq!(cmp["tensors"]["blk.0.attn_q.weight"]["identical"], true);

    // --type f32 dequantizes everything; gguf-py's dequantization of the Q8_0 file gives the same
    // floats, and the F32 tensors of the input come back byte for byte.
    let f32 = dir.path().join("f32.gguf");
    let report = ours(&q8, &f32, "f32", None);
    assert_eq!(report["summary"]["file_type"], 0);
    let code = r#"
import sys, numpy as np, gguf
a = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
b = {t.name: t for t in gguf.GGUFReader(sys.argv[2]).tensors}
src = {t.name: t for t in gguf.GGUFReader(sys.argv[3]).tensors}
assert set(a) == set(b)
for n, t in b.items():
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, n
    ref = gguf.quants.dequantize(a[n].data, a[n].tensor_type).reshape(-1)
    got = np.asarray(t.data).reshape(-1)
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), n
    if src[n].tensor_type == gguf.GGMLQuantizationType.F32 and a[n].tensor_type == gguf.GGMLQuantizationType.F32:
        assert np.asarray(src[n].data).tobytes() == got.tobytes(), n
print("ok", len(b))
"#;
    let out = interop().python_code(code, &[s(&q8), s(&f32), s(&model)]);
    assert!(out.contains("ok 21"), "{out}");
}

#[test]
fn bad_imatrix_is_refused_and_nothing_is_written() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    // A GGUF imatrix (written by gguf-py) whose entry for attn_q has the wrong length.
    let im = dir.path().join("bad.imatrix.gguf");
    let code = r#"
import sys, numpy as np, gguf
w = gguf.GGUFWriter(sys.argv[1], arch=None)
w.add_string("general.type", "imatrix")
w.add_array("imatrix.datasets", ["x.txt"])
w.add_uint32("imatrix.chunk_count", 1)
w.add_uint32("imatrix.chunk_size", 64)
w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 100), dtype=np.float32))
w.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;
    interop().python_code(code, &[s(&im)]);
    let before = listing(dir.path());
    let out = dir.path().join("out.gguf");
    let a = gguf_lora()
        .args(["quantize", s(&model), "-o", s(&out), "--type", "q4_k"])
        .args(["--imatrix", s(&im)])
        .assert()
        .code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("100") && err.contains("256"),
        "{err}"
    );
    assert_eq!(listing(dir.path()), before);

    // A truncated legacy file: one line naming it, exit 1, nothing written.
    let dat = dir.path().join("bad.dat");
    std::fs::write(&dat, [1u8, 0, 0, 0, 20, 0, 0, 0, b'x']).unwrap();
    let before = listing(dir.path());
    let a = gguf_lora()
        .args(["quantize", s(&model), "-o", s(&out), "--type", "q4_k"])
        .args(["--imatrix", s(&dat)])
        .assert()
        .code(1);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(
        err.contains("bad.dat") && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(listing(dir.path()), before);
}

#[test]
fn mix_names_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo_root().join("testdata/fixtures/llama/base-f32.gguf");
    let out = dir.path().join("o.gguf");
    let a = gguf_lora()
        .args(["quantize", s(&input), "-o", s(&out), "--type", "Q4_K_M"])
        .assert()
        // A usage error (issue 12: exit 2, as the contract says).
        .code(2);
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(err.contains("--type q4_k"), "{err}");
    assert!(!out.exists());
}

#[test]
fn split_input_gives_split_output_with_the_same_tensors() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), "m.gguf", None);
    let mut c = tool("llama-gguf-split");
    c.args(["--split", "--split-max-tensors", "8", s(&model)]);
    c.arg(s(&dir.path().join("part")));
    run_ok(c);
    let first = dir.path().join("part-00001-of-00003.gguf");
    let report = ours(&first, &dir.path().join("q.gguf"), "q4_k", None);
    let outputs = report["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 3);
    let joined = dir.path().join("joined.gguf");
    let mut c = tool("llama-gguf-split");
    c.args(["--merge", outputs[0].as_str().unwrap(), s(&joined)]);
    run_ok(c);
    let theirs = dir.path().join("l.gguf");
    llama_quantize(&model, &theirs, "Q4_K_M", None);
    let cmp = compare(&joined, &theirs);
    for (name, t) in cmp["tensors"].as_object().unwrap() {
        assert_eq!(t["identical"], true, "{name}");
    }
    assert_eq!(cmp["tensors"].as_object().unwrap().len(), 21);
}
