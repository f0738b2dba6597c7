"""Checks the launchers run before anything heavy starts, and the small helpers they share.

The shell launchers (`launchers/*.sh`, `launchers/slurm/*.sbatch`) call this module so that
every rule lives in one testable place. The rules `ds-cl train` checks again in each process are not
copied here: the DeepSpeed config's (batch arithmetic, precision, ZeRO stage per method) are
ds_cl/training/ds_config.py's, SLURM node-list expansion is ds_cl/training/environment.py's.

    python -m ds_cl.tools.launch_checks preflight --config RUN.yaml --nodes N --gpus-per-node G \
        [--hostfile H] [--allocated-nodes M] [-- key.sub=value ...]
    python -m ds_cl.tools.launch_checks check (--world-size N | --nodes N --gpus-per-node G) [--hostfile H] \
        -- RUN.yaml [key.sub=value ...] [--resume | --resume-or-start]
        # what single_node.sh / multi_node.sh run: the preflight, then `ds-cl train ... --check` at the same
        # world size, in one process (--world-size N: one node of N)
    python -m ds_cl.tools.launch_checks hostfile --out FILE --slots G [--nodes N]   # from the SLURM allocation
    python -m ds_cl.tools.launch_checks port [--job-id ID]                          # master port from the job id
    python -m ds_cl.tools.launch_checks master [--hostfile H]                       # first host of a hostfile
    python -m ds_cl.tools.launch_checks gpus [--gpus G] [--hostfile H --nodes N]    # CUDA_VISIBLE_DEVICES's GPUs

Each failure is one line on stderr, `ds-cl launch: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping

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
    """The hosts of a SLURM node list (default `$SLURM_JOB_NODELIST`): ds_cl.training.environment.slurm_hostnames
    (`scontrol show hostnames`, else its own parse of the hostlist syntax), errors as LaunchError."""
    from ds_cl.training.environment import slurm_hostnames as expand

    try:
        return expand(nodelist)
    except ValueError as e:
        raise LaunchError(str(e)) from None


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
# The GPUs of a shared node: CUDA_VISIBLE_DEVICES
#
# DeepSpeed's runner drops CUDA_VISIBLE_DEVICES whenever --num_gpus is given and starts the ranks on
# GPUs 0..N-1: on a node shared with other jobs, someone else's. With --include HOST:IDS instead it starts
# them on those indices (each rank gets CUDA_VISIBLE_DEVICES=IDS from its per-node launcher).


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES gives this job, or None when it gives none: unset, empty,
    or the ranks run on CPU (DS_ACCELERATOR=cpu), where it selects nothing."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not raw or env.get("DS_ACCELERATOR") == "cpu":
        return None
    ids = [x.strip() for x in raw.split(",")]
    if not all(x.isdigit() for x in ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={raw} is not a list of GPU indices (UUIDs and MIG names are not "
                          "supported: DeepSpeed's launcher selects GPUs by index; `nvidia-smi -L` lists them)")
    if len(set(map(int, ids))) != len(ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={raw} names a GPU twice")
    return [int(x) for x in ids]


def gpu_include(gpus: int | None = None, hostfile: str | Path | None = None, nodes: int | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """With CUDA_VISIBLE_DEVICES set (`visible_gpus`): (processes per node, the value of DeepSpeed's
    `--include`), those indices on this machine, or with a hostfile on each of its first `nodes` hosts.
    None without it (the launchers then pass --num_gpus). LaunchError when `gpus` (the launcher's
    --gpus / --gpus-per-node) is not their number, or a host's slots do not reach the largest index
    (with --include, DeepSpeed reads slots=S as GPUs 0..S-1 of that host)."""
    ids = visible_gpus(environ)
    if ids is None:
        return None
    raw = ",".join(map(str, ids))
    if gpus is not None and gpus != len(ids):
        raise LaunchError(f"{gpus} GPUs per node requested but CUDA_VISIBLE_DEVICES={raw} gives {len(ids)}: "
                          f"request {len(ids)} (or leave the count out), or change CUDA_VISIBLE_DEVICES")
    if hostfile is None:
        return len(ids), f"localhost:{raw}"
    hosts = parse_hostfile(hostfile)
    nodes = len(hosts) if nodes is None else nodes
    check_nodes(nodes, [h for h, _ in hosts], where=f"hostfile {hostfile}")
    for host, slots in hosts[:nodes]:
        if max(ids) >= slots:
            raise LaunchError(f"hostfile {hostfile}: {host} has slots={slots} but CUDA_VISIBLE_DEVICES={raw} "
                              f"names GPU {max(ids)}: with CUDA_VISIBLE_DEVICES set, slots= is the node's GPU count")
    return len(ids), "@".join(f"{host}:{raw}" for host, _ in hosts[:nodes])


# ------------------------------------------------------------------------------------------------
# Run config (what `ds-cl train CONFIG overrides` will read) and its DeepSpeed config


def run_config(config: str | Path, overrides: list[str] = ()):
    """The run config with overrides applied, by `ds_cl.training.config.load_config`: the same validation
    `ds-cl train` runs (unknown keys, types, missing data files, the DeepSpeed JSON), so a bad config
    fails here, before any node starts."""
    from ds_cl.training.config import ConfigError, load_config

    path = Path(config)
    if not path.is_file():
        raise LaunchError(f"run config {path} does not exist")
    try:
        return load_config(path, list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None


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
    cfg = run_config(config, overrides)
    # The rules `ds-cl train` checks again in each process (ds_cl/training/ds_config.py): batch arithmetic
    # at this world size, precision, the ZeRO stages the method runs on.
    from ds_cl.training.config import ConfigError
    from ds_cl.training.ds_config import check_ds_config

    try:
        batch, stage = check_ds_config(cfg, world)
    except ConfigError as e:
        raise LaunchError(f"{config}: {e}") from None
    return (f"preflight ok: world {world} = {nodes} node(s) x {gpus_per_node}; {batch}; ZeRO {stage}; "
            f"method {cfg.method.name}")


def preflight_and_check(run: list[str], world_size: int | None = None, nodes: int | None = None,
                        gpus_per_node: int | None = None, hostfile: str | None = None) -> int:
    """The launchers' checks in one process: `preflight` (its line on stderr; LaunchError when it fails), then
    `ds-cl train RUN --check` (ds_cl/training/check.py) at the same world size, given as the launcher gives
    it (--world-size N: one node of N; or --nodes N --gpus-per-node G), its plan on stdout. 2 when the check
    fails, after a line saying that nothing was launched."""
    from ds_cl.training import train

    if world_size is not None:
        if nodes is not None or gpus_per_node is not None:
            raise LaunchError("give --world-size N or --nodes N --gpus-per-node G, not both")
        nodes, gpus_per_node, world = 1, world_size, ["--world-size", str(world_size)]
    elif nodes is not None and gpus_per_node is not None:
        world = ["--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
    else:
        raise LaunchError("the launch's world size: --world-size N, or --nodes N --gpus-per-node G")
    args = train.parse_args(list(run))
    print(preflight(args.config, args.overrides, nodes, gpus_per_node, hostfile), file=sys.stderr, flush=True)
    if train.main([*run, "--check", *world]) != 0:
        print("ds-cl launch: error: ds-cl train --check failed (the lines above); nothing was launched",
              file=sys.stderr)
        return 2
    return 0


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
    ck = sub.add_parser("check", help="the preflight, then `ds-cl train RUN --check` at the same world size")
    ck.add_argument("--world-size", type=int, help="one node of this many processes")
    ck.add_argument("--nodes", type=int)
    ck.add_argument("--gpus-per-node", type=int)
    ck.add_argument("--hostfile")
    ck.add_argument("run", nargs="+", help="`ds-cl train`'s arguments: RUN.yaml [key.sub=value ...] [--resume | "
                                            "--resume-or-start]")
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from the SLURM allocation")
    hf.add_argument("--out", required=True)
    hf.add_argument("--slots", type=int, required=True)
    hf.add_argument("--nodes", type=int, help="nodes to use (default: all allocated); more than allocated fails")
    hf.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    pt = sub.add_parser("port", help="master port derived from the SLURM job id")
    pt.add_argument("--job-id")
    ms = sub.add_parser("master", help="first host of a hostfile")
    ms.add_argument("--hostfile", required=True)
    gp = sub.add_parser("gpus", help="the GPUs CUDA_VISIBLE_DEVICES gives: prints 'COUNT INCLUDE' for "
                                     "deepspeed's --include, nothing when it is unset")
    gp.add_argument("--gpus", type=int, help="the count the launcher was given, which must agree")
    gp.add_argument("--hostfile")
    gp.add_argument("--nodes", type=int)
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
        elif args.cmd == "check":
            return preflight_and_check(args.run, args.world_size, args.nodes, args.gpus_per_node, args.hostfile)
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
        elif args.cmd == "gpus":
            found = gpu_include(args.gpus, args.hostfile, args.nodes)
            if found is not None:
                print(*found)
    except LaunchError as e:
        print(f"ds-cl launch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
