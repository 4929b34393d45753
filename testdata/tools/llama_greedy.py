#!/usr/bin/env python3
"""llama.cpp's greedy continuation (through llama-cpp-python) of one token sequence, with any number of
GGUF LoRA adapters loaded at runtime at their scales. Reference for tests/verify_text.rs.

    llama_greedy.py MODEL.gguf --tokens 1,2,3 --n N [--lora ADAPTER.gguf:SCALE]... [--threads N]

Prints {"tokens": [...]} on stdout: N ids, each the first largest logit of llama.cpp's last position
(what llama.cpp's greedy sampler, or top-k 1, picks), fed back one at a time through the KV cache;
it stops after an end-of-generation token (llama_vocab_is_eog). K/V cache f32 and flash attention off,
as in llama_logits.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys

import numpy as np

GGML_TYPE_F32 = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--lora", action="append", default=[], help="ADAPTER.gguf:SCALE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp

    tokens = [int(t) for t in args.tokens.split(",")]
    n_ctx = max(64, len(tokens) + args.n)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    try:
        if args.lora:
            adapters, scales = [], []
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
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        llm.eval(tokens)
        out = []
        for i in range(args.n):
            tok = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)))
            out.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            if i + 1 < args.n:
                llm.eval([tok])
        print(json.dumps({"tokens": out}))
    finally:
        llm.close()


if __name__ == "__main__":
    main()
