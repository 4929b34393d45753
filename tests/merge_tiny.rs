//! `gguf-lora merge` on the tiny fixture models (testdata/fixtures, made by transformers/llama.cpp) with
//! adapters written by gguf-py (testdata/merge/make_lora.py); results checked by gguf-py, numpy and
//! llama.cpp (testdata/merge/check_merge.py), never by our own reader alone.

mod common;

use std::path::{Path, PathBuf};

use common::{gguf_lora, interop, listing, repo_root, report_tensor};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    repo_root().join("testdata/fixtures").join(rel)
}

fn script(name: &str) -> PathBuf {
    repo_root().join("testdata/merge").join(name)
}

/// Writes a GGUF LoRA with gguf-py for `base`; returns its path.
fn make_lora(dir: &Path, name: &str, base: &Path, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut all = vec![base.to_str().unwrap(), out.to_str().unwrap()];
    all.extend_from_slice(args);
    interop().python(&script("make_lora.py"), &all);
    out
}

fn check(args: &[&str]) -> Value {
    let out = interop().python(&script("check_merge.py"), args);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// The F32 fixture `arch` quantized to Q4_0 by our `quantize` into `dir`.
fn q4_0_fixture(dir: &Path, arch: &str) -> PathBuf {
    let out = dir.join(format!("{arch}-q4_0.gguf"));
    gguf_lora()
        .args(["quantize", s(&fixture(&format!("{arch}/base-f32.gguf")))])
        .args(["-o", s(&out), "--type", "q4_0"])
        .assert()
        .success();
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn outtype_f32_equals_numpy_reference_for_two_adapters_with_different_tensor_sets() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("gemma3/base-f32.gguf");
    // One adapter on q, v, down and the token embeddings; one (F16 tensors) on q and up of layer 1 only.
    let a1 = make_lora(
        dir.path(),
        "a1.gguf",
        &base,
        &[
            "--rank",
            "4",
            "--alpha",
            "8",
            "--targets",
            "attn_q,attn_v,ffn_down",
            "--embd",
            "--seed",
            "1",
            "--b-std",
            "0.1",
        ],
    );
    let a2 = make_lora(
        dir.path(),
        "a2.gguf",
        &base,
        &[
            "--rank",
            "8",
            "--alpha",
            "4",
            "--targets",
            "attn_q,ffn_up",
            "--layers",
            "1",
            "--seed",
            "2",
            "--dtype",
            "f16",
            "--b-std",
            "0.1",
        ],
    );
    let out = dir.path().join("merged.gguf");
    let assert = gguf_lora()
        .args([
            "merge",
            s(&base),
            "--lora",
            s(&a1),
            "--lora-scaled",
            &format!("{}:-0.5", s(&a2)),
            "-o",
            s(&out),
            "--outtype",
            "f32",
            "--json",
        ])
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let r = check(&[
        "reference",
        s(&out),
        s(&base),
        &format!("{}:1", s(&a1)),
        &format!("{}:-0.5", s(&a2)),
    ]);
    assert!(r["worst_over_tolerance"].as_f64().unwrap() <= 1.0, "{r}");
    assert_eq!(r["untouched_equal"], true, "{r}");
    assert!(
        r["min_max_delta"].as_f64().unwrap() > 1e-4,
        "every touched tensor changed: {r}"
    );
    assert_eq!(
        r["touched"].as_u64().unwrap() as usize,
        report["summary"]["tensors_merged"].as_u64().unwrap() as usize
    );
    // blk.1.attn_q has both adapters, blk.1.ffn_up only the second.
    let t = |name: &str| report_tensor(&report, name);
    assert_eq!(t("blk.1.attn_q.weight")["ranks"], serde_json::json!([4, 8]));
    assert_eq!(
        t("blk.1.ffn_up.weight")["adapters"],
        serde_json::json!(["a2.gguf"])
    );
    assert_eq!(report["summary"]["scales"], serde_json::json!([1.0, -0.5]));
}

#[test]
fn llama_cpp_runs_the_f32_merge_like_the_runtime_lora() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    // llama has untied embeddings: llama.cpp aborts on a token_embd LoRA when they are tied (gemma3),
    // because the runtime applies it to the output head too.
    let base = fixture("llama/base-f32.gguf");
    let a = make_lora(
        dir.path(),
        "a.gguf",
        &base,
        &[
            "--rank", "4", "--alpha", "8", "--embd", "--seed", "3", "--b-std", "0.2",
        ],
    );
    let out = dir.path().join("merged.gguf");
    gguf_lora()
        .args([
            "merge",
            s(&base),
            "--lora-scaled",
            &format!("{}:0.7", s(&a)),
            "-o",
            s(&out),
            "--outtype",
            "f32",
        ])
        .assert()
        .success();
    let r = check(&["logits", s(&base), &format!("{}:0.7", s(&a)), s(&out)]);
    let merged = &r[s(&out)];
    eprintln!(
        "tiny gemma3, f32 merge vs runtime LoRA: {merged}; base vs runtime: {}",
        r["base"]
    );
    assert!(
        r["base"]["kl"].as_f64().unwrap() > 1e-3,
        "the adapter changes the output: {r}"
    );
    assert!(merged["kl"].as_f64().unwrap() < 1e-5, "{r}");
    assert!(merged["max_abs"].as_f64().unwrap() < 1e-2, "{r}");
    assert_eq!(merged["top1"].as_f64().unwrap(), 1.0, "{r}");
}

#[test]
fn metadata_is_the_base_s_with_provenance_and_no_adapter_keys() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("gemma3/base-f16.gguf");
    let a = make_lora(
        dir.path(),
        "a.gguf",
        &base,
        &["--rank", "4", "--targets", "attn_q"],
    );
    let out = dir.path().join("m.gguf");
    gguf_lora()
        .args([
            "merge",
            s(&base),
            "--lora-scaled",
            &format!("{}:0.5", s(&a)),
            "-o",
            s(&out),
        ])
        .assert()
        .success();
    let code = r#"
import json, sys
from gguf import GGUFReader
def kv(p):
    r = GGUFReader(p)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out[k] = v if not isinstance(v, float) else round(v, 6)
    return out, {t.name: t.tensor_type.name for t in r.tensors}
b, bt = kv(sys.argv[1]); m, mt = kv(sys.argv[2])
print(json.dumps({"base": b, "merged": m, "base_types": bt, "merged_types": mt}))
"#;
    let v: Value =
        serde_json::from_str(interop().python_code(code, &[s(&base), s(&out)]).trim()).unwrap();
    let (b, m) = (
        v["base"].as_object().unwrap(),
        v["merged"].as_object().unwrap(),
    );
    for (k, val) in b {
        assert_eq!(&m[k], val, "key {k} kept");
    }
    assert!(!m.keys().any(|k| k.starts_with("adapter.")));
    assert_eq!(
        m["general.type"],
        b.get("general.type")
            .cloned()
            .unwrap_or(Value::Null)
            .as_str()
            .map_or(Value::Null, |_| b["general.type"].clone())
    );
    assert_eq!(m["gguf_lora.merge.adapters"], serde_json::json!(["a.gguf"]));
    assert_eq!(m["gguf_lora.merge.scales"], serde_json::json!([0.5]));
    assert_eq!(m["gguf_lora.merge.outtype"], "keep");
    assert!(m.contains_key("gguf_lora.version"));
    // keep: every tensor in its base type.
    assert_eq!(v["base_types"], v["merged_types"]);
}

#[test]
fn refusals_exit_1_name_every_offending_tensor_and_write_nothing() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("gemma3/base-f32.gguf");
    let good = make_lora(
        dir.path(),
        "good.gguf",
        &base,
        &["--rank", "4", "--targets", "attn_q"],
    );
    let missing = make_lora(
        dir.path(),
        "missing.gguf",
        &base,
        &[
            "--rank",
            "4",
            "--targets",
            "attn_q",
            "--bogus",
            "blk.99.attn_q.weight:64:64",
            "--bogus",
            "blk.98.ffn_up.weight:64:64",
        ],
    );
    let other_arch = make_lora(
        dir.path(),
        "arch.gguf",
        &base,
        &["--rank", "4", "--targets", "attn_q", "--arch", "llama"],
    );
    let wrong_shape = make_lora(
        dir.path(),
        "shape.gguf",
        &base,
        &[
            "--rank",
            "4",
            "--targets",
            "attn_q",
            "--bogus",
            "blk.0.ffn_up.weight:48:128",
            "--bogus",
            "blk.1.ffn_down.weight:128:48",
        ],
    );
    // A quantized copy of the base too: there the default merge calibrates, and must refuse first.
    let q8_dir = tempfile::tempdir().unwrap();
    let q8 = q8_dir.path().join("base-q8_0.gguf");
    gguf_lora()
        .args(["quantize", s(&base), "-o", s(&q8), "--type", "q8_0"])
        .assert()
        .success();
    let before = listing(dir.path());
    let out = dir.path().join("out.gguf");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--lora".into(), s(&missing).into()],
            vec![
                "blk.99.attn_q.weight",
                "blk.98.ffn_up.weight",
                "does not exist in the base",
            ],
        ),
        (
            vec!["--lora".into(), s(&other_arch).into()],
            vec!["architecture 'llama'", "'gemma3'"],
        ),
        (
            vec!["--lora".into(), s(&wrong_shape).into()],
            vec!["blk.0.ffn_up.weight", "blk.1.ffn_down.weight", "expected"],
        ),
        // Both problems of both adapters in one message.
        (
            vec![
                "--lora".into(),
                format!("{},{}", s(&missing), s(&other_arch)),
            ],
            vec!["blk.99.attn_q.weight", "architecture 'llama'"],
        ),
        // gemma3 ties its output head to token_embd: there is no output.weight to retype.
        (
            vec![
                "--lora".into(),
                s(&good).into(),
                "--output-tensor-type".into(),
                "q8_0".into(),
            ],
            vec![
                "cannot give 'output.weight' its own type",
                "ties its output head to token_embd.weight",
            ],
        ),
    ];
    for ((args, needles), base) in cases.iter().flat_map(|c| [(c, &base), (c, &q8)]) {
        let a = gguf_lora()
            .arg("merge")
            .arg(base)
            .args(args)
            .args(["-o", s(&out)])
            .assert()
            .code(1);
        let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
        assert_eq!(listing(dir.path()), before, "nothing written for {args:?}");
    }
    // The output may not be an input: neither the base nor an adapter.
    let base_copy = dir.path().join("base.gguf");
    std::fs::copy(&base, &base_copy).unwrap();
    let original = std::fs::read(&base_copy).unwrap();
    gguf_lora()
        .args([
            "merge",
            s(&base_copy),
            "--lora",
            s(&good),
            "-o",
            s(&base_copy),
        ])
        .assert()
        .code(1);
    gguf_lora()
        .args(["merge", s(&base_copy), "--lora", s(&good), "-o", s(&good)])
        .assert()
        .code(1);
    assert_eq!(std::fs::read(&base_copy).unwrap(), original);
    // A base that is not a GGUF, an adapter that is a model: clear errors, exit 1; a bad type: exit 2.
    let a = gguf_lora()
        .args(["merge", s(&good), "--lora", s(&good), "-o", s(&out)])
        .assert()
        .code(1);
    assert!(
        String::from_utf8_lossy(&a.get_output().stderr).contains("cannot merge") || !out.exists()
    );
    let a = gguf_lora()
        .args(["merge", s(&base), "--lora", s(&base), "-o", s(&out)])
        .assert()
        .code(1);
    assert!(String::from_utf8_lossy(&a.get_output().stderr).contains("expected \"adapter\""));
    gguf_lora()
        .args([
            "merge",
            s(&base),
            "--lora",
            s(&good),
            "-o",
            s(&out),
            "--outtype",
            "q7_k",
        ])
        .assert()
        // An unknown type is a usage error (issue 12: exit 2, as the contract says).
        .code(2);
    gguf_lora()
        .args(["merge", s(&base), "--lora", s(&good), "-o", s(&out)])
        .args(["--token-embedding-type", "q4_k_m"])
        .assert()
        .code(2);
    assert!(!out.exists());
}

#[test]
fn split_base_gives_split_output_with_the_same_layout_or_one_file() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("gemma3/base-f32.gguf");
    let prefix = dir.path().join("base");
    let st = std::process::Command::new(interop().tools.join("llama-gguf-split"))
        .args(["--split", "--split-max-tensors", "30", s(&base), s(&prefix)])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let shard1 = dir.path().join("base-00001-of-00003.gguf");
    assert!(shard1.exists());
    let a = make_lora(dir.path(), "a.gguf", &base, &["--rank", "4", "--seed", "5"]);
    let out = dir.path().join("merged.gguf");
    gguf_lora()
        .args(["merge", s(&shard1), "--lora", s(&a), "-o", s(&out)])
        .assert()
        .success();
    let one = dir.path().join("one.gguf");
    gguf_lora()
        .args([
            "merge",
            s(&shard1),
            "--lora",
            s(&a),
            "-o",
            s(&one),
            "--no-split",
        ])
        .assert()
        .success();
    let direct = dir.path().join("direct.gguf");
    gguf_lora()
        .args(["merge", s(&base), "--lora", s(&a), "-o", s(&direct)])
        .assert()
        .success();
    let code = r#"
import json, sys
from gguf import GGUFReader
out = []
for p in sys.argv[1:]:
    r = GGUFReader(p)
    split = {k: int(r.fields[k].contents()) for k in ("split.no", "split.count", "split.tensors.count") if k in r.fields}
    out.append({"tensors": [t.name for t in r.tensors], "split": split,
                "data": {t.name: t.data.tobytes().hex() for t in r.tensors}})
print(json.dumps(out))
"#;
    let files: Vec<PathBuf> = (1..=3)
        .map(|k| dir.path().join(format!("base-{k:05}-of-00003.gguf")))
        .chain((1..=3).map(|k| dir.path().join(format!("merged-{k:05}-of-00003.gguf"))))
        .chain([one.clone(), direct.clone()])
        .collect();
    let args: Vec<&str> = files.iter().map(|p| s(p)).collect();
    let v: Value = serde_json::from_str(interop().python_code(code, &args).trim()).unwrap();
    let v = v.as_array().unwrap();
    for k in 0..3 {
        assert_eq!(
            v[k]["tensors"],
            v[3 + k]["tensors"],
            "shard {k} holds the same tensors"
        );
        assert_eq!(v[3 + k]["split"]["split.no"], k);
        assert_eq!(v[3 + k]["split"]["split.count"], 3);
    }
    assert_eq!(
        v[6]["split"],
        serde_json::json!({}),
        "--no-split writes no split keys"
    );
    // Same bytes whichever way the base was read or the output written.
    let mut joined = serde_json::Map::new();
    for shard in &v[3..6] {
        joined.extend(shard["data"].as_object().unwrap().clone());
    }
    assert_eq!(Value::Object(joined), v[6]["data"]);
    assert_eq!(v[6]["data"], v[7]["data"]);
}

#[test]
fn peft_directories_merge_like_peft_merge_and_unload() {
    require_interop!();
    // DoRA (llama q/k rows RoPE-permuted, magnitudes too), modules_to_save (lm_head replaced) and
    // lora_B biases (qwen2's q/k/v biases): PEFT's own merge, converted by convert_hf_to_gguf.py, is
    // the reference; the PEFT directory goes straight to merge.
    let dir = tempfile::tempdir().unwrap();
    for (arch, name) in [
        ("llama", "dora"),
        ("llama", "modules_to_save"),
        ("qwen2", "lora_bias"),
    ] {
        let base = fixture(&format!("{arch}/base-f32.gguf"));
        let adapter = fixture(&format!("{arch}/adapters/{name}"));
        let reference = adapter.join("merged-f32.gguf");
        let out = dir.path().join(format!("{arch}-{name}.gguf"));
        let a = gguf_lora()
            .args([
                "merge",
                s(&base),
                "--lora",
                s(&adapter),
                "-o",
                s(&out),
                "--json",
            ])
            .assert()
            .success();
        let report: Value = serde_json::from_slice(&a.get_output().stdout).unwrap();
        let r = check(&["same", s(&out), s(&reference)]);
        let before = check(&["same", s(&base), s(&reference)]);
        eprintln!("{arch}/{name}: ours vs PEFT merge {r}; base vs PEFT merge {before}");
        assert_eq!(r["names_equal"], true, "{arch}/{name}: {r}");
        assert!(
            r["worst_rel"].as_f64().unwrap() < 1e-5,
            "{arch}/{name}: {r}"
        );
        assert!(
            before["worst_rel"].as_f64().unwrap() > 0.05,
            "{arch}/{name}: the merge changes something: {before}"
        );
        if name == "dora" {
            assert!(report["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["dora"] == true));
        }
    }
}

/// A base the calibration pass cannot run (here a llama whose RoPE scaling type verify does not
/// know) still merges by default: rounded to nearest, the same tensors as `--requant nearest`
/// (read by gguf-py), with a warning and provenance that say why. Asking for calibration on it
/// explicitly is an error that writes nothing.
#[test]
fn bases_the_forward_pass_cannot_run_merge_by_default_rounded_to_nearest_and_say_why() {
    use gguf_lora::gguf::{GgufModel, GgufWriter, TensorDesc, Value as Meta};
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let quantized = q4_0_fixture(dir.path(), "llama");
    let base = dir.path().join("unrunnable.gguf");
    {
        let model = GgufModel::open(&quantized).unwrap();
        let shard = &model.shards()[0];
        let mut meta = shard.metadata().clone();
        meta.set("llama.rope.scaling.type", Meta::String("unheard-of".into()));
        let descs: Vec<TensorDesc> = shard.tensors().iter().map(TensorDesc::from).collect();
        let mut w =
            GgufWriter::create(&base, &[&quantized], 3, shard.alignment(), &meta, &descs).unwrap();
        for t in shard.tensors() {
            w.write_tensor(shard.tensor_data(t)).unwrap();
        }
        w.finish().unwrap();
    }
    let lora = fixture("llama/adapters/standard/ref_convert.gguf");
    let merge = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let assert = gguf_lora()
            .args(["merge", s(&base), "--lora", s(&lora), "-o", s(&out)])
            .args(extra)
            .assert();
        (out, assert)
    };
    let (default, assert) = merge("default.gguf", &[]);
    let output = assert.success().get_output().clone();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning: the merge cannot calibrate on this base")
            && stderr.contains("rope scaling type unheard-of"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("requantization: nearest (the default could not calibrate"),
        "{stdout}"
    );
    let (nearest, assert) = merge("nearest.gguf", &["--requant", "nearest"]);
    assert.success();
    let code = r#"
import json, sys
import numpy as np
from gguf import GGUFReader
a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
same = sorted(ta) == sorted(tb) and all(
    ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in ta)
print(json.dumps({"same": same, "q4_0": sum(t.tensor_type.name == "Q4_0" for t in a.tensors),
    "requant": a.fields["gguf_lora.merge.requant"].contents()}))
"#;
    let v: Value = serde_json::from_str(
        interop()
            .python_code(code, &[s(&default), s(&nearest)])
            .trim(),
    )
    .unwrap();
    assert_eq!(v["same"], true, "{v}");
    assert!(v["q4_0"].as_u64().unwrap() > 0, "{v}");
    let requant = v["requant"].as_str().unwrap();
    assert!(
        requant.starts_with("nearest (the default could not calibrate: ")
            && requant.contains("unheard-of"),
        "{requant}"
    );
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "a calibration text").unwrap();
    let (asked, assert) = merge("asked.gguf", &["--calibrate", s(&text)]);
    let output = assert.code(1).get_output().clone();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // One line, the cause said once (it was printed twice, as message and as source).
    assert_eq!(stderr.matches("calibration:").count(), 1, "{stderr}");
    assert!(stderr.contains("unheard-of"), "{stderr}");
    assert_eq!(stderr.matches("verify").count(), 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!asked.exists());
}

/// An MoE base calibrates like any other: the forward pass routes each calibration token to its
/// experts, and each expert's rows of the stacked `ffn_*_exps` are requantized with the statistics
/// of the tokens routed to it. The qwen2moe fixture (4 experts, a shared expert) in Q4_0 with its
/// adapter on every attention, expert and shared-expert projection, at a scale that makes its change
/// a fraction of a Q4_0 step (as a trained adapter's is): judged by llama.cpp on tokens the
/// calibration did not see, the default merge is closer to the runtime LoRA than rounding to
/// nearest, and the report measures every expert tensor in output space, keeping more than rounding.
#[test]
fn moe_bases_calibrate_per_expert_and_keep_more_of_the_adapter_than_rounding() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = q4_0_fixture(dir.path(), "qwen2moe");
    let lora = fixture("qwen2moe/adapters/standard/ref_convert.gguf");
    let scaled = format!("{}:0.1", s(&lora));
    let merge = |name: &str, extra: &[&str]| -> (PathBuf, Value) {
        let out = dir.path().join(name);
        let assert = gguf_lora()
            .args([
                "merge",
                s(&base),
                "--lora-scaled",
                &scaled,
                "-o",
                s(&out),
                "--json",
            ])
            .args(extra)
            .assert()
            .success();
        let report = serde_json::from_slice(&assert.get_output().stdout).unwrap();
        (out, report)
    };
    let (default, report) = merge("default.gguf", &[]);
    let (nearest, _) = merge("nearest.gguf", &["--requant", "nearest"]);
    let tensors = report["tensors"].as_array().unwrap();
    let experts: Vec<&Value> = tensors
        .iter()
        .filter(|t| t["name"].as_str().unwrap().ends_with("_exps.weight"))
        .collect();
    assert_eq!(experts.len(), 6, "gate/up/down experts of 2 layers");
    for t in &experts {
        let kept = t["share_kept"].as_f64().unwrap();
        let nearest_kept = t["nearest"]["share_kept"].as_f64().unwrap();
        eprintln!("{}: kept {kept:.3}, nearest {nearest_kept:.3}", t["name"]);
        assert_eq!(t["measured_in"], "outputs", "{t}");
        assert!(kept > nearest_kept + 0.04, "{t}");
    }
    // llama.cpp: the runtime LoRA and both merges on 64 tokens unlike the calibration's.
    let tokens: Vec<String> = (0..64).map(|i| ((i * 37 + 11) % 256).to_string()).collect();
    let tokens = tokens.join(",");
    let logits = |model: &Path, lora: Option<&str>, name: &str| -> PathBuf {
        let out = dir.path().join(name);
        let mut args = vec![s(model), "--tokens", &tokens, "--out", s(&out)];
        if let Some(l) = lora {
            args.extend(["--lora", l]);
        }
        interop().python(&repo_root().join("testdata/tools/llama_logits.py"), &args);
        out
    };
    let runtime = logits(&base, Some(&scaled), "runtime.npy");
    let of_default = logits(&default, None, "default.npy");
    let of_nearest = logits(&nearest, None, "nearest.npy");
    let of_base = logits(&base, None, "base.npy");
    let code = r#"
import json, sys
import numpy as np
def log_softmax(x):
    x = x.astype(np.float64); x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
r = log_softmax(np.load(sys.argv[1]))
kl = lambda p: float((np.exp(r) * (r - log_softmax(np.load(p)))).sum(-1).mean())
print(json.dumps({"default": kl(sys.argv[2]), "nearest": kl(sys.argv[3]), "base": kl(sys.argv[4])}))
"#;
    let kl: Value = serde_json::from_str(
        interop()
            .python_code(
                code,
                &[s(&runtime), s(&of_default), s(&of_nearest), s(&of_base)],
            )
            .trim(),
    )
    .unwrap();
    eprintln!("KL to the runtime LoRA (llama.cpp): {kl}");
    let (d, n, b) = (
        kl["default"].as_f64().unwrap(),
        kl["nearest"].as_f64().unwrap(),
        kl["base"].as_f64().unwrap(),
    );
    assert!(b > 0.01, "the adapter changes the model: {kl}");
    assert!(d < 0.85 * n, "{kl}");
}
