"""The real SLURM path: munged, slurmctld and two slurmd virtual nodes on this host (tests/slurm_cluster.py),
and `sbatch --wait launchers/slurm/llama2_7b.sbatch` on CPU, one process per node (also through
launchers/slurm/submit.sh). One module-scoped cluster for every test here; one cluster per machine at a time
(a lock: tests/slurm_cluster.py).

Changes this machine (apt packages, /etc/hosts lines for node1/node2), so it runs only with an explicit
DS_CL_TEST_SLURM=1 (.ci/run sets it; many CI systems set CI=true, which is not consent); it needs root. Everything it starts is stopped by pid in the fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import REPO, cpu_env
from tests.slurm_cluster import SlurmCluster, ensure_installed, unavailable_reason, write_tiny_run

SBATCH = REPO / "launchers" / "slurm" / "llama2_7b.sbatch"
SUBMIT = REPO / "launchers" / "slurm" / "submit.sh"
PROBE = REPO / "launchers" / "probe_ranks.py"


def _skip_reason() -> str | None:
    if os.environ.get("DS_CL_TEST_SLURM") != "1":
        return ("SLURM cluster test changes this machine (apt install slurm/munge, /etc/hosts): "
                "set DS_CL_TEST_SLURM=1 to run it (.ci/run does)")
    return unavailable_reason()


_reason = _skip_reason()
if _reason:
    print(f"tests/test_slurm.py skipped: {_reason}", file=sys.stderr)
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    ensure_installed()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(c.stop)  # registered first: runs even when start() fails half-way
    c.start()
    return c


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("run"))


def sbatch(cluster: SlurmCluster, workdir: Path, sbatch_opts: list[str], args: list[str], timeout: int = 240,
           **env: str):
    """Submit the real sbatch script and wait; returns (exit status, job id, job output, log dir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    e = cpu_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, LOG_DIR=str(workdir / "logs"), **env)
    cmd = ["sbatch", "--wait", "--parsable", "--time=60", f"--output={workdir}/job-%j.out", *sbatch_opts,
           str(SBATCH), *map(str, args)]
    p = subprocess.run(cmd, cwd=workdir, env=e, capture_output=True, text=True, timeout=timeout)
    job_id = p.stdout.strip().split(";")[0]
    out = workdir / f"job-{job_id}.out"
    text = out.read_text() if job_id and out.exists() else ""
    return p.returncode, job_id, text + p.stderr, workdir / "logs"


def test_sbatch_probe_runs_one_rank_per_node(cluster, run_cfg, tmp_path):
    rc, job, out, logs = sbatch(cluster, tmp_path, ["--nodes=2", "--gpus-per-node=1"],
                                [run_cfg, "output_dir=" + str(tmp_path / "out")], DS_CL_ENTRY=str(PROBE))
    assert rc == 0, out + cluster.logs()
    info = [json.loads((tmp_path / "out" / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["world_size"], i["slurmd_nodename"], i["node_rank"]) for i in info] == \
        [(0, 2, "node1", 0), (1, 2, "node2", 1)]
    assert all(i["rank_sum"] == 1.0 for i in info)
    assert info[0]["master"] == f"node1:{20000 + int(job) % 10000}"  # first host, port from the job id
    assert (logs / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert {p.name for p in logs.glob("*.log")} == {"node1.log", "node2.log"}  # a log per node
    assert "probe: rank 1/2 on node2 ok" in (logs / "node2.log").read_text()


def test_sbatch_failing_run_returns_its_exit_code(cluster, run_cfg, tmp_path):
    rc, _, out, _ = sbatch(cluster, tmp_path, ["--nodes=2", "--gpus-per-node=1"],
                           [run_cfg, "output_dir=" + str(tmp_path / "out")], DS_CL_ENTRY=str(PROBE),
                           DS_CL_PROBE_EXIT="3")
    assert rc == 3, out
    assert "ds-cl: node1 exited with status 3" in out


def test_sbatch_more_nodes_than_allocated_fails_fast(cluster, run_cfg, tmp_path):
    rc, _, out, logs = sbatch(cluster, tmp_path, ["--nodes=1", "--gpus-per-node=1"], ["--nodes", "2", run_cfg])
    assert rc == 2, out
    assert "ds-cl launch: error: 2 nodes requested but the allocation has 1: node1" in out
    assert not list(logs.glob("*.log"))  # nothing was launched


def test_submit_on_the_real_slurm_cluster(cluster, run_cfg, tmp_path):
    """launchers/slurm/submit.sh (its other cases: tests/test_check.py): the check for 2 nodes x 1 GPU, then the
    real sbatch of the probe (one rank per node)."""
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SUBMIT), "--nodes", "2", "--gpus-per-node", "1", "--wait", "--time=60",
                        f"--output={tmp_path}/job-%j.out", str(run_cfg), f"output_dir={out}"], cwd=tmp_path,
                       env=cpu_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"),
                                   DS_CL_ENTRY=str(PROBE)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr + cluster.logs()
    assert "world size  2 (2 node(s) x 1 GPU(s) per node (arguments))" in p.stderr
    info = [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["world_size"]) for i in info] == [(0, 2), (1, 2)]


def test_sbatch_dry_run_and_requeue_resume(cluster, run_cfg, tmp_path):
    """The script outside sbatch, in a faked allocation of the test cluster: --dry-run shows each node's
    command, and a restarted job (SLURM_RESTART_COUNT > 0) adds --resume-or-start."""
    env = cpu_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"),
                  SLURM_JOB_ID="31337", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[1-2]",
                  SLURM_GPUS_ON_NODE="2", SLURM_RESTART_COUNT="1")
    p = subprocess.run(["bash", str(SBATCH), "--dry-run", str(run_cfg), "train.global_batch_size=8"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("[")]
    assert [line.split()[0] for line in lines] == ["[node1]", "[node2]"]
    assert "--node_rank 1 --no_ssh" in lines[1] and "--num_gpus 2" in lines[1] and "--master_addr node1 --master_port 21337" in lines[1]
    assert lines[1].endswith(f"--module ds_cl.cli train {run_cfg} train.global_batch_size=8 --resume-or-start")


def test_sbatch_real_ds_cl_train_two_nodes(cluster, run_cfg, tmp_path):
    """`ds-cl train` of a tiny model, 2 short tasks, ZeRO-3 over node1 and node2."""
    rc, _, out, logs = sbatch(cluster, tmp_path, ["--nodes=2", "--gpus-per-node=1"],
                              [run_cfg, "output_dir=" + str(tmp_path / "out")])
    node_logs = {n: (logs / f"{n}.log").read_text() for n in ("node1", "node2")}
    assert rc == 0, out + "\n".join(node_logs.values())[-6000:]
    for r, n in enumerate(("node1", "node2")):
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in node_logs[n]
        assert "exits successfully" in node_logs[n]
    assert re.search(r"^\[ds-cl\] [\d-]+ [\d:]+ outputs in ", node_logs["node1"], re.M)  # the trainer's last line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["tasks"] == ["colors", "animals"]
    for f in ("cl_matrix.json", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "out" / f).is_file(), f


def _job(cluster: SlurmCluster, job: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
    p = cluster.scontrol("show", "job", "-o", job)
    return dict(f.split("=", 1) for f in p.stdout.split() if "=" in f) if p.returncode == 0 else {}


def test_sbatch_usr1_checkpoints_then_requeues_and_resumes(cluster, run_cfg, tmp_path):
    """The time limit's warning (`--signal=B:USR1@600`; sent here by hand) while the ranks are in a step and
    their checkpoint is slow (15 s, longer than the cluster's KillWait of 5 s): the script has the ranks
    checkpoint and exit, waits for that, and only then requeues; the requeued attempt resumes from that
    checkpoint and ends with the weights, accuracy matrix and losses of an uninterrupted run. Both attempts'
    node logs survive."""
    import torch
    from safetensors.torch import load_file

    from ds_cl.training.checkpoint import verify_checkpoint

    opts = ["--nodes=2", "--gpus-per-node=1"]
    # 3 steps per task (12 training records / 4; the tiny run caps them at 2): step 2 is inside task 0, where only
    # the signal writes a checkpoint. Every checkpoint kept, each task's model exported.
    args = ["train.max_steps_per_task=4", "checkpoint.keep=10", "output.export_each_task=true"]
    ref = tmp_path / "ref"
    rc, _, out, _ = sbatch(cluster, ref, opts, [run_cfg, f"output_dir={ref / 'out'}", *args])
    assert rc == 0, out

    work, name = tmp_path / "usr1", f"usr1-{os.getpid()}"
    work.mkdir()
    out_dir, ck = work / "out", work / "out" / "checkpoints"
    # Step 2 takes 8 s (the signal lands inside it); the save of checkpoint 2 takes 15 s more.
    e = cpu_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, LOG_DIR=str(work / "logs"),
                DS_CL_FAULT="sleep@loss:step=2,seconds=8;sleep@save:step=2,seconds=15")
    cmd = ["sbatch", "--wait", "--time=60", f"--job-name={name}", f"--output={work}/job-%j.out", *opts, str(SBATCH),
           str(run_cfg), f"output_dir={out_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=work, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0, job = time.time(), ""
        while not job:
            job = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=cluster.env, capture_output=True,
                                 text=True).stdout.strip()
            assert proc.poll() is None and time.time() - t0 < 60, "job not seen"
            time.sleep(0.5)
        metrics = out_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # step 1 done: step 2 (8 s) has begun
            assert proc.poll() is None and time.time() - t0 < 300, f"no step logged\n{cluster.logs()}"
            time.sleep(0.2)
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, capture_output=True,
                             text=True)
        assert sig.returncode == 0, sig.stderr
        t_sig = time.time()
        # Requeued: pending again with Restarts=1. Nothing of the next attempt has run yet: what is on disk now is
        # what the first attempt left at the requeue.
        while True:
            info = _job(cluster, job)
            assert proc.poll() is None and time.time() - t_sig < 180, f"not requeued: {info}\n{cluster.logs(6000)}"
            if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
                break
            time.sleep(0.5)
        requeued_after = time.time() - t_sig
        at_requeue = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
        problems = verify_checkpoint(ck / "step_00000002")
        # SLURM holds a requeued job for a while (its begin time is pushed back past its old credentials' lifetime);
        # release it, but not within the second of the requeue: slurmd revoked the job's credentials when the
        # requeue killed attempt 1 (at the controller's time of the requeue, whole seconds) and refuses a batch
        # launch whose credential is not newer ("Job N already killed, do not launch batch job"); the job then
        # ends at once, unrun, with an exit code that `sbatch --wait` reports as 1. The requeue happened before
        # the job showed PENDING (both nodes had to finish their part of it), so 2 s from here is always later.
        time.sleep(2)
        cluster.scontrol("update", f"JobId={job}", "StartTime=now")
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pass  # asserted below, with the job's state and the daemons' logs
    finally:
        # The job as sbatch --wait left it (or as the test gave up on it), before MinJobAge (5 s) purges it.
        state = cluster.scontrol("show", "job", job) if job else None
        if proc.poll() is None:
            if job:
                subprocess.run(["scancel", job], env=cluster.env)
            proc.kill()
            proc.wait()
    sbatch_out = proc.stdout.read()
    text = (work / f"job-{job}.out").read_text()
    logs = {n: (work / "logs" / f"{n}.log").read_text() for n in ("node1", "node2")}
    explain = text + "\n" + logs["node1"][-6000:]
    slurm = (f"\n--- sbatch --wait: status {proc.returncode}\n{sbatch_out}"
             f"\n--- scontrol show job {job}, as sbatch ended\n{(state.stdout + state.stderr) if state else ''}"
             f"\n--- the test cluster's daemons\n{cluster.logs(6000)}")
    assert at_requeue == "step_00000002" and problems == [], \
        f"at the requeue: latest {at_requeue}, {problems}\n{explain}{slurm}"
    assert requeued_after > 15, explain + slurm  # the save alone took 15 s: the requeue waited for it
    assert proc.returncode == 0, explain + slurm

    # The script's stages, in order, one requeue; the checkpoint named is the one the next attempt resumed from.
    stages = ["USR1: asking the ranks to checkpoint", "the ranks have exited (status 143)",
              f"rank 0: checkpoint {ck / 'step_00000002'} written (task 0, step 2)",
              f"requeueing job {job}: checkpoint written"]
    at = [text.find(s) for s in stages]
    assert -1 not in at and at == sorted(at), explain
    assert text.count("requeueing job") == 1, explain
    assert re.search(r"^ds-cl: [\d-]+ [\d:]+ USR1: asking", text, re.M), explain  # timestamped
    # Each node log holds both attempts: the first one's signal and checkpoint, then the resumed second one.
    for n in ("node1", "node2"):
        first, second = f"=== ds-cl: job {job} attempt 1 ", f"=== ds-cl: job {job} attempt 2 "
        assert first in logs[n] and second in logs[n] and logs[n].index(first) < logs[n].index(second), logs[n][-3000:]
        assert "USR1: SIGTERM to the ranks (pids " in logs[n].split(second)[0], logs[n][-3000:]
    first, second = logs["node1"].split(f"=== ds-cl: job {job} attempt 2 ")
    assert "SIGTERM: checkpointing after the current step" in first, explain
    assert f"preempted: checkpoint {ck / 'step_00000002'} written (task 0, step 2)" in first, explain
    assert f"resumed from {ck / 'step_00000002'} (task 0, step 2)" in second, explain
    assert verify_checkpoint(ck / "step_00000002") == []

    # ...and the run ends as the uninterrupted one did.
    assert json.loads((out_dir / "summary.json").read_text())["complete"]
    a, b = (load_file(d / "out" / "task_1_animals" / "model.safetensors") for d in (ref, work))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    matrix = lambda d: json.loads((d / "cl_matrix.json").read_text())["matrix"]
    assert matrix(ref / "out") == matrix(out_dir)
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(ref / "out") == losses(out_dir) and len(losses(out_dir)) == 6

