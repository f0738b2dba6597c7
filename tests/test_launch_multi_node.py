"""Two nodes on one host: two `deepspeed --no_ssh` launchers, started through launchers/multi_node.sh
(what srun does on a cluster). The hostfile names are labels here; the master is 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env, free_port
from tests.slurm_cluster import write_tiny_run

pytestmark = pytest.mark.distributed


def test_two_no_ssh_launchers_form_one_world(tmp_path):
    cfg = write_tiny_run(tmp_path)
    hf = tmp_path / "hostfile"
    hf.write_text("nodeA slots=1\nnodeB slots=1\n")
    env = cpu_env(PYTHON=sys.executable, DS_CL_ENTRY=str(REPO / "launchers" / "probe_ranks.py"))
    port = str(free_port())
    procs = [subprocess.Popen(["bash", str(REPO / "launchers" / "multi_node.sh"), "--no-ssh", "--node-rank", str(r),
                               "--hostfile", str(hf), "--master-addr", "127.0.0.1", "--master-port", port,
                               str(cfg), "train.lr=3e-5"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    info = [json.loads((tmp_path / "out" / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["world_size"], i["node_rank"], i["local_rank"]) for i in info] == [(0, 2, 0, 0), (1, 2, 1, 0)]
    assert all(i["rank_sum"] == 1.0 for i in info)  # the all-reduce crossed the two launchers
    assert info[1]["argv"] == [str(cfg), "train.lr=3e-5"]
