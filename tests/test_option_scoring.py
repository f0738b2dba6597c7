"""eval.scoring: options (rank classification among a task's options, ds_cl/training/task_eval.py): the batched,
left-padded scoring equals a brute-force forward per option; each option's ids are its training target; which
options a task has and when a run is refused; and a 2-rank ZeRO-3 run's matrix equals the exported models
scored whole in one process."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures import FIXTURES, TINY_LLAMA, tiny_run_config, train_sentencepiece, write_run_config


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tok.model")


def tiny_model(seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(TINY_LLAMA, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc),
                                            dtype=torch.float32).eval()


def brute_force(model, prompt: list[int], cont: list[int]) -> float:
    """One unpadded forward of prompt + cont: the sum of log p(cont[k] | prompt, cont[:k])."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + cont])).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(cont))


def test_batched_scoring_equals_a_forward_per_option_and_targets_are_the_training_targets(tok_file):
    from ds_cl.training.config import TaskConfig
    from ds_cl.training.data import IGNORE_INDEX, Example, encode_example, load_task, load_tokenizer
    from ds_cl.training.task_eval import score_options

    tok = load_tokenizer(str(tok_file))
    # Options of unequal lengths, one a prefix of another's words: rows of a batch differ in length.
    task = TaskConfig(name="a", train=str(FIXTURES / "task_a.jsonl"), eval_size=7,
                      instruction="Is the review positive or negative?",
                      options=["positive", "negative", "positive, mostly", "mixed feelings overall"])
    data = load_task(task, 0, tok, 96, seed=3, scoring="options")
    assert data.options == task.options and len(data.eval_option_ids) == len(data.eval_prompts) == 7
    for j, o in enumerate(data.options):  # exactly the tokens a training sample with this answer learns
        enc, _ = encode_example(tok, Example("the food was fine. Answer:", o), 96)
        assert data.eval_option_ids[0][j] == [lab for lab in enc.labels if lab != IGNORE_INDEX]
        assert data.eval_option_ids[0][j][-1] == tok.eos_id
    assert len({len(c) for c in data.eval_option_ids[0]}) > 1
    # A model whose options differ clearly (random init at 0.02 puts them within float noise of each other).
    model = tiny_model(initializer_range=0.5)
    got = score_options(model, data.eval_prompts, data.eval_option_ids, tok.pad_id, batch_size=3, device="cpu")
    want = [[brute_force(model, p, c) for c in opts] for p, opts in zip(data.eval_prompts, data.eval_option_ids)]
    for g, w in zip(got, want):
        assert max(range(4), key=g.__getitem__) == max(range(4), key=w.__getitem__)
        assert g == pytest.approx(w, abs=1e-5), (g, w)
    # The forward keeps only the scored positions' logits (logits_to_keep); without it, the same numbers.
    from ds_cl.training.task_eval import option_logliks

    rows = [(data.eval_prompts[0], c) for c in data.eval_option_ids[0]]

    class NoKeep(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)

    assert option_logliks(NoKeep(model), rows, tok.pad_id, "cpu") == pytest.approx(
        option_logliks(model, rows, tok.pad_id, "cpu"), abs=1e-6)


def test_evaluate_tasks_in_one_process_writes_predictions_marked_with_the_scoring(tok_file, tmp_path):
    """evaluate_tasks on one process, both scorings: the score is the share of predictions that equal the
    reference (options) or that the metric credits (generate), and each predictions line names its scoring."""
    from types import SimpleNamespace

    from ds_cl.training.config import EvalConfig, TaskConfig
    from ds_cl.training.data import load_task, load_tokenizer
    from ds_cl.training.task_eval import evaluate_tasks

    tok = load_tokenizer(str(tok_file))
    task = TaskConfig(name="a", train=str(FIXTURES / "task_a.jsonl"), eval_size=5)
    data = load_task(task, 0, tok, 96, seed=3, scoring="options")
    engine = SimpleNamespace(module=tiny_model(initializer_range=0.5), device="cpu")
    one = SimpleNamespace(rank=0, world=1)
    for scoring in ("options", "generate"):
        cfg = EvalConfig(scoring=scoring, batch_size=2, max_new_tokens=3)
        [score] = evaluate_tasks(engine, tok, [data], cfg, one, tmp_path, scoring)
        preds = [json.loads(line) for line in (tmp_path / f"predictions_{scoring}.jsonl").read_text().splitlines()]
        assert [p["index"] for p in preds] == list(range(5)) and {p["scoring"] for p in preds} == {scoring}
        credit = (lambda a, b: a == b) if scoring == "options" else data.metric
        hits = [credit(p["prediction"], p["reference"]) for p in preds]
        assert score == sum(hits) / 5
        if scoring == "options":
            assert all(p["prediction"] in ("negative", "positive") and p["loglik"] >= p["reference_loglik"]
                       for p in preds)


def test_chat_record_options_are_the_assistant_turn_the_loss_covers():
    """A chat record under the chat template: an option's ids are the assistant turn as training renders it
    (end-of-turn included), i.e. the labels of encode_chat with that option as the answer."""
    import os

    from ds_cl.tools.models import model_dir
    from ds_cl.training.data import IGNORE_INDEX, Example, encode_example, load_tokenizer, option_targets

    path = str(model_dir("smollm2"))
    assert os.path.isdir(path), "run `make model` first (make test does)"
    tok = load_tokenizer(path, chat_template=True)
    head = [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Is water wet?"}]
    targets = option_targets(tok, Example("", "yes", head + [{"role": "assistant", "content": "yes"}]), ["yes", "no"])
    for o, t in zip(["yes", "no"], targets):
        enc, _ = encode_example(tok, Example("", o, head + [{"role": "assistant", "content": o}]), 512)
        assert t == [lab for lab in enc.labels if lab != IGNORE_INDEX]
        assert tok.tok.decode(t).startswith(o) and tok.tok.eos_token in tok.tok.decode(t)


def test_which_options_and_when_a_run_is_refused(tmp_path, tok_file):
    from ds_cl.training.config import ConfigError, TaskConfig, load_config
    from ds_cl.training.data import scoring_options
    from ds_cl.training.preflight import check_data

    rows = [{"input": f"x{i}", "output": o} for i, o in enumerate(["b", "a", "b", "c"])]
    assert scoring_options(TaskConfig(name="t", train="x"), rows, "k") == ["a", "b", "c"]  # the records' answers
    labelled = TaskConfig(name="t", train="x", labels=["c", "b", "a", "d"])
    assert scoring_options(labelled, rows, "k") == ["c", "b", "a", "d"]  # the prompt's labels
    assert scoring_options(TaskConfig(name="t", train="x", labels=["a"], options=["z", "y"]), rows, "k") == ["z", "y"]
    with pytest.raises(ValueError, match="101 distinct answers"):
        scoring_options(TaskConfig(name="t", train="x"), [{"input": "x", "output": str(i)} for i in range(101)], "k")

    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"input": f"e{i}", "output": o}) + "\n"
                          for i, o in enumerate(["positive", "neutral", "negative"])))
    base = tiny_run_config(tmp_path, tmp_path / "out", {"eval": {"scoring": "options"}})
    base["model"]["tokenizer"] = str(tok_file)
    base["tasks"][0]["eval"] = str(ev)
    with pytest.raises(ConfigError, match=r"1 of 3 answers of .*eval.jsonl are not among the task's 2 options "
                                          r"\('negative', 'positive'\), e.g. record 1: 'neutral'"):
        check_data(load_config(None, data=base))
    base["tasks"][0]["options"] = ["positive", "neutral", "negative"]
    check_data(load_config(None, data=base))
    base["tasks"][1]["metric"] = "math:isclose"
    with pytest.raises(ConfigError, match="tasks.1.metric: eval.scoring: options scores the chosen option"):
        load_config(None, data=base)


@pytest.mark.distributed
def test_two_rank_run_scores_by_options_as_the_whole_model_does(tmp_path, tok_file):
    """A 2-rank ZeRO-3 run with eval.scoring: options (5 prompts per task: rank 1 pads a slot) writes its matrix;
    each cell equals the accuracy of the exported model scored whole, in one process, over all prompts."""
    from transformers import AutoModelForCausalLM

    from ds_cl.training.config import load_config
    from ds_cl.training.data import load_task, load_tokenizer
    from ds_cl.training.task_eval import score_options
    from tests.dist_utils import TRAIN, launch

    (tmp_path / "tok.model").write_bytes(tok_file.read_bytes())
    out = tmp_path / "out"
    cfg = tiny_run_config(tmp_path, out, {"eval": {"scoring": "options", "batch_size": 2},
                                          "train": {"max_steps_per_task": 2}, "output": {"plots": False}})
    for t in cfg["tasks"]:
        t["eval_size"] = 5
    launch(TRAIN, 2, str(write_run_config(cfg)), timeout=300)
    matrix = json.loads((out / "summary.json").read_text())["matrix"]
    assert [len(r) for r in matrix] == [1, 2]
    preds = [json.loads(line) for line in (out / "predictions_task_1.jsonl").read_text().splitlines()]
    assert {p["scoring"] for p in preds} == {"options"} and {p["task"] for p in preds} == {"a", "b"}
    assert all(p["loglik"] >= p["reference_loglik"] for p in preds)

    run = load_config(out / "config.yaml")
    tok = load_tokenizer(run.model.tokenizer)
    tasks = [load_task(t, i, tok, run.train.max_seq_len, run.seed, "options") for i, t in enumerate(run.tasks)]
    assert tasks[1].options == ["food", "music", "science", "sports"]
    for phase, name in ((0, "a"), (1, "b")):
        model = AutoModelForCausalLM.from_pretrained(out / f"task_{phase}_{name}", dtype=torch.float32).eval()
        for t, want in zip(tasks, matrix[phase]):
            ll = score_options(model, t.eval_prompts, t.eval_option_ids, tok.pad_id, 4, "cpu")
            hits = [t.options[max(range(len(r)), key=r.__getitem__)] == a for r, a in zip(ll, t.eval_answers)]
            assert sum(hits) / len(hits) == pytest.approx(want, abs=1e-12), (phase, t.name)
