//! `gguf-lora extract` against other tools: llama.cpp's `llama-export-lora` makes the fine-tune from a
//! gguf-py adapter and llama.cpp runs the extracted adapter; numpy's SVD (the mergekit-extract-lora
//! recipe, `testdata/extract/check_extract.py`) is the reference on an HF safetensors pair written by
//! numpy and the safetensors library (`testdata/extract/make_pair.py`); PEFT's own merge converted by
//! `convert_hf_to_gguf.py` (the committed fixtures) checks GGUF-vs-safetensors inputs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gguf_lora, interop, listing, repo_root};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    repo_root().join("testdata/fixtures").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn script(dir: &str, name: &str) -> PathBuf {
    repo_root().join("testdata").join(dir).join(name)
}

fn py_json(dir: &str, name: &str, args: &[&str]) -> Value {
    let out = interop().python(&script(dir, name), args);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// gguf-py adapter (make_lora.py) for `base`, merged by llama-export-lora into F32: `(adapter, merged)`.
fn export_lora_merge(dir: &Path, base: &Path, lora_args: &[&str]) -> (PathBuf, PathBuf) {
    let adapter = dir.join("adapter.gguf");
    let merged = dir.join("merged.gguf");
    let mut args = vec![s(base), s(&adapter)];
    args.extend_from_slice(lora_args);
    interop().python(&script("merge", "make_lora.py"), &args);
    let out = Command::new(interop().tools.join("llama-export-lora"))
        .args(["-m", s(base), "--lora", s(&adapter), "-o", s(&merged)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (adapter, merged)
}

/// `gguf-lora extract BASE FT -o OUT ARGS --json`, which must succeed; its report.
fn extract(base: &Path, ft: &Path, out: &Path, args: &[&str]) -> Value {
    let a = gguf_lora()
        .args(["extract", s(base), s(ft), "-o", s(out), "--json"])
        .args(args)
        .assert()
        .success();
    serde_json::from_slice(&a.get_output().stdout).expect("one JSON object")
}

fn lowrank(ours: &Path, reference: &Path) -> Value {
    py_json(
        "extract",
        "check_extract.py",
        &["lowrank", s(ours), s(reference)],
    )
}

const LLAMA_LORA: [&str; 10] = [
    "--rank",
    "4",
    "--alpha",
    "8",
    "--embd",
    "--seed",
    "3",
    "--b-std",
    "0.2",
    "--dtype=f32",
];

#[test]
fn export_lora_f32_merge_comes_back_at_the_original_rank_and_llama_cpp_runs_it() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama/base-f32.gguf");
    let (adapter, merged) = export_lora_merge(dir.path(), &base, &LLAMA_LORA);
    let out = dir.path().join("extracted.gguf");
    let report = extract(&base, &merged, &out, &["--rank", "4"]);

    // scale·B·A of every target (llama.cpp's alpha/rank per tensor) equals the original's.
    let r = lowrank(&out, &adapter);
    eprintln!("extracted vs original adapter: {r}");
    assert_eq!(r["targets_equal"], true, "{r}");
    assert_eq!(r["n"], 15, "7 projections × 2 layers and token_embd: {r}");
    assert!(r["worst_rel"].as_f64().unwrap() < 1e-5, "{r}");
    let tensors = report["tensors"].as_array().unwrap();
    assert!(tensors.iter().all(|t| t["rank"] == 4
        && t["energy"].as_f64().unwrap() > 0.999_999
        && t["residual"].as_f64().unwrap() < 1e-5));
    assert!(tensors
        .iter()
        .any(|t| t["name"] == "token_embd.weight" && t["kind"] == "embedding"));
    assert_eq!(report["totals"]["tensors_unchanged"], 6, "norms and output");
    assert_eq!(report["both_quantized"], false);

    // llama.cpp, base + extracted adapter at runtime, against the merged model.
    let l = py_json(
        "merge",
        "check_merge.py",
        &["logits", s(&base), &format!("{}:1", s(&out)), s(&merged)],
    );
    eprintln!("llama.cpp logits, merged vs base + extracted adapter: {l}");
    assert!(
        l["base"]["kl"].as_f64().unwrap() > 1e-3,
        "the fine-tune matters: {l}"
    );
    let m = &l[s(&merged)];
    assert!(m["kl"].as_f64().unwrap() < 1e-8, "{l}");
    assert_eq!(m["top1"].as_f64().unwrap(), 1.0, "{l}");

    // And our own end-to-end check, as the README shows it.
    gguf_lora()
        .args([
            "verify",
            s(&base),
            "--lora",
            s(&out),
            "--merged",
            s(&merged),
        ])
        .assert()
        .success();
}

#[test]
fn numpy_svd_gives_the_same_singular_values_and_b_a_on_single_and_sharded_safetensors() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let sharded = dir.path().join("sharded");
    interop().python(&script("extract", "make_pair.py"), &[s(&one)]);
    interop().python(
        &script("extract", "make_pair.py"),
        &[s(&sharded), "--shards", "3"],
    );
    assert!(sharded.join("ft/model.safetensors.index.json").exists());
    let out = dir.path().join("one.gguf");
    let report = extract(&one.join("base"), &one.join("ft"), &out, &["--rank", "8"]);
    let report_path = dir.path().join("one.json");
    std::fs::write(&report_path, report.to_string()).unwrap();
    let r = py_json(
        "extract",
        "check_extract.py",
        &[
            "reference",
            s(&one.join("base")),
            s(&one.join("ft")),
            s(&out),
            s(&report_path),
        ],
    );
    eprintln!("ours vs numpy's SVD at rank 8: {r}");
    assert_eq!(r["n"], 16, "14 projections, embed_tokens, lm_head: {r}");
    assert_eq!(r["targets_equal"], true, "{r}");
    // Relative to the largest singular value / to ‖B·A‖; measured 1.5e-7 and 5.5e-5 (two power
    // iterations instead of three give 7e-4).
    assert!(r["worst_sv_rel"].as_f64().unwrap() < 1e-5, "{r}");
    assert!(r["worst_ba_rel"].as_f64().unwrap() < 5e-4, "{r}");
    let tensors = report["tensors"].as_array().unwrap();
    let permuted: Vec<&str> = tensors
        .iter()
        .filter(|t| t["permuted"] == true)
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(permuted.len(), 4, "q and k of both layers: {permuted:?}");
    assert!(permuted
        .iter()
        .all(|n| n.ends_with("attn_q.weight") || n.ends_with("attn_k.weight")));
    let left: Vec<&str> = report["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(left.len(), 5, "the norms, reported: {left:?}");
    assert!(left.iter().all(|n| n.contains("norm")));
    assert_eq!(report["base_format"], "safetensors");

    // Shards and index: the same adapter.
    let out3 = dir.path().join("sharded.gguf");
    extract(
        &sharded.join("base/model.safetensors.index.json"),
        &sharded.join("ft"),
        &out3,
        &["--rank", "8"],
    );
    let r = lowrank(&out3, &out);
    assert_eq!(r["targets_equal"], true, "{r}");
    assert!(r["worst_rel"].as_f64().unwrap() < 1e-6, "{r}");
}

#[test]
fn auto_rank_keeps_the_energy_per_tensor_and_folds_alpha_exactly() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let pair = dir.path().join("pair");
    interop().python(&script("extract", "make_pair.py"), &[s(&pair)]);
    let out = dir.path().join("auto.gguf");
    let report = extract(
        &pair.join("base"),
        &pair.join("ft"),
        &out,
        &["--rank", "auto:0.95", "--max-rank", "12"],
    );
    let tensors = report["tensors"].as_array().unwrap();
    let mut ranks: Vec<u64> = tensors
        .iter()
        .map(|t| t["rank"].as_u64().unwrap())
        .collect();
    for t in tensors {
        // The smallest rank reaching 95% of ‖Δ‖², from the singular values and ‖Δ‖ reported.
        let sv: Vec<f64> = t["singular_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let norm2 = t["delta_norm"].as_f64().unwrap().powi(2);
        let r = t["rank"].as_u64().unwrap() as usize;
        let kept = |k: usize| sv[..k].iter().map(|s| s * s).sum::<f64>() / norm2;
        assert!(kept(r) >= 0.95 * (1.0 - 1e-6) || r == 12, "{t}");
        assert!(r == 1 || kept(r - 1) < 0.95, "{t}");
        assert!((t["energy"].as_f64().unwrap() - kept(r)).abs() < 1e-6);
    }
    ranks.sort();
    ranks.dedup();
    assert!(ranks.len() > 1, "per-tensor ranks differ: {ranks:?}");
    // One alpha in the file, the others' rank/alpha folded into B: numpy's truncation at each
    // tensor's rank is what llama.cpp's alpha/rank scale gives.
    assert!(!report["written"]["folded"].as_array().unwrap().is_empty());
    let report_path = dir.path().join("auto.json");
    std::fs::write(&report_path, report.to_string()).unwrap();
    let r = py_json(
        "extract",
        "check_extract.py",
        &[
            "reference",
            s(&pair.join("base")),
            s(&pair.join("ft")),
            s(&out),
            s(&report_path),
        ],
    );
    // Where a tensor's rank is below the cap the kept directions are separated from the rest and
    // match numpy's; at the cap (ffn_down: 12 directions over a full-rank tail of 9% of the energy)
    // the last kept directions lie in a cluster of near-equal singular values, where no two SVDs agree
    // on the subspace: there the residual must still be the optimal one (to 1e-4 of ‖Δ‖; measured 2e-5).
    let per = r["per"].as_object().unwrap();
    assert_eq!(per.len(), 16, "{r}");
    assert!(per.values().any(|t| t["rank"] == 12), "{r}");
    for (name, t) in per {
        if t["rank"].as_u64().unwrap() < 12 {
            assert!(t["ba_rel"].as_f64().unwrap() < 5e-4, "{name}: {t}");
        }
        assert!(t["residual_excess"].as_f64().unwrap() < 1e-4, "{name}: {t}");
    }
}

#[test]
fn a_gguf_base_and_an_hf_finetune_give_the_gguf_pair_s_adapter() {
    require_interop!();
    // PEFT merge_and_unload of a LoRA with lm_head in modules_to_save, as HF safetensors and as
    // converted by convert_hf_to_gguf.py (q/k rows RoPE-permuted there).
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama/adapters/modules_to_save");
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::copy(src.join("merged.safetensors"), hf.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("llama/config.json"), hf.join("config.json")).unwrap();
    let base = fixture("llama/base-f32.gguf");
    let mixed = dir.path().join("mixed.gguf");
    let report = extract(&base, &hf, &mixed, &["--rank", "8"]);
    let gguf = dir.path().join("gguf.gguf");
    extract(&base, &src.join("merged-f32.gguf"), &gguf, &["--rank", "8"]);
    let r = lowrank(&mixed, &gguf);
    eprintln!("GGUF base + HF fine-tune vs both GGUF: {r}");
    assert_eq!(r["targets_equal"], true, "{r}");
    assert_eq!(r["n"], 15, "14 projections and output: {r}");
    assert!(r["worst_rel"].as_f64().unwrap() < 1e-5, "{r}");
    assert!(
        report["notes"][0].as_str().unwrap().contains("not"),
        "{report}"
    );
    assert_eq!(report["finetuned_format"], "safetensors");
}

#[test]
fn split_gguf_inputs_give_the_single_file_adapter() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama/base-f32.gguf");
    let (_, merged) = export_lora_merge(dir.path(), &base, &LLAMA_LORA);
    let split = |file: &Path, prefix: &str| {
        let o = Command::new(interop().tools.join("llama-gguf-split"))
            .args(["--split", "--split-max-tensors", "8", s(file)])
            .arg(dir.path().join(prefix))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dir.path().join(format!("{prefix}-00001-of-00003.gguf"))
    };
    let base1 = split(&base, "base");
    let merged1 = split(&merged, "ft");
    let single = dir.path().join("single.gguf");
    extract(&base, &merged, &single, &["--rank", "4"]);
    let from_split = dir.path().join("split.gguf");
    let report = extract(&base1, &merged1, &from_split, &["--rank", "4"]);
    assert_eq!(report["totals"]["tensors_compared"], 21);
    let r = lowrank(&from_split, &single);
    assert_eq!(r["targets_equal"], true, "{r}");
    assert!(r["worst_rel"].as_f64().unwrap() < 1e-6, "{r}");
}

#[test]
fn refusals_exit_1_say_why_and_write_nothing() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let pair = dir.path().join("pair");
    interop().python(
        &script("extract", "make_pair.py"),
        &[s(&pair), "--bad-shape"],
    );
    // gemma3 ties its output head to the embeddings.
    let gemma = fixture("gemma3/base-f32.gguf");
    let (_, gemma_ft) = export_lora_merge(
        dir.path(),
        &gemma,
        &[
            "--rank",
            "4",
            "--targets",
            "attn_q",
            "--embd",
            "--seed",
            "1",
        ],
    );
    let llama = fixture("llama/base-f32.gguf");
    let same = dir.path().join("copy.gguf");
    std::fs::copy(&llama, &same).unwrap();
    let out = dir.path().join("out.gguf");
    let (pair_base, pair_ft) = (pair.join("base"), pair.join("ft"));
    let missing = dir.path().join("missing.gguf");
    let before = listing(dir.path());
    let cases: Vec<(Vec<&Path>, Vec<&str>, i32)> = vec![
        (
            vec![&pair_base, &pair_ft],
            vec![
                "blk.1.ffn_up.weight",
                "shape [128, 256]",
                "[128, 288]",
                "1 mismatch",
            ],
            1,
        ),
        (
            vec![&llama, &gemma],
            vec!["architecture 'gemma3'", "'llama'"],
            1,
        ),
        (
            vec![&llama, &same],
            vec!["nothing to extract", "identical"],
            1,
        ),
        (
            vec![&gemma, &gemma_ft],
            vec![
                "token_embd.weight",
                "ties its output head",
                "--no-embeddings",
            ],
            1,
        ),
        (
            vec![&llama, &pair_ft],
            vec![
                "do not describe the same model",
                "16 mismatches",
                "in the fine-tune (ggml order)",
            ],
            1,
        ),
        (vec![&llama, &missing], vec!["missing.gguf"], 1),
    ];
    for (inputs, needles, code) in cases {
        let a = gguf_lora()
            .arg("extract")
            .args(&inputs)
            .args(["-o", s(&out)])
            .assert()
            .code(code);
        let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
        eprintln!("{inputs:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
        assert!(!err.contains("panicked"));
        assert_eq!(
            listing(dir.path()),
            before,
            "nothing written for {inputs:?}"
        );
    }
    // Usage errors: exit 2.
    for bad in [["--rank", "0"], ["--rank", "auto:1.5"], ["--max-rank", "0"]] {
        gguf_lora()
            .args(["extract", s(&llama), s(&same), "-o", s(&out)])
            .args(bad)
            .assert()
            .code(2);
    }
    // The output may not be an input.
    let copy_bytes = std::fs::read(&same).unwrap();
    gguf_lora()
        .args(["extract", s(&llama), s(&same), "-o", s(&same)])
        .assert()
        .code(1);
    assert_eq!(std::fs::read(&same).unwrap(), copy_bytes);
    // Tied embeddings left out on request: everything else is extracted, the embedding reported.
    let report = extract(&gemma, &gemma_ft, &out, &["--rank", "4", "--no-embeddings"]);
    assert_eq!(
        report["left_out"][0]["name"], "token_embd.weight",
        "{report}"
    );
    assert_eq!(
        report["totals"]["tensors_extracted"], 6,
        "attn_q of 6 layers: {report}"
    );
}

#[test]
fn two_quantized_inputs_are_said_to_carry_two_quantization_noises() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama/base-f32.gguf");
    let (_, merged) = export_lora_merge(dir.path(), &base, &LLAMA_LORA);
    let quantize = |from: &Path, name: &str| {
        let to = dir.path().join(name);
        let o = Command::new(interop().tools.join("llama-quantize"))
            .args(["--allow-requantize", s(from), s(&to), "Q8_0"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        to
    };
    let (qb, qm) = (
        quantize(&base, "base-q8.gguf"),
        quantize(&merged, "ft-q8.gguf"),
    );
    let out = dir.path().join("q.gguf");
    let report = extract(&qb, &qm, &out, &["--rank", "4"]);
    assert_eq!(report["both_quantized"], true);
    let note = report["notes"][0].as_str().unwrap();
    assert!(
        note.contains("both inputs are quantized (q8_0 and q8_0)"),
        "{note}"
    );
    // The two noises are full rank: rank 4 no longer keeps everything.
    let energy = report["totals"]["energy"].as_f64().unwrap();
    assert!(energy < 0.99999 && energy > 0.99, "{energy}");
    // One quantized side: no such note.
    let report = extract(&qb, &merged, &out, &["--rank", "4"]);
    assert_eq!(report["both_quantized"], false);
    assert!(report["notes"].as_array().unwrap().is_empty());
}

#[test]
fn per_tensor_ranks_and_folded_alpha_give_llama_cpp_the_merged_model_s_logits() {
    require_interop!();
    // The PEFT fine-tune whose lm_head was retrained in full: rank 8 everywhere but the head, which
    // auto gives its full rank 64; the file alpha is 8 and the head's B carries 64/8.
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama/base-f32.gguf");
    let merged = fixture("llama/adapters/modules_to_save/merged-f32.gguf");
    let out = dir.path().join("auto.gguf");
    let report = extract(
        &base,
        &merged,
        &out,
        &[
            "--rank",
            "auto:0.999",
            "--max-rank",
            "64",
            "--outtype",
            "f16",
        ],
    );
    let head = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "output.weight")
        .unwrap();
    assert_eq!(head["rank"], 64, "{head}");
    assert_eq!(report["written"]["alpha"], 8.0);
    assert_eq!(
        report["written"]["folded"],
        serde_json::json!([["output.weight", 8.0]])
    );
    let l = py_json(
        "merge",
        "check_merge.py",
        &["logits", s(&base), &format!("{}:1", s(&out)), s(&merged)],
    );
    eprintln!("llama.cpp, merged vs base + auto-rank f16 adapter: {l}");
    assert!(l["base"]["kl"].as_f64().unwrap() > 1e-2, "{l}");
    let m = &l[s(&merged)];
    // f16 factors: about 1e-3 of each update, far below the fine-tune's effect.
    assert!(m["kl"].as_f64().unwrap() < 1e-5, "{l}");
    assert_eq!(m["top1"].as_f64().unwrap(), 1.0, "{l}");
}

#[test]
fn stacked_moe_experts_come_back_per_expert_and_llama_cpp_runs_them() {
    require_interop!();
    // qwen2moe fixture, gguf-py adapter on every ffn_*_exps (4 experts) and attn_q, merged by
    // llama-export-lora (which also writes ffn_gate_inp_shexp as [64] instead of [64, 1]).
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("qwen2moe/base-f32.gguf");
    let adapter = dir.path().join("moe.gguf");
    interop().python(
        &script("extract", "make_moe_lora.py"),
        &[s(&base), s(&adapter), "4"],
    );
    let merged = dir.path().join("merged.gguf");
    let o = Command::new(interop().tools.join("llama-export-lora"))
        .args(["-m", s(&base), "--lora", s(&adapter), "-o", s(&merged)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("extracted.gguf");
    let report = extract(&base, &merged, &out, &["--rank", "4"]);
    let experts: Vec<&Value> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "experts")
        .collect();
    assert_eq!(experts.len(), 6, "gate/up/down of 2 layers: {report}");
    assert!(experts.iter().all(|t| t["experts"] == 4
        && t["rank"] == 4
        && t["expert_singular_values"].as_array().unwrap().len() == 4));
    let r = lowrank(&out, &adapter);
    eprintln!("MoE: extracted vs original adapter: {r}");
    assert_eq!(r["targets_equal"], true, "{r}");
    assert_eq!(r["n"], 8, "{r}");
    assert!(r["worst_rel"].as_f64().unwrap() < 1e-5, "{r}");
    let l = py_json(
        "merge",
        "check_merge.py",
        &["logits", s(&base), &format!("{}:1", s(&out)), s(&merged)],
    );
    eprintln!("MoE: llama.cpp, merged vs base + extracted adapter: {l}");
    assert!(l["base"]["kl"].as_f64().unwrap() > 1e-2, "{l}");
    assert!(l[s(&merged)]["kl"].as_f64().unwrap() < 1e-8, "{l}");
}
