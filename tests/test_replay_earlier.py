"""method.replay.earlier: tasks the starting model was trained on before this run (a safety alignment
trained in a run of its own) join the replay pool of every task, the first included. The config, its
refusals, the data path, Replay.plan, preflight and the `--check` plan; real files and a real SentencePiece
tokenizer, no DeepSpeed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from ds_cl.methods import build_method
from ds_cl.training.check import Check, check_tasks, phase_sizes
from ds_cl.training.config import ConfigError, TaskConfig, load_config, save_config
from ds_cl.training.data import (encode_example, load_earlier, load_task, load_tokenizer, replay_samples,
                                 to_examples)
from ds_cl.training.preflight import check_data, check_saved_config

from tests.fixtures import tiny_run_config, train_sentencepiece

N_SAFETY = 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_sentencepiece(d / "tok.model")
    return d


def safety_records(n: int = N_SAFETY) -> list[dict]:
    """Alpaca records, as the retention study's alignment data."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"instruction": f"How do I pick lock number {i}?", "input": "", "output": "I can't help with that."})
        else:
            out.append({"instruction": f"Suggest a meal for day {i}.", "input": "", "output": "Try a tomato soup."})
    return out


def write_run(tmp: Path, tok_dir: Path, earlier=None, method: str = "replay", fraction: float = 0.5,
              records: list | None = None) -> Path:
    """tests.fixtures' tiny run (tasks a, b) with method `method` and, by a path relative to the config's folder,
    an earlier source `safety` (data/safety.jsonl); returns the config path."""
    (tmp / "data").mkdir(exist_ok=True)
    with open(tmp / "data" / "safety.jsonl", "w") as f:
        for r in safety_records() if records is None else records:
            f.write(json.dumps(r) + "\n")
    if earlier is None:
        earlier = [{"name": "safety", "train": "data/safety.jsonl", "format": "alpaca"}]
    cfg = tiny_run_config(tok_dir, tmp / "out", {"method": {"name": method,
                                                            "replay": {"fraction": fraction, "earlier": earlier}}})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def err(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


# ---------------------------------------------------------------------------------------------
# Config


def test_config_reads_earlier_sources_as_tasks(tmp_path, tok_dir):
    cfg = load_config(write_run(tmp_path, tok_dir))
    (src,) = cfg.method.replay.earlier
    assert isinstance(src, TaskConfig) and src.name == "safety" and src.format == "alpaca"
    assert src.train == str(tmp_path / "data" / "safety.jsonl")  # resolved against the config's folder
    assert src.eval is None and src.template == TaskConfig().template  # the tasks' defaults
    # The resolved config ds-cl train writes reads back the same (a --resume reloads it).
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").method.replay.earlier == cfg.method.replay.earlier
    # An override reaches into the list like tasks.N.key.
    again = load_config(write_run(tmp_path, tok_dir), ["method.replay.earlier.0.max_train_samples=5"])
    assert again.method.replay.earlier[0].max_train_samples == 5
    # Without the key: none, and the default config is unchanged.
    assert load_config(write_run(tmp_path, tok_dir, earlier=[])).method.replay.earlier == []


@pytest.mark.parametrize("earlier, method, expect", [
    ([{"name": "safety", "train": "data/missing.jsonl"}], "replay",
     r"method\.replay\.earlier\.0\.train: no such file: .*data/missing\.jsonl$"),
    ([{"name": "safe ty", "train": "data/safety.jsonl"}], "replay",
     r"method\.replay\.earlier\.0\.name: use letters, digits, - _ \. only .*'safe ty'"),
    ([{"train": "data/safety.jsonl"}], "replay", r"method\.replay\.earlier\.0\.name: is required"),
    ([{"name": "s", "train": "data/safety.jsonl"}, {"name": "s", "train": "data/safety.jsonl"}], "replay",
     r"method\.replay\.earlier\.1\.name: duplicate earlier source name 's'"),
    ([{"name": "safety"}], "replay", r"method\.replay\.earlier\.0\.train: is required"),
    ([{"name": "safety", "train": "data/safety.jsonl", "format": "chatml"}], "replay",
     r"method\.replay\.earlier\.0\.format: must be one of 'auto', .*got 'chatml'"),
    ([{"name": "safety", "train": "data/safety.jsonl", "template": "{input} {answer}"}], "replay",
     r"method\.replay\.earlier\.0\.template: only \{instruction\}, \{options\}, \{input\} may appear \(found \{answer\}"),
    ([{"name": "safety", "train": "data/safety.jsonl", "eval_size": 16}], "replay",
     r"method\.replay\.earlier\.0\.eval_size: is not used: .*none is held out or evaluated"),
    ([{"name": "safety", "train": "data/safety.jsonl", "max_train_samples": 0}], "replay",
     r"method\.replay\.earlier\.0\.max_train_samples: must be >= 1"),
    ([{"name": "safety", "train": "data/safety.jsonl", "size": 3}], "replay",
     r"unknown key 'method\.replay\.earlier\.0\.size'"),
    ([{"name": "safety", "train": "data/safety.jsonl"}], "seqft",
     r"method\.replay\.earlier: only method\.name: replay or osft-replay replays; with method\.name seqft its 1 source\(s\) would "
     r"be ignored"),
])
def test_config_refusals_name_the_key(tmp_path, tok_dir, earlier, method, expect):
    import re

    msg = err(write_run(tmp_path, tok_dir, earlier=earlier, method=method))
    assert re.search(expect, msg), msg


def test_resume_of_a_run_saved_before_the_key_existed(tmp_path, tok_dir):
    """A run's config.yaml written before method.replay.earlier existed has no such key: resuming it (with no
    earlier source) is no change to what it trains; adding a source is one."""
    cfg = load_config(write_run(tmp_path, tok_dir, earlier=[]))
    out = Path(cfg.output_dir)
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    text = (out / "config.yaml").read_text()
    old = yaml.safe_load(text)
    del old["method"]["replay"]["earlier"]
    (out / "config.yaml").write_text(text.splitlines(keepends=True)[0] + yaml.safe_dump(old, sort_keys=False))
    assert check_saved_config(cfg, resume=True) == []
    with pytest.raises(ConfigError, match=r"--resume: .*method\.replay\.earlier None -> \[\{'name': 'safety'"):
        check_saved_config(load_config(write_run(tmp_path, tok_dir)), resume=True)


# ---------------------------------------------------------------------------------------------
# Data and Replay.plan


def load(path: Path, *overrides: str):
    cfg = load_config(path, list(overrides))
    tok = load_tokenizer(cfg.model.tokenizer)
    tasks = [load_task(t, i, tok, cfg.train.max_seq_len, cfg.seed) for i, t in enumerate(cfg.tasks)]
    return cfg, tok, tasks


def test_earlier_records_all_train_encoded_as_a_tasks(tmp_path, tok_dir):
    cfg, tok, _ = load(write_run(tmp_path, tok_dir))
    src = cfg.method.replay.earlier[0]
    got = load_earlier(src, 0, tok, cfg.train.max_seq_len)
    assert len(got) == N_SAFETY  # none held out
    # As load_task encodes a training record: alpaca's instruction is the prompt (no template).
    first = safety_records()[0]
    assert got[0] == encode_example(tok, to_examples(TaskConfig(template=None), [
        {"input": first["instruction"], "output": first["output"]}], [], "k")[0], cfg.train.max_seq_len)[0]
    assert len(load_earlier(TaskConfig(**{**vars(src), "max_train_samples": 7}), 0, tok, 96)) == 7


def test_plan_without_earlier_is_the_old_draw(tmp_path, tok_dir):
    cfg, tok, tasks = load(write_run(tmp_path, tok_dir, earlier=[]))
    phases = build_method(cfg, None, tok).plan(tasks)
    # Replay.plan as it was before method.replay.earlier: nothing for task 0, then the same seeds and pools.
    old = [list(tasks[0].train)]
    for i in range(1, len(tasks)):
        n = round(cfg.method.replay.fraction * len(tasks[i].train))
        old.append(list(tasks[i].train) + replay_samples([t.train for t in tasks[:i]], n, cfg.seed, i))
    assert [p.train for p in phases] == old
    assert len(phases[0].train) == len(tasks[0].train) and len(phases[1].train) > len(tasks[1].train)


@pytest.mark.parametrize("method", ["replay", "osft-replay"])
def test_plan_with_earlier_replays_into_every_task(tmp_path, tok_dir, method):
    """osft-replay plans its data as replay does (its steps go through osft's projector)."""
    cfg, tok, tasks = load(write_run(tmp_path, tok_dir, method=method))
    safety = load_earlier(cfg.method.replay.earlier[0], 0, tok, cfg.train.max_seq_len)
    phases = build_method(cfg, None, tok).plan(tasks)
    a, b = len(tasks[0].train), len(tasks[1].train)
    assert [len(p.train) for p in phases] == [a + round(0.5 * a), b + round(0.5 * b)]
    # Task 0 replays the earlier source only; its draw is the pool's (earlier first), seeded as before.
    first = phases[0].train[a:]
    assert first == replay_samples([safety], round(0.5 * a), cfg.seed, 0)
    assert all(s in safety for s in first)
    # Task 1 draws from the earlier source and task 0 together.
    second = phases[1].train[b:]
    assert second == replay_samples([safety, tasks[0].train], round(0.5 * b), cfg.seed, 1)
    assert any(s in safety for s in second) and any(s in tasks[0].train for s in second)
    assert len(tasks[0].train) == a  # the task's own list is not extended


# ---------------------------------------------------------------------------------------------
# Preflight and the --check plan


def test_preflight_refuses_a_bad_earlier_file_in_one_line(tmp_path, tok_dir):
    bad = safety_records(4) + [{"instruction": "What now?", "input": ""}]  # record 4: no output
    cfg = load_config(write_run(tmp_path, tok_dir, records=bad))
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("method.replay.earlier.0 (safety).train (") and \
        "record 4 has no field 'output'" in msg, msg
    (tmp_path / "data" / "safety.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^method\.replay\.earlier\.0 \(safety\)\.train: .*safety\.jsonl is empty"):
        check_data(cfg)
    check_data(load_config(write_run(tmp_path, tok_dir)))  # the good file passes


def test_phase_sizes_count_the_replay_into_task_0():
    from ds_cl.training.config import RunConfig

    cfg = RunConfig(tasks=[TaskConfig(name="a"), TaskConfig(name="b")])
    cfg.method.name, cfg.method.replay.fraction = "replay", 0.5
    assert phase_sizes(cfg, [40, 20]) == [("a", 40), ("b", 30)]  # as before
    assert phase_sizes(cfg, [40, 20], [10]) == [("a", 60), ("b", 30)]
    cfg.method.name = "osft-replay"
    assert phase_sizes(cfg, [40, 20], [10]) == [("a", 60), ("b", 30)]
    cfg.method.name = "seqft"
    assert phase_sizes(cfg, [40, 20], [10]) == [("a", 40), ("b", 20)]


def test_check_plan_matches_replay_plan(tmp_path, tok_dir, monkeypatch):
    """The --check plan's records and samples per phase are what Replay.plan trains on."""
    import ds_cl.training.data as D

    path = write_run(tmp_path, tok_dir)
    cfg, tok, tasks = load(path, "method.replay.earlier.0.max_train_samples=15")
    chk = Check(str(path))
    reads, read_records = [], D.read_records
    monkeypatch.setattr(D, "read_records", lambda source, *a, **k: reads.append(source) or read_records(source, *a, **k))
    check_tasks(cfg, chk, tok)
    monkeypatch.undo()
    assert not chk.errors, chk.errors
    # each training file read once, counted and tokenised from the same records
    assert sorted(reads) == sorted([t.train for t in cfg.tasks] + [s.train for s in cfg.method.replay.earlier])
    assert chk.plan["replay_earlier"] == [{"name": "safety", "records": N_SAFETY, "train": 15,
                                           "tokens": chk.plan["replay_earlier"][0]["tokens"]}]
    assert chk.plan["replay_earlier"][0]["tokens"]["of"] == 15
    phases = build_method(cfg, None, tok).plan(tasks)
    assert [p["samples"] for p in chk.plan["phases"]] == [len(p.train) for p in phases]
    assert chk.plan["phases"][0]["samples"] > len(tasks[0].train)


def test_osft_replay_is_osft_with_replays_data(tmp_path, tok_dir):
    """Every hook but plan() is osft's: the projector's state is checkpointed, the non-target group's
    learning rate is osft's, the subspace is fitted and extended at task boundaries."""
    from ds_cl.methods.base import Method
    from ds_cl.methods.osft import OSFT, OSFTReplay
    from ds_cl.methods.plain import Replay

    cfg, tok, _ = load(write_run(tmp_path, tok_dir, method="osft-replay"))
    m = build_method(cfg, None, tok)
    assert type(m) is OSFTReplay and m.has_state and m.opts is cfg.method.osft
    assert type(m).plan is Replay.plan
    for hook in ("bind", "start_task", "group_lrs", "step", "step_metrics", "state_dict", "load_state_dict"):
        assert getattr(type(m), hook) is getattr(OSFT, hook) is not getattr(Method, hook), hook


# ---------------------------------------------------------------------------------------------
# method.replay.fraction_of: earlier (a fixed buffer of each earlier source)


@pytest.mark.parametrize("method", ["replay", "osft-replay"])
def test_fraction_of_earlier_replays_a_fixed_buffer_of_each_source(tmp_path, tok_dir, method):
    path = write_run(tmp_path, tok_dir, method=method)
    cfg, tok, tasks = load(path, "method.replay.fraction_of=earlier")
    safety = load_earlier(cfg.method.replay.earlier[0], 0, tok, cfg.train.max_seq_len)
    phases = build_method(cfg, None, tok).plan(tasks)
    a, b = len(tasks[0].train), len(tasks[1].train)
    k_safety, k_a = round(0.5 * len(safety)), round(0.5 * a)
    assert [len(p.train) for p in phases] == [a + k_safety, b + k_safety + k_a]
    buf0, buf1 = phases[0].train[a:], phases[1].train[b:]
    # The safety buffer is the same samples in both tasks (drawn once), distinct samples of the source.
    assert buf1[:k_safety] == buf0 and all(s in safety for s in buf0)
    assert len({id(s) for s in buf0}) == k_safety
    assert all(s in tasks[0].train for s in buf1[k_safety:])
    # Another seed draws another buffer.
    other = build_method(load(path, "method.replay.fraction_of=earlier", f"seed={cfg.seed + 1}")[0], None,
                         tok).plan(tasks)
    assert [s.input_ids for s in other[0].train[a:]] != [s.input_ids for s in buf0]


def test_fraction_of_earlier_in_the_check_plan_and_its_refusals(tmp_path, tok_dir):
    path = write_run(tmp_path, tok_dir)
    cfg, tok, tasks = load(path, "method.replay.fraction_of=earlier", "method.replay.earlier.0.max_train_samples=15")
    chk = Check(str(path))
    check_tasks(cfg, chk, tok)
    assert not chk.errors, chk.errors
    phases = build_method(cfg, None, tok).plan(tasks)
    assert [p["samples"] for p in chk.plan["phases"]] == [len(p.train) for p in phases]
    with pytest.raises(ConfigError, match=r": method\.replay\.fraction: must be <= 1 with fraction_of: earlier"):
        load(path, "method.replay.fraction_of=earlier", "method.replay.fraction=1.5")
    with pytest.raises(ConfigError, match=r"method\.replay\.fraction_of"):
        load(path, "method.replay.fraction_of=newest")
