"""IFEval scoring: strict and loose, prompt and instruction level, as the reference does.

Reference: google-research instruction_following_eval `evaluation_lib.py`, identical to
lm-evaluation-harness `lm_eval/tasks/ifeval/utils.py`; the checkers are lm-eval's own
(`lm_eval.tasks.ifeval.instructions_registry`, from the `eval` extra):
- strict: each instruction is checked on the response as is;
- loose: an instruction is followed if any of 8 variants passes: the response, with its first
  line removed, its last line removed, both, and each of those four with every '*' removed;
- an empty (whitespace-only) response follows nothing;
- prompt level: all instructions of the prompt followed; instruction level: mean over all
  instructions of all prompts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

from .io import EvalInputError, read_jsonl
from .stats import median_words


@functools.lru_cache(maxsize=None)
def instruction_dict() -> Mapping[str, type]:
    """lm-eval's `INSTRUCTION_DICT` (instruction id -> checker class), imported on first use.

    Without the `eval` extra this raises a one-line EvalInputError instead of an ImportError."""
    try:
        import langdetect

        from . import punkt_offline
        punkt_offline.install()  # before lm-eval's instructions_util is imported: no nltk.download
        langdetect.DetectorFactory.seed = 0  # language checks give the same answer every run
        from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise EvalInputError(f"IFEval scoring needs lm-eval's IFEval checkers (missing module "
                             f"{e.name or e}): pip install 'ds-cl[eval]'") from None
    return INSTRUCTION_DICT


def _loose_variants(response: str) -> list[str]:
    r = response.split("\n")
    remove_first = "\n".join(r[1:]).strip()
    remove_last = "\n".join(r[:-1]).strip()
    remove_both = "\n".join(r[1:-1]).strip()
    return [response, response.replace("*", ""), remove_first, remove_last, remove_both,
            remove_first.replace("*", ""), remove_last.replace("*", ""), remove_both.replace("*", "")]


def _build(instruction_id: str, kwargs: Mapping, prompt: str):
    inst = instruction_dict()[instruction_id](instruction_id)
    inst.build_description(**{k: v for k, v in kwargs.items() if v})
    args = inst.get_instruction_args()
    if args and "prompt" in args:
        inst.build_description(prompt=prompt)
    return inst


def check_prompt(record: Mapping, response: str) -> dict:
    """Verdicts of one IFEval record on one response: per-instruction strict and loose lists."""
    strict, loose = [], []
    variants = _loose_variants(response)
    for iid, kw in zip(record["instruction_id_list"], record["kwargs"]):
        inst = _build(iid, kw, record["prompt"])
        strict.append(bool(response.strip() and inst.check_following(response)))
        inst = _build(iid, kw, record["prompt"])  # fresh, as the reference builds one per mode
        loose.append(any(v.strip() and inst.check_following(v) for v in variants))
    return {"key": record.get("key"), "prompt": record["prompt"],
            "instruction_id_list": list(record["instruction_id_list"]),
            "follow_instruction_list_strict": strict, "follow_all_instructions_strict": all(strict),
            "follow_instruction_list_loose": loose, "follow_all_instructions_loose": all(loose),
            "response": response}


def score_ifeval(prompts: list[dict], responses: Mapping[str, str], *, allow_missing: bool = False) -> dict:
    """The `ifeval.json` payload. `responses` maps prompt text -> response (IFEval's convention)."""
    missing = [p["prompt"] for p in prompts if p["prompt"] not in responses]
    if missing and not allow_missing:
        raise EvalInputError(f"{len(missing)} of {len(prompts)} IFEval prompts have no response "
                             f"(first: {missing[0][:80]!r}); responses are matched by exact prompt text")
    per = [check_prompt(p, responses[p["prompt"]]) for p in prompts if p["prompt"] in responses]
    if not per:
        raise EvalInputError("no IFEval prompt has a response")
    inst_s = [v for r in per for v in r["follow_instruction_list_strict"]]
    inst_l = [v for r in per for v in r["follow_instruction_list_loose"]]
    by_type: dict[str, list[int]] = {}
    for r in per:
        for iid, v in zip(r["instruction_id_list"], r["follow_instruction_list_loose"]):
            by_type.setdefault(iid, [0, 0])
            by_type[iid][0] += int(v)
            by_type[iid][1] += 1
    return {
        "prompt_level_strict_acc": sum(r["follow_all_instructions_strict"] for r in per) / len(per),
        "prompt_level_loose_acc": sum(r["follow_all_instructions_loose"] for r in per) / len(per),
        "inst_level_strict_acc": sum(inst_s) / len(inst_s),
        "inst_level_loose_acc": sum(inst_l) / len(inst_l),
        "num_prompts": len(per),
        "num_instructions": len(inst_s),
        "num_missing_responses": len(missing),
        "median_words": median_words(r["response"] for r in per),
        "inst_level_loose_acc_by_type": {k: c / n for k, (c, n) in sorted(by_type.items())},
        "reference": "IFEval (google-research instruction_following_eval; lm-eval 0.4.13 checkers)",
        "per_prompt": per,
    }


IFEVAL_KEYS = ("prompt", "instruction_id_list", "kwargs")


def read_ifeval_prompts(path: str | Path) -> list[dict]:
    """IFEval's input JSONL: `key, prompt, instruction_id_list, kwargs` (one kwargs dict per instruction)."""
    checkers = instruction_dict()  # one-line EvalInputError without the `eval` extra
    rows = read_jsonl(path, "IFEval prompts")
    for r in rows:
        where = f"{path}:{r['_line']}"
        missing = [k for k in IFEVAL_KEYS if k not in r]
        if missing:
            raise EvalInputError(f"{where}: IFEval record lacks {', '.join(missing)} "
                                 f"(needs key, prompt, instruction_id_list, kwargs)")
        ids, kwargs = r["instruction_id_list"], r["kwargs"]
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise EvalInputError(f"{where}: instruction_id_list and kwargs must be lists of equal length")
        for iid, kw in zip(ids, kwargs):
            if iid not in checkers:
                raise EvalInputError(f"{where}: unknown instruction id {iid!r}")
            if not isinstance(kw, dict):
                raise EvalInputError(f"{where}: kwargs for {iid} must be an object")
            # The reference picks *random* values for arguments it is not given: refuse instead.
            need = checkers[iid](iid).get_instruction_args_keys()
            # (the reference drops falsy values before building, so those count as missing too)
            lacking = [k for k in need if not kw.get(k)]
            if lacking:
                raise EvalInputError(f"{where}: {iid} needs kwargs {', '.join(lacking)}")
        r.setdefault("key", r["_line"])
    return rows
