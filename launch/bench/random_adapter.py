#!/usr/bin/env python3
"""A random PEFT LoRA adapter for a model directory's config.json: r-rank A and B (normal, 0.02)
on q/k/v/o of every layer and on both expert parameters (PEFT's ParamWrapper layout:
`…mlp.experts.base_layer.lora_*` for gate_up_proj, `…mlp.experts.lora_*` for down_proj). For
measuring `moeq merge` on large shapes without training an adapter first. Needs numpy and
safetensors (pip).

Usage: python3 launch/bench/random_adapter.py MODEL_DIR OUT_DIR [r]
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

model, out = sys.argv[1], sys.argv[2]
r = int(sys.argv[3]) if len(sys.argv) > 3 else 16
cfg = json.load(open(os.path.join(model, "config.json")))
h, layers, e = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"]
hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
inter = cfg["moe_intermediate_size"]
rng = np.random.default_rng(0)
tensors = {}


def pair(prefix, inp, outp, experts=1):
    tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r * experts, inp)) * 0.02).astype(np.float32)
    tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((outp, r * experts)) * 0.02).astype(np.float32)


for l in range(layers):
    p = f"base_model.model.model.layers.{l}"
    for name, outp in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        pair(f"{p}.self_attn.{name}", h, outp)
    pair(f"{p}.self_attn.o_proj", q_out, h)
    pair(f"{p}.mlp.experts.base_layer", h, 2 * inter, e)
    pair(f"{p}.mlp.experts", inter, h, e)
os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model, "r": r,
           "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "bias": "none",
           "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
           "inference_mode": True}, open(os.path.join(out, "adapter_config.json"), "w"), indent=2, sort_keys=True)
print(f"{len(tensors)} tensors, {sum(t.nbytes for t in tensors.values()) / 1e6:.1f} MB in {out}")
