"""The methods that change only what is trained on: replay (a share of earlier tasks' samples mixed
into each later task, and of method.replay.earlier's sources into every task) and multitask (every task
at once: the upper bound a sequence is measured against)."""

from __future__ import annotations

from ds_cl.methods.base import Method, Phase


class Replay(Method):
    name = "replay"

    def plan(self, tasks):
        """Task i trains on its own samples plus replayed ones from the earlier sources: method.replay.earlier's
        (tasks the starting model was trained on before this run), then tasks 0..i-1. fraction_of "task":
        round(fraction x its own number) drawn from their pool; "earlier": each source's fixed buffer of
        round(fraction x its samples). Without earlier sources task 0 has nothing to replay."""
        from ds_cl.training.data import load_earlier, replay_buffer, replay_samples

        r = self.cfg.method.replay
        earlier = [load_earlier(s, j, self.tokenizer, self.cfg.train.max_seq_len) for j, s in enumerate(r.earlier)]
        phases = super().plan(tasks)
        if r.fraction_of == "earlier":
            sources = earlier + [t.train for t in tasks[:-1]]
            buffers = [replay_buffer(s, r.fraction, self.cfg.seed, j) for j, s in enumerate(sources)]
            for i, ph in enumerate(phases):
                ph.train += [x for b in buffers[:len(earlier) + i] for x in b]
            return phases
        first = 0 if earlier else 1
        for i, ph in enumerate(phases[first:], start=first):
            n = round(r.fraction * len(tasks[i].train))
            ph.train += replay_samples(earlier + [t.train for t in tasks[:i]], n, self.cfg.seed, i)
        return phases


class Multitask(Method):
    name = "multitask"

    def plan(self, tasks):
        return [Phase("multitask", [s for t in tasks for s in t.train], len(tasks), tasks=len(tasks))]

    def record(self, matrix, scores):
        # All tasks were trained at once: every row of the matrix is the final one.
        matrix[:] = [list(scores) for _ in scores]
