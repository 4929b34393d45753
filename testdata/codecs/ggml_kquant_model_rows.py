"""Real weights for the K-quant interop test: rows of a GGUF model's K-quant tensors, through libggml.

Usage: ggml_kquant_model_rows.py MODEL.gguf DIR ROW_STRIDE
For every Q2_K..Q6_K tensor of MODEL (read with gguf-py), takes rows 0, ROW_STRIDE, 2*ROW_STRIDE, ...
and writes to DIR:
  raw.bin            their bytes as stored in the file, concatenated
  deq.f32            ggml's to_float of those bytes
  imatrix.f32        a random positive importance vector per tensor (seeded), concatenated
  <type>.ref.bin     the dequantized rows re-quantized by ggml_quantize_chunk to each of
  <type>.imat.bin    q2_K..q6_K, without and with the tensor's imatrix, concatenated
  spec.json          {"tensors": [{name, type, n_per_row, nrows, raw_offset, deq_offset,
                      imatrix_offset}], "targets": [...]}
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader

from ggml_ctypes import Ggml

K_TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]


def main(model, out, stride):
    g = Ggml()
    rng = np.random.default_rng(99)
    reader = GGUFReader(model)
    raw, deq, imats = [], [], []
    requant = {(t, v): [] for t in K_TYPES for v in ("ref", "imat")}
    tensors = []
    pos = {"raw": 0, "deq": 0, "imat": 0}
    for t in reader.tensors:
        name = t.tensor_type.name  # "Q4_K" -> ggml's "q4_K"
        type_name = name[:-1].lower() + "K" if name.endswith("_K") else name.lower()
        if type_name not in K_TYPES:
            continue
        n_per_row = int(t.shape[0])
        rows = np.ascontiguousarray(t.data[::stride])
        data = rows.tobytes()
        x = g.dequantize(type_name, data, rows.shape[0] * n_per_row)
        imatrix = rng.uniform(0.01, 50.0, size=n_per_row).astype(np.float32)
        tensors.append({"name": t.name, "type": type_name, "n_per_row": n_per_row,
                        "nrows": rows.shape[0], "raw_offset": pos["raw"], "deq_offset": pos["deq"],
                        "imatrix_offset": pos["imat"]})
        raw.append(data)
        deq.append(x)
        imats.append(imatrix)
        pos["raw"] += len(data)
        pos["deq"] += x.size
        pos["imat"] += imatrix.size
        x2 = x.reshape(rows.shape[0], n_per_row)
        for target in K_TYPES:
            requant[(target, "ref")].append(g.quantize(target, x2, None))
            requant[(target, "imat")].append(g.quantize(target, x2, imatrix))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "raw.bin"), "wb") as f:
        f.write(b"".join(raw))
    np.concatenate(deq).astype("<f4").tofile(os.path.join(out, "deq.f32"))
    np.concatenate(imats).astype("<f4").tofile(os.path.join(out, "imatrix.f32"))
    for (target, variant), blobs in requant.items():
        with open(os.path.join(out, f"{target}.{variant}.bin"), "wb") as f:
            f.write(b"".join(blobs))
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump({"tensors": tensors, "targets": K_TYPES}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
