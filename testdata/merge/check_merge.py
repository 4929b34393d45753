#!/usr/bin/env python3
"""Independent checks of `gguf-lora merge` outputs, from other tools only: gguf-py reads (and gguf-py's own
dequantizers), numpy, libggml through ctypes, llama.cpp through llama-cpp-python. Prints one JSON object.

  reference MERGED_F32 BASE ADAPTER:SCALE...   W + Σ scale·alpha/rank·B·A in float64 (numpy) vs our --outtype f32
  keep REPORT.json BASE MERGED MERGED_F32      merged tensors == libggml quantization of our f32 merge, in the
                                               type the report says; every other tensor == the base's bytes
  logits BASE ADAPTER:SCALE MERGED...          llama.cpp logits of each MERGED vs base + adapter at runtime
  same OURS REF                                every tensor of OURS vs REF (max |Δ| / max |REF|)
  versus REPORT.json EXACT OURS THEIRS         per merged tensor RMS(ours − exact) / RMS(theirs − exact)
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def raw(path):
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape], bytes(t.data.tobytes()))
            for t in GGUFReader(path).tensors}


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.parts[-1]
    return v.tobytes().decode() if v.dtype == np.uint8 and len(f.types) == 1 and f.types[0].name == "STRING" else v[0]


def adapter_deltas(path, scale):
    """base tensor name → (delta float64 in base row layout, |B|@|A| bound)."""
    r = GGUFReader(path)
    alpha = field(r, "adapter.lora.alpha") or 0.0
    ts = {t.name: t for t in r.tensors}
    out = {}
    for name, t in ts.items():
        if not name.endswith(".lora_a"):
            continue
        target = name[: -len(".lora_a")]
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        bt = ts[target + ".lora_b"]
        b = dequantize(bt.data, bt.tensor_type).astype(np.float64)
        rank = int(bt.shape[0])
        s = scale * (alpha / rank if alpha else 1.0)
        if target.startswith("token_embd"):
            # a: (n_vocab, r), b: (n_embd, r) → delta (n_vocab, n_embd)
            d, bound = a @ b.T, np.abs(a) @ np.abs(b).T
        else:
            # a: (r, n_in), b: (n_out, r) → delta (n_out, n_in)
            d, bound = b @ a, np.abs(b) @ np.abs(a)
        out[target] = (s * d, abs(s) * bound)
    return out


def parse_specs(specs):
    out = []
    for spec in specs:
        p, s = spec.rsplit(":", 1)
        out.append((p, float(s)))
    return out


def cmd_reference(merged, base, *specs):
    deltas = {}
    for path, scale in parse_specs(specs):
        for name, (d, b) in adapter_deltas(path, scale).items():
            if name in deltas:
                deltas[name] = (deltas[name][0] + d, deltas[name][1] + b)
            else:
                deltas[name] = (d, b)
    base_r = {t.name: t for t in GGUFReader(base).tensors}
    got_r = {t.name: t for t in GGUFReader(merged).tensors}
    worst, worst_name, untouched_equal, delta_seen = 0.0, None, True, float("inf")
    for name, bt in base_r.items():
        mt = got_r[name]
        if name not in deltas:
            same = (bt.tensor_type == mt.tensor_type and list(bt.shape) == list(mt.shape)
                    and bt.data.tobytes() == mt.data.tobytes())
            untouched_equal &= same
            continue
        ne0 = int(bt.shape[0])
        w = dequantize(bt.data, bt.tensor_type).astype(np.float64).reshape(-1, ne0)
        got = dequantize(mt.data, mt.tensor_type).astype(np.float64).reshape(-1, ne0)
        d, b = deltas[name]
        ref = w + d
        # f32 rounding: each element is a sum of rank+2 terms; allow 64 ulps of the terms' magnitudes.
        tol = 64 * np.finfo(np.float32).eps * (np.abs(w) + b) + 1e-30
        ratio = float(np.max(np.abs(got - ref) / tol))
        if ratio > worst:
            worst, worst_name = ratio, name
        delta_seen = min(delta_seen, float(np.abs(got - w).max()))
    print(json.dumps({"touched": len(deltas), "worst_over_tolerance": worst, "worst_tensor": worst_name,
                      "untouched_equal": bool(untouched_equal), "min_max_delta": delta_seen,
                      "types_out": sorted({got_r[n].tensor_type.name for n in deltas})}))


def cmd_keep(report_path, base, merged, merged_f32):
    from ggml_ctypes import Ggml

    ggml = Ggml()
    report = json.load(open(report_path))
    types_out = {t["name"]: t["type_out"] for t in report["tensors"]}
    b, m, f = raw(base), raw(merged), raw(merged_f32)
    mismatched, copied_diff, checked = [], [], 0
    per_type = {}
    for name, (ty, ne, data) in b.items():
        mty, mne, mdata = m[name]
        if name in types_out:
            x = np.frombuffer(f[name][2], dtype=np.float32).reshape(-1, ne[0])
            want = ggml.quantize(types_out[name], x)
            checked += 1
            per_type[mty] = per_type.get(mty, 0) + 1
            if want != mdata or mty.lower() != types_out[name].lower():
                mismatched.append(name)
        elif (mty, mne, mdata) != (ty, ne, data):
            copied_diff.append(name)
    print(json.dumps({"checked": checked, "per_type": per_type, "mismatched": mismatched,
                      "copied_differ": copied_diff}))


def llama_logits(model_path, tokens, lora=None, scale=1.0):
    import llama_cpp

    kwargs = dict(model_path=str(model_path), n_ctx=64, logits_all=True, n_threads=2, n_threads_batch=2,
                  verbose=False, type_k=0, type_v=0)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
        kwargs["lora_scale"] = scale
    llm = llama_cpp.Llama(**kwargs)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def kl(p_logits, q_logits):
    """mean over positions of KL(softmax(p) || softmax(q))."""
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def cmd_logits(base, spec, *merged):
    path, scale = parse_specs([spec])[0]
    n_vocab = int(next(t.shape[1] for t in GGUFReader(base).tensors if t.name == "token_embd.weight"))
    lo, hi = (100, 20000) if n_vocab > 20000 else (3, n_vocab)
    tokens = [2] + [int(t) for t in np.random.default_rng(0).integers(lo, hi, size=19)]
    runtime = llama_logits(base, tokens, path, scale)
    out = {}
    for name, p in [("base", base)] + [(m, m) for m in merged]:
        x = llama_logits(p, tokens)
        out[name] = {"kl": kl(runtime, x), "max_abs": float(np.abs(x - runtime).max()),
                     "top1": float(np.mean(x.argmax(-1) == runtime.argmax(-1)))}
    print(json.dumps(out))


def cmd_same(ours, ref):
    """Every tensor of OURS against REF (e.g. PEFT merge_and_unload → convert_hf_to_gguf): max |Δ| relative
    to the tensor's max |value|, and which tensors differ from REF at all."""
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    worst, worst_name, names_equal = 0.0, None, sorted(a) == sorted(b)
    for name in set(a) & set(b):
        x = dequantize(a[name].data, a[name].tensor_type).astype(np.float64).ravel()
        y = dequantize(b[name].data, b[name].tensor_type).astype(np.float64).ravel()
        rel = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) if x.size == y.size else float("inf")
        if rel > worst:
            worst, worst_name = rel, name
    print(json.dumps({"names_equal": names_equal, "worst_rel": worst, "worst_tensor": worst_name}))


def cmd_versus(report_path, exact, ours, theirs):
    """Per merged tensor (from our JSON report): RMS(ours − exact) / RMS(theirs − exact), where EXACT is the
    f32 merge and THEIRS e.g. export-lora + llama-quantize. Also the types THEIRS chose."""
    names = [t["name"] for t in json.load(open(report_path))["tensors"]]
    e, o, t = ({x.name: x for x in GGUFReader(p).tensors} for p in (exact, ours, theirs))
    ratios, same_type = {}, 0
    for n in names:
        x = dequantize(e[n].data, e[n].tensor_type).astype(np.float64).ravel()
        a = dequantize(o[n].data, o[n].tensor_type).astype(np.float64).ravel()
        b = dequantize(t[n].data, t[n].tensor_type).astype(np.float64).ravel()
        ratios[n] = float(np.sqrt(np.mean((a - x) ** 2) / np.mean((b - x) ** 2)))
        same_type += o[n].tensor_type == t[n].tensor_type
    worst = max(ratios, key=ratios.get)
    print(json.dumps({"tensors": len(names), "same_type": same_type, "max_ratio": ratios[worst],
                      "worst_tensor": worst, "mean_ratio": float(np.mean(list(ratios.values())))}))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"reference": cmd_reference, "keep": cmd_keep, "logits": cmd_logits, "same": cmd_same, "versus": cmd_versus}[cmd](*rest)
