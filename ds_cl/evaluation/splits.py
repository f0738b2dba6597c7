"""Stratified halves and subsets of IFEval prompts.

Tuning decisions (learning rate, epochs, decoding length) made on the same prompts that are
later reported overstate the result, so the IFEval prompts are split once into a tuning half
and a reporting half. The split is stratified by instruction type, the record's first
`instruction_id_list` entry, so that both halves test the same mix of instructions.

Order within a stratum comes from `random.Random(f"{seed}:{stratum}")`: string seeds are
hashed with SHA-512 (seeding version 2) and `shuffle` draws from `getrandbits`, so the
order is the same on every CPython 3 version and platform, and one stratum's order does
not depend on which other strata the file has. Outputs keep the records in file order.
"""

from __future__ import annotations

import random
from typing import Sequence

from .io import EvalInputError, read_jsonl


def stratum(record: dict) -> str:
    ids = record.get("instruction_id_list") or []
    return str(ids[0]) if ids else "(none)"


def _by_stratum(records: Sequence[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(stratum(r), []).append(i)
    return {s: groups[s] for s in sorted(groups)}


def _shuffled(indices: list[int], seed: int | str, salt: str) -> list[int]:
    out = list(indices)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def stratified_split(records: Sequence[dict], seed: int | str = 0) -> tuple[list[dict], list[dict]]:
    """(tuning, reporting): each stratum shuffled with its own seeded generator, then dealt
    alternately to the two halves, so a stratum's halves differ by at most one record. The odd
    record of an odd-sized stratum goes to tuning and reporting in turn (strata in a seeded
    order), so the halves differ in size by at most one overall."""
    groups = _by_stratum(records)
    odd = _shuffled([k for k, s in enumerate(groups) if len(groups[s]) % 2], seed, "odd-strata")
    # the k-th odd stratum (in seeded order) gives its extra record to tuning if k is even
    extra_to_tuning = {k: j % 2 == 0 for j, k in enumerate(odd)}
    tuning: list[int] = []
    for k, (s, idx) in enumerate(groups.items()):
        order = _shuffled(idx, seed, s)
        # dealing starts with the half that should get the extra record
        first = order[0::2] if extra_to_tuning.get(k, True) else order[1::2]
        tuning.extend(first)
    chosen = set(tuning)
    return ([r for i, r in enumerate(records) if i in chosen],
            [r for i, r in enumerate(records) if i not in chosen])


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Largest-remainder (Hamilton) allocation of n over strata of the given sizes: each stratum
    gets floor(n * size / total), and the seats left go to the largest remainders (ties: larger
    stratum, then stratum name). Exact integer arithmetic."""
    total = sum(sizes.values())
    quota = {s: n * c // total for s, c in sizes.items()}
    left = n - sum(quota.values())
    for s in sorted(sizes, key=lambda s: (-(n * sizes[s] % total), -sizes[s], s))[:left]:
        quota[s] += 1
    return quota


def stratified_subset(records: Sequence[dict], n: int, seed: int | str = 0) -> list[dict]:
    """n records, each stratum contributing in proportion to its size (largest remainder);
    within a stratum the first of a seeded shuffle. Deterministic; file order kept."""
    if not 0 < n <= len(records):
        raise EvalInputError(f"subset size {n} must be between 1 and the number of records ({len(records)})")
    groups = _by_stratum(records)
    quota = allocate({s: len(idx) for s, idx in groups.items()}, n)
    chosen = {i for s, idx in groups.items() for i in _shuffled(idx, seed, f"subset:{s}")[:quota[s]]}
    return [r for i, r in enumerate(records) if i in chosen]


def stratum_counts(records: Sequence[dict]) -> dict[str, int]:
    return {s: len(idx) for s, idx in _by_stratum(records).items()}


def read_records(path) -> list[dict]:
    """IFEval-format records for splitting: only `prompt` and `instruction_id_list` are needed
    (the checkers are not, so splitting works without the `eval` extra); scoring checks the rest."""
    rows = read_jsonl(path, "IFEval prompts")
    for r in rows:
        ids = r.get("instruction_id_list")
        if "prompt" not in r or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise EvalInputError(f"{path}:{r['_line']}: IFEval record needs 'prompt' and an "
                                 f"'instruction_id_list' of strings")
    return rows
