"""`ds-cl score ifeval|safety|report`: score existing responses, or compare evaluation runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .ifeval import read_ifeval_prompts
from .io import EvalInputError, read_jsonl, read_responses, read_safety_prompts, write_json


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ds-cl score", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ifeval", help="IFEval strict/loose accuracies -> DIR/ifeval.json")
    a.add_argument("--prompts", required=True, help="IFEval JSONL (key, prompt, instruction_id_list, kwargs)")
    a.add_argument("--responses", required=True, help='JSONL of {"prompt", "response"}')
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--allow-missing", action="store_true", help="score only prompts that have a response")
    s = sub.add_parser("safety", help="refusal rate and attack success rate -> DIR/safety.json")
    s.add_argument("--responses", required=True, help='JSONL of {"prompt", "response"}')
    s.add_argument("--prompts", help="prompt file (.txt/.csv/.jsonl); default: the responses' own prompts")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--judge", help="'cmd:COMMAND' (reads JSONL pairs, prints safe/unsafe lines) or a local "
                                   "classifier model directory (Llama-Guard style or *ForSequenceClassification)")
    s.add_argument("--allow-missing", action="store_true")
    r = sub.add_parser("report", help="base vs checkpoints: deltas, win/tie/lose, curves, markdown")
    r.add_argument("--base", required=True, help="`ds-cl eval` output directory of the base model")
    r.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a checkpoint's `ds-cl eval` output directory, in sequence order (repeat)")
    r.add_argument("--matrix", help="JSON with 'matrix' (R[i][j]), optional 'tasks' and 'baseline' (e.g. "
                                    "ds-cl train's cl_matrix.json): adds AA/BWT/FWT")
    r.add_argument("--out", required=True, help="output directory (report.md, report.json, retention.png)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except EvalInputError as e:
        print(f"ds-cl score: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
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
        if args.prompts:
            prompts = read_safety_prompts(args.prompts)
        else:
            prompts = [{"id": str(r.get("id", r["_line"])), "prompt": r["prompt"], "category": r.get("category")}
                       for r in read_jsonl(args.responses, "responses")]
        judge = make_judge(args.judge)
        res = score_safety(prompts, responses, judge, allow_missing=args.allow_missing)
        write_json(out / "safety.json", res)
        print(f"refusal_rate={res['refusal_rate']:.4f} attack_success_rate={res['attack_success_rate']:.4f} "
              f"scorer={res['scorer']}")
        print(f"wrote {out / 'safety.json'}")
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
