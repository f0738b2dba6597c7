"""Suite-wide settings for `make test`'s two workers (pytest-xdist, `-n 2 --dist loadfile`: every test of a
file runs on one worker, so a file's module fixtures run once). None of this applies to a run in one process.

- Each worker computes in-process with one torch thread: two workers on two cores, each with torch's default
  of a thread per core, would oversubscribe them (the ranks the tests launch already get OMP_NUM_THREADS=1
  from tests.dist_utils.cpu_env).
- Each worker picks master ports from a range of its own (DS_CL_PORT_RANGE, read by
  ds_cl.training.environment.free_port, inherited by every launch the worker starts, the ds-cl tools' own
  included), below the kernel's ephemeral ports: see free_port.
- The heaviest files are handed out first, so that the two workers end at about the same time; the list
  follows CI's per-file times (slowest first), every other file keeps its collection order after them. xdist
  hands out files in this order only with --no-loadscope-reorder (the Makefile passes it); without it, the
  files with the most tests go first.
"""

from __future__ import annotations

import os

# Slowest first: one file at a time on 2 cores, seconds per file from CI's --durations and docs/, or
# estimated from the runs a file launches where neither has a figure.
HEAVY_FIRST = [
    "test_reliability.py",        # 254-468 s with a core busy (docs/reliability.md), ~14 two-rank runs
    "test_train.py",              # ~10 two-rank runs (estimated)
    "test_slurm.py",              # ~3 min (docs/launching.md); skipped without DS_CL_TEST_SLURM=1
    "test_projector_memory.py",   # bench --memory: 109 s + 51 s
    "test_demo.py",               # 137 s
    "test_olora.py",              # 123 s (docs)
    "test_launch_checks.py",      # ~2 min (docs/launching.md): a check in every launcher run
    "test_retention.py",          # 109 s
    "test_hf_trainer.py",         # 77 s of fixture, five two-rank runs
    "test_soak.py",               # one 20-task run (estimated)
    "test_projector_zero.py",     # 54 s of fixture, then 9 one-process reference runs
    "test_gpu_smoke.py",          # 50 s (docs)
    "test_drift.py",              # 55-80 s on one core (a real-model drift, a 1-rank run)
    "test_examples.py",           # 40 s of fixture
    "test_check.py",
    "test_benchmark.py",          # 36 s
    "test_bench.py",
    "test_eval_generate.py",
    "test_osft_reference.py",
    "test_option_scoring.py",
    "test_output_confinement.py",
    "test_launch_multi_node.py",
    "test_shutdown.py",
    "test_model_build.py",
    "test_bad_input.py",
]
# Worker gwN's master ports: 1000 of them from 10000 + 1000 * (N % 10), below the ephemeral range (32768-60999
# on Linux) and away from the SLURM tests' job-id ports (20000-29999) and DeepSpeed's default 29500.
PORTS_BASE, PORTS_PER_WORKER = 10000, 1000


def _worker() -> str | None:
    """This process's xdist worker id (gw0, gw1, ...), None outside xdist or in its controller."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config):
    worker = _worker()
    if worker is None:
        return
    import torch

    from ds_cl.training.environment import PORT_RANGE_ENV

    torch.set_num_threads(1)
    n = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    lo = PORTS_BASE + PORTS_PER_WORKER * (n % 10)
    os.environ.setdefault(PORT_RANGE_ENV, f"{lo}-{lo + PORTS_PER_WORKER - 1}")


def pytest_collection_modifyitems(session, config, items):
    if _worker() is None:
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # Stable: a file's tests keep their order and stay together; the other files keep theirs.
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
