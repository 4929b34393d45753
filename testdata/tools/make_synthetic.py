"""Synthetic llama-shaped models and LoRA adapters for benchmarks (nothing here is committed output).

    make_synthetic.py model OUT.gguf [--shape 7b|1b|tiny] [--type q4_k] [--tokenizer-from SMOLLM.gguf]
    make_synthetic.py lora  OUT.gguf --base BASE.gguf [--rank 16] [--targets all-linear] [--seed N]
    make_synthetic.py peft  OUT_DIR  --base BASE.gguf [--rank 64] [--seed N]   (PEFT dir + HF config.json)

Quantized weights are real ggml blocks: a pool of random rows is quantized once by libggml
(ggml_ctypes) and tensors are filled with rows drawn from that pool, so a 3.7 GB Q4_K model takes
seconds instead of the ~10 minutes a full reference quantization would. Norms are F32 near 1.
The tokenizer KVs are copied from a real model (SmolLM2) so llama.cpp can load the result.
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf

sys.path.insert(0, os.path.dirname(__file__))
import ggml_ctypes  # noqa: E402

SHAPES = {
    # hidden, ffn, layers, heads, kv heads
    "7b": (4096, 11008, 32, 32, 32),
    "1b": (2048, 5632, 22, 32, 4),
    "tiny": (256, 512, 2, 4, 2),
}

LINEAR = {
    # gguf name: (HF module path, out, in) filled per shape
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def linear_shapes(hidden, ffn, heads, kv_heads):
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return {  # (n_out, n_in)
        "attn_q": (hidden, hidden),
        "attn_k": (kv, hidden),
        "attn_v": (kv, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }


class RowPool:
    """Quantized random rows of one length, reused to fill big tensors cheaply."""

    def __init__(self, ggml, qtype, n_in, rng, n_rows=512):
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32) * 0.02
        raw = ggml.quantize(qtype, x)
        self.row_bytes = len(raw) // n_rows
        self.rows = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, self.row_bytes)

    def tensor(self, n_out, rng):
        idx = rng.integers(0, self.rows.shape[0], size=n_out)
        return self.rows[idx]


def copy_tokenizer(writer, src_path):
    reader = gguf.GGUFReader(src_path)
    n_vocab = None
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
            if field.name == "tokenizer.ggml.tokens":
                n_vocab = len(val)
            writer.add_key_value(field.name, val, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[-1]).decode("utf-8"), vtype)
        else:
            writer.add_key_value(field.name, field.parts[-1].tolist()[0], vtype)
    return n_vocab


def make_model(args):
    hidden, ffn, layers, heads, kv_heads = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)
    ggml = ggml_ctypes.Ggml()
    qtype = args.type.lower()
    raw_type = gguf.GGMLQuantizationType[args.type.upper()]
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"synthetic-llama-{args.shape}-{qtype}")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if qtype == "q4_k" else gguf.LlamaFileType.ALL_F32)
    n_vocab = copy_tokenizer(w, args.tokenizer_from)
    lin = linear_shapes(hidden, ffn, heads, kv_heads)
    pools = {}

    def pool(n_in):
        if n_in not in pools:
            pools[n_in] = RowPool(ggml, qtype, n_in, rng)
        return pools[n_in]

    plan = []  # (name, kind, n_out, n_in)
    plan.append(("token_embd.weight", "q8_0", n_vocab, hidden))
    for i in range(layers):
        plan.append((f"blk.{i}.attn_norm.weight", "norm", hidden, 0))
        for g in LINEAR:
            n_out, n_in = lin[g]
            plan.append((f"blk.{i}.{g}.weight", "q", n_out, n_in))
        plan.append((f"blk.{i}.ffn_norm.weight", "norm", hidden, 0))
    plan.append(("output_norm.weight", "norm", hidden, 0))
    plan.append(("output.weight", "q6_k", n_vocab, hidden))

    q8 = RowPool(ggml, "q8_0", hidden, rng)
    q6 = RowPool(ggml, "q6_k", hidden, rng)
    for name, kind, n_out, n_in in plan:
        if kind == "norm":
            w.add_tensor_info(name, [n_out], np.dtype(np.float32), n_out * 4)
        else:
            p = {"q8_0": q8, "q6_k": q6}.get(kind) or pool(n_in)
            t = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q6_k": gguf.GGMLQuantizationType.Q6_K}.get(kind, raw_type)
            w.add_tensor_info(name, [n_out, p.row_bytes], np.dtype(np.uint8), n_out * p.row_bytes, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, kind, n_out, n_in in plan:
        if kind == "norm":
            w.write_tensor_data((1.0 + 0.01 * rng.standard_normal(n_out)).astype(np.float32))
        else:
            p = {"q8_0": q8, "q6_k": q6}.get(kind) or pool(n_in)
            w.write_tensor_data(p.tensor(n_out, rng))
    w.close()


def base_linear_shapes(base_path):
    """{gguf tensor name: (n_out, n_in)} for the 2-D block weights of a llama-shaped base, and its hparams."""
    reader = gguf.GGUFReader(base_path)
    shapes = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR and len(t.shape) == 2:
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            shapes[t.name] = (n_out, n_in)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    hp = {}
    for key in ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "context_length"]:
        f = reader.fields.get(f"{arch}.{key}")
        if f is not None:
            hp[key] = int(f.parts[-1][0])
    return arch, shapes, hp


def lora_pair(rng, n_out, n_in, rank):
    a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
    b = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)
    return a, b


def make_lora(args):
    arch, shapes, _ = base_linear_shapes(args.base)
    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(args.out, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(args.alpha if args.alpha is not None else args.rank))
    for name, (n_out, n_in) in shapes.items():
        a, b = lora_pair(rng, n_out, n_in, args.rank)
        # numpy shape (rank, n_in) -> ggml ne [n_in, rank]; (n_out, rank) -> ne [rank, n_out]
        w.add_tensor(name + ".lora_a", a)
        w.add_tensor(name + ".lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_peft(args):
    from safetensors.numpy import save_file

    arch, shapes, hp = base_linear_shapes(args.base)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    tensors = {}
    for name, (n_out, n_in) in shapes.items():
        _, layer, g, _ = name.split(".")
        a, b = lora_pair(rng, n_out, n_in, args.rank)
        prefix = f"base_model.model.model.layers.{layer}.{LINEAR[g]}"
        tensors[prefix + ".lora_A.weight"] = a.astype(np.float16)
        tensors[prefix + ".lora_B.weight"] = b.astype(np.float16)
    save_file(tensors, os.path.join(args.out, "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "r": args.rank, "lora_alpha": args.alpha or 2 * args.rank,
        "target_modules": sorted({v.split(".")[-1] for v in LINEAR.values()}),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
        "base_model_name_or_path": "synthetic-llama",
    }
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    # The HF config.json that llama.cpp's convert_lora_to_gguf.py needs (--base DIR).
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hp["embedding_length"], "intermediate_size": hp["feed_forward_length"],
        "num_hidden_layers": hp["block_count"], "num_attention_heads": hp["attention.head_count"],
        "num_key_value_heads": hp.get("attention.head_count_kv", hp["attention.head_count"]),
        "max_position_embeddings": hp.get("context_length", 4096), "rms_norm_eps": 1e-5,
        "vocab_size": 49152, "torch_dtype": "float16", "tie_word_embeddings": False,
    }
    os.makedirs(os.path.join(args.out, "hf-base"), exist_ok=True)
    with open(os.path.join(args.out, "hf-base", "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["model", "lora", "peft"])
    ap.add_argument("out")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--type", default="q4_k")
    ap.add_argument("--tokenizer-from")
    ap.add_argument("--base")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"model": make_model, "lora": make_lora, "peft": make_peft}[args.what](args)


if __name__ == "__main__":
    main()
