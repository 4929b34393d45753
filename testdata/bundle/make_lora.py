"""GGUF LoRA adapters for the bundle tests, written by gguf-py (not by gguf-lora), so a bundle bug
cannot hide behind our own writer.

    make_lora.py concat OUT.gguf   rank 3 on blk.0.attn_q (F16 with --f16, else F32) and blk.1.ffn_down, rank 2 on
                                   token_embd (lora_a stored transposed, as llama.cpp wants it);
                                   no adapter.lora.alpha, so llama.cpp applies the user scale as is
    make_lora.py long OUT.gguf     one pair whose names are 62 bytes long (the bundle must index them)
    make_lora.py shape OUT.gguf    llama, but attn_q shaped for another base (n_in 32)
    make_lora.py qwen2 OUT.gguf    a valid adapter for another architecture
Shapes follow testdata/fixtures/llama (hidden 64, ffn 128, vocab 256).
"""
import sys

import gguf
import numpy as np


def writer(path, arch, alpha=None):
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    return w


def pair(w, rng, name, n_in, n_out, r, dtype=np.float32):
    # numpy shapes are ggml ne reversed: lora_a (r, n_in) -> ne [n_in, r]; lora_b (n_out, r) -> ne [r, n_out]
    w.add_tensor(name + ".lora_a", (rng.standard_normal((r, n_in)) * 0.2).astype(dtype))
    w.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, r)) * 0.2).astype(dtype))


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    what, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(7)
    if what == "concat":
        w = writer(out, "llama")
        pair(w, rng, "blk.0.attn_q.weight", 64, 64, 3, np.float16 if "--f16" in sys.argv else np.float32)
        pair(w, rng, "blk.1.ffn_down.weight", 128, 64, 3)
        # token_embd: lora_a transposed, numpy (n_vocab, r) -> ne [r, n_vocab]; lora_b (n_embd, r)
        w.add_tensor("token_embd.weight.lora_a", (rng.standard_normal((256, 2)) * 0.2).astype(np.float32))
        w.add_tensor("token_embd.weight.lora_b", (rng.standard_normal((64, 2)) * 0.2).astype(np.float32))
    elif what == "long":
        w = writer(out, "llama", alpha=4.0)
        name = "blk.0." + "x" * 42 + ".weight"
        pair(w, rng, name, 64, 64, 2)
        assert len(name + ".lora_a") == 62
    elif what == "shape":
        w = writer(out, "llama", alpha=8.0)
        pair(w, rng, "blk.0.attn_q.weight", 32, 64, 4)  # a base whose attn_q takes 32 inputs, not 64
    elif what == "qwen2":
        w = writer(out, "qwen2", alpha=8.0)
        pair(w, rng, "blk.0.attn_q.weight", 64, 64, 4)
    else:
        raise SystemExit(f"unknown kind {what}")
    finish(w)


if __name__ == "__main__":
    main()
