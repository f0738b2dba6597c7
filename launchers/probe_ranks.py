"""Launch-plumbing probe: run it instead of `ds-cl train` to check a cluster before a long job.

    DS_CL_ENTRY=launchers/probe_ranks.py sbatch launchers/slurm/llama2_7b.sbatch CONFIG [overrides]

Every rank joins the process group, all-reduces its rank, and writes
`<output_dir>/probe/rank<R>.json` (rank, world size, local rank, host, SLURM node, arguments);
`output_dir` comes from the run config with overrides applied (read as `ds-cl train` reads it).
With DS_CL_PROBE_EXIT=N in the environment rank 0 exits with N after the barrier (to test
failure reporting).
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_cl.training.config import load_config
from ds_cl.training.environment import init_distributed


def output_dir(config: str, overrides: list[str]) -> Path:
    return Path(load_config(config, overrides).output_dir)


def main() -> int:
    config, rest = sys.argv[1], sys.argv[2:]
    out = output_dir(config, [a for a in rest if "=" in a]) / "probe"
    cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    init_distributed("gloo" if cpu else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank)])
    if not cpu:
        t = t.cuda(int(os.environ.get("LOCAL_RANK", 0)))
    dist.all_reduce(t)
    info = dict(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", -1)),
                hostname=socket.gethostname(), slurmd_nodename=os.environ.get("SLURMD_NODENAME"),
                slurm_nodeid=os.environ.get("SLURM_NODEID"), node_rank=int(os.environ.get("CROSS_RANK", -1)),
                master=f"{os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}", argv=sys.argv[1:], rank_sum=t.item(),
                expected_rank_sum=world * (world - 1) / 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(info, indent=1))
    print(f"probe: rank {rank}/{world} on {info['slurmd_nodename'] or info['hostname']} ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    code = int(os.environ.get("DS_CL_PROBE_EXIT", "0"))
    return code if rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
