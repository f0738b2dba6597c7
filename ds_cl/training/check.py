"""`ds-cl train CONFIG [key.sub=value ...] --check [--json]`: validate a run config and print the plan it
resolves to, without a GPU, DeepSpeed or a process group (docs/launching.md, "Checking a run first").

    ds-cl train run.yaml --check --world-size 16          # or --nodes 2 --gpus-per-node 8
    ds-cl train run.yaml --check --json                   # the same plan as one JSON object

The plan: the world size and where it came from; the batch arithmetic (micro x accumulation x world =
global); per task the training and held-out records, the optimizer steps, and the tokens per training
record (prompt + answer, with the run's tokenizer and chat template) against train.max_seq_len with how
many records get truncated (the same for method.replay.earlier's sources, replayed whole, and for
method.osft.protect_inputs_of's, whose inputs are protected); the model and tokenizer found (a local folder,
or a hub id and whether the local HF cache holds it); the size of one checkpoint (from the parameter count
and dtypes, as ds_cl/training/checkpoint.py stores it) and the disk free at output_dir.

Every problem is one line `ds-cl train --check: error: ...` on stderr (all of them, not only the first);
the exit status is 0 without errors, 2 with. Warnings do not fail the check. The checks themselves are
preflight's (ds_cl/training/preflight.py) and the config's (ds_cl/training/config.py): what passes here
passes the job's own preflight, at the same world size.

`--offline-ok`: a hub model that is neither a local folder nor in the local HF cache is a warning, not an
error, and what needs it (parameter count, checkpoint size, and the tokenizer unless model.tokenizer names
another) is left out of the plan: for checking a config's arithmetic on a machine that will not run it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from ds_cl.methods import PROJECTING, REPLAYING
from ds_cl.training.config import ConfigError, RunConfig

PROG = "ds-cl train --check"
HUGE = 10 ** 9  # a max_seq_len under which nothing is truncated: the records' full lengths
RNG_FILE_BYTES = 16_000  # rng_rank<r>.pt (measured: 15.7 kB), one per rank
# DeepSpeed's copy of zero_to_fp32.py (38.6 kB) and, per rank, its model-states file without the weights
# (ZeRO-3: 16 kB for a 2-layer model); manifest and trainer state. A tiny osft run's save measured 804 kB,
# this estimate 790 kB.
FIXED_BYTES, PER_RANK_BYTES = 40_000, 20_000
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Check:
    """What the check found: the plan (JSON-able), warnings and errors, each one line."""

    def __init__(self, config: str):
        self.plan: dict[str, Any] = {"config": str(config)}
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.notes: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(str(msg).splitlines()[0] if str(msg).strip() else repr(msg))

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def as_json(self) -> dict:
        return {**self.plan, "notes": self.notes, "warnings": self.warnings, "errors": self.errors,
                "ok": not self.errors}


# ---------------------------------------------------------------------------------------------
# World size


def resolve_world(world_size: Optional[int] = None, nodes: Optional[int] = None,
                  gpus_per_node: Optional[int] = None,
                  environ: Optional[Mapping[str, str]] = None) -> tuple[int, str, bool]:
    """(world, where it came from, assumed): from the arguments (--world-size, or --nodes x --gpus-per-node),
    else the environment (WORLD_SIZE; a SLURM allocation: SLURM_NNODES x SLURM_GPUS_ON_NODE, or SLURM_NTASKS),
    else 1, assumed. ConfigError for values that are not positive or that disagree."""
    env = os.environ if environ is None else environ
    for name, v in (("--world-size", world_size), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if nodes is not None or gpus_per_node is not None:
        if gpus_per_node is None:
            gpus_per_node = _env_int(env, "SLURM_GPUS_ON_NODE")
            if gpus_per_node is None:
                raise ConfigError(f"--nodes {nodes} needs --gpus-per-node G (processes per node) to give a world size")
        nodes = 1 if nodes is None else nodes
        world = nodes * gpus_per_node
        if world_size is not None and world_size != world:
            raise ConfigError(f"--world-size {world_size} disagrees with --nodes {nodes} x --gpus-per-node "
                              f"{gpus_per_node} = {world}; give one or the other")
        return world, f"{nodes} node(s) x {gpus_per_node} GPU(s) per node (arguments)", False
    if world_size is not None:
        return world_size, "--world-size", False
    w = _env_int(env, "WORLD_SIZE")
    if w is not None:
        return w, "WORLD_SIZE", False
    nn = _env_int(env, "SLURM_NNODES") or _env_int(env, "SLURM_JOB_NUM_NODES")
    g = _env_int(env, "SLURM_GPUS_ON_NODE")
    if nn is not None and g is not None:
        return nn * g, f"the SLURM allocation: {nn} node(s) x {g} GPU(s) (SLURM_NNODES x SLURM_GPUS_ON_NODE)", False
    t = _env_int(env, "SLURM_NTASKS")
    if t is not None:
        return t, "SLURM_NTASKS (one process per task)", False
    return 1, "assumed: no --world-size, --nodes/--gpus-per-node, WORLD_SIZE or SLURM allocation", True


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    raw = raw.split("(")[0]  # SLURM_NNODES-like values such as "2(x3)" do not occur; be lenient anyway
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={env.get(name)!r} is not a positive integer")
    return int(raw)


# ---------------------------------------------------------------------------------------------
# Batch arithmetic


def batch_fix(cfg: RunConfig, world: int) -> str:
    """What to change when train.global_batch_size does not fit `world` (appended to ds_config's error)."""
    t = cfg.train
    per = t.micro_batch_size * world
    up = -(-t.global_batch_size // per) * per
    fixes = [f"set train.global_batch_size to a multiple of {per} (micro {t.micro_batch_size} x world {world}; "
             f"e.g. train.global_batch_size={up})"]
    if t.global_batch_size % t.micro_batch_size == 0:
        q = t.global_batch_size // t.micro_batch_size
        fits = [w for w in range(1, q + 1) if q % w == 0]
        near = max(w for w in fits if w <= world)
        fixes.append(f"run on a world size dividing {q} (e.g. {near}"
                     + (f", or {q} with accumulation 1)" if near != q else ", with accumulation 1)"))
    return "; or ".join(f for f in fixes if f)


# ---------------------------------------------------------------------------------------------
# Model and tokenizer: local folder, or hub id (cached or not)


def _offline(env: Mapping[str, str]) -> Optional[str]:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={env[name]}"
    return None


def _hub_reachable(env: Mapping[str, str], timeout: float = 3.0) -> bool:
    host = env.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(repo_id: str, files: tuple[str, ...]) -> Optional[str]:
    """The snapshot folder of the local HF cache holding one of `files` of `repo_id`, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for f in files:
        try:
            hit = try_to_load_from_cache(repo_id, f)
        except Exception:  # not a valid repo id
            return None
        if isinstance(hit, str):
            return str(Path(hit).parent)
    return None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def locate(name: str, key: str, files: tuple[str, ...], chk: Check, offline_ok: bool,
           env: Mapping[str, str], net: dict) -> tuple[dict, Optional[str]]:
    """(what the plan says about `name`, the path or id to load it from; None: not loadable here)."""
    if os.path.exists(name):
        return {"name": name, "kind": "local", "path": name}, name
    snap = _cached(name, files)
    if snap is not None:
        return {"name": name, "kind": "hub", "cached": True, "path": snap}, snap
    info = {"name": name, "kind": "hub", "cached": False, "path": None}
    why = _offline(env)
    if why is None:
        if "reachable" not in net:
            net["reachable"] = _hub_reachable(env)
        if net["reachable"]:
            info["download"] = True
            chk.notes.append(f"{key}: {name} is not in the local HF cache ({_hf_cache_dir()}): every node "
                             f"downloads it when the job starts")
            return info, name
        why = "the hub is not reachable from here (no network)"
    msg = (f"{key}: {name} is not a local folder and not in the local HF cache ({_hf_cache_dir()}), and {why}: "
           f"the job would fail when it loads it; download it first (`hf download {name}`, huggingface_hub's CLI, with the "
           f"same HF_HOME) or set {key} to a local folder")
    if offline_ok:
        chk.warn(msg.replace("the job would fail", "--offline-ok: left out of the plan; a job here would fail"))
    else:
        chk.error(msg)
    return info, None


# ---------------------------------------------------------------------------------------------
# Records, steps, lengths


def holdout(task, n_rows: int) -> int:
    """Records held out of `train` for evaluation: as ds_cl.training.data.load_task does."""
    from ds_cl.training.data import holdout_size

    return 0 if task.eval is not None else holdout_size(task.eval_size, n_rows)


def phase_sizes(cfg: RunConfig, n_train: list[int], n_earlier: list[int] = ()) -> list[tuple[str, int]]:
    """(phase name, training samples) as the method's plan() makes its phases (ds_cl/methods): one per
    task; replay adds round(fraction x n) replayed samples to a task whose pool has samples: from the second
    task on, from the first with method.replay.earlier's sources (`n_earlier`: their training records, one
    count each); with fraction_of earlier, each earlier source's buffer of round(fraction x its samples)
    joins every later task; multitask pools all."""
    names = [t.name for t in cfg.tasks]
    if cfg.method.name == "multitask":
        return [("multitask", sum(n_train))]
    if cfg.method.name in REPLAYING:
        f = cfg.method.replay.fraction
        if cfg.method.replay.fraction_of == "earlier":  # every earlier source's buffer joins each later task
            buffers = [min(k, round(f * k)) for k in [*n_earlier, *n_train]]
            return [(nm, n + sum(buffers[:len(n_earlier) + i])) for i, (nm, n) in enumerate(zip(names, n_train))]
        return [(nm, n + (round(f * n) if sum(n_earlier) + sum(n_train[:i]) else 0))
                for i, (nm, n) in enumerate(zip(names, n_train))]
    return list(zip(names, n_train))


def token_lengths(samples, max_seq_len: int) -> dict:
    """Tokens per training sample (percentiles, max) and how many exceed max_seq_len."""
    lengths = sorted(len(e.input_ids) for e in samples)
    return {"p50": percentile(lengths, 50), "p90": percentile(lengths, 90), "p99": percentile(lengths, 99),
            "max": lengths[-1] if lengths else 0, "max_seq_len": max_seq_len,
            "truncated": sum(n > max_seq_len for n in lengths), "of": len(lengths)}


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_values:
        return 0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def read_earlier(sources: list, within: str) -> tuple[list[dict], list[list[dict]]]:
    """A list of earlier sources (method.replay.earlier, method.osft.protect_inputs_of: `within`), each read
    once: its plan entries ({name, records, train}) and its records. Raises on the first unreadable file."""
    from ds_cl.training.data import earlier_key, read_records

    entries, rows = [], []
    for j, source in enumerate(sources):
        rows.append(read_records(source.train, source.train_split, f"{earlier_key(j, source, within)}.train"))
        n = len(rows[-1])
        entries.append({"name": source.name, "records": n,
                        "train": n if source.max_train_samples is None else min(n, source.max_train_samples)})
    return entries, rows


def earlier_tokens(chk: Check, sources: list, entries: list[dict], rows: list[list[dict]], within: str, tok,
                   max_len: int, when: str) -> None:
    """Tokens per record of each earlier source (into its plan entry), and a warning for those cut at
    train.max_seq_len (`when`: where the cut records are used)."""
    from ds_cl.training.data import earlier_key, load_earlier

    for j, (source, entry, recs) in enumerate(zip(sources, entries, rows)):
        try:
            k = entry["tokens"] = token_lengths(load_earlier(source, j, tok, HUGE, recs, within=within), max_len)
        except (ValueError, OSError) as e:
            chk.error(e)
            continue
        if k["truncated"]:
            chk.warn(f"{earlier_key(j, source, within)}: {k['truncated']} of {k['of']} training records are longer "
                     f"than train.max_seq_len={max_len} tokens (longest {k['max']}) and get truncated "
                     f"{when} (their prompt's start is cut)")


def check_tasks(cfg: RunConfig, chk: Check, tok) -> None:
    """Records, held-out records (and the eval_size cap), steps per phase; with a tokenizer the tokens per
    training record against train.max_seq_len."""
    import logging

    from ds_cl.training.data import load_task, read_records, steps_per_epoch

    t = cfg.train
    # each training file read once: counted here, tokenised below from the same records
    tasks, n_train, task_rows = [], [], []
    for i, task in enumerate(cfg.tasks):
        key = f"tasks.{i} ({task.name})"
        try:
            task_rows.append(read_records(task.train, task.train_split, f"{key}.train"))
        except (ValueError, OSError) as e:
            chk.error(e)
            return
        rows = len(task_rows[-1])
        held = holdout(task, rows)
        # eval.tuning_size: held out too, after the evaluation records (data.split_indices; check_data has
        # refused a task it leaves without a training record)
        tuning = cfg.eval.tuning_size
        n = rows - held - tuning
        if task.max_train_samples is not None:
            n = min(n, task.max_train_samples)
        entry = {"name": task.name, "records": rows, "train": n}
        if tuning:
            entry["tuning"] = tuning
        if task.eval is None:
            entry["held_out"] = held
            entry["eval"] = min(held, task.max_eval_samples) if task.max_eval_samples is not None else held
            entry["eval_from"] = f"eval_size {task.eval_size}, at most half the records"
            if held < task.eval_size:
                chk.warn(f"{key}: eval_size {task.eval_size} is more than half of its {rows} records: {held} held "
                         f"out for evaluation (the cap: half the records), {rows - held - tuning} left to train")
        else:
            entry["eval_from"] = task.eval
        tasks.append(entry)
        n_train.append(n)
    # method.replay.earlier: every record trains (replayed), none is held out
    from ds_cl.training.data import EARLIER, PROTECT_INPUTS

    o = cfg.method.osft
    try:
        earlier, earlier_rows = read_earlier(cfg.method.replay.earlier, EARLIER)
        # method.osft.protect_inputs_of: importance_samples of all their records, before the first task
        protect, protect_rows = read_earlier(o.protect_inputs_of or [], PROTECT_INPUTS)
    except (ValueError, OSError) as e:
        chk.error(e)
        return
    n_earlier = [e["train"] for e in earlier]
    phases = []
    # multitask's one phase trains every task at once: the cap is per task (as schedule_phases applies it)
    tasks_per_phase = len(cfg.tasks) if cfg.method.name == "multitask" else 1
    for name, n in phase_sizes(cfg, n_train, n_earlier):
        spe = steps_per_epoch(n, t.global_batch_size)
        steps = (spe * t.epochs if t.max_steps_per_task is None
                 else min(spe * t.epochs, t.max_steps_per_task * tasks_per_phase))
        phases.append({"name": name, "samples": n, "steps_per_epoch": spe, "epochs": t.epochs, "steps": steps})
        if spe == 0:
            chk.error(f"phase {name}: {n} training samples do not fill one optimizer step of "
                      f"train.global_batch_size={t.global_batch_size}")
    chk.plan["tasks"] = tasks
    if earlier:
        chk.plan["replay_earlier"] = earlier
    if protect:
        # split evenly over the ranks (the rest left out), as the trainer does (OSFT.rank_batches)
        world = chk.plan.get("world", {}).get("size", 1)
        drawn = min(o.importance_samples, sum(t["train"] for t in protect))
        chk.plan["protect_inputs"] = {"sources": protect, "samples": drawn // world * world,
                                      "fit_before_first_task": o.fit_before_first_task,
                                      "non_target_lr_scale": o.non_target_lr_scale}
        if drawn < world:
            chk.error(f"{PROTECT_INPUTS}: {drawn} sample(s) to protect the inputs of (method.osft.importance_samples "
                      f"{o.importance_samples}) are fewer than the {world} ranks: each rank needs one")
    chk.plan["phases"] = phases
    chk.plan["total_steps"] = sum(p["steps"] for p in phases)
    if tok is None:
        return
    # Tokenised as the trainer does (load_task), at a length nothing reaches: the records' full lengths.
    data_log = logging.getLogger("ds_cl.training.data")
    captured: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if "eval_size" not in record.getMessage():  # said above, in the check's own words
                captured.append(record.getMessage())

    handler, propagate = Keep(logging.WARNING), data_log.propagate
    data_log.addHandler(handler)
    data_log.propagate = False
    try:
        for i, (task, entry, rows) in enumerate(zip(cfg.tasks, tasks, task_rows)):
            try:
                td = load_task(task, i, tok, HUGE, cfg.seed, rows=rows, tuning_size=cfg.eval.tuning_size)
            except (ValueError, OSError) as e:
                chk.error(e)
                continue
            k = entry["tokens"] = token_lengths(td.train, t.max_seq_len)
            entry["eval"] = len(td.eval_prompts)
            if td.tuning is not None:
                entry["tuning"] = len(td.tuning.eval_prompts)
            entry["eval_prompts_over_max_seq_len"] = sum(len(p) > t.max_seq_len for p in td.eval_prompts)
            if k["truncated"]:
                chk.warn(f"tasks.{i} ({task.name}): {k['truncated']} of {k['of']} training records are longer than "
                         f"train.max_seq_len={t.max_seq_len} tokens (longest {k['max']}) and get truncated "
                         f"(their prompt's start is cut)")
        earlier_tokens(chk, cfg.method.replay.earlier, earlier, earlier_rows, EARLIER, tok, t.max_seq_len,
                       "when replayed")
        earlier_tokens(chk, o.protect_inputs_of or [], protect, protect_rows, PROTECT_INPUTS, tok, t.max_seq_len,
                       "when their inputs are protected")
    finally:
        data_log.removeHandler(handler)
        data_log.propagate = propagate
    for msg in captured:
        chk.warn(msg)


# ---------------------------------------------------------------------------------------------
# Checkpoint size and disk


def checkpoint_estimate(cfg: RunConfig, model, world: int, stage: int) -> dict:
    """Bytes of one save (ds_cl/training/checkpoint.py), from the model built on the meta device:
    DeepSpeed's files (stage >= 1: the fp32 master weights and AdamW's two moments of every trainable
    parameter, 12 bytes each, sharded; stages 0-2 also the weights in model.dtype, from rank 0), the
    method's state (osft: each target's bases and, for the accumulate subspace's update boundary, its
    anchor, in fp32, at the largest ranks the config allows), one RNG file per rank and small files
    (`rng_bytes`)."""
    from ds_cl.core import subspace as S
    from ds_cl.core.projector_memory import bases_numel

    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    m = cfg.method
    if m.name in ("olora", "inclora"):
        import torch.nn as nn

        from ds_cl.methods.lora import match_targets

        linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        per_task = sum(m.lora.rank * (linears[n].in_features + linears[n].out_features)
                       for n in match_targets(list(linears), m.lora.targets))
        trainable = per_task * len(cfg.tasks)
    else:
        trainable = n_params
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    if stage == 0 and cfg.model.dtype == "float32":
        optimizer = 8 * trainable  # torch AdamW's two moments; the weights are the module's own
    else:
        optimizer = 12 * trainable
    weights = 0 if stage == 3 else dtype_bytes * n_params
    method_state, ranks_rule = 0, None
    if m.name in PROJECTING:
        o = m.osft
        names = S.select_targets([n for n, p in params.items() if p.dim() == 2], o.targets)
        first = (lambda s: o.trr * min(s)) if o.rank == "adaptive" else (lambda s: o.ratio * min(s))
        # The task-start weights (`mark`) the update boundary diffs against; the inputs boundary keeps
        # none, unless the reference update's extend left one.
        anchored = o.subspace == "accumulate" and (o.boundary == "update" or bool(o.protect_update_from))
        for n in names:
            shape = tuple(params[n].shape)
            r = math.floor(first(shape) + 1e-9)
            if o.subspace == "accumulate":
                r = max(r, S.max_protected_rank(shape, o.max_protected_ratio))
            method_state += 4 * (bases_numel(shape, min(r, min(shape)), o.projection)
                                 + (math.prod(shape) if anchored else 0))
        ranks_rule = (f"{len(names)} target matrices, bases at "
                      + (f"max_protected_ratio {o.max_protected_ratio}" if o.subspace == "accumulate"
                         else (f"trr {o.trr}" if o.rank == "adaptive" else f"ratio {o.ratio}"))
                      + (" + the anchor (fp32)" if anchored else ""))
    rng = RNG_FILE_BYTES * world + FIXED_BYTES + PER_RANK_BYTES * world
    total = optimizer + weights + method_state + rng
    export = DTYPE_BYTES[cfg.output.export_dtype] * n_params
    return {"parameters": n_params, "trainable": trainable, "dtype": cfg.model.dtype, "zero_stage": stage,
            "optimizer_bytes": optimizer, "weights_bytes": weights, "method_state_bytes": method_state,
            "method_state": ranks_rule, "rng_bytes": rng, "bytes_per_save": total, "keep": cfg.checkpoint.keep,
            "export_bytes_per_task": export if cfg.output.export_each_task else 0}


def disk_check(cfg: RunConfig, est: Optional[dict], chk: Check) -> None:
    from ds_cl.training.checkpoint import SPACE_MARGIN

    probe = Path(cfg.output_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    disk = {"output_dir": cfg.output_dir, "measured_at": str(probe), "free_bytes": free}
    chk.plan["disk"] = disk
    if est is None:
        return
    size, keep = est["bytes_per_save"], cfg.checkpoint.keep
    ckpt = math.ceil((keep + SPACE_MARGIN) * size)
    exports = est["export_bytes_per_task"] * len(cfg.tasks)
    disk.update(checkpoints_need_bytes=ckpt, exports_need_bytes=exports)
    if free < ckpt:
        chk.warn(f"checkpoints: checkpoint.keep={keep} saves of ~{gib(size)} plus room for the next one "
                 f"({SPACE_MARGIN} x its size: a save is written before the oldest is deleted) need ~{gib(ckpt)}, "
                 f"but {probe} has {gib(free)} free: the run stops at the save that does not fit; lower "
                 f"checkpoint.keep or free space")
    elif free < ckpt + exports:
        chk.warn(f"disk: checkpoints (~{gib(ckpt)}) and the {len(cfg.tasks)} exported models "
                 f"(output.export_each_task, ~{gib(est['export_bytes_per_task'])} each) need ~{gib(ckpt + exports)}, "
                 f"but {probe} has {gib(free)} free")


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# The check


def run_check(config: str, overrides: list[str] = (), *, world_size: Optional[int] = None,
              nodes: Optional[int] = None, gpus_per_node: Optional[int] = None, resume: bool = False,
              start_ok: bool = False, offline_ok: bool = False,
              environ: Optional[Mapping[str, str]] = None) -> Check:
    from ds_cl.training import preflight as pf
    from ds_cl.training.config import load_config
    from ds_cl.training.ds_config import check_ds_config

    env = os.environ if environ is None else environ
    chk = Check(config)
    try:
        world, source, assumed = resolve_world(world_size, nodes, gpus_per_node, env)
    except ConfigError as e:
        chk.error(e)
        world, source, assumed = None, None, False
    if world is not None:
        chk.plan["world"] = {"size": world, "from": source, "assumed": assumed}
        if assumed:
            chk.notes.append("world size: assumed 1 (no --world-size, --nodes/--gpus-per-node, WORLD_SIZE or SLURM "
                             "allocation); pass the launch's --world-size N to check its batch arithmetic")
    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        chk.error(e)
        return chk
    chk.plan.update(output_dir=cfg.output_dir, method=cfg.method.name)

    def attempt(fn, *a):
        try:
            return fn(*a)
        except ConfigError as e:
            chk.error(e)
        except (ValueError, OSError) as e:
            chk.error(e)
        return None

    attempt(pf.check_output_dir, cfg, resume, start_ok)
    accepted = attempt(pf.check_saved_config, cfg, resume, config)
    if accepted:
        chk.notes.append(f"--resume: changed since the run started, accepted: {'; '.join(accepted)}")
    stage = None
    if world is not None:
        try:
            batch, stage = check_ds_config(cfg, world)
            chk.plan["batch"] = {"micro": batch.micro, "accumulation": batch.accum, "world": batch.world,
                                 "global": batch.total, "zero_stage": stage,
                                 "text": f"micro {batch.micro} x accumulation {batch.accum} x world {batch.world} "
                                         f"= global {batch.total}"}
        except ConfigError as e:
            msg = str(e)
            if "does not fit world size" in msg:
                msg = f"{msg}: {batch_fix(cfg, world)}"
            chk.error(f"batch: {msg}")

    # Model and tokenizer: where they are; model-dependent checks on a copy that points at the found path.
    net: dict = {}
    model_path = None
    m = cfg.model
    if m.name_or_path is not None:
        minfo, model_path = locate(m.name_or_path, "model.name_or_path", ("config.json",), chk, offline_ok, env, net)
    else:
        minfo = {"kind": "config", "model_type": m.config.get("model_type"), "note": "built from model.config"}
    chk.plan["model"] = minfo
    tok_name = m.tokenizer or m.name_or_path
    if m.tokenizer is not None:
        tinfo, tok_path = locate(m.tokenizer, "model.tokenizer",
                                 ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"), chk, offline_ok,
                                 env, net)
    else:
        tinfo, tok_path = {**minfo, "note": "the model's own"}, model_path
        if minfo.get("kind") == "hub" and minfo.get("cached") and not _cached(
                tok_name, ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")):
            chk.error(f"model.name_or_path: the local HF cache holds {tok_name}'s config but not its tokenizer "
                      f"files; download them too, or set model.tokenizer")
            tok_path = None
    chk.plan["tokenizer"] = tinfo
    usable = dataclasses.replace(cfg, model=dataclasses.replace(
        m, name_or_path=model_path if m.name_or_path is not None else None,
        tokenizer=tok_path if m.tokenizer is not None else None))
    have_model = m.name_or_path is None or model_path is not None
    model = None
    if have_model:
        n_err = len(chk.errors)
        attempt(pf.check_model, usable)
        if len(chk.errors) == n_err:
            attempt(pf.check_model_shapes, usable)
        if len(chk.errors) == n_err:
            try:
                from ds_cl.training.modeling import hf_config, meta_model

                model = meta_model(hf_config(usable.model.config, usable.model.name_or_path))
            except Exception as e:  # check_model_shapes built the same: not expected
                chk.error(f"model: cannot be built on the meta device ({type(e).__name__}: {e})")
    tok = None
    if tok_path is not None and (have_model or m.tokenizer is not None):
        if not have_model:  # the tokenizer alone: no vocabulary size to compare with
            usable = dataclasses.replace(usable, model=dataclasses.replace(usable.model, config={}))
        tok = attempt(pf.check_tokenizer, usable)
        if tok is not None:
            tinfo["kind_loaded"] = getattr(tok, "kind", None)
            tinfo["chat_template"] = cfg.model.chat_template
    elif tok_path is None:
        chk.notes.append("tokenizer: not available here: record lengths and truncation are left out of the plan")
    n_err = len(chk.errors)
    attempt(pf.check_data, cfg)
    if len(chk.errors) == n_err:
        check_tasks(cfg, chk, tok)
    est = None
    if model is not None and stage is not None:
        est = checkpoint_estimate(cfg, model, world, stage)
        chk.plan["checkpoint"] = est
    elif model is None:
        chk.notes.append("checkpoint size: unknown without the model's config")
    disk_check(cfg, est, chk)
    return chk


# ---------------------------------------------------------------------------------------------
# Output


def format_plan(chk: Check) -> str:
    p = chk.plan
    out = [f"{PROG}: {p['config']}"]

    def row(name: str, text: str) -> None:
        out.append(f"  {name:<11} {text}")

    def tokens_row(t: dict) -> None:
        if "tokens" in t:
            k = t["tokens"]
            row("", f"  tokens per training record (prompt + answer): p50 {k['p50']}, p90 {k['p90']}, p99 {k['p99']}, "
                    f"max {k['max']} vs train.max_seq_len {k['max_seq_len']}: {k['truncated']} of {k['of']} truncated")

    if "world" in p:
        row("world size", f"{p['world']['size']} ({p['world']['from']})")
    if "batch" in p:
        b = p["batch"]
        row("batch", f"{b['text']} (train.micro_batch_size x gradient accumulation x world = "
                     f"train.global_batch_size); ZeRO stage {b['zero_stage']}, method {p.get('method')}")
    for key in ("model", "tokenizer"):
        if key in p:
            i = p[key]
            if i.get("kind") == "config":
                text = f"built from model.config ({i.get('model_type')}), random init"
            elif i.get("kind") == "local":
                text = f"{i['name']} (local)"
            elif i.get("kind") == "hub":
                text = f"{i['name']} (hub id; " + (f"in the local HF cache: {i['path']})" if i.get("cached") else
                                                   "NOT in the local HF cache" + (", downloaded at start)" if
                                                                                  i.get("download") else ")"))
            else:
                text = str(i)
            if key == "tokenizer" and p.get("tokenizer", {}).get("chat_template"):
                text += ", chat template"
            row(key, text)
    for t in p.get("tasks", []):
        held = (f"{t['held_out']} held out of {t['records']} for evaluation ({t['eval_from']})" if "held_out" in t
                else f"evaluated on {t['eval_from']} ({t.get('eval', '?')} records)")
        tuning = f"; {t['tuning']} held out for tuning (eval.tuning_size)" if t.get("tuning") else ""
        row("task", f"{t['name']}: {t['train']} training records; {held}{tuning}")
        tokens_row(t)
    for t in p.get("replay_earlier", []):
        row("replays", f"{t['name']}: {t['train']} training records (method.replay.earlier: all replayed from, "
                       f"none held out)")
        tokens_row(t)
    if "protect_inputs" in p:
        pi = p["protect_inputs"]
        for t in pi["sources"]:
            row("protects", f"{t['name']}: {t['train']} training records (method.osft.protect_inputs_of)")
            tokens_row(t)
        row("", f"  the inputs of {pi['samples']} of them (method.osft.importance_samples) before the first task")
        # protect_inputs_of changes two defaults (ds_cl/training/config.py): say which values the run takes.
        row("", f"  with fit_before_first_task {str(pi['fit_before_first_task']).lower()}, non_target_lr_scale "
                f"{pi['non_target_lr_scale']:g} (the defaults once protect_inputs_of is given, unless set)")
    for ph in p.get("phases", []):
        row("steps", f"{ph['name']}: {ph['samples']} samples -> {ph['steps']} optimizer steps ({ph['steps_per_epoch']} "
                     f"per epoch x {ph['epochs']} epoch(s){', capped by train.max_steps_per_task' if ph['steps'] < ph['steps_per_epoch'] * ph['epochs'] else ''})")
    if "phases" in p:
        row("", f"  {p['total_steps']} optimizer steps in all")
    if "checkpoint" in p:
        c = p["checkpoint"]
        parts = [f"optimizer {gib(c['optimizer_bytes'])}"]
        if c["weights_bytes"]:
            parts.append(f"weights {gib(c['weights_bytes'])}")
        if c["method_state_bytes"]:
            parts.append(f"osft state {gib(c['method_state_bytes'])} ({c['method_state']})")
        row("checkpoint", f"~{gib(c['bytes_per_save'])} per save ({c['parameters']:,} parameters, "
                          f"{c['trainable']:,} trainable, {c['dtype']}, ZeRO {c['zero_stage']}: {', '.join(parts)}); "
                          f"checkpoint.keep {c['keep']}")
        if c["export_bytes_per_task"]:
            row("", f"  exported model per task: ~{gib(c['export_bytes_per_task'])}")
    if "disk" in p:
        d = p["disk"]
        need = (f"; checkpoints need ~{gib(d['checkpoints_need_bytes'])}"
                + (f", exports ~{gib(d['exports_need_bytes'])}" if d.get("exports_need_bytes") else "")
                if "checkpoints_need_bytes" in d else "")
        row("disk", f"{gib(d['free_bytes'])} free at {d['measured_at']} (output_dir {d['output_dir']}){need}")
    for n in chk.notes:
        out.append(f"note: {n}")
    for w in chk.warnings:
        out.append(f"warning: {w}")
    out.append(f"{PROG}: {'ok' if not chk.errors else f'{len(chk.errors)} error(s)'}")
    return "\n".join(out)


def main(args) -> int:
    """`ds-cl train ... --check` (args: ds_cl.training.train.parse_args's namespace)."""
    chk = run_check(args.config, args.overrides, world_size=args.world_size, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, resume=args.resume, start_ok=args.resume_or_start,
                    offline_ok=args.offline_ok)
    if args.json:
        print(json.dumps(chk.as_json(), indent=1))
    else:
        print(format_plan(chk), flush=True)
    for e in chk.errors:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2 if chk.errors else 0
