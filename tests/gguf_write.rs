//! The writer against other implementations: gguf-py's GGUFReader reads what we write with identical
//! metadata and tensors; llama.cpp (llama-cpp-python) loads and runs it; real models from PyPI come
//! back byte-identical; a split set made by llama-gguf-split reads as the same model.

mod common;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::Command;

use gguf_lora::gguf::writer::copy_model;
use gguf_lora::gguf::{
    Array, GgufFile, GgufModel, GgufWriter, Metadata, TensorDesc, Value, ValueType,
};
use gguf_lora::quant::GgmlType;

/// Compares two files chunk by chunk (the models are hundreds of MB).
fn assert_same_bytes(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(
        fa.metadata().unwrap().len(),
        fb.metadata().unwrap().len(),
        "sizes differ"
    );
    let (mut ra, mut rb) = (BufReader::new(fa), BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let n = ra.read(&mut ba).unwrap();
        rb.read_exact(&mut bb[..n]).unwrap();
        if n == 0 {
            break;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                pos + i as u64
            );
        }
        pos += n as u64;
    }
}

fn round_trip(model_path: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.gguf");
    let model = GgufModel::open(model_path).unwrap();
    copy_model(&model, &out).unwrap();
    assert_same_bytes(model_path, &out);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["copy.gguf"], "no temporary file left");
}

#[test]
fn gemma3_round_trip_is_byte_identical() {
    require_interop!();
    round_trip(&common::interop().gemma);
}

#[test]
fn smollm2_round_trip_is_byte_identical() {
    require_interop!();
    round_trip(&common::interop().smollm);
}

/// A file built from scratch with every value type, alignment 128 and several tensor types.
fn write_sample(path: &Path) -> (Metadata, Vec<(TensorDesc, Vec<u8>)>) {
    let mut m = Metadata::new();
    m.set("general.architecture", Value::String("llama".into()));
    m.set("general.alignment", Value::U32(128));
    m.set("t.u8", Value::U8(7));
    m.set("t.i8", Value::I8(-7));
    m.set("t.u16", Value::U16(700));
    m.set("t.i16", Value::I16(-700));
    m.set("t.u32", Value::U32(70000));
    m.set("t.i32", Value::I32(-70000));
    m.set("t.f32", Value::F32(1.25));
    m.set("t.bool", Value::Bool(true));
    m.set("t.str", Value::String("ünïcode".into()));
    m.set("t.empty", Value::String(String::new()));
    m.set("t.u64", Value::U64(1 << 40));
    m.set("t.i64", Value::I64(-(1 << 40)));
    m.set("t.f64", Value::F64(0.125));
    m.set("t.a_u8", Value::Array(Array::U8(vec![1, 2, 3])));
    m.set("t.a_i8", Value::Array(Array::I8(vec![-1, 2])));
    m.set("t.a_u16", Value::Array(Array::U16(vec![1, 65535])));
    m.set("t.a_i16", Value::Array(Array::I16(vec![-2, 2])));
    m.set("t.a_u32", Value::Array(Array::U32(vec![5, 6])));
    m.set("t.a_i32", Value::Array(Array::I32(vec![-5, 6])));
    m.set("t.a_f32", Value::Array(Array::F32(vec![0.5, 1.5])));
    m.set("t.a_bool", Value::Array(Array::Bool(vec![false, true])));
    m.set(
        "t.a_str",
        Value::Array(Array::String(vec!["x".into(), "".into(), "yz".into()])),
    );
    m.set("t.a_u64", Value::Array(Array::U64(vec![1 << 50])));
    m.set("t.a_i64", Value::Array(Array::I64(vec![-(1 << 50)])));
    m.set("t.a_f64", Value::Array(Array::F64(vec![2.5, -3.5])));
    m.set("t.a_empty", Value::Array(Array::U32(vec![])));
    let mk = |name: &str, dims: Vec<u64>, ty: GgmlType, seed: u8| {
        let desc = TensorDesc {
            name: name.into(),
            dims,
            ty,
        };
        let n = gguf_lora::gguf::tensor_n_bytes(&desc.dims, ty).unwrap() as usize;
        let data: Vec<u8> = (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        (desc, data)
    };
    let tensors = vec![
        // F16 bytes are arbitrary patterns, which is fine for a container test; F32 gets 3 elements
        // so the padding after it is exercised.
        mk("a.f32", vec![3], GgmlType::F32, 1),
        mk("blk.0.f16", vec![16, 3], GgmlType::F16, 2),
        mk("blk.0.q8_0", vec![64, 2], GgmlType::Q8_0, 3),
        mk("blk.1.q4_k", vec![256, 1, 2], GgmlType::Q4_K, 4),
        mk("blk.1.q6_k", vec![256], GgmlType::Q6_K, 5),
    ];
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::create(path, &[], 3, 128, &m, &descs).unwrap();
    for (_, data) in &tensors {
        w.write_tensor(data).unwrap();
    }
    w.finish().unwrap();
    (m, tensors)
}

const GGUF_PY_DUMP: &str = r#"
import json, sys
import numpy as np
from gguf import GGUFReader, GGUFValueType as VT
r = GGUFReader(sys.argv[1])
fields = {}
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    t = f.types[0]
    if t == VT.ARRAY:
        # gguf-py records no element type for an empty array; take it from the raw parts.
        sub = f.types[1] if len(f.types) > 1 else VT(int(f.parts[3][0]))
        if sub == VT.STRING:
            val = [bytes(f.parts[i]).decode() for i in f.data]
        else:
            val = [f.parts[i].tolist()[0] for i in f.data]
        fields[name] = ["array", sub.name, val]
    elif t == VT.STRING:
        fields[name] = [t.name, None, bytes(f.parts[f.data[0]]).decode()]
    else:
        fields[name] = [t.name, None, f.parts[f.data[0]].tolist()[0]]
tensors = [{"name": t.name, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape],
            "offset": int(t.data_offset), "hex": np.asarray(t.data).tobytes().hex()} for t in r.tensors]
print(json.dumps({"alignment": int(r.alignment), "fields": fields, "tensors": tensors}))
"#;

/// gguf-py's `GGUFValueType` member name for a type.
fn gguf_py_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "array",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    }
}

fn scalar_json(v: &Value) -> serde_json::Value {
    gguf_lora::inspect::gguf::value_json(v, usize::MAX).0
}

#[test]
fn gguf_py_reads_what_we_write() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    let (metadata, tensors) = write_sample(&path);
    let out = env.python_code(GGUF_PY_DUMP, &[path.to_str().unwrap()]);
    let dump: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dump["alignment"], 128);
    let fields = dump["fields"].as_object().unwrap();
    let keys: Vec<&String> = fields.keys().collect();
    let ours: Vec<&str> = metadata.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ours, "gguf-py sees our keys in our order");
    for (key, value) in metadata.iter() {
        let f = &fields[key];
        assert_eq!(f[0], gguf_py_name(value.value_type()), "type of {key}");
        if let Value::Array(a) = value {
            assert_eq!(f[1], gguf_py_name(a.elem_type()), "element type of {key}");
        }
        assert_eq!(f[2], scalar_json(value), "value of {key}");
    }
    let py_tensors = dump["tensors"].as_array().unwrap();
    assert_eq!(py_tensors.len(), tensors.len());
    for (p, (desc, data)) in py_tensors.iter().zip(&tensors) {
        assert_eq!(p["name"], desc.name.as_str());
        assert_eq!(
            p["type"].as_str().unwrap().to_lowercase(),
            desc.ty.name().to_lowercase()
        );
        let ne: Vec<u64> = p["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(ne, desc.dims, "{}", desc.name);
        assert_eq!(
            p["offset"].as_u64().unwrap() % 128,
            0,
            "{} aligned in the file",
            desc.name
        );
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(p["hex"], hex.as_str(), "{} bytes", desc.name);
    }
    // And our own reader agrees.
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.metadata(), &metadata);
}

const LLAMA_EVAL: &str = r#"
import sys, json
import llama_cpp
out = {}
for path in sys.argv[1:]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=32, verbose=False, logits_all=False)
    toks = llm.tokenize(b"The capital of France is")
    llm.eval(toks)
    logits = llm.scores[llm.n_tokens - 1]
    out[path] = [int(logits.argmax()), float(logits.max()), llm.n_tokens]
print(json.dumps(out))
"#;

#[test]
fn llama_cpp_loads_and_runs_what_we_write() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    // A byte-identical rewrite, and one with changed metadata, which moves the whole data section
    // (a different header length and padding) and so checks the offsets we compute.
    let same = dir.path().join("same.gguf");
    let model = GgufModel::open(&env.smollm).unwrap();
    copy_model(&model, &same).unwrap();
    let changed = dir.path().join("changed.gguf");
    let shard = &model.shards()[0];
    let mut m = shard.metadata().clone();
    m.set(
        "general.name",
        Value::String("rewritten by gguf-lora, with a longer name".into()),
    );
    m.set(
        "gguf_lora.test",
        Value::Array(Array::U8(vec![1, 2, 3, 4, 5])),
    );
    let descs: Vec<TensorDesc> = shard.tensors().iter().map(TensorDesc::from).collect();
    let mut w =
        GgufWriter::create(&changed, &[&env.smollm], 3, shard.alignment(), &m, &descs).unwrap();
    for t in shard.tensors() {
        w.write_tensor(shard.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
    assert_ne!(
        GgufFile::open(&changed).unwrap().data_offset(),
        shard.data_offset()
    );

    let paths = [
        env.smollm.to_str().unwrap(),
        same.to_str().unwrap(),
        changed.to_str().unwrap(),
    ];
    let out = env.python_code(LLAMA_EVAL, &paths);
    let res: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let original = &res[paths[0]];
    assert!(original[2].as_u64().unwrap() > 1, "tokens were evaluated");
    assert_eq!(
        &res[paths[1]], original,
        "byte-identical rewrite gives the same logits"
    );
    assert_eq!(
        &res[paths[2]], original,
        "rewrite with new metadata gives the same logits"
    );
}

#[test]
fn llama_gguf_split_set_reads_as_the_same_model() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("smol");
    let status = Command::new(env.tools.join("llama-gguf-split"))
        .args(["--split", "--split-max-tensors", "100"])
        .arg(&env.smollm)
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let original = GgufModel::open(&env.smollm).unwrap();
    // Open through the second shard: the whole set comes with it.
    let split = GgufModel::open(dir.path().join("smol-00002-of-00003.gguf")).unwrap();
    assert!(split.is_split());
    assert_eq!(split.shards().len(), 3);
    assert_eq!(split.tensor_count(), original.tensor_count());
    let a: Vec<_> = original
        .tensors()
        .map(|(_, t)| (t.name.clone(), t.dims.clone(), t.ty))
        .collect();
    let b: Vec<_> = split
        .tensors()
        .map(|(_, t)| (t.name.clone(), t.dims.clone(), t.ty))
        .collect();
    assert_eq!(a, b, "same tensors in the same order");
    assert_eq!(split.tensors().filter(|&(s, _)| s == 2).count(), 72);
    for (_, t) in original.tensors() {
        assert_eq!(
            split.tensor_data(&t.name),
            original.tensor_data(&t.name),
            "{}",
            t.name
        );
    }
    let mut m = split.metadata().clone();
    for key in ["split.no", "split.count", "split.tensors.count"] {
        assert!(m.remove(key).is_some(), "{key} in shard 0");
    }
    assert_eq!(&m, original.metadata());
    // Joined back into one file, it is the original, byte for byte.
    let joined = dir.path().join("joined.gguf");
    copy_model(&split, &joined).unwrap();
    assert_same_bytes(&joined, &env.smollm);
}

#[test]
fn missing_or_inconsistent_shards_are_refused() {
    require_interop!();
    let env = common::interop();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("smol");
    let ok = Command::new(env.tools.join("llama-gguf-split"))
        .args(["--split", "--split-max-tensors", "200"])
        .arg(&env.smollm)
        .arg(&prefix)
        .status()
        .unwrap();
    assert!(ok.success());
    let second = dir.path().join("smol-00002-of-00002.gguf");
    let renamed = dir.path().join("other-00002-of-00002.gguf");
    std::fs::rename(&second, &renamed).unwrap();
    let err = GgufModel::open(dir.path().join("smol-00001-of-00002.gguf"))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("smol-00002-of-00002.gguf"),
        "{err}"
    );
    // A shard renamed into another set's slot: its split.no disagrees with its position.
    std::fs::copy(dir.path().join("smol-00001-of-00002.gguf"), &second).unwrap();
    let err = GgufModel::open(&second).err().unwrap().to_string();
    assert!(err.contains("split.no"), "{err}");
}
