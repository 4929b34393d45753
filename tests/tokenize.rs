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

use gguf_lora::gguf::GgufFile;
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

fn reference(model: &Path, pieces: bool) -> Value {
    let mut args = vec![
        "reference".to_string(),
        data("corpus.json").display().to_string(),
        model.display().to_string(),
    ];
    if pieces {
        args.push("--pieces".into());
    }
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = common::interop().python(&data("llama_tokenize.py"), &args);
    serde_json::from_str(&out).expect("reference JSON")
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

/// Pieces, attributes and special ids of every token.
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

fn check_model(label: &str, model: &Path) -> usize {
    let r = reference(model, true);
    let tok = load(model);
    let (mut diffs, compared) = differences(label, &tok, &r);
    diffs.extend(vocab_differences(label, &tok, &r));
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

#[test]
fn gemma3_matches_llama_cpp() {
    let compared = check_model("gemma3-270m", &common::interop().gemma);
    // Every corpus text is encodable with gemma3's byte fallback.
    assert_eq!(compared, corpus().len() * MODES.len());
}

#[test]
fn smollm2_matches_llama_cpp() {
    let compared = check_model("SmolLM2-135M", &common::interop().smollm);
    // BPE drops bytes it cannot express; only a code point above U+10FFFF aborts.
    assert_eq!(compared, (corpus().len() - 1) * MODES.len());
}

#[test]
fn fixture_architectures_match_llama_cpp() {
    let root = common::repo_root().join("testdata/fixtures");
    let mut archs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("base-f32.gguf").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    archs.sort();
    assert!(archs.len() >= 9, "{archs:?}");
    for arch in &archs {
        let compared = check_model(arch, &root.join(arch).join("base-f32.gguf"));
        // The fixture-alphabet texts (and the empty one) tokenize; the rest abort in llama.cpp.
        assert!(
            compared >= 7 * MODES.len(),
            "{arch}: only {compared} texts compared"
        );
    }
}
