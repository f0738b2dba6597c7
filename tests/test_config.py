"""Run-config validation: every bad input is a one-line ConfigError naming the key and the file."""

import pytest
import yaml

from ds_cl.training.config import ConfigError, RunConfig, load_config, save_config

from tests.fixtures import FIXTURES


def base(tmp_path):
    return {
        "output_dir": str(tmp_path / "out"),
        "model": {"config": {"model_type": "llama", "hidden_size": 32}, "tokenizer": str(FIXTURES / "task_a.jsonl")},
        "tasks": [{"name": "a", "train": str(FIXTURES / "task_a.jsonl")}],
    }


def write(tmp_path, data, text=None):
    p = tmp_path / "run.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(data))
    return p


def err(tmp_path, data=None, overrides=(), text=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data, text), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and "run.yaml" in msg
    return msg


def test_valid_config_defaults_follow_the_paper(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path)))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-5 and cfg.train.epochs == 1 and cfg.train.global_batch_size == 8
    assert cfg.model.dtype == "bfloat16" and cfg.method.name == "osft"
    assert cfg.method.osft.mrr == 0.1 and cfg.method.osft.trr == 0.8
    assert "Choose one from the option" in cfg.tasks[0].instruction


def test_overrides_apply_with_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path)),
                      ["train.lr=2e-5", "method.name=seqft", "tasks.0.max_train_samples=7", "method.osft.targets=[q_proj]"])
    assert cfg.train.lr == 2e-5 and cfg.method.name == "seqft"
    assert cfg.tasks[0].max_train_samples == 7 and cfg.method.osft.targets == ["q_proj"]


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path)), ["train.lr=3e-4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_bad_yaml(tmp_path):
    assert "not valid YAML" in err(tmp_path, text="tasks: [unclosed\n")


def test_unknown_key(tmp_path):
    d = base(tmp_path)
    d["train"] = {"learning_rate": 1e-5}
    assert "unknown key 'train.learning_rate'" in err(tmp_path, d)
    assert "unknown key 'tasks.0.bogus'" in err(tmp_path, base(tmp_path), ["tasks.0.bogus=1"])


def test_wrong_type(tmp_path):
    d = base(tmp_path)
    d["train"] = {"micro_batch_size": "four"}
    assert "train.micro_batch_size: expected an integer" in err(tmp_path, d)
    assert "method.name: must be one of" in err(tmp_path, base(tmp_path), ["method.name=lora"])
    assert "eval.before_training: expected true/false" in err(tmp_path, base(tmp_path), ["eval.before_training=3"])


def test_missing_files(tmp_path):
    d = base(tmp_path)
    d["tasks"][0]["train"] = str(tmp_path / "nope.jsonl")
    assert "tasks.0.train: no such file" in err(tmp_path, d)
    d = base(tmp_path)
    d["deepspeed"] = str(tmp_path / "ds.json")
    assert "deepspeed: no such file" in err(tmp_path, d)
    d = base(tmp_path)
    d["model"]["tokenizer"] = "./missing.model"
    assert "model.tokenizer: no such file" in err(tmp_path, d)


def test_tasks_must_be_present_and_named(tmp_path):
    d = base(tmp_path)
    d["tasks"] = []
    assert "tasks: needs at least one task" in err(tmp_path, d)
    d = base(tmp_path)
    d["tasks"].append(dict(d["tasks"][0]))
    assert "duplicate task name" in err(tmp_path, d)
    assert "tasks.0.template" in err(tmp_path, base(tmp_path), ["tasks.0.template='{question}'"])


def test_range_checks(tmp_path):
    assert "method.osft.mrr" in err(tmp_path, base(tmp_path), ["method.osft.mrr=0.9", "method.osft.trr=0.5"])
    assert "train.epochs: must be >= 1" in err(tmp_path, base(tmp_path), ["train.epochs=0"])
    assert "output_dir: is required" in err(tmp_path, base(tmp_path), ["output_dir="])
    for bad in ("0", "-5", ".nan", ".inf"):
        assert "train.dist_timeout_minutes: must be > 0 and at most 1000000 (minutes)" in err(
            tmp_path, base(tmp_path), [f"train.dist_timeout_minutes={bad}"])
    assert "train.dist_timeout_minutes: expected a number" in err(tmp_path, base(tmp_path),
                                                                  ["train.dist_timeout_minutes=soon"])
    cfg = load_config(write(tmp_path, base(tmp_path)), ["train.dist_timeout_minutes=0.5"])
    assert cfg.train.dist_timeout_minutes == 0.5


def test_osft_boundary_keys(tmp_path):
    """method.osft.boundary / input_energy: defaults, accepted values, and one-line errors for bad ones."""
    o = load_config(write(tmp_path, base(tmp_path))).method.osft
    assert (o.boundary, o.input_energy) == ("update", 0.99)
    o = load_config(write(tmp_path, base(tmp_path)), ["method.osft.boundary=inputs", "method.osft.input_energy=1"]).method.osft
    assert (o.boundary, o.input_energy) == ("inputs", 1.0)
    assert "method.osft.boundary: must be one of 'update', 'inputs', got 'outputs'" in err(
        tmp_path, base(tmp_path), ["method.osft.boundary=outputs"])
    for bad in ("0", "-0.5", "1.01", ".nan"):
        assert "method.osft.input_energy: must be in (0, 1]" in err(tmp_path, base(tmp_path),
                                                                    [f"method.osft.input_energy={bad}"])
    msg = err(tmp_path, base(tmp_path), ["method.osft.boundary=inputs", "method.osft.subspace=refit"])
    assert "method.osft.boundary: inputs needs method.osft.subspace: accumulate" in msg, msg


def test_osft_protect_inputs_of_key(tmp_path):
    """method.osft.protect_inputs_of: null by default; a list of sources as method.replay.earlier's (paths
    resolved against the config's folder); one-line errors without subspace accumulate, with projection
    paper (boundary: inputs too), for a method that does not project, and for a missing file."""
    o = load_config(write(tmp_path, base(tmp_path))).method.osft
    assert o.protect_inputs_of is None
    (tmp_path / "safety.jsonl").write_text('{"instruction": "Do harm.", "input": "", "output": "No."}\n')
    src = {"name": "safety", "train": "safety.jsonl", "format": "alpaca"}
    data = {**base(tmp_path), "method": {"name": "osft", "osft": {"protect_inputs_of": [src]}}}
    got = load_config(write(tmp_path, data)).method.osft.protect_inputs_of
    assert [(s.name, s.train, s.format) for s in got] == [("safety", str(tmp_path / "safety.jsonl"), "alpaca")]
    msg = err(tmp_path, data, ["method.osft.subspace=refit"])
    assert "method.osft.protect_inputs_of: needs method.osft.subspace: accumulate" in msg, msg
    msg = err(tmp_path, data, ["method.osft.projection=paper"])
    assert "method.osft.protect_inputs_of: needs method.osft.projection: two_sided" in msg, msg
    msg = err(tmp_path, base(tmp_path), ["method.osft.boundary=inputs", "method.osft.projection=paper"])
    assert "method.osft.boundary: inputs needs method.osft.projection: two_sided" in msg, msg
    msg = err(tmp_path, data, ["method.name=seqft"])
    assert "method.osft.protect_inputs_of: only method.name: osft or osft-replay protects" in msg, msg
    msg = err(tmp_path, data, ["method.osft.protect_inputs_of.0.train=missing.jsonl"])
    assert f"method.osft.protect_inputs_of.0.train: no such file: {tmp_path / 'missing.jsonl'}" in msg, msg
    msg = err(tmp_path, data, ["method.osft.protect_inputs_of.0.eval_size=5"])
    assert "method.osft.protect_inputs_of.0.eval_size: is not used" in msg, msg
    msg = err(tmp_path, data, ["method.osft.protect_inputs_of=alignment"])
    assert "method.osft.protect_inputs_of: expected list or NoneType, got 'alignment'" in msg, msg
    assert "is an empty list" in err(tmp_path, data, ["method.osft.protect_inputs_of=[]"])


def test_osft_defaults_follow_protect_inputs_of(tmp_path):
    """fit_before_first_task and non_target_lr_scale default to the method as published (true, 1.0) without
    protect_inputs_of and to the retention ablation's winner (false, 0.0) with it; a value set in the file
    or on the command line is kept either way, and the saved config holds the resolved values."""
    o = load_config(write(tmp_path, base(tmp_path))).method.osft
    assert (o.fit_before_first_task, o.non_target_lr_scale) == (True, 1.0)
    (tmp_path / "safety.jsonl").write_text('{"instruction": "Do harm.", "input": "", "output": "No."}\n')
    src = {"name": "safety", "train": "safety.jsonl", "format": "alpaca"}
    data = {**base(tmp_path), "method": {"name": "osft", "osft": {"protect_inputs_of": [src]}}}
    cfg = load_config(write(tmp_path, data))
    assert (cfg.method.osft.fit_before_first_task, cfg.method.osft.non_target_lr_scale) == (False, 0.0)
    save_config(cfg, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())["method"]["osft"]
    assert (saved["fit_before_first_task"], saved["non_target_lr_scale"]) == (False, 0.0)
    assert load_config(tmp_path / "resolved.yaml") == cfg
    o = load_config(write(tmp_path, data), ["method.osft.fit_before_first_task=true",
                                            "method.osft.non_target_lr_scale=1.0"]).method.osft
    assert (o.fit_before_first_task, o.non_target_lr_scale) == (True, 1.0)
    o = load_config(write(tmp_path, base(tmp_path)), ["method.osft.non_target_lr_scale=0"]).method.osft
    assert (o.fit_before_first_task, o.non_target_lr_scale) == (True, 0.0)


def test_gradient_checkpointing_key_reaches_the_model(tmp_path):
    """model.gradient_checkpointing (YAML or override) switches HF gradient checkpointing on in build_model."""
    from ds_cl.training.modeling import build_model
    from tests.fixtures import tiny_run_config, train_sentencepiece, write_run_config

    train_sentencepiece(tmp_path / "tok.model")
    path = write_run_config(tiny_run_config(tmp_path, tmp_path / "out"))
    for overrides, expected in (([], False), (["model.gradient_checkpointing=true"], True)):
        cfg = load_config(path, overrides)
        assert cfg.model.gradient_checkpointing is expected
        model, _ = build_model(cfg.model, {"zero_optimization": {"stage": 0}}, seed=0)
        on = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5.x name
        assert (model.is_activation_checkpointing if on is not None else model.is_gradient_checkpointing) is expected


def test_shipped_run_configs_load():
    """configs/*.yaml are what a newcomer copies first: each must pass validation as shipped (the model
    folder comes from `make model`, which `make test` runs)."""
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(path)
        assert cfg.tasks and all(Path(t.train).exists() for t in cfg.tasks), path


def test_resume_accepts_and_lists_only_changes_that_keep_the_runs_meaning(tmp_path):
    from ds_cl.training.preflight import check_saved_config

    data = base(tmp_path)
    path = write(tmp_path, data)
    (tmp_path / "out").mkdir()
    save_config(load_config(path), tmp_path / "out" / "config.yaml")
    assert check_saved_config(load_config(path), resume=True, config_path=path) == []
    safe = load_config(path, ["eval.batch_size=64", "checkpoint.keep=5", "train.dist_timeout_minutes=120"])
    assert check_saved_config(safe, resume=True) == ["checkpoint.keep 2 -> 5", "eval.batch_size 8 -> 64",
                                                     "train.dist_timeout_minutes 60.0 -> 120.0"]
    for override, key in (("seed=1", "seed"), ("train.global_batch_size=16", "train.global_batch_size"),
                          ("method.name=seqft", "method.name"), ("train.lr=1e-3", "train.lr")):
        with pytest.raises(ConfigError, match=f"differs from the run's .*{key} "):
            check_saved_config(load_config(path, [override]), resume=True)
    # A fresh run over a finished one's folder (no checkpoint left) may replace ds-cl's own file.
    assert check_saved_config(load_config(path, ["seed=1"]), resume=False) == []
