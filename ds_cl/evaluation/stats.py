"""Paired comparison of two methods on the same prompts, and answer-length summaries.

`mcnemar` is the exact (binomial) McNemar test: only the discordant pairs carry information
about which method is better, and under "no difference" each discordant pair goes either way
with probability 1/2. With the few hundred prompts of a retention suite, the chi-square
approximation is poor when the discordant count is small, so the exact tail is computed with
integer binomial coefficients (no scipy).
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Iterable, Mapping, Sequence


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of paired outcomes `a[i]`, `b[i]` (e.g. prompt i followed by
    method A / method B). Returns n, both, only_a, only_b, neither and p_value, where
    p = min(1, 2 * sum_{k <= min(only_a, only_b)} C(m, k) / 2^m) with m = only_a + only_b,
    and p = 1.0 when no pair is discordant."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    both = only_a = only_b = neither = 0
    for x, y in zip(a, b):
        x, y = bool(x), bool(y)
        both += x and y
        only_a += x and not y
        only_b += y and not x
        neither += not x and not y
    return {"n": len(a), "both": both, "only_a": only_a, "only_b": only_b, "neither": neither,
            "p_value": _two_sided_binomial(only_a, only_b)}


def _two_sided_binomial(x: int, y: int) -> float:
    """Exact two-sided p of x against y outcomes when each goes either way with probability 1/2:
    min(1, 2 * sum_{k <= min(x, y)} C(x + y, k) / 2^(x + y)); 1.0 when there are none."""
    m = x + y
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(x, y) + 1))
    # int / int is correctly rounded in Python even when 2**m is far beyond float range
    return min(1.0, 2 * tail / 2 ** m)


def sign_test(diffs: Iterable[float]) -> dict:
    """Exact two-sided sign test of paired differences (e.g. method A's AA minus method B's, one per seed):
    wins (> 0), losses (< 0) and ties; ties carry no information about which is better and are left out,
    as in McNemar's test, which is the same binomial tail on the discordant pairs."""
    diffs = list(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"n": len(diffs), "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses,
            "p_value": _two_sided_binomial(wins, losses)}


def paired_table(per_method: Mapping[str, Sequence[bool]]) -> list[dict]:
    """`mcnemar` for every pair of methods, in the mapping's order: [{"a", "b", n, both, ...}]."""
    names = list(per_method)
    lengths = {len(per_method[n]) for n in names}
    if len(lengths) > 1:
        raise ValueError("paired outcomes differ in length: "
                         + ", ".join(f"{n}={len(per_method[n])}" for n in names))
    return [{"a": x, "b": y, **mcnemar(per_method[x], per_method[y])} for x, y in itertools.combinations(names, 2)]


def median_words(texts: Iterable[str]) -> float | None:
    """Median answer length in whitespace-separated words (None for no answers). A shift in
    length explains many score moves (a shorter answer trips fewer IFEval checks, a one-line
    answer reads as a refusal), so the summaries carry it next to the scores."""
    counts = [len(t.split()) for t in texts]
    return float(statistics.median(counts)) if counts else None
