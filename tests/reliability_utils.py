"""Shared by the reliability tests: a tiny 2-task ZeRO-3 osft run config and ways to run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from tests.dist_utils import REPO, TRAIN, cpu_env, free_port
from tests.fixtures import tiny_run_config, write_run_config


def tiny_config(tmp: Path, out: Path, steps: int = 3, **sections) -> Path:
    """Write `<out>.yaml`: 2 tasks x `steps` optimizer steps, checkpoints every step; `sections` update the
    tree ({"checkpoint": {"every_steps": 1}} merges into the checkpoint section)."""
    base = {"train": {"max_steps_per_task": steps}, "checkpoint": {"every_steps": 1, "keep": 3},
            "output": {"plots": False}}
    return write_run_config(tiny_run_config(tmp, out, base, sections))


def launch_cmd(config: Path, *args: str, nprocs: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), *TRAIN, str(config), *map(str, args)]


def run(config: Path, *args: str, fault: str | None = None, timeout: int = 600, env: dict | None = None,
        **popen) -> subprocess.CompletedProcess:
    """Run `ds-cl train` on 2 CPU ranks; no check of the exit status (the caller asserts it). `env`: more
    environment variables. The timeout is for a hang, wide enough for a run slowed by the other test worker's
    ranks on the same cores (`make test` runs two files at a time)."""
    env = cpu_env(**({"DS_CL_FAULT": fault} if fault else {}), **(env or {}))
    return subprocess.run(launch_cmd(config, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
