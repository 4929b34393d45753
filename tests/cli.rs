//! The command-line contract where issue 12 found it broken: outputs that are not regular files,
//! closed or full stdout, debug text in messages, directories where files are expected, usage
//! errors (exit 2), llama.cpp's flag spellings, and what the summaries say. Every case runs on the
//! committed tiny llama fixture (no interop environment) and fails if its bug comes back.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{gguf_lora, listing, repo_root};

fn fx(rel: &str) -> String {
    repo_root()
        .join("testdata/fixtures/llama")
        .join(rel)
        .display()
        .to_string()
}

fn base() -> String {
    fx("base-f32.gguf")
}

fn gguf_adapter() -> String {
    fx("adapters/standard/ref_convert.gguf")
}

fn peft_adapter() -> String {
    fx("adapters/standard")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(args: &[String]) -> Run {
    let out = gguf_lora().args(args).output().expect("run gguf-lora");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// A named bundle of the standard adapter, for `--extract`.
fn make_bundle(dir: &Path) -> String {
    let b = dir.join("lib.gguf");
    let r = run(&args(&[
        "bundle",
        "--mode",
        "named",
        &format!("std={}", gguf_adapter()),
        "-o",
        &s(&b),
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    s(&b)
}

/// Every subcommand that writes a file, without its `-o TARGET`.
fn writers(bundle: &str) -> Vec<Vec<String>> {
    vec![
        args(&["merge", &base(), "--lora", &gguf_adapter()]),
        args(&["convert", &peft_adapter(), "--base", &base()]),
        args(&["quantize", &base(), "--type", "q8_0"]),
        args(&["bundle", &gguf_adapter()]),
        args(&["bundle", "--extract", "std", bundle]),
        args(&[
            "extract",
            &base(),
            &fx("adapters/modules_to_save/merged-f32.gguf"),
            "--rank",
            "4",
        ]),
    ]
}

fn with_out(cmd: &[String], target: &Path) -> Vec<String> {
    let mut v = cmd.to_vec();
    v.extend(["-o".to_string(), s(target)]);
    v
}

/// Bug 1: a FIFO (or `-`) as the output is refused, never replaced by the rename.
#[test]
fn an_output_that_is_not_a_regular_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = make_bundle(dir.path());
    let d = dir.path().join("w");
    std::fs::create_dir(&d).unwrap();
    let fifo = d.join("out.gguf");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for cmd in writers(&bundle) {
        let r = run(&with_out(&cmd, &fifo));
        assert_eq!(r.code, Some(1), "{cmd:?}: {}", r.stderr);
        assert!(r.stderr.contains("is a FIFO"), "{cmd:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(listing(&d), ["out.gguf"], "{cmd:?}");
    }
    let r = run(&with_out(&writers(&bundle)[0], Path::new("-")));
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("to stdout is not supported"),
        "{}",
        r.stderr
    );
}

/// Bug 2: a directory as the output is refused before any work and leaves no temporary file.
#[test]
fn a_directory_as_the_output_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = make_bundle(dir.path());
    let d = dir.path().join("w");
    let target = d.join("out.gguf");
    std::fs::create_dir_all(&target).unwrap();
    for cmd in writers(&bundle) {
        let r = run(&with_out(&cmd, &target));
        assert_eq!(r.code, Some(1), "{cmd:?}: {}", r.stderr);
        assert!(r.stderr.contains("is a directory"), "{cmd:?}: {}", r.stderr);
        assert_eq!(
            listing(&d),
            ["out.gguf"],
            "{cmd:?}: a temporary file was left"
        );
        assert!(listing(&target).is_empty());
    }
}

/// Every subcommand, printing (the writers with a fresh output each).
fn printers(dir: &Path, bundle: &str) -> Vec<Vec<String>> {
    let mut v = vec![
        args(&["inspect", &base()]),
        args(&["inspect", &gguf_adapter(), "--base", &base(), "--json"]),
        args(&[
            "verify",
            &base(),
            "--lora",
            &gguf_adapter(),
            "--tokens",
            "1,5,9",
        ]),
        args(&["tokenize", &base(), "hello world"]),
    ];
    for (i, cmd) in writers(bundle).into_iter().enumerate() {
        v.push(with_out(&cmd, &dir.join(format!("p{i}.gguf"))));
    }
    v
}

/// Bug 3: a stdout closed early is not an error (exit 0, no panic); a full one is exit 1 naming
/// stdout.
#[test]
fn closed_or_full_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = make_bundle(dir.path());
    let bin = assert_cmd::cargo::cargo_bin("gguf-lora");
    for (k, cmd) in printers(dir.path(), &bundle).into_iter().enumerate() {
        for json in [false, true] {
            let mut cmd = cmd.clone();
            if json && !cmd.contains(&"--json".to_string()) {
                cmd.push("--json".into());
            }
            // `| true` closes the pipe at once: the write fails with EPIPE.
            let out = Command::new("bash")
                .arg("-c")
                .arg("\"$@\" | true; exit ${PIPESTATUS[0]}")
                .arg("bash")
                .arg(&bin)
                .args(&cmd)
                .env("RUST_BACKTRACE", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{k} {cmd:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{cmd:?}: {stderr}");
        }
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(&bin).args(&cmd).stdout(full).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to stdout"),
            "{cmd:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{cmd:?}: {stderr}");
    }
}

/// Bug 4: no Rust debug text (`Some(..)`, enum variant names, byte arrays) in messages or JSON.
#[test]
fn messages_speak_the_user_s_terms() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qwen = repo_root()
        .join("testdata/fixtures/qwen2/base-f32.gguf")
        .display()
        .to_string();
    let junk = d.join("junk.gguf");
    std::fs::write(&junk, [0xd8, 0xfb, 0x24, 0xb7, 0, 0, 0, 0]).unwrap();
    let q4 = d.join("q4.gguf");
    let r = run(&args(&[
        "quantize",
        &base(),
        "--type",
        "q4_0",
        "-o",
        &s(&q4),
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let o = s(&d.join("o.gguf"));
    let cases = [
        args(&["convert", &gguf_adapter(), "--base", &qwen, "-o", &o]),
        args(&["inspect", &gguf_adapter(), "--base", &qwen, "--json"]),
        args(&["inspect", &gguf_adapter(), "--base", &qwen]),
        args(&["convert", &base(), "-o", &o]),
        args(&["merge", &base(), "--lora", &base(), "-o", &o]),
        args(&["inspect", &s(&junk)]),
        args(&["bundle", "--extract", "x", &gguf_adapter(), "-o", &o]),
        args(&["tokenize", &base(), "Hello"]),
        args(&["tokenize", &s(&junk), "x"]),
        // 4-bit outputs: no absolute KL limit, no top-1 limit.
        args(&[
            "verify",
            &s(&q4),
            "--lora",
            &gguf_adapter(),
            "--merged",
            &s(&q4),
        ]),
        args(&[
            "verify",
            &s(&q4),
            "--lora",
            &gguf_adapter(),
            "--merged",
            &s(&q4),
            "--json",
        ]),
    ];
    for cmd in cases {
        let r = run(&cmd);
        assert!(r.code != Some(0), "{cmd:?} should be refused or fail");
        let text = format!("{}{}", r.stdout, r.stderr);
        for debug in [
            "Some(",
            "None",
            "Float)",
            "Bits8",
            "Bits5To6",
            "Bits4OrLess",
            "<= inf",
            ">= 0.00",
            "[d8",
        ] {
            assert!(!text.contains(debug), "{cmd:?} prints {debug:?}:\n{text}");
        }
    }
    // Magic bytes as text and hex; the architecture by name.
    let r = run(&args(&["inspect", &s(&junk)]));
    assert!(r.stderr.contains("d8 fb 24 b7"), "{}", r.stderr);
    let r = run(&args(&[
        "convert",
        &gguf_adapter(),
        "--base",
        &qwen,
        "-o",
        &o,
    ]));
    assert!(
        r.stderr
            .contains("the adapter is for 'llama', the base is 'qwen2'"),
        "{}",
        r.stderr
    );
}

/// Bug 5: a directory where a file is expected gets one clear message in every subcommand.
#[test]
fn a_directory_where_a_file_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = s(&empty);
    let o = s(&d.join("o.gguf"));
    let as_base = [
        args(&["merge", &e, "--lora", &gguf_adapter(), "-o", &o]),
        args(&["quantize", &e, "--type", "q8_0", "-o", &o]),
        args(&["verify", &e, "--lora", &gguf_adapter()]),
        args(&["convert", &peft_adapter(), "--base", &e, "-o", &o]),
        args(&["bundle", &gguf_adapter(), "--base", &e, "-o", &o]),
        args(&["inspect", &gguf_adapter(), "--base", &e]),
        args(&["tokenize", &e, "hello"]),
    ];
    for cmd in as_base {
        let r = run(&cmd);
        assert_eq!(r.code, Some(1), "{cmd:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("{e}: is a directory, expected a GGUF file")),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    let as_adapter = [
        args(&["merge", &base(), "--lora", &e, "-o", &o]),
        args(&["convert", &e, "--base", &base(), "-o", &o]),
        args(&["verify", &base(), "--lora", &e]),
        args(&["bundle", &e, "--base", &base(), "-o", &o]),
        args(&["inspect", &e, "--base", &base()]),
        args(&["inspect", &e]),
    ];
    for cmd in as_adapter {
        let r = run(&cmd);
        assert_eq!(r.code, Some(1), "{cmd:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "{e}: no adapter_model.safetensors in this directory"
            )),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    // extract takes HF checkpoint directories too: an empty one is neither kind.
    let r = run(&args(&["extract", &e, &base(), "-o", &o]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{e}: neither a GGUF file nor an HF safetensors checkpoint"
        )),
        "{}",
        r.stderr
    );
    assert!(!d.join("o.gguf").exists());
}

/// Bug 6: usage errors exit 2, in every subcommand, whether clap or the command finds them.
#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = s(&dir.path().join("o.gguf"));
    let (b, a) = (base(), gguf_adapter());
    let cases = [
        args(&["merge", &b, "-o", &o]),
        args(&["merge", &b, "--lora", &a, "--outtype", "q4_k_m", "-o", &o]),
        args(&["merge", &b, "--lora", &a, "--promote", "banana", "-o", &o]),
        args(&["merge", &b, "--lora-scaled", &format!("{a}:abc"), "-o", &o]),
        args(&[
            "merge",
            &b,
            "--lora",
            &a,
            "--outtype",
            "q8_0",
            "--promote",
            "auto",
            "-o",
            &o,
        ]),
        args(&["verify", &b, "--lora", &a, "--n-tokens", "0"]),
        args(&["verify", &b]),
        args(&["quantize", &b, "--type", "q4_k_m", "-o", &o]),
        args(&["convert", &peft_adapter(), "--arch", "gpt2", "-o", &o]),
        args(&["bundle", "--extract", "x", &a, &a, "-o", &o]),
        args(&["bundle", "a#b=x.gguf", "-o", &o]),
        args(&["inspect"]),
        args(&["tokenize", &b]),
        args(&["tokenize", &b, "x", "--ids-only", "--json"]),
        args(&["extract", &b, &b, "--rank", "0", "-o", &o]),
        args(&["extract", &b, &b, "--rank", "auto:2", "-o", &o]),
        args(&["extract", &b, "-o", &o]),
    ];
    // The adapter weight is a share: out of 0..=1, or not a number, is the user's mistake.
    let weights = [
        "--adapter-weight=1.5",
        "--adapter-weight=-0.1",
        "--adapter-weight=much",
    ]
    .map(|w| args(&["merge", &b, "--lora", &a, w, "-o", &o]));
    for cmd in cases.into_iter().chain(weights) {
        let r = run(&cmd);
        assert_eq!(r.code, Some(2), "{cmd:?}: {}", r.stderr);
        assert!(!r.stderr.is_empty());
    }
    assert!(!dir.path().join("o.gguf").exists());
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// llama.cpp's spellings: -m/--model for the base, -t/--threads, --output-file; same effect.
#[test]
fn llama_cpp_flag_spellings_work_like_ours() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (b, a) = (base(), gguf_adapter());
    for (ours, theirs) in [
        (
            args(&[
                "merge",
                &b,
                "--lora",
                &a,
                "--threads",
                "2",
                "-o",
                &s(&p("m1.gguf")),
            ]),
            args(&[
                "merge",
                "-m",
                &b,
                "--lora",
                &a,
                "-t",
                "2",
                "--output-file",
                &s(&p("m2.gguf")),
            ]),
        ),
        (
            args(&["quantize", &b, "--type", "q8_0", "-o", &s(&p("q1.gguf"))]),
            args(&[
                "quantize",
                "--model",
                &b,
                "--type",
                "q8_0",
                "--output-file",
                &s(&p("q2.gguf")),
            ]),
        ),
        (
            args(&[
                "convert",
                &peft_adapter(),
                "--base",
                &b,
                "-o",
                &s(&p("c1.gguf")),
            ]),
            args(&[
                "convert",
                &peft_adapter(),
                "-m",
                &b,
                "--output-file",
                &s(&p("c2.gguf")),
            ]),
        ),
    ] {
        let (r1, r2) = (run(&ours), run(&theirs));
        assert_eq!(
            (r1.code, r2.code),
            (Some(0), Some(0)),
            "{}{}",
            r1.stderr,
            r2.stderr
        );
    }
    for (x, y) in [("m1", "m2"), ("q1", "q2"), ("c1", "c2")] {
        assert!(
            bytes(&p(&format!("{x}.gguf"))) == bytes(&p(&format!("{y}.gguf"))),
            "{x} != {y}"
        );
    }
    let v = |model_flag: bool| {
        let mut cmd = args(&["verify"]);
        if model_flag {
            cmd.push("--model".into());
        }
        cmd.extend(args(&[
            &b, "--lora", &a, "--tokens", "1,5,9", "-t", "1", "--json",
        ]));
        let r = run(&cmd);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let mut j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        j["report"]["timings"] = serde_json::Value::Null;
        j
    };
    assert_eq!(v(false), v(true));
}

/// What the summaries say: what went in, promotions that changed nothing, grouped fallbacks,
/// plurals, the usual permissions of the logits files.
#[test]
fn summaries_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| s(&dir.path().join(n));
    let (b, a) = (base(), gguf_adapter());
    let r = run(&args(&[
        "merge",
        &fx("base-f16.gguf"),
        "--lora-scaled",
        &format!("{a}:-0.5"),
        "--promote",
        "q4_0",
        "-o",
        &p("m.gguf"),
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains(&a), "{}", r.stdout);
    assert!(r.stdout.contains("-0.5"), "{}", r.stdout);
    assert!(
        r.stdout.contains("(negative: subtracts the adapter)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("--promote q4_0: no tensor promoted"),
        "{}",
        r.stdout
    );

    // 64- and 128-wide rows cannot hold 256-element q4_K blocks: grouped, summary last.
    let r = run(&args(&[
        "quantize",
        &b,
        "--type",
        "q4_k",
        "-o",
        &p("q.gguf"),
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("fallback: ") && l.contains("with 64-wide rows → q5_0")),
        "{}",
        r.stdout
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("fallback")).count(),
        2
    );
    assert!(lines.last().unwrap().starts_with("wrote "), "{}", r.stdout);

    let r = run(&args(&["bundle", &a, "-o", &p("b.gguf")]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("1 adapter,"), "{}", r.stdout);

    let logits = dir.path().join("logits");
    let out = Command::new("bash")
        .arg("-c")
        .arg("umask 022 && exec \"$@\"")
        .arg("bash")
        .arg(assert_cmd::cargo::cargo_bin("gguf-lora"))
        .args([
            "verify",
            &b,
            "--lora",
            &a,
            "--tokens",
            "1,2",
            "--logits-out",
        ])
        .arg(&logits)
        .output()
        .unwrap();
    assert!(out.status.code() == Some(0) || out.status.code() == Some(3));
    for f in ["base.npy", "runtime.npy", "merged.npy"] {
        let mode = std::fs::metadata(logits.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{f}: {mode:o}");
    }
}

/// One wording for shared flags, possible values listed, subcommands in the README's order.
#[test]
fn help_is_consistent() {
    let help = |cmd: &[&str]| {
        let mut a = args(cmd);
        a.push("--help".into());
        let r = run(&a);
        assert_eq!(r.code, Some(0), "{cmd:?}");
        r.stdout
    };
    let top = help(&[]);
    let order: Vec<usize> = [
        "convert", "merge", "inspect", "bundle", "quantize", "extract", "verify", "tokenize",
    ]
    .iter()
    .map(|c| {
        top.find(&format!("  {c}"))
            .unwrap_or_else(|| panic!("{c} in {top}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{top}");
    // Flags shared by several subcommands read the same in each.
    let mut with_threads = Vec::new();
    for cmd in [
        "convert", "merge", "inspect", "bundle", "quantize", "extract", "verify", "tokenize",
    ] {
        let h = help(&[cmd]);
        assert!(
            h.contains("Print exactly one JSON object on stdout instead of"),
            "{cmd}: {h}"
        );
        if h.contains("-t, --threads <N>") {
            assert!(
                h.contains("Worker threads (default: all cores)"),
                "{cmd}: {h}"
            );
            with_threads.push(cmd);
        }
        if h.contains("-o, --output <OUT.gguf>") {
            assert!(h.contains("[alias: --output-file]"), "{cmd}: {h}");
        }
    }
    assert_eq!(with_threads, ["merge", "quantize", "extract", "verify"]);
    let merge = help(&["merge"]);
    assert!(merge.contains("keep, f32, f16, bf16, q8_0"), "{merge}");
}

/// `merge --help` states the calibration-token rule as text (clap's doc comments cannot take the
/// constants): it must say what `calibrate::default_tokens` does.
#[test]
fn merge_help_states_the_default_calibration_tokens() {
    use gguf_lora::calibrate::{DEFAULT_TOKENS, DEFAULT_TOKENS_LARGE, LARGE_BASE_WEIGHTS};
    let out = gguf_lora().args(["merge", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let rule = format!(
        "[default: {DEFAULT_TOKENS}, or {DEFAULT_TOKENS_LARGE} for a base whose layers hold over {}B weights]",
        LARGE_BASE_WEIGHTS / 1_000_000_000
    );
    assert!(help.contains(&rule), "{rule} not in: {help}");
}
