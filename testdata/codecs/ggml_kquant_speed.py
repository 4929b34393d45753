"""libggml's single-thread K-quant throughput on the data of `examples/kquant_speed.rs` (same LCG)."""
import ctypes
import sys
import time

import numpy as np

from ggml_ctypes import Ggml

BYTES = {"q2_K": 84, "q3_K": 110, "q4_K": 144, "q5_K": 176, "q6_K": 210}


def lcg(n):
    out = np.empty(n, dtype=np.float32)
    s = 12345
    m = (1 << 64) - 1
    for i in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) & m
        out[i] = np.float32(np.float32(s >> 40) / np.float32(1 << 24)) * np.float32(2.0) - np.float32(1.0)
    return out


def repeat_for_a_second(mvals, f):
    """Runs f until it has used a CPU second (thread time: the machine is shared); returns Mval/s."""
    start = time.thread_time()
    reps = 0
    while time.thread_time() - start < 1.0:
        f()
        reps += 1
    return reps * mvals / (time.thread_time() - start)


def main():
    g = Ggml()
    n_per_row, nrows = 4096, 64
    x = lcg(n_per_row * nrows).reshape(nrows, n_per_row)
    imatrix = (0.5 + (np.arange(n_per_row) % 7)).astype(np.float32)
    only = sys.argv[1] if len(sys.argv) > 1 else None
    for t, bpb in BYTES.items():
        if only and t != only:
            continue
        mvals = x.size / 1e6
        for label, im in [("ref", None), ("imatrix", imatrix)]:
            # one ggml_quantize_chunk call over all rows, single thread
            rate = repeat_for_a_second(mvals, lambda: g.quantize(t, x, im))
            print(f"{t} quantize {label:8} {rate:8.2f} Mval/s")
        q = g.quantize(t, x, None)
        traits = g.lib.ggml_get_type_traits(g.type_id(t)).contents
        fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)(traits.to_float)
        src = np.frombuffer(q, dtype=np.uint8).copy()
        out = np.zeros(x.size, dtype=np.float32)
        sp, op = src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rate = repeat_for_a_second(mvals, lambda: fn(sp, op, x.size))
        print(f"{t} dequantize        {rate:8.2f} Mval/s")


if __name__ == "__main__":
    main()
