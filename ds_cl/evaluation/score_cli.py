"""`ds-cl score ifeval|safety|benign|report|split|agreement`: score existing responses, compare
evaluation runs, split IFEval prompts into tuning and reporting halves, or check the refusal
patterns against hand labels."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from .ifeval import read_ifeval_prompts
from .io import EvalInputError, read_jsonl, read_prompt_sets, read_responses, write_json, write_jsonl


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-cl score", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ifeval", help="IFEval strict/loose accuracies -> DIR/ifeval.json",
                       description=("Score IFEval responses with lm-eval's checkers: prompt- and instruction-level accuracy, "
                                    'strict and loose.'))
    a.add_argument("--prompts", required=True, help="IFEval JSONL (key, prompt, instruction_id_list, kwargs)")
    a.add_argument("--responses", required=True, help='JSONL of {"prompt", "response"}')
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--allow-missing", action="store_true", help="score only prompts that have a response")
    s = sub.add_parser("safety", help="refusal rate and attack success rate -> DIR/safety.json",
                       description=('Score answers to harmful prompts: refusal rate by the refusal patterns (or a judge) and '
                                    'attack success rate.'))
    s.add_argument("--responses", required=True, help='JSONL of {"prompt", "response"}')
    s.add_argument("--prompts", nargs="+", help="prompt file(s) (.txt/.csv/.jsonl/.json), each file a set; "
                                                "default: the responses' own prompts")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--judge", help="'cmd:COMMAND' (reads JSONL pairs, prints safe/unsafe lines) or a local "
                                   "classifier model directory (Llama-Guard style or *ForSequenceClassification)")
    s.add_argument("--allow-missing", action="store_true", help="score only prompts that have a response")
    b = sub.add_parser("benign", help="compliance rate on harmless prompts (over-refusal) -> DIR/benign.json",
                       description=('Score answers to harmless prompts: the compliance rate (refusing them is over-refusal).'))
    b.add_argument("--responses", required=True, help='JSONL of {"prompt", "response"}')
    b.add_argument("--prompts", nargs="+", help="prompt file(s), each file a set; default: the responses' own prompts")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--allow-missing", action="store_true", help="score only prompts that have a response")
    r = sub.add_parser("report", help="base vs checkpoints: deltas, win/tie/lose, curves, markdown",
                       description=("Compare a base model's evaluation with checkpoints': per-metric deltas, per-prompt "
                                    'win/tie/lose, retention curves and, with --matrix, AA/BWT/FWT.'))
    r.add_argument("--base", required=True, help="`ds-cl eval` output directory of the base model")
    r.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a checkpoint's `ds-cl eval` output directory, in sequence order (repeat)")
    r.add_argument("--matrix", help="JSON with 'matrix' (R[i][j]), optional 'tasks' and 'baseline' (e.g. "
                                    "ds-cl train's cl_matrix.json): adds AA/BWT/FWT")
    r.add_argument("--out", required=True, help="output directory (report.md, report.json, retention.png)")
    sp = sub.add_parser("split", help="IFEval prompts -> tuning/reporting halves stratified by instruction type",
                       description=('Split IFEval prompts once into a tuning and a reporting half, stratified by instruction '
                                    'type, with stratified subsets of each.'))
    sp.add_argument("--prompts", required=True, help="IFEval JSONL (key, prompt, instruction_id_list, kwargs)")
    sp.add_argument("--out", required=True, help="output directory (tuning.jsonl, reporting.jsonl, split.json)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the shuffle inside each stratum (default 0)")
    sp.add_argument("--report-n", type=int,
                    help="also write reporting_N.jsonl: a stratified subset of the reporting half")
    sp.add_argument("--tune-n", type=int, help="also write tuning_N.jsonl: a stratified subset of the tuning half")
    ag = sub.add_parser("agreement", help="refusal patterns vs hand labels: agreement, Cohen's kappa, confusion",
                       description=("Check the refusal patterns against hand labels: agreement, Cohen's kappa, the confusion "
                                    'counts and the disagreeing items.'))
    ag.add_argument("--labels", required=True,
                    help='JSONL of {"response", "label": "refusal"|"complied", "prompt"?, "source"?}')
    ag.add_argument("--out", help="output directory (agreement.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except EvalInputError as e:
        print(f"ds-cl score: error: {e}", file=sys.stderr)
        return 2


def _own_prompts(path) -> list[dict]:
    """The prompts of a responses file (ds-cl eval writes id and set next to prompt and response)."""
    return [{"id": str(r.get("id", r["_line"])), "prompt": r["prompt"], "category": r.get("category"),
             "set": r.get("set")} for r in read_jsonl(path, "responses")]


def _split(args) -> int:
    from .splits import read_records, stratified_split, stratified_subset, stratum_counts
    out = Path(args.out)
    records = read_records(args.prompts)
    tuning, reporting = stratified_split(records, seed=args.seed)
    files = {"tuning.jsonl": tuning, "reporting.jsonl": reporting}
    for flag, n, half, name in (("--tune-n", args.tune_n, tuning, "tuning"),
                                ("--report-n", args.report_n, reporting, "reporting")):
        if n is not None:
            if not 0 < n <= len(half):
                raise EvalInputError(f"{flag} {n}: must be between 1 and the {name} half's {len(half)} prompts")
            files[f"{name}_{n}.jsonl"] = stratified_subset(half, n, seed=args.seed)
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    meta = {"source": str(Path(args.prompts).resolve()),
            "sha256": hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest(),
            "seed": args.seed, "num_records": len(records),
            "stratum": "first entry of instruction_id_list",
            "files": {name: {"n": len(rows), "by_stratum": stratum_counts(rows)} for name, rows in files.items()}}
    write_json(out / "split.json", meta)
    print(" ".join(f"{name}={len(rows)}" for name, rows in files.items())
          + f" ({len(stratum_counts(records))} strata, seed {args.seed})")
    print(f"wrote {out / 'split.json'}")
    return 0


def _agreement(args) -> int:
    from .safety import pattern_agreement, read_labels
    res = pattern_agreement(read_labels(args.labels))
    res["labels"] = str(args.labels)
    c = res["confusion"]
    kappa = "undefined" if res["kappa"] is None else f"{res['kappa']:.4f}"
    print(f"n={res['n']} agreement={res['agreement']:.4f} kappa={kappa}")
    print(f"hand refusal: pattern refusal {c['refusal']['refusal']}, pattern complied {c['refusal']['complied']}; "
          f"hand complied: pattern refusal {c['complied']['refusal']}, pattern complied {c['complied']['complied']}")
    print("disagreeing items (0-based index): " + (", ".join(map(str, res["disagreements"])) or "none"))
    if args.out:
        write_json(Path(args.out) / "agreement.json", res)
        print(f"wrote {Path(args.out) / 'agreement.json'}")
    return 0


def _run(args) -> int:
    if args.what == "split":
        return _split(args)
    if args.what == "agreement":
        return _agreement(args)
    out = Path(args.out)
    if args.what == "ifeval":
        from .ifeval import score_ifeval
        prompts = read_ifeval_prompts(args.prompts)
        responses = read_responses(args.responses)
        res = score_ifeval(prompts, responses, allow_missing=args.allow_missing)
        write_json(out / "ifeval.json", res)
        print(" ".join(f"{k}={res[k]:.4f}" for k in ("prompt_level_strict_acc", "prompt_level_loose_acc",
                                                     "inst_level_strict_acc", "inst_level_loose_acc")))
        print(f"wrote {out / 'ifeval.json'}")
        return 0
    if args.what == "safety":
        from .safety import make_judge, score_safety
        responses = read_responses(args.responses)
        prompts = read_prompt_sets(args.prompts) if args.prompts else _own_prompts(args.responses)
        judge = make_judge(args.judge)
        res = score_safety(prompts, responses, judge, allow_missing=args.allow_missing)
        write_json(out / "safety.json", res)
        print(f"refusal_rate={res['refusal_rate']:.4f} attack_success_rate={res['attack_success_rate']:.4f} "
              f"scorer={res['scorer']}")
        print(f"wrote {out / 'safety.json'}")
        return 0
    if args.what == "benign":
        from .safety import score_benign
        responses = read_responses(args.responses)
        prompts = read_prompt_sets(args.prompts, "benign") if args.prompts else _own_prompts(args.responses)
        res = score_benign(prompts, responses, allow_missing=args.allow_missing)
        write_json(out / "benign.json", res)
        print(f"compliance_rate={res['compliance_rate']:.4f} refusal_rate={res['refusal_rate']:.4f} "
              f"scorer={res['scorer']}")
        print(f"wrote {out / 'benign.json'}")
        return 0
    from .report import build_report
    runs = []
    for spec in args.run:
        if "=" not in spec:
            raise EvalInputError(f"--run expects NAME=DIR, got {spec!r}")
        name, d = spec.split("=", 1)
        runs.append((name, d))
    if not runs:
        raise EvalInputError("report needs at least one --run NAME=DIR")
    rep = build_report(args.base, runs, out, matrix_path=args.matrix)
    print(f"wrote {out / 'report.md'} ({len(rep['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
