"""The real SLURM path: munged, slurmctld and two slurmd virtual nodes on this host (tests/slurm_cluster.py),
and `sbatch --wait launchers/slurm/llama2_7b.sbatch` on CPU, one process per node.

Changes this machine (apt packages, /etc/hosts lines for node1/node2), so it runs only with an explicit
DS_CL_TEST_SLURM=1 (.ci/run sets it; many CI systems set CI=true, which is not consent); it needs root. Everything it starts is stopped by pid in the fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import REPO, cpu_env
from tests.slurm_cluster import SlurmCluster, ensure_installed, unavailable_reason, write_tiny_run

SBATCH = REPO / "launchers" / "slurm" / "llama2_7b.sbatch"
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
