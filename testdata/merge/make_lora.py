#!/usr/bin/env python3
"""Writes a GGUF LoRA adapter for any base GGUF, with gguf-py (not with gguf-lora's own writer).

Shapes come from the base (read with gguf-py). Per adapted tensor NAME (ggml ne = [n_in, n_out]):
NAME.lora_a with ne [n_in, rank] and NAME.lora_b with ne [rank, n_out]; for token_embd (ne [n_embd, n_vocab])
lora_a has ne [rank, n_vocab] and lora_b ne [rank, n_embd], as llama.cpp's loader expects.
Values as PEFT initializes/trains them, roughly: A ~ U(±1/sqrt(n_in)), B ~ N(0, B_STD).

usage: make_lora.py BASE.gguf OUT.gguf [--rank R] [--alpha A] [--seed S] [--targets attn_q,ffn_down,...]
                    [--layers 0,1] [--embd] [--b-std X] [--dtype f32|f16] [--arch ARCH] [--bogus NAME:N_IN:N_OUT]
--arch overrides general.architecture and --bogus adds a pair for a tensor the base may not have (refusal tests).
"""
import argparse

import numpy as np
from gguf import GGUFReader, GGUFWriter

ALL = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=ALL)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--embd", action="store_true")
    ap.add_argument("--b-std", type=float, default=0.01)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--bogus", action="append", default=[])
    args = ap.parse_args()

    base = GGUFReader(args.base)
    arch = bytes(base.fields["general.architecture"].parts[-1]).decode()
    rng = np.random.default_rng(args.seed)
    targets = set(args.targets.split(",")) if args.targets else set()
    layers = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    dt = np.float16 if args.dtype == "f16" else np.float32
    r = args.rank

    w = GGUFWriter(args.out, args.arch or arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", args.alpha)
    for t in base.tensors:
        parts = t.name.split(".")
        ne = [int(x) for x in t.shape]
        if t.name == "token_embd.weight" and args.embd:
            n_embd, n_vocab = ne
            a = rng.uniform(-1, 1, size=(n_vocab, r)).astype(np.float32)
            b = rng.normal(0, args.b_std, size=(n_embd, r)).astype(np.float32)
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight":
            if layers is not None and int(parts[1]) not in layers:
                continue
            n_in, n_out = ne
            lim = 1.0 / np.sqrt(n_in)
            a = rng.uniform(-lim, lim, size=(r, n_in)).astype(np.float32)
            b = rng.normal(0, args.b_std, size=(n_out, r)).astype(np.float32)
        else:
            continue
        w.add_tensor(t.name + ".lora_a", a.astype(dt))
        w.add_tensor(t.name + ".lora_b", b.astype(dt))
    for spec in args.bogus:
        name, n_in, n_out = spec.split(":")
        w.add_tensor(name + ".lora_a", rng.uniform(-0.1, 0.1, size=(r, int(n_in))).astype(dt))
        w.add_tensor(name + ".lora_b", rng.normal(0, args.b_std, size=(int(n_out), r)).astype(dt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
