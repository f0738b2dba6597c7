"""`ds-cl bench` end to end on CPU ranks (few steps: the numbers are checked for shape, not speed)."""

import json
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env

pytestmark = pytest.mark.distributed


def test_bench_json_reports_every_quantity():
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "bench", "--world", "2", "--model", "tiny",
                           "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--seq", "16", "--json"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_ratio_grad", "step_ratio_grad_update", "svd_seconds", "bases_bytes_per_rank",
                "bases_bytes_total", "comm_bytes_per_rank_per_step", "peak_mem_bytes_per_rank", "device"):
        assert key in out, key
    assert set(out["svd_seconds"]) == {"1", "2"}
    assert out["step_ratio_grad"] > 0 and out["step_ratio_grad_update"] > 0
    # Owner-per-matrix: bases are split across the two ranks, nobody holds them all.
    assert out["bases_bytes_per_rank"] <= 0.55 * out["bases_bytes_total"]
    assert out["svd_work_share_max"]["1"] == 1.0 and out["svd_work_share_max"]["2"] <= 0.6
    # Each rank sends its partitions of the target gradients and updates, minus what it owns itself:
    # at least a quarter of 2 x 4 bytes x targets / world, at most all of it.
    n = out["target_params"]
    assert 0.25 * 2 * 4 * n / 2 <= out["comm_bytes_per_rank_per_step"] <= 2 * 4 * n


def test_bench_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "bench", "--world", "0"], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--world must be >= 1" in proc.stderr
