//! The reader against files written by gguf-py (testdata/gguf, see its README): every metadata value
//! type, several tensor types, a non-default alignment; plus version 2 and big-file behaviour.

use std::path::PathBuf;

use gguf_lora::gguf::{Array, GgufFile, GgufModel, Value};
use gguf_lora::quant::GgmlType;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/gguf")
        .join(name)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_metadata_value_type_written_by_gguf_py() {
    let f = GgufFile::open(fixture("all_types.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    let m = f.metadata();
    let expected: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(64)),
        ("test.u8", Value::U8(255)),
        ("test.i8", Value::I8(-128)),
        ("test.u16", Value::U16(65535)),
        ("test.i16", Value::I16(-32768)),
        ("test.u32", Value::U32(u32::MAX)),
        ("test.i32", Value::I32(i32::MIN)),
        ("test.f32", Value::F32(0.1)),
        ("test.bool_true", Value::Bool(true)),
        ("test.bool_false", Value::Bool(false)),
        ("test.string", Value::String("héllo, wörld ✓".into())),
        ("test.u64", Value::U64(u64::MAX)),
        ("test.i64", Value::I64(i64::MIN)),
        ("test.f64", Value::F64(-1.5e300)),
        ("test.arr_u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("test.arr_i8", Value::Array(Array::I8(vec![-1, 0, 127]))),
        ("test.arr_u16", Value::Array(Array::U16(vec![0, 65535]))),
        ("test.arr_i16", Value::Array(Array::I16(vec![-32768, 7]))),
        (
            "test.arr_u32",
            Value::Array(Array::U32(vec![1, 2, 3, u32::MAX])),
        ),
        ("test.arr_i32", Value::Array(Array::I32(vec![-5, 5]))),
        (
            "test.arr_f32",
            Value::Array(Array::F32(vec![0.5, -2.25, 1e-6])),
        ),
        (
            "test.arr_bool",
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        (
            "test.arr_string",
            Value::Array(Array::String(vec![
                "a".into(),
                "".into(),
                "ü".into(),
                "<0x0A>".into(),
            ])),
        ),
        ("test.arr_u64", Value::Array(Array::U64(vec![0, u64::MAX]))),
        ("test.arr_i64", Value::Array(Array::I64(vec![i64::MIN, 1]))),
        (
            "test.arr_f64",
            Value::Array(Array::F64(vec![std::f64::consts::PI, -0.0])),
        ),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(128)),
    ];
    let got: Vec<(&str, &Value)> = m.iter().collect();
    assert_eq!(got.len(), expected.len(), "keys: {got:?}");
    for ((gk, gv), (ek, ev)) in got.iter().zip(&expected) {
        assert_eq!(gk, ek, "key order is file order");
        assert_eq!(*gv, ev, "value of {ek}");
    }
    // -0.0 == 0.0 in PartialEq: check the sign bit really survived.
    let Some(Array::F64(v)) = m.get_array("test.arr_f64") else {
        panic!()
    };
    assert!(v[1].is_sign_negative());
    assert_eq!(m.get_u32("general.alignment"), Some(64));
    assert_eq!(m.get_uint("test.u16"), Some(65535));
    assert_eq!(m.get_uint("test.i8"), None);
    assert_eq!(m.get_f32("test.f32"), Some(0.1));
    assert_eq!(m.get_u64("test.u64"), Some(u64::MAX));
    assert_eq!(m.get_str("general.architecture"), Some("llama"));
}

#[test]
fn every_tensor_byte_written_by_gguf_py() {
    let f = GgufFile::open(fixture("all_types.gguf")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("all_types.json")).unwrap()).unwrap();
    let expected = manifest["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), expected.len());
    assert_eq!(f.data_offset() % 64, 0);
    let mut next_offset = 0;
    for (t, e) in f.tensors().iter().zip(expected) {
        assert_eq!(t.name, e["name"].as_str().unwrap());
        assert_eq!(
            t.ty,
            GgmlType::from_name(e["type"].as_str().unwrap()).unwrap()
        );
        let ne: Vec<u64> = e["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, ne, "{}", t.name);
        assert_eq!(t.offset, next_offset, "{}", t.name);
        let data = f.tensor_data(t);
        assert_eq!(
            data,
            hex(e["hex"].as_str().unwrap()).as_slice(),
            "{}",
            t.name
        );
        assert_eq!(data.len() as u64, t.n_bytes());
        next_offset = (t.offset + t.n_bytes()).div_ceil(64) * 64;
        assert!(std::ptr::eq(f.tensor(&t.name).unwrap(), t));
    }
    let q4k = f.tensor("blk.1.q4_k").unwrap();
    assert_eq!((q4k.row_len(), q4k.rows(), q4k.row_bytes()), (256, 2, 144));
    assert_eq!(f.tensor("i32_3d").unwrap().n_elements(), 12);
    // F32 data decodes to the values the script wrote.
    let f32s: Vec<f32> = f
        .tensor_data(f.tensor("blk.0.f32_odd").unwrap())
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(f32s, [1.0, -2.0, 3.5]);
}

#[test]
fn default_alignment_and_single_file_model() {
    let m = GgufModel::open(fixture("minimal.gguf")).unwrap();
    assert!(!m.is_split());
    let f = &m.shards()[0];
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata().get("general.alignment"), None);
    assert_eq!(f.data_offset() % 32, 0);
    let data = m.tensor_data("output_norm.weight").unwrap();
    assert_eq!(data.len(), 20);
    assert_eq!(&data[..4], &1.0f32.to_le_bytes());
    assert_eq!(m.tensors().count(), 1);
    assert!(m.tensor("nope").is_none());
}

#[test]
fn version_2_reads_like_version_3() {
    // v2 and v3 differ only in the version field (v3 "introduced big-endian support").
    let mut bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufFile::from_bytes("v2.gguf", bytes).unwrap();
    let v3 = GgufFile::open(fixture("all_types.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensors(), v3.tensors());
}

#[test]
fn gemma3_vocabulary_of_262144_strings() {
    require_interop!();
    let env = common::interop();
    let f = GgufFile::open(&env.gemma).unwrap();
    let Some(Array::String(tokens)) = f.metadata().get_array("tokenizer.ggml.tokens") else {
        panic!("no vocabulary")
    };
    assert_eq!(tokens.len(), 262_144);
    assert_eq!(tokens[2], "<bos>");
    assert_eq!(f.metadata().get_str("general.architecture"), Some("gemma3"));
    let total: u64 = f.tensors().iter().map(|t| t.n_bytes()).sum();
    assert!(total > 200_000_000 && total < f.file_size());
}

mod common;
