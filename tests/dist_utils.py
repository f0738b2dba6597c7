"""Launch real DeepSpeed CPU ranks (gloo) from tests: the way every distributed test here runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ds_cl.training.environment import free_port

REPO = Path(__file__).resolve().parents[1]
# What `launch` starts for `ds-cl train` (as the launchers do).
TRAIN = ("--module", "ds_cl.cli", "train")


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        # Two cores here: one thread per rank avoids oversubscription stalls in gloo collectives.
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def launch(script: str | Path | tuple, nprocs: int, *args: str, timeout: int = 900, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus nprocs script args...` on CPU and return the finished process.

    On failure (check=True) the assertion message carries the ranks' output, so a broken
    distributed test says why without re-running it.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
           "--master_port", str(free_port()), *(script if isinstance(script, tuple) else [str(script)]),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc
