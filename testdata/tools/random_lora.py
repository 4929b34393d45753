#!/usr/bin/env python3
"""A random GGUF LoRA adapter for a base GGUF, written by gguf-py, with the layout llama.cpp loads
(`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, `NAME.lora_a` ne=[n_in, rank],
`NAME.lora_b` ne=[rank, n_out]). Fixture maker for tests/verify_cli.rs.

    random_lora.py BASE.gguf OUT.gguf [--rank 16] [--alpha 32] [--seed 0] [--b-std 0.01]

Targets every attn_q/k/v/output and ffn_gate/up/down of every block; A ~ U(±1/√n_in) (PEFT's default
init), B ~ N(0, b_std): a trained-looking adapter of plausible size.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-std", type=float, default=0.01)
    args = ap.parse_args()
    src = os.environ.get("GGUF_LORA_LLAMA_SRC")
    if src and (Path(src) / "gguf-py").is_dir():
        sys.path.insert(0, str(Path(src) / "gguf-py"))
    import gguf

    base = gguf.GGUFReader(args.base)
    arch = base.fields["general.architecture"].contents()
    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(args.out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", args.alpha)
    for t in base.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in TARGETS:
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        bound = 1.0 / np.sqrt(n_in)
        a = rng.uniform(-bound, bound, size=(args.rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, args.b_std, size=(n_out, args.rank)).astype(np.float32)
        w.add_tensor(t.name + ".lora_a", a)
        w.add_tensor(t.name + ".lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
