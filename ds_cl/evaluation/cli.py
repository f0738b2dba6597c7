"""`ds-cl eval`: generate responses for a retention suite on one or several ranks, then score them.

    ds-cl eval --model CKPT [--base BASE] --suite retention --out DIR
    deepspeed --num_gpus 2 -m ds_cl.evaluation.cli --model CKPT --suite retention --out DIR

Output (without --base): DIR/responses_ifeval.jsonl, DIR/ifeval.json, DIR/responses_safety.jsonl,
DIR/safety.json, DIR/responses_benign.jsonl, DIR/benign.json, DIR/general.json (lm_eval part),
DIR/eval.json (summary).
With --base: DIR/base/..., DIR/model/... and DIR/report.md comparing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .ifeval import read_ifeval_prompts
from .io import EvalInputError, read_prompt_sets, write_json, write_jsonl


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-cl eval", description="Generate responses for a retention suite and score them.")
    ap.add_argument("--model", required=True, help="HF checkpoint directory (e.g. a task's export from ds-cl train)")
    ap.add_argument("--base", help="base model directory: evaluated too, and compared in DIR/report.md")
    ap.add_argument("--suite", required=True, help="shipped suite name (e.g. retention, ifeval-mini, safety-mini), "
                                                   "a suite YAML, or one prompt file")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max-new-tokens", type=int, default=256,
                    help="greedy answer length in tokens (default 256; the same for every model compared)")
    ap.add_argument("--safety-max-new-tokens", type=int,
                    help="for the safety and benign parts (default: --max-new-tokens); a refusal is read from an "
                         "answer's first three sentences, so ~64 tokens decide it at a fraction of the cost")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call on each rank")
    ap.add_argument("--limit", type=int, help="use only the first N prompts of each part (smoke runs)")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights' dtype (auto: the checkpoint's on GPUs, float32 on CPU)")
    ap.add_argument("--no-chat-template", action="store_true", help="feed prompts raw (base models without a template)")
    ap.add_argument("--judge", help="safety judge: 'cmd:COMMAND' or a local classifier model directory")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return ap


def _device(spec: str) -> str:
    import torch
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return spec


def _init_dist(device: str) -> bool:
    """Join the launcher's process group (deepspeed/torchrun set WORLD_SIZE). True if we created it."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    from ds_cl.training.environment import init_distributed
    init_distributed("nccl" if device.startswith("cuda") else "gloo")
    return True


def load_parts(suite, limit: int | None = None) -> dict:
    """Read and validate every prompt file of a suite (cheap; done before any model is loaded)."""
    parts = {}
    if suite.ifeval:
        parts["ifeval"] = read_ifeval_prompts(suite.ifeval)[:limit]
    from .suites import files_of
    for key in ("safety", "benign"):   # one or several files; --limit applies to the part as a whole
        if getattr(suite, key, None):
            parts[key] = read_prompt_sets(files_of(getattr(suite, key)), key)[:limit]
    if suite.lm_eval:
        from .general import check_tasks
        check_tasks(suite.lm_eval)
    return parts


def evaluate_model(model_path: str, suite, parts: dict, out: Path, *, device: str = "cpu", dtype: str = "auto",
                   max_new_tokens: int = 256, batch_size: int = 8, chat_template: bool = True,
                   judge=None, safety_max_new_tokens: int | None = None) -> dict | None:
    """Generate and score one model on all ranks of the current process group (or alone).
    Rank 0 writes the files under `out` and returns the summary; other ranks return None.
    `ds-cl train` can call this after each task with the exported checkpoint."""
    from ds_cl.core import collectives

    from .generate import dist_info, free_memory, generate_distributed, load_model
    rank, world = dist_info()
    t0 = time.time()
    model, tok = load_model(model_path, device, dtype)
    summary: dict = {"model": str(model_path), "suite": suite.name, "world_size": world,
                     "device": device, "max_new_tokens": max_new_tokens,
                     "safety_max_new_tokens": safety_max_new_tokens or max_new_tokens,
                     "chat_template": bool(chat_template and getattr(tok, "chat_template", None))}
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template)
    if "ifeval" in parts:
        prompts = parts["ifeval"]
        answers = generate_distributed(model, tok, [p["prompt"] for p in prompts], desc="ifeval", **kw)
        if rank == 0:
            from .ifeval import score_ifeval
            write_jsonl(out / "responses_ifeval.jsonl", [{"prompt": p["prompt"], "response": a}
                                                          for p, a in zip(prompts, answers)])
            res = score_ifeval(prompts, {p["prompt"]: a for p, a in zip(prompts, answers)})
            write_json(out / "ifeval.json", res)
            summary["ifeval"] = {k: res[k] for k in ("prompt_level_strict_acc", "prompt_level_loose_acc",
                                                     "inst_level_strict_acc", "inst_level_loose_acc", "median_words")}
    for part in ("safety", "benign"):
        if part not in parts:
            continue
        prompts = parts[part]
        answers = generate_distributed(model, tok, [p["prompt"] for p in prompts], desc=part,
                                       **{**kw, "max_new_tokens": safety_max_new_tokens or max_new_tokens})
        if rank == 0:
            from .safety import score_benign, score_safety
            write_jsonl(out / f"responses_{part}.jsonl", [{"id": p["id"], "set": p.get("set"), "prompt": p["prompt"],
                                                           "response": a} for p, a in zip(prompts, answers)])
            answered = {p["prompt"]: a for p, a in zip(prompts, answers)}
            if part == "safety":
                res = score_safety(prompts, answered, judge)
                keys = ("refusal_rate", "attack_success_rate", "scorer", "median_words", "by_set")
            else:
                res = score_benign(prompts, answered)
                keys = ("compliance_rate", "median_words", "by_set")
            write_json(out / f"{part}.json", res)
            summary[part] = {k: res[k] for k in keys}
    # The last reference to the model (nothing above keeps one: the answers are strings, the generation
    # caches die with each generate() call): free it before lm-eval loads its own copy, and before a run
    # that called this goes back to training.
    del model
    free_memory(device)
    if suite.lm_eval and rank == 0:
        from .general import run_lm_eval
        gen = run_lm_eval(str(model_path), suite.lm_eval, device=device, dtype=dtype)
        free_memory(device)  # lm-eval's own copy of the model, out of scope once simple_evaluate returns
        write_json(out / "general.json", gen)
        summary["general"] = gen["results"]
    collectives.barrier()
    summary["seconds"] = round(time.time() - t0, 1)
    if rank == 0:
        write_json(out / "eval.json", summary)
        return summary
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from .suites import resolve_suite
        suite = resolve_suite(args.suite)
        for p, what in ((args.model, "--model"), (args.base, "--base")):
            if p and not (Path(p) / "config.json").is_file():
                raise EvalInputError(f"{what} {p}: not a Hugging Face model directory (no config.json)")
        parts = load_parts(suite, args.limit)
        judge = None
        if args.judge and rank == 0:
            from .safety import make_judge
            judge = make_judge(args.judge)
    except EvalInputError as e:
        print(f"ds-cl eval: error: {e}", file=sys.stderr)
        return 2
    if not parts:
        if not suite.lm_eval:
            print("ds-cl eval: error: suite has nothing to run", file=sys.stderr)
            return 2
    device = _device(args.device)
    created = _init_dist(device)
    out = Path(args.out)
    opts = dict(device=device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                safety_max_new_tokens=args.safety_max_new_tokens, batch_size=args.batch_size,
                chat_template=not args.no_chat_template, judge=judge)
    try:
        runs = [("base", args.base, out / "base"), ("model", args.model, out / "model")] if args.base \
            else [("model", args.model, out)]
        for name, path, d in runs:
            s = evaluate_model(path, suite, parts, d, **opts)
            if s is not None:
                brief = {k: s[k] for k in ("ifeval", "safety", "benign") if k in s}
                print(f"[{name}] {path}: {brief} -> {d}", flush=True)
        if args.base and rank == 0:
            from .report import build_report
            build_report(out / "base", [("model", out / "model")], out)
            print(f"wrote {out / 'report.md'}")
        rc = 0
    except EvalInputError as e:
        print(f"ds-cl eval: error: {e}", file=sys.stderr)
        rc = 2
    if created:  # under a launcher: the rank ends here; a plain return can abort it after its work is done
        from ds_cl.training.environment import end_distributed
        end_distributed(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
