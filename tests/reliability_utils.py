"""Shared by the reliability tests: a tiny 2-task ZeRO-3 osft run config and ways to run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.dist_utils import REPO, cpu_env, free_port
from tests.fixtures import FIXTURES

TRAIN = REPO / "ds_cl" / "train.py"


def tiny_config(tmp: Path, out: Path, steps: int = 3, **sections) -> Path:
    """Write `<out>.yaml`: 2 tasks x `steps` optimizer steps, a 2-layer llama; `sections` update the tree
    ({"checkpoint": {"every_steps": 1}} merges into the checkpoint section)."""
    cfg = {
        "output_dir": str(out),
        "seed": 7,
        "deepspeed": {"zero_optimization": {"stage": 3}},
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 400, "max_position_embeddings": 128},
                  "tokenizer": str(tmp / "tok.model"), "dtype": "float32"},
        "method": {"name": "osft", "osft": {"rank": "fixed", "ratio": 0.5}},
        "train": {"lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 8, "max_seq_len": 96,
                  "max_steps_per_task": steps},
        "eval": {"batch_size": 8, "max_new_tokens": 3},
        "checkpoint": {"every_steps": 1, "keep": 3},
        "output": {"export_dtype": "float32", "plots": False},
        "tasks": [
            {"name": "a", "train": str(FIXTURES / "task_a.jsonl"), "eval_size": 6,
             "instruction": "Is the review positive or negative?"},
            {"name": "b", "train": str(FIXTURES / "task_b.csv"), "input_field": "text", "output_field": "label",
             "eval_size": 6},
        ],
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict) and isinstance(cfg.get(sec), dict):
            cfg[sec].update(vals)
        else:
            cfg[sec] = vals
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_cmd(config: Path, *args: str, nprocs: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), str(TRAIN), str(config), *map(str, args)]


def run(config: Path, *args: str, fault: str | None = None, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    """Run `ds-cl train` on 2 CPU ranks; no check of the exit status (the caller asserts it)."""
    env = cpu_env(**({"DS_CL_FAULT": fault} if fault else {}))
    return subprocess.run(launch_cmd(config, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
