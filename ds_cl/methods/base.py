"""What the training loop asks of a continual-learning method, and the plain answers (sequential
fine-tuning: every parameter trained, one phase per task, nothing extra).

The loop (ds_cl/training/train.py) calls, in order:

    phases = method.plan(tasks)                  # data policy: what each phase trains on
    method.prepare_model(model)                  # before the engine (adapters are added here)
    groups = method.param_groups(model)          # the optimizer's parameter groups
    method.bind(engine)                          # after the engine (the projector is built here)
    per phase:  method.start_task(phase, fresh)  # fresh: not a resume into the middle of the phase
        per optimizer step:  lrs = method.group_lrs(lr, phase)
            per micro batch:  loss, logs = method.loss(loss); backward; method.step()
            rec.update(method.step_metrics())
        method.record(matrix, scores); method.export_tensors(module); method.save_task_outputs(...)

`state_dict()` / `load_state_dict()` (when `has_state`) is what the checkpoint keeps of the method beyond the engine (per
rank); None when the engine holds everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    import torch

    from ds_cl.training.config import RunConfig
    from ds_cl.training.data import Encoded, TaskData
    from ds_cl.training.environment import DistInfo


@dataclass
class Phase:
    """Training between two evaluations: one task's data (plus replayed samples), or every task at once."""

    name: str
    train: list["Encoded"]
    eval_upto: int  # after the phase, tasks[:eval_upto] are scored
    # How many tasks' data the phase trains at once (multitask: all): train.max_steps_per_task caps each
    # task, so such a phase gets that many tasks' steps (the same budget as the sequence it stands beside).
    tasks: int = 1
    steps: int = 0
    steps_per_epoch: int = 0


class Method:
    """Sequential fine-tuning (seqft). Every other method derives from it and overrides what differs."""

    name = "seqft"
    has_state = False  # True: state_dict() holds what the checkpoint must keep beyond the engine

    def __init__(self, cfg: "RunConfig", dist: "DistInfo", tokenizer: Any):
        self.cfg, self.dist, self.tokenizer = cfg, dist, tokenizer
        self.engine: Any = None  # deepspeed.DeepSpeedEngine, from bind()

    # -- before any work ---------------------------------------------------------------------------

    @classmethod
    def check_model(cls, cfg: "RunConfig", model: "torch.nn.Module") -> None:
        """Preflight (ds_cl/training/preflight.py), on the model built on the meta device: raise ValueError
        for settings that do not fit this model (e.g. target patterns that match nothing)."""

    # -- data policy ------------------------------------------------------------------------------

    def plan(self, tasks: list["TaskData"]) -> list[Phase]:
        return [Phase(t.name, list(t.train), i + 1) for i, t in enumerate(tasks)]

    def record(self, matrix: list[list[float]], scores: list[float]) -> None:
        """Add the scores measured after a phase to the accuracy matrix."""
        matrix.append(scores)

    # -- model and optimizer ----------------------------------------------------------------------

    def prepare_model(self, model: "torch.nn.Module") -> None:
        pass

    def param_groups(self, model: "torch.nn.Module") -> list:
        return [p for p in model.parameters() if p.requires_grad]

    def bind(self, engine: Any) -> None:
        self.engine = engine

    # -- a task, a step ---------------------------------------------------------------------------

    def start_task(self, phase: int, phases: list[Phase], fresh: bool) -> None:
        pass

    def group_lrs(self, lr: float, phase: int) -> list[float]:
        """The learning rate of each optimizer parameter group at this step."""
        return [lr] * len(self.engine.optimizer.param_groups)

    def loss(self, loss: "torch.Tensor") -> tuple["torch.Tensor", dict]:
        """The loss to back-propagate for this micro batch, and values to log (averaged over micro batches)."""
        return loss, {}

    def step(self) -> None:
        """Once per micro batch, after backward (DeepSpeed steps the optimizer at the accumulation boundary)."""
        self.engine.step()

    def step_metrics(self) -> dict:
        """After each optimizer step: values for metrics.jsonl (they override the loop's, e.g. `lr`)."""
        return {}

    # -- checkpoint and outputs -------------------------------------------------------------------

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_tensors(self, module: "torch.nn.Module") -> Optional[Iterator]:
        """(name, tensor) pairs to export instead of the module's own parameters; None: the module's."""
        return None

    def save_task_outputs(self, out: Path, phase: int, name: str) -> None:
        pass
