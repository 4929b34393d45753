//! Our tokenizer against llama.cpp's (llama-cpp-python 0.3.36, `vocab_only`), computed live in each run
//! from the committed corpus `testdata/tokenizer/corpus.json`: token ids for every text with and
//! without BOS and special parsing (`tokenize(text, add_special, parse_special)`), the text
//! `llama_detokenize` gives back for those ids (all four flag pairs), every token's piece and
//! attributes, and the special ids. On the real gemma3-270m (SentencePiece) and SmolLM2-135M (BPE,
//! pre-tokenizer `smollm`), on every fixture architecture, and on SmolLM2's vocabulary with each
//! pre-tokenizer we reproduce. Where llama.cpp aborts (a byte the vocabulary cannot express), we must
//! return an error. Then the `tokenize` subcommand.

mod common;

use std::path::{Path, PathBuf};

use gguf_lora::gguf::{Array, GgufFile, GgufWriter, Metadata, Value as Value_};
use gguf_lora::tokenizer::Tokenizer;
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    common::repo_root().join("testdata/tokenizer").join(name)
}

/// `(name, bytes)` of every corpus entry.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let v: Value = serde_json::from_slice(&std::fs::read(data("corpus.json")).unwrap()).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let bytes = match e.get("hex") {
                Some(h) => hex(h.as_str().unwrap()),
                None => e["text"].as_str().unwrap().as_bytes().to_vec(),
            };
            (name, bytes)
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const MODES: [(bool, bool); 4] = [(true, false), (true, true), (false, false), (false, true)];
const DETOK: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// llama.cpp's results for each model (`(path, with every token's piece)`), in one Python run.
fn references(models: &[(PathBuf, bool)]) -> Vec<Value> {
    let mut args = vec![data("corpus.json").display().to_string()];
    for (m, pieces) in models {
        args.push(format!("{}{}", if *pieces { "+" } else { "" }, m.display()));
    }
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = common::interop().python(&data("llama_tokenize.py"), &args);
    let v: Value = serde_json::from_str(&out).expect("reference JSON");
    let list = v.as_array().expect("a list").clone();
    assert_eq!(list.len(), models.len());
    list
}

fn load(model: &Path) -> Tokenizer {
    let file = GgufFile::open(model).unwrap();
    Tokenizer::from_metadata(file.metadata()).unwrap_or_else(|e| panic!("{}: {e}", model.display()))
}

/// Every difference between our tokenizer and llama.cpp's reference, one line each; also returns how
/// many (text, mode) pairs llama.cpp tokenized (rather than aborted on).
fn differences(label: &str, tok: &Tokenizer, r: &Value) -> (Vec<String>, usize) {
    let mut diffs = Vec::new();
    let mut compared = 0;
    let texts = corpus();
    for (ti, (name, text)) in texts.iter().enumerate() {
        for (mi, &(add_special, parse_special)) in MODES.iter().enumerate() {
            let want = &r["tokenize"][ti][mi];
            let got = tok.tokenize(text, add_special, parse_special);
            let mode =
                format!("{label} {name} add_special={add_special} parse_special={parse_special}");
            if want.as_str() == Some("abort") {
                if let Ok(ids) = got {
                    diffs.push(format!("{mode}: llama.cpp aborts, we gave {ids:?}"));
                }
                continue;
            }
            compared += 1;
            let want_ids: Vec<u32> = want["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let ids = match got {
                Ok(ids) => ids,
                Err(e) => {
                    diffs.push(format!(
                        "{mode}: llama.cpp gives {want_ids:?}, we fail: {e}"
                    ));
                    continue;
                }
            };
            if ids != want_ids {
                let at = ids
                    .iter()
                    .zip(&want_ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                diffs.push(format!(
                    "{mode}: ids differ at {at}: ours {:?} llama.cpp {:?}",
                    &ids[at..(at + 8).min(ids.len())],
                    &want_ids[at..(at + 8).min(want_ids.len())]
                ));
                continue;
            }
            for (di, &(remove_special, unparse_special)) in DETOK.iter().enumerate() {
                let want_text = hex(want["detokenize"][di].as_str().unwrap());
                let text = tok
                    .detokenize(&ids, remove_special, unparse_special)
                    .unwrap();
                if text != want_text {
                    diffs.push(format!(
                        "{mode} detokenize(remove_special={remove_special}, unparse_special={unparse_special}): ours {:?} llama.cpp {:?}",
                        String::from_utf8_lossy(&text),
                        String::from_utf8_lossy(&want_text)
                    ));
                }
            }
        }
    }
    (diffs, compared)
}

/// Attributes, pieces (when the reference has them), end-of-generation set and BOS/EOS settings.
fn vocab_differences(label: &str, tok: &Tokenizer, r: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let attrs = r["attrs"].as_array().unwrap();
    assert_eq!(attrs.len(), tok.n_tokens(), "{label}: vocabulary size");
    for id in 0..tok.n_tokens() as u32 {
        let want = attrs[id as usize].as_u64().unwrap() as u32;
        if tok.token_attr(id).unwrap() != want {
            diffs.push(format!(
                "{label} token {id} {:?}: attr ours {:#x} llama.cpp {want:#x}",
                tok.token_text(id).unwrap(),
                tok.token_attr(id).unwrap()
            ));
        }
        if r.get("pieces").is_none() {
            continue;
        }
        for (si, special) in [false, true].into_iter().enumerate() {
            let want = hex(r["pieces"][si][id as usize].as_str().unwrap());
            let got = tok.token_to_piece(id, special).unwrap();
            if got != want {
                diffs.push(format!(
                    "{label} token {id} piece(special={special}): ours {got:?} llama.cpp {want:?}"
                ));
            }
        }
    }
    let eog: Vec<u32> = r["eog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    if tok.eog().iter().copied().collect::<Vec<_>>() != eog {
        diffs.push(format!(
            "{label}: end-of-generation ours {:?} llama.cpp {eog:?}",
            tok.eog()
        ));
    }
    let id_or_null = |x: Option<u32>| x.map(i64::from).unwrap_or(-1);
    for (what, ours, key) in [
        ("bos", id_or_null(tok.specials().bos), "bos"),
        ("eos", id_or_null(tok.specials().eos), "eos"),
    ] {
        if r[key].as_i64() != Some(ours) {
            diffs.push(format!("{label}: {what} ours {ours} llama.cpp {}", r[key]));
        }
    }
    if r["add_bos"].as_bool() != Some(tok.adds_bos())
        || r["add_eos"].as_bool() != Some(tok.adds_eos())
    {
        diffs.push(format!("{label}: add_bos/add_eos differ"));
    }
    diffs
}

/// Compares our tokenizer on `model` with llama.cpp's reference `r`; panics listing the first
/// differences. Returns how many (text, mode) pairs llama.cpp tokenized.
fn check(label: &str, model: &Path, r: &Value) -> usize {
    let tok = load(model);
    let (mut diffs, compared) = differences(label, &tok, r);
    diffs.extend(vocab_differences(label, &tok, r));
    for d in diffs.iter().take(40) {
        println!("{d}");
    }
    assert!(
        diffs.is_empty(),
        "{label}: {} differences from llama.cpp (first ones above)",
        diffs.len()
    );
    compared
}

fn check_model(label: &str, model: &Path) -> usize {
    let r = references(&[(model.to_path_buf(), true)]).remove(0);
    check(label, model, &r)
}

#[test]
fn gemma3_matches_llama_cpp() {
    require_interop!();
    let compared = check_model("gemma3-270m", &common::interop().gemma);
    // Every corpus text is encodable with gemma3's byte fallback.
    assert_eq!(compared, corpus().len() * MODES.len());
}

#[test]
fn smollm2_matches_llama_cpp() {
    require_interop!();
    let compared = check_model("SmolLM2-135M", &common::interop().smollm);
    // BPE drops bytes it cannot express; only a code point above U+10FFFF aborts.
    assert_eq!(compared, (corpus().len() - 1) * MODES.len());
}

#[test]
fn fixture_architectures_match_llama_cpp() {
    require_interop!();
    let root = common::repo_root().join("testdata/fixtures");
    let mut archs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("base-f32.gguf").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    archs.sort();
    assert!(archs.len() >= 9, "{archs:?}");
    let models: Vec<(PathBuf, bool)> = archs
        .iter()
        .map(|a| (root.join(a).join("base-f32.gguf"), true))
        .collect();
    let refs = references(&models);
    for ((model, _), (arch, r)) in models.iter().zip(archs.iter().zip(&refs)) {
        let compared = check(arch, model, r);
        // The fixture-alphabet texts (and the empty one) tokenize; the rest abort in llama.cpp.
        assert!(
            compared >= 7 * MODES.len(),
            "{arch}: only {compared} texts compared"
        );
    }
}

/// A metadata-only copy of `src` (vocab_only loading reads no tensors) with `edit` applied.
fn variant(src: &Path, dst: &Path, edit: impl FnOnce(&mut Metadata)) {
    let file = GgufFile::open(src).unwrap();
    let mut md = file.metadata().clone();
    md.remove("general.alignment");
    edit(&mut md);
    GgufWriter::create(dst, &[], 3, 32, &md, &[])
        .unwrap()
        .finish()
        .unwrap();
}

fn set_str(md: &mut Metadata, key: &str, value: &str) {
    md.set(key, Value_::String(value.to_string()));
}

/// One `tokenizer.ggml.pre` per distinct behaviour in llama.cpp's table (pre-tokenizer regexes and
/// the flags the name sets), each on SmolLM2's byte-level vocabulary and merges.
const PRE_TOKENIZERS: [&str; 38] = [
    "default",
    "minicpm5",
    "llama-bpe",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "falcon",
    "gpt-2",
    "starcoder",
    "command-r",
    "jais-2",
    "gemma4",
    "sarvam-moe",
    "qwen2",
    "stablelm2",
    "qwen35",
    "dbrx",
    "poro-chat",
    "bloom",
    "chatglm-bpe",
    "glm4",
    "viking",
    "tekken",
    "exaone-moe",
    "chameleon",
    "gpt-4o",
    "granite-embed-multi-97m",
    "tiny_aya",
    "trillion",
    "bailingmoe",
    "seed-coder",
    "kimi-k2",
    "ufakzeka",
    "grok-2",
    "afmoe",
    "laguna",
];

#[test]
fn pre_tokenizers_and_flags_match_llama_cpp() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    let env = common::interop();
    let mut models = Vec::new();
    let mut labels = Vec::new();
    for pre in PRE_TOKENIZERS {
        let p = dir.path().join(format!("pre-{pre}.gguf"));
        variant(&env.smollm, &p, |md| set_str(md, "tokenizer.ggml.pre", pre));
        // Pieces only where the name changes them (SentencePiece-style whitespace in BPE).
        models.push((p, matches!(pre, "gemma4" | "sarvam-moe")));
        labels.push(format!("pre={pre}"));
    }
    // Settings the metadata of the real models leaves at one value: BOS from the pre-tokenizer's
    // default (no add_bos_token key), no BOS id at all (chatglm), EOS added, the space prefix in SPM,
    // LSTRIP from a name rule, and RSTRIP from the Phi-3 name rule (on the fixture vocabulary, plus
    // the one token that rule needs).
    let mut extra = |label: &str, src: &Path, pieces: bool, edit: &dyn Fn(&mut Metadata)| {
        let p = dir.path().join(format!("{label}.gguf"));
        variant(src, &p, edit);
        models.push((p, pieces));
        labels.push(label.to_string());
    };
    for pre in ["llama-bpe", "tekken", "chameleon"] {
        extra(
            &format!("pre={pre}-bos-default"),
            &env.smollm,
            false,
            &|md| {
                set_str(md, "tokenizer.ggml.pre", pre);
                md.remove("tokenizer.ggml.add_bos_token");
            },
        );
    }
    extra("pre=chatglm-bpe-no-bos-id", &env.smollm, false, &|md| {
        set_str(md, "tokenizer.ggml.pre", "chatglm-bpe");
        md.remove("tokenizer.ggml.bos_token_id");
        md.remove("tokenizer.ggml.add_bos_token");
    });
    extra("smollm-bos-eos", &env.smollm, false, &|md| {
        md.set("tokenizer.ggml.add_bos_token", Value_::Bool(true));
        md.set("tokenizer.ggml.add_eos_token", Value_::Bool(true));
    });
    extra("gemma3-space-prefix-eos-lstrip", &env.gemma, false, &|md| {
        md.set("tokenizer.ggml.add_space_prefix", Value_::Bool(true));
        md.set("tokenizer.ggml.add_eos_token", Value_::Bool(true));
        set_str(md, "tokenizer.ggml.pre", "jina-v2-de");
    });
    let phi3 = common::repo_root().join("testdata/fixtures/phi3/base-f32.gguf");
    extra("phi3-name-rstrip", &phi3, true, &|md| {
        set_str(md, "general.name", "Phi3 test");
        for (key, value) in [
            (
                "tokenizer.ggml.tokens",
                Value_::String("<|endoftext|>".into()),
            ),
            ("tokenizer.ggml.scores", Value_::F32(0.0)),
            ("tokenizer.ggml.token_type", Value_::I32(3)),
        ] {
            let mut a = md.get_array(key).unwrap().clone();
            match (&mut a, value) {
                (Array::String(v), Value_::String(s)) => v.push(s),
                (Array::F32(v), Value_::F32(x)) => v.push(x),
                (Array::I32(v), Value_::I32(x)) => v.push(x),
                _ => unreachable!(),
            }
            md.set(key, Value_::Array(a));
        }
    });
    let refs = references(&models);
    let mut failures = Vec::new();
    for (((model, _), label), r) in models.iter().zip(&labels).zip(&refs) {
        assert!(
            r.get("load_error").is_none(),
            "{label}: llama.cpp refused the file: {r}"
        );
        let result = std::panic::catch_unwind(|| check(label, model, r));
        if result.is_err() {
            failures.push(label.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "differences from llama.cpp for {failures:?}"
    );
}

#[test]
fn unsupported_pre_tokenizers_are_refused_clearly() {
    require_interop!();
    let dir = tempfile::tempdir().unwrap();
    for pre in ["superbpe", "whitespace", "no-such-pre-tokenizer"] {
        let p = dir.path().join("v.gguf");
        variant(&common::interop().smollm, &p, |md| {
            set_str(md, "tokenizer.ggml.pre", pre)
        });
        let file = GgufFile::open(&p).unwrap();
        let err = Tokenizer::from_metadata(file.metadata())
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains(pre) && msg.ends_with("is not supported; pass --tokens"),
            "{msg}"
        );
    }
}

/// Every `tokenizer.ggml.pre` name in llama.cpp's source is accepted (or refused as unsupported
/// only where we say so), so no name in our table can be missing or misspelt.
#[test]
fn every_pre_tokenizer_name_in_llama_cpp_is_known() {
    require_interop!();
    let src =
        std::fs::read_to_string(common::interop().llama_src.join("src/llama-vocab.cpp")).unwrap();
    let names: std::collections::BTreeSet<&str> = src
        .split("tokenizer_pre == \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(names.len() > 80, "{} names found", names.len());
    let smollm = GgufFile::open(&common::interop().smollm).unwrap();
    for name in names {
        let mut md = smollm.metadata().clone();
        set_str(&mut md, "tokenizer.ggml.pre", name);
        match Tokenizer::from_metadata(&md) {
            Ok(_) => {}
            Err(e) if matches!(name, "superbpe" | "whitespace") => {
                assert!(e.to_string().contains("not supported"), "{name}: {e}")
            }
            Err(e) => panic!("pre-tokenizer {name}: {e}"),
        }
    }
}

/// The pre-tokenizer regexes we use are exactly those of llama.cpp's `llm_tokenizer_bpe` (compared as
/// sets of strings, so a character changed in transcription, e.g. by Unicode normalization, fails).
#[test]
fn pre_tokenizer_regexes_match_llama_cpp_source() {
    require_interop!();
    let src =
        std::fs::read_to_string(common::interop().llama_src.join("src/llama-vocab.cpp")).unwrap();
    let start = src.find("switch (vocab.get_pre_type()) {").unwrap();
    let end = start
        + src[start..]
            .find("std::vector<std::string> regex_exprs;")
            .unwrap();
    let mut theirs = std::collections::BTreeSet::new();
    for line in src[start..end].lines().map(str::trim) {
        if line.starts_with("//") {
            continue;
        }
        // C string literals on the line: unescape \\ \" \n \r \t.
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut lit = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => lit.push(match chars.next().unwrap() {
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        other => other,
                    }),
                    c => lit.push(c),
                }
            }
            theirs.insert(lit);
        }
    }
    let ours: std::collections::BTreeSet<String> = gguf_lora::tokenizer::pre_tokenizer_regexes()
        .into_iter()
        .collect();
    assert!(
        theirs.len() > 40,
        "{} regexes found in llama-vocab.cpp",
        theirs.len()
    );
    assert_eq!(ours, theirs);
}

/// `src/tokenizer/unicode_data.rs` is exactly what its generator makes from llama.cpp's tables.
#[test]
fn unicode_tables_match_llama_cpp() {
    require_interop!();
    let env = common::interop();
    let out = env.python(
        &data("gen_unicode_data.py"),
        &[
            env.llama_src.to_str().unwrap(),
            "--check",
            common::repo_root()
                .join("src/tokenizer/unicode_data.rs")
                .to_str()
                .unwrap(),
        ],
    );
    assert_eq!(out.trim(), "ok");
}

// ---- the `tokenize` subcommand ----

fn run_cli(args: &[&str]) -> std::process::Output {
    common::gguf_lora()
        .arg("tokenize")
        .args(args)
        .output()
        .expect("run gguf-lora")
}

fn ids_of(tok: &Tokenizer, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
    tok.tokenize(text.as_bytes(), add_special, parse_special)
        .unwrap()
}

#[test]
fn cli_prints_ids_and_pieces_like_llama_tokenize() {
    require_interop!();
    let env = common::interop();
    let gemma = env.gemma.to_str().unwrap();
    let smollm = env.smollm.to_str().unwrap();
    let text = "<start_of_turn>user\nHi, café 😀<end_of_turn>";
    let tok = load(&env.gemma);

    // Default: BOS as the model says, specials parsed, `%6d -> '%s'` per token.
    let out = run_cli(&[gemma, text]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ids = ids_of(&tok, text, true, true);
    assert_eq!(ids[0], 2, "gemma3 adds <bos>");
    let want: String = ids
        .iter()
        .map(|&id| {
            let piece = String::from_utf8_lossy(tok.token_to_piece(id, true).unwrap()).into_owned();
            format!("{id:6} -> '{piece}'\n")
        })
        .collect();
    assert_eq!(stdout, want);
    assert!(stdout.contains("   105 -> '<start_of_turn>'\n"), "{stdout}");

    // --ids-only --no-bos: a Python-style list, without BOS.
    let out = run_cli(&[gemma, text, "--ids-only", "--no-bos"]);
    let listed: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, ids_of(&tok, text, false, true));
    assert_eq!(listed, ids[1..]);

    // --no-special: control-token texts are plain text.
    let smol = load(&env.smollm);
    let out = run_cli(&[smollm, "<|im_start|>user", "--ids-only", "--no-special"]);
    let listed: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, ids_of(&smol, "<|im_start|>user", true, false));
    assert!(!listed.contains(&1), "{listed:?}");
    let out = run_cli(&[smollm, "<|im_start|>user", "--ids-only"]);
    let listed: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0], 1);

    // --json: exactly one object; a piece that is part of a UTF-8 sequence carries its bytes.
    let out = run_cli(&[smollm, "é😀", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON value");
    assert_eq!(v["tokenizer"], "gpt2");
    assert_eq!(v["pre_tokenizer"], "smollm");
    let got: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, ids_of(&smol, "é😀", true, true));
    assert_eq!(v["n_tokens"].as_u64().unwrap() as usize, got.len());
    let bytes: Vec<u8> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| match t.get("bytes") {
            Some(b) => b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect(),
            None => t["piece"].as_str().unwrap().as_bytes().to_vec(),
        })
        .collect();
    assert_eq!(bytes, "é😀".as_bytes());

    // --file reads the text from a file, byte for byte.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prompt.txt");
    std::fs::write(&f, "line one\n\tline two\n").unwrap();
    let out = run_cli(&[smollm, "--file", f.to_str().unwrap(), "--ids-only"]);
    let listed: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, ids_of(&smol, "line one\n\tline two\n", true, true));
}

#[test]
fn cli_errors_are_one_line_and_exit_1() {
    require_interop!();
    let fixture = common::repo_root().join("testdata/fixtures/llama/base-f32.gguf");
    let fixture = fixture.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unsupported = dir.path().join("superbpe.gguf");
    variant(&common::interop().smollm, &unsupported, |md| {
        set_str(md, "tokenizer.ggml.pre", "superbpe")
    });
    let missing = dir.path().join("missing.gguf");
    let cases: [(&[&str], &str); 3] = [
        // The fixture vocabulary has no 'H' and no byte tokens: llama.cpp aborts, we refuse.
        (&[fixture, "Hello"], "cannot tokenize byte 0x48 ('H')"),
        (
            &[unsupported.to_str().unwrap(), "x"],
            "pre-tokenizer 'superbpe'",
        ),
        (&[missing.to_str().unwrap(), "x"], "missing.gguf"),
    ];
    for (args, expect) in cases {
        let out = run_cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(expect) && !stderr.contains("panicked"),
            "{stderr}"
        );
        assert!(stderr.contains(args[0]), "names the file: {stderr}");
    }
    // Usage errors exit 2.
    assert_eq!(run_cli(&[fixture]).status.code(), Some(2));
    assert_eq!(
        run_cli(&[fixture, "x", "--ids-only", "--json"])
            .status
            .code(),
        Some(2)
    );
}

/// llama-tokenize's spellings (`-m MODEL -p PROMPT`, `--ids`, `--no-parse-special`) give what the
/// positional form gives; leftovers and missing pieces are usage errors.
#[test]
fn cli_takes_llama_tokenize_spellings() {
    let fixture = common::repo_root().join("testdata/fixtures/llama/base-f32.gguf");
    let m = fixture.to_str().unwrap();
    let text = "the cat sat";
    let ok = |args: &[&str]| {
        let out = run_cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let want = ok(&[m, text]);
    assert!(want.starts_with("     1 -> '<s>'\n"), "{want}");
    assert_eq!(ok(&["-m", m, "-p", text]), want);
    assert_eq!(ok(&["--model", m, "--prompt", text]), want);
    assert_eq!(ok(&["-m", m, text]), want);
    assert_eq!(ok(&[m, "-p", text]), want);
    let ids = ok(&["-m", m, "-p", text, "--ids"]);
    assert_eq!(ids, ok(&[m, text, "--ids-only"]));
    let listed: Vec<u32> = serde_json::from_str(&ids).unwrap();
    assert_eq!(listed.len(), want.lines().count());
    // (The fixture cannot spell "<s>"; the flag's effect is tested on SmolLM2 above.)
    assert_eq!(
        ok(&["-m", m, "-p", text, "--no-parse-special", "--no-bos"]),
        ok(&[m, text, "--no-special", "--no-bos"])
    );
    assert!(!ok(&[m, text, "--no-bos"]).contains("'<s>'"));
    for bad in [
        &["-m", m][..],
        &["-p", text][..],
        &["-m", m, "-p", text, "extra"][..],
        &[m, text, "extra"][..],
        &["-m", m, "-p", text, "--file", m][..],
    ] {
        let out = run_cli(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
}
