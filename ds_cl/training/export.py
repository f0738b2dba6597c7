"""Export a ZeRO-3 (or plain) DeepSpeed model as an HF folder loadable by
`AutoModelForCausalLM.from_pretrained`: config.json, model.safetensors (or model-0000i-of-0000n.safetensors
+ model.safetensors.index.json), generation config, tokenizer.

Under ZeRO-3 every rank holds an empty placeholder per parameter (numel 0) and a flat shard of the
parameters; saving `model.state_dict()` there would write those empty tensors. We gather one parameter
at a time (collective, so every rank calls `export_hf`) and rank 0 keeps a full CPU copy in the export
dtype, so rank 0's host memory holds the whole model once (~13.5 GB for a 7B model in bf16). The shard
layout, file names and index are huggingface_hub's (`split_torch_state_dict_into_shards`, the helper
`save_pretrained` uses); each shard is written with `safetensors.torch.save_file` and dropped.
Everything is written to `<out>.tmp` and renamed to `<out>` at the end, so a crash leaves no half export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ds_cl.core import collectives

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # model.safetensors / model-00001-of-00003.safetensors
INDEX_NAME = "model.safetensors.index.json"


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


def readable_like_other_outputs(path: str | os.PathLike) -> None:
    """safetensors writes its files mode 0600 (through a private temporary), while every other output
    follows the umask (usually 0644): give weights the umask's mode too, so a shared run folder's
    exported models are readable by the same people as its metrics."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_safetensors(state_dict: dict[str, torch.Tensor], folder: Path, shard_bytes: int,
                      total_parameters: int | None = None) -> list[str]:
    """Write `state_dict` to `folder` in HF's layout: model.safetensors, or shards of at most `shard_bytes`
    (a larger single tensor gets a shard of its own) named model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. Empties `state_dict` shard by shard. Returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        save_file({k: state_dict.pop(k).contiguous() for k in names}, folder / fname, metadata={"format": "pt"})
        readable_like_other_outputs(folder / fname)
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        meta = dict(split.metadata)  # {"total_size": bytes of all tensors}
        if total_parameters is not None:
            meta["total_parameters"] = total_parameters
        index = {"metadata": meta, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_NAME)
    return files


@contextlib.contextmanager
def replaced_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder whole or not at all: yields an empty `<out>.tmp` beside it, which replaces `out` when
    the block ends without an error and is removed when it raises. A reader never sees half a model."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None, dtype: str = "bfloat16",
              shard_bytes: int = 4 << 30, tensors=None) -> Path | None:
    """Write `model` (the engine's module) to out_dir. Collective; returns the folder on rank 0.
    `tensors`: an iterator like `full_tensors(model)` to write instead of the module's own parameters
    (ds_cl.methods.lora: base weights with the adapters merged). `shard_bytes`: the most bytes per weights file."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out_dir)
    to = DTYPES[dtype]
    state: dict[str, torch.Tensor] = {}
    n_params = 0
    for name, t in (full_tensors(model) if tensors is None else tensors):
        if rank == 0:
            state[name] = t.to(to)
            n_params += t.numel()
    if rank == 0:
        for name, b in model.named_buffers():
            # Persistent buffers only (LLaMA's rotary inv_freq is recomputed on load), in their own dtype.
            mod_name, _, bname = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if bname not in getattr(mod, "_non_persistent_buffers_set", set()):
                state[name] = b.detach().to("cpu").clone()
        try:
            _write_model(model, out, state, tokenizer, dtype, shard_bytes, n_params)
        except Exception as e:
            # A full disk here is a safetensors SafetensorError (not an OSError) with a long traceback on rank 0
            # and a "connection closed" one on the others: say it in the trainer's one line (an OSError), with
            # what is safe. replaced_folder has removed the partial folder; an earlier export is untouched.
            from safetensors import SafetensorError

            if not isinstance(e, (OSError, SafetensorError)):
                raise
            free = shutil.disk_usage(out.parent if out.parent.exists() else ".").free
            raise OSError(f"exporting the model to {out} failed: {str(e).splitlines()[0][:200]} ({free} bytes "
                          f"free); removed the partial folder, and the run's checkpoints are kept: free space and "
                          f"rerun with --resume") from e
    collectives.barrier()
    return out if rank == 0 else None


def _write_model(model, out: Path, state: dict, tokenizer, dtype: str, shard_bytes: int, n_params: int) -> None:
    """Rank 0's part of export_hf: the weights, config, generation config and tokenizer, in place at once."""
    with replaced_folder(out) as tmp:
        write_safetensors(state, tmp, shard_bytes, total_parameters=n_params)
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
