"""examples/own_loop.py (the README's own-loop snippet made whole) on 2 CPU ranks through the deepspeed launcher:
the audited leak of every task, a resume that ends where an uninterrupted run ends, one projector file per rank."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from tests.dist_utils import REPO, launch

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "examples" / "own_loop.py"
STEPS = "4"  # optimizer steps per task: the test is about the mechanics, not about learning
TASK_LINE = re.compile(r"^task (\d+) \((\w+)\): loss \S+ -> \S+, leak (\S+),", re.M)


def leaks(stdout: str) -> dict[int, float]:
    """{task: audited leak} from rank 0's per-task lines."""
    return {int(t): float(leak) for t, _, leak in TASK_LINE.findall(stdout)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run stopped after task 1 then resumed from its task-1 checkpoint."""
    tmp = tmp_path_factory.mktemp("own_loop")
    whole = launch(SCRIPT, 2, "--out", tmp / "whole", "--steps", STEPS, timeout=300)
    first = launch(SCRIPT, 2, "--out", tmp / "split", "--steps", STEPS, "--stop-after-task", "1", timeout=300)
    shutil.copy(tmp / "split" / "weights.pt", tmp / "after_task1.pt")  # the resumed run overwrites weights.pt
    second = launch(SCRIPT, 2, "--out", tmp / "split", "--steps", STEPS, "--resume", tmp / "split" / "task_1",
                    timeout=300)
    return tmp, whole.stdout, first.stdout, second.stdout


def test_leak_audited_per_task(runs):
    _, whole, first, second = runs
    # The projector is fitted before task 0, so every task trains under the constraint.
    for out, tasks in ((whole, [0, 1, 2]), (first, [0, 1]), (second, [2])):
        got = leaks(out)
        assert sorted(got) == tasks, out[-3000:]
        assert all(v <= 1e-5 for v in got.values()), got
    assert "resumed from" in second and "continuing at task 2" in second


def test_resume_equals_uninterrupted(runs):
    tmp, *_ = runs
    whole = torch.load(tmp / "whole" / "weights.pt", weights_only=True)
    resumed = torch.load(tmp / "split" / "weights.pt", weights_only=True)
    stopped = torch.load(tmp / "after_task1.pt", weights_only=True)
    assert whole.keys() == resumed.keys()
    worst = max(float((resumed[n] - w).norm() / w.norm()) for n, w in whole.items())
    assert worst <= 1e-6, worst
    # ...and the resumed run did train task 2 (the comparison is not of two task-1 models).
    moved = max(float((whole[n] - stopped[n]).norm() / whole[n].norm()) for n in whole)
    assert moved > 1e-3, moved


def test_checkpoint_files_per_rank(runs):
    tmp, *_ = runs
    for run, tasks in (("whole", [0, 1, 2]), ("split", [0, 1, 2])):
        for t in tasks:
            ckpt = tmp / run / f"task_{t}"
            assert (ckpt / "engine").is_dir(), sorted(p.name for p in ckpt.iterdir())
            for rank in range(2):
                state = torch.load(ckpt / f"proj_rank{rank}.pt", weights_only=True)
                # Each file holds its own rank's share of the bases.
                assert (state["rank"], state["world"]) == (rank, 2)
                assert all(state["owner"][n] == rank for n in state["bases"])
