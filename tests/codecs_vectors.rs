//! Our codecs against vectors that libggml itself produced (testdata/codecs, made by
//! `make_legacy_vectors.py`): quantized bytes equal ggml's `ggml_quantize_chunk` without and with an
//! importance matrix, and our dequantization of ggml's bytes equals ggml's `to_float` bit for bit,
//! at every SIMD level this CPU runs.

mod common;

use std::path::PathBuf;

use gguf_lora::quant::simd::{with_level, SimdLevel};
use gguf_lora::quant::{self, GgmlType};
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/codecs")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&read("manifest.json")).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

struct Vectors {
    n_per_row: usize,
    cases: Vec<String>,
    inputs: Vec<f32>,
    imatrix: Vec<f32>,
    manifest: serde_json::Value,
}

fn vectors() -> Vectors {
    let manifest = manifest();
    let n_per_row = manifest["n_per_row"].as_u64().unwrap() as usize;
    let cases = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let inputs = read_f32("legacy_inputs.f32");
    assert_eq!(inputs.len(), n_per_row * cases.len());
    Vectors {
        n_per_row,
        cases,
        inputs,
        imatrix: read_f32("legacy_imatrix.f32"),
        manifest,
    }
}

/// Compares row by row so a failure names the input case.
fn assert_rows_equal(ty: GgmlType, what: &str, v: &Vectors, ours: &[u8], ggml: &[u8]) {
    let row_bytes = ty.row_bytes(v.n_per_row as u64).unwrap() as usize;
    assert_eq!(ours.len(), ggml.len(), "{ty} {what}: length");
    let bad: Vec<&str> = ours
        .chunks(row_bytes)
        .zip(ggml.chunks(row_bytes))
        .zip(&v.cases)
        .filter(|((a, b), _)| a != b)
        .map(|(_, c)| c.as_str())
        .collect();
    assert!(
        bad.is_empty(),
        "{ty} {what}: bytes differ from ggml's for cases {bad:?}"
    );
}

/// Every row of `x` quantized at `level` (row by row on this thread: see `common::simd_levels`).
fn quantize_at(
    level: SimdLevel,
    ty: GgmlType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
) -> Vec<u8> {
    let row_bytes = ty.row_bytes(n_per_row as u64).unwrap() as usize;
    let mut out = vec![0u8; x.len() / n_per_row * row_bytes];
    with_level(level, || {
        for (xr, yr) in x.chunks(n_per_row).zip(out.chunks_mut(row_bytes)) {
            quant::quantize_row(ty, xr, yr, imatrix).unwrap();
        }
    });
    out
}

/// Our dequantization of ggml's bytes at every level, hashed per row, against the hashes of ggml's
/// `to_float`.
fn check_dequantize(ty: GgmlType, v: &Vectors, key: &str, bytes: &[u8]) {
    let want = v.manifest["to_float_row_sha256"][key].as_array().unwrap();
    let row_bytes = ty.row_bytes(v.n_per_row as u64).unwrap() as usize;
    for level in common::simd_levels() {
        let mut out = vec![0f32; v.inputs.len()];
        with_level(level, || {
            for (src, dst) in bytes.chunks(row_bytes).zip(out.chunks_mut(v.n_per_row)) {
                quant::dequantize_row(ty, src, dst).unwrap();
            }
        });
        let bad: Vec<&str> = out
            .chunks(v.n_per_row)
            .zip(want)
            .zip(&v.cases)
            .filter(|((row, h), _)| sha256_hex(&f32_bytes(row)) != h.as_str().unwrap())
            .map(|(_, c)| c.as_str())
            .collect();
        assert!(
            bad.is_empty(),
            "{ty} ({key}) at {level}: to_float differs from ggml's for cases {bad:?}"
        );
    }
}

fn check_type(name: &str, quantize: bool) {
    let ty = GgmlType::from_name(name).unwrap();
    let v = vectors();
    let ggml = read(&format!("{name}.q"));
    check_dequantize(ty, &v, name, &ggml);

    let ignored = v.manifest["imatrix_ignored"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == name);
    let ggml_im = if ignored {
        assert!(
            !quant::has_imatrix_variant(ty),
            "{ty}: ggml ignores the imatrix"
        );
        ggml.clone()
    } else {
        let b = read(&format!("{name}.imatrix.q"));
        check_dequantize(ty, &v, &format!("{name}.imatrix"), &b);
        b
    };

    if !quantize {
        return;
    }
    for level in common::simd_levels() {
        let ours = quantize_at(level, ty, &v.inputs, v.n_per_row, None);
        assert_rows_equal(ty, &format!("quantize at {level}"), &v, &ours, &ggml);
        let ours = quantize_at(level, ty, &v.inputs, v.n_per_row, Some(&v.imatrix));
        assert_rows_equal(
            ty,
            &format!("quantize with imatrix at {level}"),
            &v,
            &ours,
            &ggml_im,
        );
    }

    // The parallel entry point gives the same bytes as the one-row one.
    let mut ours = vec![0u8; ggml.len()];
    quant::quantize_rows(ty, &v.inputs, v.n_per_row, &mut ours, Some(&v.imatrix)).unwrap();
    assert_rows_equal(ty, "quantize_rows with imatrix", &v, &ours, &ggml_im);
}

#[test]
fn q4_0_matches_ggml() {
    check_type("q4_0", true);
}

#[test]
fn q4_1_matches_ggml() {
    check_type("q4_1", true);
}

#[test]
fn q5_0_matches_ggml() {
    check_type("q5_0", true);
}

#[test]
fn q5_1_matches_ggml() {
    check_type("q5_1", true);
}

#[test]
fn q8_0_matches_ggml() {
    check_type("q8_0", true);
}

#[test]
fn f16_matches_ggml() {
    check_type("f16", true);
}

#[test]
fn bf16_matches_ggml() {
    check_type("bf16", true);
}

#[test]
fn iq4_nl_matches_ggml() {
    check_type("iq4_nl", true);
}

#[test]
fn iq4_xs_matches_ggml() {
    check_type("iq4_xs", true);
}

#[test]
fn float_edge_values_convert_like_ggml() {
    let x = read_f32("float_inputs.f32");
    for name in ["f16", "bf16"] {
        let ty = GgmlType::from_name(name).unwrap();
        let ggml = read(&format!("float_{name}.q"));
        let mut ours = vec![0u8; ggml.len()];
        quant::quantize_row(ty, &x, &mut ours, None).unwrap();
        for (i, (a, b)) in ours.chunks(2).zip(ggml.chunks(2)).enumerate() {
            assert_eq!(
                a,
                b,
                "{name}: element {i} ({:e} = {:#010x})",
                x[i],
                x[i].to_bits()
            );
        }
        let want = read(&format!("float_{name}.f32"));
        let mut back = vec![0f32; x.len()];
        quant::dequantize_row(ty, &ggml, &mut back).unwrap();
        assert_eq!(f32_bytes(&back), want, "{name}: to_float");
    }
}

#[test]
fn every_16_bit_pattern_dequantizes_like_ggml() {
    let m = manifest();
    let patterns: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for name in ["f16", "bf16"] {
        let ty = GgmlType::from_name(name).unwrap();
        let mut out = vec![0f32; 65536];
        quant::dequantize_row(ty, &patterns, &mut out).unwrap();
        assert_eq!(
            sha256_hex(&f32_bytes(&out)),
            m["to_float_all_16bit_patterns_sha256"][name]
                .as_str()
                .unwrap(),
            "{name}"
        );
    }
}
