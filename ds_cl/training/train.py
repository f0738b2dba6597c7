"""`ds-cl train CONFIG [key.sub=value ...] [--resume | --resume-or-start]`: a continual-learning run, task after task.

Per phase (a task; multitask: all of them at once): the method starts the task (osft refits its subspace);
train; evaluate every task seen so far; update the accuracy matrix; export the model; checkpoint. Works
as one process or under `deepspeed`, `torchrun` or `srun` (one process per device).

The loop knows no method by name: what differs between methods is behind the hooks of
ds_cl/methods/base.py. The `Trainer` lists every component it holds at the top; each is made by a named
builder from the typed run config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ds_cl.training.config import ConfigError, RunConfig, load_config, save_config
from ds_cl.training.environment import end_distributed, exit_now
from ds_cl.training.outputs import log_line

if TYPE_CHECKING:
    from ds_cl.methods import Method, Phase
    from ds_cl.training.checkpoint import CheckpointManager
    from ds_cl.training.data import TaskData
    from ds_cl.training.environment import DistInfo
    from ds_cl.training.outputs import MetricsLog

@dataclass
class RunState:
    """The trainer's cursor and results: what a checkpoint restores besides the engine and the method."""

    phase: int = 0  # index of the phase being trained
    step_in_phase: int = 0  # optimizer steps done in that phase
    global_step: int = 0
    matrix: list = field(default_factory=list)  # accuracy rows, one per finished phase
    tuning_matrix: list = field(default_factory=list)  # the same on the tuning split (eval.tuning_size > 0)
    baseline: Optional[list] = None  # scores of the untrained model (eval.before_training)
    losses: list = field(default_factory=list)  # mean loss per optimizer step (the loss curve)
    boundaries: list = field(default_factory=list)  # global steps where phases ended
    done: bool = False


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.on_nonfinite=stop (or weights gone non-finite)."""


def schedule_phases(phases: list, global_batch: int, epochs: int, max_steps: Optional[int]) -> list:
    """Fill each phase's step counts: full optimizer steps per epoch x epochs, capped by max_steps per task
    (a phase training several tasks at once, multitask's, by max_steps x their number)."""
    from ds_cl.training.data import steps_per_epoch

    for i, ph in enumerate(phases):
        spe = steps_per_epoch(len(ph.train), global_batch)
        if spe == 0:
            raise ConfigError(f"tasks.{i} ({ph.name}): {len(ph.train)} training samples do not fill one "
                              f"optimizer step of train.global_batch_size={global_batch}")
        ph.steps_per_epoch = spe
        ph.steps = spe * epochs if max_steps is None else min(spe * epochs, max_steps * ph.tasks)
    return phases


def lr_schedule(train_cfg, total: int):
    """step -> learning rate within a phase of `total` steps: transformers' schedule of that name, except
    that warm-up starts at lr/warm, not 0 (transformers gives step 0 a zero learning rate: a wasted step)."""
    import torch
    from transformers import get_scheduler

    warm = int(train_cfg.warmup_ratio * total)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[train_cfg.lr_schedule]
    # The schedulers act on an optimizer; ours is DeepSpeed's, whose groups the method sets. Only the
    # multiplier is read here, from a stand-in optimizer.
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    multiplier = get_scheduler(name, stand_in, num_warmup_steps=warm, num_training_steps=total).lr_lambdas[0]
    return lambda step: train_cfg.lr * multiplier(step + 1 if step < warm else step)


def build_engine(model, params: list, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


class Trainer:
    cfg: RunConfig
    dist: "DistInfo"
    out: Path
    ds_config: dict
    grad_accum: int  # micro batches per optimizer step on each rank
    tokenizer: Any  # ds_cl.training.data.SentencePieceTokenizer | HFTokenizer
    method: "Method"
    tasks: "list[TaskData]"  # in config order
    phases: "list[Phase]"
    model: Any  # transformers PreTrainedModel (partitioned under ZeRO-3)
    hf_ds_config: Any  # transformers HfDeepSpeedConfig: alive while the model is (None without ZeRO-3)
    engine: Any  # deepspeed.DeepSpeedEngine
    checkpoints: "CheckpointManager"
    metrics: "MetricsLog"
    state: RunState
    steps_this_process: int  # for checkpoint.stop_after_steps
    signalled: bool  # this rank received SIGTERM/SIGINT (set by its handler, at any moment)
    preempted: bool  # some rank was signalled, as all ranks agreed at the last step's all-reduce

    def __init__(self, cfg: RunConfig, dist_info):
        from ds_cl.methods import build_method
        from ds_cl.training.checkpoint import CheckpointManager
        from ds_cl.training.data import load_task, load_tokenizer
        from ds_cl.training.ds_config import build_ds_config
        from ds_cl.training.modeling import build_model
        from ds_cl.training.config import to_dict
        from ds_cl.training.outputs import MetricsLog

        t = cfg.train
        self.cfg, self.dist = cfg, dist_info
        self.out = Path(cfg.output_dir)
        self.ds_config = build_ds_config(cfg, dist_info.world, dist_info.device == "cpu")
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.chat_template)
        self.method = build_method(cfg, dist_info, self.tokenizer)
        self.tasks = [load_task(tc, i, self.tokenizer, t.max_seq_len, cfg.seed, cfg.eval.scoring,
                                tuning_size=cfg.eval.tuning_size) for i, tc in enumerate(cfg.tasks)]
        self.phases = schedule_phases(self.method.plan(self.tasks), t.global_batch_size, t.epochs,
                                      t.max_steps_per_task)
        self.model, self.hf_ds_config = build_model(cfg.model, self.ds_config, cfg.seed)
        self.method.prepare_model(self.model)
        self.engine = build_engine(self.model, self.method.param_groups(self.model), self.ds_config)
        self.method.bind(self.engine)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", dist_info.rank, dist_info.world,
                                             cfg.checkpoint.keep)
        self.metrics = MetricsLog(self.out, dist_info.rank, cfg.output.report_to, config=to_dict(cfg))
        self.state = RunState()
        self.steps_this_process = 0
        # Two flags: a rank acting on its own would leave the loop while the others start the next step.
        self.signalled = False
        self.preempted = False
        self.stop_signal: str | None = None  # the signal this rank received: SIGTERM or SIGINT

    def log(self, msg: str) -> None:
        if self.dist.rank == 0:
            print(log_line(msg), flush=True)

    # -- a step -----------------------------------------------------------------------------------

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

    def train_step(self, phase: int, step: int, lr: float) -> dict:
        import torch

        from ds_cl.core import collectives
        from ds_cl.tools.faults import poisoned
        from ds_cl.training.data import collate, epoch_order, rank_micro_batches

        ph, d, t = self.phases[phase], self.dist, self.cfg.train
        epoch, in_epoch = divmod(step, ph.steps_per_epoch)
        order = epoch_order(len(ph.train), self.cfg.seed, phase, epoch)
        micro = rank_micro_batches(order, in_epoch, d.rank, d.world, t.micro_batch_size, self.grad_accum)
        for g, group_lr in zip(self.engine.optimizer.param_groups, self.method.group_lrs(lr, phase)):
            g["lr"] = group_lr
        t0 = time.time()
        # No host sync per micro batch: the losses are summed on the device (float64, in order: the sum a
        # Python float would make) and read back once, by the all-reduce below; tokens are counted on the
        # host's batch before it moves.
        loss_sum, tokens, logs = torch.zeros((), dtype=torch.float64, device=self.engine.device), 0, {}
        self.engine.train()
        for idx in micro:
            host_batch = collate([ph.train[i] for i in idx], self.tokenizer.pad_id)
            tokens += int(host_batch["attention_mask"].sum())
            batch = {k: v.to(self.engine.device) for k, v in host_batch.items()}
            task_loss = poisoned(self.engine(**batch).loss, d.rank, self.state.global_step + 1)
            loss, extra = self.method.loss(task_loss)
            for k, v in extra.items():  # e.g. the LoRA regularisers: mean over the micro batches
                logs[k] = logs.get(k, 0.0) + v / len(micro)
            self.engine.backward(loss)
            self.method.step()
            loss_sum += task_loss.detach().double()
        # [2]: ranks that received SIGTERM (they agree on the step after which to checkpoint and stop).
        stats = collectives.all_reduce_values([loss_sum / len(micro), tokens, self.signalled])
        self.preempted = stats[2] > 0
        gn = self.engine.get_global_grad_norm()
        rec = {"step": self.state.global_step + 1, "task": ph.name, "phase": phase, "task_step": step + 1,
               "loss": float(stats[0]) / d.world, "lr": lr, "grad_norm": None if gn is None else float(gn),
               "tokens_per_s": float(stats[1]) / max(time.time() - t0, 1e-9)}
        rec.update(logs)
        rec.update(self.method.step_metrics())
        return rec

    # -- a phase ----------------------------------------------------------------------------------

    def train_phase(self, phase: int) -> Optional[int]:
        """Train the rest of a phase. Returns an exit code when the run must stop inside it."""
        from ds_cl.training.outputs import Progress

        cfg, st, ph = self.cfg, self.state, self.phases[phase]
        fresh = st.step_in_phase == 0
        if fresh and phase > 0 and cfg.train.reset_optimizer_each_task:
            self.reset_optimizer()
        self.method.start_task(phase, self.phases, fresh)
        self.log(f"task {phase} ({ph.name}): {len(ph.train)} samples, {ph.steps} steps")
        lr_at = lr_schedule(cfg.train, ph.steps)
        every = cfg.checkpoint.every_steps
        bar = Progress(ph.steps, st.step_in_phase, f"task {phase} ({ph.name})", enabled=self.dist.rank == 0)
        try:
            while st.step_in_phase < ph.steps:
                rec = self.train_step(phase, st.step_in_phase, lr_at(st.step_in_phase))
                st.step_in_phase += 1
                st.global_step += 1
                self.steps_this_process += 1
                st.losses.append(rec["loss"])
                self.check_finite(rec, phase)
                if st.global_step % cfg.train.log_every == 0 or st.step_in_phase == ph.steps:
                    self.metrics.write(rec)
                bar.update(loss=rec["loss"])
                if st.step_in_phase == ph.steps:
                    break
                saved = bool(every) and st.step_in_phase % every == 0
                if saved:
                    self.save_checkpoint()
                if self.should_stop() or self.preempted:
                    if not saved:
                        self.save_checkpoint()
                    return self.stop_exit()
        finally:
            bar.close()
        return None

    def finish_phase(self, phase: int) -> None:
        """Evaluate, record, export, retention, write results and checkpoint at the end of a phase."""
        cfg, st, ph = self.cfg, self.state, self.phases[phase]
        scores = self.evaluate(ph.eval_upto, f"task_{phase}")
        self.method.record(st.matrix, scores)
        if cfg.eval.tuning_size:  # the tuning split, scored beside the evaluation set
            tuning = self.evaluate(ph.eval_upto, f"task_{phase}_tuning", tuning=True)
            self.method.record(st.tuning_matrix, tuning)
        st.boundaries.append(st.global_step)
        self.metrics.write_matrix_row([t.name for t in self.tasks], st.matrix, st.global_step,
                                      st.tuning_matrix if cfg.eval.tuning_size else None)
        from ds_cl.training.outputs import fmt_row

        self.log(f"after task {phase} ({ph.name}): {fmt_row(scores)}")
        if cfg.eval.tuning_size:
            self.log(f"after task {phase} ({ph.name}), tuning split: {fmt_row(tuning)}")
        export_dir = self.out / f"task_{phase}_{ph.name}"
        if cfg.output.export_each_task:
            from ds_cl.training.export import export_hf

            export_hf(self.engine.module, export_dir, self.tokenizer, cfg.output.export_dtype,
                      tensors=self.method.export_tensors(self.engine.module))
            self.method.save_task_outputs(self.out, phase, ph.name)
        last = phase == len(self.phases) - 1
        if cfg.eval.retention_suite and (last or cfg.eval.retention_after == "each"):
            from ds_cl.training.task_eval import retention

            where = self.out / f"retention_task_{phase}"
            # The suite scores the model as an assistant, as `ds-cl eval` scores the base: through its chat
            # template when the tokenizer has one, however the tasks' prompts were formatted.
            if retention(cfg.eval.retention_suite, export_dir, where, self.dist, chat_template=True):
                self.log(f"retention after task {phase}: {where / 'eval.json'}")
        st.phase, st.step_in_phase = phase + 1, 0
        st.done = st.phase == len(self.phases)
        self.write_results()
        self.save_checkpoint()

    def evaluate(self, upto: int, tag: str, tuning: bool = False) -> list[float]:
        """Scores of tasks[:upto] on their evaluation records, or (`tuning`) on their tuning split."""
        from ds_cl.training.task_eval import evaluate_tasks

        tasks = [t.tuning if tuning else t for t in self.tasks[:upto]]
        return evaluate_tasks(self.engine, self.tokenizer, tasks, self.cfg.eval, self.dist, self.out, tag)

    # -- the run ----------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> int:
        from ds_cl.training.outputs import fmt_row

        cfg, st = self.cfg, self.state
        self.install_sigterm()
        if resume:
            self.resume()
            st = self.state
        elif self.dist.rank == 0:
            self.metrics.path.unlink(missing_ok=True)
        if st.done:
            self.log("run already complete")
            return 0
        if cfg.eval.before_training and st.baseline is None and st.phase == 0 and st.step_in_phase == 0:
            st.baseline = self.evaluate(len(self.tasks), "before")
            self.log(f"before training: {fmt_row(st.baseline)}")
        for phase in range(st.phase, len(self.phases)):
            rc = self.train_phase(phase)
            if rc is not None:
                return rc
            self.finish_phase(phase)
            if not st.done and (self.agree_preempted() or self.should_stop()):
                return self.stop_exit()
        self.metrics.close()
        return 0

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.engine, self.method, self.state.__dict__, self.state.global_step)

    def resume(self) -> bool:
        found = self.checkpoints.load_latest(self.engine, self.method, log=self.log)
        if found is None:
            self.log("--resume: no complete checkpoint found; starting from the beginning")
            return False
        path, st = found
        st.pop("world_size", None)
        self.state = RunState(**st)
        self.metrics.truncate_after(self.state.global_step)  # a crash after the checkpoint: redone now
        self.log(f"resumed from {path} (task {self.state.phase}, step {self.state.step_in_phase})")
        return True

    def write_results(self) -> None:
        if self.dist.rank != 0:
            return
        from ds_cl.training.outputs import write_results

        st = self.state
        write_results(self.out, self.cfg.method.name, [t.name for t in self.tasks], st.matrix, st.baseline,
                      st.losses, st.boundaries, st.done, self.cfg.output.plots,
                      tuning_matrix=st.tuning_matrix if self.cfg.eval.tuning_size else None)

    # -- reliability: preemption, stop requests, non-finite steps (docs/reliability.md) -------------

    def install_sigterm(self) -> None:
        """SIGTERM (SLURM preemption, the deepspeed launcher passing one on) and the first SIGINT (Ctrl-C)
        ask for a checkpoint after the current optimizer step, then exit 143 / 130. Later SIGTERMs are
        ignored (SLURM signals every process and the launcher forwards its own: a rank gets two); a second
        SIGINT exits at once, without a checkpoint or a traceback. SIGKILL after a grace period ends it
        anyway (the deepspeed launcher's is 30 s after it passes Ctrl-C on)."""
        import signal

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self.signalled:
                if signum == signal.SIGINT:
                    print("\n" + log_line(f"rank {self.dist.rank}: second SIGINT: exiting now, without a checkpoint "
                                           f"(the last one is {self.checkpoints.latest() or 'none'})"),
                          file=sys.stderr, flush=True)
                    exit_now(130)
                return
            self.signalled, self.stop_signal = True, name
            print("\n" + log_line(f"rank {self.dist.rank}: {name}: checkpointing after the current step, then "
                                   f"exiting{' (Ctrl-C again to exit now)' if signum == signal.SIGINT else ''}"),
                  flush=True)

        try:
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        except ValueError:  # not the main thread (embedded use): leave the defaults
            pass

    def agree_preempted(self) -> bool:
        from ds_cl.core import collectives

        self.preempted = collectives.any_rank(self.signalled)
        return self.preempted

    def should_stop(self) -> bool:
        n = self.cfg.checkpoint.stop_after_steps
        return n is not None and self.steps_this_process >= n

    def stop_exit(self) -> int:
        """After the checkpoint of a preemption (exit 143) or of checkpoint.stop_after_steps (exit 0)."""
        st = self.state
        self.metrics.close()
        if self.preempted:
            self.log(f"preempted: checkpoint {self.checkpoints.latest()} written (task {st.phase}, step "
                     f"{st.step_in_phase}); rerun with --resume to continue")
            # 128 + the signal: a scheduler or shell sees an interrupted run, not a finished one.
            return 130 if self.stop_signal == "SIGINT" else 143
        self.log(f"stopping after {self.steps_this_process} steps (checkpoint.stop_after_steps)")
        return 0

    def weights_finite(self) -> bool:
        """Collective: every rank's share of every parameter is finite."""
        import torch

        from ds_cl.core import collectives

        bad = False
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if not torch.isfinite(local).all():
                bad = True
                break
        return not collectives.any_rank(bad)

    def check_finite(self, rec: dict, phase: int) -> None:
        """A non-finite loss or gradient norm (the same on every rank: both are reduced): skip or stop."""
        gn = rec.get("grad_norm")
        if math.isfinite(rec["loss"]) and (gn is None or math.isfinite(gn)):
            return
        what = (f"non-finite {'loss' if not math.isfinite(rec['loss']) else 'gradient norm'} "
                f"(loss={rec['loss']}, grad_norm={gn}) at step {rec['step']} (task {phase} {rec['task']!r}, "
                f"task step {rec['task_step']})")
        if not self.weights_finite():
            raise NonFiniteError(f"{what}: the weights are non-finite now; stopped without checkpointing "
                                 f"(last checkpoint: {self.checkpoints.latest()}); fix the data or lower train.lr, "
                                 "then --resume")
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}: stopped (train.on_nonfinite=stop); the step's update was not applied "
                                 f"and nothing was checkpointed after it (last checkpoint: "
                                 f"{self.checkpoints.latest()}); set train.on_nonfinite=skip to skip such steps")
        rec["skipped"] = True
        self.log(f"warning: {what}: step skipped (train.on_nonfinite=skip; its update was not applied)")


# ---------------------------------------------------------------------------------------------------


def _raised_by_ds_cl(e: BaseException) -> bool:
    """True when the innermost frame of `e` is ds-cl's own code: the input checks that raise ValueError
    with a message for the user (data records, subspace fits). A ValueError from inside a library is
    not the user's input error and keeps its traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    pkg = str(Path(__file__).resolve().parents[1])
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(pkg)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-cl train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config YAML")
    # default=[]: without it argparse counts a `*` positional as required and names it in the no-arguments error.
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides (YAML values)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint; refused where output_dir holds no run")
    p.add_argument("--resume-or-start", action="store_true",
                   help="--resume, or start the run where output_dir holds none yet (what a requeued job passes)")
    # The check (ds_cl/training/check.py): validate and print the plan; no GPU, DeepSpeed or process group.
    c = p.add_argument_group("check mode (--check)")
    c.add_argument("--check", action="store_true",
                   help="validate the config and print the resolved plan (world, batch, steps, lengths, model, "
                        "checkpoint size, disk), then exit: 0 when fine, 2 with one line per error")
    c.add_argument("--json", action="store_true", help="with --check: the plan as one JSON object")
    c.add_argument("--world-size", type=int, help="with --check: the launch's world size (default: WORLD_SIZE, "
                                                  "the SLURM allocation, else 1)")
    c.add_argument("--nodes", type=int, help="with --check: nodes of the launch (world = nodes x --gpus-per-node)")
    c.add_argument("--gpus-per-node", type=int, help="with --check: processes per node")
    c.add_argument("--offline-ok", action="store_true",
                   help="with --check: a hub model absent from the local HF cache is a warning, not an error")
    # deepspeed's launcher appends --local_rank=N; the env variable LOCAL_RANK carries it too.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    # Intermixed: overrides may follow options too (`CONFIG --check --world-size 8 train.lr=2e-5`).
    args = p.parse_intermixed_args(argv)
    if not args.check:
        given = [f"--{k.replace('_', '-')}" for k in ("json", "world_size", "nodes", "gpus_per_node", "offline_ok")
                 if getattr(args, k) not in (None, False)]
        if given:
            p.error(f"{', '.join(given)} only with --check")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    args.resume = args.resume or args.resume_or_start
    if args.check:
        from ds_cl.training.check import main as check

        return check(args)
    # Timestamped as the trainer's own lines (ds_cl.training.outputs.log_line).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        # Every input that can be read cheaply, before DeepSpeed starts or any output is written.
        from ds_cl.training.preflight import check_inputs

        accepted = check_inputs(cfg, resume=args.resume, config_path=args.config, start_ok=args.resume_or_start)
    except ConfigError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one copy of the line
            print(f"ds-cl train: {e}", file=sys.stderr)
        return 2
    from ds_cl.training.environment import build_distributed

    info = build_distributed(timeout_minutes=cfg.train.dist_timeout_minutes, deterministic=cfg.train.deterministic,
                             ds_config=cfg.deepspeed)
    if info.rank != 0:  # one copy of each warning (truncation counts are the same on every rank)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        out = Path(cfg.output_dir)
        if info.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if accepted:
                print(log_line(f"--resume: changed since the run started, accepted (they do not change what "
                               f"it trains): {'; '.join(accepted)}"), flush=True)
            save_config(cfg, out / "config.yaml")
        trainer = Trainer(cfg, info)
        rc = trainer.run(resume=args.resume)
        if info.rank == 0 and trainer.state.done:
            from ds_cl.training.outputs import format_matrix

            summ = json.loads((out / "summary.json").read_text())
            tuning = f" tuning AA={100 * summ['tuning_AA']:.1f}" if "tuning_AA" in summ else ""
            print(log_line(f"{cfg.method.name}: AA={100 * summ['AA']:.1f} BWT={100 * summ['BWT']:+.1f}{tuning}\n")
                  + format_matrix(trainer.state.matrix, [t.name for t in trainer.tasks]), flush=True)
            print(log_line(f"outputs in {out}"), flush=True)
    except (ConfigError, ValueError) as e:
        if not isinstance(e, ConfigError) and not _raised_by_ds_cl(e):
            raise  # a library's own error (torch, transformers, DeepSpeed): a bug to report, with its traceback
        if info.rank == 0 or not isinstance(e, ConfigError):  # a ValueError may be one rank's alone
            print(f"ds-cl train: {'' if isinstance(e, ConfigError) else f'rank {info.rank}: '}{e}", file=sys.stderr)
        rc = 2
        if not isinstance(e, ConfigError):
            exit_now(rc)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed (model loading, set-up)
        print(f"\nds-cl train: rank {info.rank}: interrupted (SIGINT) before training started; nothing to "
              f"checkpoint", file=sys.stderr)
        exit_now(130)
    except Exception as e:
        from ds_cl.training.checkpoint import CheckpointError

        if not isinstance(e, (CheckpointError, NonFiniteError, OSError)):
            raise
        # One line, from every rank that failed; no barrier (the other ranks may be inside a collective:
        # the launcher ends them when this process exits).
        print(f"\nds-cl train: rank {info.rank}: {e}", file=sys.stderr)  # \n: after a progress bar
        exit_now(3 if isinstance(e, NonFiniteError) else 1)
    # Not `return rc`: the groups' native threads outlive the destroy, and a normal interpreter exit can
    # abort this rank after its work is done (environment.end_process says how); the process ends here.
    end_distributed(rc)
    return rc  # not reached


if __name__ == "__main__":
    sys.exit(main())
