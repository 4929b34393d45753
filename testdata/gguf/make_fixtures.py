"""Writes the small GGUF fixtures in this directory with gguf-py's GGUFWriter (not our writer), so
that our reader is checked against another implementation.

Run from the repository root with the venv python (scripts/setup-env.sh --print-env gives it):
    GGUF_LORA_LIBGGML_DIR=... PYTHONPATH=testdata/tools $GGUF_LORA_PYTHON testdata/gguf/make_fixtures.py

Outputs (committed):
  all_types.gguf   every metadata value type (scalars and arrays of each, strings, bools), tensors
                   of types F32, F16, Q8_0 (gguf.quants), Q4_K (libggml's ggml_quantize_chunk via
                   testdata/tools/ggml_ctypes.py), I32 and BF16, a 3-D tensor, alignment 64
  all_types.json   what the Rust tests expect: every tensor's type, ne-order shape and bytes (hex)
  minimal.gguf     default alignment (no general.alignment), one F32 tensor, a few keys
"""

import json
import os
import sys

import numpy as np
import gguf
from gguf import GGUFValueType as VT, GGMLQuantizationType as QT

HERE = os.path.dirname(os.path.abspath(__file__))


def all_types():
    path = os.path.join(HERE, "all_types.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    # One key per scalar type, with values at the edges of each range.
    w.add_uint8("test.u8", 255)
    w.add_int8("test.i8", -128)
    w.add_uint16("test.u16", 65535)
    w.add_int16("test.i16", -32768)
    w.add_uint32("test.u32", 4294967295)
    w.add_int32("test.i32", -2147483648)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "héllo, wörld ✓")
    w.add_uint64("test.u64", 18446744073709551615)
    w.add_int64("test.i64", -9223372036854775808)
    w.add_float64("test.f64", -1.5e300)
    # One array per element type.
    arrays = [
        ("test.arr_u8", [0, 1, 255], VT.UINT8),
        ("test.arr_i8", [-1, 0, 127], VT.INT8),
        ("test.arr_u16", [0, 65535], VT.UINT16),
        ("test.arr_i16", [-32768, 7], VT.INT16),
        ("test.arr_u32", [1, 2, 3, 4294967295], VT.UINT32),
        ("test.arr_i32", [-5, 5], VT.INT32),
        ("test.arr_f32", [0.5, -2.25, 1e-6], VT.FLOAT32),
        ("test.arr_bool", [True, False, True], VT.BOOL),
        ("test.arr_string", ["a", "", "ü", "<0x0A>"], VT.STRING),
        ("test.arr_u64", [0, 18446744073709551615], VT.UINT64),
        ("test.arr_i64", [-9223372036854775808, 1], VT.INT64),
        ("test.arr_f64", [3.141592653589793, -0.0], VT.FLOAT64),
    ]
    for key, val, sub in arrays:
        w.add_key_value(key, val, VT.ARRAY, sub_type=sub)
    w.add_block_count(1)
    w.add_context_length(128)

    rng = np.random.default_rng(1234)
    tensors = []  # (name, ggml type, ne shape, raw bytes)

    def add(name, qtype, ne, raw):
        raw = np.ascontiguousarray(raw)
        tensors.append((name, qtype, ne, raw.tobytes()))
        # gguf-py takes numpy (row-major) shapes: reversed ne. For quantized types pass the byte
        # array with raw_dtype; gguf-py converts its byte shape back to elements.
        w.add_tensor(name, raw, raw_dtype=qtype)

    add("blk.0.f32_odd", QT.F32, [3], np.array([1.0, -2.0, 3.5], dtype=np.float32))
    add("blk.0.f16", QT.F16, [8, 2], rng.standard_normal((2, 8)).astype(np.float16))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    add("blk.0.q8_0", QT.Q8_0, [64, 2], gguf.quants.quantize(x, QT.Q8_0))
    sys.path.insert(0, os.path.join(HERE, "..", "tools"))
    from ggml_ctypes import Ggml
    ggml = Ggml()
    x = rng.standard_normal((2, 256)).astype(np.float32)
    q4k = np.frombuffer(ggml.quantize("q4_K", x), dtype=np.uint8).reshape(2, -1)
    add("blk.1.q4_k", QT.Q4_K, [256, 2], q4k)
    add("i32_3d", QT.I32, [2, 3, 2], np.arange(12, dtype=np.int32).reshape(2, 3, 2))
    bf16 = (rng.standard_normal(4).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    add("bf16", QT.BF16, [4], bf16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    manifest = {
        "tensors": [
            {"name": n, "type": t.name, "ne": ne, "hex": b.hex()} for (n, t, ne, b) in tensors
        ]
    }
    with open(os.path.join(HERE, "all_types.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def minimal():
    path = os.path.join(HERE, "minimal.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("minimal")
    w.add_block_count(1)
    w.add_tensor("output_norm.weight", np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    all_types()
    minimal()
    print("wrote", os.listdir(HERE))
