"""Quantize and dequantize a batch with the real libggml, for the Rust interop test of the float, legacy
and IQ4 codecs (tests/codecs_interop.rs).

Usage: ggml_legacy_batch.py DIR
Reads DIR/spec.json {"n_per_row": n, "quantize": ["q4_0", ...], "dequantize": {"q4_0": n_elements, ...}},
DIR/rows.f32 (rows of n float32) and DIR/imatrix.f32 (one row of n weights per input row), and
DIR/<type>.in.bin (encoded data of n_elements for each type to dequantize). Writes:
  DIR/<type>.q.bin    every row quantized by ggml_quantize_chunk without an imatrix, concatenated
                      (Q8_1, which ggml_quantize_chunk does not handle: by quantize_row_q8_1_ref)
  DIR/<type>.qi.bin   every row quantized with its own imatrix row
  DIR/<type>.deq.f32  ggml's to_float of <type>.in.bin
"""
import ctypes
import json
import os
import sys

import numpy as np

from ggml_ctypes import Ggml


def main(d):
    g = Ggml()
    spec = json.load(open(os.path.join(d, "spec.json")))
    n = spec["n_per_row"]
    rows = np.fromfile(os.path.join(d, "rows.f32"), dtype="<f4").reshape(-1, n)
    imats = np.fromfile(os.path.join(d, "imatrix.f32"), dtype="<f4").reshape(-1, n)
    q8_1 = g.lib.quantize_row_q8_1_ref
    q8_1.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def quantize_q8_1(r, _imatrix=None):
        r = np.ascontiguousarray(r, dtype=np.float32)
        out = np.zeros(n // 32 * 36, dtype=np.uint8)
        q8_1(r.ctypes.data, out.ctypes.data, n)
        return out.tobytes()

    for t in spec["quantize"]:
        if t == "q8_1":
            data = b"".join(quantize_q8_1(r) for r in rows)
            open(os.path.join(d, t + ".q.bin"), "wb").write(data)
            open(os.path.join(d, t + ".qi.bin"), "wb").write(data)
            continue
        plain = [g.quantize(t, r.reshape(1, -1)) for r in rows]
        weighted = [g.quantize(t, r.reshape(1, -1), w) for r, w in zip(rows, imats)]
        open(os.path.join(d, t + ".q.bin"), "wb").write(b"".join(plain))
        open(os.path.join(d, t + ".qi.bin"), "wb").write(b"".join(weighted))
    for t, n_elements in spec["dequantize"].items():
        data = open(os.path.join(d, t + ".in.bin"), "rb").read()
        g.dequantize(t, data, n_elements).astype("<f4").tofile(os.path.join(d, t + ".deq.f32"))


if __name__ == "__main__":
    main(sys.argv[1])
