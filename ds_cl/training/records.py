"""Record files (UTF-8 text, JSONL) read with one-line errors naming the file and line: shared by the
task data (`ds_cl.training.data`) and the evaluation suites (`ds_cl.evaluation.io`)."""

from __future__ import annotations

import json


def decode_utf8(raw: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """Text of a file's bytes (a UTF-8 BOM is dropped); `where` prefixes the error, e.g. 'key: path'."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{where}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                    "re-encode the file as UTF-8") from None


def check_objects(items: list, where: str, error: type[Exception] = ValueError) -> list[dict]:
    """`items` (a JSON array of records) when each is a JSON object; else the first that is not, named."""
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            shown = repr(item) if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            kind = "null" if item is None else type(item).__name__
            raise error(f"{where}: item {i} of {len(items)} is a {kind} ({shown}), not a JSON object "
                        "(each item of the array is one record)")
    return items


def parse_jsonl(text: str, where: str, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    if text.lstrip().startswith("["):
        # A .json file's content under a .jsonl name: its first line "[" would be reported as malformed.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            raise error(f"{where} holds one JSON array of {len(whole)} items, not one JSON object per line (JSON "
                        "Lines): name the file .json, or write one object per line")
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{n}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((n, row))
    return rows
