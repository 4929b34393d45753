"""Compares two GGUF models tensor for tensor with gguf-py (independent of our reader).

usage: compare.py OURS.gguf THEIRS.gguf [--check]
Prints one JSON line: per tensor name, both types and whether the bytes are identical; and the
metadata keys whose values differ (GGUF.* header fields and key order ignored). With --check, one
summary line instead, and exit status 1 unless every tensor has the same type and bytes.
"""
import json
import sys

import numpy as np
import gguf


def load(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001 - an unreadable field still counts as present
            v = None
        meta[k] = v
    return tensors, meta


ours, our_meta = load(sys.argv[1])
theirs, their_meta = load(sys.argv[2])
out = {"tensors": {}, "only_ours": sorted(set(ours) - set(theirs)), "only_theirs": sorted(set(theirs) - set(ours))}
for name in sorted(set(ours) & set(theirs)):
    (ta, ba), (tb, bb) = ours[name], theirs[name]
    out["tensors"][name] = {"ours": ta, "theirs": tb, "identical": ta == tb and ba == bb}
keys = set(our_meta) | set(their_meta)
out["meta_diff"] = sorted(k for k in keys if our_meta.get(k, "<absent>") != their_meta.get(k, "<absent>"))
out["meta"] = {k: [our_meta.get(k), their_meta.get(k)] for k in out["meta_diff"] if not k.startswith("tokenizer.")}
if "--check" in sys.argv[3:]:
    t = out["tensors"]
    same = [n for n, v in t.items() if v["ours"] == v["theirs"]]
    bad = [n for n in same if not t[n]["identical"]]
    print(f"check: {len(t)} tensors, {len(same)} of the same type, {len(bad)} of those differ; "
          f"metadata differs in {out['meta_diff']}")
    sys.exit(1 if bad or len(same) != len(t) or out["only_ours"] or out["only_theirs"] else 0)
print(json.dumps(out, default=str))
