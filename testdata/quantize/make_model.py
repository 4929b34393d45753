"""Writes a small llama model (random F32 weights, seeded) whose rows fit the 256-element K-quant
blocks, except ffn_down (row = n_ff = 640, which forces llama-quantize's fallbacks), with gguf-py.

The metadata and tokenizer come from testdata/fixtures/llama/base-f32.gguf (made by llama.cpp's
convert_hf_to_gguf.py); only the shapes change, so llama.cpp, llama-quantize and llama-imatrix load
it. Optionally one tensor is stored in another type (quantized by libggml through ggml_ctypes), to
check that a tensor already of the target type is copied.

usage: make_model.py FIXTURE.gguf OUT.gguf [--q8-tensor NAME]
"""
import argparse

import numpy as np
import gguf

p = argparse.ArgumentParser()
p.add_argument("fixture")
p.add_argument("out")
p.add_argument("--q8-tensor", default=None)
a = p.parse_args()

N_EMBD, N_FF, N_HEAD, N_KV, HEAD = 256, 640, 4, 2, 64
r = gguf.GGUFReader(a.fixture)
arch = r.fields["general.architecture"].contents()
vocab = int(r.fields[f"{arch}.vocab_size"].contents())
n_layer = int(r.fields[f"{arch}.block_count"].contents())
override = {
    f"{arch}.embedding_length": N_EMBD,
    f"{arch}.feed_forward_length": N_FF,
    f"{arch}.attention.head_count": N_HEAD,
    f"{arch}.attention.head_count_kv": N_KV,
    f"{arch}.attention.key_length": HEAD,
    f"{arch}.attention.value_length": HEAD,
    f"{arch}.rope.dimension_count": HEAD,
}

w = gguf.GGUFWriter(a.out, arch)
for name, field in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    vtype = field.types[0]
    if name in override:
        w.add_key_value(name, override[name], vtype)
    elif vtype == gguf.GGUFValueType.ARRAY:
        w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
    else:
        w.add_key_value(name, field.contents(), vtype)

rng = np.random.default_rng(1234)


def mat(rows, cols, scale=0.05):
    x = rng.standard_normal((rows, cols)).astype(np.float32) * scale
    # A few outliers per tensor, as real weights have, so that scales and imatrix weighting matter.
    idx = rng.integers(0, x.size, size=max(1, x.size // 500))
    x.flat[idx] *= 12.0
    return x


def add(name, arr):
    if name == a.q8_tensor:
        import ggml_ctypes

        q = ggml_ctypes.Ggml().quantize("q8_0", arr)
        qb = np.frombuffer(q, dtype=np.uint8).reshape(arr.shape[0], -1)
        w.add_tensor(name, qb, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor(name, arr)


add("token_embd.weight", mat(vocab, N_EMBD))
for i in range(n_layer):
    add(f"blk.{i}.attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
    add(f"blk.{i}.attn_q.weight", mat(N_HEAD * HEAD, N_EMBD))
    add(f"blk.{i}.attn_k.weight", mat(N_KV * HEAD, N_EMBD))
    add(f"blk.{i}.attn_v.weight", mat(N_KV * HEAD, N_EMBD))
    add(f"blk.{i}.attn_output.weight", mat(N_EMBD, N_HEAD * HEAD))
    add(f"blk.{i}.ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
    add(f"blk.{i}.ffn_gate.weight", mat(N_FF, N_EMBD))
    add(f"blk.{i}.ffn_up.weight", mat(N_FF, N_EMBD))
    add(f"blk.{i}.ffn_down.weight", mat(N_EMBD, N_FF))
add("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
add("output.weight", mat(vocab, N_EMBD))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
