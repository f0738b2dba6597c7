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


def read_safety_prompts(path: str | Path, what: str = "safety prompts") -> list[dict]:
    """Prompts from .txt (one a line), .csv (HarmBench `Behavior`, AdvBench `goal`, or `prompt`),
    .jsonl (same column names; Do-Not-Answer's `question`) or .json (Safety-Tuned LLaMAs'
    `{"instructions": [...], "tags": [...]}`, or an Alpaca-style list of `{"instruction", "input"}`).
    Returns [{"id", "prompt", "category"}]."""
    p = _existing(path, what)
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
    elif suffix == ".json" and (doc := _json_document(p)) is not None:
        rows = _json_prompts(p, doc)
    elif suffix in (".jsonl", ".json"):   # a .json of JSON lines reads as before
        for rec in read_jsonl(p, what):
            col = next((c for c in _PROMPT_COLUMNS if isinstance(rec.get(c), str)), None)
            if col is None:
                raise EvalInputError(f"{p}:{rec['_line']}: no prompt field; expected one of {', '.join(_PROMPT_COLUMNS)}")
            rows.append({"id": str(rec.get("id", rec["_line"])), "prompt": rec[col].strip(),
                         "category": rec.get("category") or rec.get("risk_area")})
    else:
        raise EvalInputError(f"{p}: unsupported safety prompt format {suffix or '(none)'}; "
                             f"use .txt, .csv, .jsonl or .json")
    if not rows:
        raise EvalInputError(f"{p}: no prompts")
    return rows


_JSON_SHAPES = "a .json safety file holds {'instructions': [...]} or a list of objects with 'instruction'"


def _json_document(p: Path) -> Any:
    """The file as one JSON document, or None when it is JSON lines (several documents)."""
    text = decode_utf8(p.read_bytes(), str(p), EvalInputError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return None
        raise EvalInputError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None


def _json_prompts(p: Path, doc: Any) -> list[dict]:
    rows = []
    if isinstance(doc, dict) and isinstance(doc.get("instructions"), list):
        # Safety-Tuned LLaMAs (Bianchi et al. 2024): I-MaliciousInstructions.json, I-CoNa.json, ...
        instructions, tags = doc["instructions"], doc.get("tags")
        if tags is not None and (not isinstance(tags, list) or len(tags) != len(instructions)):
            n = len(tags) if isinstance(tags, list) else type(tags).__name__
            raise EvalInputError(f"{p}: 'tags' must be a list parallel to 'instructions' "
                                 f"({n} tags for {len(instructions)} instructions)")
        for i, text in enumerate(instructions):
            if not isinstance(text, str):
                raise EvalInputError(f"{p}: instructions[{i}] is {type(text).__name__}, expected a string")
            tag = tags[i] if tags is not None else None
            if isinstance(tag, list):   # a list of categories: the first names the prompt's category
                tag = tag[0] if tag else None
            if text.strip():
                rows.append({"id": str(i + 1), "prompt": text.strip(),
                             "category": None if tag is None else str(tag)})
        return rows
    if isinstance(doc, list) and doc and all(isinstance(r, dict) and "instruction" in r for r in doc):
        for i, rec in enumerate(doc):
            text, extra = rec["instruction"], rec.get("input") or ""
            if not isinstance(text, str) or not isinstance(extra, str):
                raise EvalInputError(f"{p}: item {i}: 'instruction' and 'input' must be strings")
            # Alpaca's prompt puts the input after the instruction as its own paragraph
            prompt = text.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
            if prompt:
                rows.append({"id": str(rec.get("id", i + 1)), "prompt": prompt, "category": rec.get("category")})
        return rows
    raise EvalInputError(f"{p}: unsupported JSON layout; {_JSON_SHAPES}")


def read_prompt_sets(paths: str | Path | Iterable[str | Path], what: str = "safety") -> list[dict]:
    """`read_safety_prompts` of one or several files, each prompt tagged with its file's name stem
    as `set` (so I-CoNa.json's prompts are set `I-CoNa`), in file order."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    seen: dict[str, Path] = {}
    rows: list[dict] = []
    for path in paths:
        p = Path(path)
        if p.stem in seen:
            raise EvalInputError(f"{what} files {seen[p.stem]} and {p} share the set name {p.stem!r}; rename one")
        seen[p.stem] = p
        rows += [r | {"set": p.stem} for r in read_safety_prompts(p, f"{what} prompts")]
    return rows
