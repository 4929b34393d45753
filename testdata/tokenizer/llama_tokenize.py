"""llama.cpp's tokenizer as ground truth for tests/tokenize.rs (llama-cpp-python, vocab_only).

    python llama_tokenize.py CORPUS.json MODEL.gguf...
        A JSON list on stdout, one object per model: for every corpus entry and each
        (add_special, parse_special) pair, llama.cpp's ids (Llama.tokenize) or "abort" where llama.cpp
        kills the process ({"load_error": ...} if llama.cpp refuses the file); for each id list, llama_detokenize with every (remove_special,
        unparse_special) pair (hex); every token's attributes, the end-of-generation tokens and the
        BOS/EOS settings; and, for a model path written with a leading '+', llama_token_to_piece of
        every token (special false/true, hex).

Some inputs make llama.cpp abort (e.g. a character the vocabulary cannot encode, std::out_of_range);
the tokenization runs in a forked child so that such an abort is recorded, not fatal.
"""
import ctypes
import json
import os
import sys

os.environ.setdefault("GGML_NO_BACKTRACE", "1")

MODES = [(True, False), (True, True), (False, False), (False, True)]
DETOK = [(False, False), (False, True), (True, False), (True, True)]


def corpus_bytes(path):
    with open(path, encoding="utf-8") as f:
        corpus = json.load(f)
    out = []
    for e in corpus["entries"]:
        out.append(bytes.fromhex(e["hex"]) if "hex" in e else e["text"].encode("utf-8"))
    return out


def detokenize(llama_cpp, vocab, ids, remove_special, unparse_special):
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 16


def piece(llama_cpp, vocab, tok, special):
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, tok, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 16


def run_items(model, items, texts, fd):
    """In the child: tokenize each (text index, mode), one JSON line per result on fd."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model.model)
    with os.fdopen(fd, "w") as out:
        for ti, mi in items:
            add_special, parse_special = MODES[mi]
            ids = model.tokenize(texts[ti], add_bos=add_special, special=parse_special)
            detok = [detokenize(llama_cpp, vocab, ids, r, u).hex() for r, u in DETOK]
            out.write(json.dumps([ti, mi, ids, detok]) + "\n")
            out.flush()


def reference(corpus_path, model_path, with_pieces):
    import llama_cpp

    texts = corpus_bytes(corpus_path)
    try:
        model = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    except Exception as e:  # llama.cpp refuses the file
        return {"load_error": str(e)}
    todo = [(ti, mi) for ti in range(len(texts)) for mi in range(len(MODES))]
    results = {}
    while todo:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                run_items(model, todo, texts, w)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            for line in f:
                ti, mi, ids, detok = json.loads(line)
                results[(ti, mi)] = {"ids": ids, "detokenize": detok}
        _, status = os.waitpid(pid, 0)
        done = sum(1 for k in todo if k in results)
        todo = todo[done:]
        if todo:
            if not os.WIFSIGNALED(status):
                sys.exit(f"tokenizer child exited with status {status} before finishing")
            results[todo[0]] = "abort"
            todo = todo[1:]
    out = {
        "tokenize": [[results[(ti, mi)] for mi in range(len(MODES))] for ti in range(len(texts))],
    }
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    if with_pieces:
        out["pieces"] = [[piece(llama_cpp, vocab, t, s).hex() for t in range(n)] for s in (False, True)]
    out["attrs"] = [llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(n)]
    out["eog"] = [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    out["bos"] = llama_cpp.llama_vocab_bos(vocab)
    out["eos"] = llama_cpp.llama_vocab_eos(vocab)
    out["add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    out["add_eos"] = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    model.close()
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    results = [reference(sys.argv[1], m.lstrip("+"), m.startswith("+")) for m in sys.argv[2:]]
    json.dump(results, sys.stdout)
