"""Stratified tuning/reporting halves and subsets of IFEval-format prompts, and `ds-cl score split`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from ds_cl.evaluation import score_cli
from ds_cl.evaluation.io import EvalInputError, write_jsonl
from ds_cl.evaluation.splits import allocate, stratified_split, stratified_subset, stratum

# Stratum sizes with several odd ones (7, 5, 3, 1, 1) so the overall balancing matters.
SIZES = {"punctuation:no_comma": 7, "detectable_format:title": 6, "keywords:existence": 5,
         "change_case:english_lowercase": 4, "startend:quotation": 3, "length_constraints:number_words": 1,
         "detectable_format:json_format": 1, "language:response_language": 2}


def make_records(sizes=SIZES) -> list[dict]:
    """Made-up prompts in IFEval's format, strata interleaved so file order is not stratum order."""
    pools = {s: n for s, n in sizes.items()}
    out, key = [], 100
    while any(pools.values()):
        for s in sizes:
            if pools[s]:
                pools[s] -= 1
                key += 1
                extra = ["punctuation:no_comma"] if key % 4 == 0 and s != "punctuation:no_comma" else []
                out.append({"key": key, "prompt": f"Made-up request number {key} about {s.split(':')[1]}.",
                            "instruction_id_list": [s] + extra, "kwargs": [{} for _ in [s] + extra]})
    return out


def keys(rows):
    return [r["key"] for r in rows]


def test_stratum_is_the_first_instruction():
    assert stratum({"instruction_id_list": ["a:b", "c:d"]}) == "a:b"
    assert stratum({"instruction_id_list": []}) == "(none)"


@pytest.mark.parametrize("seed", [0, 1, 7, "x"])
def test_split_disjoint_complete_balanced(seed):
    recs = make_records()
    tuning, reporting = stratified_split(recs, seed=seed)
    assert not set(keys(tuning)) & set(keys(reporting))
    assert sorted(keys(tuning) + keys(reporting)) == sorted(keys(recs))
    assert abs(len(tuning) - len(reporting)) <= 1                    # 29 records: 15 / 14 or 14 / 15
    ct, cr = Counter(map(stratum, tuning)), Counter(map(stratum, reporting))
    for s, n in SIZES.items():
        assert ct[s] + cr[s] == n and abs(ct[s] - cr[s]) <= 1, (s, ct[s], cr[s])
    # file order kept
    pos = {k: i for i, k in enumerate(keys(recs))}
    assert [pos[k] for k in keys(tuning)] == sorted(pos[k] for k in keys(tuning))
    assert [pos[k] for k in keys(reporting)] == sorted(pos[k] for k in keys(reporting))


def test_split_balances_many_odd_strata():
    # ten strata of 1 record: a per-stratum rule alone would put all ten in one half
    recs = make_records({f"t:s{i}": 1 for i in range(10)})
    tuning, reporting = stratified_split(recs)
    assert len(tuning) == len(reporting) == 5


def test_split_deterministic_and_seed_dependent():
    recs = make_records()
    a = stratified_split(recs, seed=3)
    assert stratified_split(make_records(), seed=3) == a
    assert any(stratified_split(recs, seed=s)[0] != a[0] for s in range(6))
    # one stratum's order does not depend on the other strata in the file
    only = [r for r in recs if stratum(r) == "punctuation:no_comma"]
    want = [k for k in keys(a[0]) if k in set(keys(only))]
    got_t, got_r = stratified_split(only, seed=3)
    assert sorted(keys(got_t) + keys(got_r)) == sorted(keys(only))
    assert set(want) in (set(keys(got_t)), set(keys(got_r)))


def test_allocate_largest_remainder():
    # quotas 10*5/12=4.17, 10*4/12=3.33, 10*3/12=2.5: floors 4,3,2 (9), the one seat left -> c (.5)
    assert allocate({"a": 5, "b": 4, "c": 3}, 10) == {"a": 4, "b": 3, "c": 3}
    assert sum(allocate(SIZES, 11).values()) == 11
    assert allocate({"a": 1, "b": 1}, 1) == {"a": 1, "b": 0}           # tie: by name


def test_subset_proportional_deterministic_ordered():
    recs = make_records()
    sub = stratified_subset(recs, 10, seed=0)
    assert len(sub) == 10 and sub == stratified_subset(make_records(), 10, seed=0)
    counts = Counter(map(stratum, sub))
    assert dict(counts) == {s: c for s, c in allocate(SIZES, 10).items() if c}
    for s, n in SIZES.items():                                        # within one of the exact share
        assert abs(counts[s] - 10 * n / 29) < 1
    pos = {k: i for i, k in enumerate(keys(recs))}
    assert [pos[k] for k in keys(sub)] == sorted(pos[k] for k in keys(sub))
    assert stratified_subset(recs, 29) == recs
    with pytest.raises(EvalInputError, match="between 1 and"):
        stratified_subset(recs, 30)


def test_score_split_end_to_end(tmp_path, capsys):
    src = tmp_path / "ifeval_made_up.jsonl"
    write_jsonl(src, make_records())
    out = tmp_path / "split"
    assert score_cli.main(["split", "--prompts", str(src), "--out", str(out), "--seed", "5",
                           "--report-n", "6", "--tune-n", "4"]) == 0
    read = {n: [json.loads(x) for x in (out / n).read_text().splitlines()]
            for n in ("tuning.jsonl", "reporting.jsonl", "reporting_6.jsonl", "tuning_4.jsonl")}
    tuning, reporting = stratified_split(make_records(), seed=5)
    assert f"tuning.jsonl={len(tuning)} reporting.jsonl={len(reporting)} tuning_4.jsonl=4 reporting_6.jsonl=6 " \
           f"(8 strata, seed 5)" in capsys.readouterr().out
    assert read["tuning.jsonl"] == tuning and read["reporting.jsonl"] == reporting   # records unchanged
    assert read["reporting_6.jsonl"] == stratified_subset(reporting, 6, seed=5)
    assert set(keys(read["tuning_4.jsonl"])) <= set(keys(tuning))
    assert set(keys(read["reporting_6.jsonl"])) <= set(keys(reporting))
    meta = json.loads((out / "split.json").read_text())
    assert meta["seed"] == 5 and meta["num_records"] == 29
    assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and meta["source"].endswith(src.name)
    assert set(meta["files"]) == {"tuning.jsonl", "reporting.jsonl", "reporting_6.jsonl", "tuning_4.jsonl"}
    for name, rows in read.items():
        assert meta["files"][name]["n"] == len(rows)
        assert meta["files"][name]["by_stratum"] == dict(sorted(Counter(map(stratum, rows)).items()))


def test_score_split_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"key": 1, "prompt": "Made up.", "instruction_id_list": ["a:b"], "kwargs": [{}]}\n'
                   '{"key": 2, "prompt": "Made up too."}\n')
    assert score_cli.main(["split", "--prompts", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "p.jsonl:2: IFEval record needs 'prompt' and an 'instruction_id_list'" in err
    write_jsonl(src, make_records())
    assert score_cli.main(["split", "--prompts", str(src), "--out", str(tmp_path / "o"), "--report-n", "15"]) == 2
    assert "--report-n 15: must be between 1 and the reporting half's 14 prompts" in capsys.readouterr().err
