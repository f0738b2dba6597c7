"""The methods that change only what is trained on: replay (a share of earlier tasks' samples mixed
into each later task) and multitask (every task at once: the upper bound a sequence is measured against)."""

from __future__ import annotations

from ds_cl.methods.base import Method, Phase


class Replay(Method):
    name = "replay"

    def plan(self, tasks):
        from ds_cl.training.data import replay_samples

        phases = super().plan(tasks)
        for i, ph in enumerate(phases[1:], start=1):
            n = round(self.cfg.method.replay.fraction * len(tasks[i].train))
            ph.train += replay_samples([t.train for t in tasks[:i]], n, self.cfg.seed, i)
        return phases


class Multitask(Method):
    name = "multitask"

    def plan(self, tasks):
        return [Phase("multitask", [s for t in tasks for s in t.train], len(tasks))]

    def record(self, matrix, scores):
        # All tasks were trained at once: every row of the matrix is the final one.
        matrix[:] = [list(scores) for _ in scores]
