"""Process-group start-up shared by every ds-cl entry point (train, bench, eval, test rank scripts), and
where a process learns its place in the job.

Where rank, world size and master come from (one rule, used by `build_distributed`, by `world_size`,
the guess preflight makes before any process group exists, and by the launch checks' SLURM helpers):

1. `WORLD_SIZE` is set: a launcher (`deepspeed`, `torchrun`) set the torch variables RANK, WORLD_SIZE,
   LOCAL_RANK, MASTER_ADDR, MASTER_PORT; they are used as they are (a world of one may lack the others,
   which then take rule 3's values; a larger world without RANK is an error).
2. otherwise `SLURM_PROCID` and `SLURM_NTASKS` are set (`srun`, one task per process): RANK =
   SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID (0 when unset), MASTER_ADDR =
   the first host of SLURM_JOB_NODELIST (`slurm_hostnames`; 127.0.0.1 without a node list) unless set,
   MASTER_PORT = 29500 unless set.
3. otherwise a world of one: RANK 0, WORLD_SIZE 1, LOCAL_RANK 0, MASTER_ADDR 127.0.0.1, MASTER_PORT
   as set or a free port.

SLURM node lists (`node[1-2,5],gpu-a`) are expanded by `scontrol show hostnames` when it is installed
and answers (it knows every syntax the cluster accepts), else by `expand_nodelist`, a parser of SLURM's
hostlist syntax: prefixes with bracketed ranges, several bracket groups, zero padding.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_MASTER_PORT = "29500"


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: str  # accelerator device name ("cpu", "cuda", ...)


# ---------------------------------------------------------------------------------------------
# SLURM node lists


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's hostlist syntax expanded in order, as `scontrol show hostnames` does:
    `node[1-3,7]` -> node1 node2 node3 node7, `n[01-02]` -> n01 n02 (zero padding kept),
    `rack[1-2]-gpu[1-2]` -> rack1-gpu1 rack1-gpu2 rack2-gpu1 rack2-gpu2, `a,b` -> a b.
    Raises ValueError naming the list for anything else (unbalanced brackets, a bad range)."""
    items, depth, cur = [], 0, ""
    for c in nodelist.strip():
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise ValueError(f"cannot expand SLURM node list {nodelist!r}: unbalanced brackets")
        if c == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += c
    if depth:
        raise ValueError(f"cannot expand SLURM node list {nodelist!r}: unbalanced brackets")
    items.append(cur)
    hosts: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        choices = []
        for part in re.split(r"(\[[^\]]*\])", item):
            if part.startswith("["):
                choices.append(_expand_ranges(part[1:-1], nodelist))
            elif part:
                choices.append([part])
        hosts += ["".join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"cannot expand SLURM node list {nodelist!r}: no hosts")
    return hosts


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    out = []
    for piece in spec.split(","):
        lo, _, hi = piece.strip().partition("-")
        hi = hi or lo
        if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
            raise ValueError(f"cannot expand SLURM node list {nodelist!r}: bad range {piece!r} in [{spec}]")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def slurm_hostnames(nodelist: str | None = None) -> list[str]:
    """The hosts of a SLURM node list (default `$SLURM_JOB_NODELIST`, then `$SLURM_NODELIST`), in order:
    `scontrol show hostnames` when it is installed and answers, else `expand_nodelist`. ValueError when
    there is no node list (not inside an allocation) or it cannot be expanded."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation (use sbatch/salloc)")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):  # no SLURM client tools, or no answer
        pass
    return expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------
# Rank, world and master (the rules of the module docstring)


def _positive(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r} is not a positive integer")
    return int(raw)


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """The world size this process will join (rules 1-3 above), read before any process group exists.
    ValueError for a WORLD_SIZE / SLURM_NTASKS that is not a positive integer."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return _positive(env, "WORLD_SIZE")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _positive(env, "SLURM_NTASKS")
    return 1


def env_from_slurm() -> None:
    """Rule 2: srun starts one task per process without torch's env variables: derive them from SLURM's.
    Does nothing under rule 1 or 3."""
    env = os.environ
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(_positive(env, "SLURM_NTASKS"))
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env["MASTER_ADDR"] = slurm_hostnames(nodes)[0] if nodes else "127.0.0.1"
    env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)


def build_distributed(timeout_minutes: float | None = None, deterministic: bool = False,
                      ds_config: dict | None = None) -> DistInfo:
    """Set the torch env variables by rules 1-3, start the process group (gloo on CPU, the accelerator's
    backend otherwise; timeout: `init_distributed`) and pick this rank's device; deterministic: first
    `use_deterministic_algorithms`. ds_config: the run's DeepSpeed config as the user gave it, to say when
    DeepSpeed is about to compile its CPU Adam for it (ds_config.builds_cpu_adam)."""
    if deterministic:
        use_deterministic_algorithms()  # before this rank's device is set up
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    env_from_slurm()
    world = world_size()
    if "WORLD_SIZE" not in os.environ:  # a plain `ds-cl train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    elif "RANK" not in os.environ:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} is set but RANK is not: start the ranks with deepspeed, torchrun "
                             "or srun, or unset WORLD_SIZE for one process")
        os.environ.update(RANK="0", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    from ds_cl.tools.ops import CPU_ADAM, announce_first_build, clear_stale_locks
    from ds_cl.training.ds_config import builds_cpu_adam

    say = lambda msg: print(f"[ds-cl] rank {os.environ.get('RANK', '0')}: {msg}", flush=True)  # noqa: E731
    clear_stale_locks(log=say)  # a killed first run's build lock would hang every later one
    if (os.environ.get("RANK", "0") == "0" and ds_config is not None
            and builds_cpu_adam(ds_config, on_cpu=acc.device_name() == "cpu")):
        announce_first_build(CPU_ADAM, log=say)
    # DeepSpeed 0.19.8 calls these two collectives by the names torch 2.13 deprecates: one warning per rank
    # and call site in every run's log, about code that is not ours and that we cannot change.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", FutureWarning)
    init_distributed(backend, timeout_minutes)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, acc.device_name())


def use_deterministic_algorithms() -> None:
    """train.deterministic: the same kernels and reduction orders in every run, so that a GPU run and its
    --resume give bit-identical results (torch's "Reproducibility" notes). Call it before any CUDA work:
    cuBLAS reads its workspace setting when it creates its first handle."""
    import torch

    # One of the two workspace settings under which cuBLAS is deterministic; a user's other one is kept.
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    # An op with no deterministic kernel then raises, naming itself, rather than differing silently.
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # autotuning may pick another convolution kernel per run


# ---------------------------------------------------------------------------------------------
# Process group start-up


PORT_RANGE_ENV = "DS_CL_PORT_RANGE"


def free_port() -> int:
    """A TCP port free on this machine now, for a master_port of a local launch.

    By default the kernel picks it, from its ephemeral range. With $DS_CL_PORT_RANGE=LO-HI it is a free
    port of LO..HI, tried from a random start. The test suite's parallel workers each get a range of their
    own below the ephemeral one (tests/conftest.py): between this pick and the launch's bind (seconds: the
    ranks import torch first) the kernel can hand a port of its range to another process's bind(0) (the
    other worker's gloo ranks listen on such ports); below that range it hands out none."""
    spec = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not spec:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    try:
        lo, hi = (int(x) for x in spec.split("-"))
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{PORT_RANGE_ENV}={spec!r}: expected LO-HI, two TCP ports with LO <= HI")
    import secrets  # not `random`: a seeded run would pick the same ports as every other seeded run

    n = hi - lo + 1
    start = secrets.randbelow(n)
    for i in range(n):
        port = lo + (start + i) % n
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address, as the launch's store binds it
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port in {PORT_RANGE_ENV}={spec}")


def init_distributed(backend: str | None = None, timeout_minutes: float | None = None) -> None:
    """`deepspeed.init_distributed`, without DeepSpeed's CPU shared-memory all-reduce op on the CPU
    accelerator (`skip_cpu_shm_op`), then release that op's segment name should it have started anyway.

    timeout_minutes: how long any collective of the process group may wait before it fails (`ds-cl
    train`: train.dist_timeout_minutes); None keeps DeepSpeed's default ($DEEPSPEED_TIMEOUT, else 10)."""
    import datetime

    import deepspeed

    from ds_cl.tools.ops import use_interpreter_ninja

    # The op DeepSpeed may still JIT-compile in this process (cpu_adam, under optimizer offload) must be built
    # with the venv's ninja, as `python -m ds_cl.tools.ops build` builds it: ninja 1.11 (Debian's, first on
    # PATH) and 1.13 (pip's) hash a build command differently, so each reads the other's build log as a
    # changed command and recompiles the op (~1.5 min on 2 cores); a recompile inside a process with a
    # file-size limit failed (docs/reliability.md).
    use_interpreter_ninja()
    skip_cpu_shm_op()
    kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    deepspeed.init_distributed(dist_backend=backend, **kwargs)
    release_cpu_shm()


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator, keep DeepSpeed from compiling, loading and starting `deepspeed_shm_comm` in
    the process group about to start.

    DeepSpeed 0.19.8's TorchBackend builds it in every process group (comm/torch.py, `build_shm_op`), but its
    only user is `inference_all_reduce` (tensor-parallel inference, module_inject/layers.py), which ds-cl
    never calls: ZeRO's collectives go through torch.distributed (gloo). It cost a JIT compile of ~1-2 min on
    2 cores on a fresh machine (again whenever another ninja built it) and a ~66 MB /dev/shm segment per rank
    (`release_cpu_shm`). `build_shm_op` returns None when `deepspeed.ops.__compatible_ops__` marks the op
    incompatible; deepspeed.ops caches that dict in the module on first access, so the mark persists.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from ds_cl.tools.ops import SHM_OP

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_OP] = False


def release_cpu_shm() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce (deepspeed_shm_comm), if any.
    `init_distributed` keeps the op from starting (`skip_cpu_shm_op`); this is for a process whose DeepSpeed
    comm was started before, without that (a direct `deepspeed.init_distributed`, accelerate's or the HF
    Trainer's own start): `deepspeed.init_distributed` then keeps that comm, op and segment included.

    When all ranks are on one machine, DeepSpeed's CPU accelerator creates a ~66 MB segment per rank,
    /dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}, and never unlinks
    it: every CPU run (a test, the demo) left 66 MB x ranks of RAM behind until reboot (measured
    here: 333 segments, 21 GB, then the OOM killer). Every rank maps all its peers' segments inside
    init_distributed, so once all ranks are past a barrier the names can go; the mappings live until
    the processes exit, and a killed run leaves nothing behind.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from ds_cl.core import collectives

    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return
    collectives.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def exit_now(rc: int) -> None:
    """Flush stdout and stderr, then end the process with `rc` at once (`os._exit`): no exit handlers, no
    interpreter finalization (see `end_process`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(rc)


def end_process(rc: int) -> None:
    """End a rank whose run is over (its outputs written and closed, its process group destroyed): the
    non-daemon threads joined and Python's exit handlers run, as a normal exit does them, then `os._exit`,
    without interpreter finalization or C++ static destructors.

    Why not return to `sys.exit`: `dist.destroy_process_group()` only drops torch's own references. ZeRO-3's
    partitioned parameters, its optimizer and DeepSpeed's groups module keep both gloo groups (the world and
    DeepSpeed's clone of it) alive, and the parameters are held from C++ (autograd hooks) where Python's
    collector cannot free them: measured at the end of `main`, both ranks still run each group's two worker
    threads and its TCP loop thread (rank 0 also torch's TCPStore server thread). A native thread that takes
    the GIL back (a pybind11 `gil_scoped_release` ending, a tensor released from C++) once Python 3.11 has
    started finalizing is ended by `pthread_exit`; the unwind reaches a noexcept destructor and the process
    aborts with "terminate called without an active exception" (SIGABRT) after the run had finished and
    printed its results: a 20-task soak rank did, once (tests/test_shutdown.py shows the mechanism). Nothing
    is left to finalize here: files are closed, stdout/stderr are flushed below, and the sockets and shared
    memory go with the process, as they would after a normal exit."""
    import atexit
    import threading

    # The order of a normal exit: non-daemon threads first (threading._shutdown), then the atexit
    # handlers (logging.shutdown, tempfile and weakref finalizers, W&B, coverage), interpreter alive.
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    exit_now(rc)


def end_distributed(rc: int = 0) -> None:
    """The end of a rank that ran ZeRO-3 (`ds-cl train`, `eval`, `bench`, your own loop): a barrier (every
    rank's outputs are written), the process group destroyed, then `end_process(rc)`; it does not return.
    Call it where the script would otherwise return to the interpreter's exit: ending there can abort the
    rank with SIGABRT after its work is done (`end_process` says why; examples/own_loop.py did, in CI)."""
    import torch.distributed as dist

    from ds_cl.core import collectives

    if dist.is_initialized():
        collectives.barrier()
        dist.destroy_process_group()
    end_process(rc)
