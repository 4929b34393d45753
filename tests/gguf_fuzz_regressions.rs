//! Replays every input in fuzz/regressions (inputs that once made the fuzzer fail, see fuzz/README.md)
//! and the committed fixtures through the reader with the fuzz target's checks: an error or a
//! consistent file, never a panic.

use std::path::Path;

use gguf_lora::gguf::GgufFile;

fn check(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let len = bytes.len() as u64;
    if let Ok(f) = GgufFile::from_bytes(path, bytes) {
        for t in f.tensors() {
            assert_eq!(
                f.tensor_data(t).len() as u64,
                t.n_bytes(),
                "{}",
                path.display()
            );
            assert!(f.data_offset() + t.offset + t.n_bytes() <= len);
        }
        assert!(f.alignment().is_power_of_two());
    }
}

#[test]
fn fuzz_regressions_and_fixtures_do_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["fuzz/regressions", "testdata/gguf"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension()
                .is_some_and(|e| e == "md" || e == "py" || e == "json")
            {
                continue;
            }
            check(&p);
            n += 1;
        }
    }
    assert!(n >= 2);
}
