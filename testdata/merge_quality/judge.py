#!/usr/bin/env python3
"""Judges merged models by llama.cpp (llama-cpp-python, CPU): does a merge answer the trained facts like
the adapter applied at runtime, and how far are its next-token distributions from the runtime LoRA's?

    judge.py BASE.gguf ADAPTER.gguf [LABEL=]MERGED.gguf ... [--scale 1.0] [--facts facts.json]
             [--heldout heldout.txt] [--ctx 512] [--threads 1] [--json]

Models judged: `base` (BASE alone), `runtime` (BASE with ADAPTER loaded at runtime at --scale: the model
the user trained) and every MERGED file. For each:

- token_acc: share of the facts' answer tokens that are top-1 (teacher-forced: the prompt and the answer's
  earlier tokens are given);
- fact_acc: share of facts whose answer tokens are all top-1 (= greedy decoding reproduces the answer);
- kl_facts: mean over every position of the 48 fact sentences (each evaluated on its own, from an empty
  cache) of KL(runtime || model) of the next-token distributions, full vocabulary, nats;
- kl_heldout: the same over heldout.txt, evaluated in windows of --ctx tokens (each from an empty cache);
- size: file size / BASE's (runtime: BASE + ADAPTER).

Tokens come from BASE's own tokenizer (llama.cpp's), with BOS if the model adds one. The fact sentence is
prompt + ' ' + answer + '.'; the answer tokens are the sentence's tokens after the prompt's, before the '.'.
Deterministic: greedy only, f32 K/V cache, flash attention off (as testdata/tools/llama_logits.py).
--json prints one JSON object {label: {metrics}} as the last line. One thread by default ($JUDGE_THREADS):
ggml's worker threads spin while they wait, and on a busy 2-core machine two of them ran 10x slower than one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GGML_TYPE_F32 = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_rows(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || model) per row, from log-probabilities."""
    return (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1, dtype=np.float64)


class Model:
    """One llama.cpp model (optionally with a runtime LoRA) and one context of `ctx` tokens."""

    def __init__(self, path: str, ctx: int, threads: int, lora: str | None = None, scale: float = 1.0):
        import llama_cpp

        self.ll = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, verbose=False,
                                   type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
        if lora:
            a = llama_cpp.llama_adapter_lora_init(self.llm.model, lora.encode())
            if not a:
                sys.exit(f"judge.py: llama.cpp refused the adapter {lora}")
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(a)
            sc = (ctypes.c_float * 1)(scale)
            if llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, 1, sc):
                sys.exit(f"judge.py: llama_set_adapters_lora failed for {lora}")

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """Log-probabilities [len(tokens), n_vocab] of the next token at every position, from an empty cache."""
        self.llm.reset()
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.llm.ctx), True)
        self.llm.eval(tokens)
        return log_softmax(np.asarray(self.llm.scores[: len(tokens)]))

    def close(self) -> None:
        self.llm.close()


def fact_rows(m: Model, facts: list[dict]) -> list[tuple[list[int], int]]:
    rows = []
    for f in facts:
        p = m.tokenize(f["prompt"])
        s = m.tokenize(f["prompt"] + " " + f["answer"] + ".")
        if s[: len(p)] != p or len(s) - len(p) < 2:
            sys.exit(f"judge.py: the prompt's tokens are not a prefix of the sentence's: {f}")
        rows.append((s, len(p)))
    return rows


def windows(tokens: list[int], ctx: int) -> list[list[int]]:
    return [tokens[i : i + ctx] for i in range(0, len(tokens), ctx) if len(tokens[i : i + ctx]) >= 2]


def judge(m: Model, rows, held, ref) -> tuple[dict, dict]:
    """Metrics of model `m`; `ref` holds the runtime model's log-probabilities (None: m is the runtime)."""
    tok_ok = tok_n = whole = 0
    kl_f: list[np.ndarray] = []
    kl_h: list[np.ndarray] = []
    mine = {"facts": [], "held": []}
    for i, (s, n) in enumerate(rows):
        lp = m.logprobs(s)
        pred = lp[n - 1 : len(s) - 2].argmax(-1)
        gold = np.asarray(s[n : len(s) - 1])
        hits = int((pred == gold).sum())
        tok_ok += hits
        tok_n += len(gold)
        whole += int(hits == len(gold))
        if ref is None:
            mine["facts"].append(lp)
        else:
            kl_f.append(kl_rows(ref["facts"][i], lp))
    for j, w in enumerate(held):
        lp = m.logprobs(w)
        if ref is None:
            mine["held"].append(lp)
        else:
            kl_h.append(kl_rows(ref["held"][j], lp))
    out = {"token_acc": tok_ok / tok_n, "fact_acc": whole / len(rows),
           "kl_facts": float(np.concatenate(kl_f).mean()) if kl_f else 0.0,
           "kl_heldout": float(np.concatenate(kl_h).mean()) if kl_h else 0.0}
    return out, mine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter", help="GGUF LoRA adapter (gguf-lora convert ... -o A.gguf)")
    ap.add_argument("merged", nargs="*", help="[LABEL=]MERGED.gguf")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--facts", default=str(HERE / "facts.json"))
    ap.add_argument("--heldout", default=str(HERE / "heldout.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("JUDGE_THREADS", "1")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    facts = json.loads(Path(args.facts).read_text())["facts"]
    base_size = os.path.getsize(args.base)

    t0 = time.time()
    rt = Model(args.base, args.ctx, args.threads, lora=args.adapter, scale=args.scale)
    rows = fact_rows(rt, facts)
    held_tokens = rt.tokenize(Path(args.heldout).read_text())
    held = windows(held_tokens, args.ctx)
    results: dict[str, dict] = {}
    r, ref = judge(rt, rows, held, None)
    rt.close()
    r["size"] = (base_size + os.path.getsize(args.adapter)) / base_size
    r["seconds"] = time.time() - t0
    results["runtime"] = r

    todo = [("base", args.base)]
    for spec in args.merged:
        label, _, path = spec.rpartition("=")
        todo.append((label or path, path))
    for label, path in todo:
        t0 = time.time()
        if not os.path.isfile(path):
            sys.exit(f"judge.py: {path}: no such file")
        m = Model(path, args.ctx, args.threads)
        r, _ = judge(m, rows, held, ref)
        m.close()
        r["size"] = os.path.getsize(path) / base_size
        r["seconds"] = time.time() - t0
        results[label] = r

    order = ["base", "runtime"] + [k for k in results if k not in ("base", "runtime")]
    width = max(len(k) for k in order)
    print(f"# {len(rows)} facts ({sum(len(s) for s, _ in rows)} tokens), heldout {len(held_tokens)} tokens "
          f"in windows of {args.ctx}; KL(runtime || model), nats per position")
    print(f"{'model':<{width}}  token_acc  fact_acc  kl_facts  kl_heldout   size  seconds")
    for k in order:
        r = results[k]
        print(f"{k:<{width}}  {r['token_acc']:9.3f}  {r['fact_acc']:8.3f}  {r['kl_facts']:8.4f}  "
              f"{r['kl_heldout']:10.4f}  {r['size']:5.2f}  {r['seconds']:7.1f}")
    if args.json:
        print(json.dumps({k: results[k] for k in order}))


if __name__ == "__main__":
    main()
