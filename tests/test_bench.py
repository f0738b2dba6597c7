"""`ds-cl bench` end to end on CPU ranks (few steps: the numbers are checked for shape, not speed)."""

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest

from ds_cl.tools.bench import main
from ds_cl.core.projector import plan_buckets
from tests.dist_utils import REPO, cpu_env

pytestmark = pytest.mark.distributed


def test_bench_json_reports_every_quantity():
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "bench", "--world", "2", "--model", "tiny",
                           "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--seq", "16",
                           "--bucket-numel-per-rank", "5000", "--json"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_ratio_grad", "step_ratio_grad_update", "svd_seconds", "bases_bytes_per_rank",
                "bases_bytes_total", "comm_bytes_per_rank_per_step", "peak_mem_bytes_per_rank", "device"):
        assert key in out, key
    assert set(out["svd_seconds"]) == {"1", "2"}
    assert out["buckets"] > 1  # the pipelined exchange, not one bucket
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


def test_bench_plan_buckets_grow_with_the_world():
    """LLaMA-2-7B shapes: buckets sized per rank keep every rank busy in every bucket; fixed 2^27-element
    buckets (3 or 4 matrices each) leave most ranks idle from world 4 on."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--plan", "--model", "llama2-7b-shapes", "--json"]) == 0
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    rows = {row["world"]: row for row in out["plan"]}
    assert out["target_params"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert rows[1]["per_rank"]["schedule_efficiency"] == 1.0
    for world in (2, 4, 8, 16):
        assert rows[world]["per_rank"]["schedule_efficiency"] <= 1.3, rows[world]
    assert rows[8]["fixed_buckets"]["schedule_efficiency"] > 3
    # What an owner holds per bucket does not grow with the world (bounded by a few matrices).
    assert max(row["per_rank"]["max_owned_numel_per_bucket"] for row in out["plan"]) <= 2 * out["bucket_numel_per_rank"]


def test_plan_buckets_cover_targets_in_order_and_balance_each_bucket():
    shapes = {f"m{i}": (64, 32) if i % 3 else (128, 32) for i in range(10)}
    names = list(shapes)
    buckets, owner = plan_buckets(shapes, names, 2, 64 * 32 * 2)
    assert [n for b in buckets for n in b] == names
    # At most numel_per_rank x world elements, unless one matrix alone is larger.
    assert all(sum(math.prod(shapes[n]) for n in b) <= 64 * 32 * 2 * 2 or len(b) == 1 for b in buckets)
    for b in buckets:
        if len(b) > 1:
            assert {owner[n] for n in b} == {0, 1}, (b, owner)  # both ranks have work in every bucket
