//! Malformed GGUF files, made byte by byte here, each rejected by `gguf-lora inspect` with exit 1 and
//! a one-line message naming the file and the problem, without a panic, under a 1 GB address-space
//! limit (`ulimit -v`) so that trusting a lying count with a giant allocation would fail the test.

mod common;

use std::path::Path;

use common::{inspect_limited, refusal_failures};

/// Builds GGUF bytes field by field.
#[derive(Clone, Default)]
struct G(Vec<u8>);

impl G {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> G {
        let mut g = G(b"GGUF".to_vec());
        g.u32(version).u64(n_tensors).u64(n_kv);
        g
    }
    fn u8(&mut self, v: u8) -> &mut G {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut G {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut G {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut G {
        self.0.extend_from_slice(b);
        self
    }
    fn s(&mut self, s: &str) -> &mut G {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut G {
        self.s(key).u32(4).u32(v)
    }
    /// A tensor info: name, dims, ggml type id, offset.
    fn ti(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut G {
        self.s(name).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, align: usize) -> &mut G {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn zeros(&mut self, n: usize) -> &mut G {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

const F32: u32 = 0;
const Q8_0: u32 = 8;

/// A well-formed file with one key and two F32 tensors, for mutation.
fn valid() -> G {
    let mut g = G::header(3, 2, 1);
    g.kv_u32("general.alignment", 32)
        .ti("a", &[4], F32, 0)
        .ti("b", &[8], F32, 32)
        .pad(32)
        .zeros(16 + 16 + 32);
    g
}

fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut c: Vec<(&'static str, Vec<u8>, &'static str)> = Vec::new();
    let mut add = |name, g: &G, expect| c.push((name, g.0.clone(), expect));

    add("empty", &G::default(), "not a GGUF file");
    add(
        "wrong_magic",
        G::default().raw(b"GGML").u32(3),
        "not a GGUF file",
    );
    add(
        "no_version",
        G::default().raw(b"GGUF").u8(3),
        "truncated: version",
    );
    add(
        "version_1",
        &G::header(1, 0, 0),
        "unsupported GGUF version 1",
    );
    add(
        "version_0",
        &G::header(0, 0, 0),
        "unsupported GGUF version 0",
    );
    add(
        "version_4",
        &G::header(4, 0, 0),
        "unsupported GGUF version 4",
    );
    add(
        "big_endian",
        &G::header(3u32.swap_bytes(), 0, 0),
        "big-endian",
    );
    add(
        "no_counts",
        G::default().raw(b"GGUF").u32(3).u32(0),
        "truncated: tensor count",
    );
    add(
        "lying_kv_count",
        &G::header(3, 0, u64::MAX),
        "metadata key-value count",
    );
    add(
        "lying_tensor_count",
        &G::header(3, 1 << 40, 0),
        "tensor info count",
    );
    add(
        "lying_key_length",
        G::header(3, 0, 1).u64(u64::MAX - 3).raw(b"k").zeros(32),
        "truncated: metadata key 0",
    );
    add(
        "empty_key",
        G::header(3, 0, 1).s("").u32(4).u32(1),
        "metadata key 0 is empty",
    );
    add(
        "duplicate_key",
        G::header(3, 0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2),
        "duplicate metadata key 'a.b'",
    );
    add(
        "unknown_value_type",
        G::header(3, 0, 1).s("k").u32(13).u32(0),
        "unknown value type id 13",
    );
    add(
        "nested_array",
        G::header(3, 0, 1).s("k").u32(9).u32(9).u64(1),
        "nested array",
    );
    add(
        "lying_array_count",
        G::header(3, 0, 1)
            .s("k")
            .u32(9)
            .u32(4)
            .u64(u64::MAX / 2)
            .u32(1),
        "array of metadata key 'k' count",
    );
    add(
        "lying_string_array_count",
        G::header(3, 0, 1)
            .s("tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(1 << 40)
            .s("a"),
        "array of metadata key 'tokenizer.ggml.tokens' count",
    );
    add(
        "lying_string_length",
        G::header(3, 0, 1).s("k").u32(8).u64(1 << 50).raw(b"abc"),
        "truncated: value of metadata key 'k'",
    );
    add(
        "bad_bool",
        G::header(3, 0, 1).s("k").u32(7).u8(2),
        "boolean byte 2",
    );
    add(
        "bad_utf8",
        G::header(3, 0, 1).s("k").u32(8).u64(2).raw(&[0xff, 0xfe]),
        "not valid UTF-8",
    );
    add(
        "truncated_value",
        G::header(3, 0, 1).s("k").u32(10).u32(1),
        "truncated: value of metadata key 'k'",
    );
    add(
        "alignment_wrong_type",
        G::header(3, 0, 1).s("general.alignment").u32(10).u64(32),
        "general.alignment' must be of type u32",
    );
    add(
        "alignment_zero",
        G::header(3, 0, 1).kv_u32("general.alignment", 0),
        "general.alignment 0 is invalid",
    );
    add(
        "alignment_not_pow2",
        G::header(3, 0, 1).kv_u32("general.alignment", 48),
        "general.alignment 48 is invalid",
    );
    add(
        "alignment_too_large",
        G::header(3, 0, 1).kv_u32("general.alignment", 1 << 21),
        "general.alignment 2097152 is invalid",
    );
    let long = "x".repeat(64);
    let long: &'static str = Box::leak(long.into_boxed_str());
    add(
        "name_64_bytes",
        G::header(3, 1, 0).ti(long, &[4], F32, 0).pad(32).zeros(16),
        "64 bytes long",
    );
    add(
        "duplicate_tensor",
        G::header(3, 2, 0)
            .ti("t", &[4], F32, 0)
            .ti("t", &[4], F32, 32)
            .pad(32)
            .zeros(64),
        "duplicate tensor name 't'",
    );
    add(
        "five_dims",
        G::header(3, 1, 0)
            .ti("t", &[1, 1, 1, 1, 1], F32, 0)
            .pad(32)
            .zeros(4),
        "tensor 't' has 5 dimensions",
    );
    add(
        "retired_type",
        G::header(3, 1, 0).ti("t", &[4], 4, 0).pad(32).zeros(16),
        "tensor 't' has unknown ggml type id 4",
    );
    add(
        "unknown_type",
        G::header(3, 1, 0).ti("t", &[4], 1000, 0).pad(32).zeros(16),
        "unknown ggml type id 1000",
    );
    add(
        "row_not_block_multiple",
        G::header(3, 1, 0).ti("t", &[33], Q8_0, 0).pad(32).zeros(64),
        "33 elements per row, not a multiple of the block size 32",
    );
    add(
        "shape_overflow",
        G::header(3, 1, 0)
            .ti("t", &[1 << 32, 1 << 32], F32, 0)
            .pad(32),
        "element count overflows",
    );
    add(
        "data_out_of_range",
        G::header(3, 1, 0)
            .ti("t", &[1 << 30, 4], F32, 0)
            .pad(32)
            .zeros(16),
        "tensor 't' data (offset 0, 17179869184 bytes) runs past the end",
    );
    add(
        "offset_past_end",
        G::header(3, 1, 0)
            .ti("t", &[4], F32, u64::MAX - 8)
            .pad(32)
            .zeros(16),
        "runs past the end",
    );
    add(
        "overlapping_tensors",
        G::header(3, 2, 0)
            .ti("a", &[8], F32, 0)
            .ti("b", &[8], F32, 16)
            .pad(32)
            .zeros(64),
        "tensor 'b' data at offset 16 overlaps tensor 'a'",
    );
    add(
        "gap_between_tensors",
        G::header(3, 2, 0)
            .ti("a", &[4], F32, 0)
            .ti("b", &[4], F32, 64)
            .pad(32)
            .zeros(96),
        "tensor 'b' has offset 64, expected 32",
    );
    add(
        "misaligned_first_tensor",
        G::header(3, 1, 0).ti("a", &[4], F32, 4).pad(32).zeros(32),
        "tensor 'a' has offset 4, expected 0",
    );
    let mut truncated_data = valid();
    truncated_data.0.truncate(truncated_data.0.len() - 1);
    add(
        "truncated_tensor_data",
        &truncated_data,
        "tensor 'b' data (offset 32, 32 bytes) runs past the end",
    );
    let mut cut_infos = valid();
    // Header 24 + key 33 + tensor info 'a' 33 bytes; cut inside 'b''s first dimension.
    cut_infos.0.truncate(110);
    add(
        "truncated_tensor_infos",
        &cut_infos,
        "truncated: dimension 0 of tensor 'b'",
    );
    add(
        "truncated_before_data",
        G::header(3, 1, 0).ti("t", &[4], F32, 0),
        "truncated: padding before the data section",
    );
    add(
        "split_without_shard_name",
        G::header(3, 0, 1).s("split.count").u32(2).u16le(2),
        "split set: split.count is 2 but the file name is not",
    );
    c
}

impl G {
    fn u16le(&mut self, v: u16) -> &mut G {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

#[test]
fn the_valid_base_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("valid.gguf");
    std::fs::write(&p, valid().0).unwrap();
    let out = inspect_limited(&p);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn malformed_files_are_rejected_with_a_precise_message() {
    let cases = cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let failures = refusal_failures("gguf", &cases);
    assert!(
        failures.is_empty(),
        "expected: exit 1 and a one-line message naming the file and the problem\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_nonexistent_file_is_an_error_not_a_panic() {
    let out = inspect_limited(Path::new("/nonexistent/model.gguf"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("/nonexistent/model.gguf") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
