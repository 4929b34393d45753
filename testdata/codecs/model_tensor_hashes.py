"""Per-tensor sha256 of libggml's dequantization of every tensor in a GGUF file.

Usage: model_tensor_hashes.py MODEL.gguf  → JSON on stdout: a list of
  {"name", "type" (ggml type name), "ne" (dims, ne[0] first), "offset" (absolute file offset of the
   data), "n_bytes", "sha256" (of the little-endian f32 values ggml's to_float gives, in order)}

Tensors are located with gguf-py (GGUFReader) and decoded with the real libggml
(testdata/tools/ggml_ctypes.py), a block of rows at a time so no tensor is held whole as f32.
"""
import hashlib
import json
import sys

import gguf
import numpy as np
from ggml_ctypes import Ggml

ROWS_BYTES = 1 << 22  # decode about 4 MiB of encoded data per call


def main(path):
    g = Ggml()
    reader = gguf.GGUFReader(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for t in reader.tensors:
        tname = t.tensor_type.name.lower()
        ne = [int(d) for d in t.shape]
        n_per_row = ne[0]
        nrows = int(t.n_elements) // n_per_row
        row_bytes = int(t.n_bytes) // nrows
        assert row_bytes * nrows == int(t.n_bytes), t.name
        h = hashlib.sha256()
        step = max(1, ROWS_BYTES // row_bytes)
        base = int(t.data_offset)
        for r0 in range(0, nrows, step):
            r1 = min(nrows, r0 + step)
            chunk = raw[base + r0 * row_bytes: base + r1 * row_bytes].tobytes()
            if tname == "f32":
                vals = np.frombuffer(chunk, dtype="<f4")
            else:
                vals = g.dequantize(tname, chunk, (r1 - r0) * n_per_row)
            h.update(vals.astype("<f4").tobytes())
        out.append({"name": t.name, "type": tname, "ne": ne, "offset": base,
                    "n_bytes": int(t.n_bytes), "sha256": h.hexdigest()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
