//! Does a merge keep a real fine-tune? The committed PEFT LoRA of testdata/merge_quality (rank 16, every
//! projection, trained by train_fact_lora.py on SmolLM2-135M-Instruct Q4_1 to answer 48 made-up facts) is
//! converted and merged by the binary, and llama.cpp judges the outputs (judge.py): greedy answers to the
//! facts, and KL to the adapter applied at runtime on the fact sentences and on held-out prose. Issue 15:
//! plain round-to-nearest back onto the base's own 4-bit grid throws the fine-tune away; the default merge
//! must keep it, and `--requant nearest` (ggml's exact requantization, kept as a choice) must not, which
//! proves that the test can tell them apart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{gguf_lora, interop, repo_root};
use serde_json::Value;

/// Bounds the default merge is held to: the facts answered as at runtime within 0.1, and mean KL to
/// the runtime LoRA on held-out text at most 0.12 nats (issue 15's target is 0.1; the bound leaves
/// room for floating-point differences between machines). Measured on heldout.txt: base alone 1.32,
/// nearest requantization 0.98, the default merge 0.065 with 1.000 of the facts (runtime 1.0),
/// calibrated on calibration.txt 0.055, export-lora + llama-quantize Q4_K_M 0.086 (at ×1.07),
/// export-lora F16 0.004 (see testdata/merge_quality/README.md).
const FACTS_WITHIN: f64 = 0.1;
const HELDOUT_KL_MAX: f64 = 0.12;
/// One of the 48 facts: two merges that keep the adapter equally well can differ by one answer (the
/// calibrated and default merges swap one fact between them as the sweep's floating-point order
/// changes), so fact counts are compared with this slack and held-out KL without any.
const ONE_FACT: f64 = 1.0 / 48.0 + 1e-9;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dir() -> PathBuf {
    repo_root().join("testdata/merge_quality")
}

/// Scratch directory and the committed adapter converted to GGUF, once per test binary.
fn converted() -> &'static (tempfile::TempDir, PathBuf) {
    static A: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    A.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("facts.gguf");
        gguf_lora()
            .arg("convert")
            .arg(dir().join("adapters/smollm2-facts"))
            .arg("--base")
            .arg(&interop().smollm)
            .arg("-o")
            .arg(&out)
            .assert()
            .success();
        (tmp, out)
    })
}

fn merge(name: &str, extra: &[&str]) -> PathBuf {
    let (tmp, adapter) = converted();
    let out = tmp.path().join(format!("{name}.gguf"));
    gguf_lora()
        .args([
            "merge",
            s(&interop().smollm),
            "--lora",
            s(adapter),
            "-o",
            s(&out),
        ])
        .args(extra)
        .assert()
        .success();
    out
}

/// judge.py's metrics for base, runtime and each `LABEL=FILE`.
fn judge(merged: &[(&str, &Path)]) -> Value {
    let specs: Vec<String> = merged
        .iter()
        .map(|(l, p)| format!("{l}={}", p.display()))
        .collect();
    let mut args = vec![s(&interop().smollm), s(&converted().1)];
    args.extend(specs.iter().map(String::as_str));
    args.push("--json");
    let out = interop().python(&dir().join("judge.py"), &args);
    eprintln!("{out}");
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// The default merge, `--requant nearest`, a merge calibrated on text like the training data and
/// one fitted to the calibration tokens alone (`--adapter-weight 0`), made once per test binary.
struct Merges {
    default: PathBuf,
    nearest: PathBuf,
    calibrated: PathBuf,
    tokens_only: PathBuf,
}

fn merges() -> &'static Merges {
    static M: OnceLock<Merges> = OnceLock::new();
    M.get_or_init(|| {
        let calib = dir().join("calibration.txt");
        Merges {
            default: merge("default", &[]),
            nearest: merge("nearest", &["--requant", "nearest"]),
            calibrated: merge("calibrated", &["--calibrate", s(&calib)]),
            tokens_only: merge("tokens_only", &["--adapter-weight", "0"]),
        }
    })
}

/// The three merges judged by llama.cpp once per test binary (on held-out text none of them
/// calibrated on).
fn judged_merges() -> &'static Value {
    static J: OnceLock<Value> = OnceLock::new();
    J.get_or_init(|| {
        let m = merges();
        judge(&[
            ("default", &m.default),
            ("nearest", &m.nearest),
            ("calibrated", &m.calibrated),
            ("tokens_only", &m.tokens_only),
        ])
    })
}

fn f(v: &Value, model: &str, key: &str) -> f64 {
    v[model][key]
        .as_f64()
        .unwrap_or_else(|| panic!("{model}.{key} in {v}"))
}

#[test]
fn the_runtime_lora_answers_the_trained_facts_and_the_base_does_not() {
    require_interop!();
    let j = judge(&[]);
    assert!(f(&j, "runtime", "fact_acc") >= 0.9, "{j}");
    assert!(f(&j, "base", "fact_acc") <= 0.1, "{j}");
    assert!(f(&j, "base", "kl_facts") > 1.0, "{j}");
}

#[test]
fn nearest_requantization_loses_the_fine_tune() {
    require_interop!();
    let j = judged_merges();
    assert!(f(j, "runtime", "fact_acc") >= 0.9, "{j}");
    assert!(f(j, "nearest", "fact_acc") <= 0.3, "{j}");
    assert!((f(j, "nearest", "size") - 1.0).abs() < 0.01, "{j}");
}

#[test]
fn the_default_merge_keeps_the_fine_tune_at_the_base_s_size() {
    require_interop!();
    let j = judged_merges();
    let runtime = f(j, "runtime", "fact_acc");
    assert!(runtime >= 0.9, "{j}");
    assert!(f(j, "default", "fact_acc") >= runtime - FACTS_WITHIN, "{j}");
    assert!(f(j, "default", "kl_heldout") <= HELDOUT_KL_MAX, "{j}");
    assert!(
        f(j, "default", "kl_facts") < f(j, "nearest", "kl_facts") / 2.0,
        "{j}"
    );
    assert!((f(j, "default", "size") - 1.0).abs() < 0.01, "{j}");
}

#[test]
fn calibrating_on_training_like_text_keeps_at_least_as_much_as_the_default_and_both_beat_rounding()
{
    require_interop!();
    let j = judged_merges();
    let kl = |m: &str| f(j, m, "kl_heldout");
    assert!(kl("calibrated") <= kl("default"), "{j}");
    assert!(kl("default") < kl("nearest") / 4.0, "{j}");
    assert!(
        f(j, "calibrated", "fact_acc") >= f(j, "default", "fact_acc") - ONE_FACT,
        "{j}"
    );
}

/// The facts are inputs the built-in corpus never shows; what keeps them is the adapter's own
/// input directions in the fit (`--adapter-weight`, on by default). Without them the merge answers
/// fewer facts and sits farther from the runtime LoRA on the fact sentences (measured: 0.917 of the
/// facts and KL 0.54 alone, 1.000 and 0.22 with them).
#[test]
fn the_adapter_s_own_directions_keep_what_the_calibration_text_does_not_show() {
    require_interop!();
    let j = judged_merges();
    assert!(
        f(j, "default", "fact_acc") >= f(j, "tokens_only", "fact_acc"),
        "{j}"
    );
    assert!(
        f(j, "default", "kl_facts") < 0.6 * f(j, "tokens_only", "kl_facts"),
        "{j}"
    );
    assert!(
        f(j, "default", "kl_heldout") <= f(j, "tokens_only", "kl_heldout"),
        "{j}"
    );
}

/// The same facts trained on gemma3-270m Q4_K_M (adapters/gemma3-facts; the base's tensors are Q4_K,
/// Q5_0, Q6_K and Q8_0). Its trained delta is large enough against those grids that rounding to
/// nearest keeps the facts too (measured: 48/48 for runtime, nearest and default); what tells them
/// apart is how far each sits from the runtime LoRA on held-out text: nearest 0.22, the default 0.073
/// (the bound for a trained adapter is 0.1).
#[test]
fn on_a_q4_k_m_base_the_default_merge_keeps_the_fine_tune_and_sits_closer_than_rounding() {
    require_interop!();
    let tmp = tempfile::tempdir().unwrap();
    let base = &interop().gemma;
    let adapter = tmp.path().join("facts.gguf");
    gguf_lora()
        .arg("convert")
        .arg(dir().join("adapters/gemma3-facts"))
        .args(["--base", s(base), "-o", s(&adapter)])
        .assert()
        .success();
    let merge = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(format!("{name}.gguf"));
        gguf_lora()
            .args(["merge", s(base), "--lora", s(&adapter), "-o", s(&out)])
            .args(extra)
            .assert()
            .success();
        format!("{name}={}", out.display())
    };
    let default = merge("default", &[]);
    let nearest = merge("nearest", &["--requant", "nearest"]);
    let out = interop().python(
        &dir().join("judge.py"),
        &[s(base), s(&adapter), &default, &nearest, "--json"],
    );
    eprintln!("{out}");
    let j: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let runtime = f(&j, "runtime", "fact_acc");
    assert!(runtime >= 0.9 && f(&j, "base", "fact_acc") <= 0.1, "{j}");
    assert!(
        f(&j, "default", "fact_acc") >= runtime - FACTS_WITHIN,
        "{j}"
    );
    assert!(f(&j, "default", "kl_heldout") <= HELDOUT_KL_MAX, "{j}");
    assert!(
        f(&j, "default", "kl_heldout") < f(&j, "nearest", "kl_heldout") / 2.0,
        "{j}"
    );
    assert!((f(&j, "default", "size") - 1.0).abs() < 0.01, "{j}");
}

/// `verify`'s default limits (unchanged) pass the default merge and fail plain rounding, on the
/// held-out text.
#[test]
fn verify_passes_the_default_merge_and_fails_nearest() {
    require_interop!();
    let m = merges();
    let heldout = dir().join("heldout.txt");
    let verify = |merged: &Path| {
        gguf_lora()
            .args([
                "verify",
                s(&interop().smollm),
                "--lora",
                s(&converted().1),
                "--merged",
                s(merged),
                "--text-file",
                s(&heldout),
                "--json",
            ])
            .output()
            .unwrap()
    };
    let ok = verify(&m.default);
    let report: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(ok.status.code(), Some(0), "{report}");
    let lost = verify(&m.nearest);
    let report: Value = serde_json::from_slice(&lost.stdout).unwrap();
    assert_eq!(lost.status.code(), Some(3), "{report}");
}
