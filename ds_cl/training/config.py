"""The run config of `ds-cl train`: a typed tree of dataclasses read from one YAML file plus
`key.sub=value` overrides, validated before anything heavy (deepspeed, torch, the model) is touched.

Every field below is documented in docs/training.md; the defaults follow the paper's training recipe
(arXiv 2504.07097: AdamW, lr 1e-5, one epoch per task, effective batch 8, bf16).

    cfg = load_config("run.yaml", ["train.lr=2e-5", "tasks.0.max_train_samples=100"])

Errors are `ConfigError` with one line naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ds_cl.methods import PROJECTING, REGISTRY, REPLAYING
from ds_cl.training.ds_config import check_ds_keys, load_ds_config, zero_stage
from ds_cl.training.errors import ConfigError  # its home is errors.py; everything imports it from here

# Local data formats we read ourselves; anything else is a `datasets` name or a saved dataset folder.
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
METHODS = tuple(REGISTRY)  # ds_cl/methods/__init__.py
MAX_TIMEOUT_MINUTES = 10 ** 6  # train.dist_timeout_minutes: about two years; far larger overflows a timedelta

# The prompt style of the O-LoRA benchmark (Wang et al. 2023) for classification tasks.
DEFAULT_INSTRUCTION = "What is the topic of the following paragraph? Choose one from the option."
DEFAULT_TEMPLATE = "{instruction}\nOption: {options}\n{input}\nAnswer:"


@dataclass
class ModelConfig:
    # An HF model folder (or hub name when online). Null with `config` set: a randomly initialised model.
    name_or_path: Optional[str] = None
    # Architecture for a model built from scratch, e.g. {model_type: llama, hidden_size: 64, ...}.
    config: Optional[dict] = None
    # A tokenizer folder, or a SentencePiece `.model` file (LLaMA-2 style). Default: name_or_path.
    tokenizer: Optional[str] = None
    # Compute dtype; must agree with the deepspeed config's bf16/fp16 sections (ds_cl/training/ds_config.py).
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Wrap prompts with the tokenizer's chat template (HF tokenizers only).
    chat_template: bool = False
    # Recompute activations in the backward pass (HF gradient checkpointing): what lets LLaMA-2-7B train
    # with 1024+ token sequences on 80 GB GPUs, for ~30% more compute.
    gradient_checkpointing: bool = False


# method.osft's settings whose default depends on whether protect_inputs_of names the data the starting
# model was tuned on. Without it the weights' top half is what osft can protect, trained as published.
# With it, the retention study's ablation (docs/osft.md, "Retention: the report"; three seeds) found that
# protecting that data's layer inputs *instead of* the weights' top half, with embeddings, norms and the
# tied lm_head frozen, is what keeps the starting model's refusals and instruction following while the
# tasks are still learnt: the weights' top half is not where the refusals live (osft with the first fit
# alone kept 1 % of them) and, with the inputs' span on top of it, 88.5 % of the directions were taken
# before the first task (77.8 % without it); and at a learning rate that learns the tasks, the
# unconstrained embeddings, norms and lm_head carried the shrinking answers (frozen: 17 IFEval prompts
# gained, 4 lost, p = 0.007).
AUTO_WITH_PROTECTED_INPUTS = {"fit_before_first_task": False, "non_target_lr_scale": 0.0}
AUTO_WITHOUT = {"fit_before_first_task": True, "non_target_lr_scale": 1.0}


@dataclass
class OSFTConfig:
    # How the protected subspace evolves over the sequence. refit (the paper): at each task boundary,
    # the top directions of the current weights, as many as the rank policy gives. accumulate (ds-cl's
    # osft-acc): the rank policy's fit once before the first task, then at each boundary add the top
    # directions of the finished task's update, so later tasks cannot move it (docs/osft.md).
    subspace: Literal["refit", "accumulate"] = "accumulate"
    # accumulate: the added directions hold this share of the finished task's |dW|^2 (0.99: docs/osft.md,
    # 0.9 left a third of a task's answers to be overwritten in one seed of three) ...
    update_energy: float = 0.99
    # ... while each matrix's protected directions stay within this fraction of min(m, n).
    max_protected_ratio: float = 0.9
    # accumulate: what a task boundary protects. update: the finished task's update (above). inputs: the
    # span of the inputs the finished task fed each target layer (gradient projection memory), from
    # `importance_samples` of its training samples run forward; the output side gets as many directions.
    boundary: Literal["update", "inputs"] = "update"
    # inputs: the added input directions hold this share of the inputs' energy outside what is protected.
    input_energy: float = 0.99
    # Rank policy per matrix: the paper's adaptive layer importance, or one fixed ratio.
    rank: Literal["adaptive", "fixed"] = "adaptive"
    mrr: float = 0.1  # adaptive: minimum retained ratio
    trr: float = 0.8  # adaptive: top retained ratio
    ratio: float = 0.5  # fixed: retained fraction of min(m, n)
    projection: Literal["two_sided", "paper"] = "two_sided"
    # Project the optimizer's update too (Adam's scaling breaks a projected gradient; ds_cl/core/projector.py).
    project_update: bool = True
    # Where the update projection keeps this rank's fp32 target partitions across the optimizer step:
    # auto (host memory on GPUs, where the copy would be the largest part of the projector's GPU memory:
    # ds_configs/README.md), device (faster when memory allows: no host transfers), host.
    pre_step_copy: Literal["auto", "device", "host"] = "auto"
    # Measure the leak (metrics.jsonl `leak`) on the first step after each fit and every audit_every-th
    # step after it: a float64 check that costs about half the projection (docs/benchmarks.md).
    audit_every: int = 10
    # Target parameter names (null: every attention/MLP Linear of the decoder layers).
    targets: Optional[list[str]] = None
    # Fit before the first task too, protecting the base model's top singular directions; false leaves
    # task 0 unconstrained (the paper's T5 runs) or constrained by protect_inputs_of alone. Null (the
    # default): true, unless protect_inputs_of is given (then false: see AUTO_WITH_PROTECTED_INPUTS).
    fit_before_first_task: Optional[bool] = None
    # Learning rate of the parameters outside the targets (embeddings, norms, lm_head), as a fraction of
    # train.lr, while the subspace constraint is on. 1.0: trained like the targets (the method as
    # published); 0.0: frozen, so only constrained weights change. See docs/demo.md for why it matters.
    # Null (the default): 1.0, unless protect_inputs_of is given (then 0.0).
    non_target_lr_scale: Optional[float] = None
    # A model folder (safetensors) of the weights the starting model was tuned from, e.g. the base model
    # of a chat/safety-aligned one. Before the first task, the top directions of that tuning's update
    # (starting - this, `update_energy` of it) are protected too, as `accumulate` does for each finished
    # task: the SVD of the weights alone protects what pre-training wrote, not a small alignment update
    # on top of it (docs/osft.md). Needs `subspace: accumulate` (a refit would drop them at task 1).
    protect_update_from: Optional[str] = None
    # Data the starting model was tuned on (e.g. its safety alignment), as method.replay.earlier's entries
    # (the keys of `tasks:` entries; all records, none evaluated). Before the first task, `importance_samples`
    # of their records (as training formats them: the prompt and answer, through the chat template) run
    # forward and the span of the inputs they feed each target layer is protected, as `boundary: inputs`
    # protects a finished task's (`input_energy` of it): later updates leave the layers' outputs on them
    # unchanged. Needs `subspace: accumulate` and `projection: two_sided`.
    protect_inputs_of: Optional[list[TaskConfig]] = None
    # Samples (per task) used for layer importance, and by `boundary: inputs`: the previous task's training data.
    importance_samples: int = 32
    # General data for the importance before the first task (a data file, read with `input_field`
    # / the same loaders as tasks). Null: the fixed rank policy (`ratio`) for the first fit.
    first_task_importance_data: Optional[str] = None
    first_task_importance_field: str = "input"

    def __post_init__(self):
        # The settings left null (their default) take AUTO_WITH_PROTECTED_INPUTS / AUTO_WITHOUT here, at
        # construction, so every path that builds a config (a file, overrides, code) trains with them and
        # the config a run saves shows the values used; a value set explicitly is kept.
        auto = AUTO_WITH_PROTECTED_INPUTS if self.protect_inputs_of else AUTO_WITHOUT
        for key, value in auto.items():
            if getattr(self, key) is None:
                setattr(self, key, value)


@dataclass
class ReplayConfig:
    # How many samples are replayed. fraction_of "task": task i adds round(fraction x its own training
    # samples), drawn anew for each task from the pool of every earlier source's samples together (a source
    # with many samples fills most of the draw). "earlier": a fixed buffer per earlier source, round(fraction
    # x that source's samples) drawn once, joins every later task: the classic "keep 10 % of each old task"
    # memory, in which every earlier source is represented in proportion to its size (fraction <= 1).
    fraction: float = 0.1
    fraction_of: Literal["task", "earlier"] = "task"
    # Tasks the starting model was trained on before this run (e.g. a safety alignment trained in a run of
    # its own), with the keys of `tasks:` entries: all their training records (none held out, never
    # evaluated) join the replay pool of every task, the first included. Empty: replay from the second task
    # on, from this run's earlier tasks only.
    earlier: list[TaskConfig] = field(default_factory=list)


@dataclass
class LoRAConfig:
    # Methods olora / inclora (ds_cl/methods/lora.py; defaults from O-LoRA's released scripts, docs/baselines.md).
    rank: int = 8
    alpha: float = 32.0  # adapter output scaled by alpha / rank
    dropout: float = 0.1  # on the adapter's input
    # Target Linear modules: names equal to an entry or ending in "." + entry (PEFT's rule).
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # O-LoRA's loss: task + lambda_orth * sum_{i<t} ||A_i A_t^T||^2 + lambda_l2 * (||A_t||^2 + ||B_t||^2).
    # inclora ignores lambda_orth.
    lambda_orth: float = 0.5
    lambda_l2: float = 0.0
    # fro2: squared Frobenius norm (the paper's formula); l1: sum of |entries| (the authors' trainer code).
    orth_norm: Literal["fro2", "l1"] = "fro2"
    # Learning rate of the adapters (O-LoRA's scripts: 1e-3); null: train.lr. The schedule still applies.
    lr: Optional[float] = 1e-3


@dataclass
class MethodConfig:
    name: Literal[METHODS] = "osft"
    osft: OSFTConfig = field(default_factory=OSFTConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class TrainConfig:
    lr: float = 1e-5
    epochs: int = 1
    micro_batch_size: int = 1
    # Effective batch per optimizer step = micro_batch_size x world size x gradient accumulation.
    global_batch_size: int = 8
    max_seq_len: int = 512
    warmup_ratio: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    # Fresh optimizer state per task, as the authors' trainers (one HF Trainer per task).
    reset_optimizer_each_task: bool = True
    # Cap on optimizer steps per task (null: the epochs decide).
    max_steps_per_task: Optional[int] = None
    log_every: int = 1
    # A non-finite loss or gradient norm: "stop" the run (exit 3, naming step and task; the step's update
    # is not applied) or "skip" the step (DeepSpeed drops its update) and go on. docs/reliability.md.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # How long a collective may wait before the job fails (the process group's timeout). The other ranks
    # wait in one while rank 0 alone exports the model, runs the retention suite or deletes an old
    # checkpoint: minutes at 7B, past DeepSpeed's default of 10 (docs/launching.md).
    dist_timeout_minutes: float = 60.0
    # Deterministic kernels (torch, cuBLAS, cuDNN), so that a GPU run and its --resume give bit-identical
    # results, for some speed (docs/training.md). CPU runs resume bit-identically without it.
    deterministic: bool = False


@dataclass
class EvalConfig:
    # Greedy generation length; null: longest reference answer (in tokens) + 2.
    max_new_tokens: Optional[int] = None
    batch_size: int = 8
    # Evaluate the untrained model on every task first (gives the FWT baseline).
    before_training: bool = False
    # A retention suite name for ds_cl.evaluation after each task (skipped if that module is absent).
    # It loads the exported model whole on every GPU beside the training state until it ends (LLaMA-2-7B:
    # 12.6 GiB + the KV cache; ds_configs/README.md says where that does not fit).
    retention_suite: Optional[str] = None
    # After which tasks the suite runs: each (a retention curve) or only the last (the sequence's end).
    retention_after: Literal["each", "last"] = "each"
    # How a task's held-out prompts are scored: generate (greedy generation, the task's metric) or options
    # (rank classification, as lm-eval scores multiple choice: the option whose tokens, as the training target
    # writes them, are the most likely continuation of the prompt; exact option == answer). options needs
    # fixed-option tasks: every evaluation answer among the task's options (tasks.*.options).
    scoring: Literal["generate", "options"] = "generate"
    # A tuning split: > 0 holds out this many of each task's training records (before max_train_samples caps
    # the rest; drawn by seed and task name) and scores them after each phase beside the evaluation set, the
    # same way (eval.scoring), into `tuning_matrix` (summary.json). An lr sweep picks its learning rate by the
    # tuning AA, and the chosen run's `matrix` (the test items) serves as a seed. 0: none, and no cost.
    tuning_size: int = 0


@dataclass
class CheckpointConfig:
    # Checkpoint every N optimizer steps inside a task (0: only at task boundaries).
    every_steps: int = 0
    keep: int = 2
    # Exit (after checkpointing) once this many optimizer steps were done in this process:
    # simulates an interruption for testing `--resume`.
    stop_after_steps: Optional[int] = None


@dataclass
class OutputConfig:
    export_each_task: bool = True  # task_<i>_<name>/ as an HF model
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    plots: bool = True  # accuracy heatmap and loss curve PNGs
    # Experiment trackers (HF's report_to): tensorboard (<output_dir>/tensorboard/), wandb (<output_dir>/wandb/,
    # project $WANDB_PROJECT or ds-cl). Both need `pip install 'ds-cl[track]'`. As in HF, one name is a list of
    # one and "none" (or null) is none: a list once read.
    report_to: Union[list[str], str, None] = field(default_factory=list)


@dataclass
class TaskConfig:
    name: str = ""
    # A .json/.jsonl/.csv/.parquet file, a saved `datasets` folder, or a `datasets` name.
    train: str = ""
    # null: hold out `eval_size` samples of `train`, or a benchmark folder's test.json; "holdout": hold out
    # even there (tuning a learning rate without looking at the test split).
    eval: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    eval_size: int = 100
    # Record format (ds_cl/training/data.py `normalize_records`): auto (from the first record's keys),
    # input_output (the fields below), trace ({"prompt", "answer"}), alpaca ({"instruction", "input",
    # "output"}), messages (OpenAI {"messages": [{"role", "content"}]}), sharegpt ({"conversations":
    # [{"from", "value"}]}). The benchmark's folder layout is recognised from the folder itself.
    format: Literal["auto", "input_output", "trace", "alpaca", "messages", "sharegpt"] = "auto"
    # Field mapping: input/output text, or a chat `messages` list (last assistant turn is the answer).
    input_field: str = "input"
    output_field: str = "output"
    messages_field: Optional[str] = None
    # Chat records with model.chat_template: the loss on the last assistant turn, or on every one.
    loss_on: Literal["last", "assistant"] = "last"
    # Prompt: `template` with {instruction}, {options}, {input}; null template: the input as is.
    template: Optional[str] = DEFAULT_TEMPLATE
    instruction: str = DEFAULT_INSTRUCTION
    labels: Optional[list[str]] = None  # null: the sorted set of training outputs
    # eval.scoring: options: the answers chosen among (the prompt is not changed). null: `labels` when set,
    # else the distinct answers of the records in `train` (data.py `scoring_options`).
    options: Optional[list[str]] = None
    # "exact_match", or "module:function" taking (prediction, reference) -> float in [0, 1].
    metric: str = "exact_match"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


@dataclass
class RunConfig:
    output_dir: str = ""
    seed: int = 42
    # A deepspeed JSON file path, or the config inline. Batch sizes are filled from `train`.
    deepspeed: Union[str, dict] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tasks: list[TaskConfig] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks that name the key.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, src: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, src)
            except ConfigError:
                pass
        raise ConfigError(f"{src}: {key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src}: {key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}.{i}", src) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-5 as a string (YAML 1.1 wants a dot); accept numeric strings for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config field {key}: unsupported type {tp}")


def _build(cls, data: Any, prefix: str, src: str):
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: {where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{src}: unknown key {key!r} (known under {where}: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k, src) for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides: `train.lr=2e-5`, `tasks.0.name=x`, `method.osft.targets=[q_proj]` (values are YAML).


def apply_override(data: dict, item: str, src: str = "command line") -> None:
    if "=" not in item:
        raise ConfigError(f"{src}: override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: override {key}: value {raw!r} is not valid YAML ({yaml_problem(e)[1]})") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        sub = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{src}: override {key}: {sub} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{src}: override {key}: {sub} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{src}: override {key}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


# ---------------------------------------------------------------------------------------------
# Checks that need more than types: files exist, values in range, tasks are well formed.


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p))


def _is_local_path(s: str) -> bool:
    return s.endswith(DATA_EXTENSIONS) or s.endswith(".model") or s.startswith((".", "/", "~"))


def _validate(cfg: RunConfig, src: str, base: Path) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{src}: {key}: {msg}")

    need(bool(cfg.output_dir), "output_dir", "is required (where checkpoints, metrics and models go)")
    cfg.output_dir = _resolve(cfg.output_dir, base)

    m = cfg.model
    need(m.name_or_path is not None or m.config is not None, "model",
         "set model.name_or_path (an HF folder) or model.config (a model built from scratch)")
    if m.name_or_path and _is_local_path(m.name_or_path):
        m.name_or_path = _resolve(m.name_or_path, base)
        need(os.path.exists(m.name_or_path), "model.name_or_path", f"no such file or folder: {m.name_or_path}")
    if m.config is not None:
        need("model_type" in m.config, "model.config.model_type", "is required (e.g. llama)")
    need(m.tokenizer is not None or m.name_or_path is not None, "model.tokenizer",
         "is required when the model is built from model.config")
    if m.tokenizer is not None:
        if _is_local_path(m.tokenizer) or os.path.sep in m.tokenizer:
            m.tokenizer = _resolve(m.tokenizer, base)
            need(os.path.exists(m.tokenizer), "model.tokenizer", f"no such file or folder: {m.tokenizer}")

    # The DeepSpeed config's own rules (batch arithmetic, precision, ZeRO stage per method) live in
    # ds_cl/training/ds_config.py; here only what needs no world size: it reads, and its stage exists.
    try:
        if isinstance(cfg.deepspeed, str):
            cfg.deepspeed = load_ds_config(_resolve(cfg.deepspeed, base), key="deepspeed")
        check_ds_keys(cfg.deepspeed, src="deepspeed")
        zero_stage(cfg.deepspeed, src="deepspeed")
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None

    t = cfg.train
    for k in ("epochs", "micro_batch_size", "global_batch_size", "max_seq_len", "log_every"):
        need(getattr(t, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(t, k)}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    need(len(t.betas) == 2, "train.betas", f"needs two values, got {t.betas}")
    need(t.max_steps_per_task is None or t.max_steps_per_task >= 1, "train.max_steps_per_task", "must be >= 1")
    need(math.isfinite(t.lr), "train.lr", f"must be finite, got {t.lr}")
    need(t.grad_clip >= 0 and math.isfinite(t.grad_clip), "train.grad_clip",
         f"must be >= 0 (0: no clipping), got {t.grad_clip}")
    need(all(0 <= b < 1 for b in t.betas), "train.betas", f"Adam's betas must be in [0, 1), got {t.betas}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 < t.dist_timeout_minutes <= MAX_TIMEOUT_MINUTES, "train.dist_timeout_minutes",
         f"must be > 0 and at most {MAX_TIMEOUT_MINUTES} (minutes), got {t.dist_timeout_minutes}")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.eval.tuning_size >= 0, "eval.tuning_size",
         f"must be >= 0 (0: no tuning split), got {cfg.eval.tuning_size}")
    need(cfg.eval.max_new_tokens is None or cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens",
         f"must be >= 1 (or null: from the longest answer), got {cfg.eval.max_new_tokens}")
    need(cfg.checkpoint.stop_after_steps is None or cfg.checkpoint.stop_after_steps >= 1,
         "checkpoint.stop_after_steps", f"must be >= 1 (or null), got {cfg.checkpoint.stop_after_steps}")
    need(not cfg.eval.retention_suite or cfg.output.export_each_task, "eval.retention_suite",
         "needs output.export_each_task: true (the suite scores the model exported after each task)")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")

    o = cfg.method.osft
    need(0 <= o.mrr <= o.trr <= 1, "method.osft.mrr", f"need 0 <= mrr <= trr <= 1, got mrr={o.mrr} trr={o.trr}")
    need(0 <= o.ratio <= 1, "method.osft.ratio", f"must be in [0, 1], got {o.ratio}")
    need(0 <= o.update_energy <= 1, "method.osft.update_energy", f"must be in [0, 1], got {o.update_energy}")
    need(0 <= o.max_protected_ratio <= 1, "method.osft.max_protected_ratio",
         f"must be in [0, 1], got {o.max_protected_ratio}")
    need(0 < o.input_energy <= 1, "method.osft.input_energy", f"must be in (0, 1], got {o.input_energy}")
    need(o.boundary == "update" or o.subspace == "accumulate", "method.osft.boundary",
         f"{o.boundary} needs method.osft.subspace: accumulate (subspace {o.subspace} refits at every task "
         f"and protects no finished task's inputs)")
    need(o.boundary == "update" or o.projection == "two_sided", "method.osft.boundary",
         f"{o.boundary} needs method.osft.projection: two_sided (its guarantee, dW x = 0 on the protected inputs, "
         f"holds only when the update is projected on the input side too)")
    if o.protect_inputs_of is not None:
        need(o.subspace == "accumulate", "method.osft.protect_inputs_of",
             f"needs method.osft.subspace: accumulate (subspace {o.subspace} refits at every task and would drop "
             f"the protected inputs at task 1)")
        need(o.projection == "two_sided", "method.osft.protect_inputs_of",
             "needs method.osft.projection: two_sided (its guarantee, dW x = 0 on the protected inputs, holds "
             "only when the update is projected on the input side too)")
        need(cfg.method.name in PROJECTING, "method.osft.protect_inputs_of",
             f"only method.name: {' or '.join(PROJECTING)} protects; with method.name {cfg.method.name} its "
             f"{len(o.protect_inputs_of)} source(s) would be ignored (remove them)")
        need(len(o.protect_inputs_of) >= 1, "method.osft.protect_inputs_of",
             "is an empty list (give at least one source, or null)")
    need(o.non_target_lr_scale >= 0, "method.osft.non_target_lr_scale", "must be >= 0")
    need(o.importance_samples >= 1, "method.osft.importance_samples", "must be >= 1")
    need(o.audit_every >= 1, "method.osft.audit_every", f"must be >= 1, got {o.audit_every}")
    if o.first_task_importance_data:
        o.first_task_importance_data = _resolve(o.first_task_importance_data, base)
        need(os.path.exists(o.first_task_importance_data), "method.osft.first_task_importance_data",
             f"no such file: {o.first_task_importance_data}")
    if o.protect_update_from:
        o.protect_update_from = _resolve(o.protect_update_from, base)
        need(os.path.isdir(o.protect_update_from), "method.osft.protect_update_from",
             f"no such model folder: {o.protect_update_from}")
        need(o.subspace == "accumulate", "method.osft.protect_update_from",
             f"needs method.osft.subspace: accumulate (subspace {o.subspace} refits at every task and would "
             f"drop the protected update at task 1)")
    lo = cfg.method.lora
    need(lo.rank >= 1, "method.lora.rank", f"must be >= 1, got {lo.rank}")
    need(lo.alpha > 0, "method.lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, "method.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    need(len(lo.targets) >= 1 and all(lo.targets), "method.lora.targets", "needs at least one module name")
    need(lo.lambda_orth >= 0, "method.lora.lambda_orth", f"must be >= 0, got {lo.lambda_orth}")
    need(lo.lambda_l2 >= 0, "method.lora.lambda_l2", f"must be >= 0, got {lo.lambda_l2}")
    need(lo.lr is None or lo.lr > 0, "method.lora.lr", f"must be > 0 (or null: train.lr), got {lo.lr}")
    r = cfg.method.replay.fraction
    need(0 <= r <= 10, "method.replay.fraction", f"must be in [0, 10], got {r}")
    need(cfg.method.replay.fraction_of == "task" or r <= 1, "method.replay.fraction",
         f"must be <= 1 with fraction_of: earlier (a buffer of each earlier source's samples), got {r}")
    trackers = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
    report_to = cfg.output.report_to
    report_to = [] if report_to is None else [report_to] if isinstance(report_to, str) else report_to
    cfg.output.report_to = [] if report_to == ["none"] else report_to
    for name in cfg.output.report_to:
        need(name in trackers, "output.report_to", f"{name!r} is not a tracker ds-cl reports to "
                                                   f"({', '.join(trackers)})")
        try:
            importlib.import_module(trackers[name])
        except Exception:
            raise ConfigError(f"{src}: output.report_to: {name} needs its package: pip install 'ds-cl[track]' "
                              f"(or pip install {name})") from None
    if "wandb" in cfg.output.report_to:
        need(_wandb_can_log(), "output.report_to",
             "wandb needs a login (`wandb login`, or WANDB_API_KEY) unless it runs offline: WANDB_MODE=offline "
             "keeps the run in <output_dir>/wandb/ for a later `wandb sync`")

    need(len(cfg.tasks) >= 1, "tasks", "needs at least one task")
    seen = set()
    for i, task in enumerate(cfg.tasks):
        key = f"tasks.{i}"
        _check_source(task, key, "task", seen, src, base, need)
        need(task.eval_size >= 1, f"{key}.eval_size", "must be >= 1")
        need(task.max_train_samples is None or task.max_train_samples >= 1, f"{key}.max_train_samples",
             f"must be >= 1 (or null: all), got {task.max_train_samples}")
        if task.metric != "exact_match":
            need(":" in task.metric, f"{key}.metric", f"'exact_match' or 'module:function', got {task.metric!r}")
        if task.options is not None:
            need(all(o.strip() for o in task.options), f"{key}.options", "an option is empty")
            twice = [o for o in task.options if task.options.count(o) > 1]
            need(not twice, f"{key}.options", f"an option is listed twice: {twice[:1]}")
            need(len(task.options) >= 2, f"{key}.options", f"needs at least 2 options to choose from, got "
                                                             f"{task.options}")
        if cfg.eval.scoring == "options":
            need(task.metric == "exact_match", f"{key}.metric", f"eval.scoring: options scores the chosen option "
                 f"by equality with the answer, not with {task.metric!r}; use eval.scoring: generate")

    earlier = cfg.method.replay.earlier
    need(not earlier or cfg.method.name in REPLAYING, "method.replay.earlier",
         f"only method.name: {' or '.join(REPLAYING)} replays; with method.name {cfg.method.name} its "
         f"{len(earlier)} source(s) would be ignored (remove them, or set method.name: replay)")
    _check_earlier(earlier, "method.replay.earlier", "the replay pool", src, base, need)
    _check_earlier(o.protect_inputs_of or [], "method.osft.protect_inputs_of", "the protected inputs' samples",
                   src, base, need)


def _check_earlier(sources: list[TaskConfig], within: str, joins: str, src: str, base: Path, need) -> None:
    """A list of earlier sources (`within`: method.replay.earlier, method.osft.protect_inputs_of): tasks the
    starting model was trained on, whose records all join `joins`; nothing of them is held out or evaluated."""
    seen = set()
    unused = {f.name: f.default for f in dataclasses.fields(TaskConfig) if f.name in EVAL_ONLY}
    for j, source in enumerate(sources):
        key = f"{within}.{j}"
        for k, default in unused.items():
            need(getattr(source, k) == default, f"{key}.{k}", f"is not used: an earlier source's records all join "
                 f"{joins}, none is held out or evaluated (remove it)")
        _check_source(source, key, "earlier source", seen, src, base, need, evaluated=False)
        need(source.max_train_samples is None or source.max_train_samples >= 1, f"{key}.max_train_samples",
             f"must be >= 1 (or null: all), got {source.max_train_samples}")


# The keys of a task that only its evaluation reads: an earlier source (method.replay.earlier) refuses them.
EVAL_ONLY = ("eval", "eval_split", "eval_size", "max_eval_samples", "metric", "options")


def _check_source(task: TaskConfig, key: str, what: str, seen: set, src: str, base: Path, need,
                  evaluated: bool = True) -> None:
    """What a `tasks` entry and a `method.replay.earlier` entry (`key`) share: the name (required, unique in
    `seen`, a folder name), `train` (required) and `eval` as local paths resolved against the config's folder
    and present, a benchmark task folder's layout (not `evaluated`: without its test file), and the template's
    fields."""
    need(bool(task.name), f"{key}.name", "is required")
    need(task.name not in seen, f"{key}.name", f"duplicate {what} name {task.name!r}")
    need(all(c.isalnum() or c in "-_." for c in task.name), f"{key}.name",
         f"use letters, digits, - _ . only (it names a folder), got {task.name!r}")
    seen.add(task.name)
    need(bool(task.train), f"{key}.train", "is required (a data file, a saved dataset or a dataset name)")
    holdout = task.eval == HOLDOUT
    if holdout:
        task.eval = None
    for k in ("train", "eval"):
        v = getattr(task, k)
        if v and (_is_local_path(v) or os.path.isdir(_resolve(v, base))):
            v = _resolve(v, base)
            setattr(task, k, v)
            need(os.path.exists(v), f"{key}.{k}", f"no such file: {v}")
    if is_benchmark_task_folder(task.train):
        use_benchmark_layout(task, f"{src}: {key}.train", holdout=holdout or not evaluated)
    if task.template is not None:
        import string

        try:
            # Exactly these names: `{input.upper}` or `{input[0]}` would format, wrongly, not fail.
            bad = [f for _, f, _, _ in string.Formatter().parse(task.template)
                   if f is not None and f not in ("instruction", "options", "input")]
        except ValueError as e:  # an unmatched brace
            bad = [str(e)]
        if bad:
            raise ConfigError(f"{src}: {key}.template: only {{instruction}}, {{options}}, {{input}} may appear "
                              f"(found {{{bad[0]}}}; write a literal brace as {{{{ or }}}})")


# ---------------------------------------------------------------------------------------------
# The continual-learning benchmark's own layout (O-LoRA's CL_Benchmark, TRACE-style groups):
#   <root>/<group>/<task>/{train,dev,test}.json   JSON arrays of {"sentence": ..., "label": ...}
#   <root>/<group>/<task>/labels.json             the options
#   <root>/instruction_config.json                {group: [{"instruction": ...}, ...]}


HOLDOUT = "holdout"  # tasks.*.eval: evaluate on records held out of the training data


def is_benchmark_task_folder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "train.json").is_file() and (p / "labels.json").is_file()


def use_benchmark_layout(task: TaskConfig, where: str, holdout: bool = False) -> None:
    """Fill a task whose `train` is a benchmark task folder: its train/test files, fields, labels and the
    group's instruction. Values the user set explicitly (not the defaults) are kept; holdout: evaluate on
    records held out of train.json, not on test.json."""
    import json

    folder = Path(task.train)
    task.train = str(folder / "train.json")
    if task.eval is None and not holdout and (folder / "test.json").is_file():
        task.eval = str(folder / "test.json")
    if (task.input_field, task.output_field) == ("input", "output"):
        task.input_field, task.output_field = "sentence", "label"
    try:
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {folder / 'labels.json'} is not valid JSON ({e})") from None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ConfigError(f"{where}: {folder / 'labels.json'} must be a non-empty list of strings")
    if task.labels is None:
        task.labels = labels
    instructions = folder.parent.parent / "instruction_config.json"
    if task.instruction == DEFAULT_INSTRUCTION and instructions.is_file():
        try:
            entries = json.loads(instructions.read_text(encoding="utf-8")).get(folder.parent.name)
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise ConfigError(f"{where}: {instructions} is not a JSON object ({e})") from None
        if entries:
            task.instruction = str(entries[0]["instruction"]).strip()
        else:  # e.g. COPA: the question is inside each sentence
            task.instruction = ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `train:` block would replace the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in the same "
                                  f"section (first on line {seen[key] + 1}); YAML would keep only the last")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(":LINE:COLUMN" or "", what PyYAML found) of a parse error, in one line. PyYAML's own text spans
    several lines and starts with its context ("while parsing a flow sequence"), so its first line alone
    said neither what nor where."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in problem:  # PyYAML: "found character '\t' that cannot start any token"
        problem = "a tab character; YAML indents with spaces only"
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and (mark is None or (cmark.line, cmark.column) != (mark.line, mark.column)):
        problem += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
    return ("" if mark is None else f":{mark.line + 1}:{mark.column + 1}"), problem


def read_yaml(path: str | os.PathLike):
    """YAML with duplicate keys refused (ConfigError naming both lines); a parse error is a ConfigError
    `PATH:LINE:COLUMN: not valid YAML: ...`."""
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_UniqueKeyLoader)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            where, problem = yaml_problem(e)
            raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), data: dict | None = None) -> RunConfig:
    """Read YAML (or take `data`), apply overrides, type-check and validate. Raises ConfigError."""
    src = str(path) if path is not None else "config"
    if data is None:
        if not os.path.isfile(path):
            raise ConfigError(f"{src}: no such config file")
        data = read_yaml(path)
        if data is None:
            data = {}
    else:
        import copy

        data = copy.deepcopy(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: top level must be a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item, f"{src} (override {item.split('=', 1)[0]})")
    cfg = _build(RunConfig, data, "", src)
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    _validate(cfg, src, base)
    return cfg


def _wandb_can_log() -> bool:
    """W&B would start: offline/disabled, or a key in the environment or ~/.netrc (where `wandb login` puts
    it). Checked before the model loads: online without a key, wandb.init fails, or waits for a prompt."""
    import netrc

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# First line of the config.yaml that `ds-cl train` writes into output_dir: how a later run tells its own
# file from a user's (ds_cl/training/preflight.py never lets a run overwrite the latter).
CONFIG_HEADER = "# Written by ds-cl train: this run's resolved config (absolute paths). Resume with --resume.\n"


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (paths absolute, deepspeed inline): re-loadable with load_config.
    Atomically: a run killed while writing keeps the previous file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(CONFIG_HEADER)
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
