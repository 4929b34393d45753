"""llama.cpp's tokenizer as ground truth for tests/tokenize.rs (llama-cpp-python, vocab_only).

    python llama_tokenize.py reference CORPUS.json MODEL.gguf [--pieces]
        One JSON object on stdout: for every corpus entry and each (add_special, parse_special) pair,
        llama.cpp's ids (Llama.tokenize) or "abort" where llama.cpp kills the process; for each id
        list, llama_detokenize with every (remove_special, unparse_special) pair (hex); and with
        --pieces, llama_token_to_piece of every token (special false/true, hex), every token's
        attributes and the special ids.
    python llama_tokenize.py variant SRC.gguf DST.gguf KEY=VALUE...
        Writes DST: SRC's metadata only (no tensors, which vocab_only loading never reads), with each
        string KEY set to VALUE (e.g. tokenizer.ggml.pre=qwen2).

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
    model = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
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
    if with_pieces:
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        out["pieces"] = [[piece(llama_cpp, vocab, t, s).hex() for t in range(n)] for s in (False, True)]
        out["attrs"] = [llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(n)]
        out["eog"] = [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        out["bos"] = llama_cpp.llama_vocab_bos(vocab)
        out["eos"] = llama_cpp.llama_vocab_eos(vocab)
        out["add_bos"] = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        out["add_eos"] = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    json.dump(out, sys.stdout)


def variant(src, dst, settings):
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if k in settings:
            w.add_key_value(k, settings.pop(k), gguf.GGUFValueType.STRING)
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[1])
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for k, v in settings.items():
        w.add_key_value(k, v, gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3], "--pieces" in sys.argv[4:])
    elif sys.argv[1] == "variant":
        variant(sys.argv[2], sys.argv[3], dict(a.split("=", 1) for a in sys.argv[4:]))
    else:
        sys.exit(__doc__)
