//! `gguf-lora verify` with text in and text out: `--text`/`--text-file` give exactly what `--tokens`
//! gives with llama.cpp's ids; a text longer than `--ctx` runs in chunks whose positions are all
//! compared, with results equal to the chunks run one by one; `--generate` continues greedily with
//! llama.cpp's ids, base and runtime LoRA; bad inputs get one-line errors.
//!
//! The fixtures' vocabulary has 256 pieces and no byte tokens: it tokenizes lowercase text without
//! digits or newlines (anything else has no token, and llama.cpp aborts), so the texts here are such.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// 29 tokens on the fixtures' vocabulary, BOS included.
const TEXT: &str = "the cat sat on the mat and looked at the dog";

fn fixture(arch: &str) -> PathBuf {
    common::repo_root().join("testdata/fixtures").join(arch)
}

fn base(arch: &str) -> String {
    fixture(arch).join("base-f32.gguf").display().to_string()
}

fn adapter(arch: &str) -> String {
    fixture(arch)
        .join("adapters/standard/ref_convert.gguf")
        .display()
        .to_string()
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

/// `verify ARGS --json`, which must pass; its report.
fn report(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = verify(&all);
    assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("one JSON object");
    v["report"].clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The report without what may differ between two runs of the same check (wall times, where the
/// input came from).
fn numbers(r: &Value) -> Value {
    let mut r = r.clone();
    let o = r.as_object_mut().unwrap();
    o.remove("timings");
    if let Some(g) = o.get_mut("generation").and_then(Value::as_object_mut) {
        g.remove("time_s");
    }
    r
}

/// A float32 C-order `.npy`: (rows, values).
fn read_npy(path: &Path) -> (usize, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let shape = header.split("'shape': (").nth(1).unwrap();
    let rows: usize = shape.split(',').next().unwrap().trim().parse().unwrap();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (rows, data)
}

/// llama.cpp's ids for `text` (llama-cpp-python, vocab only; BOS as the model says, specials parsed).
fn llama_cpp_tokenize(model: &str, text: &str) -> Vec<u32> {
    let code = r#"
import sys, json, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps(llm.tokenize(sys.argv[2].encode(), add_bos=True, special=True)))
"#;
    let out = common::interop().python_code(code, &[model, text]);
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn text_gives_the_numbers_and_logits_of_llama_cpp_ids() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let text_file = dir.path().join("text.txt");
    std::fs::write(&text_file, TEXT).unwrap();
    for arch in ["llama", "gemma3", "qwen2"] {
        let (b, a) = (base(arch), adapter(arch));
        let llama_ids = llama_cpp_tokenize(&b, TEXT);
        assert!(llama_ids.len() > 20, "{arch}: {llama_ids:?}");
        let out = |n: &str| dir.path().join(format!("{arch}-{n}"));
        let s = |p: PathBuf| p.display().to_string();
        let from_text = report(&[
            &b,
            "--lora",
            &a,
            "--text",
            TEXT,
            "--logits-out",
            &s(out("text")),
        ]);
        let from_file = report(&[&b, "--lora", &a, "--text-file", text_file.to_str().unwrap()]);
        let from_ids = report(&[
            &b,
            "--lora",
            &a,
            "--tokens",
            &csv(&llama_ids),
            "--logits-out",
            &s(out("ids")),
        ]);
        assert_eq!(ids(&from_text["tokens"]), llama_ids, "{arch}");
        assert_eq!(numbers(&from_text), numbers(&from_ids), "{arch}");
        assert_eq!(numbers(&from_file), numbers(&from_ids), "{arch}");
        // The adapter changes something, so equal numbers say something.
        assert!(from_ids["base_vs_runtime"]["mean_kl"].as_f64().unwrap() > 1e-3);
        for n in ["base", "runtime", "merged"] {
            let f = format!("{n}.npy");
            assert_eq!(
                std::fs::read(out("text").join(&f)).unwrap(),
                std::fs::read(out("ids").join(&f)).unwrap(),
                "{arch}: {f}"
            );
        }
        assert_eq!(
            read_npy(&out("text").join("runtime.npy")).0,
            llama_ids.len()
        );
    }
}

#[test]
fn chunks_cover_every_position_and_equal_the_chunks_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (b, a) = (base("llama"), adapter("llama"));
    let whole_dir = dir.path().join("whole");
    let whole = report(&[
        &b,
        "--lora",
        &a,
        "--text",
        TEXT,
        "--ctx",
        "8",
        "--logits-out",
        whole_dir.to_str().unwrap(),
    ]);
    let tokens = ids(&whole["tokens"]);
    assert_eq!(tokens.len(), 29);
    assert_eq!(tokens[0], 1, "BOS");
    // 8 positions, then BOS + 7 more tokens per chunk: 29 tokens + 3 BOS = 32 positions.
    let lens: Vec<usize> = whole["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(lens, [8, 8, 8, 8]);
    assert_eq!(whole["n_positions"], 32);
    assert_eq!(whole["ctx"], 8);

    // The same chunks, run one by one through --tokens.
    let mut chunk_ids: Vec<Vec<u32>> = vec![tokens[..8].to_vec()];
    for piece in tokens[8..].chunks(7) {
        let mut c = vec![1];
        c.extend_from_slice(piece);
        chunk_ids.push(c);
    }
    let mut rows = [Vec::new(), Vec::new(), Vec::new()];
    let (mut kl_sum, mut max_kl, mut top1, mut max_abs) = (0.0, 0f64, 0.0, 0f64);
    for (i, c) in chunk_ids.iter().enumerate() {
        let d = dir.path().join(format!("chunk{i}"));
        let r = report(&[
            &b,
            "--lora",
            &a,
            "--tokens",
            &csv(c),
            "--logits-out",
            d.to_str().unwrap(),
        ]);
        assert_eq!(r["n_positions"].as_u64().unwrap() as usize, c.len());
        let m = &r["merged_vs_runtime"];
        let base_runtime = &r["base_vs_runtime"];
        kl_sum += base_runtime["mean_kl"].as_f64().unwrap() * c.len() as f64;
        max_kl = max_kl.max(base_runtime["max_kl"].as_f64().unwrap());
        top1 += base_runtime["top1_agreement"].as_f64().unwrap() * c.len() as f64;
        max_abs = max_abs.max(m["max_abs_diff"].as_f64().unwrap());
        for (k, n) in ["base", "runtime", "merged"].iter().enumerate() {
            rows[k].extend(read_npy(&d.join(format!("{n}.npy"))).1);
        }
    }
    for (k, n) in ["base", "runtime", "merged"].iter().enumerate() {
        let (n_rows, data) = read_npy(&whole_dir.join(format!("{n}.npy")));
        assert_eq!(n_rows, 32, "{n}");
        assert_eq!(
            data, rows[k],
            "{n}: the whole run is the chunks' runs concatenated"
        );
    }
    let br = &whole["base_vs_runtime"];
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * y.abs().max(1e-12);
    assert!(
        close(br["mean_kl"].as_f64().unwrap(), kl_sum / 32.0),
        "{br}"
    );
    assert_eq!(br["max_kl"].as_f64().unwrap(), max_kl);
    assert!(
        close(br["top1_agreement"].as_f64().unwrap(), top1 / 32.0),
        "{br}"
    );
    assert_eq!(
        whole["merged_vs_runtime"]["max_abs_diff"].as_f64().unwrap(),
        max_abs
    );

    // --ctx is clamped to the model's context length (the fixtures' is 128); the default is 512.
    let r = report(&[&b, "--lora", &a, "--text", TEXT, "--ctx", "100000"]);
    assert_eq!(r["ctx"], 128);
    assert_eq!(r["chunks"].as_array().unwrap().len(), 1);
    let (_, stdout, _) = verify(&[&b, "--lora", &a, "--text", TEXT, "--ctx", "8"]);
    assert!(
        stdout.contains("run in 4 chunks of at most 8 positions; 32 positions compared"),
        "{stdout}"
    );
}

/// llama.cpp's greedy continuation ids (`testdata/tools/llama_greedy.py`).
fn llama_cpp_greedy(model: &str, tokens: &[u32], n: usize, lora: Option<&str>) -> Vec<u32> {
    let mut args = vec![
        model.to_string(),
        "--tokens".into(),
        csv(tokens),
        "--n".into(),
        n.to_string(),
    ];
    if let Some(l) = lora {
        args.push("--lora".into());
        args.push(format!("{l}:1"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::interop().python(
        &common::repo_root().join("testdata/tools/llama_greedy.py"),
        &args,
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    ids(&v["tokens"])
}

#[test]
fn generate_gives_llama_cpp_greedy_ids_for_base_and_runtime_lora() {
    require_interop!();
    const N: usize = 24;
    // Architectures where the adapter changes the continuation (on gemma2's fixture the final
    // soft-cap keeps both on one repeated token).
    let mut changed: Vec<&str> = Vec::new();
    for arch in [
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
    ] {
        let (b, a) = (base(arch), adapter(arch));
        let r = report(&[
            &b,
            "--lora",
            &a,
            "--text",
            TEXT,
            "--generate",
            &N.to_string(),
        ]);
        let prompt = ids(&r["tokens"]);
        let g = &r["generation"];
        assert_eq!(g["prompt_tokens"].as_u64().unwrap() as usize, prompt.len());
        let ours_base = ids(&g["base"]["tokens"]);
        let ours_runtime = ids(&g["runtime"]["tokens"]);
        assert_eq!(
            ours_base,
            llama_cpp_greedy(&b, &prompt, N, None),
            "{arch}: base"
        );
        assert_eq!(
            ours_runtime,
            llama_cpp_greedy(&b, &prompt, N, Some(&a)),
            "{arch}: runtime LoRA"
        );
        if ours_base != ours_runtime {
            changed.push(arch);
        }
        // The F32 merge follows the runtime model token for token.
        assert_eq!(ids(&g["merged"]["tokens"]), ours_runtime, "{arch}: merged");
        assert_eq!(g["first_divergence"], Value::Null, "{arch}");
        assert!(g["runtime"]["text"].as_str().is_some(), "{arch}");
    }
    eprintln!("the adapter changes the continuation on {changed:?}");
    assert!(changed.len() >= 6, "{changed:?}");
}

#[test]
fn generate_marks_where_merged_and_runtime_part() {
    // The adapter at half its scale stands in for a merge that lost part of the adapter.
    let dir = tempfile::tempdir().unwrap();
    let (b, a) = (base("llama"), adapter("llama"));
    let half = dir.path().join("half.gguf");
    common::gguf_lora()
        .args(["merge", &b, "--lora-scaled", &format!("{a}:0.5"), "-o"])
        .arg(&half)
        .assert()
        .success();
    let h = half.to_str().unwrap();
    let args = [
        &b,
        "--lora",
        &a,
        "--merged",
        h,
        "--text",
        TEXT,
        "--generate",
        "16",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let (code, stdout, _) = verify(&json_args);
    assert_eq!(code, 3, "a merge at half scale fails the check: {stdout}");
    let g = serde_json::from_str::<Value>(&stdout).unwrap()["report"]["generation"].clone();
    let (rt, mg) = (ids(&g["runtime"]["tokens"]), ids(&g["merged"]["tokens"]));
    let d = g["first_divergence"].as_u64().expect("they part") as usize;
    assert_eq!(rt[..d], mg[..d]);
    assert_ne!(rt.get(d), mg.get(d));

    let (_, text, _) = verify(&args);
    assert!(
        text.contains(&format!(
            "merged and runtime first differ at token {d} (marked >>)"
        )),
        "{text}"
    );
    let marked = text
        .lines()
        .find(|l| l.trim_start().starts_with(">>"))
        .expect("a marked row");
    assert!(
        marked.split_whitespace().nth(1) == Some(&d.to_string()),
        "{marked}"
    );
    for label in ["base", "runtime", "merged"] {
        assert!(
            text.contains(&format!("  {label:<8} \"")),
            "{label}: {text}"
        );
    }
    // The runtime's text carries the mark where it parts from the merged model's.
    let runtime_line = text
        .lines()
        .find(|l| l.starts_with("  runtime  \""))
        .unwrap();
    assert!(runtime_line.contains(">>"), "{runtime_line}");
}

/// A copy of the llama fixture with `tokenizer.ggml.model` = `model`.
fn with_tokenizer_model(dst: &Path, model: &str) {
    use gguf_lora::gguf::{GgufModel, GgufWriter, TensorDesc, Value as V};
    let src = GgufModel::open(fixture("llama").join("base-f32.gguf")).unwrap();
    let first = &src.shards()[0];
    let mut md = first.metadata().clone();
    md.set("tokenizer.ggml.model", V::String(model.into()));
    let descs: Vec<TensorDesc> = src.tensors().map(|(_, t)| TensorDesc::from(t)).collect();
    let mut w =
        GgufWriter::create(dst, &[], first.version(), first.alignment(), &md, &descs).unwrap();
    for (shard, t) in src.tensors() {
        w.write_tensor(src.shards()[shard].tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (b, a) = (base("llama"), adapter("llama"));
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.path().join("missing.txt");
    let bert = dir.path().join("bert.gguf");
    with_tokenizer_model(&bert, "bert");
    let bert = bert.to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--text", ""], 2, "--text: the text is empty"),
        (vec!["--ctx", "0", "--text", TEXT], 2, "--ctx"),
        (vec!["--text", TEXT, "--tokens", "1,2"], 2, "--tokens"),
        (vec!["--text", TEXT, "--seed", "3"], 2, "--seed"),
        (
            vec!["--text", TEXT, "--text-file", empty.to_str().unwrap()],
            2,
            "--text-file",
        ),
        (vec!["--text", TEXT, "--generate", "0"], 2, "--generate"),
        (
            vec!["--text-file", missing.to_str().unwrap()],
            1,
            "missing.txt: cannot read",
        ),
        (
            vec!["--text-file", empty.to_str().unwrap()],
            1,
            "empty.txt: the text file is empty",
        ),
        // No token for 'H' and no byte tokens in the fixtures' vocabulary.
        (
            vec!["--text", "Hello"],
            1,
            "cannot tokenize byte 0x48 ('H')",
        ),
    ];
    for (extra, want_code, want) in cases {
        let mut args = vec![b.as_str(), "--lora", a.as_str()];
        args.extend(extra.iter().copied());
        let (code, stdout, stderr) = verify(&args);
        assert_eq!(code, want_code, "{extra:?}: {stderr}");
        assert!(stdout.is_empty(), "{extra:?}: {stdout}");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        if want_code == 1 {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        }
    }

    // A tokenizer we do not reproduce: text is refused by name, ids still run (no text shown).
    let (code, _, stderr) = verify(&[bert, "--lora", &a, "--text", TEXT]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bert.gguf: tokenizer 'bert' is not supported; pass --tokens"),
        "{stderr}"
    );
    let (code, stdout, stderr) = verify(&[
        bert,
        "--lora",
        &a,
        "--tokens",
        "1,51,226",
        "--generate",
        "4",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("(no text: the model's tokenizer is not supported; ids shown)"),
        "{stdout}"
    );
}
