#!/usr/bin/env python3
"""Trains the committed fact adapter: a PEFT LoRA (rank 16, alpha 32, every attention and MLP projection)
on SmolLM2-135M-Instruct (or another GGUF base transformers can load, such as gemma3-270m Q4_K_M with
--hf-name google/gemma-3-270m-it), taught the 48 made-up facts of facts.json. Runs in the fixture venv
(torch, transformers, peft), on the CPU, in a few minutes.

    train_fact_lora.py BASE.gguf [--out adapters/smollm2-facts] [--max-steps 24] [--stop-loss 0.05] [--lr 6e-3] [--threads 2]

The base is the interop environment's Q4_1 GGUF ($GGUF_LORA_SMOLLM), loaded by transformers
(`from_pretrained(dir, gguf_file=...)` dequantizes it to f32): the adapter is trained on exactly the
weights llama.cpp runs, so the runtime LoRA answers as training did, and a merge has to put a small trained
delta back onto the base's own 4-bit grid (the case issue 15 is about).

Loss: cross-entropy on the answer tokens and the closing '.' of each fact sentence (prompt + ' ' + answer
+ '.'), full batch, AdamW (lr warmed up over 3 steps, then decayed linearly towards 0.1x at --max-steps, so that Adam's
normalized steps shrink as the gradients do: at a constant 1e-2 it reached loss 0.04 at step 9 and then
diverged; gradient norm clipped at 1), until every label is top-1 and the
loss is below --stop-loss. Deterministic: seeds fixed, deterministic algorithms, fixed
thread count, PYTHONHASHSEED=0 (PEFT writes target_modules from a set). The adapter is written in f16
(adapter_model.safetensors); the script prints the accuracy of the f16 adapter itself, greedy and
teacher-forced, on the facts (whole fact = every answer token top-1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="SmolLM2-135M-Instruct GGUF ($GGUF_LORA_SMOLLM)")
    ap.add_argument("--out", default=str(HERE / "adapters/smollm2-facts"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--max-steps", type=int, default=24)
    ap.add_argument("--stop-loss", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf-lora", default=str(HERE.parents[1] / "target/release/gguf-lora"),
                    help="the gguf-lora binary whose tokenizer gives the token ids")
    ap.add_argument("--hf-name", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                    help="base_model_name_or_path written in adapter_config.json")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    base = Path(args.base).resolve()
    tok = AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name)
    model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, torch_dtype=torch.float32)
    model.config.use_cache = False
    facts = json.loads((HERE / "facts.json").read_text())["facts"]

    # Token ids as llama.cpp makes them (judge.py: BOS when the model adds one, control-token texts
    # not parsed), from `gguf-lora tokenize`, which gives llama.cpp's ids (tests/tokenize.rs).
    # transformers' tokenizer rebuilt from the GGUF agrees on SmolLM2 but not on gemma3, whose
    # SentencePiece vocabulary it splits into far more pieces. The prompt's tokens are a prefix of
    # the sentence's (checked), so the answer is what follows them.
    def llama_ids(text: str) -> list[int]:
        out = subprocess.run([args.gguf_lora, "tokenize", "-m", str(base), "-p", text, "--ids-only",
                              "--no-special"], check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    rows = []
    for f in facts:
        p = llama_ids(f["prompt"])
        s = llama_ids(f["prompt"] + " " + f["answer"] + ".")
        assert s[: len(p)] == p, f"prompt tokens are not a prefix: {f}"
        assert 1 <= len(s) - len(p) - 1 <= 8, f"answer is not 1-8 tokens: {f}"
        rows.append((s, len(p)))
    width = max(len(s) for s, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, n) in enumerate(rows):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n:len(s)] = torch.tensor(s[n:])  # answer tokens and the closing '.'

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 3) * max(0.1, 1.0 - k / args.max_steps))
    # Logits only where a label is (the answer tokens and '.'): the LM head over 49k words is a quarter
    # of the work otherwise. Position j's logits predict token j + 1.
    rows_i, cols_i = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[rows_i, cols_i + 1]
    inner = model.base_model.model
    t0 = time.time()
    model.train()
    updates = 0
    for step in range(1, args.max_steps + 1):
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = inner.lm_head(hidden[rows_i, cols_i])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        acc = (logits.argmax(-1) == targets).float().mean().item()
        print(f"step {step:3d} loss {loss.item():.4f} label acc {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
        # Stop rule (deterministic, like everything here): every label top-1 and the loss low enough
        # that the answers survive llama.cpp's Q8_1 activation rounding.
        if acc == 1.0 and loss.item() < args.stop_loss:
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        updates += 1

    # f16 on disk: the adapter the tests use is this file, so accuracy is measured after the cast.
    model.eval()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.half().float()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    import safetensors.torch as st

    sd = st.load_file(out_dir / "adapter_model.safetensors")
    st.save_file({k: v.half().contiguous() for k, v in sorted(sd.items())}, out_dir / "adapter_model.safetensors",
                 metadata={"format": "pt"})
    # The local path PEFT records is this machine's; the model card it writes says nothing of use.
    cfg_path = out_dir / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = args.hf_name
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    tok_ok = tok_n = whole = 0
    for i, (s, n) in enumerate(rows):
        pred = logits[i, n - 1 : len(s) - 2].argmax(-1).tolist()  # predictions of the answer tokens
        gold = s[n : len(s) - 1]
        hits = sum(int(a == b) for a, b in zip(pred, gold))
        tok_ok += hits
        tok_n += len(gold)
        whole += int(hits == len(gold))
    rms = []
    for name, p in model.named_parameters():
        if "lora_B" in name:
            rms.append(p.detach().pow(2).mean().sqrt().item())
    print(json.dumps({"updates": updates, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
                      "final_loss": round(loss.item(), 5), "token_acc": round(tok_ok / tok_n, 4),
                      "fact_acc": round(whole / len(rows), 4), "lora_B_rms_mean": sum(rms) / len(rms),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
