"""libggml's own codec throughput on given data, for benches/codecs.rs to print beside ours.

Usage: ggml_bench.py DIR
Reads DIR/spec.json {"n_per_row": n, "reps": r, "threads": t, "types": [...], "imatrix_types": [...]},
DIR/data.f32 (rows of n float32) and DIR/imatrix.f32 (n weights). Prints JSON
{type: {"deq1": s, "deqN": s, "q1": s, "qN": s, "qi1": s (imatrix types only)}}: the best of r runs,
in seconds, of to_float / ggml_quantize_chunk over all rows on 1 thread (thread CPU time) and on t
threads (wall time; the rows
split evenly; ctypes releases the GIL during each call, so the threads really run in parallel, as
llama-quantize's own worker threads do).
"""
import ctypes
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ggml_ctypes import Ggml, _TO_FLOAT


def best(reps, fn, clock=time.perf_counter):
    t = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        t = min(t, clock() - t0)
    return t


def best_cpu(reps, fn):
    """One-thread runs are timed in this thread's CPU time: the machine may be shared."""
    return best(reps, fn, time.thread_time)


def main(d):
    g = Ggml()
    lib = g.lib
    spec = json.load(open(os.path.join(d, "spec.json")))
    n = spec["n_per_row"]
    reps = spec["reps"]
    nthreads = spec["threads"]
    x = np.fromfile(os.path.join(d, "data.f32"), dtype="<f4")
    imatrix = np.fromfile(os.path.join(d, "imatrix.f32"), dtype="<f4")
    nrows = x.size // n
    xp = x.ctypes.data
    imp = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    pool = ThreadPoolExecutor(nthreads)
    splits = [int(v) for v in np.linspace(0, nrows, nthreads + 1)]
    out = {}
    for name in spec["types"]:
        t = g.type_id(name)
        lib.ggml_quantize_init(t)
        row_size = lib.ggml_row_size(t, n)
        q = np.zeros(row_size * nrows, dtype=np.uint8)
        y = np.zeros(x.size, dtype=np.float32)
        qp, yp = q.ctypes.data, y.ctypes.data
        to_float = _TO_FLOAT(lib.ggml_get_type_traits(t).contents.to_float)

        def quant(r0, r1, im=None):
            lib.ggml_quantize_chunk(t, ctypes.cast(xp + 4 * r0 * n, ctypes.POINTER(ctypes.c_float)),
                                    qp + r0 * row_size, 0, r1 - r0, n, im)

        def deq(r0, r1):
            to_float(qp + r0 * row_size, ctypes.cast(yp + 4 * r0 * n, ctypes.POINTER(ctypes.c_float)),
                     (r1 - r0) * n)

        def parallel(fn):
            list(pool.map(lambda i: fn(splits[i], splits[i + 1]), range(nthreads)))

        r = {}
        r["q1"] = best_cpu(reps, lambda: quant(0, nrows))
        r["qN"] = best(reps, lambda: parallel(quant))
        if name in spec["imatrix_types"]:
            r["qi1"] = best_cpu(reps, lambda: quant(0, nrows, imp))
        r["deq1"] = best_cpu(reps, lambda: deq(0, nrows))
        r["deqN"] = best(reps, lambda: parallel(deq))
        out[name] = r
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
