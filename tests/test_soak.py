"""Soak: a 20-task sequence on the tiny model, 2 ZeRO-3 CPU ranks, a checkpoint after every task with
`keep: 2`. The ranks' resident memory and the run folder's size must stay flat once the first tasks are
done, and nothing may be left in /dev/shm. docs/reliability.md records the curve."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_utils import REPO, cpu_env
from tests.fixtures import FIXTURES, train_sentencepiece
from tests.reliability_utils import launch_cmd, tiny_config

pytestmark = pytest.mark.distributed
TASKS = 20


def rank_rss_mb(launcher_pid: int) -> float:
    """Sum of the resident memory of the training ranks: the launcher's descendants running ds_cl."""
    import psutil

    total = 0.0
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "ds_cl.cli" in " ".join(p.cmdline()) and any(a.startswith("--local_rank") for a in p.cmdline()):
                total += p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return total


def folder_mb(path: Path) -> float:
    """The run folder's size, without a checkpoint being written at that moment (`.tmp-*`)."""
    total = 0
    # os.walk skips a folder removed while it walks (the checkpoint rotation); rglob raised on it.
    for root, _, files in os.walk(path):
        if ".tmp-" in os.path.relpath(root, path):
            continue
        for name in files:
            if ".tmp-" in name:
                continue
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # renamed or removed while we walked
                continue
    return total / 2**20


def test_twenty_tasks_memory_and_disk_stay_flat(tmp_path):
    train_sentencepiece(tmp_path / "tok.model")
    out = tmp_path / "soak"
    tasks = [{"name": f"t{i}", "train": str(FIXTURES / "task_a.jsonl"), "eval_size": 4,
              "instruction": "Is the review positive or negative?"} for i in range(TASKS)]
    cfg = tiny_config(tmp_path, out, steps=2, tasks=tasks, checkpoint={"every_steps": 0, "keep": 2},
                      output={"plots": False, "export_each_task": False}, eval={"batch_size": 8, "max_new_tokens": 2})
    shm_before = {p.name for p in Path("/dev/shm").iterdir()}
    cmd = launch_cmd(cfg)
    port = cmd[cmd.index("--master_port") + 1]
    log = open(tmp_path / "soak.log", "w")  # a file, not a pipe: nothing blocks on a full pipe buffer
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    # Per finished-task count: the ranks' largest RSS and the run folder's smallest size seen while it
    # held (a save in flight briefly holds a third checkpoint: transient, not growth).
    samples: dict[int, tuple[float, float]] = {}
    try:
        while proc.poll() is None:
            try:
                done = len(json.loads((out / "cl_matrix.json").read_text())["matrix"])
            except (OSError, ValueError):  # not written yet
                done = 0
            if done:
                rss, disk = rank_rss_mb(proc.pid), folder_mb(out)
                old = samples.get(done, (0.0, float("inf")))
                samples[done] = (max(old[0], rss), min(old[1], disk))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()
    stdout = (tmp_path / "soak.log").read_text()
    assert proc.returncode == 0, stdout[-3000:]
    curve = [(k, round(r, 1), round(d, 3)) for k, (r, d) in sorted(samples.items())]
    print("soak curve (tasks done, ranks' RSS MB, run folder MB):", curve)
    # From task 4 (after the first checkpoints and caches) to the one before the last (the run's end
    # writes its final model and outputs once).
    late = [c for c in curve if 4 <= c[0] < TASKS and c[1] > 0]
    assert len(late) >= 10, curve
    rss = [c[1] for c in late]
    disk = [c[2] for c in late]
    assert max(rss) < 1.10 * min(rss), f"resident memory grew over the tasks: {curve}"
    assert max(disk) < 1.15 * min(disk), f"the run folder grew with keep: 2: {curve}"
    assert len(list((out / "checkpoints").glob("step_*"))) == 2
    # This run's segments: deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}. Another test's
    # run (the other xdist worker's) holds its own for a moment while its process group starts.
    leftover = {p.name for p in Path("/dev/shm").iterdir()} - shm_before
    ours = [n for n in leftover if n.startswith("deepspeed") and n.rsplit("_", 2)[-2:-1] == [port]]
    assert not ours, (port, sorted(leftover))
