#!/usr/bin/env python3
"""llama.cpp's logits (through llama-cpp-python) for every position of one token sequence, with any number
of GGUF LoRA adapters loaded at runtime at their scales. Reference for tests/verify_*.rs.

    llama_logits.py MODEL.gguf --tokens 1,2,3 --out OUT.npy [--lora ADAPTER.gguf:SCALE]... [--threads N]

Writes float32 [n_tokens, n_vocab]. The K/V cache is f32 (llama.cpp's default f16 cache alone moves logits
by ~1e-3 relative) and flash attention is off, so on F32 weights the only differences to an exact f32
forward pass are summation order and ggml's f16 GELU table.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np

GGML_TYPE_F32 = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="append", default=[], help="ADAPTER.gguf:SCALE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp

    tokens = [int(t) for t in args.tokens.split(",")]
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
                          logits_all=True, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    adapters = []
    try:
        if args.lora:
            scales = []
            for spec in args.lora:
                path, scale = spec.rsplit(":", 1)
                a = llama_cpp.llama_adapter_lora_init(llm.model, path.encode())
                if not a:
                    sys.exit(f"llama.cpp refused the adapter {path}")
                adapters.append(a)
                scales.append(float(scale))
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
            sc = (ctypes.c_float * len(scales))(*scales)
            if llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(adapters), sc):
                sys.exit("llama_set_adapters_lora failed")
        llm.eval(tokens)
        np.save(args.out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        # adapters belong to the model and are freed with it
        llm.close()


if __name__ == "__main__":
    main()
