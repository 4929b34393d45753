//! `gguf-lora bundle` through the binary, checked by other tools: adapters written by llama.cpp's
//! `convert_lora_to_gguf.py` (the fixtures' `ref_convert.gguf`) and by gguf-py
//! (`testdata/bundle/make_lora.py`); the concat bundle's ΔW recomputed by numpy from gguf-py reads,
//! and its logits compared in llama.cpp (llama-cpp-python) with the inputs loaded at runtime.

mod common;

use std::path::{Path, PathBuf};

use common::{gguf_lora, interop, repo_root};

fn fixture(rel: &str) -> PathBuf {
    repo_root().join("testdata/fixtures").join(rel)
}

fn tool(name: &str) -> PathBuf {
    repo_root().join("testdata/bundle").join(name)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A gguf-py adapter from `make_lora.py KIND` (extra args such as `--f16`).
fn make_lora(dir: &Path, kind: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{kind}.gguf"));
    let mut args = vec![kind, out.to_str().unwrap()];
    args.extend_from_slice(extra);
    interop().python(&tool("make_lora.py"), &args);
    out
}

/// Concat of four adapters with different ranks (4/8/12, 8, 2/3, 8), scales (0.7, 1.3, -0.5, 0.3),
/// tensor sets (all linear; token_embd + output; attn_q, ffn_down, token_embd; all linear), alphas
/// (16, 16, none, 16) and formats (GGUF from llama.cpp's converter, from gguf-py, a PEFT directory):
/// numpy finds ΔW = Σ sᵢ·BᵢAᵢ per tensor, llama.cpp the same logits as with the four at runtime,
/// and `merge --outtype f32` the same weights.
#[test]
fn concat_equals_the_inputs_applied_together() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let patterns = fixture("llama/adapters/patterns/ref_convert.gguf");
    let embed = fixture("llama/adapters/embed_lm_head/ref_convert.gguf");
    let ours = make_lora(dir.path(), "concat", &[]);
    let standard_gguf = fixture("llama/adapters/standard/ref_convert.gguf");
    let base = fixture("llama/base-f32.gguf");
    let out = dir.path().join("bundle.gguf");
    let specs = [
        format!("{}:0.7", s(&patterns)),
        format!("{}:1.3", s(&embed)),
        format!("{}:-0.5", s(&ours)),
        format!("{}:0.3", s(&standard_gguf)),
    ];
    // The fourth input goes in as the PEFT directory (q/k rows RoPE-permuted on the way in); the
    // checks use llama.cpp's own conversion of it.
    let mut bundle_specs = specs.clone();
    bundle_specs[3] = format!("{}:0.3", s(&fixture("llama/adapters/standard")));
    let assert = gguf_lora()
        .arg("bundle")
        .args(&bundle_specs)
        .args(["-o", &s(&out), "--base", &s(&base), "--json"])
        .assert()
        .success();
    let report: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    assert_eq!(report["mode"], "concat");
    // Shared tensors stack ranks: attn_q of layer 0 is 4 (patterns) + 3 (gguf-py) + 8 (standard).
    let q0 = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q0["rank"], 15);

    let mut args = vec![s(&base), s(&fixture("llama/tokens.json")), s(&out)];
    args.extend(specs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let check: serde_json::Value =
        serde_json::from_str(interop().python(&tool("check_concat.py"), &args).trim()).unwrap();
    eprintln!("{check}");
    assert_eq!(check["tensors"], 16);
    assert!(
        check["delta_max_rel_err"].as_f64().unwrap() < 1e-6,
        "{check}"
    );
    let diff = check["logits_max_abs_diff"].as_f64().unwrap();
    let max = check["logits_max_abs"].as_f64().unwrap();
    let effect = check["adapter_effect_max_abs"].as_f64().unwrap();
    assert!(diff < 1e-5 * max, "{check}");
    assert!(
        effect > 0.1 * max,
        "the adapters must visibly change the logits: {check}"
    );
    // merge --outtype f32 of the bundle at scale 1 equals the merge of the four at their scales.
    let merged_bundle = dir.path().join("m-bundle.gguf");
    let merged_inputs = dir.path().join("m-inputs.gguf");
    gguf_lora()
        .args([
            "merge",
            &s(&base),
            "--lora",
            &s(&out),
            "--outtype",
            "f32",
            "-o",
        ])
        .arg(&merged_bundle)
        .assert()
        .success();
    gguf_lora()
        .args(["merge", &s(&base), "--outtype", "f32", "-o"])
        .arg(&merged_inputs)
        .arg("--lora-scaled")
        .arg(specs.join(","))
        .assert()
        .success();
    let worst: f64 = interop()
        .python_code(
            r#"
import sys, gguf, numpy as np
t = [{x.name: np.array(x.data, dtype=np.float64) for x in gguf.GGUFReader(p).tensors} for p in sys.argv[1:]]
base, a, b = t
changed = [n for n in base if np.abs(b[n] - base[n]).max() > 0]
assert len(changed) == 16, changed
assert all(np.array_equal(a[n], base[n]) for n in base if n not in changed)
print(max(float(np.abs(a[n] - b[n]).max() / np.abs(b[n] - base[n]).max()) for n in changed))
"#,
            &[&s(&base), &s(&merged_bundle), &s(&merged_inputs)],
        )
        .trim()
        .parse()
        .unwrap();
    assert!(
        worst < 1e-5,
        "merged weights differ by {worst} of the delta"
    );
}

/// F16 inputs are read through their exact dequantization; the bundle keeps ΔW to f32 rounding.
#[test]
fn concat_reads_f16_inputs_exactly() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let ours = make_lora(dir.path(), "concat", &["--f16"]);
    let standard = fixture("llama/adapters/standard/ref_convert.gguf");
    let out = dir.path().join("c.gguf");
    gguf_lora()
        .args([
            "bundle",
            &format!("{}:2", s(&ours)),
            &s(&standard),
            "-o",
            &s(&out),
        ])
        .assert()
        .success();
    let code = r#"
import sys
import check_concat as c
bundle, *specs = sys.argv[1:]
exp = {}
for spec in specs:
    p, sc = spec.rsplit(":", 1)
    alpha, pairs = c.read_lora(p)
    for n, (a, b) in pairs.items():
        exp[n] = exp.get(n, 0) + float(sc) * c.delta(alpha, a, b, n)[0]
alpha, pairs = c.read_lora(bundle)
import numpy as np
print(max(float(np.abs(c.delta(alpha, a, b, n)[0] - exp[n]).max() / np.abs(exp[n]).max()) for n, (a, b) in pairs.items()))
"#;
    let dir_tools = tool("");
    let script = dir.path().join("f16check.py");
    std::fs::write(
        &script,
        format!(
            "import sys; sys.path.insert(0, {:?})\n{code}",
            s(&dir_tools)
        ),
    )
    .unwrap();
    let err: f64 = interop()
        .python(
            &script,
            &[
                &s(&out),
                &format!("{}:2", s(&ours)),
                &format!("{}:1", s(&standard)),
            ],
        )
        .trim()
        .parse()
        .unwrap();
    assert!(err < 1e-6, "relative ΔW error {err}");
}

/// Named: every adapter comes back byte for byte (GGUF from llama.cpp's converter and from gguf-py,
/// including one whose 62-byte tensor names need the bundle's index scheme); a PEFT input comes
/// back as `convert` writes it; `#NAME` is accepted where adapters are read; inspect lists them.
#[test]
fn named_bundle_extracts_bit_for_bit_and_selects_by_name() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let patterns = fixture("llama/adapters/patterns/ref_convert.gguf");
    let embed = fixture("llama/adapters/embed_lm_head/ref_convert.gguf");
    let f16 = make_lora(d, "concat", &["--f16"]);
    let long = make_lora(d, "long", &[]);
    let peft = fixture("llama/adapters/standard");
    let base = fixture("llama/base-f32.gguf");
    let bundle = d.join("named.gguf");
    let out = gguf_lora()
        .args(["bundle", "--mode", "named", "-o", &s(&bundle), "--json"])
        .arg(format!("pat={}", s(&patterns)))
        .arg(format!("emb={}:0.5", s(&embed)))
        .arg(s(&f16))
        .arg(format!("std={}", s(&peft)))
        .args(["--base", &s(&base)])
        .assert()
        .success();
    let report: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let names: Vec<&str> = report["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pat", "emb", "concat", "std"]);

    // Without --base (nothing to check names against), an adapter whose names are too long to
    // prefix: gguf-py reads the bundle, every name under ggml's limit, the long ones indexed.
    let long_bundle = d.join("long-bundle.gguf");
    gguf_lora()
        .args(["bundle", "--mode", "named", "-o", &s(&long_bundle)])
        .args([s(&patterns), s(&long)])
        .assert()
        .success();
    let listing = interop().python_code(
        r#"
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
names = [t.name for t in r.tensors]
assert all(len(n) < 64 for n in names), names
f = r.get_field("gguf_lora.bundle.names")
print(",".join(bytes(f.parts[i]).decode() for i in f.data))
print(sorted(n for n in names if n.startswith("a1.")))
print(bytes(r.get_field("general.type").parts[-1]).decode())
"#,
        &[&s(&long_bundle)],
    );
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines[0], "ref_convert,long");
    assert_eq!(lines[1], "['a1.#0', 'a1.#1']");
    assert_eq!(lines[2], "lora_bundle");

    for (file, name, original) in [
        (&bundle, "pat", &patterns),
        (&bundle, "emb", &embed),
        (&bundle, "concat", &f16),
        (&long_bundle, "long", &long),
        (&long_bundle, "ref_convert", &patterns),
    ] {
        let x = d.join(format!("x-{name}.gguf"));
        gguf_lora()
            .args(["bundle", "--extract", name, &s(file), "-o", &s(&x)])
            .assert()
            .success();
        assert!(
            std::fs::read(&x).unwrap() == std::fs::read(original).unwrap(),
            "{name}: extracted file differs from {}",
            original.display()
        );
    }
    let converted = d.join("std-converted.gguf");
    gguf_lora()
        .args([
            "convert",
            &s(&peft),
            "--base",
            &s(&base),
            "-o",
            &s(&converted),
        ])
        .assert()
        .success();
    let x = d.join("x-std.gguf");
    gguf_lora()
        .args(["bundle", "--extract", "std", &s(&bundle), "-o", &s(&x)])
        .assert()
        .success();
    assert!(std::fs::read(&x).unwrap() == std::fs::read(&converted).unwrap());

    // BUNDLE#NAME where an adapter is read: convert re-writes it exactly like the original file,
    // inspect --base matches it like the original.
    let via_name = d.join("via-name.gguf");
    let via_file = d.join("via-file.gguf");
    for (input, out) in [
        (format!("{}#emb", s(&bundle)), &via_name),
        (s(&embed), &via_file),
    ] {
        gguf_lora()
            .args(["convert", &input, "-o", &s(out)])
            .assert()
            .success();
    }
    assert!(std::fs::read(&via_name).unwrap() == std::fs::read(&via_file).unwrap());
    let inspect = |input: &str| {
        let out = gguf_lora()
            .args(["inspect", input, "--base", &s(&base), "--json"])
            .assert()
            .success();
        let mut v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
        v["adapter"] = serde_json::Value::Null;
        v
    };
    assert_eq!(
        inspect(&format!("{}#pat", s(&bundle))),
        inspect(&s(&patterns))
    );
    // merge with BUNDLE#NAME writes the same tensors as merge with the original file.
    let merged = |adapter: &str, out: &Path| {
        gguf_lora()
            .args(["merge", &s(&base), "--lora", adapter, "-o", &s(out)])
            .assert()
            .success();
        let f = gguf_lora::gguf::GgufFile::open(out).unwrap();
        f.tensors()
            .iter()
            .map(|t| (t.clone(), f.tensor_data(t).to_vec()))
            .collect::<Vec<_>>()
    };
    let by_name = merged(&format!("{}#std", s(&bundle)), &d.join("m1.gguf"));
    let by_file = merged(&s(&converted), &d.join("m2.gguf"));
    assert!(
        by_name == by_file,
        "merge of BUNDLE#std differs from merge of the converted file"
    );
    gguf_lora()
        .args([
            "bundle",
            "--extract",
            "nope",
            &s(&bundle),
            "-o",
            &s(&d.join("n.gguf")),
        ])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no adapter named 'nope'"));
    assert!(!d.join("n.gguf").exists());

    // inspect BUNDLE#NAME shows that adapter as its own file.
    let out = gguf_lora()
        .args(["inspect", &format!("{}#emb", s(&bundle)), "--json"])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(v["general_type"], "adapter");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 4);
    assert_eq!(v["tensors"][0]["name"], "output.weight.lora_a");

    // inspect on the bundle lists the adapters with their coverage.
    let out = gguf_lora()
        .args(["inspect", &s(&bundle), "--json"])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let listed = v["bundle"]["adapters"].as_array().unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[1]["name"], "emb");
    assert_eq!(listed[1]["scale"], 0.5);
    assert_eq!(
        listed[1]["targets"],
        serde_json::json!(["output.weight", "token_embd.weight"])
    );
    assert_eq!(listed[0]["layers"], serde_json::json!([0, 1]));
    let text = gguf_lora()
        .args(["inspect", &s(&bundle)])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&text.get_output().stdout).into_owned();
    assert!(text.contains("Named bundle: 4 adapter(s)"), "{text}");
}

/// Inputs that do not share an architecture or base shapes are refused: exit 1, a message naming
/// the files, nothing written (both modes); an input against the wrong --base likewise.
#[test]
fn mismatched_inputs_are_refused_and_nothing_is_written() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let llama = fixture("llama/adapters/standard/ref_convert.gguf");
    let qwen = make_lora(d, "qwen2", &[]);
    let out = d.join("out.gguf");
    for mode in ["concat", "named"] {
        gguf_lora()
            .args([
                "bundle",
                &s(&llama),
                &s(&qwen),
                "--mode",
                mode,
                "-o",
                &s(&out),
            ])
            .assert()
            .code(1)
            .stderr(predicates::str::contains("architecture 'qwen2'"))
            .stderr(predicates::str::contains("qwen2.gguf"));
        assert!(!out.exists());
    }
    // Same architecture, other base shapes.
    let other = make_lora(d, "shape", &[]);
    gguf_lora()
        .args(["bundle", &s(&llama), &s(&other), "-o", &s(&out)])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("different base shapes"))
        .stderr(predicates::str::contains("blk.0.attn_q.weight"));
    assert!(!out.exists());
    gguf_lora()
        .args([
            "bundle",
            &s(&qwen),
            "-o",
            &s(&out),
            "--base",
            &s(&fixture("llama/base-f32.gguf")),
        ])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("qwen2"));
    assert!(!out.exists());
    // What one GGUF LoRA cannot hold (DoRA magnitudes) is refused by concat, and by named (which
    // stores PEFT inputs as `convert` writes them).
    let base = fixture("llama/base-f32.gguf");
    for mode in ["concat", "named"] {
        gguf_lora()
            .args([
                "bundle",
                &s(&fixture("llama/adapters/dora")),
                &s(&llama),
                "--mode",
                mode,
            ])
            .args(["-o", &s(&out), "--base", &s(&base)])
            .assert()
            .code(1)
            .stderr(predicates::str::contains("DoRA"));
        assert!(!out.exists());
    }
    // Two inputs that would get the same name.
    gguf_lora()
        .args([
            "bundle",
            "--mode",
            "named",
            &s(&llama),
            &s(&fixture("llama/adapters/patterns/ref_convert.gguf")),
            "-o",
            &s(&out),
        ])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("NAME=PATH"));
    assert!(!out.exists());
}
