"""libggml's K-quant throughput on the data of `examples/kquant_speed.rs` (same LCG).

Single thread: million values per CPU second of the calling thread. All threads ("x N" lines): the
rows split into one chunk per core, each chunk one ggml_quantize_chunk / to_float call from its own
Python thread (ctypes releases the GIL), million values per wall-clock second.
"""
import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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


def repeat_for_a_wall_second(mvals, f):
    start = time.perf_counter()
    reps = 0
    while time.perf_counter() - start < 1.0:
        f()
        reps += 1
    return reps * mvals / (time.perf_counter() - start)


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

        threads = os.cpu_count() or 1
        pool = ThreadPoolExecutor(threads)
        tid = g.type_id(t)
        row_bytes = g.row_size(t, n_per_row)
        qbuf = np.zeros(row_bytes * nrows, dtype=np.uint8)
        chunks = np.array_split(np.arange(nrows), threads)
        xp = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        def quantize_chunk(rows, im):
            imp = None if im is None else im.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            g.lib.ggml_quantize_chunk(tid, xp, qbuf.ctypes.data_as(ctypes.c_void_p),
                                      int(rows[0]) * n_per_row, len(rows), n_per_row, imp)

        def dequantize_chunk(rows):
            first = int(rows[0])
            fn(ctypes.c_void_p(src.ctypes.data + first * row_bytes),
               ctypes.cast(out.ctypes.data + first * n_per_row * 4, ctypes.POINTER(ctypes.c_float)),
               len(rows) * n_per_row)

        for label, im in [("ref", None), ("imatrix", imatrix)]:
            rate = repeat_for_a_wall_second(
                mvals, lambda: list(pool.map(lambda r: quantize_chunk(r, im), chunks)))
            print(f"{t} quantize {label} x{threads} {rate:8.2f} Mval/s")
        rate = repeat_for_a_wall_second(mvals, lambda: list(pool.map(dequantize_chunk, chunks)))
        print(f"{t} dequantize x{threads} {rate:8.2f} Mval/s")
        pool.shutdown()


if __name__ == "__main__":
    main()
