"""The real libggml (from llama-cpp-python) through ctypes: the ground truth for our codecs.

Only ggml's public API is used: ggml_quantize_chunk (imatrix NULL = the reference quantizer),
ggml_get_type_traits(type)->to_float, ggml_row_size, ggml_blck_size, ggml_type_size.
"""
import ctypes
import os
import glob

import numpy as np

# ggml type ids (ggml.h, enum ggml_type)
TYPE_IDS = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9,
    "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "q8_k": 15,
    "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq4_nl": 20, "iq3_s": 21,
    "iq2_s": 22, "iq4_xs": 23, "bf16": 30, "tq1_0": 34, "tq2_0": 35, "mxfp4": 39,
}


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def _libdir():
    d = os.environ.get("GGUF_LORA_LIBGGML_DIR")
    if d:
        return d
    import llama_cpp  # noqa: F401 (only to locate the bundled libraries)
    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


class Ggml:
    def __init__(self):
        d = _libdir()
        # libggml-base holds the codecs; load with RTLD_GLOBAL so its dependents resolve.
        base = sorted(glob.glob(os.path.join(d, "libggml-base.so*")))[0]
        self.lib = ctypes.CDLL(base, mode=ctypes.RTLD_GLOBAL)
        lib = self.lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
        ]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def type_id(self, name):
        return TYPE_IDS[name.lower()]

    def row_size(self, type_name, n):
        return self.lib.ggml_row_size(self.type_id(type_name), n)

    def quantize(self, type_name, x, imatrix=None):
        """x: float32 array of shape (nrows, n_per_row) → bytes exactly as ggml_quantize_chunk writes."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrows, n = x.shape
        t = self.type_id(type_name)
        out = np.zeros(self.lib.ggml_row_size(t, n) * nrows, dtype=np.uint8)
        imp = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (n,)
            imp = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.lib.ggml_quantize_init(t)
        written = self.lib.ggml_quantize_chunk(
            t, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data_as(ctypes.c_void_p),
            0, nrows, n, imp)
        assert written == out.size, (written, out.size)
        return out.tobytes()

    def dequantize(self, type_name, data, n_elements):
        """ggml's type_traits.to_float over `data` (bytes) → float32 array of n_elements."""
        t = self.type_id(type_name)
        traits = self.lib.ggml_get_type_traits(t).contents
        if not traits.to_float:
            raise ValueError(f"libggml has no to_float for {type_name}")
        fn = _TO_FLOAT(traits.to_float)
        src = np.frombuffer(data, dtype=np.uint8).copy()
        out = np.zeros(n_elements, dtype=np.float32)
        fn(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
           n_elements)
        return out
