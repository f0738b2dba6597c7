"""Batched greedy generation with the model's chat template, prompts split across ranks.

Every rank holds a full copy of the model (inference is data parallel: ZeRO-3 sharding is for
training); rank k answers prompts k, k+W, k+2W, ... and rank 0 gathers the answers in the
original order. Works in one process (no torch.distributed) as well.
"""

from __future__ import annotations

from typing import Sequence

import torch


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_model(path: str, device: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tdtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype]
    if tdtype == "auto" and device == "cpu":
        tdtype = torch.float32   # bf16 matmuls are slow on most CPUs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=tdtype).to(device).eval()
    return model, tok


def free_memory(device: str) -> None:
    """After the caller dropped its last reference to a model from `load_model`: collect it now and, on
    CUDA, hand the allocator's cached blocks back. Inside `ds-cl train` the evaluated model is a second
    full copy beside the ZeRO-3 state on every GPU (ds_configs/README.md); without this its memory and
    the generation's KV cache would stay reserved by this process for the rest of the run, out of reach
    of allocations outside torch's caching allocator (NCCL's buffers) and of other processes."""
    import gc

    # Today's transformers models hold no reference cycle (the `del` freed it); one would keep the
    # weights until some later collection.
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_prompt(tok, prompt: str, chat_template: bool = True) -> str:
    if chat_template and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_local(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 8,
                   chat_template: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers for `prompts`, in order."""
    from tqdm.auto import tqdm

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [format_prompt(tok, p, chat_template) for p in prompts]
    # longest first: similar lengths share a batch, and a memory problem shows up at once
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[str | None] = [None] * len(texts)
    device = next(model.parameters()).device
    # the chat template already carries BOS where the model wants one
    add_special = not (chat_template and getattr(tok, "chat_template", None))
    bar = tqdm(total=len(texts), desc=desc, disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                  add_special_tokens=add_special).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def generate_distributed(model, tok, prompts: Sequence[str], **kw) -> list[str] | None:
    """Split `prompts` over the ranks; rank 0 gets all answers in order, other ranks get None."""
    from ds_cl.core import collectives

    rank, world = dist_info()
    mine = list(range(rank, len(prompts), world))
    answers = generate_local(model, tok, [prompts[i] for i in mine], progress=(rank == 0), **kw)
    if world == 1:
        return answers
    gathered = collectives.gather_object(list(zip(mine, answers)), dst=0)
    if rank != 0:
        return None
    out: list[str | None] = [None] * len(prompts)
    for part in gathered:  # type: ignore[union-attr]
        for i, a in part:
            out[i] = a
    return out  # type: ignore[return-value]
