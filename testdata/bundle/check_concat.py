"""Independent check of a concat bundle, from gguf-py reads and numpy (f64), and through llama.cpp.

    check_concat.py BASE.gguf TOKENS_JSON BUNDLE.gguf IN1.gguf:S1 IN2.gguf:S2 ...

1. For every base tensor any input adapts: the bundle's ΔW at user scale 1 (its own alpha / its rank
   from lora_b, llama.cpp's rule; scale 1 when alpha is absent) equals Σ Sᵢ·(alphaᵢ/rankᵢ)·Bᵢ·Aᵢ;
   token_embd's lora_a is stored transposed (row t of ΔW is A[t]·Bᵀ). Ranks are never padded:
   the bundle's rank is the sum of the inputs' ranks.
2. llama.cpp (llama-cpp-python, low-level API): logits with the bundle at scale 1 equal logits with
   all inputs loaded at runtime at their scales (llama_set_adapters_lora), and differ from the base's.
Prints one JSON object with the measured errors; the Rust test asserts on them.
"""
import ctypes
import json
import sys

import gguf
import numpy as np


def read_lora(path):
    r = gguf.GGUFReader(path)
    f = r.get_field("adapter.lora.alpha")
    alpha = float(f.parts[f.data[0]][0]) if f is not None else 0.0
    t = {x.name: np.array(x.data, dtype=np.float64).reshape([int(d) for d in reversed(x.shape)])
         for x in r.tensors}
    pairs = {}
    for name in t:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            pairs[base] = (t[name], t[base + ".lora_b"])
    return alpha, pairs


def delta(alpha, a, b, base):
    rank = b.shape[1]  # lora_b ne[0]
    s = alpha / rank if alpha else 1.0
    if base.startswith("token_embd"):
        return s * (a @ b.T), rank  # (n_vocab, n_embd): the row layout of token_embd
    return s * (b @ a), rank


def llama_logits(base, tokens, adapters):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=base, n_ctx=64, logits_all=True, n_threads=1, n_threads_batch=1,
                          verbose=False, type_k=0, type_v=0)
    try:
        if adapters:
            handles = []
            for path, _ in adapters:
                h = llama_cpp.llama_adapter_lora_init(llm._model.model, path.encode())
                assert h, f"llama.cpp refused {path}"
                handles.append(h)
            n = len(handles)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*handles)
            scales = (ctypes.c_float * n)(*[s for _, s in adapters])
            assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, n, scales) == 0
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def main():
    base, tokens_json, bundle, *specs = sys.argv[1:]
    inputs = [(p, float(s)) for p, s in (x.rsplit(":", 1) for x in specs)]
    expected, ranks = {}, {}
    for path, scale in inputs:
        alpha, pairs = read_lora(path)
        for name, (a, b) in pairs.items():
            d, r = delta(alpha, a, b, name)
            expected[name] = expected.get(name, 0) + scale * d
            ranks[name] = ranks.get(name, 0) + r
    alpha, pairs = read_lora(bundle)
    assert set(pairs) == set(expected), (sorted(pairs), sorted(expected))
    worst = 0.0
    for name, (a, b) in pairs.items():
        d, r = delta(alpha, a, b, name)
        assert r == ranks[name], f"{name}: bundle rank {r}, inputs sum to {ranks[name]}"
        e = expected[name]
        worst = max(worst, float(np.abs(d - e).max() / np.abs(e).max()))
    tokens = json.load(open(tokens_json))["tokens"]
    with_bundle = llama_logits(base, tokens, [(bundle, 1.0)])
    with_inputs = llama_logits(base, tokens, inputs)
    plain = llama_logits(base, tokens, [])
    scale = float(np.abs(with_inputs).max())
    print(json.dumps({
        "tensors": len(pairs),
        "delta_max_rel_err": worst,
        "logits_max_abs_diff": float(np.abs(with_bundle - with_inputs).max()),
        "logits_max_abs": scale,
        "adapter_effect_max_abs": float(np.abs(with_inputs - plain).max()),
    }))


if __name__ == "__main__":
    main()
