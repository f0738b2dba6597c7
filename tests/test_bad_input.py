"""The bad-input table of docs/reliability.md, kept true: every row is run here (one process, no
DeepSpeed ranks), must exit 2 with exactly one error line containing the row's text, and must leave
an existing output folder as it was. Plus the security basics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ds_cl.tools import launch_checks
from ds_cl.training.config import CONFIG_HEADER
from ds_cl.training import train as ds_train
from tests.dist_utils import REPO
from tests.fixtures import FIXTURES, train_sentencepiece
from tests.reliability_utils import tiny_config

DOC = REPO / "docs" / "reliability.md"


def table() -> list[tuple[str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([a-z0-9-]+)` \|.*\| `(.+)` \|\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_sentencepiece(d / "tok.model")
    return d


def edit(path: Path, fn) -> Path:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def data_file(tmp: Path, name: str, content: bytes) -> str:
    p = tmp / name
    p.write_bytes(content)
    return str(p)


def set_task(**kv):
    return lambda c: c["tasks"][0].update(kv)


# Each setup gets (tmp, config path) and returns (command, argv): command "train", "launch" (launch_checks) or
# "shell" (argv: a launcher script and its arguments, run by bash).
def _case(cid: str, tmp: Path, cfg: Path, monkeypatch):
    good = (FIXTURES / "task_a.jsonl").read_bytes()
    if cid == "config-missing":
        return "train", [str(tmp / "nope.yaml")]
    if cid == "config-yaml":
        cfg.write_text("train: [1, 2\n")
    elif cid == "config-yaml-tab":
        cfg.write_text("train:\n  lr: 0.1\n\tseed: 2\n")
    elif cid == "config-unknown-key":
        edit(cfg, lambda c: c["train"].update(lrr=1))
    elif cid == "config-type":
        edit(cfg, lambda c: c["train"].update(lr="fast"))
    elif cid == "config-no-tasks":
        edit(cfg, lambda c: c.update(tasks=[]))
    elif cid == "config-duplicate-task":
        edit(cfg, lambda c: c["tasks"][1].update(name="a"))
    elif cid == "config-duplicate-key":
        cfg.write_text(cfg.read_text() + "train: {lr: 0.1}\n")
    elif cid == "config-negative-count":
        edit(cfg, set_task(max_train_samples=-1))
    elif cid == "config-adam-betas":
        edit(cfg, lambda c: c["train"].update(betas=[0.9, 1.5]))
    elif cid == "config-grad-clip":
        edit(cfg, lambda c: c["train"].update(grad_clip=-1))
    elif cid == "config-eval-tokens":
        edit(cfg, lambda c: c["eval"].update(max_new_tokens=0))
    elif cid == "config-template-attribute":
        edit(cfg, set_task(template="{input.upper}"))
    elif cid == "config-targets-nomatch":
        edit(cfg, lambda c: c["method"].update(osft={"rank": "fixed", "ratio": 0.5, "targets": ["nope_proj"]}))
    elif cid == "config-metric-not-callable":
        edit(cfg, set_task(metric="math:pi"))
    elif cid == "model-heads":
        edit(cfg, lambda c: c["model"]["config"].update(hidden_size=30, num_attention_heads=4, num_key_value_heads=2))
    elif cid == "data-fewer-than-batch":
        lines = good.splitlines()
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", b"\n".join(lines[:10]) + b"\n")))
    elif cid == "data-null-output":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", good + b'\n{"input": "a", "output": null}\n')))
    elif cid == "data-csv-missing-cell":
        edit(cfg, set_task(train=data_file(tmp, "task.csv", b"input,output\nthe food was fine,positive\nawful\n")))
    elif cid == "data-label-not-offered":
        edit(cfg, set_task(labels=["positive", "neutral"]))
    elif cid == "data-option-not-offered":
        edit(cfg, lambda c: (c["eval"].update(scoring="options"), set_task(options=["positive", "neutral"])(c)))
    elif cid == "ds-misspelt-key":
        edit(cfg, lambda c: c.update(deepspeed={"zero_optimisation": {"stage": 3}}))
    elif cid == "ds-zero-unknown-key":
        edit(cfg, lambda c: c.update(deepspeed={"zero_optimization": {"stage": 3, "overlap_com": True}}))
    elif cid == "override-syntax":
        return "train", [str(cfg), "train.lr"]
    elif cid == "data-missing":
        edit(cfg, set_task(train=str(tmp / "none.jsonl")))
    elif cid == "data-malformed-jsonl":
        lines = good.splitlines()
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", b"\n".join(lines[:2] + [b'{"input": "x",'] + lines[3:]))))
    elif cid == "data-not-object":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", good.splitlines()[0] + b'\n["input", "output"]\n')))
    elif cid == "data-jsonl-array":
        records = [json.loads(line) for line in good.splitlines() if line.strip()]
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", json.dumps(records, indent=1).encode())))
    elif cid == "data-json-not-objects":
        records = [{"input": "fine", "output": "positive"}, "oops", {"input": "bad", "output": "negative"}]
        edit(cfg, set_task(train=data_file(tmp, "task.json", json.dumps(records).encode())))
    elif cid == "data-empty":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", b"")))
    elif cid == "data-encoding":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", good.splitlines()[0] + b'\n{"input": "caf\xe9", "output": "positive"}\n')))
    elif cid == "data-missing-field":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", b'{"input": "a"}\n{"input": "b"}\n{"input": "c"}\n')))
    elif cid == "data-empty-answer":
        edit(cfg, set_task(train=data_file(tmp, "task.jsonl", good + b'\n{"input": "a", "output": " "}\n')))
    elif cid == "data-eval-empty":
        edit(cfg, set_task(eval=data_file(tmp, "task_eval.csv", b"")))
    elif cid == "model-missing":
        edit(cfg, lambda c: c["model"].update(name_or_path=str(tmp / "no_model"), config=None))
    elif cid == "model-no-config":
        (tmp / "m").mkdir()
        edit(cfg, lambda c: c["model"].update(name_or_path=str(tmp / "m"), config=None))
    elif cid == "model-pickle-only":
        (tmp / "m").mkdir()
        (tmp / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 400}))
        (tmp / "m" / "pytorch_model.bin").write_bytes(b"\0")
        edit(cfg, lambda c: c["model"].update(name_or_path=str(tmp / "m"), config=None))
    elif cid == "model-no-tokenizer":
        (tmp / "m").mkdir()
        (tmp / "m" / "config.json").write_text(json.dumps(yaml.safe_load(cfg.read_text())["model"]["config"]))
        (tmp / "m" / "model.safetensors").write_bytes(b"\0")  # read after the checks: they only look for one
        edit(cfg, lambda c: c["model"].update(name_or_path=str(tmp / "m"), config=None, tokenizer=None))
    elif cid == "tokenizer-missing":
        edit(cfg, lambda c: c["model"].update(tokenizer=str(tmp / "none.model")))
    elif cid == "config-osft-reference-refit":
        (tmp / "ref").mkdir()
        edit(cfg, lambda c: c["method"].setdefault("osft", {}).update(protect_update_from=str(tmp / "ref"),
                                                                      subspace="refit"))
    elif cid == "model-osft-reference-missing":
        from safetensors.torch import save_file
        import torch

        (tmp / "ref").mkdir()
        save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp / "ref" / "model.safetensors"))
        edit(cfg, lambda c: c["method"].setdefault("osft", {}).update(protect_update_from=str(tmp / "ref")))
    elif cid == "vocab-mismatch":
        edit(cfg, lambda c: c["model"]["config"].update(vocab_size=100))
    elif cid == "ds-batch-conflict":
        edit(cfg, lambda c: c["deepspeed"].update(train_batch_size=16))
    elif cid == "ds-dtype-conflict":
        edit(cfg, lambda c: c["deepspeed"].update(bf16={"enabled": True}))
    elif cid == "ds-zero1-osft":
        edit(cfg, lambda c: c["deepspeed"].update(zero_optimization={"stage": 1}))
    elif cid == "ds-json":
        (tmp / "ds.json").write_text("{zero: 3}")
        edit(cfg, lambda c: c.update(deepspeed="ds.json"))
    elif cid == "ds-world":
        monkeypatch.setenv("WORLD_SIZE", "3")
    elif cid == "output-exists":
        (tmp / "out" / "checkpoints").mkdir()
        (tmp / "out" / "checkpoints" / "latest").write_text("step_00000004\n")
    elif cid == "output-is-file":
        edit(cfg, lambda c: c.update(output_dir=str(tmp / "out" / "metrics.jsonl")))
    elif cid == "output-user-config":
        (tmp / "out" / "config.yaml").write_text("# my settings\nseed: 3\n")
    elif cid == "resume-changed-seed":
        from ds_cl.training.config import load_config, save_config

        save_config(load_config(cfg, ["seed=99"]), tmp / "out" / "config.yaml")
        return "train", [str(cfg), "--resume"]
    elif cid == "resume-nothing":
        edit(cfg, lambda c: c.update(output_dir=str(tmp / "ouput")))
        return "train", [str(cfg), "--resume"]
    elif cid.startswith("launch-no-package"):
        # python3 first on PATH, the default PYTHON, is an interpreter without ds_cl and deepspeed: isolated
        # (-I: no working directory on sys.path) and without site-packages (-S).
        (tmp / "bin").mkdir()
        (tmp / "bin" / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
        (tmp / "bin" / "python3").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("PYTHON", raising=False)
        if cid.endswith("slurm"):
            monkeypatch.setenv("SLURM_JOB_ID", "1")
            monkeypatch.setenv("LOG_DIR", str(tmp / "logs"))
            return "shell", [str(REPO / "launchers" / "slurm" / "llama2_7b.sbatch"), "--dry-run", str(cfg)]
        return "shell", [str(REPO / "launchers" / "single_node.sh"), "--dry-run", str(cfg)]
    elif cid.startswith("launch-"):
        hf = tmp / "hostfile"
        hf.write_text({"launch-duplicate-host": "n1 slots=2\nn2 slots=2\nn1 slots=2\n",
                       "launch-too-many-nodes": "n1 slots=2\n",
                       "launch-bad-slots": "n1 slots=x\n"}[cid])
        nodes = "3" if cid == "launch-too-many-nodes" else "1"
        return "launch", ["preflight", "--config", str(cfg), "--nodes", nodes, "--gpus-per-node", "2",
                          "--hostfile", str(hf)]
    else:
        raise KeyError(cid)
    return "train", [str(cfg)]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_table_has_20_cases_across_every_input():
    rows = table()
    assert len(rows) >= 20 and len({r[0] for r in rows}) == len(rows)
    kinds = {cid.split("-")[0] for cid, _ in rows}
    assert kinds >= {"config", "data", "model", "tokenizer", "vocab", "ds", "launch", "output", "override"}


@pytest.mark.parametrize("cid,expect", table(), ids=[r[0] for r in table()])
def test_bad_input(cid, expect, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run's outputs
    (out / "config.yaml").write_text(CONFIG_HEADER + "old: true\n")  # written by an earlier ds-cl run
    cfg = tiny_config(tok, out)
    cfg = cfg.rename(tmp_path / "run.yaml")
    command, argv = _case(cid, tmp_path, cfg, monkeypatch)
    before = snapshot(out)
    if command == "shell":  # a launcher script, run by bash
        p = subprocess.run(["bash", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        rc, stderr = p.returncode, p.stderr
    else:
        rc = ds_train.main(argv) if command == "train" else launch_checks.main(argv)
        stderr = capsys.readouterr().err
    err = [l for l in stderr.splitlines() if l.strip()]
    assert rc == 2, err
    prefix = "ds-cl train: " if command == "train" else "ds-cl launch: error: "
    assert len(err) == 1 and err[0].startswith(prefix), err
    assert expect in err[0], err[0]
    assert snapshot(out) == before  # nothing written over existing outputs


def test_cli_exit_status_and_no_traceback(tok, tmp_path):
    """The real command line: `ds-cl train` of a config with a malformed data file."""
    cfg = tiny_config(tok, tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": \n')
    edit(cfg, set_task(train=str(bad)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ds_cl.cli", "train", str(cfg)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"ds-cl train: tasks.0 (a).train: {bad}:2: malformed JSON line "
                                                 "(Expecting value at column 11)")
    assert not (tmp_path / "out").exists()


def test_resume_or_start_starts_where_resume_refuses(tok, tmp_path):
    """--resume into a folder without a run is refused (row resume-nothing); --resume-or-start, which a requeued
    SLURM job passes (it may have been preempted before it wrote anything), starts the run there instead."""
    from ds_cl.training.config import ConfigError, load_config
    from ds_cl.training.preflight import check_output_dir

    cfg = load_config(tiny_config(tok, tmp_path / "out"))
    with pytest.raises(ConfigError, match="holds no run to resume"):
        check_output_dir(cfg, resume=True)
    check_output_dir(cfg, resume=True, start_ok=True)
    args = ds_train.parse_args([str(tmp_path / "out.yaml"), "--resume-or-start"])
    assert args.resume_or_start and not args.resume
    (tmp_path / "out").mkdir()  # a run that got as far as its config.yaml, but not to a checkpoint
    (tmp_path / "out" / "config.yaml").write_text(CONFIG_HEADER)
    check_output_dir(cfg, resume=True)


# -- security basics -------------------------------------------------------------------------------

SOURCES = sorted((REPO / "ds_cl").rglob("*.py")) + sorted((REPO / "launchers").rglob("*.py"))


def test_security_torch_load_weights_only_and_no_remote_code():
    bad = []
    for f in SOURCES:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{f.relative_to(REPO)}:{n}: torch.load without weights_only=True: {line.strip()}")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                bad.append(f"{f.relative_to(REPO)}:{n}: trust_remote_code=True: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(", code):
                bad.append(f"{f.relative_to(REPO)}:{n}: pickle.load: {line.strip()}")
            if re.search(r"\.save_pretrained\([^)]*safe_serialization\s*=\s*False", code):
                bad.append(f"{f.relative_to(REPO)}:{n}: weights saved as a pickle: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_security_weights_are_safetensors_only():
    # The export writes safetensors (save_file), never torch.save of a state dict.
    export = (REPO / "ds_cl" / "training" / "export.py").read_text()
    assert "save_file(" in export and "torch.save(" not in export
    # torch.save is used only for projector/RNG states, each read back with weights_only=True: the
    # checkpoint manager's and the HF Trainer integration's (its per-rank file in a Trainer checkpoint).
    users = sorted(str(f.relative_to(REPO)) for f in SOURCES if "torch.save(" in f.read_text())
    allowed = {"ds_cl/training/checkpoint.py", "ds_cl/methods/lora.py", "ds_cl/integrations/hf_trainer.py"}
    assert "ds_cl/training/checkpoint.py" in users and set(users) <= allowed, users
    for f in users:
        text = (REPO / f).read_text()
        calls = [text[i:i + 120] for i in range(len(text)) if text.startswith("torch.load(", i)]
        assert all("weights_only=True" in c for c in calls), (f, calls)


def test_a_libraries_value_error_keeps_its_traceback():
    """`ds-cl train` turns ds-cl's own input errors (ValueError with a message for the user) into one line
    and exit 2; a ValueError from inside a library is a bug, not a usage error, and must not be hidden."""
    import json as json_module

    from ds_cl.training.data import to_examples
    from ds_cl.training.config import TaskConfig

    try:
        to_examples(TaskConfig(name="a", train="x"), [{"input": "a"}], [], "tasks.0")
    except ValueError as e:
        assert ds_train._raised_by_ds_cl(e)
    try:
        json_module.loads("{not json")
    except ValueError as e:
        assert not ds_train._raised_by_ds_cl(e)
