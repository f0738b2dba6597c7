"""General ability through lm-evaluation-harness, end to end and offline.

A custom lm-eval task (a YAML in a tmp folder, `include_path`) reads a local JSONL file; `ds-cl eval`
runs it on the tiny random Llama of test_eval_generate. lm-eval is in the `test` extra and is
imported unconditionally: without it this module fails instead of skipping.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval  # noqa: F401  (the test extra installs it; never skip)
import pytest

from ds_cl.evaluation.cli import main
from tests.test_eval_generate import make_tiny_model

# Every question appears once per choice, with the answer set to that choice: whatever the model
# prefers, exactly one of a question's copies is right, so acc and acc_norm are exactly 1/3.
QUESTIONS = [("What is two plus three?", ["five", "six", "seven"]),
             ("Which colour is the sky on a clear day?", ["blue", "green", "red"])]
ITEMS = [{"question": q, "choices": c, "answer": i} for q, c in QUESTIONS for i in range(len(c))]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("general")
    model = make_tiny_model(d / "model")
    tasks = d / "suite" / "tasks"
    tasks.mkdir(parents=True)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    cache = d / "hf_datasets_cache"   # keep the datasets cache out of ~/.cache
    (tasks / "mc.yaml").write_text(TASK.format(name="dscl_tiny_mc", data=data, cache=cache))
    (tasks / "missing.yaml").write_text(TASK.format(name="dscl_tiny_missing", data=d / "no_such.jsonl",
                                                    cache=cache))
    return model, d / "suite"


def _suite(suite_dir: Path, name: str, body: str) -> Path:
    p = suite_dir / f"{name}.yaml"
    p.write_text(body)
    return p


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_custom_task_end_to_end(setup, tmp_path):
    model, suite_dir = setup
    # include_path is relative to the suite YAML
    suite = _suite(suite_dir, "ok", "lm_eval: {tasks: [dscl_tiny_mc], include_path: tasks, batch_size: 2}\n")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--suite", str(suite), "--out", str(out), "--device", "cpu"]) == 0
    gen = json.loads((out / "general.json").read_text())
    assert gen["tasks"] == ["dscl_tiny_mc"] and gen["lm_eval_version"]
    res = gen["results"]["dscl_tiny_mc"]
    assert res["sample_len"] == len(ITEMS)
    for m in ("acc,none", "acc_norm,none"):
        assert isinstance(res[m], float) and 0.0 <= res[m] <= 1.0
        assert res[m] == pytest.approx(1 / 3)
        assert isinstance(res[m.replace(",", "_stderr,")], float)
    assert json.loads((out / "eval.json").read_text())["general"] == gen["results"]

    # run_lm_eval directly, with limit (the first 3 items: one question, each choice once)
    from ds_cl.evaluation.general import run_lm_eval
    r = run_lm_eval(str(model), {"tasks": ["dscl_tiny_mc"], "include_path": [str(suite_dir / "tasks")],
                                 "limit": 3}, device="cpu")
    assert r["limit"] == 3 and r["results"]["dscl_tiny_mc"]["sample_len"] == 3
    assert r["results"]["dscl_tiny_mc"]["acc,none"] == pytest.approx(1 / 3)


def test_lm_eval_clear_messages(setup, tmp_path, capsys):
    model, suite_dir = setup

    def run(name, lm_eval):
        suite = _suite(suite_dir, name, f"lm_eval: {lm_eval}\n")
        rc = main(["--model", str(model), "--suite", str(suite), "--out", str(tmp_path / "o"), "--device", "cpu"])
        return rc, capsys.readouterr().err

    # unknown task: caught before the model loads
    rc, err = run("unknown", "{tasks: [no_such_task_xyz], include_path: tasks}")
    assert rc == 2 and "unknown lm-eval task(s) ['no_such_task_xyz']" in err
    # include_path that does not exist
    rc, err = run("nodir", "{tasks: [dscl_tiny_mc], include_path: nowhere}")
    assert rc == 2 and "lm_eval include_path not found" in err
    # the task's data file is missing
    rc, err = run("nodata", "{tasks: [dscl_tiny_missing], include_path: tasks}")
    assert rc == 2 and "lm-eval task data for ['dscl_tiny_missing'] is not available here" in err
    assert "no_such.jsonl" in err
    assert not (tmp_path / "o" / "general.json").exists()
