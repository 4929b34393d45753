#!/usr/bin/env python3
"""swap_tensors.py DST SRC OUT NAME...: writes OUT, which is DST with the tensors NAME taken from SRC
(their bytes and type as SRC stores them), through gguf-py.

For experiments on where a merge's bytes buy most (docs/MERGE-EXPERIMENTS.md): e.g. a merge with every
touched tensor promoted, and token_embd from a base quantized to a smaller type.
"""
import sys

import gguf
import numpy as np


def main() -> None:
    dst, src, out, names = sys.argv[1], sys.argv[2], sys.argv[3], set(sys.argv[4:])
    rd, rs = gguf.GGUFReader(dst), gguf.GGUFReader(src)
    from_src = {t.name: t for t in rs.tensors}
    missing = names - from_src.keys()
    if missing:
        sys.exit(f"{src}: no tensor {', '.join(sorted(missing))}")
    arch = str(bytes(rd.fields["general.architecture"].parts[-1]), "utf-8")
    w = gguf.GGUFWriter(out, arch)
    for f in rd.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [str(bytes(f.parts[i]), "utf-8") for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(f.name, val, vt, sub_type=sub)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_key_value(f.name, str(bytes(f.parts[-1]), "utf-8"), vt)
        else:
            w.add_key_value(f.name, f.parts[-1].tolist()[0], vt)
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in rd.tensors:
        t = from_src[t.name] if t.name in names else t
        shape = [int(x) for x in reversed(t.shape.tolist())]
        raw_shape = shape if t.tensor_type in floats else gguf.quant_shape_to_byte_shape(shape, t.tensor_type)
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=raw_shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
