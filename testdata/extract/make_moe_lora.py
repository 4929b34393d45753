#!/usr/bin/env python3
"""Writes a GGUF LoRA for a MoE base with gguf-py (not gguf-lora): stacked-expert pairs for every
`ffn_*_exps` tensor (lora_a ne [n_in, rank, n_expert], lora_b ne [rank, n_out, n_expert], as
llama.cpp's loader takes them) and plain pairs for every `attn_q`; alpha = 2·rank.

    make_moe_lora.py BASE.gguf OUT.gguf RANK
"""
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter

base, out, r = sys.argv[1], sys.argv[2], int(sys.argv[3])
reader = GGUFReader(base)
arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
rng = np.random.default_rng(7)
w = GGUFWriter(out, arch)
w.add_string("general.type", "adapter")
w.add_string("adapter.type", "lora")
w.add_float32("adapter.lora.alpha", float(2 * r))
for t in reader.tensors:
    ne = [int(x) for x in t.shape]
    if t.name.endswith("_exps.weight"):
        n_in, n_out, n_exp = ne
        a = rng.uniform(-1, 1, size=(n_exp, r, n_in)) / np.sqrt(n_in)
        b = rng.normal(0, 0.2, size=(n_exp, n_out, r))
    elif t.name.endswith("attn_q.weight"):
        n_in, n_out = ne
        a = rng.uniform(-1, 1, size=(r, n_in)) / np.sqrt(n_in)
        b = rng.normal(0, 0.2, size=(n_out, r))
    else:
        continue
    w.add_tensor(t.name + ".lora_a", a.astype(np.float32))
    w.add_tensor(t.name + ".lora_b", b.astype(np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
