#!/usr/bin/env python3
"""A reference keep-type LoRA merge made only of other tools: gguf-py reads and writes the files, libggml
(ggml_ctypes) dequantizes and requantizes with ggml's own reference quantizers. Fixture maker for
tests/verify_cli.rs, independent of our merge.

    keep_type_merge.py BASE.gguf ADAPTER.gguf OUT.gguf [--scale S] [--skip TENSOR]... [--outtype keep|TYPE]

For every base tensor the adapter adapts (except --skip ones): W' = W + S·alpha/rank·B·A (token_embd:
W' = W + S·alpha/rank·(A_rows·Bᵀ), its lora_a being stored transposed), written in W's own type
(--outtype keep) or in TYPE. Every other tensor and all metadata are copied unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def import_gguf():
    src = os.environ.get("GGUF_LORA_LLAMA_SRC")
    if src and (Path(src) / "gguf-py").is_dir():
        sys.path.insert(0, str(Path(src) / "gguf-py"))
    import gguf

    return gguf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--skip", action="append", default=[])
    ap.add_argument("--outtype", default="keep", help="keep, or a ggml type name (f32, f16, q8_0, q6_k, ...)")
    args = ap.parse_args()
    gguf = import_gguf()
    from ggml_ctypes import Ggml

    ggml = Ggml()
    T = gguf.GGMLQuantizationType
    base = gguf.GGUFReader(args.base)
    lora = gguf.GGUFReader(args.adapter)
    alpha_field = lora.fields.get("adapter.lora.alpha")
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    lora_t = {t.name: t for t in lora.tensors}

    def values(t) -> np.ndarray:
        """Rows × row_len float32 (numpy order = reversed ggml ne)."""
        n_in = int(t.shape[0])
        n = int(np.prod(t.shape))
        if t.tensor_type == T.F32:
            return np.array(t.data, dtype=np.float32).reshape(-1, n_in)
        if t.tensor_type == T.F16:
            return np.array(t.data, dtype=np.float16).astype(np.float32).reshape(-1, n_in)
        return ggml.dequantize(t.tensor_type.name.lower(), bytes(t.data), n).reshape(-1, n_in)

    arch = base.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(args.out, arch)
    for field in base.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)

    out = []
    for t in base.tensors:
        a = lora_t.get(t.name + ".lora_a")
        b = lora_t.get(t.name + ".lora_b")
        if a is None or b is None or t.name in args.skip:
            out.append((t.name, t.data, t.tensor_type))
            continue
        av, bv = values(a), values(b)
        rank = bv.shape[1]
        scale = args.scale * alpha / rank if alpha else args.scale
        w = values(t).astype(np.float64)
        if t.name == "token_embd.weight":
            delta = av.astype(np.float64) @ bv.astype(np.float64).T
        else:
            delta = bv.astype(np.float64) @ av.astype(np.float64)
        w = (w + scale * delta).astype(np.float32)
        ty = t.tensor_type if args.outtype == "keep" else T[args.outtype.upper()]
        if ty == T.F32:
            out.append((t.name, w, T.F32))
        elif ty == T.F16:
            out.append((t.name, w.astype(np.float16), T.F16))
        else:
            q = np.frombuffer(ggml.quantize(ty.name.lower(), w), dtype=np.uint8)
            out.append((t.name, q.reshape(w.shape[0], -1), ty))
    for name, data, ty in out:
        raw_dtype = None if ty in (T.F32, T.F16) else ty
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
