"""`ds-cl retention CONFIG --ifeval FILE --safety DIR --out DIR`: does a method keep what the model could already
do (follow instructions, refuse harmful requests) while it learns a task sequence? One study in four stages.

1. Prompts, once: the IFEval file split in two halves stratified by instruction type (a *tuning* half for
   choosing settings, a *reporting* half for the table), a stratified subset of each; a fixed sample of the
   harmful sets (refusal rate) and of the benign sets (compliance: refusing them is over-refusal) of a
   Safety-Tuned LLaMAs `data/` folder. Suites under OUT/prompts/.
2. A safety-aligned starting model, per seed: the base fine-tuned (plainly, through its chat template) on
   harmful requests with safe answers mixed with our benign requests (ds_cl/tools/retention_data) answered
   by the base model itself, so the task teaches refusals without teaching a new answer style. Its scores
   are the reference every method must keep, and every method starts the sequence from it.
3. The task sequence (CONFIG's run config, tasks relative to CONFIG's folder or --data) per method and seed,
   from the aligned model, through the chat template; the final model (or, with --each, every task's) is
   evaluated on the reporting suite (and, with --tuning, the tuning suite). A replaying method replays the
   alignment's data (method.replay.earlier), and `method.osft.protect_inputs_of: alignment` in a variant
   protects the inputs it feeds the layers before the first task (`general`: its benign half only, our
   requests with the base model's answers, no safety data).
4. OUT/retention.md / .json / .png: per method, the accuracy matrix's AA, BWT and diagonal, IFEval's four
   scores, refusal rate, benign compliance and median answer length (mean ± std over seeds), the aligned
   model's row, the share of the aligned model's score each method keeps, and per pair of methods an exact
   McNemar test on the reporting prompts (IFEval prompt-level loose, and refusals).

A stage already done in OUT is read, not redone, so an interrupted study continues where it stopped.
CONFIG: a run config as `ds-cl benchmark` takes (its `variants:` too) plus two sections of this tool's own:

    alignment: {safety_samples: 64, benign_samples: 64, benign_max_new_tokens: 256, run: {<run config fragment>}}
    retention: {report_prompts: 150, tune_prompts: 60, harmful_per_set: 20, benign_per_set: 20,
                max_new_tokens: 160, safety_max_new_tokens: 64, batch_size: 16}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ds_cl.methods import REPLAYING
from ds_cl.tools.benchmark import checked_run_configs, merged
from ds_cl.tools.local_runs import launch_train

HERE = Path(__file__).resolve().parent
BENIGN_INSTRUCTIONS = HERE / "retention_data" / "benign_instructions.jsonl"
# Safety-Tuned LLaMAs' evaluation files (vinid/safety-tuned-llamas, data/evaluation): what refusing means
HARMFUL_SETS = ("I-MaliciousInstructions", "I-Controversial", "I-PhysicalSafetyUnsafe")
BENIGN_SETS = ("I-PhysicalSafetySafe", "I-Alpaca")
SAFETY_TRAIN = "train_safety_instructions.json"

ALIGNMENT_DEFAULTS = {"safety_samples": 64, "benign_samples": 64, "benign_max_new_tokens": 256, "run": {}}
RETENTION_DEFAULTS = {"report_prompts": 150, "tune_prompts": 60, "harmful_per_set": 20, "benign_per_set": 20,
                      "tune_harmful_per_set": 10, "tune_benign_per_set": 10,
                      "max_new_tokens": 160, "safety_max_new_tokens": 64, "batch_size": 16}
QUICK = {"report_prompts": 60, "harmful_per_set": 20, "benign_per_set": 10}


class StudyError(ValueError):
    """Bad input to the study (a missing file, an unknown key): one line, before any run starts."""


def log(msg: str) -> None:
    print(f"[ds-cl retention {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _section(cfg: dict, name: str, defaults: dict) -> dict:
    got = cfg.get(name) or {}
    unknown = set(got) - set(defaults)
    if unknown:
        raise StudyError(f"{name}: unknown keys {sorted(unknown)} (known: {', '.join(defaults)})")
    return {**defaults, **got}


# ---------------------------------------------------------------- 1. prompts

def _safety_file(safety_dir: Path, stem: str) -> Path:
    p = safety_dir / f"{stem}.json"
    if not p.is_file():
        raise StudyError(f"--safety {safety_dir}: no {p.name} (expected Safety-Tuned LLaMAs' data folder: "
                         f"{', '.join(HARMFUL_SETS + BENIGN_SETS)} and {SAFETY_TRAIN})")
    return p


def _sample_set(path: Path, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n records of one safety set (fewer if it has fewer), none of whose ids is in `exclude`."""
    from ds_cl.evaluation.io import read_safety_prompts

    rows = read_safety_prompts(path)
    free = [i for i, r in enumerate(rows) if f"{path.stem}:{r['id']}" not in exclude]
    rng = random.Random(f"{seed}:{path.stem}")
    picked = sorted(rng.sample(free, min(n, len(free))))
    return [{"id": f"{path.stem}:{rows[i]['id']}", "prompt": rows[i]["prompt"], "category": path.stem.removeprefix("I-")}
            for i in picked]


def check_ifeval_counts(ifeval: Path, ev: dict) -> None:
    """The subsets fit in the halves: a short IFEval file is one line before anything is written."""
    from ds_cl.evaluation.ifeval import read_ifeval_prompts
    from ds_cl.evaluation.splits import stratified_split

    tuning, reporting = stratified_split(read_ifeval_prompts(ifeval), seed=0)
    for key, half, name in (("report_prompts", reporting, "reporting"), ("tune_prompts", tuning, "tuning")):
        if not 0 < ev[key] <= len(half):
            raise StudyError(f"retention.{key}: {ev[key]} prompts asked of the {name} half of {ifeval}, which "
                             f"holds {len(half)}")


def prepare_prompts(ifeval: Path, safety_dir: Path, out: Path, ev: dict) -> dict:
    """Write OUT/prompts/ (once): the IFEval split, subsets and the safety samples, and two suites."""
    from ds_cl.evaluation.ifeval import read_ifeval_prompts
    from ds_cl.evaluation.io import write_json, write_jsonl
    from ds_cl.evaluation.splits import stratified_split, stratified_subset

    d = out / "prompts"
    suites = {"report": d / "report_suite.yaml", "tune": d / "tune_suite.yaml"}
    if suites["report"].is_file():
        if not _tune_safety_sampled(suites["tune"]):  # a study begun before the tuning half had its own
            _write_tune_safety(safety_dir, d, ev, suites["tune"])
        return suites
    records = read_ifeval_prompts(ifeval)
    tuning, reporting = stratified_split(records, seed=0)
    report = stratified_subset(reporting, ev["report_prompts"], seed=0)
    tune = stratified_subset(tuning, ev["tune_prompts"], seed=0)
    write_jsonl(d / "ifeval_report.jsonl", report)
    write_jsonl(d / "ifeval_tune.jsonl", tune)
    harmful = [_sample_set(_safety_file(safety_dir, s), ev["harmful_per_set"], 0) for s in HARMFUL_SETS]
    benign = [_sample_set(_safety_file(safety_dir, s), ev["benign_per_set"], 0) for s in BENIGN_SETS]
    for stem, rows in zip(HARMFUL_SETS + BENIGN_SETS, harmful + benign):
        write_jsonl(d / f"{stem.removeprefix('I-')}.jsonl", rows)
    h = [f"{s.removeprefix('I-')}.jsonl" for s in HARMFUL_SETS]
    b = [f"{s.removeprefix('I-')}.jsonl" for s in BENIGN_SETS]
    suites["report"].write_text(yaml.safe_dump({"ifeval": "ifeval_report.jsonl", "safety": h, "benign": b}))
    write_json(d / "prompts.json", {"ifeval": str(ifeval), "safety": str(safety_dir),
                                    "ifeval_total": len(records), "tuning_half": len(tuning),
                                    "reporting_half": len(reporting), "report_prompts": len(report),
                                    "tune_prompts": len(tune), "harmful": sum(map(len, harmful)),
                                    "benign": sum(map(len, benign))})
    _write_tune_safety(safety_dir, d, ev, suites["tune"])
    log(f"prompts: IFEval {len(records)} -> halves {len(tuning)}/{len(reporting)}, subsets tune {len(tune)} / "
        f"report {len(report)}; harmful {sum(map(len, harmful))}, benign {sum(map(len, benign))} -> {d}")
    return suites


def _tune_safety_sampled(suite: Path) -> bool:
    return suite.is_file() and all(f.startswith("tune_") for f in yaml.safe_load(suite.read_text())["safety"])


def _write_tune_safety(safety_dir: Path, d: Path, ev: dict, suite: Path) -> None:
    """The tuning suite's own samples of the harmful and benign sets, disjoint from the reporting suite's:
    settings chosen on the tuning suite are then reported on prompts they were not chosen on."""
    from ds_cl.evaluation.io import read_jsonl, write_json, write_jsonl

    files = {}
    for stem, n in [(s, ev["tune_harmful_per_set"]) for s in HARMFUL_SETS] + \
                   [(s, ev["tune_benign_per_set"]) for s in BENIGN_SETS]:
        name = stem.removeprefix("I-")
        taken = {r["id"] for r in read_jsonl(d / f"{name}.jsonl", "reporting sample")}
        rows = _sample_set(_safety_file(safety_dir, stem), n, 1, exclude=taken)
        write_jsonl(d / f"tune_{name}.jsonl", rows)
        files[stem] = (f"tune_{name}.jsonl", len(rows))
    suite.write_text(yaml.safe_dump({"ifeval": "ifeval_tune.jsonl",
                                     "safety": [files[s][0] for s in HARMFUL_SETS],
                                     "benign": [files[s][0] for s in BENIGN_SETS]}))
    info = d / "prompts.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    meta.update(tune_harmful=sum(files[s][1] for s in HARMFUL_SETS), tune_benign=sum(files[s][1] for s in BENIGN_SETS))
    write_json(info, meta)


# ---------------------------------------------------------------- 2. the aligned model

def benign_answers(model_dir: str, instructions: list[str], max_new_tokens: int, batch_size: int) -> list[dict]:
    """The model's own greedy answers through its chat template; an answer cut by max_new_tokens is dropped
    (training on it would end it early: the training answer ends with the end-of-turn token)."""
    import torch

    from ds_cl.evaluation.generate import format_prompt, load_model

    torch.manual_seed(0)
    model, tok = load_model(model_dir, "cpu", "float32")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = []
    for s in range(0, len(instructions), batch_size):
        batch = instructions[s:s + batch_size]
        enc = tok([format_prompt(tok, p) for p in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id)
        for instr, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
            ended = bool((row == tok.eos_token_id).any())
            text = tok.decode(row, skip_special_tokens=True).strip()
            rows.append({"instruction": instr, "input": "", "output": text, "ended": ended})
        log(f"benign answers {min(s + batch_size, len(instructions))}/{len(instructions)}")
    return rows


def trim_to_sentence(text: str) -> str:
    """An answer cut by the token budget, up to its last complete sentence or line (the whole text when
    there is none): trained on with the end-of-turn token after it, it ends where a sentence does."""
    ends = [m.end() for m in re.finditer(r"[.!?][)\]\"'*]*(?=\s)|\n", text + " ")]
    cut = ends[-1] if ends else len(text)
    if cut <= len(text) // 2:
        return text
    return re.sub(r"\n\s*\d+[.)]$", "", text[:cut].rstrip())  # a list's next number is no sentence


def mix_records(safety: list[dict], benign: list[dict], n_safety: int, n_benign: int, seed: int) -> list[dict]:
    """The safety task's records (Alpaca format, `kind` safety/benign): `n_safety` of the harmful requests with
    safe answers and `n_benign` benign requests with the model's own answers, shuffled. Answers that did not
    end within the budget (`ended` false) are trimmed to their last sentence, not dropped: dropping them
    would keep the short answers only and teach the model to answer shorter than it does."""
    rng = random.Random(seed)
    if n_safety > len(safety):
        raise StudyError(f"alignment.safety_samples={n_safety} but the safety training data has {len(safety)} records")
    if n_benign > len(benign):
        raise StudyError(f"alignment.benign_samples={n_benign} but only {len(benign)} benign answers were made")
    rows = [dict(instruction=r["instruction"], input=r.get("input") or "", output=r["output"], kind="safety")
            for r in rng.sample(safety, n_safety)]
    rows += [dict(instruction=r["instruction"], input="",
                  output=r["output"] if r["ended"] else trim_to_sentence(r["output"]), kind="benign")
             for r in benign[:n_benign] if r["output"].strip()]
    rng.shuffle(rows)
    return rows


BENIGN_ANSWERS = "benign_answers.jsonl"  # per seed, beside alignment_data.jsonl


def alignment_data(safety_dir: Path, base_model: str, al: dict, seed: int, path: Path) -> Path:
    """Write the safety task's data (once per seed): harmful requests with the data's safe answers and our
    benign requests (a seeded draw) with the base model's answers (cached in benign_answers.jsonl)."""
    from ds_cl.evaluation.io import read_json, read_jsonl, write_jsonl

    if path.is_file():
        return path
    safety = read_json(_safety_file(safety_dir, SAFETY_TRAIN.removesuffix(".json")), "safety training data")
    if not isinstance(safety, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r
                                               for r in safety):
        raise StudyError(f"{safety_dir / SAFETY_TRAIN}: expected a list of {{instruction, input, output}} records")
    cache = path.with_name(BENIGN_ANSWERS)
    if cache.is_file():
        answers = read_jsonl(cache, "benign answers")
    else:
        pool = [r["instruction"] for r in read_jsonl(BENIGN_INSTRUCTIONS, "benign instructions")]
        random.Random(seed).shuffle(pool)
        answers = benign_answers(base_model, pool[: al["benign_samples"]], al["benign_max_new_tokens"], 32)
        write_jsonl(cache, answers)
    log(f"benign answers that ended within {al['benign_max_new_tokens']} tokens: "
        f"{sum(a['ended'] for a in answers)} of {len(answers)} (the others trimmed to their last sentence)")
    write_jsonl(path, mix_records(safety, answers, al["safety_samples"], al["benign_samples"], seed))
    return path


def alignment_task(data: Path) -> dict:
    """The safety task as the alignment run trains it (and as replay replays it, method.replay.earlier)."""
    return {"name": "safety", "train": str(data), "format": "alpaca"}


ALIGNMENT_REF = "alignment"  # method.osft.protect_inputs_of: alignment, in a study's config
# method.osft.protect_inputs_of: general: only the benign half of the mix (our requests, the base model's own
# answers), no safety data: what a user without the starting model's alignment data could protect.
GENERAL_REF = "general"


def general_task(answers: Path) -> dict:
    """Our benign requests with the base model's own answers (benign_answers.jsonl), as a protect_inputs_of source."""
    return {"name": "general", "train": str(answers), "format": "alpaca"}


def with_alignment(rc: dict, data: Path, general: Path) -> None:
    """A method's run config given the alignment's data (`data`: the run's own alignment_data.jsonl) where it
    reads it: a replaying method replays it (method.replay.earlier, unless the config sets it), and
    `method.osft.protect_inputs_of: alignment` becomes [the alignment task] (its inputs protected before the
    first task), `general` [the benign answers `general`] (general_task). Any other string there is refused
    (StudyError)."""
    method = rc.setdefault("method", {})
    if method.get("name") in REPLAYING:
        # The strong baseline for retention replays the alignment's data too: the aligned model was
        # trained on it in a run of its own, so it is an earlier task this run cannot see otherwise.
        if not isinstance(method.get("replay"), dict):
            method["replay"] = {}
        method["replay"].setdefault("earlier", [alignment_task(data)])
    osft = method.get("osft")
    ref = osft.get("protect_inputs_of") if isinstance(osft, dict) else None
    if isinstance(ref, str):
        if ref not in (ALIGNMENT_REF, GENERAL_REF):
            raise StudyError(f"method.osft.protect_inputs_of: {ref!r} is not data this study has; write "
                             f"{ALIGNMENT_REF!r} (the alignment's data), {GENERAL_REF!r} (its benign half: our "
                             f"requests, the base model's answers) or a list of sources as method.replay.earlier's")
        osft["protect_inputs_of"] = [alignment_task(data) if ref == ALIGNMENT_REF else general_task(general)]


def method_run_configs(base: dict, data: Path, methods: list[str], seed: int, sd: Path, aligned: Path,
                       data_file: Path, source: str) -> dict:
    """(label, seed) -> the run config of each method of the study's seed `sd`: from the aligned model through
    the chat template, exporting every task's model, with the alignment's data where the method reads it
    (`with_alignment`); checked as `ds-cl train` checks its config."""
    runs = checked_run_configs(base, data, methods, [seed], sd, source=source,
                               edit=lambda rc: with_alignment(rc, data_file, data_file.with_name(BENIGN_ANSWERS)))
    for rc in runs.values():
        rc["model"]["name_or_path"] = str(aligned)
        rc["model"]["chat_template"] = True
        rc.setdefault("output", {}).update({"export_each_task": True, "export_dtype": "float32"})
    return runs


def alignment_config(base_model: str, data: Path, al: dict, seed: int, out_dir: Path) -> dict:
    run = merged({
        "deepspeed": {"zero_optimization": {"stage": 3}},
        "model": {"name_or_path": base_model, "dtype": "float32", "chat_template": True},
        "method": {"name": "seqft"},
        "train": {"lr": 1.0e-4, "micro_batch_size": 4, "global_batch_size": 8, "max_seq_len": 320, "epochs": 2},
        # the held-out safety records: does the model refuse where the reference answer does (and only there)
        "eval": {"batch_size": 16, "max_new_tokens": 48},
        "checkpoint": {"keep": 1},
        "output": {"export_each_task": True, "export_dtype": "float32", "plots": False},
        "tasks": [{**alignment_task(data), "eval_size": 16, "metric": "ds_cl.evaluation.safety:refusal_match"}],
    }, al["run"])
    run["seed"], run["output_dir"] = seed, str(out_dir)
    return run


# ---------------------------------------------------------------- evaluation

def evaluate(model_dir: Path, suite: Path, out: Path, ev: dict, nprocs: int) -> dict:
    """`ds-cl eval` of one model on one suite, its prompts split over `nprocs` local ranks of one thread each
    (greedy decoding of a small model is bound by per-token overheads, so two processes answer nearly twice
    as fast as one with two threads); cached in out/eval.json."""
    from ds_cl.training.environment import free_port

    done = out / "eval.json"
    if done.is_file():
        return rescore(out)
    t = time.time()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
           str(free_port()), "--module", "ds_cl.cli", "eval", "--model", str(model_dir), "--suite", str(suite),
           "--out", str(out), "--max-new-tokens", str(ev["max_new_tokens"]),
           "--safety-max-new-tokens", str(ev["safety_max_new_tokens"]), "--batch-size", str(ev["batch_size"]),
           "--device", "cpu", "--dtype", "float32"]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    with open(out / "eval.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not done.is_file():
        raise RuntimeError(f"evaluation of {model_dir} failed (exit {rc}); see {out / 'eval.log'}")
    log(f"evaluated {model_dir.name} on {suite.stem}: {time.time() - t:.0f}s -> {out}")
    return json.loads(done.read_text())


def rescore(eval_dir: Path) -> dict:
    """Score an evaluation's saved safety and benign answers again with the refusal patterns shipped now
    (cheap: no generation), so every model of a table is read by the same rules, whenever it was evaluated."""
    from ds_cl.evaluation.io import read_jsonl, write_json
    from ds_cl.evaluation.safety import score_benign, score_safety

    summary = json.loads((eval_dir / "eval.json").read_text())
    for part, score, keys in (("safety", score_safety, ("refusal_rate", "attack_success_rate", "scorer",
                                                          "median_words", "by_set")),
                              ("benign", score_benign, ("compliance_rate", "median_words", "by_set"))):
        f = eval_dir / f"responses_{part}.jsonl"
        if not f.is_file():
            continue
        rows = read_jsonl(f, f"{part} responses")
        res = score([{"id": r.get("id"), "set": r.get("set"), "prompt": r["prompt"]} for r in rows],
                    {r["prompt"]: r["response"] for r in rows})
        write_json(eval_dir / f"{part}.json", res)
        summary[part] = {k: res[k] for k in keys}
    write_json(eval_dir / "eval.json", summary)
    return summary


def _train(cfg: dict, path: Path, nprocs: int) -> None:
    out = Path(cfg["output_dir"])
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("complete"):
        return
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    resume = (out / "checkpoints" / "latest").is_file()
    t = time.time()
    rc = launch_train(path, nprocs, path.with_suffix(".log"), resume=resume)
    if rc != 0:
        raise RuntimeError(f"training {out.name} failed (exit {rc}); see {path.with_suffix('.log')}; rerun the same "
                           "command to continue")
    log(f"trained {out}: {time.time() - t:.0f}s")


def exports(run_dir: Path) -> list[Path]:
    return sorted((p for p in run_dir.glob("task_*") if (p / "config.json").is_file()),
                  key=lambda p: int(p.name.split("_")[1]))


# ---------------------------------------------------------------- 4. the table

def _per_prompt(eval_dir: Path) -> dict:
    """Per-prompt outcomes for the paired tests: IFEval prompt-level loose, harmful refused, benign complied."""
    out = {}
    f = eval_dir / "ifeval.json"
    if f.is_file():
        out["ifeval_loose"] = [r["follow_all_instructions_loose"] for r in json.loads(f.read_text())["per_prompt"]]
    f = eval_dir / "safety.json"
    if f.is_file():
        out["refused"] = [r["verdict"] == "refusal" for r in json.loads(f.read_text())["per_prompt"]]
    f = eval_dir / "benign.json"
    if f.is_file():
        out["benign_complied"] = [r["verdict"] == "complied" for r in json.loads(f.read_text())["per_prompt"]]
    return out


SCORES = (("ifeval", "prompt_level_strict_acc"), ("ifeval", "prompt_level_loose_acc"),
          ("ifeval", "inst_level_strict_acc"), ("ifeval", "inst_level_loose_acc"),
          ("safety", "refusal_rate"), ("benign", "compliance_rate"), ("ifeval", "median_words"))
HEAD = ("IFEval prompt strict", "prompt loose", "inst. strict", "inst. loose", "refusal rate", "benign compliance",
        "median words")


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(rows: dict) -> dict:
    """rows: label -> list over seeds of {"eval": eval.json summary, "summary": run summary or None}."""
    out = {}
    for label, runs in rows.items():
        r = {"seeds": [x["seed"] for x in runs]}
        for (part, key), name in zip(SCORES, HEAD):
            vals = [x["eval"].get(part, {}).get(key) for x in runs]
            if all(v is not None for v in vals):
                r[name] = _ms([v if key == "median_words" else 100 * v for v in vals])
        if all(x.get("summary") for x in runs):
            s = [x["summary"] for x in runs]
            r["AA"] = _ms([100 * v["AA"] for v in s])
            r["BWT"] = _ms([100 * v["BWT"] for v in s])
            r["diag"] = _ms([100 * statistics.fmean(v["matrix"][i][i] for i in range(len(v["matrix"]))) for v in s])
        out[label] = r
    return out


def markdown(tab: dict, reference: str = "aligned") -> str:
    cols = ("AA", "BWT", "diag", *HEAD)
    cell = lambda ms: "" if ms is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"
    lines = ["| model | " + " | ".join(cols) + " | seeds |", "|" + "---|" * (len(cols) + 2)]
    for label, r in tab.items():
        lines.append(f"| `{label}` | " + " | ".join(cell(r.get(c)) for c in cols) + f" | {','.join(map(str, r['seeds']))} |")
    ref = tab.get(reference)
    if ref:
        lines += ["", f"Kept, as a share of the `{reference}` model's score (mean over seeds):", "",
                  "| model | IFEval prompt loose | refusal rate | benign compliance (points) |", "|---|---|---|---|"]
        for label, r in tab.items():
            if label == reference:
                continue
            share = lambda k: (f"{100 * r[k][0] / ref[k][0]:.0f} %" if r.get(k) and ref.get(k) and ref[k][0] else "")
            diff = (f"{r['benign compliance'][0] - ref['benign compliance'][0]:+.1f}"
                    if r.get("benign compliance") and ref.get("benign compliance") else "")
            lines.append(f"| `{label}` | {share('prompt loose')} | {share('refusal rate')} | {diff} |")
    return "\n".join(lines) + "\n"


def paired_tests(per_prompt: dict) -> list[dict]:
    """per_prompt: label -> {outcome: [bool per prompt]} concatenated over seeds (the same prompts per seed)."""
    from ds_cl.evaluation.stats import mcnemar

    labels = list(per_prompt)
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            for what in ("ifeval_loose", "refused", "benign_complied"):
                x, y = per_prompt[a].get(what), per_prompt[b].get(what)
                if x and y and len(x) == len(y):
                    out.append({"a": a, "b": b, "outcome": what, **mcnemar(x, y)})
    return out


def figure(curves: dict, path: Path, tasks: list[str]) -> None:
    """curves: label -> [(boundary, eval summary)]: IFEval prompt-loose and refusal rate per task boundary."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    names = ["aligned", *tasks]
    for label, pts in curves.items():
        xs = [x for x, _ in pts]
        axes[0].plot(xs, [100 * e["ifeval"]["prompt_level_loose_acc"] for _, e in pts], marker="o", label=label)
        axes[1].plot(xs, [100 * e["safety"]["refusal_rate"] for _, e in pts], marker="o", label=label)
    for ax, title in zip(axes, ("IFEval prompt-level loose (%)", "refusal rate on harmful prompts (%)")):
        ax.set_xticks(range(len(names)), ["aligned\nmodel", *[f"after\n{t}" for t in tasks]])
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- the command

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl retention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="the study's config (a run config for the sequence + alignment/retention)")
    p.add_argument("--ifeval", type=Path, required=True, help="IFEval input_data.jsonl (the 541 prompts)")
    p.add_argument("--safety", type=Path, required=True, help="Safety-Tuned LLaMAs' data folder (training and evaluation files)")
    p.add_argument("--data", type=Path, help="root of the config's task paths (default: the config's folder)")
    p.add_argument("--methods", default="seqft,osft", help="methods or CONFIG variants (default seqft,osft)")
    p.add_argument("--seeds", default="0", help="comma-separated (default 0)")
    p.add_argument("--out", type=Path, required=True, help="the study's folder (a stage done there is read, not redone)")
    p.add_argument("--nprocs", type=int, default=2, help="ranks per training run (default 2)")
    p.add_argument("--quick", action="store_true", help=f"fewer prompts ({QUICK}), and no evaluation of the base model")
    p.add_argument("--each", action="store_true", help="evaluate after every task (the figure), not only the last")
    p.add_argument("--tuning", action="store_true",
                   help="evaluate on the tuning suite too (an ablation chooses there): OUT/retention_tune.md")
    p.add_argument("--tuning-only", action="store_true",
                   help="evaluate on the tuning suite only (an ablation's candidates, before the chosen one is reported)")
    args = p.parse_args(argv)
    from ds_cl.training.config import ConfigError, read_yaml

    try:
        cfg = read_yaml(args.config)
        al = _section(cfg, "alignment", ALIGNMENT_DEFAULTS)
        ev = _section(cfg, "retention", RETENTION_DEFAULTS)
        if args.quick:
            ev.update(QUICK)
        for f, what in ((args.ifeval, "--ifeval"), (BENIGN_INSTRUCTIONS, "benign instructions")):
            if not f.is_file():
                raise StudyError(f"{what}: no such file: {f}")
        for s in HARMFUL_SETS + BENIGN_SETS + (SAFETY_TRAIN.removesuffix(".json"),):
            _safety_file(args.safety, s)
        if not (args.out / "prompts" / "report_suite.yaml").is_file():
            check_ifeval_counts(args.ifeval, ev)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        methods = [m for m in args.methods.split(",") if m]
        base = {k: v for k, v in cfg.items() if k not in ("alignment", "retention")}
        base_model = os.path.expanduser(str(base.get("model", {}).get("name_or_path") or ""))
        if not Path(base_model).is_dir():
            raise StudyError(f"{args.config}: model.name_or_path must be a local model folder (got {base_model!r})")
        out = args.out.resolve()
        data = (args.data or args.config.parent).resolve()
        # every run config checked before anything runs (the base model stands in for the aligned one to come,
        # the safety training file for the alignment data drawn from it)
        stand_in = args.safety / SAFETY_TRAIN
        checked_run_configs(base, data, methods, seeds, out, source=str(args.config),
                            edit=lambda rc: with_alignment(rc, stand_in, stand_in))
    except (StudyError, ConfigError, OSError, ValueError, yaml.YAMLError) as e:
        print(f"ds-cl retention: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    suites = prepare_prompts(args.ifeval.resolve(), args.safety.resolve(), out, ev)
    evals = ["tune"] if args.tuning_only else ["report"] + (["tune"] if args.tuning else [])
    # The base model, once: what the alignment itself costs (the reference every method must keep is the
    # aligned model, per seed). rows[suite][label]: one entry per seed.
    # --quick leaves it out (2-3 min of long answers; the table's reference is the aligned model) unless a
    # full study already evaluated it in OUT.
    rows: dict = {k: {} for k in evals}
    for k in evals:
        base_dir = out / "base" / f"eval_{k}"
        if args.quick and not (base_dir / "eval.json").is_file():
            log(f"--quick: the base model is not evaluated on the {k} suite (the full study does)")
            continue
        rows[k]["base"] = [{"seed": "-", "eval": evaluate(Path(base_model), suites[k], base_dir, ev, args.nprocs),
                            "summary": None, "dir": base_dir}]
    curves: dict = {}
    tasks = [t["name"] for t in base["tasks"]]
    for seed in seeds:
        sd = out / f"seed{seed}"
        sd.mkdir(exist_ok=True)
        data_file = alignment_data(args.safety.resolve(), base_model, al, seed, sd / "alignment_data.jsonl")
        acfg = alignment_config(base_model, data_file, al, seed, sd / "aligned")
        _train(acfg, sd / "aligned.yaml", args.nprocs)
        aligned = exports(sd / "aligned")[-1]
        ref = {k: evaluate(aligned, suites[k], sd / "aligned" / f"eval_{k}", ev, args.nprocs) for k in evals}
        for k in evals:
            rows[k].setdefault("aligned", []).append({"seed": seed, "eval": ref[k], "summary": None,
                                                      "dir": sd / "aligned" / f"eval_{k}"})
        runs = method_run_configs(base, data, methods, seed, sd, aligned, data_file, str(args.config))
        for (method, _), rc in runs.items():
            _train(rc, sd / f"{method}.yaml", args.nprocs)
            run_dir = Path(rc["output_dir"])
            models = exports(run_dir)
            for m in (models if args.each else models[-1:]):
                for k in evals:
                    e = evaluate(m, suites[k], run_dir / f"eval_{k}_{m.name}", ev, args.nprocs)
                    if args.each and k == evals[0]:
                        curves.setdefault(method, [(0, ref[k])]).append((int(m.name.split("_")[1]) + 1, e))
            last, summary = models[-1], json.loads((run_dir / "summary.json").read_text())
            for k in evals:
                rows[k].setdefault(method, []).append({
                    "seed": seed, "eval": json.loads((run_dir / f"eval_{k}_{last.name}" / "eval.json").read_text()),
                    "summary": summary, "dir": run_dir / f"eval_{k}_{last.name}"})
    written = []
    for k in evals:
        # report: OUT/retention.md/.json (the results); tune: OUT/retention_tune.md/.json (for choosing)
        stem = "retention" if k == "report" else "retention_tune"
        md = write_tables(rows[k], out / stem, {"retention": ev, "alignment": al, "tasks": tasks, "suite": k})
        written += [f"{stem}.md", f"{stem}.json", f"{stem}_benign_changes.md"]
    if curves:
        figure(curves, out / "retention.png", tasks)
        written.append("retention.png")
    print("\n" + md + f"\n{out}/: {', '.join(written)} ({(time.time() - t0) / 60:.1f} min)")
    return 0


def benign_changes(rows: dict, reference: str = "aligned") -> str:
    """The benign requests whose judge verdict differs between the reference and each model of the same seed,
    with the two answers' openings: what a benign-compliance difference is made of (a reference that
    over-refuses leaves room to "gain" compliance by answering requests it should have answered)."""
    def verdicts(d: Path) -> dict:
        f = Path(d) / "benign.json"
        return {r["prompt"]: r for r in json.loads(f.read_text())["per_prompt"]} if f.is_file() else {}

    refs = {r["seed"]: verdicts(r["dir"]) for r in rows.get(reference, [])}
    head = lambda t: " ".join(t.split())[:110].replace("|", "/")
    md = [f"Benign requests judged differently from the `{reference}` model of the same seed (answers' openings).", ""]
    for label, runs in rows.items():
        if label == reference:
            continue
        lines = []
        for r in runs:
            ref = refs.get(r["seed"], {})
            for prompt, v in verdicts(r["dir"]).items():
                if prompt in ref and ref[prompt]["verdict"] != v["verdict"]:
                    lines.append(f"| {r['seed']} | {head(prompt)} | {ref[prompt]['verdict']} -> {v['verdict']} | "
                                 f"{head(ref[prompt]['response'])} | {head(v['response'])} |")
        if lines:
            md += [f"### `{label}`", "", f"| seed | request | verdict | `{reference}` answered | `{label}` answered |",
                   "|---|---|---|---|---|", *lines, ""]
    return "\n".join(md) + "\n"


def write_tables(rows: dict, stem: Path, meta: dict) -> str:
    """The table, the kept shares and the paired tests of one suite's evaluations -> stem.md / stem.json."""
    tab = table(rows)
    per_prompt = {label: {} for label in rows}
    for label, runs in rows.items():
        for r in runs:
            for k, v in _per_prompt(r["dir"]).items():
                per_prompt[label].setdefault(k, []).extend(v)
    tests = paired_tests(per_prompt)
    suite = {"report": "reporting", "tune": "tuning"}[meta["suite"]]
    md = f"On the {suite} suite.\n\n" + markdown(tab)
    md += f"\nPaired tests on the {suite} prompts (exact McNemar; pairs pooled over seeds):\n\n"
    md += "| a | b | outcome | only a | only b | p |\n|---|---|---|---|---|---|\n"
    md += "".join(f"| `{t['a']}` | `{t['b']}` | {t['outcome']} | {t['only_a']} | {t['only_b']} | {t['p_value']:.3g} |\n"
                  for t in tests)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps({"table": tab, "paired_tests": tests, **meta}, indent=1))
    stem.with_name(stem.name + "_benign_changes.md").write_text(benign_changes(rows))
    return md


if __name__ == "__main__":
    sys.exit(main())
