"""Exact McNemar test against hand-computed binomial tails; the all-pairs table; median words."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from ds_cl.evaluation.stats import mcnemar, median_words, paired_table, sign_test


def _pairs(both, only_a, only_b, neither):
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_counts_and_p_for_zero_vs_five():
    a, b = _pairs(both=7, only_a=0, only_b=5, neither=3)
    r = mcnemar(a, b)
    assert r == {"n": 15, "both": 7, "only_a": 0, "only_b": 5, "neither": 3, "p_value": 0.0625}
    # 2 * C(5,0) / 2^5 = 2/32


def test_one_vs_nine():
    a, b = _pairs(both=2, only_a=1, only_b=9, neither=0)
    want = Fraction(2 * (comb(10, 0) + comb(10, 1)), 2 ** 10)       # 22/1024
    assert want == Fraction(11, 512)
    p = mcnemar(a, b)["p_value"]
    assert p == pytest.approx(0.021484375, abs=0) and p == float(want)
    # symmetric in which method is better
    assert mcnemar(b, a)["p_value"] == p and mcnemar(b, a)["only_a"] == 9


def test_balanced_discordance_caps_at_one_and_none_discordant_is_one():
    a, b = _pairs(both=1, only_a=3, only_b=3, neither=1)
    assert mcnemar(a, b)["p_value"] == 1.0           # 2 * 42/64 = 1.3125 -> capped
    a, b = _pairs(both=4, only_a=0, only_b=0, neither=2)
    assert mcnemar(a, b)["p_value"] == 1.0
    assert mcnemar([], [])["p_value"] == 1.0


def test_large_discordant_count_stays_exact():
    # 2 * sum_{k<=40} C(200,k) / 2^200, summed in integers and divided once
    a, b = _pairs(both=0, only_a=40, only_b=160, neither=0)
    want = Fraction(2 * sum(comb(200, k) for k in range(41)), 2 ** 200)
    assert mcnemar(a, b)["p_value"] == float(want)
    assert 0 < mcnemar(a, b)["p_value"] < 1e-15


def test_length_mismatch():
    with pytest.raises(ValueError, match="3 vs 2"):
        mcnemar([True, False, True], [True, False])


def test_paired_table_every_pair():
    per = {"seqft": [True, True, False, False, True],
           "osft": [True, False, False, True, True],
           "lora": [False, False, False, False, True]}
    rows = paired_table(per)
    assert [(r["a"], r["b"]) for r in rows] == [("seqft", "osft"), ("seqft", "lora"), ("osft", "lora")]
    assert {k: rows[0][k] for k in ("both", "only_a", "only_b", "neither")} == \
        {"both": 2, "only_a": 1, "only_b": 1, "neither": 1}
    assert rows[1]["only_a"] == 2 and rows[1]["only_b"] == 0 and rows[1]["p_value"] == 0.5   # 2 * 1/4
    with pytest.raises(ValueError, match="differ in length"):
        paired_table({"x": [True], "y": [True, False]})


def test_median_words():
    assert median_words(["one two three", "a", "", "four five six seven eight"]) == 2.0
    assert median_words(["a b", "c d e"]) == 2.5
    assert median_words([]) is None


def test_sign_test_counts_wins_losses_and_leaves_ties_out():
    r = sign_test([+3.0, +1.0, -2.0, +4.0, +0.5])
    assert r == {"n": 5, "wins": 4, "losses": 1, "ties": 0, "p_value": 0.375}  # 2 * (1 + 5) / 32
    assert sign_test([1.0] * 5)["p_value"] == 0.0625                            # 2 / 32
    r = sign_test([2.0, 0.0, -1.0])
    assert (r["wins"], r["losses"], r["ties"], r["p_value"]) == (1, 1, 1, 1.0)
    assert sign_test([0.0, 0.0])["p_value"] == 1.0 and sign_test([])["n"] == 0
