"""The DeepSpeed config of a run: every rule about it, in one place, for `ds-cl train` (build_ds_config),
its preflight (ds_cl/training/preflight.py) and the launchers' checks (ds_cl/tools/launch_checks.py).

    ds = load_ds_config("ds.json")                  # a JSON object, or ConfigError
    batch = resolve_batch(ds, world, micro, total)  # train_batch_size = micro x grad_accum x world
    stage = check_zero_stage(ds, world, method)     # the stages the method runs on
    check_precision(ds, dtype, method)              # bf16/fp16 sections against model.dtype
    batch, stage = check_ds_config(cfg, world)      # all of the above for a run config (no torch import)
    ds = build_ds_config(cfg, world, on_cpu)        # the config handed to deepspeed.initialize

The run config is the authority: DeepSpeed's "auto" (or a missing key) takes the run config's value,
and a number in the DeepSpeed config must agree with it. Every error is a one-line ConfigError naming
the key and showing the arithmetic; the launch checks turn it into their LaunchError. The projector's
own run-time checks (ds_cl/core/zero_shards.shards_for) stay in core: the method rules below refuse the
same configurations before anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ConfigError is ds_cl.training.config's (the same class); RunConfig is not imported, because config.py
# reads the DeepSpeed JSON through this module and the two must not import each other.
from ds_cl.training.errors import ConfigError

RunConfig = Any  # a ds_cl.training.config.RunConfig

# Methods whose SubspaceProjector (ds_cl/core/projector.py) works on DeepSpeed's partitions. It runs on
# ZeRO-3 and ZeRO-2 partitions (ZeRO-2 without optimizer offload), and on whole tensors with ZeRO off
# (stage 0) only with one process and fp32 weights. Stage 1 keeps fp32 optimizer state partitioned but
# gradients whole, a layout the projector does not handle; fp16 (loss-scaled, overflow-skipped steps)
# is refused too.
PROJECTOR_METHODS = ("osft",)
PROJECTOR_STAGES = (3, 2, 0)
ZERO_STAGES = (0, 1, 2, 3)
DEFAULT_ZERO_STAGE = 3  # when the DeepSpeed config has no zero_optimization section

MICRO, ACCUM, TOTAL = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"
PRECISION = (("bf16", "bfloat16"), ("fp16", "float16"))  # DeepSpeed section, model.dtype it means


# ---------------------------------------------------------------------------------------------
# Reading


def load_ds_config(ds: str | Path | dict, key: str = "deepspeed") -> dict:
    """A DeepSpeed config: a dict as it is, or a JSON file holding one object. `key` names the setting
    in the errors (the run config's `deepspeed`)."""
    if isinstance(ds, dict):
        return ds
    path = Path(ds)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path} is not valid JSON: line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: {path}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Batch arithmetic: train_batch_size = micro x grad_accum x world (DeepSpeed's rule)


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


def _ds_number(ds: dict, key: str, src: str) -> int | None:
    v = ds.get(key, "auto")
    if v == "auto" or v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{src}.{key} must be a positive integer or \"auto\", got {v!r}")
    return v


def resolve_batch(ds: dict, world: int, micro: int | None = None, total: int | None = None,
                  src: str = "deepspeed") -> Batch:
    """Micro batch, gradient accumulation and world of a run, checked against DeepSpeed's rule.

    `micro` and `total` are the run config's train.micro_batch_size and train.global_batch_size (None:
    not given); when both are given they settle the batch, and DeepSpeed's numbers must agree with it
    ("auto" takes it). Otherwise the DeepSpeed config's numbers fill the gaps: two of micro, grad_accum
    and train_batch_size settle the third, and with fewer, micro and grad_accum default to 1.
    `src` names the DeepSpeed config's keys in the errors (`deepspeed.train_batch_size`).
    """
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be a positive integer, got {world!r}")
    have = {k: _ds_number(ds, k, src) for k in (MICRO, ACCUM, TOTAL)}
    # Each number the batch is solved from, with the key it came from.
    known: dict[str, tuple[int, str]] = {}
    if micro is not None:
        known[MICRO] = (micro, "train.micro_batch_size")
    if total is not None:
        known[TOTAL] = (total, "train.global_batch_size")
    if len(known) < 2:
        for k in (MICRO, ACCUM, TOTAL):
            if k not in known and have[k] is not None:
                known[k] = (have[k], f"{src}.{k}")
    if TOTAL in known and len(known) == 1:
        known[MICRO] = (1, "the default micro batch")
    batch = _solve(known, world)
    given = known[TOTAL][1] if TOTAL in known else "train_batch_size"
    for key, val in ((MICRO, batch.micro), (ACCUM, batch.accum), (TOTAL, batch.total)):
        if have[key] is not None and have[key] != val:
            raise ConfigError(
                f"{src}.{key}={have[key]} disagrees with the run config, which gives {val} "
                f"({given} {batch.total} = micro {batch.micro} x world {world} x accumulation {batch.accum}); "
                f"remove it from the deepspeed config or set it to \"auto\"")
    return batch


def _solve(known: dict[str, tuple[int, str]], world: int) -> Batch:
    def kv(k: str) -> str:
        return f"{known[k][1]}={known[k][0]}"

    m, a, t = (known[k][0] if k in known else None for k in (MICRO, ACCUM, TOTAL))
    head = f"train_batch_size {t} does not fit world size {world}"
    if t is None:
        return Batch(1 if m is None else m, 1 if a is None else a, world)
    if m is not None and a is not None:
        b = Batch(m, a, world)
        if t != b.total:
            raise ConfigError(f"{head}: {kv(TOTAL)} but {kv(MICRO)} x {kv(ACCUM)} x world size {world} = {b.total}; "
                              "change the batch settings or the number of processes")
        return b
    known_key, other = (MICRO, "gradient accumulation") if m is not None else (ACCUM, "micro batch")
    per = (m if m is not None else a) * world
    if t % per:
        raise ConfigError(f"{head}: {kv(TOTAL)} must be a multiple of {kv(known_key)} x world size {world} = {per} "
                          f"({other} = {t}/{per} = {t / per:.3g} is not an integer)")
    return Batch(m, t // per, world) if m is not None else Batch(t // per, a, world)


# ---------------------------------------------------------------------------------------------
# ZeRO stage and precision


# DeepSpeed's documented top-level keys (deepspeed.ai/docs/config-json). DeepSpeed ignores a key it does not
# know, so a typo such as `zero_optimisation` would silently train without the intended section.
DS_TOP_LEVEL = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler",
    "activation_checkpointing", "sparse_attention", "data_efficiency", "curriculum_learning", "tensorboard",
    "wandb", "csv_monitor", "comet", "comms_logger", "elasticity", "communication_data_type", "data_types",
    "aio", "checkpoint", "autotuning", "compression_training", "pipeline", "timers", "compile", "nebula",
    "hybrid_engine", "progressive_layer_drop", "eigenvalue", "quantize_training", "weight_quantization",
    "gradient_allreduce_op", "seq_parallel_communication_data_type", "disable_allgather", "dataloader_drop_last",
    "vocabulary_size", "use_data_before_expert_parallelism", "tensor_parallel", "graph_harvesting",
    "disable_python_gc", "zenflow", "mics_shard_size", "mics_hierarchical_params_gather", "load_universal_checkpoint",
)


def _zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def check_ds_keys(ds: dict, src: str = "deepspeed") -> None:
    """Refuse a misspelt DeepSpeed key: a top-level key close to a known one (an unknown key nothing
    resembles may be a newer DeepSpeed's, and passes), and any key of `zero_optimization` that
    DeepSpeed's own ZeRO config model does not have."""
    import difflib

    for key in ds:
        if key not in DS_TOP_LEVEL:
            near = difflib.get_close_matches(str(key), DS_TOP_LEVEL, n=1, cutoff=0.8)
            if near:
                raise ConfigError(f"{src}: unknown DeepSpeed key {key!r} (did you mean {near[0]!r}?); "
                                  f"DeepSpeed would ignore it silently")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        known = _zero_keys()
        for key in zero:
            if key not in known:
                near = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                raise ConfigError(f"{src}.zero_optimization: unknown key {key!r}"
                                  f"{f' (did you mean {near[0]!r}?)' if near else ''}")


def zero_stage(ds: dict, src: str = "deepspeed") -> int:
    """The ZeRO stage of a DeepSpeed config (0 when its zero_optimization section has no stage, as in
    DeepSpeed; build_ds_config adds a section with stage 3 when there is none)."""
    section = ds.get("zero_optimization", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{src}.zero_optimization must be a mapping, got {section!r}")
    stage = section.get("stage", 0)
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        raise ConfigError(f"{src}.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def check_zero_stage(ds: dict, world: int, method: str | None, dtype: str | None = None,
                     src: str = "deepspeed") -> int:
    """The stage, checked against what `method` runs on (PROJECTOR_STAGES); `dtype` (model.dtype, None:
    not known) for the rule that stage 0 needs fp32 weights."""
    stage = zero_stage(ds, src)
    if method not in PROJECTOR_METHODS:
        return stage
    key = f"{src}.zero_optimization.stage"
    if stage not in PROJECTOR_STAGES:
        raise ConfigError(f"{key}: ZeRO stage {stage} is not supported by method {method!r} "
                          "(its projector supports ZeRO 3, 2, or 0 on a single process)")
    if stage == 0 and world > 1:
        raise ConfigError(f"{key}: ZeRO stage 0 with method {method!r} needs a single process, "
                          f"world size is {world}; use ZeRO 3 or 2")
    if stage == 0 and dtype is not None and dtype != "float32":
        raise ConfigError(f"{key}: ZeRO stage 0 with method {method!r} needs model.dtype=float32, "
                          f"got {dtype}; use ZeRO 3 or 2 for {dtype}")
    if stage == 2 and offloads_optimizer(ds):
        raise ConfigError(f"{src}.zero_optimization.offload_optimizer: ZeRO stage 2 with optimizer offload is not "
                          f"supported by method {method!r}; use ZeRO 3 (offload supported) or stage 2 without it")
    return stage


def check_precision(ds: dict, dtype: str, method: str | None = None, src: str = "deepspeed") -> None:
    """model.dtype against the bf16/fp16 sections (an enabled section must be model.dtype's), and
    against the method (the projector refuses fp16)."""
    for sec, name in PRECISION:
        if ds.get(sec, {}).get("enabled", False) is True and dtype != name:
            raise ConfigError(f"{src}.{sec}.enabled is true but model.dtype={dtype}")
    if method in PROJECTOR_METHODS and dtype == "float16":
        raise ConfigError(f"model.dtype=float16 is not supported by method {method!r} (fp16 steps are loss-scaled "
                          "and skipped on overflow); use bfloat16 or float32")


# ---------------------------------------------------------------------------------------------
# A run config's DeepSpeed config


def _resolve(cfg: RunConfig, world: int) -> tuple[dict, Batch]:
    """A copy of cfg.deepspeed with batch sizes, clipping, precision and ZeRO stage filled and checked."""
    ds = json.loads(json.dumps(cfg.deepspeed))  # a copy
    t = cfg.train
    batch = resolve_batch(ds, world, micro=t.micro_batch_size, total=t.global_batch_size)
    ds.update({MICRO: batch.micro, ACCUM: batch.accum, TOTAL: batch.total})
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and clip != t.grad_clip:
        raise ConfigError(f"deepspeed.gradient_clipping={clip} disagrees with the run config, which gives "
                          f"{t.grad_clip} (train.grad_clip); remove it from the deepspeed config or set it to \"auto\"")
    ds["gradient_clipping"] = t.grad_clip
    dtype = cfg.model.dtype
    check_precision(ds, dtype)
    for sec, name in PRECISION:
        if dtype == name:
            ds.setdefault(sec, {})["enabled"] = True
    ds.setdefault("zero_optimization", {"stage": DEFAULT_ZERO_STAGE})
    return ds, batch


def check_ds_config(cfg: RunConfig, world: int) -> tuple[Batch, int]:
    """Every rule for a run config's DeepSpeed config at a world size: (batch, ZeRO stage) or ConfigError.
    What preflight and the launch checks run; imports neither torch nor deepspeed."""
    ds, batch = _resolve(cfg, world)
    check_precision(ds, cfg.model.dtype, cfg.method.name)
    stage = check_zero_stage(ds, world, cfg.method.name, cfg.model.dtype)
    return batch, stage


def offloads_optimizer(ds: dict) -> bool:
    """The optimizer states live on the host (zero_optimization.offload_optimizer to cpu or nvme)."""
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def builds_cpu_adam(ds: dict, on_cpu: bool) -> bool:
    """Whether DeepSpeed will JIT-compile its CPU Adam (`cpu_adam`) for a run of the user's DeepSpeed config
    `ds`: under optimizer offload, unless on CPU with no `optimizer` section (build_ds_config then gives
    torch's AdamW)."""
    return offloads_optimizer(ds) and (not on_cpu or "optimizer" in ds)


def build_ds_config(cfg: RunConfig, world: int, on_cpu: bool) -> dict:
    """The DeepSpeed config of a run: cfg.deepspeed with batch sizes, clipping and precision from the run
    config (conflicts are ConfigErrors), fp32 gradient accumulation for the projector under bf16
    (ds_cl.core.projector.prepare_ds_config), AdamW from train.* unless the config has an optimizer
    (torch's, or DeepSpeed's CPU Adam under optimizer offload on a GPU), and ZeRO stage 3 unless it has a
    zero_optimization section."""
    ds, _ = _resolve(cfg, world)
    if cfg.method.name in PROJECTOR_METHODS:
        # A projected gradient accumulated in bf16 is rounded back off the subspace (leak ~5e-4 vs ~5e-8).
        from ds_cl.core.projector import prepare_ds_config

        ds = prepare_ds_config(ds)
    if "optimizer" not in ds:
        t = cfg.train
        params = {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay}
        if on_cpu or not offloads_optimizer(ds):
            # torch's AdamW (torch picks its multi-tensor kernels on a GPU). Left to itself DeepSpeed builds
            # FusedAdam, which it JIT-compiles with nvcc at start-up: with torch's CUDA wheels but no CUDA
            # toolkit, deepspeed.initialize fails. Under optimizer offload on a GPU DeepSpeed's CPU Adam runs
            # instead (compiled by the host's C++ compiler, no nvcc; by DeepSpeed's measure several times
            # faster than torch's on the CPU). FusedAdam on purpose: docs/training.md, "The optimizer".
            params.update(torch_adam=True, adam_w_mode=True)
        ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds
