"""Quantize and dequantize a batch with the real libggml, for the Rust interop tests of the K-quants.

Usage: ggml_kquant_batch.py DIR
Reads DIR/spec.json:
  {"rows": [{"offset": o, "n": n, "imatrix_offset": o2 or null}, ...],   # into rows.f32 / imatrix.f32
   "types": ["q2_K", ...],
   "blocks": {"q4_K": nblocks, ...}}                                     # random bytes in <type>.in.bin
and DIR/rows.f32, DIR/imatrix.f32, DIR/<type>.in.bin. Writes, per type:
  DIR/<type>.q.bin     every row quantized (ggml_quantize_chunk, one row at a time, with its imatrix),
                       concatenated; Q8_K through quantize_row_q8_K_ref
  DIR/<type>.deq.f32   ggml's to_float of <type>.in.bin (dequantize_row_q8_K for Q8_K)
"""
import ctypes
import json
import os
import sys

import numpy as np

from ggml_ctypes import Ggml

BLOCK_BYTES = {"q2_K": 84, "q3_K": 110, "q4_K": 144, "q5_K": 176, "q6_K": 210, "q8_K": 292}


def main(d):
    g = Ggml()
    spec = json.load(open(os.path.join(d, "spec.json")))
    rows = np.fromfile(os.path.join(d, "rows.f32"), dtype="<f4")
    imats = np.fromfile(os.path.join(d, "imatrix.f32"), dtype="<f4")
    q8_q = g.lib.quantize_row_q8_K_ref
    q8_q.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    q8_d = g.lib.dequantize_row_q8_K
    q8_d.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for t in spec["types"]:
        out = []
        for r in spec["rows"]:
            x = np.ascontiguousarray(rows[r["offset"]:r["offset"] + r["n"]]).reshape(1, -1)
            if t == "q8_K":
                buf = np.zeros(r["n"] // 256 * 292, dtype=np.uint8)
                q8_q(x.ctypes.data, buf.ctypes.data, r["n"])
                out.append(buf.tobytes())
                continue
            io = r["imatrix_offset"]
            imat = None if io is None else imats[io:io + r["n"]]
            out.append(g.quantize(t, x, imat))
        with open(os.path.join(d, t + ".q.bin"), "wb") as f:
            f.write(b"".join(out))
        nblocks = spec["blocks"].get(t, 0)
        if nblocks:
            data = open(os.path.join(d, t + ".in.bin"), "rb").read()
            assert len(data) == nblocks * BLOCK_BYTES[t]
            if t == "q8_K":
                src = np.frombuffer(data, dtype=np.uint8).copy()
                deq = np.zeros(nblocks * 256, dtype=np.float32)
                q8_d(src.ctypes.data, deq.ctypes.data, nblocks * 256)
            else:
                deq = g.dequantize(t, data, nblocks * 256)
            deq.astype("<f4").tofile(os.path.join(d, t + ".deq.f32"))


if __name__ == "__main__":
    main(sys.argv[1])
