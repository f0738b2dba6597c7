"""`ds-cl train` on this machine's CPU ranks, as the demo and the benchmark start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch_train(config: Path, nprocs: int, log: Path, echo: bool = True, resume: bool = False) -> int:
    """Run `deepspeed --num_gpus nprocs --module ds_cl.cli train CONFIG`; the output goes to `log`, and
    the trainer's own `[ds-cl]` lines to stdout too. Returns the exit status."""
    from ds_cl.training.environment import free_port

    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank on a small CPU: no oversubscription
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # glibc serves every allocation over 32 MiB (ZeRO-3's gathered and flat buffers: 100-510 MiB each for
    # SmolLM2) from a fresh mapping and unmaps it when freed, so each step faults gigabytes in page by page
    # (~40% of the ranks' CPU time was the kernel's). Huge pages fault 512 times fewer: faster steps on CPU
    # ranks (docs/benchmarks.md). Without THP, or with glibc < 2.35, the setting is ignored.
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
           str(free_port()), "--module", "ds_cl.cli", "train", str(config), *(["--resume"] if resume else [])]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            f.write(line)
            if echo and line.startswith("[ds-cl]") and "outputs in" not in line:
                print("   " + line.rstrip(), flush=True)
        return proc.wait()
