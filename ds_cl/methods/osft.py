"""osft: orthogonal-subspace full fine-tuning (arXiv 2504.07097) in the training loop.

The projector (ds_cl/core/projector.py) holds a protected subspace per target matrix; every step goes
through it, which keeps the update in the orthogonal complement. `method.osft.subspace` says how the
subspace follows the sequence:

* refit (the paper): at the start of each task, the top singular directions of the current weights, as
  many as the rank policy gives (adaptive: from each layer's importance on the previous task's samples;
  fixed: one ratio).
* accumulate (osft-acc): the rank policy's fit once before the first task; at the start of each later
  task, `method.osft.boundary` says what is added to what is protected: `update`, the top directions of
  the previous task's update; `inputs`, the span of the inputs the previous task fed each target layer
  (gradient projection memory's choice; `SubspaceProjector.extend_inputs`). Before the first task it can
  also protect what made the starting model: the update from `protect_update_from`'s weights, and the
  span of the inputs that `protect_inputs_of`'s data (e.g. the starting model's safety alignment) feeds
  each target layer.

The optimizer has two parameter groups: the targets, and the rest (embeddings, norms, lm_head), whose
learning rate is scaled by `method.osft.non_target_lr_scale` while the constraint is on.

Each fit and each extend appends one JSON line to `<output_dir>/protected.jsonl` on rank 0 (`protected_record`
says what it holds) and, with `output.plots`, redraws `protected.png` from the file: the protected share per
layer after every boundary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ds_cl.methods.base import Method
from ds_cl.methods.plain import Replay
from ds_cl.tools.faults import fault_point
from ds_cl.training.outputs import keep_records, log_line

PROTECTED_FILE = "protected.jsonl"
OTHER_LAYER = "other"  # the `layers` key of targets outside any decoder layer


def mean_share(ranks: dict[str, int], shapes: dict) -> float:
    """Mean over the matrices of rank / min(shape): the share of directions protected (or added)."""
    return sum(ranks[n] / min(shapes[n]) for n in ranks) / len(ranks)


def protected_record(phase: int, task: str, event: str, ranks: dict[str, int], shapes: dict,
                     added: dict[str, int] | None = None, kind: str | None = None) -> dict:
    """One line of protected.jsonl: `phase` (the phase about to train), `task` (its name), `event` (`fit` or
    `extend`), `kind` (extend: what it protected, `update` or `inputs`, method.osft.boundary; fit: null),
    `share` (mean over the target matrices of protected rank / min(shape): the log line's number),
    `added` (extend: the same mean of the directions this event added; fit: null), `layers` ({layer, e.g.
    `model.layers.3`: mean share of its target matrices}; targets outside any layer under `other`) and
    `matrices` ({parameter name: protected rank / min(shape)})."""
    from ds_cl.core.subspace import layer_of

    matrices = {n: ranks[n] / min(shapes[n]) for n in ranks}
    by_layer: dict[str, list[float]] = {}
    for n, v in matrices.items():
        by_layer.setdefault(layer_of(n) or OTHER_LAYER, []).append(v)
    return {"phase": phase, "task": task, "event": event, "kind": kind, "share": mean_share(ranks, shapes),
            "added": None if added is None else mean_share(added, shapes),
            "layers": {k: sum(v) / len(v) for k, v in by_layer.items()}, "matrices": matrices}


def read_protected(path: Path) -> list[dict]:
    """protected.jsonl's records (a torn last line of a killed run skipped)."""
    recs = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


class OSFT(Method):
    name = "osft"
    has_state = True  # the projector's bases

    def __init__(self, cfg, dist, tokenizer):
        super().__init__(cfg, dist, tokenizer)
        self.opts = cfg.method.osft
        self.projector = None  # ds_cl.core.projector.SubspaceProjector, from bind()
        self.protected_path = Path(cfg.output_dir) / PROTECTED_FILE
        self.started = False  # start_task has run in this process (protected.jsonl trimmed)

    @classmethod
    def check_model(cls, cfg, model):
        from ds_cl.core.subspace import select_targets

        params = dict(model.named_parameters())
        try:
            names = select_targets(params, cfg.method.osft.targets)
        except ValueError as e:
            raise ValueError(f"method.osft.targets: {e}") from None
        for name in names:
            if params[name].dim() != 2:
                raise ValueError(f"method.osft.targets: {name} has shape {tuple(params[name].shape)}; only 2-D "
                                 f"weights can be projected (narrow the patterns)")
        ref = cfg.method.osft.protect_update_from
        if ref:  # every target in the reference with the model's shape, read from the headers in seconds
            from ds_cl.training.modeling import SafetensorsWeights

            try:
                weights = SafetensorsWeights(ref)
            except (ValueError, OSError) as e:
                raise ValueError(f"method.osft.protect_update_from: {e}") from None
            for name in names:
                shape = weights.shape(name)
                if shape != tuple(params[name].shape):
                    found = "missing" if shape is None else f"shape {shape}"
                    raise ValueError(f"method.osft.protect_update_from: {ref}: {name} is {found}, the model's is "
                                     f"{tuple(params[name].shape)} (give the folder of the weights this model "
                                     f"was tuned from)")

    def param_groups(self, model):
        from ds_cl.core.subspace import select_targets

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        targets = set(select_targets([n for n, _ in named], self.opts.targets))
        groups = [{"params": [p for n, p in named if n in targets]},
                  {"params": [p for n, p in named if n not in targets]}]
        return [g for g in groups if g["params"]]

    def bind(self, engine):
        from ds_cl.core.projector import SubspaceProjector

        super().bind(engine)
        o = self.opts
        self.projector = SubspaceProjector(engine, targets=o.targets, projection=o.projection,
                                          project_update=o.project_update, audit_every=o.audit_every,
                                          pre_step_copy=o.pre_step_copy)

    def constrained(self, phase: int) -> bool:
        # Task 0 is constrained by the first fit, the protected reference update or the protected inputs
        # (each gives bases).
        o = self.opts
        return phase > 0 or o.fit_before_first_task or bool(o.protect_update_from) or bool(o.protect_inputs_of)

    def start_task(self, phase, phases, fresh):
        if not self.started:
            self.started = True
            # The first task of this process: lines of the phases it will redo go (a resume at a boundary
            # refits or extends again; a new run in the same folder starts at phase 0: all of them). Inside
            # a phase (not fresh) the checkpoint kept that phase's subspace: its lines stay.
            self.trim_protected(phase if fresh else phase + 1)
        if not fresh:  # resumed inside the task: the checkpoint restored the subspace
            return
        if self.opts.subspace == "refit":
            if self.constrained(phase):
                self.fit(phase, phases)
        elif phase == 0:
            if self.opts.fit_before_first_task:
                self.fit(phase, phases)
            if self.opts.protect_update_from:  # the update that made the starting model, then mark()
                self.protect_reference_update(phase, phases)
            elif self.opts.boundary == "update":  # the inputs boundary needs no task-start weights
                self.projector.mark()
            if self.opts.protect_inputs_of:  # the inputs of the data that made it (the weights unchanged)
                self.protect_earlier_inputs(phase, phases)
        elif self.opts.boundary == "inputs":
            self.extend_inputs(phase, phases)
        else:
            self.extend(phase, phases)

    def protect_reference_update(self, phase, phases) -> None:
        from ds_cl.training.modeling import SafetensorsWeights

        ref = self.opts.protect_update_from
        try:
            self.projector.mark_from(SafetensorsWeights(ref).read)
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"method.osft.protect_update_from: {ref}: {e}") from None
        self.extend(phase, phases, what=f"the update from {ref}")

    def extend(self, phase, phases, what: str | None = None) -> None:
        o, t0 = self.opts, time.time()
        what = what or f"the update of {phases[phase - 1].name}"
        try:
            added = self.projector.extend(o.update_energy, o.max_protected_ratio)
        except ValueError as e:
            raise ValueError(f"task {phase} ({phases[phase].name}): protecting {what} refused on rank "
                             f"{self.dist.rank}: {e}") from None
        self.extended(phase, phases, what, added, "update", t0)

    def extended(self, phase, phases, what: str, added: dict[str, int], kind: str, t0: float, detail: str = "") -> None:
        """After an extend of `kind` (update / inputs): rank 0's log line and protected.jsonl record, then the
        fault point a test stops at."""
        if self.dist.rank == 0:
            share = lambda r: mean_share(r, self.projector.shapes)  # noqa: E731
            print(log_line(f"phase {phase}: protected {what} ({detail}+{100 * share(added):.1f}% of directions, now "
                           f"{100 * share(self.projector.ranks):.1f}%) in {time.time() - t0:.1f}s"), flush=True)
            self.record_protected(phase, phases, "extend", added, kind)
        fault_point("fit", self.dist.rank, phase=phase)

    def extend_inputs(self, phase, phases) -> None:
        """Protect the inputs the previous task fed each target layer: its training samples that the
        adaptive rank's importance reads (`importance_batches`: `importance_samples` of them, split over
        the ranks), run forward with the current weights."""
        prev = phases[phase - 1].name
        self.protect_inputs(phase, phases, prev, self.importance_batches(phase, phases), "of its training samples")

    def protect_earlier_inputs(self, phase, phases) -> None:
        """Before the first task: protect the inputs that method.osft.protect_inputs_of's data (what the
        starting model was tuned on) feeds each target layer: `importance_samples` of its training samples,
        drawn once by the seed from all its sources' samples, split over the ranks, run forward with the
        starting weights."""
        import random

        from ds_cl.training.data import PROTECT_INPUTS as within, load_earlier

        o = self.opts
        pool = [x for j, s in enumerate(o.protect_inputs_of)
                for x in load_earlier(s, j, self.tokenizer, self.cfg.train.max_seq_len, within=within)]
        samples = random.Random(f"{self.cfg.seed}-protect-inputs").sample(pool, min(len(pool), o.importance_samples))
        names = ", ".join(s.name for s in o.protect_inputs_of)
        self.protect_inputs(phase, phases, names, self.rank_batches(samples), f"of their training samples ({within})")

    def protect_inputs(self, phase, phases, what: str, batches: list[dict] | None, samples: str) -> None:
        """extend_inputs with `batches` (this rank's; None: fewer samples than ranks), the inputs of `what`,
        and its log line and protected.jsonl record (kind `inputs`)."""
        o, t0 = self.opts, time.time()
        if batches is None:
            raise ValueError(f"task {phase} ({phases[phase].name}): protecting the inputs of {what} needs at least "
                             f"one {samples} per rank ({self.dist.world} ranks, method.osft.importance_samples "
                             f"{o.importance_samples})")
        try:
            added = self.projector.extend_inputs(batches, o.input_energy, o.max_protected_ratio)
        except ValueError as e:
            raise ValueError(f"task {phase} ({phases[phase].name}): protecting the inputs of {what} refused on "
                             f"rank {self.dist.rank}: {e}") from None
        self.extended(phase, phases, f"the inputs of {what}", added, "inputs", t0,
                      detail=f"{len(batches)} batches per rank, ")

    def fit(self, phase, phases) -> None:
        from ds_cl.core.subspace import AdaptiveRank, FixedRank

        o = self.opts
        batches = self.importance_batches(phase, phases) if o.rank == "adaptive" else None
        policy = AdaptiveRank(mrr=o.mrr, trr=o.trr) if batches is not None else FixedRank(ratio=o.ratio)
        t0 = time.time()
        try:
            self.projector.fit(rank_policy=policy, importance_batches=batches)
        except ValueError as e:  # e.g. non-finite weights: never fit bases from them
            raise ValueError(f"task {phase} ({phases[phase].name}): subspace fit refused on rank "
                             f"{self.dist.rank}: {e}") from None
        if self.dist.rank == 0:
            share = mean_share(self.projector.ranks, self.projector.shapes)
            print(log_line(f"phase {phase}: subspace fitted ({type(policy).__name__}, {100 * share:.1f}% of "
                           f"directions) in {time.time() - t0:.1f}s"), flush=True)
            self.record_protected(phase, phases, "fit")
        fault_point("fit", self.dist.rank, phase=phase)

    def trim_protected(self, first_phase: int) -> None:
        """Rank 0: drop protected.jsonl's lines of phases >= first_phase (atomically, as metrics.jsonl's)."""
        if self.dist.rank == 0:
            keep_records(self.protected_path, lambda r: r.get("phase", 0) < first_phase)

    def record_protected(self, phase, phases, event: str, added: dict[str, int] | None = None,
                         kind: str | None = None) -> None:
        """Rank 0, after a fit or an extend: a line of protected.jsonl, and protected.png redrawn."""
        rec = protected_record(phase, phases[phase].name, event, self.projector.ranks, self.projector.shapes,
                               added, kind)
        with open(self.protected_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.cfg.output.plots:
            from ds_cl.training.plots import protected_share

            protected_share(read_protected(self.protected_path), self.protected_path.with_suffix(".png"),
                            title=f"{self.cfg.method.name}: protected share per layer")

    def importance_batches(self, phase, phases) -> list[dict] | None:
        """Inputs for the adaptive rank's layer importance and the inputs boundary: the previous task's data
        (same count on every rank); before the first task, general data if configured, else None (fixed
        ratio)."""
        from ds_cl.training.data import Encoded, encode_prompt_for_generation, epoch_order, read_records

        o = self.opts
        if phase > 0:
            prev = phases[phase - 1].train
            order = epoch_order(len(prev), self.cfg.seed, phase - 1, 0)[: o.importance_samples]
            samples = [prev[i] for i in order]
        elif o.first_task_importance_data:
            rows = read_records(o.first_task_importance_data, "train", "method.osft.first_task_importance_data")
            texts = [str(r[o.first_task_importance_field]) for r in rows[: o.importance_samples]]
            samples = [Encoded(ids, ids) for ids in (encode_prompt_for_generation(self.tokenizer, t,
                                                                                  self.cfg.train.max_seq_len)
                                                     for t in texts)]
        else:
            return None
        return self.rank_batches(samples)

    def rank_batches(self, samples: list) -> list[dict] | None:
        """This rank's share of `samples` (the same count on every rank: len // world, the rest left out) in
        micro batches of input_ids and attention_mask on its device; None when there are fewer samples than
        ranks."""
        from ds_cl.training.data import collate

        d, mb = self.dist, self.cfg.train.micro_batch_size
        per_rank = len(samples) // d.world
        if per_rank == 0:
            return None
        mine = samples[d.rank::d.world][:per_rank]
        out = []
        for i in range(0, per_rank, mb):
            b = collate(mine[i:i + mb], self.tokenizer.pad_id)
            out.append({k: b[k].to(self.engine.device) for k in ("input_ids", "attention_mask")})
        return out

    def group_lrs(self, lr, phase):
        # Group 1: the non-target parameters.
        scale = self.opts.non_target_lr_scale if self.constrained(phase) else 1.0
        return [lr if k == 0 else lr * scale for k in range(len(self.engine.optimizer.param_groups))]

    def step(self):
        self.projector.step()

    def step_metrics(self):
        stats = self.projector.stats
        leaks = self.projector.audit()  # {} before the first fit: nothing constrained yet
        if leaks and stats["audited_at"] == stats["optimizer_steps"]:  # measured at this step
            return {"leak": max(leaks.values())}
        return {}

    def state_dict(self):
        return self.projector.state_dict()

    def load_state_dict(self, state):
        self.projector.load_state_dict(state)


class OSFTReplay(Replay, OSFT):
    """osft with replay: every step goes through the projector as in osft, and each task's data mixes in
    `method.replay`'s samples as replay's does (earlier tasks', and method.replay.earlier's sources: data
    the starting model was tuned on, e.g. its safety alignment). Why a hybrid: at 135M parameters the
    subspace constraint alone did not keep a safety alignment through tasks with one-word answers, where
    a few replayed alignment samples did (docs/osft.md, the retention study)."""

    name = "osft-replay"
