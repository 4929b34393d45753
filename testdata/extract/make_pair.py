#!/usr/bin/env python3
"""Writes an HF-style llama checkpoint pair, base and fine-tune, with numpy and the safetensors library
(not with gguf-lora), for `extract`'s tests. Nothing here is committed output: tests run it in a scratch dir.

    make_pair.py OUT_DIR [--shards N] [--bad-shape] [--seed S]

OUT_DIR/base and OUT_DIR/ft each get config.json and model.safetensors (or N shards and
model.safetensors.index.json). Base weights ~N(0, 1/fan_in), stored F16; the fine-tune is stored F32 and
differs in every projection by a low-rank part with a decaying spectrum (σ_i = 0.8^i · 0.5·‖W‖/√n, 12
directions) plus a small full-rank tail (1e-3), as a real fine-tune's delta looks, in a few embedding
rows (new tokens), in the output head, and in the norms. --bad-shape gives the fine-tune a wider
layer-1 up_proj (a shape mismatch).
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file

HIDDEN, FFN, LAYERS, HEADS, KV, VOCAB = 128, 256, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS


def shapes():
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
           "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
    return out


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def write(d, tensors, shards):
    os.makedirs(d, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False}
    json.dump(config, open(os.path.join(d, "config.json"), "w"), indent=1)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(d, "model.safetensors"))
        return
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(d, fname))
        weight_map.update({n: fname for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--bad-shape", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    base, ft = {}, {}
    for name, shape in shapes().items():
        if len(shape) == 1:
            w = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
            base[name] = w
            ft[name] = w.astype(np.float32) + 0.01 * rng.standard_normal(shape).astype(np.float32)
            continue
        w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float16)
        base[name] = w
        w32 = w.astype(np.float32)
        if name == "model.embed_tokens.weight":
            d = np.zeros(shape)
            d[-4:] = 0.05 * rng.standard_normal((4, shape[1]))  # four new tokens' rows
        else:
            m, n = shape
            k = 12
            s = 0.5 * np.linalg.norm(w32) / np.sqrt(n) * 0.8 ** np.arange(k)
            d = (orthonormal(rng, m, k) * s) @ orthonormal(rng, n, k).T
            d += 1e-3 * rng.standard_normal(shape)
        ft[name] = (w32 + d).astype(np.float32)
    if args.bad_shape:
        ft["model.layers.1.mlp.up_proj.weight"] = rng.standard_normal((FFN + 32, HIDDEN)).astype(np.float32)
    write(os.path.join(args.out, "base"), base, args.shards)
    write(os.path.join(args.out, "ft"), ft, args.shards)


if __name__ == "__main__":
    main()
