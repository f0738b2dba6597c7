"""`ds-cl gpu-smoke --cpu`: every phase of the smoke a lent GPU runs (env; train with fit, mark, extend, audit,
export, checkpoint, stop, --resume, generation; bench with extend), here on CPU with tiny shapes, so the script
has passed before device time is spent on it; and a run cut short still reports."""

import json
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env

pytestmark = pytest.mark.distributed


def smoke(tmp_path, *args, timeout=900):
    cmd = [sys.executable, "-m", "ds_cl.cli", "gpu-smoke", "--cpu", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def read(tmp_path, name):
    return json.loads((tmp_path / "out" / f"smoke_{name}.json").read_text())


def test_cpu_smoke_passes_every_phase(tmp_path):
    proc = smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = read(tmp_path, "summary")
    assert summary["ok"] and list(summary["phases"]) == ["env", "train", "bench"], summary
    assert "world size 1" in summary["nccl_note"] and "world size 1" in proc.stdout
    env, train, bench = (read(tmp_path, p) for p in ("env", "train", "bench"))
    assert all(d["ok"] for d in (env, train, bench))

    assert env["tf32"]["allow_tf32"] and env["tf32"]["cudnn_allow_tf32"]
    reqs = env["pyproject"]["requirements"]
    assert reqs["torch"]["admitted"] and reqs["transformers"]["admitted"] and reqs["deepspeed"]["admitted"]

    # Stopped mid task 1 after a checkpoint, resumed there, in processes that had TF32 on.
    runs = train["runs"]
    assert runs["stopped"]["checkpoints"] and "(task 1, step 2)" in runs["resumed"]["resumed_from"]
    assert all(r["tf32"]["allow_tf32"] for r in runs.values())
    assert train["osft"]["fit"] and train["osft"]["extend"]  # fit before task 0, extend at the boundary
    m = train["metrics"]
    assert m["steps"] == list(range(1, 9)) and len(m["leaks"]) == 8 and m["leak_max"] <= 1e-5
    assert train["summary"]["complete"] and all(train["exports"].values())
    gen = train["generation"]
    assert gen["export"] == "task_1_larger" and len(gen["new_token_ids"]) == 4 and gen["weights_finite"]
    assert gen["dtypes"] == ["torch.bfloat16"]

    assert bench["projected_over_plain"] > 0 and bench["fit_s"] > 0 and bench["extend_s"] > 0
    assert bench["bench"]["world"] == 1 and bench["bench"]["steps_measured"] == 3
    assert any(line.startswith("world 1: extend") for line in bench["progress"])
    assert (tmp_path / "out" / "smoke_train.log").is_file() and (tmp_path / "out" / "smoke_bench.log").is_file()


def test_a_cut_run_still_reports(tmp_path):
    """Past its share of --budget-s the train phase's run is stopped (its whole process group); the phase's JSON
    and the summary say so, and the command exits non-zero. The budget is small enough that the first run gets
    the floor of one second (a 12 s budget left ~6 s, in which a fast machine finished the stopped run)."""
    proc = smoke(tmp_path, "--phases", "train", "--budget-s", "2", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    train, summary = read(tmp_path, "train"), read(tmp_path, "summary")
    assert not train["ok"] and "timed out" in train["failures"][0] and train["runs"]["stopped"]["exit"] is None
    assert summary["ok"] is False and summary["phases"]["env"]["ok"] and not summary["phases"]["train"]["ok"]
    assert "stopped after" in (tmp_path / "out" / "smoke_train.log").read_text()


def test_full_fp32_keeps_cublas_tf32_check_consistent_under_host_tf32():
    # In a fresh process: the TF32 switches are process-global.
    code = ("import json; from ds_cl.tools.gpu_smoke import enable_tf32, tf32_guard; enable_tf32(); "
            "print(json.dumps(tf32_guard()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    guard = json.loads(proc.stdout.strip().splitlines()[-1])
    assert guard["ok"], guard
