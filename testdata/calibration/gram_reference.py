"""Reference input Gram matrices for tests/calibration_gram.rs, from PyTorch forward hooks.

The HF model is loaded by transformers from the committed F32 GGUF fixture (its own GGUF loader,
which undoes llama.cpp's q/k row permutation), the committed PEFT adapter is applied by PEFT at
runtime, and the input of every adapted linear layer is captured by a forward pre-hook on the
layer PEFT wraps, over fixed token ids run as one sequence from position 0. For each input shared
by several tensors (q/k/v, gate/up) one Gram is written, named by the first of them in llama.cpp's
names; each is X^T X (tokens x n_in inputs) summed in float64 and written as little-endian float64.

Usage, from the repository root, in the fixture venv (testdata/fixtures/setup-fixture-venv.sh):
  gram_reference.py testdata/fixtures/llama testdata/fixtures/llama/adapters/standard \
      testdata/calibration/llama-standard
writes OUT_DIR/<tensor>.f64 and OUT_DIR/manifest.json (with the tool versions).

MoE fixtures: transformers' GGUF loader does not read qwen3moe's expert width, so the HF weights
the fixture was converted from are loaded instead (make_moe_fixture.py leaves them in
~/.cache/gguf-lora/fixture-work/<arch>/hf), given as a fourth argument:
  gram_reference.py testdata/fixtures/qwen3moe testdata/fixtures/qwen3moe/adapters/standard \
      testdata/calibration/qwen3moe-standard ~/.cache/gguf-lora/fixture-work/qwen3moe/hf
Each expert's input is the rows of the tokens routed to it, named `<stacked tensor>#<expert>`
(`blk.0.ffn_gate_exps.weight#2`), as the merge's calibration records them.
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
import peft
from peft import PeftModel
from transformers import AutoModelForCausalLM

# A fixed sequence: every id of the fixture's 256-token vocabulary is fine for a forward pass.
TOKENS = [1, 73, 148, 131, 44, 152, 242, 249, 155, 7, 19, 200, 3, 88, 120, 64, 250, 31, 99, 12, 177, 5, 230, 140]

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


EXPERT_TO_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_name(role, layer):
    """llama.cpp's name of the tensor behind HF module `role` of layer `layer`, or None."""
    if role in HF_TO_GGUF:
        return f"blk.{layer}.{HF_TO_GGUF[role]}.weight"
    parts = role.split(".")
    if len(parts) == 4 and parts[:2] == ["mlp", "experts"] and parts[3] in EXPERT_TO_GGUF:
        return f"blk.{layer}.{EXPERT_TO_GGUF[parts[3]]}.weight#{int(parts[2])}"
    return None


def main(fixture_dir, adapter_dir, out_dir, hf_dir=None):
    torch.manual_seed(0)
    if hf_dir:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            fixture_dir, gguf_file="base-f32.gguf", dtype=torch.float32
        )
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    captured = {}

    def hook(gguf_name):
        def pre(_module, args):
            captured[gguf_name] = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
        return pre

    for name, module in model.named_modules():
        if not hasattr(module, "base_layer"):
            continue
        parts = name.split(".")
        if "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        role = ".".join(parts[parts.index("layers") + 2:])
        target = gguf_name(role, layer)
        if target is not None:
            module.base_layer.register_forward_pre_hook(hook(target))
    with torch.no_grad():
        model(torch.tensor([TOKENS]), use_cache=False)
    os.makedirs(out_dir, exist_ok=True)
    entries = {}
    for name in sorted(captured):
        x = captured[name]
        gram = x.T @ x
        gram.astype("<f8").tofile(os.path.join(out_dir, name + ".f64"))
        entries[name] = {"n_in": int(x.shape[1]), "tokens": int(x.shape[0])}
    manifest = {
        "made_by": "testdata/calibration/gram_reference.py",
        "fixture": os.path.join(fixture_dir, "base-f32.gguf"),
        "weights_from": "HF weights the fixture was converted from" if hf_dir else "the fixture, by transformers",
        "adapter": adapter_dir,
        "tokens": TOKENS,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "numpy": np.__version__,
        },
        "grams": entries,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
