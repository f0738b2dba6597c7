"""`ds-cl drift REFERENCE MODEL [MODEL ...] [--answers EVAL_DIR] [--task RUN_DIR:TASK ...]`: which parameters
carried a model's drift away from the behaviour of the model it started from? For each MODEL (e.g. the end of
a task sequence that started from REFERENCE, the aligned model), the model as trained and with one group of
its parameters put back to REFERENCE's values in turn: the embeddings (tied to `lm_head` in SmolLM2), the
norms, osft's target matrices, everything but the targets. Each variant, and REFERENCE itself, is scored by
what is asked (at least one of the two below).

- `--answers EVAL_DIR`: teacher forcing REFERENCE's own answers (EVAL_DIR: a `ds-cl eval` folder of
  REFERENCE, its `responses_ifeval.jsonl` and the harmful prompts it refused, `safety.json`) through the
  chat template; no generation, so a model takes about a minute.
- `--task RUN_DIR:TASK` (repeatable): the accuracy on a task of a `ds-cl train` run (RUN_DIR: its output
  folder, with the `config.yaml` the run wrote; TASK: a task name in it). The items are rebuilt by the
  trainer's own data code (`load_task`: the same records, held-out split, seed, prompt template or chat
  template, max_seq_len) and scored by the trainer's own scorer (`task_eval`) as the run's `eval.scoring`
  says: rank classification among the task's options, or greedy generation and the task's metric
  (`--scoring` overrides it). With `eval.tuning_size` in the run's config, the task's tuning split is scored
  too and reported apart. Weights in float32, one process: "as trained" can differ from the run's own
  accuracy matrix by the export's rounding (`output.export_dtype`) and the run's compute dtype.

Scores of `--answers`:

- `eos_inside` / `eos_early`: the log of the mean probability of the end-of-turn token over the positions
  inside REFERENCE's answers / over their first 3 tokens: how hard the model pushes to stop early (the
  one-word tasks teach it to end after one word).
- `ifeval_nll`: the mean negative log-likelihood per token of REFERENCE's answers to the IFEval prompts.
- `refusal_nll`: the same for REFERENCE's refusals of harmful requests (how much of the refusal is kept).

A group whose reversal brings the scores back to REFERENCE's carried that part of the drift. One process,
no DeepSpeed. Which group's change cost the first task of a run its accuracy once the second was learnt
(the run with `output.export_each_task` on, its default):

    ds-cl drift RUN/task_0_agnews RUN/task_1_sst2 --task RUN:agnews --out RUN/drift_agnews.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GROUPS = ("embeddings", "norms", "targets", "non-targets")


def group_of(name: str, targets: set[str]) -> str:
    """embeddings (and an untied lm_head), norms, targets, or other (a non-target weight of another kind)."""
    if name in targets:
        return "targets"
    if "embed" in name or "lm_head" in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    return "other"


def reference_answers(eval_dir: Path, max_prompts: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) pairs of REFERENCE's evaluation: every IFEval answer and every refusal it gave."""
    from ds_cl.evaluation.io import read_jsonl

    f = eval_dir / "responses_ifeval.jsonl"
    s = eval_dir / "safety.json"
    for p in (f, s):
        if not p.is_file():
            raise FileNotFoundError(f"--answers {eval_dir}: no {p.name} (a `ds-cl eval` folder of the reference)")
    ifeval = [(r["prompt"], r["response"]) for r in read_jsonl(f, "IFEval responses") if r["response"].strip()]
    refusals = [(r["prompt"], r["response"]) for r in json.loads(s.read_text())["per_prompt"]
                if r.get("verdict") == "refusal" and r["response"].strip()]
    return {"ifeval": ifeval[:max_prompts], "refusal": refusals[:max_prompts]}


def encode(tok, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Each pair as (token ids of prompt + answer + end-of-turn, index of the answer's first token)."""
    from ds_cl.evaluation.generate import format_prompt

    out = []
    for prompt, answer in pairs:
        p = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(((p + a)[:max_len], len(p)))
    return out


EARLY = 3  # answer tokens counted as "early" for eos_early


def score(model, tok, seqs: list[tuple[list[int], int]], batch_size: int) -> dict[str, float]:
    """Mean answer NLL per token; log of the mean end-of-turn probability inside the answers (before their
    end) and over their first EARLY tokens. Log of the mean, not mean of the logs: the pressure to stop
    shows at the few positions where stopping is plausible, which a mean of logs would drown."""
    import math

    import torch

    nll_sum = n_tok = eos_sum = n_in = early_sum = n_early = 0.0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s:s + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (x, _) in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        with torch.no_grad():  # right padding: a causal model's logits at real positions do not see it
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (x, start) in enumerate(batch):
            # position t predicts token t+1: the answer's tokens are x[start:], predicted at start-1 .. len-2
            pos = torch.arange(start - 1, len(x) - 1)
            tgt = torch.tensor(x[start:])
            nll_sum += float(-logp[i, pos, tgt].sum())
            n_tok += len(tgt)
            inside = pos[:-1] if x[-1] == tok.eos_token_id else pos  # the answer's own end is not "early"
            p_eos = logp[i, inside, tok.eos_token_id].exp()
            eos_sum += float(p_eos.sum())
            n_in += len(inside)
            early_sum += float(p_eos[:EARLY].sum())
            n_early += min(EARLY, len(inside))
    return {"nll": nll_sum / max(n_tok, 1), "eos_inside": math.log(max(eos_sum / max(n_in, 1), 1e-30)),
            "eos_early": math.log(max(early_sum / max(n_early, 1), 1e-30))}


def run_config(run: Path):
    """RUN_DIR's config, as `ds-cl train` wrote it into its output folder (ValueError naming what to fix)."""
    from ds_cl.training.config import ConfigError, load_config

    if not run.is_dir():
        raise ValueError(f"--task {run}: no such folder (give a `ds-cl train` output folder)")
    path = run / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--task {run}: no config.yaml there (give the output folder of a `ds-cl train` run, "
                         "where it writes its config.yaml)")
    try:  # drift reports to no tracker: a run's wandb would otherwise want its credentials here
        return load_config(path, ["output.report_to=[]"])
    except ConfigError as e:
        raise ValueError(f"--task {run}: {e}") from None


def parse_task(spec: str) -> tuple[Path, str]:
    run, sep, name = spec.rpartition(":")  # a task name has no ':' (config.py); a path might
    if not sep or not run or not name:
        raise ValueError(f"--task {spec}: expected RUN_DIR:TASK (a `ds-cl train` output folder and a task name "
                         "of its config.yaml)")
    return Path(run), name


def task_items(run: Path, name: str, scoring: str = "run") -> dict:
    """A task of a run rebuilt as the trainer built it (`Trainer.__init__`: its tokenizer, `load_task` with the
    run's max_seq_len, seed, scoring and tuning split): `data`, a TaskData of the held-out evaluation items
    (`data.tuning`: the tuning split's, with eval.tuning_size), with the `tokenizer` and `eval_cfg` (the run's
    eval config; `scoring` "options" or "generate" overrides its eval.scoring) to score them. ValueError,
    one line naming what to fix. No model is loaded."""
    import dataclasses

    from ds_cl.training.config import ConfigError
    from ds_cl.training.data import load_task, load_tokenizer

    cfg = run_config(run)
    names = [t.name for t in cfg.tasks]
    if name not in names:
        raise ValueError(f"--task {run}:{name}: {run / 'config.yaml'} has no task {name!r} (its tasks: "
                         f"{', '.join(names)})")
    i = names.index(name)
    eval_cfg = cfg.eval if scoring == "run" else dataclasses.replace(cfg.eval, scoring=scoring)
    if eval_cfg.scoring == "options" and cfg.tasks[i].metric != "exact_match":  # as config.py refuses it
        raise ValueError(f"--task {run}:{name}: --scoring options scores the chosen option by equality with the "
                         f"answer, not by the task's metric {cfg.tasks[i].metric!r}; use --scoring run or generate")
    try:
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.chat_template)
        data = load_task(cfg.tasks[i], i, tok, cfg.train.max_seq_len, cfg.seed, eval_cfg.scoring,
                         tuning_size=cfg.eval.tuning_size)
    except (ConfigError, ValueError, OSError) as e:
        raise ValueError(f"--task {run}:{name}: {e}") from None
    return {"run": str(run), "task": name, "tokenizer": tok, "eval_cfg": eval_cfg, "data": data}


def label_tasks(tasks: list[dict]) -> None:
    """Each task's column name: its name, or RUN:name where two runs' tasks share a name."""
    names = [t["task"] for t in tasks]
    for t in tasks:
        t["label"] = t["task"] if names.count(t["task"]) == 1 else f"{Path(t['run']).name}:{t['task']}"
    labels = [t["label"] for t in tasks]
    for t in tasks:
        if labels.count(t["label"]) > 1:
            t["label"] = f"{t['run']}:{t['task']}"


def _load(path: str):
    """The model whole, in float32, on the CPU (as ds_cl.evaluation.generate.load_model loads it)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def drift(reference: str, models: list[str], pairs: dict[str, list[tuple[str, str]]] | None = None,
          tasks: list[dict] | None = None, *, max_len: int = 320, batch_size: int = 8, log=print) -> dict:
    """pairs: reference_answers' (prompt, answer) pairs; tasks: task_items' tasks (labelled by label_tasks);
    both read by the caller before any model is loaded, at least one of them given."""
    from ds_cl.core import subspace as S
    from ds_cl.training.task_eval import score_whole

    tasks = tasks or []
    ref_model = _load(reference)
    ref_sd = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    targets = set(S.select_targets(list(ref_sd)))
    seqs = None
    if pairs is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(reference)
        seqs = {k: encode(tok, v, max_len) for k, v in pairs.items()}

    def measure(model) -> dict:
        out = {}
        if seqs is not None:
            i, r = score(model, tok, seqs["ifeval"], batch_size), score(model, tok, seqs["refusal"], batch_size)
            out.update({"eos_inside": i["eos_inside"], "eos_early": i["eos_early"], "ifeval_nll": i["nll"],
                        "refusal_nll": r["nll"], "refusal_eos_early": r["eos_early"]})
        if tasks:
            out["accuracy"] = {t["label"]: score_whole(model, t["tokenizer"], t["data"], t["eval_cfg"])[0]
                               for t in tasks}
            tuned = [t for t in tasks if t["data"].tuning is not None]
            if tuned:
                out["tuning_accuracy"] = {t["label"]: score_whole(model, t["tokenizer"], t["data"].tuning,
                                                                  t["eval_cfg"])[0] for t in tuned}
        return out

    t0 = time.time()
    rows = [{"model": reference, "variant": "reference", **measure(ref_model)}]
    log(f"[drift] {reference}: reference: {time.time() - t0:.0f}s")
    del ref_model
    for path in models:
        t0 = time.time()
        model = _load(path)
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if set(trained) != set(ref_sd):
            raise ValueError(f"{path}: its parameters are not {reference}'s (a different architecture?)")
        kinds = {k: group_of(k, targets) for k in trained}
        moved = {k: float((trained[k] - ref_sd[k]).pow(2).sum()) for k in trained}  # each tensor's |dW|^2
        total = sum(moved.values())
        for variant in ("as trained",) + GROUPS:
            t1 = time.time()
            put_back = {k for k, g in kinds.items()
                        if variant == g or (variant == "non-targets" and g != "targets")}
            model.load_state_dict({k: ref_sd[k] if k in put_back else trained[k] for k in trained})
            share = sum(moved[k] for k in put_back) / total if total else 0.0
            name = variant if variant == "as trained" else f"{variant} put back"
            rows.append({"model": path, "variant": name, "update_share_put_back": share, **measure(model)})
            log(f"[drift] {path}: {name}: {time.time() - t1:.0f}s")
        log(f"[drift] {path}: {time.time() - t0:.0f}s")
        del model
    result = {"reference": reference, "rows": rows}
    if pairs is not None:
        result["prompts"] = {k: len(v) for k, v in pairs.items()}
    if tasks:
        result["tasks"] = [{"label": t["label"], "run": t["run"], "task": t["task"], "scoring": t["eval_cfg"].scoring,
                            "items": len(t["data"].eval_prompts),
                            **({"tuning_items": len(t["data"].tuning.eval_prompts)} if t["data"].tuning else {})}
                           for t in tasks]
    return result


def markdown(result: dict) -> str:
    nll = "prompts" in result
    tasks = result.get("tasks", [])
    lines = []
    if nll:
        lines.append(f"Teacher-forced on the reference's answers ({result['prompts']['ifeval']} IFEval answers, "
                     f"{result['prompts']['refusal']} refusals).")
    for t in tasks:
        tuning = f", and its tuning split's {t['tuning_items']}" if "tuning_items" in t else ""
        lines.append(f"`{t['label']}`: accuracy (%) on task {t['task']} of run {t['run']}: its {t['items']} held-out "
                     f"test items{tuning}, scoring: {t['scoring']}.")
    head = ["model", "variant", "share of the update put back"]
    if nll:
        head += ["end-of-turn log mean prob. inside IFEval answers", f"... in their first {EARLY} tokens",
                 "IFEval answers NLL/token", "refusals NLL/token", f"end-of-turn in the refusals' first {EARLY} tokens"]
    for t in tasks:
        head.append(f"{t['label']} acc. %")
        if "tuning_items" in t:
            head.append(f"{t['label']} tuning acc. %")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        share = f"{100 * r['update_share_put_back']:.1f} %" if "update_share_put_back" in r else ""
        cells = [f"{Path(r['model']).parent.name}/{Path(r['model']).name}", r["variant"], share]
        if nll:
            cells += [f"{r['eos_inside']:.2f}", f"{r['eos_early']:.2f}", f"{r['ifeval_nll']:.3f}",
                      f"{r['refusal_nll']:.3f}", f"{r['refusal_eos_early']:.2f}"]
        for t in tasks:
            cells.append(f"{100 * r['accuracy'][t['label']]:.1f}")
            if "tuning_items" in t:
                cells.append(f"{100 * r['tuning_accuracy'][t['label']]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl drift", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="the model the others started from (an HF folder)")
    p.add_argument("models", nargs="+", help="models trained from it (HF folders)")
    p.add_argument("--answers", type=Path,
                   help="a `ds-cl eval` folder of the reference: its IFEval answers and refusals are scored "
                        "(teacher-forced NLL)")
    p.add_argument("--max-prompts", type=int, default=60, help="answers of each kind scored (default 60)")
    p.add_argument("--task", action="append", default=[], metavar="RUN_DIR:TASK",
                   help="score the accuracy on task TASK of the `ds-cl train` run in RUN_DIR (its held-out test "
                        "items, and its tuning split with eval.tuning_size), as the run scored it; repeatable")
    p.add_argument("--scoring", choices=("run", "options", "generate"), default="run",
                   help="how --task items are scored: run (default): as the run did (its eval.scoring); options: "
                        "rank classification among the task's options; generate: greedy generation and the "
                        "task's metric")
    p.add_argument("--out", type=Path, help="write the result as JSON here (and the table beside it, .md)")
    args = p.parse_args(argv)
    if args.answers is None and not args.task:
        print("ds-cl drift: nothing to score: give --answers EVAL_DIR (the NLL of the reference's answers) "
              "and/or --task RUN_DIR:TASK (a task's accuracy)", file=sys.stderr)
        return 2
    for m in [args.reference] + args.models:
        if not (Path(m) / "config.json").is_file():
            print(f"ds-cl drift: {m}: not a model folder (no config.json)", file=sys.stderr)
            return 2
    tasks, errors = [], []
    for spec in dict.fromkeys(args.task):  # before any model is loaded; each bad --task its own line
        try:
            tasks.append(task_items(*parse_task(spec), args.scoring))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        for e in errors:
            print(f"ds-cl drift: {e}", file=sys.stderr)
        return 2
    label_tasks(tasks)
    try:
        pairs = reference_answers(args.answers, args.max_prompts) if args.answers is not None else None
        result = drift(args.reference, args.models, pairs, tasks, log=lambda m: print(m, flush=True))
        if args.answers is not None:
            result["answers"] = str(args.answers)
    except (FileNotFoundError, ValueError) as e:
        print(f"ds-cl drift: {e}", file=sys.stderr)
        return 2
    md = markdown(result)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
