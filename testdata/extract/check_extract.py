#!/usr/bin/env python3
"""Independent checks of `gguf-lora extract` outputs (gguf-py reads, numpy). Prints one JSON object.

  lowrank OURS.gguf REF.gguf          every target's effective update scale·B·A (scale = alpha/rank, as
                                      llama.cpp applies it) of OURS vs REF: relative Frobenius error
  reference BASE_DIR FT_DIR OURS.gguf REPORT.json
                                      numpy's SVD (float64, the mergekit-extract-lora recipe: Δ = W_ft − W_base
                                      per 2-D weight) vs ours: the leading singular values per tensor against
                                      the report's, and our adapter's B·A against numpy's rank-r truncation,
                                      brought to GGUF row order with llama.cpp's q/k permutation, and our
                                      residual ‖Δ − B·A‖ against the optimal one, relative to ‖Δ‖ (per tensor in "per")
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "merge"))
from check_merge import adapter_deltas  # noqa: E402  (gguf-py reads, scale = alpha/rank per tensor)

# HF module → GGUF short name (llama), as convert_hf_to_gguf.py maps them.
SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute, restated."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def delta_gguf(delta, name, n_head, n_kv):
    """The delta in GGUF row order (q/k permuted)."""
    if name.endswith("attn_q.weight"):
        return permute(delta, n_head, n_head)
    if name.endswith("attn_k.weight"):
        return permute(delta, n_head, n_kv)
    return delta


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        short = SHORT.get(".".join(parts[3:-1]))
        if short:
            return f"blk.{parts[2]}.{short}.weight"
    return None


def load_dir(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return out


def cmd_lowrank(ours, ref):
    a, b = adapter_deltas(ours, 1.0), adapter_deltas(ref, 1.0)
    worst, worst_name = 0.0, None
    for name, (d_ref, _) in b.items():
        d = a[name][0]
        rel = float(np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref))
        if rel > worst:
            worst, worst_name = rel, name
    print(json.dumps({"targets_equal": sorted(a) == sorted(b), "n": len(b), "worst_rel": worst,
                      "worst": worst_name}))


def cmd_reference(base_dir, ft_dir, ours, report_path):
    cfg = json.load(open(os.path.join(ft_dir, "config.json")))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    report = {t["name"]: t for t in json.load(open(report_path))["tensors"]}
    got = adapter_deltas(ours, 1.0)
    base, ft = load_dir(base_dir), load_dir(ft_dir)
    worst_sv, worst_ba, n = 0.0, 0.0, 0
    worst_sv_name = worst_ba_name = None
    per = {}
    names = []
    for hf, w in ft.items():
        name = gguf_name(hf)
        if name is None or w.ndim != 2:
            continue
        delta = w.astype(np.float64) - base[hf].astype(np.float64)
        if not delta.any():
            continue
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        t = report[name]
        r = t["rank"]
        ours_s = np.array(t["singular_values"][:r], dtype=np.float64)
        sv_rel = float(np.max(np.abs(ours_s - s[:r]) / s[0]))
        if sv_rel > worst_sv:
            worst_sv, worst_sv_name = sv_rel, name
        trunc = delta_gguf((u[:, :r] * s[:r]) @ vt[:r], name, n_head, n_kv)
        mine = got[name][0]
        opt = float(np.linalg.norm(delta_gguf(delta, name, n_head, n_kv) - trunc))
        res = float(np.linalg.norm(delta_gguf(delta, name, n_head, n_kv) - mine))
        ba_rel = float(np.linalg.norm(mine - trunc) / np.linalg.norm(trunc))
        if ba_rel > worst_ba:
            worst_ba, worst_ba_name = ba_rel, f"{name} (rank {r})"
        per[name] = {"rank": r, "sv_rel": sv_rel, "ba_rel": ba_rel, "residual_excess": (res - opt) / float(np.linalg.norm(delta))}
        n += 1
        names.append(name)
    print(json.dumps({"n": n, "worst_sv_rel": worst_sv, "worst_sv": worst_sv_name,
                      "worst_ba_rel": worst_ba, "worst_ba": worst_ba_name,
                      "targets_equal": sorted(names) == sorted(got), "per": per}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"lowrank": cmd_lowrank, "reference": cmd_reference}[cmd](*args)
