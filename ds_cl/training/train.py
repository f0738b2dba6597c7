"""`ds-cl train CONFIG [key.sub=value ...] [--resume]`: a continual-learning run, task after task.

Per task: (osft) refit the subspace from the current weights; train; evaluate every task seen so far;
update the accuracy matrix; export the model; checkpoint. Works as one process or under `deepspeed`,
`torchrun` or `srun` (one process per device).

The `Trainer` lists every component it holds at the top; each is made by a `build_*` function below.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ds_cl.training.config import ConfigError, RunConfig, load_config, save_config
from ds_cl.tools.faults import fault_point

log = logging.getLogger("ds_cl.training.train")


# ---------------------------------------------------------------------------------------------
# Distributed setup.


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: str  # accelerator device name ("cpu", "cuda", ...)


def _env_from_slurm() -> None:
    """srun starts one task per process without torch's env variables: derive them from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except Exception:
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", "29500")


def build_distributed() -> DistInfo:
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from ds_cl.training.environment import free_port, init_distributed

    _env_from_slurm()
    if "RANK" not in os.environ:  # a plain `ds-cl train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    init_distributed(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() != "cpu":
        acc.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, acc.device_name())


# ---------------------------------------------------------------------------------------------
# DeepSpeed config: batch sizes, precision and optimizer filled from the run config.


def build_ds_config(cfg: RunConfig, world: int, on_cpu: bool) -> dict:
    ds = json.loads(json.dumps(cfg.deepspeed))  # a copy
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x world size {world} = {per_step} (gradient accumulation = "
            f"{t.global_batch_size}/{per_step} = {t.global_batch_size / per_step:.3g} is not an integer)")
    gas = t.global_batch_size // per_step
    want = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": gas,
            "train_batch_size": t.global_batch_size, "gradient_clipping": t.grad_clip}
    for key, val in want.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != val:
            raise ConfigError(
                f"deepspeed.{key}={have} disagrees with the run config, which gives {val} "
                f"(train.global_batch_size {t.global_batch_size} = micro {t.micro_batch_size} x world {world} "
                f"x accumulation {gas}); remove it from the deepspeed config or set it to \"auto\"")
        ds[key] = val
    dtype = cfg.model.dtype
    for sec, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = ds.get(sec, {}).get("enabled", False)
        if enabled is True and dtype != name:
            raise ConfigError(f"deepspeed.{sec}.enabled is true but model.dtype={dtype}")
        if dtype == name:
            ds.setdefault(sec, {})["enabled"] = True
    if cfg.method.name == "osft" and dtype != "float32":
        # A projected gradient accumulated in bf16 is rounded back off the subspace (leak ~5e-4 vs ~5e-8).
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if "optimizer" not in ds:
        params = {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay}
        if on_cpu:
            params["torch_adam"] = True  # fused Adam kernels need a GPU
        ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("zero_optimization", {"stage": 3})
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds


# ---------------------------------------------------------------------------------------------
# Model.


def build_model(cfg: RunConfig, ds_config: dict, seed: int):
    """The model, already partitioned under ZeRO-3. Returns (model, keepalive): keep `keepalive`
    (the HfDeepSpeedConfig) referenced for the run: transformers checks it to know ZeRO-3 is on."""
    import torch

    from ds_cl.training.modeling import build_causal_lm, hf_config

    torch.manual_seed(seed)
    model, keepalive = build_causal_lm(hf_config(cfg.model.config, cfg.model.name_or_path), ds_config,
                                       getattr(torch, cfg.model.dtype), cfg.model.name_or_path)
    model.config.use_cache = True
    if cfg.model.gradient_checkpointing:
        # transformers turns the KV cache off itself while training and back on for generate().
        # 5.x renamed it activation checkpointing; 4.x only has the old name.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model, keepalive


def build_engine(cfg: RunConfig, model, ds_config: dict, lora=None):
    """The DeepSpeed engine. For osft the optimizer gets two parameter groups, the projector's targets
    and the rest, so that `method.osft.non_target_lr_scale` can give the rest its own learning rate.
    For olora/inclora (`lora`, ds_cl/methods/lora.py): one group per task's adapter, the base frozen."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lora is not None:
        params = lora.param_groups()
    elif cfg.method.name == "osft":
        from ds_cl.core.subspace import select_targets

        targets = set(select_targets([n for n, _ in named], cfg.method.osft.targets))
        groups = [{"params": [p for n, p in named if n in targets]},
                  {"params": [p for n, p in named if n not in targets]}]
        params = [g for g in groups if g["params"]]
    else:
        params = [p for _, p in named]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


def build_projector(cfg: RunConfig, engine):
    if cfg.method.name != "osft":
        return None
    from ds_cl.core.projector import SubspaceProjector

    o = cfg.method.osft
    return SubspaceProjector(engine, targets=o.targets, projection=o.projection, project_update=o.project_update,
                             audit_every=o.audit_every)


# ---------------------------------------------------------------------------------------------
# Run state: everything the checkpoint must restore besides the engine and the projector.


@dataclass
class RunState:
    phase: int = 0  # index of the task being trained (multitask: one phase)
    step_in_phase: int = 0  # optimizer steps done in that phase
    global_step: int = 0
    matrix: list = field(default_factory=list)  # accuracy rows, one per finished phase
    baseline: Optional[list] = None  # scores of the untrained model (eval.before_training)
    losses: list = field(default_factory=list)  # mean loss per optimizer step (the loss curve)
    boundaries: list = field(default_factory=list)  # global steps where phases ended
    done: bool = False


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) on rank 0."""

    def __init__(self, out: Path, rank: int, tensorboard: bool):
        self.rank = rank
        self.path = out / "metrics.jsonl"
        self.tb = None
        if rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, rec: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "task"):
                    self.tb.add_scalar(k, v, rec.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plan_phases(cfg: RunConfig, tasks: list) -> list[dict]:
    """One phase per task (multitask: one phase over all tasks' data; replay: the task's data plus
    `replay.fraction` x as many samples of earlier tasks), with its step count."""
    from ds_cl.training.data import replay_samples, steps_per_epoch

    g = cfg.train.global_batch_size
    if cfg.method.name == "multitask":
        raw = [{"name": "multitask", "train": [s for t in tasks for s in t.train], "eval_upto": len(tasks)}]
    else:
        raw = []
        for i, t in enumerate(tasks):
            train = list(t.train)
            if cfg.method.name == "replay" and i > 0:
                n = round(cfg.method.replay.fraction * len(t.train))
                train += replay_samples([p.train for p in tasks[:i]], n, cfg.seed, i)
            raw.append({"name": t.name, "train": train, "eval_upto": i + 1})
    for i, ph in enumerate(raw):
        spe = steps_per_epoch(len(ph["train"]), g)
        if spe == 0:
            raise ConfigError(f"tasks.{i} ({ph['name']}): {len(ph['train'])} training samples do not fill one "
                              f"optimizer step of train.global_batch_size={g}")
        steps = spe * cfg.train.epochs
        if cfg.train.max_steps_per_task is not None:
            steps = min(steps, cfg.train.max_steps_per_task)
        ph.update(steps=steps, steps_per_epoch=spe)
    return raw


# ---------------------------------------------------------------------------------------------
# The trainer.


class Trainer:
    cfg: RunConfig
    dist: DistInfo
    out: Path
    tokenizer: Any  # ds_cl.training.data.SentencePieceTokenizer | HFTokenizer
    tasks: list  # list[ds_cl.training.data.TaskData], in config order
    ds_config: dict
    model: Any  # transformers PreTrainedModel (partitioned under ZeRO-3)
    engine: Any  # deepspeed.DeepSpeedEngine
    projector: Any  # ds_cl.core.projector.SubspaceProjector | None (method osft only)
    lora: Any  # ds_cl.methods.lora.LoRAAdapters | None (methods olora, inclora only)
    checkpoints: Any  # ds_cl.training.checkpoint.CheckpointManager
    metrics: MetricsLog
    state: RunState

    def __init__(self, cfg: RunConfig, dist_info: DistInfo):
        from ds_cl.training.checkpoint import CheckpointManager
        from ds_cl.training.data import load_task, load_tokenizer

        self.cfg, self.dist = cfg, dist_info
        self.out = Path(cfg.output_dir)
        self.gas = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dist_info.world)
        self.ds_config = build_ds_config(cfg, dist_info.world, dist_info.device == "cpu")
        if cfg.method.name in ("olora", "inclora"):
            from ds_cl.methods.lora import check_targets

            check_targets(cfg)  # on the meta device: a clear error before data and weights are loaded
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.chat_template)
        self.tasks = [load_task(t, i, self.tokenizer, cfg.train.max_seq_len, cfg.seed) for i, t in enumerate(cfg.tasks)]
        self.phases = plan_phases(cfg, self.tasks)
        self.model, self._hf_ds_keepalive = build_model(cfg, self.ds_config, cfg.seed)
        from ds_cl.methods.lora import build_lora

        self.lora = build_lora(cfg, self.model, len(self.phases))
        self.engine = build_engine(cfg, self.model, self.ds_config, self.lora)
        self.projector = build_projector(cfg, self.engine)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", dist_info.rank, dist_info.world,
                                             cfg.checkpoint.keep)
        self.metrics = MetricsLog(self.out, dist_info.rank, cfg.output.tensorboard)
        self.state = RunState()
        self.steps_this_process = 0
        self.preempted = False  # SIGTERM received (set by the handler, agreed on in train_step)

    # -- plan ---------------------------------------------------------------------------------

    # -- pieces of a step ---------------------------------------------------------------------

    def lr_at(self, step: int, total: int) -> float:
        t = self.cfg.train
        warm = int(t.warmup_ratio * total)
        if step < warm:
            return t.lr * (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        if t.lr_schedule == "linear":
            return t.lr * (1 - frac)
        if t.lr_schedule == "cosine":
            return t.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return t.lr

    def reset_optimizer(self) -> None:
        """Fresh AdamW moments for a new task (zeroed in place: the ZeRO optimizer keeps its flat buffers)."""
        import torch

        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    v.zero_()
                elif k == "step":
                    st[k] = 0
        for g in opt.param_groups:
            if "step" in g:
                g["step"] = 0

    def importance_batches(self, phase: int) -> list[dict] | None:
        """Inputs for the adaptive rank's layer importance: the previous task's data (same count on
        every rank); before the first task, general data if configured, else None (fixed ratio)."""
        from ds_cl.training.data import collate, encode_prompt_for_generation, epoch_order, read_records, Encoded

        o, d, mb = self.cfg.method.osft, self.dist, self.cfg.train.micro_batch_size
        if phase > 0:
            prev = self.phases[phase - 1]["train"]
            order = epoch_order(len(prev), self.cfg.seed, phase - 1, 0)[: o.importance_samples]
            samples = [prev[i] for i in order]
        elif o.first_task_importance_data:
            rows = read_records(o.first_task_importance_data, "train", "method.osft.first_task_importance_data")
            texts = [str(r[o.first_task_importance_field]) for r in rows[: o.importance_samples]]
            samples = [Encoded(ids, ids) for ids in (encode_prompt_for_generation(self.tokenizer, t, self.cfg.train.max_seq_len)
                                                     for t in texts)]
        else:
            return None
        per_rank = len(samples) // d.world
        if per_rank == 0:
            return None
        mine = samples[d.rank::d.world][:per_rank]
        out = []
        for i in range(0, per_rank, mb):
            b = collate(mine[i:i + mb], self.tokenizer.pad_id)
            out.append({k: b[k].to(self.engine.device) for k in ("input_ids", "attention_mask")})
        return out

    def fit_subspace(self, phase: int) -> None:
        from ds_cl.core.subspace import AdaptiveRank, FixedRank

        o = self.cfg.method.osft
        batches = self.importance_batches(phase) if o.rank == "adaptive" else None
        policy = AdaptiveRank(mrr=o.mrr, trr=o.trr) if batches is not None else FixedRank(ratio=o.ratio)
        t0 = time.time()
        try:
            self.projector.fit(rank_policy=policy, importance_batches=batches)
        except ValueError as e:  # e.g. non-finite weights: never fit bases from them
            raise ValueError(f"task {phase} ({self.phases[phase]['name']}): subspace fit refused on rank "
                             f"{self.dist.rank}: {e}") from None
        self._log_rank0(f"phase {phase}: subspace fitted ({type(policy).__name__}) in {time.time() - t0:.1f}s")
        fault_point("fit", self.dist.rank, phase=phase)

    def train_step(self, phase: int, step: int) -> dict:
        import torch
        import torch.distributed as dist
        from ds_cl.training.data import collate, epoch_order, rank_micro_batches

        ph, d, t = self.phases[phase], self.dist, self.cfg.train
        epoch, in_epoch = divmod(step, ph["steps_per_epoch"])
        order = epoch_order(len(ph["train"]), self.cfg.seed, phase, epoch)
        micro = rank_micro_batches(order, in_epoch, d.rank, d.world, t.micro_batch_size, self.gas)
        lr = self.lr_at(step, ph["steps"])
        groups = self.engine.optimizer.param_groups
        constrained = self.projector is not None and (phase > 0 or self.cfg.method.osft.fit_before_first_task)
        for k, g in enumerate(groups):
            # Group 1 (osft): the non-target parameters.
            g["lr"] = lr * self.cfg.method.osft.non_target_lr_scale if (constrained and k == 1) else lr
            if self.lora is not None:  # group k: task k's adapter; only the current task's learns
                lora_lr = lr * (self.cfg.method.lora.lr or t.lr) / t.lr
                g["lr"] = self.lora.group_lr(k, lora_lr)
        t0 = time.time()
        loss_sum, tokens = 0.0, 0
        reg_sum: dict = {}  # olora/inclora: orth_loss, l2_loss (mean over micro batches)
        self.engine.train()
        for idx in micro:
            batch = {k: v.to(self.engine.device) for k, v in collate([ph["train"][i] for i in idx],
                                                                     self.tokenizer.pad_id).items()}
            loss = self.engine(**batch).loss
            if self.lora is not None:  # + the O-LoRA regularisers computed in this forward
                task_loss = loss
                loss, reg = self.lora.add_regularisers(loss)
                for key, v in reg.items():
                    reg_sum[key] = reg_sum.get(key, 0.0) + v / len(micro)
            if fault_point("loss", d.rank, step=self.state.global_step + 1):
                loss = loss * float("nan")  # reliability tests: a real NaN through backward and step
            self.engine.backward(loss)
            if self.projector is not None:
                self.projector.step()
            else:
                self.engine.step()
            loss_sum += float((task_loss if self.lora is not None else loss).detach())
            tokens += int(batch["attention_mask"].sum())
        # [3]: ranks that received SIGTERM (they agree on the step after which to checkpoint and stop).
        stats = torch.tensor([loss_sum / len(micro), float(tokens), float(self.preempted)], dtype=torch.float64)
        dist.all_reduce(stats)
        self.preempted = bool(stats[2] > 0)
        gn = self.engine.get_global_grad_norm()
        rec = {"step": self.state.global_step + 1, "task": ph["name"], "phase": phase, "task_step": step + 1,
               "loss": float(stats[0]) / d.world, "lr": lr,
               "grad_norm": None if gn is None else float(gn),
               "tokens_per_s": float(stats[1]) / max(time.time() - t0, 1e-9)}
        if self.projector is not None:
            pstats = self.projector.stats
            leaks = self.projector.audit()  # {} before the first fit: nothing constrained yet
            if leaks and pstats["audited_at"] == pstats["optimizer_steps"]:  # measured at this step
                rec["leak"] = max(leaks.values())
        if self.lora is not None:
            rec["lr"] = groups[phase]["lr"]  # the current adapter's
            rec.update(reg_sum)  # the same on every rank (adapters are replicated in value)
        return rec

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, upto: int, tag: str) -> list[float]:
        """Greedy generation on tasks[:upto], sharded over ranks; returns one score per task."""
        import torch
        import torch.distributed as dist
        from ds_cl.training.data import collate_prompts

        d, bs = self.dist, self.cfg.eval.batch_size
        model = self.engine.module
        model.eval()
        scores = []
        preds_out = []
        for j, task in enumerate(self.tasks[:upto]):
            n = len(task.eval_prompts)
            per_rank = math.ceil(n / d.world)
            # Every rank runs the same number of generate calls (ZeRO-3 forwards are collective);
            # missing slots repeat sample 0 and are not scored.
            idx = [i if i < n else -1 for i in range(d.rank, per_rank * d.world, d.world)]
            max_new = self.cfg.eval.max_new_tokens or (max(len(self.tokenizer.encode_answer(a))
                                                           for a in task.eval_answers) + 2)
            total, count = 0.0, 0
            for b in range(0, per_rank, bs):
                chunk = idx[b:b + bs]
                batch = collate_prompts([task.eval_prompts[max(i, 0)] for i in chunk], self.tokenizer.pad_id)
                batch = {k: v.to(self.engine.device) for k, v in batch.items()}
                with torch.no_grad():
                    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_id, eos_token_id=self.tokenizer.eos_id,
                                         synced_gpus=d.world > 1)
                new = out[:, batch["input_ids"].shape[1]:].tolist()
                for i, ids in zip(chunk, new):
                    if i < 0:
                        continue
                    text = self.tokenizer.decode(ids)
                    total += task.metric(text, task.eval_answers[i])
                    count += 1
                    if len(preds_out) < 200:
                        preds_out.append({"task": task.name, "index": i, "prediction": text,
                                          "reference": task.eval_answers[i]})
            t = torch.tensor([total, float(count)], dtype=torch.float64)
            dist.all_reduce(t)
            scores.append(float(t[0] / t[1]))
        if d.rank == 0:
            with open(self.out / f"predictions_{tag}.jsonl", "w") as f:
                for p in preds_out:
                    f.write(json.dumps(p) + "\n")
        return scores

    def retention_hook(self, phase: int) -> None:
        """eval.retention_suite: score the model exported after this task with ds_cl.evaluation
        (`ds-cl eval`'s generate + score, on all ranks) into retention_task_<i>/. Skipped with a message
        when that module is absent."""
        suite_name = self.cfg.eval.retention_suite
        if not suite_name:
            return
        try:
            from ds_cl.evaluation.cli import _device, evaluate_model, load_parts
            from ds_cl.evaluation.suites import resolve_suite
        except ImportError as e:
            self._log_rank0(f"eval.retention_suite={suite_name!r}: ds_cl.evaluation unavailable ({e}); skipped")
            return
        from ds_cl.training.modeling import hf_zero3_off

        suite = resolve_suite(suite_name)
        name = self.phases[phase]["name"]
        # The evaluator loads the exported model whole on each rank: with our HfDeepSpeedConfig alive,
        # transformers would load it ZeRO-3-partitioned (empty weights). Step out of it meanwhile.
        with hf_zero3_off():
            summary = evaluate_model(str(self.out / f"task_{phase}_{name}"), suite, load_parts(suite),
                                     self.out / f"retention_task_{phase}",
                                     device=_device("cpu" if self.dist.device == "cpu" else "cuda"),
                                     chat_template=self.cfg.model.chat_template)
        if summary is not None:
            self._log_rank0(f"retention after task {phase}: {self.out / f'retention_task_{phase}' / 'eval.json'}")

    # -- checkpoint ---------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.engine, self.projector, self.state.__dict__, self.state.global_step)

    def resume(self) -> bool:
        found = self.checkpoints.load_latest(self.engine, self.projector, log=self._log_rank0)
        if found is None:
            self._log_rank0("--resume: no complete checkpoint found; starting from the beginning")
            return False
        path, st = found
        st.pop("world_size", None)
        self.state = RunState(**st)
        if self.dist.rank == 0 and (self.out / "metrics.jsonl").is_file():
            # Drop records of steps after the checkpoint (a crash after it): they are about to be redone.
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            keep = [l for l in lines if json.loads(l).get("step", 0) <= self.state.global_step]
            (self.out / "metrics.jsonl").write_text("".join(l + "\n" for l in keep))
        self._log_rank0(f"resumed from {path} (task {self.state.phase}, step {self.state.step_in_phase})")
        return True

    # -- the run ------------------------------------------------------------------------------

    def _log_rank0(self, msg: str) -> None:
        if self.dist.rank == 0:
            print(f"[ds-cl] {msg}", flush=True)

    def run(self, resume: bool = False) -> int:
        from tqdm import tqdm

        cfg, st = self.cfg, self.state
        self._install_sigterm()
        if resume:
            self.resume()
            st = self.state
        elif self.dist.rank == 0:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if st.done:
            self._log_rank0("run already complete")
            return 0
        if cfg.eval.before_training and st.baseline is None and st.phase == 0 and st.step_in_phase == 0:
            st.baseline = self.evaluate(len(self.tasks), "before")
            self._log_rank0(f"before training: {fmt_row(st.baseline)}")
        for phase in range(st.phase, len(self.phases)):
            ph = self.phases[phase]
            if self.lora is not None:
                self.lora.start_task(phase)  # adapters 0..phase in the forward, only this task's learns
            if st.step_in_phase == 0:
                if phase > 0 and cfg.train.reset_optimizer_each_task:
                    self.reset_optimizer()
                if self.projector is not None and (phase > 0 or cfg.method.osft.fit_before_first_task):
                    self.fit_subspace(phase)
            self._log_rank0(f"task {phase} ({ph['name']}): {len(ph['train'])} samples, {ph['steps']} steps")
            bar = tqdm(total=ph["steps"], initial=st.step_in_phase, desc=ph["name"], disable=self.dist.rank != 0,
                       leave=False, dynamic_ncols=True)
            while st.step_in_phase < ph["steps"]:
                rec = self.train_step(phase, st.step_in_phase)
                st.step_in_phase += 1
                st.global_step += 1
                self.steps_this_process += 1
                st.losses.append(rec["loss"])
                self._check_finite(rec, phase)
                if st.global_step % cfg.train.log_every == 0 or st.step_in_phase == ph["steps"]:
                    self.metrics.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                mid = st.step_in_phase < ph["steps"]
                if mid and cfg.checkpoint.every_steps and st.step_in_phase % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                if mid and (self._should_stop() or self.preempted):
                    if not (cfg.checkpoint.every_steps and st.step_in_phase % cfg.checkpoint.every_steps == 0):
                        self.save_checkpoint()
                    bar.close()
                    if self.preempted:
                        return self._preempted_exit()
                    self._log_rank0(f"stopping after {self.steps_this_process} steps (checkpoint.stop_after_steps)")
                    return 0
            bar.close()
            scores = self.evaluate(ph["eval_upto"], f"task_{phase}")
            if cfg.method.name == "multitask":  # all tasks trained at once: every row is the final one
                st.matrix = [list(scores) for _ in scores]
            else:
                st.matrix.append(scores)
            st.boundaries.append(st.global_step)
            self._log_rank0(f"after task {phase} ({ph['name']}): {fmt_row(scores)}")
            if cfg.output.export_each_task:
                from ds_cl.training.export import export_hf

                export_hf(self.engine.module, self.out / f"task_{phase}_{ph['name']}", self.tokenizer,
                          cfg.output.export_dtype,
                          tensors=self.lora.merged_tensors(self.engine.module) if self.lora is not None else None)
                if self.lora is not None:  # the adapters themselves, unmerged: adapters/task_<i>_<name>.safetensors
                    self.lora.save_adapters(self.out / "adapters" / f"task_{phase}_{ph['name']}.safetensors")
            self.retention_hook(phase)
            st.phase, st.step_in_phase = phase + 1, 0
            st.done = st.phase == len(self.phases)
            self.write_results()
            self.save_checkpoint()
            if not st.done and self._agree_preempted():
                return self._preempted_exit()
            if not st.done and self._should_stop():
                self._log_rank0(f"stopping after {self.steps_this_process} steps (checkpoint.stop_after_steps)")
                return 0
        self.metrics.close()
        return 0

    # -- reliability: preemption and non-finite steps (docs/reliability.md) ---------------------

    def _install_sigterm(self) -> None:
        """SIGTERM (SLURM preemption, the deepspeed launcher passing one on) asks for a checkpoint after
        the current optimizer step. Later SIGTERMs are ignored (SLURM signals every process and the
        launcher forwards its own: a rank gets two); SIGKILL after the grace period ends it anyway."""
        import signal

        def on_term(signum, frame):
            if self.preempted:
                return
            self.preempted = True
            print(f"[ds-cl] rank {self.dist.rank}: SIGTERM: checkpointing after the current step, then exiting",
                  flush=True)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (embedded use): leave the default
            pass

    def _agree_preempted(self) -> bool:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(self.preempted)])
        dist.all_reduce(t)
        self.preempted = bool(t.item() > 0)
        return self.preempted

    def _preempted_exit(self) -> int:
        st = self.state
        self._log_rank0(f"preempted: checkpoint {self.checkpoints.latest()} written (task {st.phase}, step "
                        f"{st.step_in_phase}); rerun with --resume to continue")
        self.metrics.close()
        return 143  # 128 + SIGTERM: a scheduler sees an interrupted run, not a finished one

    def _weights_finite(self) -> bool:
        """Collective: every rank's share of every parameter is finite."""
        import torch
        import torch.distributed as dist

        bad = 0.0
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if not torch.isfinite(local).all():
                bad = 1.0
                break
        t = torch.tensor([bad])
        dist.all_reduce(t)
        return t.item() == 0

    def _check_finite(self, rec: dict, phase: int) -> None:
        """A non-finite loss or gradient norm (the same on every rank: both are reduced): skip or stop."""
        gn = rec.get("grad_norm")
        if math.isfinite(rec["loss"]) and (gn is None or math.isfinite(gn)):
            return
        what = (f"non-finite {'loss' if not math.isfinite(rec['loss']) else 'gradient norm'} "
                f"(loss={rec['loss']}, grad_norm={gn}) at step {rec['step']} (task {phase} {rec['task']!r}, "
                f"task step {rec['task_step']})")
        if not self._weights_finite():
            raise NonFiniteError(f"{what}: the weights are non-finite now; stopped without checkpointing "
                                 f"(last checkpoint: {self.checkpoints.latest()}); fix the data or lower train.lr, "
                                 "then --resume")
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}: stopped (train.on_nonfinite=stop); the step's update was not applied "
                                 f"and nothing was checkpointed after it (last checkpoint: "
                                 f"{self.checkpoints.latest()}); set train.on_nonfinite=skip to skip such steps")
        rec["skipped"] = True
        self._log_rank0(f"warning: {what}: step skipped (train.on_nonfinite=skip; its update was not applied)")

    def _should_stop(self) -> bool:
        n = self.cfg.checkpoint.stop_after_steps
        return n is not None and self.steps_this_process >= n

    def write_results(self) -> None:
        if self.dist.rank != 0:
            return
        from ds_cl.evaluation.cl_metrics import summarize

        st = self.state
        names = [t.name for t in self.tasks]
        summ = summarize(st.matrix, names[: len(st.matrix)] if self.cfg.method.name != "multitask" else names,
                         baseline=st.baseline)
        summ["method"] = self.cfg.method.name
        summ["complete"] = st.done
        with open(self.out / "cl_matrix.json", "w") as f:
            json.dump({"tasks": names, "matrix": st.matrix, "baseline": st.baseline}, f, indent=1)
        with open(self.out / "summary.json", "w") as f:
            json.dump(summ, f, indent=1)
        if self.cfg.output.plots:
            from ds_cl.training.plots import heatmap, loss_curve

            heatmap(st.matrix, self.out / "cl_matrix.png")
            loss_curve(st.losses, st.boundaries, self.out / "loss.png")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.on_nonfinite=stop (or weights gone non-finite)."""


def fmt_row(scores: list[float]) -> str:
    return " ".join(f"{100 * s:5.1f}" for s in scores)


def format_matrix(matrix: list[list[float]], names: list[str]) -> str:
    w = max(8, *(len(n) for n in names))
    lines = ["after \\ on  " + " ".join(f"{n[:w]:>{w}}" for n in names)]
    for i, row in enumerate(matrix):
        cells = [f"{100 * v:>{w}.1f}" for v in row] + [f"{'':>{w}}"] * (len(names) - len(row))
        lines.append(f"{names[i] if i < len(names) else i!s:<11} " + " ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _exit_now(rc: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-cl train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    # deepspeed's launcher appends --local_rank=N; the env variable LOCAL_RANK carries it too.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        # Every input that can be read cheaply, before DeepSpeed starts or any output is written.
        from ds_cl.training.preflight import check_inputs

        check_inputs(cfg, resume=args.resume)
    except ConfigError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one copy of the line
            print(f"ds-cl train: {e}", file=sys.stderr)
        return 2
    info = build_distributed()
    import torch.distributed as dist

    if info.rank != 0:  # one copy of each warning (truncation counts are the same on every rank)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        out = Path(cfg.output_dir)
        if info.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        trainer = Trainer(cfg, info)
        rc = trainer.run(resume=args.resume)
        if info.rank == 0 and trainer.state.done:
            summ = json.loads((out / "summary.json").read_text())
            print(f"[ds-cl] {cfg.method.name}: AA={100 * summ['AA']:.1f} BWT={100 * summ['BWT']:+.1f}\n"
                  + format_matrix(trainer.state.matrix, [t.name for t in trainer.tasks]), flush=True)
            print(f"[ds-cl] outputs in {out}", flush=True)
    except (ConfigError, ValueError) as e:
        if info.rank == 0 or not isinstance(e, ConfigError):  # a ValueError may be one rank's alone
            print(f"ds-cl train: {'' if isinstance(e, ConfigError) else f'rank {info.rank}: '}{e}", file=sys.stderr)
        rc = 2
        if not isinstance(e, ConfigError):
            _exit_now(rc)
    except Exception as e:
        from ds_cl.training.checkpoint import CheckpointError

        if not isinstance(e, (CheckpointError, NonFiniteError, OSError)):
            raise
        # One line, from every rank that failed; no barrier (the other ranks may be inside a collective:
        # the launcher ends them when this process exits).
        print(f"\nds-cl train: rank {info.rank}: {e}", file=sys.stderr)  # \n: after a progress bar
        _exit_now(3 if isinstance(e, NonFiniteError) else 1)
    dist.barrier()
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
