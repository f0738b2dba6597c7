"""Scoring the tasks during a run (the accuracy matrix's rows), each task's held-out prompts sharded over the
ranks: by greedy generation and the task's metric (eval.scoring: generate), or by rank classification among
the task's options (eval.scoring: options); and the optional retention suite on each exported model."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path


def rank_slots(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of n items (i = rank, rank + world, ...), padded with -1 to ceil(n / world) slots:
    every rank runs the same number of forwards (ZeRO-3 forwards are collective). A -1 slot repeats item 0
    and is not scored."""
    per_rank = math.ceil(n / world)
    return [i if i < n else -1 for i in range(rank, per_rank * world, world)]


def option_logliks(model, rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> list[float]:
    """One forward over `rows` of (prompt ids, continuation ids): for each row, the sum of the log-probabilities
    of its continuation's tokens given the prompt and the continuation's earlier tokens. Left-padded (every
    row ends at the last column), positions counted from each row's first token, as generate() does; only
    the last positions' logits are computed where the model's forward allows (`logits_to_keep`)."""
    import torch

    width = max(len(p) + len(c) for p, c in rows)
    keep = max(len(c) for _, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), keep), dtype=torch.bool)  # which of the last `keep` tokens count
    # Prompts are never empty (bos, or the template's text) and continuations end with eos / end-of-turn.
    for i, (p, c) in enumerate(rows):
        ids[i, width - len(p) - len(c):] = torch.tensor(p + c)
        mask[i, width - len(p) - len(c):] = 1
        scored[i, keep - len(c):] = True
    ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    params = inspect.signature(model.forward).parameters
    kw = {name: keep + 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in params}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kw).logits
        # logits[:, t] predicts token t + 1: the last `keep` tokens come from the `keep` positions before the end.
        logp = logits[:, -(keep + 1):-1].float().log_softmax(-1)
        tok_logp = logp.gather(-1, ids[:, -keep:, None]).squeeze(-1)
        sums = (tok_logp.double() * scored).sum(-1)
    return sums.tolist()


def score_options(model, prompts: list[list[int]], option_ids: list[list[list[int]]], pad_id: int,
                  batch_size: int, device) -> list[list[float]]:
    """Rank classification: for prompt i, the log-likelihood of each option j (`option_ids[i][j]`, its
    target ids) as the prompt's continuation. One forward per `batch_size` prompts, each with all its
    options (batch_size x options sequences): ceil(len(prompts) / batch_size) forwards, as many as
    generation has batches."""
    out = []
    for b in range(0, len(prompts), batch_size):
        opts = option_ids[b:b + batch_size]
        flat = option_logliks(model, [(p, c) for p, cs in zip(prompts[b:b + batch_size], opts) for c in cs],
                              pad_id, device)
        for cs in opts:
            out.append(flat[:len(cs)])
            flat = flat[len(cs):]
    return out


def evaluate_tasks(engine, tokenizer, tasks: list, eval_cfg, dist, out: Path, tag: str) -> list[float]:
    """One score per task of `tasks`, their prompts sharded over ranks: greedy generation scored by the
    task's metric, or (eval_cfg.scoring "options") the accuracy of rank classification among the task's
    options. Rank 0 writes predictions_<tag>.jsonl (its first 200 predictions, each marked with the scoring)."""
    from ds_cl.core import collectives

    score = scorer(eval_cfg)
    model = engine.module
    model.eval()
    scores, preds_out = [], []
    for task in tasks:
        idx = rank_slots(len(task.eval_prompts), dist.rank, dist.world)
        total, count = score(engine, tokenizer, task, idx, eval_cfg, dist, preds_out)
        total, count = collectives.all_reduce_values([total, count])
        scores.append(total / count)
    if dist.rank == 0:
        with open(out / f"predictions_{tag}.jsonl", "w") as f:
            for p in preds_out:
                f.write(json.dumps(p) + "\n")
    return scores


def scorer(eval_cfg):
    """The per-task scorer of eval_cfg.scoring: `_options` (rank classification) or `_generate`."""
    return _options if eval_cfg.scoring == "options" else _generate


def score_whole(model, tokenizer, task, eval_cfg, device="cpu") -> tuple[float, list[dict]]:
    """One process, no process group, a whole model (`ds-cl drift`): the task's score over all its items by
    the scorer evaluate_tasks uses for eval_cfg.scoring, and its predictions (the first 200), as
    predictions_<tag>.jsonl writes them."""
    from types import SimpleNamespace

    model.eval()
    preds: list[dict] = []
    total, count = scorer(eval_cfg)(SimpleNamespace(module=model, device=device), tokenizer, task,
                                    list(range(len(task.eval_prompts))), eval_cfg, SimpleNamespace(rank=0, world=1),
                                    preds)
    return total / count, preds


def _generate(engine, tokenizer, task, idx: list[int], eval_cfg, dist, preds_out: list) -> tuple[float, int]:
    import torch

    from ds_cl.training.data import collate_prompts

    bs, model = eval_cfg.batch_size, engine.module
    max_new = eval_cfg.max_new_tokens or (max(len(tokenizer.encode_answer(a)) for a in task.eval_answers) + 2)
    total, count = 0.0, 0
    for b in range(0, len(idx), bs):
        chunk = idx[b:b + bs]
        batch = collate_prompts([task.eval_prompts[max(i, 0)] for i in chunk], tokenizer.pad_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_id,
                                 eos_token_id=tokenizer.eos_id, synced_gpus=dist.world > 1)
        new = gen[:, batch["input_ids"].shape[1]:].tolist()
        for i, ids in zip(chunk, new):
            if i < 0:
                continue
            text = tokenizer.decode(ids)
            total += task.metric(text, task.eval_answers[i])
            count += 1
            if len(preds_out) < 200:
                preds_out.append({"task": task.name, "index": i, "prediction": text,
                                  "reference": task.eval_answers[i], "scoring": "generate"})
    return total, count


def _options(engine, tokenizer, task, idx: list[int], eval_cfg, dist, preds_out: list) -> tuple[float, int]:
    """Every rank scores the same number of prompts (rank_slots): equal forwards."""
    opts = task.options
    ll = score_options(engine.module, [task.eval_prompts[max(i, 0)] for i in idx],
                       [task.eval_option_ids[max(i, 0)] for i in idx], tokenizer.pad_id, eval_cfg.batch_size,
                       engine.device)
    total, count = 0.0, 0
    for i, row in zip(idx, ll):
        if i < 0:
            continue
        best = max(range(len(row)), key=row.__getitem__)  # the first of equals, in the options' order
        ref = task.eval_answers[i]
        total += float(opts[best] == ref)
        count += 1
        if len(preds_out) < 200:
            preds_out.append({"task": task.name, "index": i, "prediction": opts[best], "reference": ref,
                              "scoring": "options", "loglik": row[best], "reference_loglik": row[opts.index(ref)]})
    return total, count


def retention(suite_name: str, model_dir: Path, out_dir: Path, dist, chat_template: bool) -> bool:
    """eval.retention_suite: score the model exported after a task with ds_cl.evaluation (`ds-cl eval`'s
    generate + score, on all ranks) into out_dir. True when a summary was written."""
    from ds_cl.evaluation.cli import _device, evaluate_model, load_parts
    from ds_cl.evaluation.suites import resolve_suite
    from ds_cl.training.modeling import hf_zero3_off

    suite = resolve_suite(suite_name)
    # The evaluator loads the exported model whole on each rank: with our HfDeepSpeedConfig alive,
    # transformers would load it ZeRO-3-partitioned (empty weights). Step out of it meanwhile. That copy
    # and its generation's KV cache sit beside the ZeRO-3 state (ds_configs/README.md has the cost);
    # evaluate_model frees them before it returns, so training goes on without them.
    with hf_zero3_off():
        summary = evaluate_model(str(model_dir), suite, load_parts(suite), out_dir,
                                 device=_device("cpu" if dist.device == "cpu" else "cuda"),
                                 chat_template=chat_template)
    return summary is not None
