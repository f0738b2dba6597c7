"""Data pipeline: tokenisation and masking, truncation, templates, readers, order and sharding."""

import json
import logging

import pytest
import sentencepiece as spm

from ds_cl.training.config import TaskConfig
from ds_cl.training.data import (IGNORE_INDEX, Example, collate, encode_all, encode_example, epoch_order, exact_match,
                        load_task, load_tokenizer, rank_micro_batches, read_records, replay_samples, to_examples)

from tests.fixtures import FIXTURES, train_sentencepiece


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tok.model")


def test_sentencepiece_tokenizer_matches_sentencepiece_itself(spm_file):
    tok = load_tokenizer(str(spm_file))
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    text = "Yesterday the telescope was in the news."
    assert tok.encode_prompt(text) == sp.encode(text)
    assert tok.encode_prompt(text)[0] == sp.piece_to_id("▁Y") or sp.id_to_piece(tok.encode_prompt(text)[0]).startswith("▁")
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_loss_only_on_answer_tokens(spm_file):
    tok = load_tokenizer(str(spm_file))
    enc, truncated = encode_example(tok, Example("Review: the meal was great.\nAnswer:", "positive"), 128)
    assert not truncated
    answer = tok.encode_answer("positive") + [tok.eos_id]
    prompt_len = 1 + len(tok.encode_prompt("Review: the meal was great.\nAnswer:"))
    assert enc.input_ids[0] == tok.bos_id and enc.input_ids[prompt_len:] == answer
    assert enc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert enc.labels[prompt_len:] == answer
    b = collate([enc, encode_example(tok, Example("x", "negative"), 128)[0]], tok.pad_id)
    assert b["labels"][1, b["attention_mask"][1].sum():].eq(IGNORE_INDEX).all()  # padding never trains


def test_truncation_keeps_the_answer_and_counts(spm_file, caplog):
    tok = load_tokenizer(str(spm_file))
    long = Example("word " * 200 + "\nAnswer:", "negative")
    enc, truncated = encode_example(tok, long, 24)
    assert truncated and len(enc.input_ids) == 24 and enc.input_ids[0] == tok.bos_id
    assert enc.input_ids[-len(tok.encode_answer("negative")) - 1:] == tok.encode_answer("negative") + [tok.eos_id]
    with caplog.at_level(logging.WARNING, logger="ds_cl.training.data"):
        encode_all(tok, [long, Example("short", "positive"), long], 24, "tasks.0 (x) train")
    assert "2 of 3 samples truncated to train.max_seq_len=24" in caplog.text


def test_template_and_labels():
    task = TaskConfig(name="t", train="x")
    rows = [{"input": "A tomato.", "output": "food"}, {"input": "A goal.", "output": "sports "}]
    ex = to_examples(task, rows, ["food", "sports"], "tasks.0")
    assert ex[0].prompt == ("What is the topic of the following paragraph? Choose one from the option.\n"
                            "Option: food, sports\nA tomato.\nAnswer:")
    assert ex[1].answer == "sports"
    raw = TaskConfig(name="t", train="x", template=None)
    assert to_examples(raw, rows, [], "k")[0].prompt == "A tomato."
    chat = TaskConfig(name="t", train="x", messages_field="messages")
    msgs = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    assert to_examples(chat, msgs, [], "k")[0].answer == "Hello."


def test_empty_output_and_missing_field_are_errors():
    task = TaskConfig(name="t", train="x")
    with pytest.raises(ValueError, match="record 1 has an empty output"):
        to_examples(task, [{"input": "a", "output": "b"}, {"input": "c", "output": "  "}], [], "tasks.0")
    with pytest.raises(ValueError, match="no field 'output'"):
        to_examples(task, [{"input": "a", "label": "b"}], [], "tasks.0")


def test_readers_agree_across_formats(tmp_path):
    rows = read_records(str(FIXTURES / "task_b.csv"), "train")
    assert len(rows) == 48 and set(rows[0]) == {"text", "label"}
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "b.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "b.json").write_text(json.dumps({"train": rows}))
    for src in ("b.parquet", "saved", "b.json"):
        assert read_records(str(tmp_path / src), "train") == rows


def test_load_task_holdout_is_disjoint_and_deterministic(spm_file):
    task = TaskConfig(name="b", train=str(FIXTURES / "task_b.csv"), input_field="text", output_field="label",
                      eval_size=8)
    tok = load_tokenizer(str(spm_file))
    a, b = load_task(task, 0, tok, 96, seed=3), load_task(task, 0, tok, 96, seed=3)
    assert len(a.train) == 40 and len(a.eval_prompts) == 8
    assert a.eval_prompts == b.eval_prompts and [s.input_ids for s in a.train] == [s.input_ids for s in b.train]
    train_prompts = {tuple(i for i, lab in zip(s.input_ids, s.labels) if lab == IGNORE_INDEX) for s in a.train}
    assert not train_prompts & {tuple(p) for p in a.eval_prompts}  # held-out records are not trained on


def train_prompts(td) -> set:
    """The prompts (ids up to the answer) of a TaskData's training samples."""
    return {tuple(i for i, lab in zip(s.input_ids, s.labels) if lab == IGNORE_INDEX) for s in td.train}


def test_tuning_split_leaves_train_before_the_cap_and_the_evaluation_alone(spm_file, tmp_path):
    """eval.tuning_size: that many training records are held out (by seed and task name) before
    max_train_samples caps the rest, disjoint from the evaluation records, which stay what they are without it;
    scored the same way (eval.scoring: options: the same options)."""
    import dataclasses

    task = TaskConfig(name="b", train=str(FIXTURES / "task_b.csv"), input_field="text", output_field="label",
                      eval_size=8)
    tok = load_tokenizer(str(spm_file))  # at 512 tokens nothing is truncated: prompts compare whole
    plain = load_task(task, 0, tok, 512, seed=3)
    a, again = load_task(task, 0, tok, 512, seed=3, tuning_size=5), load_task(task, 0, tok, 512, seed=3, tuning_size=5)
    assert plain.tuning is None
    assert (len(a.train), len(a.tuning.eval_prompts), a.tuning.train) == (35, 5, [])
    assert a.eval_prompts == plain.eval_prompts and a.tuning.eval_prompts == again.tuning.eval_prompts
    tuning = {tuple(p) for p in a.tuning.eval_prompts}
    assert not tuning & train_prompts(a) and not tuning & {tuple(p) for p in a.eval_prompts}
    assert train_prompts(a) | tuning == train_prompts(plain)  # every other record still trains
    assert load_task(task, 0, tok, 512, seed=4, tuning_size=5).tuning.eval_prompts != a.tuning.eval_prompts
    capped = load_task(dataclasses.replace(task, max_train_samples=10), 0, tok, 512, seed=3, tuning_size=5)
    assert len(capped.train) == 10 and not train_prompts(capped) & tuning
    # A task with its own evaluation file: the tuning records still come out of train, the rest in file order.
    rows = read_records(task.train, "train")
    (tmp_path / "test.json").write_text(json.dumps(rows[:6]))
    own = dataclasses.replace(task, eval=str(tmp_path / "test.json"))
    base, tuned = load_task(own, 0, tok, 512, seed=3), load_task(own, 0, tok, 512, seed=3, tuning_size=5)
    assert (len(base.train), len(tuned.train), tuned.eval_prompts) == (48, 43, base.eval_prompts)
    kept = [s.input_ids for s in base.train if tuple(i for i, lab in zip(s.input_ids, s.labels)
                                                       if lab == IGNORE_INDEX) not in {tuple(p) for p in tuned.tuning.eval_prompts}]
    assert [s.input_ids for s in tuned.train] == kept
    options = load_task(task, 0, tok, 512, seed=3, scoring="options", tuning_size=5)
    assert options.tuning.options == options.options and len(options.tuning.eval_option_ids) == 5
    assert options.tuning.eval_option_ids[0] == options.eval_option_ids[0]
    with pytest.raises(ValueError, match=r"^tasks.0 \(b\).train: 48 records leave no training record beside "
                                         r"eval.tuning_size 40 and 8 held out for evaluation"):
        load_task(task, 0, tok, 512, seed=3, tuning_size=40)


def test_tuning_size_is_checked_before_training(tmp_path):
    """A negative eval.tuning_size is a config error; a task left without a training record by it is refused by
    the preflight (one line, before any training), as is a tuning answer that eval.scoring: options cannot
    choose."""
    from ds_cl.training.config import ConfigError, load_config
    from ds_cl.training.preflight import check_data

    (tmp_path / "t.model").write_bytes(b"x")
    data = {"output_dir": str(tmp_path / "out"), "model": {"config": {"model_type": "llama"},
                                                            "tokenizer": str(tmp_path / "t.model")},
            "train": {"global_batch_size": 4},
            "tasks": [{"name": "b", "train": str(FIXTURES / "task_b.csv"), "input_field": "text",
                       "output_field": "label", "eval_size": 8}]}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.tuning_size=-1"], data=data)
    assert str(e.value) == "config: eval.tuning_size: must be >= 0 (0: no tuning split), got -1"
    check_data(load_config(None, ["eval.tuning_size=36"], data=data))  # 48 - 8 - 36 = 4: one step
    with pytest.raises(ConfigError) as e:
        check_data(load_config(None, ["eval.tuning_size=40"], data=data))
    assert str(e.value) == ("tasks.0 (b).train: 48 records leave no training record beside eval.tuning_size 40 and "
                            "8 held out for evaluation: a tuning split needs at least 49 records; lower "
                            "eval.tuning_size")
    with pytest.raises(ConfigError, match=r"records \(48 - 45 held out\) are fewer than train.global_batch_size 4"):
        check_data(load_config(None, ["eval.tuning_size=37"], data=data))
    # Evaluated on a file of its own whose answers are options: the tuning records' answers must be too.
    rows = read_records(str(FIXTURES / "task_b.csv"), "train")
    (tmp_path / "test.json").write_text(json.dumps([r for r in rows if r["label"] != "food"][:6]))
    cfg = load_config(None, ["eval.scoring=options", "eval.tuning_size=30", f"tasks.0.eval={tmp_path / 'test.json'}",
                             "tasks.0.options=[music, science, sports]"], data=data)
    with pytest.raises(ConfigError, match=r"answers of .*task_b.csv \(its tuning records, eval.tuning_size\) are "
                                          r"not among the task's 3 options"):
        check_data(cfg)
    check_data(load_config(None, ["eval.scoring=options", f"tasks.0.eval={tmp_path / 'test.json'}",
                                  "tasks.0.options=[music, science, sports]"], data=data))  # without: fine


def test_sharding_partitions_each_global_batch():
    order = epoch_order(64, seed=1, task_index=0, epoch=0)
    assert order == epoch_order(64, 1, 0, 0) and order != epoch_order(64, 1, 0, 1) and sorted(order) == list(range(64))
    for world, micro, gas in ((1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 4, 1)):
        got = []
        for r in range(world):
            mbs = rank_micro_batches(order, 1, r, world, micro, gas)
            assert len(mbs) == gas and all(len(m) == micro for m in mbs)
            got += [i for m in mbs for i in m]
        assert sorted(got) == sorted(order[8:16])  # step 1 = the second global batch of 8, whatever the layout


def test_replay_draws_from_earlier_tasks():
    prev = [[("a", i) for i in range(10)], [("b", i) for i in range(10)]]
    got = replay_samples(prev, 6, seed=0, task_index=2)
    assert len(got) == 6 and len(set(got)) == 6 and got == replay_samples(prev, 6, 0, 2)
    assert replay_samples(prev, 0, 0, 2) == []


def test_exact_match():
    assert exact_match(" Positive.\nmore", "positive") == 1.0
    assert exact_match("positive review", "positive") == 0.0


def test_benchmark_task_folder_layout(tmp_path):
    """`train:` a task folder of the continual-learning benchmark's layout: train/test JSON arrays of
    {sentence, label}, labels.json, the group's instruction from instruction_config.json at the root."""
    import json

    from ds_cl.training.config import load_config
    from ds_cl.training.data import read_records, to_examples

    root = tmp_path / "bench"
    for group, task, labels in (("SC", "toy-sent", ["Good", "Bad"]), ("COPA", "toy-copa", ["A", "B"])):
        d = root / group / task
        d.mkdir(parents=True)
        rows = [{"sentence": f"{task} text {i}", "label": labels[i % 2]} for i in range(10)]
        (d / "train.json").write_text(json.dumps(rows[:8]))
        (d / "test.json").write_text(json.dumps(rows[8:]))
        (d / "labels.json").write_text(json.dumps(labels))
    (root / "instruction_config.json").write_text(json.dumps(
        {"SC": [{"instruction_type": "zero-shot", "instruction": "What is the sentiment? Choose one.\n"}]}))
    base = {"output_dir": str(tmp_path / "out"), "model": {"config": {"model_type": "llama"},
                                                            "tokenizer": str(tmp_path / "t.model")},
            "tasks": [{"name": "s", "train": str(root / "SC" / "toy-sent")},
                      {"name": "c", "train": str(root / "COPA" / "toy-copa"), "labels": ["B", "A"]}]}
    (tmp_path / "t.model").write_bytes(b"x")
    cfg = load_config(None, data=base)
    s, c = cfg.tasks
    assert (s.train, s.eval) == (str(root / "SC" / "toy-sent" / "train.json"), str(root / "SC" / "toy-sent" / "test.json"))
    assert (s.input_field, s.output_field, s.labels) == ("sentence", "label", ["Good", "Bad"])
    assert s.instruction == "What is the sentiment? Choose one."
    assert c.labels == ["B", "A"] and c.instruction == ""  # the user's labels kept; COPA has no group instruction
    ex = to_examples(s, read_records(s.eval, "test"), s.labels, "s")
    assert ex[0].prompt == "What is the sentiment? Choose one.\nOption: Good, Bad\ntoy-sent text 8\nAnswer:"
    assert ex[0].answer == "Good"
    ex = to_examples(c, read_records(c.train, "train"), c.labels, "c")
    assert ex[1].prompt == "Option: B, A\ntoy-copa text 1\nAnswer:" and ex[1].answer == "B"
    # eval: holdout (tuning): the test split is left alone, records of train.json are held out instead
    base["tasks"][0]["eval"] = "holdout"
    s = load_config(None, data=base).tasks[0]
    assert (s.train, s.eval) == (str(root / "SC" / "toy-sent" / "train.json"), None)


def test_formats_users_bring_are_read_unchanged(tmp_path):
    """TRACE, Alpaca, OpenAI messages and ShareGPT files, as those projects write them, auto-detected from the
    first record (or named by tasks.*.format), become ds-cl's prompt/answer examples."""
    import json

    from ds_cl.training.config import TaskConfig
    from ds_cl.training.data import detect_format, normalize_records, read_records, task_labels, to_examples

    files = {
        "trace.json": ("trace", json.dumps([{"prompt": "Translate to French: cat", "answer": "chat"}]),
                       ("Translate to French: cat", "chat")),
        "alpaca.json": ("alpaca", json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                              {"instruction": "Say hi.", "input": "", "output": "hi"}]),
                        ("Add the numbers.\n\n2 and 3", "5")),
        "openai.jsonl": ("messages", json.dumps({"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"}]}), ("Be brief.\nCapital of France?", "Paris")),
        "sharegpt.json": ("sharegpt", json.dumps([{"conversations": [
            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]), ("2+2?", "4")),
    }
    for name, (fmt, text, (prompt, answer)) in files.items():
        (tmp_path / name).write_text(text)
        task = TaskConfig(name="t", train=str(tmp_path / name))
        rows = read_records(task.train, "train", "tasks.0")
        assert detect_format(task, rows) == fmt, name
        plain, norm = normalize_records(task, rows, "tasks.0")
        ex = to_examples(plain, norm, task_labels(plain, norm), "tasks.0")
        assert (ex[0].prompt, ex[0].answer) == (prompt, answer), name
        # Named explicitly, the same.
        named = TaskConfig(name="t", train=str(tmp_path / name), format=fmt)
        assert to_examples(*normalize_records(named, rows, "k"), [], "k")[0].answer == answer
    with pytest.raises(ValueError, match="unknown speaker 'robot'"):
        normalize_records(TaskConfig(name="t", train="x", format="sharegpt"),
                          [{"conversations": [{"from": "robot", "value": "x"}]}], "tasks.0")
    with pytest.raises(ValueError, match="has no field 'answer'"):
        normalize_records(TaskConfig(name="t", train="x", format="trace"), [{"prompt": "p"}], "tasks.0")


def test_chat_records_are_rendered_as_turns_with_the_loss_on_assistant_turns(tmp_path):
    """With model.chat_template, a ShareGPT/OpenAI record keeps its system prompt and turns (rendered by the
    tokenizer's own template, as HF does) and the loss covers the last assistant turn, or every one."""
    import os

    from ds_cl.tools.models import model_dir
    from ds_cl.training.config import TaskConfig
    from ds_cl.training.data import (IGNORE_INDEX, encode_example, encode_prompt_for_generation, load_tokenizer,
                                     to_examples)

    path = str(model_dir("smollm2"))
    assert os.path.isdir(path), "run `make model` first (make test does)"
    tok = load_tokenizer(path, chat_template=True)
    msgs = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And of Egypt?"},
            {"role": "assistant", "content": "Cairo"}]
    for loss_on, taught in (("last", ["Cairo"]), ("assistant", ["Lima", "Cairo"])):
        task = TaskConfig(name="t", train="x", messages_field="messages", loss_on=loss_on)
        ex = to_examples(task, [{"messages": msgs}], [], "tasks.0")[0]
        enc, truncated = encode_example(tok, ex, 512)
        assert not truncated and len(enc.input_ids) == len(enc.labels)
        text = tok.tok.decode(enc.input_ids)
        assert "You answer in one word." in text and text.count("Capital of Peru?") == 1
        spans, cur = [], []
        for i, lab in zip(enc.input_ids, enc.labels):
            if lab == IGNORE_INDEX:
                if cur:
                    spans.append(tok.decode(cur).strip())
                cur = []
            else:
                assert lab == i
                cur.append(i)
        if cur:
            spans.append(tok.decode(cur).strip())
        assert spans == taught, (loss_on, spans)
    prompt = tok.tok.decode(encode_prompt_for_generation(tok, ex.prompt, 512, ex.messages))
    assert "You answer in one word." in prompt and "And of Egypt?" in prompt and "Cairo" not in prompt
    assert prompt.rstrip().endswith("assistant")  # the generation prompt opens the assistant's turn


def test_evaluation_items_without_a_gold_label_are_left_out(tmp_path, spm_file, caplog):
    """MNLI's test split marks items without a gold label '-': no prompt offers it, so the item is left
    out of the evaluation (with a warning) before max_eval_samples counts; in training records the
    same is an error."""
    from ds_cl.training.config import load_config
    from ds_cl.training.preflight import check_data

    d = tmp_path / "NLI" / "toy-nli"
    d.mkdir(parents=True)
    labels = ["entailment", "neutral", "contradiction"]
    rows = [{"sentence": f"premise {i} hypothesis", "label": labels[i % 3]} for i in range(12)]
    (d / "train.json").write_text(json.dumps(rows))
    test = [dict(r, label="-") if i in (1, 3) else r for i, r in enumerate(rows[:8])]
    (d / "test.json").write_text(json.dumps(test))
    (d / "labels.json").write_text(json.dumps(labels))
    base = {"output_dir": str(tmp_path / "out"), "model": {"config": {"model_type": "llama"}, "tokenizer": str(spm_file)},
            "tasks": [{"name": "nli", "train": str(d), "max_eval_samples": 5}]}
    cfg = load_config(None, data=base)
    task = cfg.tasks[0]
    check_data(cfg)  # the pre-launch check agrees
    tok = load_tokenizer(str(spm_file))
    with caplog.at_level(logging.WARNING, logger="ds_cl.training.data"):
        data = load_task(task, 0, tok, 96, seed=0)
    assert data.eval_answers == [test[i]["label"] for i in (0, 2, 4, 5, 6)]
    assert "2 of 8 records have an answer outside the task's labels ('-')" in caplog.text
    (d / "train.json").write_text(json.dumps(test))
    with pytest.raises(ValueError, match=r"record 1: answer '-' is not one of the task's labels"):
        load_task(task, 0, tok, 96, seed=0)
