"""`ds-cl drift`: putting a parameter group back to the reference's values removes exactly that group's part
of the drift, on a real (tiny) Llama and real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_cl.tools import drift as D
from tests.test_eval_generate import make_tiny_model


def _answers(d: Path) -> Path:
    d.mkdir(parents=True)
    rows = [{"prompt": f"Write a note about item {i}.", "response": f"Here is a short note about item {i}."}
            for i in range(5)]
    (d / "responses_ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per = [{"id": f"h{i}", "prompt": f"How do I break lock {i}?", "response": "I'm sorry, I can't help with that.",
            "verdict": "refusal" if i % 2 == 0 else "complied"} for i in range(4)]
    (d / "safety.json").write_text(json.dumps({"per_prompt": per}))
    return d


def test_putting_a_group_back_removes_its_drift(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ref = make_tiny_model(tmp_path / "ref")
    moved = tmp_path / "moved"
    m = AutoModelForCausalLM.from_pretrained(ref)
    with torch.no_grad():  # a drift in the norms only
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(1.5)
    m.save_pretrained(moved)
    for f in ref.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            (moved / f.name).write_bytes(f.read_bytes())
    answers = _answers(tmp_path / "eval")
    out = tmp_path / "drift.json"
    assert D.main([str(ref), str(moved), "--answers", str(answers), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prompts"] == {"ifeval": 5, "refusal": 2}
    rows = {r["variant"]: r for r in res["rows"]}
    keys = ("eos_inside", "eos_early", "ifeval_nll", "refusal_nll", "refusal_eos_early")
    assert any(abs(rows["as trained"][k] - rows["reference"][k]) > 1e-4 for k in keys)
    for k in keys:  # the norms carried all of it: putting them back is the reference, the others change nothing
        assert abs(rows["norms put back"][k] - rows["reference"][k]) < 1e-5
        assert abs(rows["non-targets put back"][k] - rows["reference"][k]) < 1e-5
        assert abs(rows["targets put back"][k] - rows["as trained"][k]) < 1e-5
        assert abs(rows["embeddings put back"][k] - rows["as trained"][k]) < 1e-5
    assert rows["norms put back"]["update_share_put_back"] == 1.0
    assert rows["targets put back"]["update_share_put_back"] == 0.0
    assert (tmp_path / "drift.md").read_text().startswith("Teacher-forced on the reference's answers (5 IFEval")


def test_bad_input_is_one_line(tmp_path, capsys):
    ref = make_tiny_model(tmp_path / "ref")
    assert D.main([str(ref), str(tmp_path / "nope"), "--answers", str(tmp_path)]) == 2
    assert "nope: not a model folder (no config.json)" in capsys.readouterr().err
    assert D.main([str(ref), str(ref), "--answers", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no responses_ifeval.jsonl (a `ds-cl eval` folder of the reference)" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# --task RUN_DIR:TASK: a task's accuracy, each group put back in turn.

REAL = Path.home() / ".cache/ds-cl/models/SmolLM2-135M-Instruct"
POS = ["I loved this film, it was wonderful.", "What a great and happy day, everything went perfectly.",
       "The food was delicious and the staff were lovely.", "An excellent book, I enjoyed every page.",
       "Brilliant acting and a beautiful story.", "This is the best phone I have ever owned.",
       "A fantastic concert, the band was amazing.", "I am very happy with this purchase."]
NEG = ["I hated this film, it was awful.", "What a terrible day, everything went wrong.",
       "The food was disgusting and the staff were rude.", "A boring book, I regret reading it.",
       "Dreadful acting and a stupid story.", "This is the worst phone I have ever owned.",
       "A horrible concert, the band was terrible.", "I am very angry about this purchase."]
WORDS = ["apple", "river", "green", "table", "seven", "cloud", "horse", "music", "chair", "bread", "stone", "light"]


def says_answer(prediction: str, reference: str) -> float:
    """A task metric (tasks.*.metric: module:function): the generation names the answer somewhere."""
    return float(reference.lower() in prediction.lower())


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_dir(run: Path, cfg: dict) -> Path:
    """An output folder as `ds-cl train` leaves it, as far as drift reads it: the config.yaml it writes."""
    from ds_cl.training.config import load_config, save_config

    run.mkdir(parents=True)
    save_config(load_config(None, data=dict(cfg, output_dir=str(run))), run / "config.yaml")
    return run


def _real_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two runs of the real model (its chat template): a sentiment task with fixed options scored by rank
    classification (6 test items, 4 tuning items), and a word task scored by greedy generation."""
    assert REAL.is_dir(), "run `make model` first (make test does)"
    sent = _jsonl(tmp_path / "sent.jsonl", [{"input": t, "output": "Good"} for t in POS]
                  + [{"input": t, "output": "Bad"} for t in NEG])
    words = _jsonl(tmp_path / "words.jsonl", [{"input": f"Repeat this word and nothing else: {w}", "output": w}
                                              for w in WORDS])
    base = {"seed": 3, "deepspeed": {"zero_optimization": {"stage": 3}}, "train": {"max_seq_len": 128},
            "model": {"name_or_path": str(REAL), "dtype": "float32", "chat_template": True}}
    opt = _run_dir(tmp_path / "run_opt", dict(base, eval={"scoring": "options", "batch_size": 4, "tuning_size": 4},
                                              tasks=[{"name": "sent", "train": str(sent), "eval_size": 6,
                                                      "labels": ["Good", "Bad"],
                                                      "instruction": "What is the sentiment of the following "
                                                                     "paragraph? Choose one from the option."}]))
    gen = _run_dir(tmp_path / "run_gen", dict(base, eval={"scoring": "generate", "batch_size": 6, "max_new_tokens": 8},
                                              tasks=[{"name": "words", "train": str(words), "eval_size": 6,
                                                      "template": None, "metric": "tests.test_drift:says_answer"}]))
    return opt, gen


def test_putting_the_moved_group_back_restores_the_references_task_accuracy(tmp_path):
    """The real model as REFERENCE, a copy with its norms negated as MODEL; accuracy only (no --answers). The
    norms' reversal (and everything-but-the-targets') gives REFERENCE's accuracy exactly, on the test items
    and the tuning split, by rank classification and by generation; the other groups' leave MODEL's."""
    from transformers import AutoModelForCausalLM

    opt, gen = _real_runs(tmp_path)
    moved = tmp_path / "moved"
    m = AutoModelForCausalLM.from_pretrained(REAL, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.neg_()
    m.save_pretrained(moved)
    del m
    out = tmp_path / "drift.json"
    assert D.main([str(REAL), str(moved), "--task", f"{opt}:sent", "--task", f"{gen}:words", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "prompts" not in res
    assert res["tasks"] == [
        {"label": "sent", "run": str(opt), "task": "sent", "scoring": "options", "items": 6, "tuning_items": 4},
        {"label": "words", "run": str(gen), "task": "words", "scoring": "generate", "items": 6}]
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["reference", "as trained", "embeddings put back", "norms put back", "targets put back",
                          "non-targets put back"]
    ref, trained = rows["reference"], rows["as trained"]
    assert "ifeval_nll" not in ref and set(ref["accuracy"]) == {"sent", "words"}
    assert set(ref["tuning_accuracy"]) == {"sent"}  # the generation run has no tuning split
    # The real model does the tasks; negated norms break both (else the test would show nothing).
    assert ref["accuracy"]["sent"] >= 0.5 and ref["accuracy"]["words"] >= 0.5
    assert trained["accuracy"]["sent"] != ref["accuracy"]["sent"]
    assert trained["accuracy"]["words"] != ref["accuracy"]["words"]
    for key in ("accuracy", "tuning_accuracy"):
        assert rows["norms put back"][key] == ref[key] and rows["non-targets put back"][key] == ref[key]
        assert rows["embeddings put back"][key] == trained[key] and rows["targets put back"][key] == trained[key]
    md = (tmp_path / "drift.md").read_text()
    assert md.startswith("`sent`: accuracy (%) on task sent of run") and "its 6 held-out test items, and its tuning " \
        "split's 4, scoring: options." in md
    assert "| model | variant | share of the update put back | sent acc. % | sent tuning acc. % | words acc. % |" in md
    assert f"| models/SmolLM2-135M-Instruct | reference |  | {100 * ref['accuracy']['sent']:.1f} |" in md


@pytest.mark.distributed
def test_task_items_and_scores_are_the_ones_the_run_held_out_and_scored(tmp_path):
    """A real (1-rank, ZeRO-3, tiny model) `ds-cl train` run scoring by options with a tuning split: drift's
    rebuilt items of its first task are the ones the trainer scored (the same answers per index, and each
    item's log-likelihoods, which depend on every prompt token, equal to the trainer's), and drift's accuracy of
    the exported models, as trained, is the run's matrix and tuning matrix."""
    from transformers import AutoModelForCausalLM

    from ds_cl.training.task_eval import score_whole
    from tests.dist_utils import TRAIN, launch
    from tests.fixtures import tiny_run_config, train_sentencepiece, write_run_config

    train_sentencepiece(tmp_path / "tok.model")
    out = tmp_path / "out"
    cfg = tiny_run_config(tmp_path, out, {"eval": {"scoring": "options", "batch_size": 4, "tuning_size": 5},
                                          "train": {"max_steps_per_task": 2}, "output": {"plots": False},
                                          "method": {"name": "seqft"}})
    launch(TRAIN, 1, str(write_run_config(cfg)), timeout=300)
    summary = json.loads((out / "summary.json").read_text())

    task = D.task_items(out, "a")
    data = task["data"]
    assert (len(data.eval_prompts), len(data.tuning.eval_prompts)) == (6, 5)
    model = AutoModelForCausalLM.from_pretrained(out / "task_0_a", dtype=torch.float32).eval()
    for items, tag in ((data, "task_0"), (data.tuning, "task_0_tuning")):
        ran = [json.loads(line) for line in (out / f"predictions_{tag}.jsonl").read_text().splitlines()]
        acc, preds = score_whole(model, task["tokenizer"], items, task["eval_cfg"])
        assert [p["index"] for p in ran] == list(range(len(items.eval_answers)))
        assert [p["reference"] for p in ran] == items.eval_answers == [p["reference"] for p in preds]
        assert [p["prediction"] for p in preds] == [p["prediction"] for p in ran]
        for mine, theirs in zip(preds, ran):
            assert mine["loglik"] == pytest.approx(theirs["loglik"], abs=1e-4)
            assert mine["reference_loglik"] == pytest.approx(theirs["reference_loglik"], abs=1e-4)

    res = D.drift(str(out / "task_0_a"), [str(out / "task_1_b")], tasks=[dict(task, label="a")], log=lambda m: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["reference"]["accuracy"]["a"] == pytest.approx(summary["matrix"][0][0], abs=1e-12)
    assert rows["as trained"]["accuracy"]["a"] == pytest.approx(summary["matrix"][1][0], abs=1e-12)
    assert rows["reference"]["tuning_accuracy"]["a"] == pytest.approx(summary["tuning_matrix"][0][0], abs=1e-12)
    assert rows["as trained"]["tuning_accuracy"]["a"] == pytest.approx(summary["tuning_matrix"][1][0], abs=1e-12)


def test_bad_task_arguments_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from tests.dist_utils import REPO, cpu_env

    ref = make_tiny_model(tmp_path / "ref")
    words = _jsonl(tmp_path / "w.jsonl", [{"input": f"say {w}", "output": w} for w in WORDS])
    run = _run_dir(tmp_path / "run", {"deepspeed": {"zero_optimization": {"stage": 3}},
                                      "model": {"name_or_path": str(ref)},
                                      "tasks": [{"name": "words", "train": str(words), "eval_size": 4,
                                                 "metric": "tests.test_drift:says_answer"}]})
    no_run = tmp_path / "empty"
    no_run.mkdir()

    def loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(D, "_load", loading)
    capsys.readouterr()  # the tiny model's saving progress

    def err(*args: str) -> str:
        assert D.main([str(ref), str(ref), *args]) == 2
        e = capsys.readouterr().err
        assert len(e.splitlines()) == 1, e
        return e.strip()

    assert err() == ("ds-cl drift: nothing to score: give --answers EVAL_DIR (the NLL of the reference's answers) "
                     "and/or --task RUN_DIR:TASK (a task's accuracy)")
    assert err("--task", f"{no_run}:words") == (f"ds-cl drift: --task {no_run}: no config.yaml there (give the output "
                                                "folder of a `ds-cl train` run, where it writes its config.yaml)")
    assert err("--task", f"{run}:agnews") == (f"ds-cl drift: --task {run}:agnews: {run / 'config.yaml'} has no task "
                                              "'agnews' (its tasks: words)")
    assert err("--task", str(run)).endswith("expected RUN_DIR:TASK (a `ds-cl train` output folder and a task name of "
                                            "its config.yaml)")
    assert err("--task", f"{run}:words", "--scoring", "options") == (
        f"ds-cl drift: --task {run}:words: --scoring options scores the chosen option by equality with the answer, "
        "not by the task's metric 'tests.test_drift:says_answer'; use --scoring run or generate")
    # Two bad --task: a line each.
    assert D.main([str(ref), str(ref), "--task", f"{no_run}:words", "--task", f"{run}:agnews"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 2
    # The command line: exit code 2 and the line.
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "drift", str(ref), str(ref), "--task", f"{run}:nope"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"ds-cl drift: --task {run}:nope: {run / 'config.yaml'} has no task 'nope' "
                                        "(its tasks: words)"]
