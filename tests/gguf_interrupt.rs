//! Ctrl-C during a write leaves neither the output nor a temporary file, and exits with 130; a
//! failed write leaves nothing either; an output equal to an input is refused.

mod common;

use common::listing;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn interrupt_mid_write(signal: &str) {
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    // The test hook sleeps 20 ms after each of SmolLM2's 272 tensors: a real write, slowed down
    // so the signal lands while the temporary file is half written.
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("gguf-lora"))
        .args(["rewrite"])
        .arg(&env.smollm)
        .arg("-o")
        .arg(&out)
        .env("GGUF_LORA_TEST_SLOW_WRITE_MS", "20")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary file exists and has tensor data in it.
    let start = Instant::now();
    loop {
        let temp = listing(dir.path())
            .into_iter()
            .find(|n| n.ends_with(".tmp"));
        if let Some(t) = temp {
            let len = std::fs::metadata(dir.path().join(&t))
                .map(|m| m.len())
                .unwrap_or(0);
            if len > 1 << 20 {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "writer finished before it could be interrupted"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let kill = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        listing(dir.path()),
        Vec::<String>::new(),
        "no output and no temp file remain"
    );
}

#[test]
fn sigint_mid_write_leaves_nothing() {
    require_interop!();
    interrupt_mid_write("-INT");
}

#[test]
fn sigterm_mid_write_leaves_nothing() {
    require_interop!();
    interrupt_mid_write("-TERM");
}

#[test]
fn output_equal_to_input_is_refused_and_input_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.gguf");
    std::fs::copy(
        common::repo_root().join("testdata/gguf/minimal.gguf"),
        &input,
    )
    .unwrap();
    let before = std::fs::read(&input).unwrap();
    let via = dir.path().join(".").join("in.gguf");
    let out = common::gguf_lora()
        .arg("rewrite")
        .arg(&input)
        .arg("-o")
        .arg(&via)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("output is the same file as input"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(listing(dir.path()), ["in.gguf"]);
}

#[test]
fn a_failed_write_leaves_nothing() {
    // A target in a missing directory: a clear error naming it, nothing written anywhere.
    let dir = tempfile::tempdir().unwrap();
    let out = common::gguf_lora()
        .arg("rewrite")
        .arg(common::repo_root().join("testdata/gguf/minimal.gguf"))
        .arg("-o")
        .arg(dir.path().join("missing/out.gguf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("missing/out.gguf: cannot create a temporary file"),
        "{stderr}"
    );
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}
