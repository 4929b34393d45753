#!/usr/bin/env python3
"""What `gguf-lora verify` does, done with llama.cpp (llama-cpp-python): logits of the base, of the base with
a GGUF LoRA at runtime, and of the merged model, for the same tokens. Prints wall time per step and in
total, for the speed comparison in the verify report.

    llama_verify_bench.py BASE.gguf ADAPTER.gguf MERGED.gguf --tokens 1,2,3 [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("merged")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    tokens = [int(t) for t in args.tokens.split(",")]
    kw = dict(n_ctx=64, n_batch=64, logits_all=True, n_threads=args.threads, n_threads_batch=args.threads,
              verbose=False)
    t = {}
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.base, **kw)
    llm.eval(tokens)
    t["base"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    a = llama_cpp.llama_adapter_lora_init(llm.model, args.adapter.encode())
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(a)
    sc = (ctypes.c_float * 1)(1.0)
    llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 1, sc)
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.eval(tokens)
    t["runtime"] = time.perf_counter() - t1
    llm.close()
    t2 = time.perf_counter()
    m = llama_cpp.Llama(model_path=args.merged, **kw)
    m.eval(tokens)
    t["merged"] = time.perf_counter() - t2
    m.close()
    t["total"] = time.perf_counter() - t0
    t["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(t))


if __name__ == "__main__":
    main()
