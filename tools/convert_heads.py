#!/usr/bin/env python3
"""tools/convert_heads.py: retaining heads from a PyTorch checkpoint to the safetensors file apb reads.

APB's compressor (shared/APB.md 3.2) uses Locret's retaining heads: per layer, fc1 [I, (Hq+2Hkv)*D]
and fc2 [Hkv, I], no biases (I = 1024 for the published Llama-3.1-8B heads). The Locret and
thunlp/APB code keeps them as `self_attn.fc1` / `self_attn.fc2` of each decoder layer and ships them
as a PyTorch state dict (.bin / .pt, usually the whole model's, from which only the fc weights are
used) or as safetensors. This tool finds those tensors under any of the usual prefixes, checks
them, and writes

    model.layers.{i}.self_attn.fc1.weight   [I, (Hq+2Hkv)*D]
    model.layers.{i}.self_attn.fc2.weight   [Hkv, I]

for every layer i, which is what apb_model_load(dir, heads_path) expects (docs/model.md).

Accepted input keys (after stripping "module.", "_orig_mod.", "base_model.model." and a top-level
"state_dict"/"model" wrapper): anything ending in layers.{i}.self_attn.fc1.weight / fc2.weight, e.g.
model.layers.3.self_attn.fc1.weight or layers.3.self_attn.fc2.weight. Everything else is ignored.

Checks: the layers form 0..L-1 with both tensors present, fc1 is 2-D with the same I in every
layer, fc2 is [Hkv, I]; with --config (a model's config.json) also L, Hkv and (Hq+2Hkv)*D against the
model. What it deliberately is not: a trainer, or a converter for other scorer architectures.

Usage:
  python3 tools/convert_heads.py IN.bin OUT.safetensors [--config MODEL/config.json] [--dtype f32|bf16|keep]
Needs torch (and safetensors). The default dtype is f32 (apb widens to fp32 anyway).
"""
import argparse
import json
import re
import sys

import torch

PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(fc1|fc2)\.weight$")


def load(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        sys.exit(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def strip(name):
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def model_dims(config_path):
    with open(config_path) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    d = c.get("head_dim") or c["hidden_size"] // heads
    return c["num_hidden_layers"], heads, kv, d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="PyTorch checkpoint (.bin/.pt) or safetensors file holding the heads")
    ap.add_argument("output", help="safetensors file to write")
    ap.add_argument("--config", help="the model's config.json, to check L, Hkv and (Hq+2Hkv)*D")
    ap.add_argument("--dtype", choices=("f32", "bf16", "keep"), default="f32", help="output dtype (default f32)")
    a = ap.parse_args()

    sd = load(a.input)
    found = {}
    for name, t in sd.items():
        if not torch.is_tensor(t):
            continue
        m = PATTERN.search(strip(name))
        if not m:
            continue
        key = (int(m.group(1)), m.group(2))
        if key in found:
            sys.exit(f"{a.input}: layer {key[0]} {key[1]} appears twice (second time as '{name}')")
        found[key] = (name, t)
    if not found:
        sys.exit(f"{a.input}: no tensors named like layers.N.self_attn.fc1.weight / fc2.weight "
                 f"({len(sd)} keys, e.g. {list(sd)[:3]})")

    n_layers = max(i for i, _ in found) + 1
    width = None
    out = {}
    for i in range(n_layers):
        for part in ("fc1", "fc2"):
            if (i, part) not in found:
                sys.exit(f"{a.input}: layer {i} has no self_attn.{part}.weight (layers 0..{n_layers - 1} expected)")
        (n1, fc1), (n2, fc2) = found[(i, "fc1")], found[(i, "fc2")]
        if fc1.dim() != 2 or fc2.dim() != 2:
            sys.exit(f"{a.input}: layer {i}: fc1 {tuple(fc1.shape)} and fc2 {tuple(fc2.shape)} must be 2-D")
        if width is None:
            width = fc1.shape[0]
        if fc1.shape[0] != width or fc2.shape[1] != width:
            sys.exit(f"{a.input}: layer {i}: fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not share the "
                     f"width I = {width} of layer 0")
        if fc2.shape[0] != found[(0, "fc2")][1].shape[0] or fc1.shape[1] != found[(0, "fc1")][1].shape[1]:
            sys.exit(f"{a.input}: layer {i}: shapes differ from layer 0")
        for part, t in (("fc1", fc1), ("fc2", fc2)):
            t = t.detach().contiguous()
            if a.dtype == "f32":
                t = t.float()
            elif a.dtype == "bf16":
                t = t.to(torch.bfloat16)
            elif t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                t = t.float()
            out[f"model.layers.{i}.self_attn.{part}.weight"] = t

    hkv, qkv = found[(0, "fc2")][1].shape[0], found[(0, "fc1")][1].shape[1]
    if a.config:
        L, hq, kv, d = model_dims(a.config)
        want = (hq + 2 * kv) * d
        if L != n_layers or kv != hkv or want != qkv:
            sys.exit(f"{a.input}: heads for {n_layers} layers, Hkv {hkv}, input width {qkv}; the model "
                     f"({a.config}) has {L} layers, Hkv {kv}, (Hq+2Hkv)*D = {want}")

    from safetensors.torch import save_file
    save_file(out, a.output, metadata={"format": "pt", "source": a.input, "scorer_width": str(width)})
    print(f"{a.output}: {n_layers} layers, I = {width}, fc1 [{width}, {qkv}], fc2 [{hkv}, {width}], "
          f"{next(iter(out.values())).dtype}")


if __name__ == "__main__":
    main()
