"""Test vectors for the K-quant codecs, made by the real libggml (llama-cpp-python 0.3.36's vendored ggml).

For fixed, seeded rows of awkward data (see CASES) and four importance-matrix variants, this records:
- ggml_quantize_chunk's bytes for Q2_K..Q6_K (imatrix NULL = the reference quantizer), and
  quantize_row_q8_K_ref's bytes for Q8_K (ggml_quantize_chunk does not handle Q8_K);
- ggml's to_float (dequantize_row_q8_K for Q8_K) of the reference bytes.

Output, in testdata/codecs/kquants/ (all little-endian):
  inputs.f32        every case's rows, concatenated
  imatrix.f32       every imatrix used, concatenated
  <type>.bin        quantized bytes of every (case, imatrix) variant, concatenated
  <type>.deq.f32    ggml's dequantization of the reference (no imatrix) bytes, concatenated
  index.json        offsets (in elements of each file) of every piece; an imatrix variant whose
                    imatrix_offset is null and name is "all_zero" uses n_per_row zeros
Run: GGUF_LORA_LIBGGML_DIR=... PYTHONPATH=testdata/tools $GGUF_LORA_PYTHON testdata/codecs/make_kquant_vectors.py
"""
import ctypes
import json
import os
import sys

import numpy as np

from ggml_ctypes import Ggml

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kquants")
TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K"]
QK_K = 256


def cases():
    rng = np.random.default_rng(20241123)
    n = rng.standard_normal
    out = {}
    out["normal"] = n((2, 512))
    x = n((1, 512)) * 0.02
    x[0, [3, 100, 257, 300, 511]] = [3.0, -30.0, 7.5, -4.25, 12.0]
    out["outliers"] = x
    out["zeros"] = np.zeros((1, 256))
    x = n((1, 512))
    for g in range(0, 512, 32):
        x[0, g:g + 16] = 0.0
    out["partial_zeros"] = x
    out["constant"] = np.stack([np.full(256, 0.37), np.full(256, -2.5)])
    # Small integers and halves: quotients land exactly on rounding ties of nearest_int.
    out["ties"] = rng.integers(-16, 17, size=(1, 512)) * 0.5
    out["huge"] = n((1, 256)) * 1e30
    out["tiny"] = n((1, 256)) * 1e-30
    out["negative"] = -np.abs(n((1, 256)))
    x = np.zeros((1, 256))
    x[0, 77] = 3.7
    out["single"] = x
    out["positive"] = np.abs(n((1, 256))) + 0.1
    out["f16_overflow"] = n((1, 256)) * 1e6
    x = n((1, 512))
    for g in range(0, 512, 16):
        x[0, g:g + 16] *= 10.0 ** rng.uniform(-3, 3)
    out["mixed_scales"] = x
    x = n((1, 256)) * 1e-6
    x[0, ::7] = 0.0
    out["small_sparse"] = x
    x = n((2, 256))
    x[0, :] = -0.0
    x[1, ::3] = -0.0
    out["negative_zero"] = x
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def imatrices(n_per_row, rng):
    """The importance-matrix variants for a row length: none, random positive, zeros in parts, all zero."""
    rand = rng.uniform(0.05, 20.0, size=n_per_row).astype(np.float32)
    parts = rng.uniform(0.05, 20.0, size=n_per_row).astype(np.float32)
    parts[: n_per_row // 4] = 0.0
    parts[n_per_row // 2: n_per_row // 2 + 48] = 0.0
    return [("none", None), ("random", rand), ("partly_zero", parts),
            ("all_zero", np.zeros(n_per_row, dtype=np.float32))]


def q8_k_quantize(g, x):
    out = np.zeros(x.size // QK_K * 292, dtype=np.uint8)
    g.lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    g.lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    return out.tobytes()


def q8_k_dequantize(g, data, n):
    src = np.frombuffer(data, dtype=np.uint8).copy()
    out = np.zeros(n, dtype=np.float32)
    g.lib.dequantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    g.lib.dequantize_row_q8_K(src.ctypes.data, out.ctypes.data, n)
    return out


def main():
    g = Ggml()
    rng = np.random.default_rng(7)
    os.makedirs(OUT, exist_ok=True)
    inputs, imats = [], []
    blobs = {t: [] for t in TYPES}
    deqs = {t: [] for t in TYPES}
    pos = {"inputs": 0, "imatrix": 0, **{t: 0 for t in TYPES}, **{t + ".deq": 0 for t in TYPES}}
    index = {"library": "llama-cpp-python 0.3.36 (vendored ggml, libggml-base.so)", "cases": []}
    for name, x in cases().items():
        nrows, n_per_row = x.shape
        case = {"name": name, "nrows": nrows, "n_per_row": n_per_row,
                "input_offset": pos["inputs"], "variants": []}
        inputs.append(x.ravel())
        pos["inputs"] += x.size
        for imat_name, imat in imatrices(n_per_row, rng):
            variant = {"imatrix": imat_name, "imatrix_offset": None, "types": {}}
            if imat is not None and imat.any():  # an all-zero imatrix is not stored
                variant["imatrix_offset"] = pos["imatrix"]
                imats.append(imat)
                pos["imatrix"] += imat.size
            for t in TYPES:
                if t == "q8_K":
                    if imat is not None:
                        continue  # ggml has no importance-weighted Q8_K
                    data = q8_k_quantize(g, x)
                else:
                    data = g.quantize(t, x, imat)
                entry = {"offset": pos[t], "len": len(data)}
                blobs[t].append(data)
                pos[t] += len(data)
                if imat is None:
                    deq = q8_k_dequantize(g, data, x.size) if t == "q8_K" else \
                        g.dequantize(t, data, x.size)
                    entry["deq_offset"] = pos[t + ".deq"]
                    deqs[t].append(deq)
                    pos[t + ".deq"] += deq.size
                variant["types"][t] = entry
            case["variants"].append(variant)
        index["cases"].append(case)
    np.concatenate(inputs).astype("<f4").tofile(os.path.join(OUT, "inputs.f32"))
    np.concatenate(imats).astype("<f4").tofile(os.path.join(OUT, "imatrix.f32"))
    for t in TYPES:
        with open(os.path.join(OUT, t + ".bin"), "wb") as f:
            f.write(b"".join(blobs[t]))
        np.concatenate(deqs[t]).astype("<f4").tofile(os.path.join(OUT, t + ".deq.f32"))
    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
