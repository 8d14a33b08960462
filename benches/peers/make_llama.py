"""A synthetic Llama-layout set without gradient files: base and task folders only.

`stamerge synth` always writes a gradient folder per task, which at 3 B parameters doubles a set
(31 GB instead of 19 GB for 2 tasks), beyond this machine's shared disk; the TIES and task
arithmetic cases read no gradients. Same tensor names, shapes and value ranges as src/synth.rs
(base uniform in ±0.02, norms near 1, task delta a cubed uniform), not the same values.

usage: make_llama.py DIR LAYERS HIDDEN INTERMEDIATE TASKS DTYPE
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 << 30


def tensors(layers, h, i, v=32000):
    t = [("model.embed_tokens.weight", (v, h))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t += [(f"{p}.self_attn.{n}.weight", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        t += [(f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
              (f"{p}.mlp.down_proj.weight", (h, i)), (f"{p}.input_layernorm.weight", (h,)),
              (f"{p}.post_attention_layernorm.weight", (h,))]
    return t + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def value(role, index, name, shape, dtype):
    g = torch.Generator().manual_seed(index)
    if "norm" in name:
        x = 1.0 + 0.1 * (torch.rand(shape, generator=g) * 2 - 1)
    else:
        x = 0.02 * (torch.rand(shape, generator=g) * 2 - 1)
    if role > 0:
        g.manual_seed(index * 1000 + role)
        u = torch.rand(shape, generator=g) * 2 - 1
        x += 0.016 * (1 + (role - 1) % 3) * u * u * u
    return x.to(dtype)


def write(folder, role, spec, dtype, layers, h, i):
    os.makedirs(folder, exist_ok=True)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for index, (name, shape) in enumerate(spec):
        t = value(role, index, name, shape, dtype)
        if shard and size + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
                   "num_attention_heads": max(1, h // 128), "vocab_size": 32000,
                   "torch_dtype": str(dtype).removeprefix("torch.")}, f)


def main():
    out, layers, h, i, tasks, dtype = sys.argv[1:7]
    layers, h, i, tasks = int(layers), int(h), int(i), int(tasks)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    spec = tensors(layers, h, i)
    write(os.path.join(out, "base"), 0, spec, dtype, layers, h, i)
    for t in range(tasks):
        write(os.path.join(out, f"task_{t}"), t + 1, spec, dtype, layers, h, i)


if __name__ == "__main__":
    main()
