"""Reading and writing the evaluation files, with one-line errors that name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from ds_cl.training.records import decode_utf8, parse_jsonl


class EvalInputError(ValueError):
    """Bad user input (missing file, malformed line, unknown suite): reported as one line."""


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise EvalInputError(f"{what} path is a directory, expected a file: {p}")
    return p


def read_jsonl(path: str | Path, what: str = "JSONL") -> list[dict]:
    p = _existing(path, what)
    rows = []
    for n, obj in parse_jsonl(decode_utf8(p.read_bytes(), str(p), EvalInputError), str(p), EvalInputError):
        obj["_line"] = n
        rows.append(obj)
    if not rows:
        raise EvalInputError(f"{p}: no records")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path, what: str = "JSON") -> Any:
    p = _existing(path, what)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None


# ---------------------------------------------------------------- responses



def read_responses(path: str | Path) -> dict[str, str]:
    """Responses JSONL `{"prompt", "response"}` (IFEval's convention) as prompt -> response."""
    out: dict[str, str] = {}
    for r in read_jsonl(path, "responses"):
        if "prompt" not in r or "response" not in r:
            raise EvalInputError(f"{path}:{r['_line']}: responses record needs 'prompt' and 'response'")
        if not isinstance(r["response"], str):
            raise EvalInputError(f"{path}:{r['_line']}: 'response' must be a string")
        out[r["prompt"]] = r["response"]
    return out


# ---------------------------------------------------------------- safety prompts

_PROMPT_COLUMNS = ("prompt", "Behavior", "behavior", "goal", "question", "text", "instruction")


def read_safety_prompts(path: str | Path) -> list[dict]:
    """Harmful prompts from .txt (one a line), .csv (HarmBench `Behavior`, AdvBench `goal`, or `prompt`)
    or .jsonl (same column names; Do-Not-Answer's `question`). Returns [{"id", "prompt", ...}]."""
    p = _existing(path, "safety prompts")
    suffix = p.suffix.lower()
    rows: list[dict] = []
    if suffix == ".txt":
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append({"id": str(n), "prompt": line.strip()})
    elif suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            col = next((c for c in _PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
            if col is None:
                raise EvalInputError(f"{p}:1: no prompt column; expected one of {', '.join(_PROMPT_COLUMNS)}")
            for n, rec in enumerate(reader, 2):
                if (rec.get(col) or "").strip():
                    rows.append({"id": rec.get("BehaviorID") or rec.get("id") or str(n),
                                 "prompt": rec[col].strip(),
                                 "category": rec.get("SemanticCategory") or rec.get("category")})
    elif suffix in (".jsonl", ".json"):
        for rec in read_jsonl(p, "safety prompts"):
            col = next((c for c in _PROMPT_COLUMNS if isinstance(rec.get(c), str)), None)
            if col is None:
                raise EvalInputError(f"{p}:{rec['_line']}: no prompt field; expected one of {', '.join(_PROMPT_COLUMNS)}")
            rows.append({"id": str(rec.get("id", rec["_line"])), "prompt": rec[col].strip(),
                         "category": rec.get("category") or rec.get("risk_area")})
    else:
        raise EvalInputError(f"{p}: unsupported safety prompt format {suffix or '(none)'}; use .txt, .csv or .jsonl")
    if not rows:
        raise EvalInputError(f"{p}: no prompts")
    return rows
