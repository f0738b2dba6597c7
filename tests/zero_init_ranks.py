"""Rank script: build the tiny LLaMA partitioned under ZeRO-3 through ds_cl.training.modeling, from a config and
from a saved folder, in a fresh process (nothing of transformers' model code imported before).

    deepspeed --num_gpus N tests/zero_init_ranks.py FOLDER OUT.json

FOLDER holds the tiny model saved by the test (safetensors); rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_cl.training.environment import init_distributed  # noqa: E402
from ds_cl.training.modeling import build_causal_lm, hf_config  # noqa: E402
from tests.fixtures import TINY_LLAMA  # noqa: E402

folder, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
init_distributed("gloo")
world = dist.get_world_size()
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
report = {"world": world}

model, keep = build_causal_lm(hf_config(TINY_LLAMA), ds, torch.float32)
report["dtypes"] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
# Partitioned on construction: each rank holds ceil(numel / world) elements of every parameter.
report["partitioned"] = all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) and p.numel() == 0
                            for p in model.parameters())
report["n_params"] = sum(p.ds_numel for p in model.parameters())

model, keep = build_causal_lm(hf_config(name_or_path=str(folder)), ds, torch.float32, name_or_path=str(folder))
report["loaded_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
from safetensors.torch import load_file  # noqa: E402

saved = load_file(folder / "model.safetensors")
diffs = {}
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if name in saved:
            diffs[name] = (p.detach() - saved[name]).abs().max().item()
report["loaded_partitioned"] = all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world)
                                   for p in model.parameters())
report["max_diff_vs_file"] = max(diffs.values())
report["n_compared"] = len(diffs)
if dist.get_rank() == 0:
    out.write_text(json.dumps(report))
dist.barrier()
