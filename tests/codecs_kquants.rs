//! K-quant codecs against libggml, bit for bit: the committed vectors of
//! `testdata/codecs/make_kquant_vectors.py`, and random rows quantized by the live libggml.

mod common;

use gguf_lora::quant::kquants::*;
use serde_json::Value;
use std::path::PathBuf;

type Quantize = fn(&[f32], &mut [u8], Option<&[f32]>);
type Dequantize = fn(&[u8], &mut [f32]);

/// (ggml name, bytes per 256 values, quantizer, dequantizer)
const CODECS: [(&str, usize, Quantize, Dequantize); 6] = [
    ("q2_K", Q2_K_BYTES, quantize_row_q2_k, dequantize_row_q2_k),
    ("q3_K", Q3_K_BYTES, quantize_row_q3_k, dequantize_row_q3_k),
    ("q4_K", Q4_K_BYTES, quantize_row_q4_k, dequantize_row_q4_k),
    ("q5_K", Q5_K_BYTES, quantize_row_q5_k, dequantize_row_q5_k),
    ("q6_K", Q6_K_BYTES, quantize_row_q6_k, dequantize_row_q6_k),
    ("q8_K", Q8_K_BYTES, quantize_row_q8_k, dequantize_row_q8_k),
];

fn vectors_dir() -> PathBuf {
    common::repo_root().join("testdata/codecs/kquants")
}

fn read_f32s(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(vectors_dir().join(name)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn at(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}")) as usize
}

/// Index of the first differing element, with both values, for failure messages.
fn first_diff<T: PartialEq + std::fmt::Debug + Copy>(a: &[T], b: &[T]) -> Option<(usize, T, T)> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|i| (i, a[i], b[i]))
}

#[test]
fn committed_vectors_quantize_and_dequantize_bit_exact() {
    let index: Value =
        serde_json::from_slice(&std::fs::read(vectors_dir().join("index.json")).unwrap()).unwrap();
    let inputs = read_f32s("inputs.f32");
    let imatrices = read_f32s("imatrix.f32");
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, block_bytes, quantize, dequantize) in CODECS {
        let ggml_bytes = std::fs::read(vectors_dir().join(format!("{name}.bin"))).unwrap();
        let ggml_deq = read_f32s(&format!("{name}.deq.f32"));
        for case in index["cases"].as_array().unwrap() {
            let (nrows, n_per_row) = (at(case, "nrows"), at(case, "n_per_row"));
            let n = nrows * n_per_row;
            let x = &inputs[at(case, "input_offset")..][..n];
            for variant in case["variants"].as_array().unwrap() {
                let Some(entry) = variant["types"].get(name) else {
                    continue;
                };
                let imatrix_name = variant["imatrix"].as_str().unwrap();
                let zeros = vec![0f32; n_per_row];
                let imatrix: Option<&[f32]> =
                    match (imatrix_name, variant["imatrix_offset"].as_u64()) {
                        ("none", _) => None,
                        ("all_zero", None) => Some(&zeros),
                        (_, Some(off)) => Some(&imatrices[off as usize..][..n_per_row]),
                        (other, None) => panic!("imatrix {other} without offset"),
                    };
                let what = format!("{name} case {} imatrix {imatrix_name}", case["name"]);
                let expected = &ggml_bytes[at(entry, "offset")..][..at(entry, "len")];
                assert_eq!(expected.len(), n / 256 * block_bytes, "{what}");
                let mut ours = vec![0u8; expected.len()];
                quantize(x, &mut ours, imatrix);
                if let Some((i, a, b)) = first_diff(&ours, expected) {
                    failures.push(format!(
                        "{what}: quantize byte {i} (block {}, offset {}): ours {a:#04x}, ggml {b:#04x}",
                        i / block_bytes,
                        i % block_bytes
                    ));
                }
                if let Some(deq_offset) = entry.get("deq_offset").and_then(Value::as_u64) {
                    let expected = &ggml_deq[deq_offset as usize..][..n];
                    let mut ours = vec![0f32; n];
                    dequantize(
                        &ggml_bytes[at(entry, "offset")..][..at(entry, "len")],
                        &mut ours,
                    );
                    let ours_bits: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
                    let ggml_bits: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
                    if let Some((i, a, b)) = first_diff(&ours_bits, &ggml_bits) {
                        failures.push(format!(
                            "{what}: dequantize value {i}: ours {} ({a:#010x}), ggml {} ({b:#010x})",
                            f32::from_bits(a),
                            f32::from_bits(b)
                        ));
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 14 cases × (4 imatrix variants × 5 types + Q8_K's reference only).
    assert_eq!(checked, 14 * 21);
}
