"""osft: orthogonal-subspace full fine-tuning (arXiv 2504.07097) in the training loop.

The projector (ds_cl/core/projector.py) holds a protected subspace per target matrix; every step goes
through it, which keeps the update in the orthogonal complement. `method.osft.subspace` says how the
subspace follows the sequence:

* refit (the paper): at the start of each task, the top singular directions of the current weights, as
  many as the rank policy gives (adaptive: from each layer's importance on the previous task's samples;
  fixed: one ratio).
* accumulate (osft-acc): the rank policy's fit once before the first task; at the start of each later
  task, the top directions of the previous task's update are added to what is protected.

The optimizer has two parameter groups: the targets, and the rest (embeddings, norms, lm_head), whose
learning rate is scaled by `method.osft.non_target_lr_scale` while the constraint is on.
"""

from __future__ import annotations

import time

from ds_cl.methods.base import Method
from ds_cl.methods.plain import Replay
from ds_cl.tools.faults import fault_point
from ds_cl.training.outputs import log_line


class OSFT(Method):
    name = "osft"
    has_state = True  # the projector's bases

    def __init__(self, cfg, dist, tokenizer):
        super().__init__(cfg, dist, tokenizer)
        self.opts = cfg.method.osft
        self.projector = None  # ds_cl.core.projector.SubspaceProjector, from bind()

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
        # Task 0 is constrained by the first fit or by the protected reference update (either gives bases).
        return phase > 0 or self.opts.fit_before_first_task or bool(self.opts.protect_update_from)

    def start_task(self, phase, phases, fresh):
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
            else:
                self.projector.mark()
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
        if self.dist.rank == 0:
            shapes = self.projector.shapes
            share = lambda r: sum(r[n] / min(shapes[n]) for n in r) / len(r)  # noqa: E731
            print(log_line(f"phase {phase}: protected {what} (+{100 * share(added):.1f}% of directions, now "
                           f"{100 * share(self.projector.ranks):.1f}%) in {time.time() - t0:.1f}s"), flush=True)
        fault_point("fit", self.dist.rank, phase=phase)

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
            print(log_line(f"phase {phase}: subspace fitted ({type(policy).__name__}) in {time.time() - t0:.1f}s"),
                  flush=True)
        fault_point("fit", self.dist.rank, phase=phase)

    def importance_batches(self, phase, phases) -> list[dict] | None:
        """Inputs for the adaptive rank's layer importance: the previous task's data (same count on
        every rank); before the first task, general data if configured, else None (fixed ratio)."""
        from ds_cl.training.data import Encoded, collate, encode_prompt_for_generation, epoch_order, read_records

        o, d, mb = self.opts, self.dist, self.cfg.train.micro_batch_size
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
