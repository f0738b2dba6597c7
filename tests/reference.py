"""One-process, DeepSpeed-free reference of projected AdamW training, shared by tests and rank scripts."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_cl.core import subspace as S

# Training settings shared by the rank script and the reference (the check: 5 AdamW steps
# with weight decay, clipping 0.5, accumulation 2).
STEPS, GAS, MICRO_BS, SEQ, VOCAB = 5, 2, 2, 12, 97
# Adam's eps is 1e-6 rather than 1e-8: Adam's first step is ~lr * sign(g), so on elements whose projected
# gradient is ~0 it turns fp32 reduction-order noise (different on 3 ranks than in one process) into
# lr-sized differences: measured 1.07e-5 relative with eps 1e-8 at world 3, 1.9e-7 with 1e-6.
LR, WEIGHT_DECAY, CLIP, EPS = 1e-3, 0.1, 0.5, 1e-6
MAX_WORLD = 3


def tiny_llama(seed: int = 1234) -> LlamaForCausalLM:
    """Awkward sizes on purpose: partitions split rows, numels do not divide the world size."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=51, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=14, max_position_embeddings=64,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def global_batches(world: int = MAX_WORLD, seed: int = 42):
    """batches[step][micro][rank] -> (MICRO_BS, SEQ) token ids, independent of the world size.

    Every step sees the same sequences, so a model that learns through the constraint shows a falling loss.
    Another seed: another task's sequences.
    """
    g = torch.Generator().manual_seed(seed)
    data = [[torch.randint(0, VOCAB, (MICRO_BS, SEQ), generator=g) for _ in range(world)] for _ in range(GAS)]
    return [data for _ in range(STEPS)]


def boundary_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """The inputs boundary's batches of one rank: task A's (global_batches()) micro batches of that rank, the
    last 3 tokens of the second one masked (masked tokens must not count)."""
    out = []
    for micro, ids in enumerate(global_batches()[0][m][rank] for m in range(GAS)):
        mask = torch.ones_like(ids)
        if micro == 1:
            mask[:, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def fixed_bases(model: torch.nn.Module, ratio: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    names = S.select_targets(params)
    policy = S.FixedRank(ratio)
    return {n: S.svd_bases(params[n].detach(), policy.rank(params[n].shape)) for n in names}


def reference_run(world: int, bases, projection: str = "two_sided", project_update: bool = True):
    """Same data, bases and maths as the rank script, in plain torch: returns (weights, losses, leaks)."""
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    params = dict(model.named_parameters())
    batches = global_batches()
    losses, leaks = [], []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(GAS):
            micro_losses = []
            for rank in range(world):
                ids = batches[step][micro][rank]
                loss = model(input_ids=ids, labels=ids).loss
                # DeepSpeed divides by GAS in backward and averages over the data-parallel ranks.
                (loss / (GAS * world)).backward()
                micro_losses.append(loss.item())
            losses.append(sum(micro_losses) / world)
        with torch.no_grad():
            for n, (u, v) in bases.items():
                g = params[n].grad
                g.copy_(S.project(g, u, v, projection))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        old = {n: params[n].detach().clone() for n in bases}
        opt.step()
        step_leaks = {}
        with torch.no_grad():
            for n, (u, v) in bases.items():
                d = params[n] - old[n]
                if project_update:
                    d = S.project(d, u, v, projection)
                    params[n].copy_(old[n] + d)
                step_leaks[n] = S.leak(d, u, v)
        leaks.append(step_leaks)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, leaks
