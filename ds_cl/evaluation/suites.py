"""Evaluation suites: a YAML file naming the parts to run (`ifeval`, `safety`, `benign`, `lm_eval`).

`--suite` accepts a shipped suite name (a file `eval/suites/NAME.yaml` of the repo checkout),
a path to a suite YAML, or a single prompt file (IFEval JSONL, or a safety .txt/.csv/.jsonl/.json).
Paths inside a suite YAML are relative to that YAML; `safety` and `benign` take one file or a
list of files (each file's name stem becomes the `set` of its prompts). `DS_CL_EVAL_DIR`
overrides where the shipped `eval/` folder is looked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from .io import EvalInputError


def eval_dir() -> Path:
    env = os.environ.get("DS_CL_EVAL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "eval"   # repo root (editable install)


def shipped_suites() -> list[str]:
    d = eval_dir() / "suites"
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


@dataclasses.dataclass
class Suite:
    name: str
    ifeval: Path | None = None
    safety: Path | list[Path] | None = None    # one file, or a list as the YAML gave it
    benign: Path | list[Path] | None = None    # harmless prompts: over-refusal (compliance rate)
    # {"tasks": [...], "limit": N, "num_fewshot": k, "batch_size": b, "include_path": [dirs]}
    lm_eval: dict | None = None


KEYS = ("ifeval", "safety", "benign", "lm_eval")


def files_of(value: Path | list[Path] | None) -> list[Path]:
    """A suite's `safety` / `benign` entry as a list of files."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _from_yaml(path: Path) -> Suite:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise EvalInputError(f"{path}: malformed suite YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise EvalInputError(f"{path}: a suite is a mapping with keys {', '.join(KEYS)}")
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise EvalInputError(f"{path}: unknown suite keys {sorted(unknown)} (known: {', '.join(KEYS)})")
    suite = Suite(name=path.stem)
    for key in ("ifeval", "safety", "benign"):
        if spec.get(key):
            many = isinstance(spec[key], list)
            if many and key == "ifeval":
                raise EvalInputError(f"{path}: ifeval takes one file, not a list")
            files = []
            for f in (spec[key] if many else [spec[key]]):
                if not isinstance(f, str):
                    raise EvalInputError(f"{path}: {key} must be a file path or a list of file paths")
                p = Path(f)
                p = p if p.is_absolute() else (path.parent / p).resolve()
                if not p.is_file():
                    raise EvalInputError(f"{path}: {key} file not found: {p}")
                files.append(p)
            setattr(suite, key, files if many else files[0])
    if spec.get("lm_eval"):
        le = spec["lm_eval"]
        if not isinstance(le, dict) or not le.get("tasks"):
            raise EvalInputError(f"{path}: lm_eval needs a 'tasks' list")
        suite.lm_eval = dict(le)
        if le.get("include_path"):   # lm-eval task YAML folder(s), relative to this suite YAML
            inc = le["include_path"] if isinstance(le["include_path"], list) else [le["include_path"]]
            dirs = [p if p.is_absolute() else (path.parent / p).resolve() for p in map(Path, inc)]
            missing = [str(d) for d in dirs if not d.exists()]
            if missing:
                raise EvalInputError(f"{path}: lm_eval include_path not found: {', '.join(missing)}")
            suite.lm_eval["include_path"] = [str(d) for d in dirs]
    if not (suite.ifeval or suite.safety or suite.benign or suite.lm_eval):
        raise EvalInputError(f"{path}: suite names nothing to run")
    return suite


def _sniff_jsonl(path: Path) -> str:
    if path.suffix == ".json":
        # a whole JSON document (Safety-Tuned LLaMAs' {"instructions": [...]}, an Alpaca list)
        # is a safety file; a .json of JSON lines is sniffed by its first line, as a .jsonl
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if doc is not None:
            return "ifeval" if isinstance(doc, dict) and "instruction_id_list" in doc else "safety"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalInputError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                return "ifeval" if isinstance(obj, dict) and "instruction_id_list" in obj else "safety"
    raise EvalInputError(f"{path}: empty file")


def resolve_suite(spec: str) -> Suite:
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise EvalInputError(f"suite file not found: {p}")
        return _from_yaml(p)
    if p.suffix in (".jsonl", ".json", ".txt", ".csv"):
        if not p.is_file():
            raise EvalInputError(f"suite file not found: {p}")
        kind = _sniff_jsonl(p) if p.suffix in (".jsonl", ".json") else "safety"
        return Suite(name=p.stem, **{kind: p.resolve()})
    shipped = eval_dir() / "suites" / f"{spec}.yaml"
    if shipped.is_file():
        return _from_yaml(shipped)
    names = ", ".join(shipped_suites()) or f"none found under {eval_dir()}"
    raise EvalInputError(f"unknown suite {spec!r}: give a suite YAML, a prompt file, or a shipped name ({names})")
