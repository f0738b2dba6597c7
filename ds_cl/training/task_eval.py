"""Scoring the tasks during a run: greedy generation on each task's held-out prompts, sharded over the
ranks (the accuracy matrix's rows), and the optional retention suite on each exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path


def evaluate_tasks(engine, tokenizer, tasks: list, eval_cfg, dist, out: Path, tag: str) -> list[float]:
    """Greedy generation on `tasks`, sharded over ranks; one score per task. Rank 0 writes
    predictions_<tag>.jsonl (the first 200 predictions)."""
    import torch

    from ds_cl.core import collectives
    from ds_cl.training.data import collate_prompts

    bs = eval_cfg.batch_size
    model = engine.module
    model.eval()
    scores, preds_out = [], []
    for task in tasks:
        n = len(task.eval_prompts)
        per_rank = math.ceil(n / dist.world)
        # Every rank runs the same number of generate calls (ZeRO-3 forwards are collective);
        # missing slots repeat sample 0 and are not scored.
        idx = [i if i < n else -1 for i in range(dist.rank, per_rank * dist.world, dist.world)]
        max_new = eval_cfg.max_new_tokens or (max(len(tokenizer.encode_answer(a)) for a in task.eval_answers) + 2)
        total, count = 0.0, 0
        for b in range(0, per_rank, bs):
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
                                      "reference": task.eval_answers[i]})
        total, count = collectives.all_reduce_values([total, count])
        scores.append(total / count)
    if dist.rank == 0:
        with open(out / f"predictions_{tag}.jsonl", "w") as f:
            for p in preds_out:
                f.write(json.dumps(p) + "\n")
    return scores


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
