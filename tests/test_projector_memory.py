"""The projector's memory model (ds_cl.core.projector_memory) against measured peaks, and its budget."""

import json
import os
import subprocess
import sys

import pytest

from ds_cl.core.projector_memory import (accumulate_sequence, extend_temp_numel, grown_ranks, projector_memory,
                                         ranks_for, svd_temp_numel)
from ds_cl.core.subspace import AdaptiveRank, FixedRank
from ds_cl.tools.bench import target_shapes

GIB = 1 << 30


def test_llama2_7b_budget_at_world_8_and_shrinking_with_the_world():
    """<= 6 GiB extra per rank for LLaMA-2-7B at world 8 with adaptive ranks (trr 0.8), as the trainer runs
    on GPUs (the pre-step copy in host memory), and less at every larger world."""
    shapes = target_shapes("llama2-7b-shapes")
    ranks = ranks_for(shapes, AdaptiveRank())
    step = {w: projector_memory(shapes, w, ranks, pre_step_copy="host")["projector_extra_bytes_per_rank"]
            for w in (8, 16, 64)}
    assert step[8] <= 6 * GIB, f"{step[8] / GIB:.2f} GiB at world 8"
    assert step[8] > step[16] > step[64]
    # The copy on the device would break the budget: the reason for the host default on accelerators.
    on_device = projector_memory(shapes, 8, ranks, pre_step_copy="device")
    assert on_device["projector_extra_bytes_per_rank"] > 6 * GIB
    assert on_device["busiest_rank"]["pre_step_copy"] == pytest.approx(sum(a * b for a, b in shapes.values()) * 4 / 8,
                                                                       rel=1e-3)


def test_plan_reports_the_memory_model_by_world():
    """By default the plan follows a default osft run: the first fit at method.osft.ratio, then 5 tasks of
    the accumulate subspace growing toward method.osft.max_protected_ratio."""
    from ds_cl.training.config import OSFTConfig

    out = subprocess.run([sys.executable, "-m", "ds_cl.tools.bench", "--plan", "--model", "llama2-7b-shapes", "--json"],
                         capture_output=True, text=True, check=True).stdout
    plan = json.loads(out.strip().splitlines()[-1])
    rows = {row["world"]: row for row in plan["plan"]}
    assert rows[8]["projector_extra_bytes_per_rank"] <= 6 * GIB
    assert rows[1]["projector_refit_bytes_per_rank"] > rows[64]["projector_refit_bytes_per_rank"] > 0
    assert plan["pre_step_copy"] == "host" and plan["rank_policy"] == repr(FixedRank(OSFTConfig.ratio))
    assert OSFTConfig.first_task_importance_data is None  # why the shipped first fit is the fixed ratio
    assert plan["tasks"] == 5 and plan["max_protected_ratio"] == OSFTConfig.max_protected_ratio
    seq = rows[8]["sequence"]
    assert seq["peak_bytes_per_rank"] > rows[8]["projector_extra_bytes_per_rank"]  # the ranks grew
    assert seq["peak_phase"] == "extend at the start of task 2"
    assert "projector memory per rank" in out and "through 5 tasks of the accumulate subspace" in out


def test_extend_counts_its_float64_svd():
    """extend's SVD of the task update dW runs in float64: twice a fit's fp32 SVD, beside dW and its
    float64 copy; for every LLaMA-2-7B target shape it is the largest moment of the extend."""
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        m, n = shape
        assert svd_temp_numel(shape, float64=True) == 2 * svd_temp_numel(shape)
        svd = 3 * m * n + svd_temp_numel(shape, float64=True)
        for r, added in ((0, 0), (2048, 1638), (3686, 0)):
            assert extend_temp_numel(shape, r, added, previous=m * n) == svd
    # a tiny update's SVD is still all of min(m, n): the moment does not shrink with the ranks
    assert extend_temp_numel((64, 32), 28, 0) == extend_temp_numel((64, 32), 0, 0)


def test_grown_ranks_stop_at_the_cap():
    shapes = {"a": (10, 20), "b": (64, 64)}
    assert grown_ranks(shapes, {"a": 5, "b": 32}, 0.9) == {"a": 9, "b": 57}  # 0.9 x 10 is 9, not 8
    assert grown_ranks(shapes, {"a": 5, "b": 32}, 0.9, added_ratio=0.3) == {"a": 8, "b": 51}
    assert grown_ranks(shapes, {"a": 8, "b": 51}, 0.9, added_ratio=0.3) == {"a": 9, "b": 57}
    assert grown_ranks(shapes, {"a": 10, "b": 64}, 0.9) == {"a": 10, "b": 64}  # never fewer than before


def test_projector_memory_extend_grows_with_the_ranks_it_adds():
    shapes = target_shapes("small")
    ranks = ranks_for(shapes, FixedRank(0.5))
    cap = grown_ranks(shapes, ranks, 0.9)
    same = projector_memory(shapes, 2, ranks)["per_rank"]
    grown = projector_memory(shapes, 2, ranks, extended_ranks=cap)["per_rank"]
    for a, b in zip(same, grown):
        assert b["extend"] > a["extend"] and b["step"] == a["step"] and b["fit"] == a["fit"]
        assert b["host_extend"] == 2 * b["anchor"]  # the new anchor beside the old one
    with pytest.raises(ValueError, match="only adds"):
        projector_memory(shapes, 2, cap, extended_ranks=ranks)


def test_accumulate_sequence_walks_a_default_run():
    shapes = target_shapes("small")
    first = ranks_for(shapes, FixedRank(0.5))
    seq = accumulate_sequence(shapes, 2, first, 5, max_ratio=0.9, pre_step_copy="host")
    assert [p["phase"] for p in seq["phases"]] == (
        ["fit before task 0", "mark before task 0", "task 0 steps"]
        + [x for t in range(1, 5) for x in (f"extend at the start of task {t}", f"task {t} steps")])
    shares = [round(p["protected_share"], 2) for p in seq["phases"]]
    assert shares[:3] == [0.5] * 3 and set(shares[3:]) == {0.9}  # worst case: the first extend reaches the cap
    device = [p["device_bytes_per_rank"] for p in seq["phases"]]
    assert seq["peak_bytes_per_rank"] == max(device) and seq["peak_phase"] == "extend at the start of task 2"
    assert device[5] == device[7] == device[9]  # every extend at the cap costs the same
    assert seq["phases"][0]["host_bytes_per_rank"] == 0 and seq["host_peak_bytes_per_rank"] > 0
    # at the cap the bases and the steps need more than at the first fit
    assert seq["phases"][4]["bases_bytes_per_rank"] > seq["phases"][2]["bases_bytes_per_rank"]
    assert device[4] > device[2]
    # growing a fifth of min(m, n) per boundary reaches the cap only at the third extend, and costs no more
    slow = accumulate_sequence(shapes, 2, first, 5, max_ratio=0.9, added_ratio=0.2, pre_step_copy="host")
    assert [round(p["protected_share"], 2) for p in slow["phases"][3::2]] == [0.7, 0.9, 0.9, 0.9]
    assert slow["peak_bytes_per_rank"] == seq["peak_bytes_per_rank"]
    one = accumulate_sequence(shapes, 2, first, 1, pre_step_copy="host")
    assert len(one["phases"]) == 3 and one["peak_bytes_per_rank"] < seq["peak_bytes_per_rank"]


# medium with one of its two decoder layers: the same shapes, half the time.
@pytest.mark.parametrize("model,layers,bucket", [("small", 4, 1 << 18), ("medium", 1, 1 << 20)])
def test_model_matches_measured_peaks(model, layers, bucket):
    """`ds-cl bench --memory`: CPU ranks at worlds 1-3 measure their resident-set peaks (bases, pre-step copy,
    the gradient and update passes with several buckets in flight, a refit); the model computed from shapes
    is within 15% of each, on every rank."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "ds_cl.tools.bench", "--memory", "--model", model, "--world", "3",
                           "--layers", str(layers), "--steps", "1", "--micro-batch", "1", "--seq", "16",
                           "--bucket-numel-per-rank", str(bucket), "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [w["world"] for w in result["worlds"]] == [1, 2, 3]
    for w in result["worlds"]:
        assert w["buckets"] >= 3  # the pipeline has buckets in flight both ways
        for r in w["ranks"]:
            where = f"{model}, world {w['world']}, rank {r['rank']}"
            assert r["model_parts"]["bases"] == r["bases_bytes"], where  # the model counts what the projector holds
            # and what the bases hold resident (what freeing them gives back) is their size
            assert abs(r["bases_rss_bytes"] - r["bases_bytes"]) <= 0.15 * r["bases_bytes"], \
                f"{where}: bases {r['bases_bytes'] / 2**20:.1f} MiB, resident {r['bases_rss_bytes'] / 2**20:.1f} MiB"
            for key in ("step", "refit"):
                predicted, measured = r[f"{key}_model_bytes"], r[f"{key}_measured_bytes"]
                assert abs(predicted - measured) <= 0.15 * measured, \
                    f"{where}: {key} model {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
