//! `gguf-lora convert` through the binary, against fixtures made by PEFT and llama.cpp's own
//! `convert_lora_to_gguf.py` (testdata/fixtures, see its manifest.json): tensor-for-tensor equality
//! where the reference converter is right, PyTorch's logits through llama.cpp where it is wrong
//! (rsLoRA, alpha_pattern), gguf-py's encodings for f16/bf16/q8_0, and every refusal.

mod common;

use std::path::{Path, PathBuf};

use gguf_lora::gguf::{GgufFile, Value};
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    common::repo_root().join("testdata/fixtures")
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// (arch, adapter name, entry) for every adapter of every fixture.
fn adapters() -> Vec<(String, String, Json)> {
    let m = manifest();
    let mut out = Vec::new();
    for (arch, f) in m["fixtures"].as_object().unwrap() {
        for (name, a) in f["adapters"].as_object().unwrap() {
            out.push((arch.clone(), name.clone(), a.clone()));
        }
    }
    out
}

fn convert(arch: &str, adapter: &str, out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    let d = fixtures().join(arch);
    common::gguf_lora()
        .arg("convert")
        .arg(d.join("adapters").join(adapter))
        .arg("-o")
        .arg(out)
        .args(extra)
        .assert()
}

fn base_args(arch: &str) -> Vec<String> {
    vec![
        "--base".into(),
        fixtures()
            .join(arch)
            .join("base-f32.gguf")
            .display()
            .to_string(),
    ]
}

fn str_args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Names, shapes, types, bytes and the loader-relevant metadata of two GGUF adapters are equal.
fn assert_same_adapter(ours: &Path, reference: &Path) {
    let a = GgufFile::open(ours).unwrap();
    let b = GgufFile::open(reference).unwrap();
    for key in [
        "general.architecture",
        "general.type",
        "adapter.type",
        "adapter.lora.alpha",
    ] {
        assert_eq!(
            a.metadata().get(key),
            b.metadata().get(key),
            "{key} of {}",
            ours.display()
        );
    }
    assert!(matches!(
        a.metadata().get("adapter.lora.alpha"),
        Some(Value::F32(_))
    ));
    let mut names_a: Vec<&str> = a.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut names_b: Vec<&str> = b.tensors().iter().map(|t| t.name.as_str()).collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "tensor names of {}", ours.display());
    for tb in b.tensors() {
        let ta = a.tensor(&tb.name).unwrap();
        assert_eq!((&ta.dims, ta.ty), (&tb.dims, tb.ty), "{}", tb.name);
        assert!(
            a.tensor_data(ta) == b.tensor_data(tb),
            "{}: data differs from the reference converter's",
            tb.name
        );
    }
}

#[test]
fn equals_the_reference_converter_where_it_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (arch, name, entry) in adapters() {
        let rc = &entry["ref_convert"];
        if rc["ok"] != Json::Bool(true) || rc["correct"] != Json::Bool(true) {
            continue;
        }
        let out = dir.path().join(format!("{arch}-{name}.gguf"));
        convert(&arch, &name, &out, &str_args(&base_args(&arch))).success();
        let reference = fixtures()
            .join(&arch)
            .join("adapters")
            .join(&name)
            .join("ref_convert.gguf");
        assert_same_adapter(&out, &reference);
        checked += 1;
    }
    // llama: standard, named, rank_pattern, embed_lm_head, alora, standard_bf16, standard_f16; one
    // standard per other architecture.
    assert!(checked >= 14, "only {checked} reference adapters compared");
}

#[test]
fn named_adapter_keys_convert_like_the_plain_ones() {
    // `named_in_keys` holds the `named` weights under `lora_A.my_adapter.weight` keys, which the
    // reference converter rejects; we read them and must give the same file as its `named` output.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("n.gguf");
    convert(
        "llama",
        "named_in_keys",
        &out,
        &str_args(&base_args("llama")),
    )
    .success();
    assert_same_adapter(
        &out,
        &fixtures().join("llama/adapters/named/ref_convert.gguf"),
    );
}

/// Logits of llama.cpp (llama-cpp-python) with each converted adapter, against PyTorch + PEFT, through
/// the fixtures' own chain check (an aLoRA is switched on at its invocation sequence, as PEFT does).
const LOGITS_CHECK: &str = r#"
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[2])
import chain_check
cases = json.loads(sys.argv[1])
worst = {}
for c in cases:
    tokens, inv, at = c["tokens"], c.get("alora"), 0
    if inv:
        at = next(i for i in range(len(tokens)) if tokens[i:i + len(inv)] == inv)
    ours = chain_check.llama_logits(Path(c["base"]), tokens, [(Path(c["lora"]), 1.0)], at)
    ref = np.load(c["logits"])
    worst[c["name"]] = float(np.abs(ours - ref).max() / np.abs(ref).max())
print(json.dumps(worst))
"#;

fn logits_check(cases: &Json) -> serde_json::Map<String, Json> {
    let out = common::interop().python_code(
        LOGITS_CHECK,
        &[&cases.to_string(), fixtures().to_str().unwrap()],
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn llama_cpp_with_our_adapters_gives_pytorch_logits() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for (arch, name, entry) in adapters() {
        if entry["ref_convert"]["ok"] != Json::Bool(true) && name != "named_in_keys" {
            continue; // DoRA, modules_to_save, lora_bias: refused (tested below)
        }
        if name == "lm_head_tied" {
            continue; // lm_head LoRA on a tied base: refused (tested below)
        }
        let d = fixtures().join(&arch);
        let out = dir.path().join(format!("{arch}-{name}.gguf"));
        convert(&arch, &name, &out, &str_args(&base_args(&arch))).success();
        let tokens: Json =
            serde_json::from_str(&std::fs::read_to_string(d.join("tokens.json")).unwrap()).unwrap();
        cases.push(serde_json::json!({
            "name": format!("{arch}/{name}"),
            "base": d.join("base-f32.gguf"),
            "lora": out,
            "tokens": tokens["tokens"],
            "logits": d.join("adapters").join(&name).join("logits_peft.npy"),
            "alora": entry["alora_invocation_tokens"],
        }));
    }
    let worst = logits_check(&Json::Array(cases));
    for must in [
        "llama/rslora",
        "llama/patterns",
        "llama/alpha_pattern",
        "llama/alora",
    ] {
        assert!(worst.contains_key(must), "{must} not checked");
    }
    for (name, rel) in &worst {
        let rel = rel.as_f64().unwrap();
        // The chain check's F32 tolerance; the reference converter's rsLoRA/pattern files are at 0.8-1.3.
        assert!(rel < 1e-3, "{name}: max |Δlogit| / max |logit| = {rel}");
    }
}

/// gguf-py's encoding of the reference converter's f32 tensors, in the type our file declares.
const ENCODINGS_CHECK: &str = r#"
import sys
import numpy as np
import gguf
from gguf import GGUFReader, GGMLQuantizationType as T
ours, ref = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
r = {t.name: t for t in ref.tensors}
bad = []
for t in ours.tensors:
    data = np.array(r[t.name].data, dtype=np.float32)
    want = gguf.quants.quantize(data, t.tensor_type)
    if want.tobytes() != np.array(t.data).tobytes():
        bad.append(t.name)
print("types", sorted({t.tensor_type.name for t in ours.tensors}))
print("bad", bad)
"#;

#[test]
fn outtypes_encode_like_gguf_py_with_the_q8_0_fallback() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let reference = fixtures().join("llama/adapters/standard/ref_convert.gguf");
    for (outtype, types) in [
        ("f16", "['F16']"),
        ("bf16", "['BF16']"),
        // lora_a rows are 64 or 128 long (Q8_0); lora_b rows are rank 8 long (F16 fallback).
        ("q8_0", "['F16', 'Q8_0']"),
    ] {
        let out = dir.path().join(format!("{outtype}.gguf"));
        let mut args = base_args("llama");
        args.extend(["--outtype".into(), outtype.into()]);
        convert("llama", "standard", &out, &str_args(&args)).success();
        let report = common::interop().python_code(
            ENCODINGS_CHECK,
            &[out.to_str().unwrap(), reference.to_str().unwrap()],
        );
        assert!(
            report.contains(&format!("types {types}")),
            "{outtype}: {report}"
        );
        assert!(report.contains("bad []"), "{outtype}: {report}");
    }
}

fn assert_refused(arch: &str, adapter: &str, extra: &[&str], want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let assert = convert(arch, adapter, &out, extra).code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    for w in want {
        assert!(
            stderr.contains(w),
            "{arch}/{adapter}: {w:?} not in:\n{stderr}"
        );
    }
    assert!(
        !out.exists(),
        "{arch}/{adapter}: output written despite the error"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary files left"
    );
}

#[test]
fn refusals_exit_1_list_the_tensors_and_write_nothing() {
    let base = base_args("llama");
    let base = str_args(&base);
    assert_refused(
        "llama",
        "dora",
        &base,
        &[
            "lora_magnitude_vector",
            "model.layers.1.mlp.up_proj",
            "gguf-lora merge",
        ],
    );
    assert_refused(
        "llama",
        "modules_to_save",
        &base,
        &["base_model.model.lm_head.weight", "gguf-lora merge"],
    );
    let qbase = base_args("qwen2");
    assert_refused(
        "qwen2",
        "lora_bias",
        &str_args(&qbase),
        &[
            "lora_B.bias",
            "model.layers.0.self_attn.q_proj",
            "gguf-lora merge",
        ],
    );
    // A llama adapter against a phi3 base (fused gate/up in ffn_up, no ffn_gate): listed, not written.
    let pbase = base_args("phi3");
    assert_refused(
        "llama",
        "standard",
        &str_args(&pbase),
        &["do not fit", "blk.1.ffn_gate.weight", "ne = [64, 256]"],
    );
    // No base and no architecture.
    assert_refused("llama", "standard", &[], &["--base"]);
    // llama q/k need the head counts of a base.
    assert_refused(
        "llama",
        "standard",
        &["--arch", "llama"],
        &["attn_q", "--base"],
    );
    // An architecture we do not know is a usage error (exit 2), said before anything is read.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let assert = convert("llama", "standard", &out, &["--arch", "gpt2"]).code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("unknown architecture 'gpt2'"), "{stderr}");
    assert!(!out.exists(), "output written despite the usage error");
}

#[test]
fn lm_head_on_a_tied_base_is_refused() {
    // qwen2's fixture ties its embeddings: its GGUF has no output.weight. The llama embed_lm_head
    // adapter targets lm_head; against a base without output.weight it must say why.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let qbase = base_args("qwen2");
    let assert = convert("llama", "embed_lm_head", &out, &str_args(&qbase)).code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("ties its output to token_embd"), "{stderr}");
    assert!(!out.exists());
    // The qwen2 fixture trained with lm_head on its own tied model: the reference converter writes a
    // file llama.cpp refuses to load (manifest: llama_cpp_load_failed); we refuse up front.
    let assert = convert("qwen2", "lm_head_tied", &out, &str_args(&qbase)).code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("lm_head → output.weight"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn non_finite_values_abort_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters/standard");
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    // Overwrite the last f32 of the file (the data of the last tensor) with NaN.
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(bad.join("adapter_model.safetensors"), bytes).unwrap();
    let out = dir.path().join("out.gguf");
    let assert = common::gguf_lora()
        .arg("convert")
        .arg(&bad)
        .arg("-o")
        .arg(&out)
        .args(str_args(&base_args("llama")))
        .assert()
        .code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(
        stderr.contains("not finite") && stderr.contains("adapter_model.safetensors"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn arch_only_conversion_matches_the_base_checked_one() {
    // qwen2 does not permute q/k, so --arch alone gives the same file as --base.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    convert("qwen2", "standard", &a, &["--arch", "qwen2"]).success();
    convert("qwen2", "standard", &b, &str_args(&base_args("qwen2"))).success();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn json_output_is_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.gguf");
    let mut args = base_args("llama");
    args.push("--json".into());
    let assert = convert("llama", "patterns", &out, &str_args(&args)).success();
    let v: Json = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    assert_eq!(v["written"]["alpha"], 16.0);
    // alpha_pattern v_proj = 32 and layer-0 o_proj = 8: folded into B.
    let folded = v["written"]["folded"].as_array().unwrap();
    assert!(folded
        .iter()
        .any(|f| f[0] == "blk.0.attn_v.weight" && f[1] == 2.0));
    assert!(folded
        .iter()
        .any(|f| f[0] == "blk.0.attn_output.weight" && f[1] == 0.5));
}

#[test]
fn output_may_not_be_an_input() {
    let weights = fixtures().join("llama/adapters/standard/adapter_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    common::gguf_lora()
        .arg("convert")
        .arg(fixtures().join("llama/adapters/standard"))
        .arg("-o")
        .arg(&weights)
        .args(str_args(&base_args("llama")))
        .assert()
        .code(1);
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

#[test]
fn a_gguf_adapter_converts_to_itself_and_can_be_retyped() {
    // GGUF in, GGUF out: the reference converter's files (with token_embd's transposed lora_a, and
    // the rsLoRA file's odd alpha) come back tensor for tensor.
    let dir = tempfile::tempdir().unwrap();
    for name in ["embed_lm_head", "standard", "rslora"] {
        let input = fixtures()
            .join("llama/adapters")
            .join(name)
            .join("ref_convert.gguf");
        let out = dir.path().join(format!("{name}.gguf"));
        common::gguf_lora()
            .arg("convert")
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .args(str_args(&base_args("llama")))
            .assert()
            .success();
        assert_same_adapter(&out, &input);
    }
    // Another architecture's base is refused.
    let out = dir.path().join("x.gguf");
    common::gguf_lora()
        .arg("convert")
        .arg(fixtures().join("llama/adapters/standard/ref_convert.gguf"))
        .arg("-o")
        .arg(&out)
        .args(str_args(&base_args("qwen2")))
        .assert()
        .code(1);
    assert!(!out.exists());
}

#[test]
fn moe_experts_stack_like_the_reference_and_give_pytorch_logits() {
    require_interop!();
    // testdata/fixtures/qwen2moe and mixtral (make_moe_fixture.py): 4 experts per layer (qwen2moe
    // with a shared expert; Mixtral's w1/w2/w3 under block_sparse_moe, a llama-architecture GGUF),
    // all adapted; llama.cpp's converters stack the experts into ffn_*_exps.
    let dir = tempfile::tempdir().unwrap();
    for (arch, listed) in [
        (
            "qwen2moe",
            "model.layers.1.mlp.experts.*.down_proj (4 experts)",
        ),
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.*.w2 (4 experts)",
        ),
    ] {
        let out = dir.path().join(format!("{arch}.gguf"));
        let d = fixtures().join(arch);
        let assert = convert(arch, "standard", &out, &str_args(&base_args(arch))).success();
        let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
        assert!(stdout.contains(listed), "{arch}: {stdout}");
        assert_same_adapter(&out, &d.join("adapters/standard/ref_convert.gguf"));
        let tokens: Json =
            serde_json::from_str(&std::fs::read_to_string(d.join("tokens.json")).unwrap()).unwrap();
        let name = format!("{arch}/standard");
        let cases = serde_json::json!([{
            "name": name,
            "base": d.join("base-f32.gguf"),
            "lora": out,
            "tokens": tokens["tokens"],
            "logits": d.join("adapters/standard/logits_peft.npy"),
        }]);
        let worst = logits_check(&cases);
        let rel = worst[&name].as_f64().unwrap();
        eprintln!("{name}: converted adapter in llama.cpp vs PyTorch+PEFT: {rel:.3e}");
        assert!(rel < 1e-3, "{arch}: max |Δlogit| / max |logit| = {rel}");
    }
}

#[test]
fn alora_invocation_tokens_are_written_and_text_only_invocations_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("qwen2/adapters/standard");
    let with_config = |name: &str, extra: serde_json::Value| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let mut cfg: Json = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            d.join("adapter_model.safetensors"),
        )
        .unwrap();
        d
    };
    let tokens = with_config(
        "tokens",
        serde_json::json!({"alora_invocation_tokens": [5, 17, 200]}),
    );
    let out = dir.path().join("a.gguf");
    common::gguf_lora()
        .arg("convert")
        .arg(&tokens)
        .arg("-o")
        .arg(&out)
        .args(str_args(&base_args("qwen2")))
        .assert()
        .success();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(
        f.metadata().get("adapter.alora.invocation_tokens"),
        Some(&Value::Array(gguf_lora::gguf::Array::U32(vec![5, 17, 200])))
    );

    let text = with_config(
        "text",
        serde_json::json!({"invocation_string": "<|start_of_role|>assistant"}),
    );
    let out = dir.path().join("b.gguf");
    let assert = common::gguf_lora()
        .arg("convert")
        .arg(&text)
        .arg("-o")
        .arg(&out)
        .args(str_args(&base_args("qwen2")))
        .assert()
        .code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("alora_invocation_tokens"), "{stderr}");
    assert!(!out.exists());
}

/// A copy of qwen3moe's `target_parameters` adapter (PEFT LoRA on transformers 5's fused expert
/// weights) with the tensors in `reshape` given new shapes (zero-filled).
fn reshaped_target_parameters(dir: &Path, reshape: &[(&str, Vec<usize>)]) -> PathBuf {
    use safetensors::tensor::TensorView;
    let src = fixtures().join("qwen3moe/adapters/target_parameters");
    let out = dir.join("target_parameters");
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let shape = reshape
            .iter()
            .find(|(n, _)| name.ends_with(n))
            .map(|(_, s)| s.clone());
        let data = match &shape {
            Some(s) => vec![0u8; s.iter().product::<usize>() * 4],
            None => view.data().to_vec(),
        };
        tensors.push((name, shape.unwrap_or(view.shape().to_vec()), data));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap();
            (n.clone(), v)
        })
        .collect();
    let written = safetensors::serialize(views, &None).unwrap();
    std::fs::write(out.join("adapter_model.safetensors"), written).unwrap();
    out
}

#[test]
fn target_parameters_that_do_not_fit_the_experts_are_one_line_and_exit_1() {
    let base = fixtures().join("qwen3moe/base-f32.gguf");
    let layer1 = "layers.1.mlp.experts";
    // (what, tensors given new shapes, what the message says with --base)
    type Case<'a> = (&'a str, Vec<(String, Vec<usize>)>, &'a [&'a str]);
    let cases: [Case; 3] = [
        // 15 rows (and lora_B columns): not 4 experts × r = 4.
        (
            "rows",
            vec![
                (format!("{layer1}.lora_A.weight"), vec![15, 32]),
                (format!("{layer1}.lora_B.weight"), vec![64, 15]),
            ],
            &["has 15 rows; expected 4 experts × r = 4 (down_proj)"],
        ),
        // down_proj's lora_A reads 30 inputs: neither the expert width 32 nor the hidden size 64.
        (
            "in-dim",
            vec![(format!("{layer1}.lora_A.weight"), vec![16, 30])],
            &[
                "has 30 columns; down_proj needs 32",
                "blk.1.ffn_down_exps.weight",
            ],
        ),
        // gate_up_proj's lora_B with 48 rows: not gate + up (2 × 32).
        (
            "out-dim",
            vec![(format!("{layer1}.base_layer.lora_B.weight"), vec![48, 16])],
            &["has 48 rows; gate_up_proj needs 64"],
        ),
    ];
    for (what, reshape, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let reshape: Vec<(&str, Vec<usize>)> = reshape
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        let adapter = reshaped_target_parameters(dir.path(), &reshape);
        for extra in [
            vec!["--base".to_string(), base.display().to_string()],
            vec!["--arch".to_string(), "qwen3moe".to_string()],
        ] {
            let out = dir.path().join("out.gguf");
            let assert = common::gguf_lora()
                .arg("convert")
                .arg(&adapter)
                .args(&extra)
                .arg("-o")
                .arg(&out)
                .assert()
                .code(1);
            let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
            eprintln!("{what} {extra:?}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
            assert!(
                stderr.contains("adapter_model.safetensors")
                    && stderr.contains(&format!("model.{layer1}.")),
                "{what}: {stderr}"
            );
            if extra[0] == "--base" {
                for w in want {
                    assert!(stderr.contains(w), "{what}: {w:?} not in {stderr}");
                }
            }
            assert!(!out.exists(), "{what}: output written");
        }
    }
}
