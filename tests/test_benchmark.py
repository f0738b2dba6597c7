"""`ds-cl benchmark`: run configs from a base config and a benchmark root, the comparison over seeds, and
an end-to-end run of two methods on the tiny LLaMA over task folders in the benchmark's layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ds_cl.tools.benchmark import checked_run_configs, compare, markdown, run_configs
from tests.dist_utils import REPO, cpu_env
from tests.fixtures import TINY_LLAMA, train_sentencepiece


def write_task(d: Path, records: list[dict], n_test: int = 1) -> None:
    """A task folder in the benchmark's layout: the last n_test records are the test split."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.json").write_text(json.dumps(records[:-n_test]))
    (d / "test.json").write_text(json.dumps(records[-n_test:]))
    (d / "labels.json").write_text(json.dumps(sorted({r["label"] for r in records})))


def summary(matrix):
    from ds_cl.evaluation.cl_metrics import summarize

    return {**summarize(matrix, None), "complete": True}


def test_run_configs_fill_method_seed_output_and_task_folders(tmp_path):
    base = {"tasks": [{"name": "a", "train": "SC/x"}, {"name": "b", "train": "/abs/y"}], "method": {"osft": {}}}
    runs = run_configs(base, tmp_path / "root", ["seqft", "osft"], [0, 1], tmp_path / "out")
    assert sorted(runs) == [("osft", 0), ("osft", 1), ("seqft", 0), ("seqft", 1)]
    c = runs[("osft", 1)]
    assert (c["method"]["name"], c["seed"], c["output_dir"]) == ("osft", 1, str(tmp_path / "out" / "osft_seed1"))
    assert [t["train"] for t in c["tasks"]] == [str(tmp_path / "root" / "SC" / "x"), "/abs/y"]
    assert base["tasks"][0]["train"] == "SC/x"  # the base is not changed


def test_variants_are_fragments_merged_into_the_base(tmp_path):
    base = {"tasks": [], "method": {"osft": {"rank": "fixed", "ratio": 0.5}}, "train": {"lr": 1e-5}}
    variants = {"osft-acc": {"method": {"name": "osft", "osft": {"subspace": "accumulate"}}, "train": {"lr": 2e-5}}}
    runs = run_configs(base, tmp_path, ["osft", "osft-acc"], [0], tmp_path / "out", variants)
    assert runs[("osft", 0)]["method"] == {"name": "osft", "osft": {"rank": "fixed", "ratio": 0.5}}
    acc = runs[("osft-acc", 0)]
    assert acc["method"] == {"name": "osft", "osft": {"rank": "fixed", "ratio": 0.5, "subspace": "accumulate"}}
    assert acc["train"]["lr"] == 2e-5 and acc["output_dir"] == str(tmp_path / "out" / "osft-acc_seed0")
    assert base["method"]["osft"] == {"rank": "fixed", "ratio": 0.5}


def test_compare_mean_and_spread_over_seeds():
    s = {("seqft", 0): summary([[0.8], [0.4, 0.9]]), ("seqft", 1): summary([[0.6], [0.2, 0.7]]),
         ("osft", 0): summary([[0.8], [0.8, 0.6]])}
    t = compare(s)
    assert t["seqft"]["seeds"] == [0, 1] and t["osft"]["seeds"] == [0]
    assert t["seqft"]["final"][0] == pytest.approx((30.0, 14.142), abs=1e-3)  # 40 and 20
    assert t["seqft"]["AA"][0] == pytest.approx(55.0) and t["seqft"]["BWT"][0] == pytest.approx(-40.0)
    assert t["seqft"]["learnt"][0] == pytest.approx(75.0)  # diagonals 85 and 65
    assert t["osft"]["BWT"] == pytest.approx((0.0, 0.0)) and t["osft"]["learnt"][0] == pytest.approx(70.0)
    md = markdown(t, ["a", "b"])
    assert "| `seqft` | 30.0 ± 14.1 | 80.0 ± 14.1 | 55.0 ± 14.1 | -40.0 ± 0.0 | 75.0 ± 14.1 | 0,1 |" in md


def test_compare_puts_a_second_order_in_the_first_orders_columns():
    """A variant that trains the same tasks in another order (seqft-rev) is compared task by task: its final
    accuracies are put in the base order by name, and its row says its order."""
    s = {("seqft", 0): {**summary([[0.8], [0.4, 0.9]]), "tasks": ["a", "b"]},
         ("seqft-rev", 0): {**summary([[0.7], [0.1, 0.6]]), "tasks": ["b", "a"]}}
    t = compare(s, ["a", "b"])
    assert [v for v, _ in t["seqft"]["final"]] == pytest.approx([40.0, 90.0]) and "order" not in t["seqft"]
    assert [v for v, _ in t["seqft-rev"]["final"]] == pytest.approx([60.0, 10.0])  # a was trained last
    assert t["seqft-rev"]["order"] == ["b", "a"] and t["seqft-rev"]["BWT"][0] == pytest.approx(-60.0)
    assert "| `seqft-rev` (b -> a) | 60.0 ± 0.0 | 10.0 ± 0.0 |" in markdown(t, ["a", "b"])


def test_compare_reports_the_tuning_aa_that_selects_the_lr():
    """Runs with a tuning split (eval.tuning_size): a `tuning AA` column (mean over seeds), said to select the
    learning rate; a method without one gets a dash, and a table without any is the one before."""
    from ds_cl.tools.benchmark import TUNING_NOTE, comparison_json

    def tuned(matrix, tuning):
        return {**summary(matrix), "tuning_matrix": tuning}

    s = {("osft-lr1", 0): tuned([[0.8], [0.8, 0.6]], [[0.9], [0.7, 0.5]]),
         ("osft-lr1", 1): tuned([[0.8], [0.6, 0.6]], [[0.9], [0.5, 0.5]]),
         ("seqft", 0): summary([[0.8], [0.4, 0.9]])}
    t = compare(s)
    assert t["osft-lr1"]["tuning_AA"] == pytest.approx((55.0, 7.071), abs=1e-3)  # 60 and 50
    assert t["osft-lr1"]["tuning_matrices"] == [[[0.9], [0.7, 0.5]], [[0.9], [0.5, 0.5]]]
    assert t["osft-lr1"]["AA"][0] == pytest.approx(65.0) and "tuning_AA" not in t["seqft"]
    md = markdown(t, ["a", "b"])
    assert "| method | a | b | AA | tuning AA | BWT | learnt (diag.) | seeds |" in md
    assert "| `osft-lr1` | 70.0 ± 14.1 | 60.0 ± 0.0 | 65.0 ± 7.1 | 55.0 ± 7.1 | -10.0 ± 14.1 | 70.0 ± 0.0 | 0,1 |" in md
    assert "| `seqft` | 40.0 ± 0.0 | 90.0 ± 0.0 | 65.0 ± 0.0 | – | -40.0 ± 0.0 | 85.0 ± 0.0 | 0 |" in md
    assert md.rstrip().endswith(TUNING_NOTE) and "pick each method's learning rate by it" in TUNING_NOTE
    assert comparison_json(t, ["a", "b"])["note"] == TUNING_NOTE
    plain = compare({k: v for k, v in s.items() if k[0] == "seqft"})
    assert "tuning" not in markdown(plain, ["a", "b"]) and "note" not in comparison_json(plain, ["a", "b"])


def test_compare_pairs_methods_seed_by_seed_with_a_sign_test():
    """AA differences paired by seed, for the seeds both methods ran; a method with one common seed is no pair."""
    from ds_cl.tools.benchmark import comparison_json, paired_seeds

    s = {("osft", 0): summary([[0.8], [0.8, 0.6]]), ("osft", 1): summary([[0.8], [0.6, 0.6]]),
         ("osft", 2): summary([[0.8], [0.2, 0.6]]),
         ("seqft", 0): summary([[0.8], [0.4, 0.9]]), ("seqft", 1): summary([[0.8], [0.2, 0.7]]),
         ("seqft", 2): summary([[0.8], [0.2, 0.6]]), ("seqft", 3): summary([[0.8], [0.2, 0.6]]),
         ("olora", 0): summary([[0.8], [0.8, 0.8]])}
    t = compare(s)
    (pair,) = paired_seeds(t)  # olora shares one seed with each: no pair
    assert (pair["a"], pair["b"], pair["seeds"]) == ("osft", "seqft", [0, 1, 2])
    assert pair["AA_diffs"] == pytest.approx([5.0, 15.0, 0.0])  # AA 70 / 60 / 40 against 65 / 45 / 40
    assert (pair["wins"], pair["losses"], pair["ties"], pair["p_value"]) == (2, 0, 1, 0.5)
    assert pair["mean_diff"] == pytest.approx(20 / 3)
    assert "| `osft` | `seqft` | 0,1,2 | +5.0, +15.0, +0.0 | +6.7 | 2 / 0 / 1 | 0.5 |" in markdown(t, ["a", "b"])
    assert comparison_json(t, ["a", "b"])["paired_by_seed"] == [pair]
    assert "paired by seed" not in markdown(compare({k: v for k, v in s.items() if k[0] != "osft"}), ["a", "b"])


@pytest.mark.distributed
def test_benchmark_end_to_end_two_methods(tmp_path):
    root = tmp_path / "bench"
    rows = [json.loads(line) for line in open(REPO / "tests" / "fixtures" / "task_a.jsonl")]
    for group, task, words in (("SC", "toy-a", None), ("TC", "toy-b", ("alpha", "beta"))):
        recs = [{"sentence": r["input"], "label": r["output"] if words is None else words[i % 2]}
                for i, r in enumerate(rows)]
        write_task(root / group / task, recs[:42], n_test=6)
    train_sentencepiece(tmp_path / "tok.model")
    base = {"deepspeed": {"zero_optimization": {"stage": 3}},
            "model": {"config": dict(TINY_LLAMA), "tokenizer": str(tmp_path / "tok.model"), "dtype": "float32"},
            "method": {"osft": {"rank": "fixed", "ratio": 0.5}},
            "train": {"lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 8, "max_seq_len": 96,
                      "max_steps_per_task": 2},
            "eval": {"batch_size": 8, "max_new_tokens": 3}, "output": {"export_each_task": False},
            "tasks": [{"name": "a", "train": "SC/toy-a"}, {"name": "b", "train": "TC/toy-b"}],
            "variants": {"osft-acc": {"method": {"name": "osft", "osft": {"subspace": "accumulate"}}}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ds_cl.cli", "benchmark", str(tmp_path / "base.yaml"), "--data", str(root),
           "--methods", "seqft,osft-acc", "--seeds", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "comparison.json").read_text())
    assert res["tasks"] == ["a", "b"] and list(res["methods"]) == ["seqft", "osft-acc"]
    assert all(len(r["matrices"][0]) == 2 for r in res["methods"].values())
    log = (out / "osft-acc_seed3.log").read_text()
    assert "phase 1: protected the update of a" in log, log[-2000:]
    assert (out / "comparison.png").stat().st_size > 10_000 and "| `osft-acc` |" in (out / "comparison.md").read_text()
    # Complete runs are read, not redone.
    again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("complete in") == 2, again.stdout[-2000:]
    # --report-only starts nothing: the table from what is complete, the missing runs named.
    only = subprocess.run(cmd[:-3] + ["3,4", "--out", str(out), "--report-only"], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=120)
    assert only.returncode == 0 and only.stdout.count("left out") == 2, only.stdout[-2000:]
    assert not (out / "seqft_seed4").exists()
    # Bad input fails before any run.
    bad = subprocess.run(cmd[:-6] + ["--methods", "lora", "--out", str(tmp_path / "o2")], cwd=REPO, env=cpu_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown method 'lora'" in bad.stderr and "osft-acc" in bad.stderr
    assert not (tmp_path / "o2").exists()
    # Overrides may follow the options, and reach every run config (here one that refuses them all).
    late = subprocess.run(cmd[:-1] + [str(tmp_path / "o3"), "train.lr=-1"], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=60)
    assert late.returncode == 2 and "train.lr" in late.stderr, late.stderr[-2000:]
    assert not (tmp_path / "o3").exists()


@pytest.mark.distributed
def test_tuning_split_scored_beside_the_test_items_and_kept_across_a_resume(tmp_path):
    """eval.tuning_size on task folders with a test.json: a tiny run on 2 CPU ranks, stopped after task 0 and
    resumed, writes `matrix` (the test items) and `tuning_matrix` (records held out of train.json), one row per
    task each, the resumed run keeping the row of task 0; the tuning records are not among what it trained on;
    `ds-cl benchmark --report-only` reports the tuning AA."""
    from ds_cl.training.config import load_config
    from ds_cl.training.data import IGNORE_INDEX, load_task, load_tokenizer
    from tests.reliability_utils import explain, run

    root = tmp_path / "bench"
    rows = [json.loads(line) for line in open(REPO / "tests" / "fixtures" / "task_a.jsonl")]
    for group, task, words in (("SC", "toy-a", None), ("TC", "toy-b", ("alpha", "beta"))):
        write_task(root / group / task, [{"sentence": r["input"], "label": r["output"] if words is None else words[i % 2]}
                                         for i, r in enumerate(rows[:42])], n_test=6)  # 36 train, 6 test
    train_sentencepiece(tmp_path / "tok.model")
    base = {"deepspeed": {"zero_optimization": {"stage": 3}},
            "model": {"config": dict(TINY_LLAMA), "tokenizer": str(tmp_path / "tok.model"), "dtype": "float32"},
            "train": {"lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 8, "max_seq_len": 96,
                      "max_steps_per_task": 2},
            "eval": {"batch_size": 8, "max_new_tokens": 3, "tuning_size": 4},
            "output": {"export_each_task": False, "plots": False},
            "tasks": [{"name": "a", "train": "SC/toy-a"}, {"name": "b", "train": "TC/toy-b"}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "out"
    cfg = run_configs(base, root, ["seqft"], [0], out)[("seqft", 0)]  # the folder `ds-cl benchmark` would use
    cfg["checkpoint"] = {"stop_after_steps": 3}  # task 0's 2 steps, then 1 of task 1
    config = tmp_path / "seqft_seed0.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["output_dir"])
    first = run(config)
    assert first.returncode == 0, explain(first)
    assert "task 0 (a): 32 samples" in first.stdout, explain(first)  # 36 records of train.json - 4 for tuning
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert not stopped["complete"] and len(stopped["matrix"]) == len(stopped["tuning_matrix"]) == 1
    second = run(config, "--resume", "checkpoint.stop_after_steps=null")
    assert second.returncode == 0, explain(second)
    summ = json.loads((run_dir / "summary.json").read_text())
    assert summ["complete"] and [len(r) for r in summ["matrix"]] == [len(r) for r in summ["tuning_matrix"]] == [1, 2]
    assert summ["tuning_matrix"][0] == stopped["tuning_matrix"][0]  # the resumed run kept task 0's row
    assert summ["tuning_AA"] == pytest.approx(sum(summ["tuning_matrix"][1]) / 2)
    assert json.loads((run_dir / "cl_matrix.json").read_text())["tuning_matrix"] == summ["tuning_matrix"]
    assert "tuning AA=" in second.stdout, explain(second)
    # Scored on the items each is about (rank 0's share of 2 ranks): 6 test items, 4 tuning records per task.
    preds = [json.loads(line) for line in (run_dir / "predictions_task_1.jsonl").read_text().splitlines()]
    tuning = [json.loads(line) for line in (run_dir / "predictions_task_1_tuning.jsonl").read_text().splitlines()]
    assert [p["task"] for p in preds] == ["a"] * 3 + ["b"] * 3 and [p["task"] for p in tuning] == ["a"] * 2 + ["b"] * 2
    # What the run trained on (its resolved config, loaded as the trainer loads it) leaves the tuning records out.
    run_cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(run_cfg.model.tokenizer)
    for i, tc in enumerate(run_cfg.tasks):
        td = load_task(tc, i, tok, run_cfg.train.max_seq_len, run_cfg.seed, run_cfg.eval.scoring,
                       tuning_size=run_cfg.eval.tuning_size)
        trained = {tuple(t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE_INDEX) for s in td.train}
        held = {tuple(p) for p in td.tuning.eval_prompts}
        assert (len(td.train), len(held), len(td.eval_prompts)) == (32, 4, 6) and not trained & held
        assert not held & {tuple(p) for p in td.eval_prompts}
    # The comparison: a tuning AA column, which selects.
    rep = subprocess.run([sys.executable, "-m", "ds_cl.cli", "benchmark", str(tmp_path / "base.yaml"), "--data",
                          str(root), "--methods", "seqft", "--seeds", "0", "--out", str(out), "--report-only"],
                         cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
    md = (out / "comparison.md").read_text()
    assert "| tuning AA |" in md and "pick each method's learning rate by it" in md
    res = json.loads((out / "comparison.json").read_text())["methods"]["seqft"]
    assert res["tuning_AA"] == pytest.approx([100 * summ["tuning_AA"], 0.0])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "benchmark").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_benchmark_configs_validate_for_every_method_and_variant(path, tmp_path):
    """configs/benchmark/*.yaml, checked as `ds-cl benchmark` checks them before the first run, over a benchmark
    root in the benchmark's layout (tiny folders written here), for every method and each named variant."""
    from ds_cl.methods import REGISTRY
    from ds_cl.training.config import read_yaml

    base = read_yaml(path)
    variants = base.get("variants") or {}
    # a variant may bring its own tasks (a probe's candidates, one variant each)
    for task in [t for c in (base, *variants.values()) for t in c.get("tasks", [])]:
        write_task(tmp_path / "bench" / task["train"], [{"sentence": f"s{i}", "label": "xy"[i % 2]} for i in range(9)])
    runs = checked_run_configs(base, tmp_path / "bench", [*REGISTRY, *variants], [0], tmp_path / "out",
                               source=str(path))
    for (label, _), cfg in runs.items():
        assert cfg["method"]["name"] == (variants[label]["method"]["name"] if label in variants else label)


def test_compare_pools_seeds_of_finished_runs_and_refuses_what_does_not_fit(tmp_path, capsys):
    from ds_cl.tools.compare import main as compare_main
    from ds_cl.training.outputs import write_results

    def run(name, matrix, tasks=("a", "b"), complete=True):
        d = tmp_path / name
        d.mkdir()
        method, seed = name.split("_seed")
        write_results(d, method, list(tasks), matrix, None, [1.0, 0.5], [1], complete, plots=False)
        (d / "config.yaml").write_text(yaml.safe_dump({"seed": int(seed), "method": {"name": method}}))
        return str(d)

    runs = [run("seqft_seed0", [[0.8], [0.2, 0.9]]), run("seqft_seed1", [[0.6], [0.4, 0.7]]),
            run("osft_seed0", [[0.8], [0.8, 0.9]])]
    assert compare_main(runs + ["--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(res["methods"]) == ["seqft", "osft"] and res["methods"]["seqft"]["seeds"] == [0, 1]
    assert res["methods"]["seqft"]["final"][0][0] == pytest.approx(30.0)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    for bad, needle in ((run("half_seed0", [[0.5]], complete=False), "not complete"),
                        (run("other_seed0", [[0.5], [0.5, 0.5]], tasks=("a", "c")), "differ")):
        assert compare_main(runs + [bad, "--out", str(tmp_path / "x")]) == 2
        assert needle in capsys.readouterr().err
    # the same tasks in another order are compared task by task, in the first run's order
    assert compare_main(runs + [run("rev_seed0", [[0.7], [0.1, 0.6]], tasks=("b", "a")), "--out", str(tmp_path / "r")]) == 0
    rev = json.loads((tmp_path / "r" / "comparison.json").read_text())["methods"]["rev"]
    assert rev["order"] == ["b", "a"] and [v for v, _ in rev["final"]] == pytest.approx([60.0, 10.0])


def test_compare_reads_seed_and_method_from_each_runs_config(tmp_path, capsys):
    """Not from the folder name: runs in folders named anyhow pool by method with their real seeds, and two
    runs of one method and seed are refused, whatever their folders are called."""
    from ds_cl.tools.compare import main as compare_main
    from ds_cl.training.outputs import write_results

    def run(folder, method, seed, matrix):
        d = tmp_path / folder
        d.mkdir(parents=True)
        write_results(d, method, ["a", "b"], matrix, None, [1.0], [1], True, plots=False)
        (d / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(d), "seed": seed, "method": {"name": method}}))
        return str(d)

    runs = [run("monday/run", "osft", 3, [[0.8], [0.8, 0.9]]), run("tuesday/run", "osft", 5, [[0.6], [0.6, 0.7]]),
            run("old_seed0", "seqft", 7, [[0.8], [0.2, 0.9]])]
    assert compare_main(runs + ["--label-by", "method", "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "comparison.json").read_text())["methods"]
    assert (res["osft"]["seeds"], res["seqft"]["seeds"]) == ([3, 5], [7])
    assert compare_main(runs + ["--out", str(tmp_path / "f")]) == 0  # by folder name: each folder its own row
    res = json.loads((tmp_path / "f" / "comparison.json").read_text())["methods"]
    assert {k: v["seeds"] for k, v in res.items()} == {"run": [3, 5], "old": [7]}
    again = run("wednesday/run", "osft", 3, [[0.5], [0.5, 0.5]])
    assert compare_main(runs + [again, "--label-by", "method", "--out", str(tmp_path / "x")]) == 2
    assert "a second run of 'osft' with seed 3" in capsys.readouterr().err
    (tmp_path / "tuesday" / "run" / "config.yaml").unlink()
    assert compare_main(runs + ["--out", str(tmp_path / "x")]) == 2
    assert "tuesday/run: no config.yaml" in capsys.readouterr().err


def test_readme_benchmark_table_is_what_compare_makes_of_the_committed_runs():
    """The README's headline table must be rebuilt from the per-run summaries committed beside it, not edited by
    hand: the runs named in the committed comparison.json, passed through `compare` and `markdown` again, give
    comparison.md byte for byte, and the README's bench-table block is that file. A run added or rerun without
    regenerating the table (or a number typed into it) fails here."""
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- bench-table: (\S+) -->\n(.*?)\n<!-- /bench-table -->", readme, re.S)
    assert block, "README.md has no bench-table block"
    results = REPO / Path(block.group(1)).parent
    committed = json.loads((results / "comparison.json").read_text())
    summaries = {(m, s): json.loads((results / f"{m}_seed{s}" / "summary.json").read_text())
                 for m, r in committed["methods"].items() for s in r["seeds"]}
    rebuilt = markdown(compare(summaries, committed["tasks"]), committed["tasks"])
    assert rebuilt == (REPO / block.group(1)).read_text()
    assert block.group(2).strip() == rebuilt.strip()
