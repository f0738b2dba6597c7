"""osft inside Hugging Face `Trainer` and TRL's `SFTTrainer` (DeepSpeed ZeRO-3 through accelerate).

One `train()` call per task; the callback object lives across the whole sequence::

    from ds_cl.core.subspace import FixedRank
    from ds_cl.integrations.hf_trainer import OSFTCallback

    osft = OSFTCallback(rank_policy=FixedRank(0.5), energy=0.99, max_ratio=0.9)
    for t, data in enumerate(tasks):
        trainer = SFTTrainer(model=model, train_dataset=data, processing_class=tokenizer,
                             args=SFTConfig(output_dir=f"out/task_{t}", deepspeed=ds_config, ...))
        osft.attach(trainer)        # before train(); also adds the callback to the trainer
        trainer.train()             # first the task boundary: fit + mark before task 0, extend before later ones
        print(osft.leak)            # audited leak of the task's last optimizer step (logged as osft/leak)

What happens, as in `ds-cl train` (`ds_cl/methods/osft.py`) and `examples/own_loop.py`: before task 0
`SubspaceProjector.fit(rank_policy)` protects the base model's top directions and `mark()` remembers the
weights; before every later task `extend(energy, max_ratio)` adds the previous task's update directions;
every optimizer step projects the partitioned gradients before the optimizer and the update after it
(`SubspaceProjector.step`). The Trainer builds a new DeepSpeed engine and a new optimizer at every
`train()` call (`deepspeed_init` sets `trainer.optimizer = None`; `accelerator.free_memory()` destroys the
previous engine), so AdamW's moments start afresh at every task, as `ds-cl train` does with its default
`train.reset_optimizer_each_task: true`; the projector's state (bases and the task-start weights) goes
from one engine to the next in host memory.

Why the callback is handed the trainer (`attach`) instead of only being listed in `callbacks=[...]`: under
DeepSpeed the optimizer step is not the Trainer's to call. `Trainer.training_step` calls
`accelerator.backward(loss)`, whose DeepSpeed path (accelerate/utils/deepspeed.py,
`DeepSpeedEngineWrapper.backward`) runs `engine.backward(loss)` and then, at the accumulation boundary,
`engine.step()` (clipping, optimizer step, zeroing) at once; the Trainer's own `optimizer.step()` that
follows is a no-op (`DeepSpeedOptimizerWrapper.step`). So `on_pre_optimizer_step` and every other event
come after the weights moved, and none is handed the engine (only the unwrapped model and accelerate's
optimizer wrapper). The gradient has to be projected between `engine.backward` and the optimizer, and
the update right after it: `SubspaceProjector.step()` does both around `engine.step()`. At each
`on_train_begin` the callback builds the projector on that call's engine (`trainer.model_wrapped`) and
puts a stand-in in the engine's place inside accelerate's wrapper
(`trainer.accelerator.deepspeed_engine_wrapped.engine`): its `step()` is the projector's, everything else
is the engine's. After every optimizer step it checks that the projector saw it (and raises if not, e.g.
with an accelerate release that steps the engine another way). `on_train_end` puts the engine back.

Checkpoints: `on_save` writes `osft_rank{R}.pt` (this rank's bases, every matrix's rank, the task-start
weights and the task index; the bases are sharded by owner rank) into the checkpoint folder the Trainer
has just written (`output_dir/checkpoint-{global_step}`, next to DeepSpeed's `global_step*/`).
`trainer.train(resume_from_checkpoint=...)` restores it instead of fitting or extending: the
checkpoint's bases are the task's. Resume on the same number of ranks. `OSFTCallback.task_of(folder)`
says which task a checkpoint belongs to.

One trainer per task, as above. `attach` frees the previous trainer's engine first
(`previous.accelerator.free_memory()`, as the Trainer itself does at the start of every `train()`): the two
engines would otherwise both hook the same ZeRO-3 partitioned model, and the old one would keep its optimizer
state in memory. Use the previous trainer for nothing afterwards. A second `train()` on the same trainer
does not work under DeepSpeed (transformers 5.24, with or without this callback): `free_memory()` destroys
the engine, and `Trainer._wrap_model` hands the destroyed one back instead of preparing a new one, so
`on_train_begin` finds no engine in accelerate's wrapper and says so.

Tested with transformers 5.24, TRL 1.16, accelerate 1.15 and DeepSpeed 0.19.8 (requirements.lock), on 2 CPU
ranks (tests/test_hf_trainer.py, through examples/sft_two_tasks.py): both paths keep the audited leak at a
few 1e-7, and their final weights equal those of the same two tasks in a plain DeepSpeed loop with
`SubspaceProjector` (`--trainer loop`; with TRL's fused LM head for the SFTTrainer path, whose loss rounds
otherwise than the model's) within 1e-6 relative (bitwise, as measured); a resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ds_cl.core.projector import SubspaceProjector
from ds_cl.core.subspace import FixedRank
from ds_cl.training.config import AUTO_WITHOUT, OSFTConfig

STATE_FORMAT = 1
LOG_KEY = "osft/leak"


def state_file(folder: str | os.PathLike, rank: int | None = None) -> Path:
    """The projector's file of `rank` (default: this process's) in a Trainer checkpoint folder."""
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return Path(folder) / f"osft_rank{rank}.pt"


def use_process_group_on_cpu() -> dict:
    """On a host without an accelerator (CPU ranks: the tests, examples/sft_two_tasks.py), make accelerate use
    the process group already started (`deepspeed.init_distributed`) under DeepSpeed; returns the
    `TrainingArguments` keywords that tell the Trainer to take that state. Call it before every
    `TrainingArguments` (one per task with one trainer per task), after the process group exists.

    Without it accelerate finds no device backend (accelerate/state.py, `PartialState._prepare_backend` knows
    CUDA, XPU, NPU, ... but not DeepSpeed's CPU ranks) and counts one process: every rank would read all the
    data, and the Trainer's token counts and loss scaling would be a single process's. Not needed on an
    accelerator host, where accelerate finds the backend itself.

    Like `TrainingArguments` without a configured state, it first resets accelerate's shared state
    (`AcceleratorState._reset_state`): a configured state keeps the first trainer's DeepSpeed plugin, and a
    second Accelerator may not bring its own."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("use_process_group_on_cpu: start the process group first (deepspeed.init_distributed())")
    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own PartialState
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"accelerator_config": {"use_configured_state": True}}


class _ProjectedStep:
    """Stands for the DeepSpeed engine inside accelerate's `DeepSpeedEngineWrapper`: `step()` is the
    projector's (which calls the real `engine.step()` between the gradient and the update projection);
    every other attribute is the engine's."""

    def __init__(self, engine, projector: SubspaceProjector):
        self.__dict__["_engine"] = engine
        self.__dict__["_projector"] = projector

    def step(self, lr_kwargs=None):
        if lr_kwargs is not None:
            raise ValueError("OSFTCallback: engine.step(lr_kwargs=...) is not supported under the projector")
        self._projector.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._engine, name, value)


class OSFTCallback(TrainerCallback):
    """Orthogonal-subspace fine-tuning for a sequence of `Trainer.train()` calls, one per task.

    Args:
        rank_policy: how many directions `fit` protects before task 0 (`FixedRank`, `AdaptiveRank`, or
            their names/dicts, see `ds_cl.core.subspace.rank_policy_from`); default FixedRank(0.5).
        importance_batches: batches for `AdaptiveRank`'s layer importance (see `SubspaceProjector.fit`).
        fit_before_first_task: protect the base model during task 0 (default True); False leaves task 0
            unconstrained and starts protecting with the first `extend`.
        energy, max_ratio: `SubspaceProjector.extend` at every later task start (osft-acc).
        targets, projection, project_update, audit_every, pre_step_copy, **projector_options: passed to
            `SubspaceProjector` (defaults: LLaMA's q/k/v/o/gate/up/down, two-sided, update projected).
    """

    # The defaults are `ds-cl train`'s (method.osft in ds_cl/training/config.py), read from there.
    def __init__(self, *, rank_policy=None, importance_batches: Sequence | None = None,
                 fit_before_first_task: bool = AUTO_WITHOUT["fit_before_first_task"],
                 energy: float = OSFTConfig.update_energy, max_ratio: float = OSFTConfig.max_protected_ratio,
                 targets: Sequence[str] | None = None, projection: str = OSFTConfig.projection,
                 project_update: bool = OSFTConfig.project_update, audit_every: int = 1,
                 pre_step_copy: str = OSFTConfig.pre_step_copy, **projector_options):
        self.rank_policy = FixedRank(OSFTConfig.ratio) if rank_policy is None else rank_policy
        self.importance_batches = importance_batches
        self.fit_before_first_task = fit_before_first_task
        self.energy, self.max_ratio = energy, max_ratio
        self.projector_options = dict(targets=targets, projection=projection, project_update=project_update,
                                      audit_every=audit_every, pre_step_copy=pre_step_copy, **projector_options)
        self.task = -1  # the task of the current (or last) train() call
        self.projector: SubspaceProjector | None = None  # during train() only
        self.leaks: dict[str, float] = {}  # {param_name: leak} of the last audited optimizer step
        self.ranks: dict[str, int] = {}  # {param_name: protected directions}, kept after train()
        self.shapes: dict[str, tuple[int, int]] = {}
        self._trainer = None
        self._carried: dict | None = None  # projector state between two train() calls
        self._resume_dir: str | None = None  # set while train(resume_from_checkpoint=...) runs
        self._engine = self._wrapper = None
        self._steps_at_begin = (0, 0)

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, trainer):
        """Use this callback in `trainer` (call before `trainer.train()`); returns the trainer.

        Adds the callback first in the trainer's list (so `osft/leak` is in the logs the reporting
        callbacks see) and records `train(resume_from_checkpoint=...)`'s folder for `on_train_begin`.
        A different trainer than the last one: the last one's engine is freed first (module docstring)."""
        previous = self._trainer
        if previous is not None and previous is not trainer:
            if self.projector is not None:
                raise RuntimeError("OSFTCallback.attach: the previous trainer is still training")
            accelerator = getattr(previous, "accelerator", None)
            if accelerator is not None:
                accelerator.free_memory()
        self._trainer = trainer
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        if not getattr(trainer.train, "_osft_records_resume", False):
            train = trainer.train

            @functools.wraps(train)
            def train_recording_resume(resume_from_checkpoint=None, *args, **kwargs):
                folder = resume_from_checkpoint
                if folder is True:
                    folder = get_last_checkpoint(trainer.args.output_dir)  # what Trainer.train resolves
                self._resume_dir = None if folder in (None, False) else str(folder)
                try:
                    return train(resume_from_checkpoint, *args, **kwargs)
                finally:
                    self._resume_dir = None

            train_recording_resume._osft_records_resume = True
            trainer.train = train_recording_resume
        return trainer

    @property
    def leak(self) -> float | None:
        """Largest audited leak over the targets in the last audited optimizer step (None before any)."""
        return max(self.leaks.values()) if self.leaks else None

    @staticmethod
    def task_of(checkpoint: str | os.PathLike) -> int:
        """The task index a Trainer checkpoint folder written with this callback belongs to."""
        return int(torch.load(state_file(checkpoint), map_location="cpu", weights_only=True)["task"])

    # ------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError("OSFTCallback needs the trainer: call osft.attach(trainer) before trainer.train()")
        engine = trainer.model_wrapped
        wrapper = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
        if not getattr(trainer, "is_deepspeed_enabled", False):
            raise RuntimeError("OSFTCallback needs DeepSpeed under the Trainer (TrainingArguments(deepspeed=CONFIG), "
                               "or an accelerate DeepSpeed config): the projector works on a DeepSpeed engine")
        if wrapper is None or wrapper.engine is not engine:
            raise RuntimeError("OSFTCallback: no live DeepSpeed engine in this train() call; a second train() on the "
                               "same trainer reuses the engine the Trainer destroyed at its start: use one trainer "
                               "per task (and osft.attach each)")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if trainer.accelerator.num_processes != world:
            raise RuntimeError(f"the Trainer counts {trainer.accelerator.num_processes} process(es), the process group "
                               f"{world}: every rank would read the same data. On CPU ranks call "
                               f"ds_cl.integrations.hf_trainer.use_process_group_on_cpu() and pass what it returns "
                               f"to TrainingArguments")
        proj = SubspaceProjector(engine, **self.projector_options)
        resume = self._resume_dir
        if resume is None and state.global_step > 0:  # resumed by a path we did not see: the Trainer's naming
            resume = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if resume is not None:
            path = state_file(resume, proj.rank)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no projector state in the checkpoint; it was written without "
                                        f"OSFTCallback, or on another number of ranks")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("format") != STATE_FORMAT:
                raise ValueError(f"{path}: state format {saved.get('format')!r}, expected {STATE_FORMAT}")
            proj.load_state_dict(saved["projector"])
            self.task = int(saved["task"])
        elif self._carried is None:
            self.task = 0
            if self.fit_before_first_task:
                proj.fit(rank_policy=self.rank_policy, importance_batches=self.importance_batches)
            proj.mark()
        else:
            proj.load_state_dict(self._carried)
            self.task += 1
            proj.extend(energy=self.energy, max_ratio=self.max_ratio)
        self._carried = None
        self.projector, self._engine, self._wrapper = proj, engine, wrapper
        self.ranks, self.shapes, self.leaks = dict(proj.ranks), dict(proj.shapes), {}
        wrapper.engine = _ProjectedStep(engine, proj)
        self._steps_at_begin = (engine.global_steps, proj.stats["optimizer_steps"])

    def on_step_end(self, args, state, control, **kwargs):
        proj = self.projector
        if proj is None:
            return
        stepped = self._engine.global_steps - self._steps_at_begin[0]
        projected = proj.stats["optimizer_steps"] - self._steps_at_begin[1]
        if proj.active and stepped != projected:
            raise RuntimeError(f"OSFTCallback: the engine took {stepped} optimizer steps in this train() call, the "
                               f"projector saw {projected}: the step ran outside accelerate's "
                               f"DeepSpeedEngineWrapper.backward, where the callback puts the projector's step")
        if proj.audit_enabled:
            self.leaks = proj.audit()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.projector is None or self.leak is None or "loss" not in logs:
            return
        logs[LOG_KEY] = self.leak
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][LOG_KEY] = self.leak  # Trainer.log appended a copy before calling us

    def on_save(self, args, state, control, **kwargs):
        proj = self.projector
        if proj is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = state_file(folder, proj.rank)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": STATE_FORMAT, "task": self.task, "projector": proj.state_dict()}, tmp)
        os.replace(tmp, path)

    def on_train_end(self, args, state, control, **kwargs):
        proj = self.projector
        if proj is None:
            return
        if proj.audit_enabled:
            self.leaks = proj.audit()
        self.ranks = dict(proj.ranks)
        self._carried = proj.state_dict()
        if self._wrapper is not None and isinstance(self._wrapper.engine, _ProjectedStep):
            self._wrapper.engine = self._engine
        # No reference to the engine after train(): the next train() frees it, with its optimizer state.
        self.projector = self._engine = self._wrapper = None
