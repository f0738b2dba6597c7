"""Export a ZeRO-3 (or plain) DeepSpeed model as an HF folder loadable by
`AutoModelForCausalLM.from_pretrained`: config.json, model(-0000i-of-0000n).safetensors, tokenizer.

Under ZeRO-3 every rank holds an empty placeholder per parameter (numel 0) and a flat shard; saving
`model.state_dict()` there writes those empty tensors ("tiny weights saved", design.md §2). We gather
one parameter at a time (collective, so every rank calls `export_hf`), and rank 0 writes shards of at
most `shard_bytes` as they fill, so host memory stays bounded for 7B models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _gathered(p):
    import deepspeed

    if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter
        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


def full_tensors(model):
    """(name, full CPU tensor on rank 0 / None elsewhere) per parameter, one gathered at a time. Collective."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    # named_parameters() lists a tied weight (lm_head = embed_tokens) once, as HF's own save does.
    for name, p in model.named_parameters():
        with _gathered(p):
            t = p.detach().to("cpu").clone() if rank == 0 else None
        yield name, t


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None, dtype: str = "bfloat16",
              shard_bytes: int = 4 << 30, tensors=None) -> Path | None:
    """Write `model` (the engine's module) to out_dir. Collective; returns the folder on rank 0.
    `tensors`: an iterator like `full_tensors(model)` to write instead of the module's own parameters
    (ds_cl.lora: base weights with the adapters merged)."""
    from safetensors.torch import save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    to = DTYPES[dtype]
    shards: list[dict] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in (full_tensors(model) if tensors is None else tensors):
        if rank == 0:
            t = t.to(to)
            current[name] = t
            size += t.numel() * t.element_size()
        if rank == 0 and size >= shard_bytes:
            shards.append(current)
            save_file(current, tmp / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
    for name, b in model.named_buffers():
        # Persistent buffers only (LLaMA's rotary inv_freq is recomputed on load).
        mod_name, _, bname = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if rank == 0 and bname not in getattr(mod, "_non_persistent_buffers_set", set()):
            current[name] = b.detach().to("cpu").clone()
    if rank == 0:
        if current or not shards:
            shards.append(current)
            save_file(current, tmp / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
        n = len(shards)
        if n == 1:
            os.replace(tmp / "shard-00001.safetensors", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, sd in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / fname)
                weight_map.update({k: fname for k in sd})
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        cfg = model.config
        cfg.dtype = dtype  # the dtype the weights were written in (`torch_dtype` in transformers 4.x)
        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(tmp)
            except Exception:  # a generation config that fails its own validation is not worth a crash
                pass
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None
