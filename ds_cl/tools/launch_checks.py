"""Checks the launchers run before anything heavy starts, and the small helpers they share.

The shell launchers (`launchers/*.sh`, `launchers/slurm/*.sbatch`) call this module so that
every rule lives in one testable place:

    python -m ds_cl.tools.launch_checks preflight --config RUN.yaml --nodes N --gpus-per-node G \
        [--hostfile H] [--allocated-nodes M] [-- key.sub=value ...]
    python -m ds_cl.tools.launch_checks hostfile --out FILE --slots G [--nodes N]   # from the SLURM allocation
    python -m ds_cl.tools.launch_checks port [--job-id ID]                          # master port from the job id
    python -m ds_cl.tools.launch_checks master [--hostfile H]                       # first host of a hostfile

Each failure is one line on stderr, `ds-cl launch: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The osft projector runs on ZeRO-3 and ZeRO-2 partitions, and on whole tensors with ZeRO off
# (stage 0) only when there is one process. Stage 1 keeps fp32 optimizer state partitioned but
# gradients whole, a layout the projector does not handle.
PROJECTOR_STAGES = (3, 2, 0)
PROJECTOR_METHODS = ("osft",)
PORT_BASE, PORT_SPAN = 20000, 10000  # below Linux's ephemeral range (32768+)


class LaunchError(Exception):
    """A launch that must not start; the message is one line meant for the user."""


# ------------------------------------------------------------------------------------------------
# Hostfiles and allocations


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """`[(host, slots)]` from a DeepSpeed hostfile (`name slots=N`, `#` comments)."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile {path} does not exist")
    hosts: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise LaunchError(f"{path}:{lineno}: expected 'hostname slots=N', got {raw.strip()!r}")
        try:
            slots = int(parts[1][len("slots="):])
        except ValueError:
            raise LaunchError(f"{path}:{lineno}: slots must be an integer, got {parts[1]!r}") from None
        if slots < 1:
            raise LaunchError(f"{path}:{lineno}: slots must be >= 1, got {slots}")
        host = parts[0]
        if host in seen:
            raise LaunchError(f"{path}:{lineno}: duplicate host {host!r} (first on line {seen[host]}); "
                              "each node must appear once")
        seen[host] = lineno
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


def check_unique(hosts: list[str], where: str) -> None:
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise LaunchError(f"{where}: duplicate host(s) {', '.join(dup)}; each node must appear once")


def check_nodes(requested: int, allocated: list[str], where: str = "the allocation") -> None:
    if requested < 1:
        raise LaunchError(f"number of nodes must be >= 1, got {requested}")
    if requested > len(allocated):
        raise LaunchError(f"{requested} nodes requested but {where} has {len(allocated)}: "
                          f"{', '.join(allocated) or '(none)'}")


def slurm_hostnames(nodelist: str | None = None) -> list[str]:
    """Expand a SLURM node list (default `$SLURM_JOB_NODELIST`) with `scontrol show hostnames`."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation (use sbatch/salloc)")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("scontrol not found: SLURM client tools are needed to read the allocation") from None
    if out.returncode != 0:
        raise LaunchError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return out.stdout.split()


def write_hostfile(hosts: list[str], slots: int, out: str | Path) -> Path:
    check_unique(hosts, "node list")
    if slots < 1:
        raise LaunchError(f"slots per node must be >= 1, got {slots}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return out


def port_from_job_id(job_id: str | int | None = None) -> int:
    """A master port fixed by the job id, so every node of a job agrees without talking and
    two jobs sharing a node rarely collide (20000 + id mod 10000)."""
    job_id = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID")
    if job_id is None or str(job_id).strip() == "":
        return 29500
    try:
        return PORT_BASE + int(job_id) % PORT_SPAN
    except ValueError:
        raise LaunchError(f"job id must be an integer, got {job_id!r}") from None


# ------------------------------------------------------------------------------------------------
# DeepSpeed config, batch arithmetic, ZeRO stage


def load_ds_config(ds: str | Path | dict) -> dict:
    if isinstance(ds, dict):
        return ds
    path = Path(ds)
    if not path.is_file():
        raise LaunchError(f"DeepSpeed config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LaunchError(f"DeepSpeed config {path} is not valid JSON: line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise LaunchError(f"DeepSpeed config {path} must be a JSON object")
    return cfg


def _num(cfg: dict, key: str, fallback: int | None, src: str) -> int | None:
    v = cfg.get(key, "auto")
    if v == "auto" or v is None:
        return fallback
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LaunchError(f"{src}: {key} must be a positive integer or \"auto\", got {v!r}")
    if fallback is not None and fallback != v:
        raise LaunchError(f"{src}: {key} is {v} but the run config says {fallback}; "
                          "set one of them (\"auto\" in the DeepSpeed config takes the run config's value)")
    return v


@dataclass
class Batch:
    micro: int
    accum: int
    world: int

    @property
    def total(self) -> int:
        return self.micro * self.accum * self.world

    def __str__(self) -> str:
        return (f"train_batch_size {self.total} = micro {self.micro} x grad_accum {self.accum} "
                f"x world {self.world}")


def check_batch(ds_cfg: dict, world: int, micro: int | None = None, accum: int | None = None,
                total: int | None = None, src: str = "DeepSpeed config") -> Batch:
    """Resolve and check train_batch_size = micro * grad_accum * world, DeepSpeed's rule.

    micro/accum/total come from the run config (None = not set there) and fill the DeepSpeed
    config's "auto" values; numbers in both must agree. Two of the three settle the third.
    """
    if world < 1:
        raise LaunchError(f"world size must be >= 1, got {world}")
    m = _num(ds_cfg, "train_micro_batch_size_per_gpu", micro, src)
    a = _num(ds_cfg, "gradient_accumulation_steps", accum, src)
    t = _num(ds_cfg, "train_batch_size", total, src)
    if m is not None and a is not None:
        b = Batch(m, a, world)
        if t is not None and t != b.total:
            raise LaunchError(f"train_batch_size {t} does not fit world size {world}: micro {m} x grad_accum {a} "
                              f"x world {world} = {b.total}; change the batch settings or the number of GPUs")
        return b
    if t is None:
        m = 1 if m is None else m
        return Batch(m, 1 if a is None else a, world)
    if m is None and a is None:
        m = 1
    if m is not None:
        per_step = m * world
        if t % per_step:
            raise LaunchError(f"train_batch_size {t} does not fit world size {world}: it is not a multiple of "
                              f"micro {m} x world {world} = {per_step}")
        return Batch(m, t // per_step, world)
    per_micro = a * world
    if t % per_micro:
        raise LaunchError(f"train_batch_size {t} does not fit world size {world}: it is not a multiple of "
                          f"grad_accum {a} x world {world} = {per_micro}")
    return Batch(t // per_micro, a, world)


def check_zero_stage(ds_cfg: dict, world: int, method: str | None, src: str = "DeepSpeed config") -> int:
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise LaunchError(f"{src}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if method in PROJECTOR_METHODS:
        if stage == 1:
            raise LaunchError(f"{src}: ZeRO stage 1 is not supported by method {method!r} "
                              "(its projector supports ZeRO 3, 2, or 0 on a single process)")
        if stage == 0 and world > 1:
            raise LaunchError(f"{src}: ZeRO stage 0 with method {method!r} needs a single process, "
                              f"world size is {world}; use ZeRO 3 or 2")
    return stage


# ------------------------------------------------------------------------------------------------
# Run config (what `ds-cl train CONFIG overrides` will read)


@dataclass
class RunSettings:
    method: str | None
    ds_config: dict
    ds_src: str
    micro: int | None
    accum: int | None
    total: int | None


def run_settings(config: str | Path, overrides: list[str] = ()) -> RunSettings:
    """The launch-relevant settings of a run config with overrides applied.

    Uses `ds_cl.training.config.load_config`, the same validation `ds-cl train` runs (unknown keys, types,
    missing data files), so a bad config fails here, before any node starts.
    """
    from ds_cl.training.config import ConfigError, load_config

    path = Path(config)
    if not path.is_file():
        raise LaunchError(f"run config {path} does not exist")
    try:
        cfg = load_config(path, list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    ds_src = f"{path}: deepspeed"
    return RunSettings(cfg.method.name, load_ds_config(cfg.deepspeed), ds_src, cfg.train.micro_batch_size,
                       None, cfg.train.global_batch_size)


def preflight(config: str | Path, overrides: list[str], nodes: int, gpus_per_node: int,
              hostfile: str | Path | None = None, allocated: list[str] | None = None) -> str:
    """All checks for one launch; returns a one-line summary or raises LaunchError."""
    if gpus_per_node < 1:
        raise LaunchError(f"processes per node must be >= 1, got {gpus_per_node}")
    if hostfile is not None:
        hosts = parse_hostfile(hostfile)
        check_nodes(nodes, [h for h, _ in hosts], where=f"hostfile {hostfile}")
        short = [(h, s) for h, s in hosts[:nodes] if s < gpus_per_node]
        if short:
            h, s = short[0]
            raise LaunchError(f"hostfile {hostfile}: {h} has slots={s} but {gpus_per_node} processes per node "
                              "were requested")
    if allocated is not None:
        check_unique(allocated, "the allocation")
        check_nodes(nodes, allocated)
    world = nodes * gpus_per_node
    rs = run_settings(config, overrides)
    batch = check_batch(rs.ds_config, world, rs.micro, rs.accum, rs.total, src=rs.ds_src)
    stage = check_zero_stage(rs.ds_config, world, rs.method, src=rs.ds_src)
    return (f"preflight ok: world {world} = {nodes} node(s) x {gpus_per_node}; {batch}; ZeRO {stage}; "
            f"method {rs.method or '?'}")


# ------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_cl.tools.launch_checks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pf = sub.add_parser("preflight", help="check a launch before it starts")
    pf.add_argument("--config", required=True)
    pf.add_argument("--nodes", type=int, required=True)
    pf.add_argument("--gpus-per-node", type=int, required=True)
    pf.add_argument("--hostfile")
    pf.add_argument("--allocated-nodes", help="comma-separated hosts of the allocation (default: none)")
    pf.add_argument("--slurm", action="store_true", help="read the allocation from SLURM_JOB_NODELIST")
    pf.add_argument("overrides", nargs="*")
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from the SLURM allocation")
    hf.add_argument("--out", required=True)
    hf.add_argument("--slots", type=int, required=True)
    hf.add_argument("--nodes", type=int, help="nodes to use (default: all allocated); more than allocated fails")
    hf.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    pt = sub.add_parser("port", help="master port derived from the SLURM job id")
    pt.add_argument("--job-id")
    ms = sub.add_parser("master", help="first host of a hostfile")
    ms.add_argument("--hostfile", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "preflight":
            allocated = args.allocated_nodes.split(",") if args.allocated_nodes else None
            if args.slurm:
                allocated = slurm_hostnames()
            print(preflight(args.config, args.overrides, args.nodes, args.gpus_per_node, args.hostfile, allocated),
                  file=sys.stderr)
        elif args.cmd == "hostfile":
            hosts = slurm_hostnames(args.nodelist)
            check_unique(hosts, "the allocation")
            n = len(hosts) if args.nodes is None else args.nodes
            check_nodes(n, hosts)
            print(write_hostfile(hosts[:n], args.slots, args.out))
        elif args.cmd == "port":
            print(port_from_job_id(args.job_id))
        elif args.cmd == "master":
            print(parse_hostfile(args.hostfile)[0][0])
    except LaunchError as e:
        print(f"ds-cl launch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
