"""What a run writes besides checkpoints: metrics.jsonl (+ TensorBoard / W&B), the accuracy matrix and its
summary (cl_matrix.json, summary.json), the two figures, and the text tables printed at the end."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

LOG_PREFIX = "[ds-cl]"


def log_line(msg: str) -> str:
    """`[ds-cl] 2025-01-31 12:34:56 msg`: the trainer's log line. The local time says when each phase began and
    how long it took in a log read later; the prefix stays first, as the tools that echo a run's own lines
    pick them by it (ds_cl/tools/local_runs.py)."""
    return f"{LOG_PREFIX} {time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


class Progress:
    """A phase's steps on rank 0 (`enabled`): tqdm's bar on a terminal; elsewhere (a log file, a pipe, the
    launcher's or SLURM's output) a log line on the first step, then every `every_s` seconds and on the
    last step. In a file, tqdm's `\r` frames make one line of every refresh of the run."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_s: float = 60.0, stream=None):
        self.total, self.n, self.n0, self.desc, self.every_s = total, initial, initial, desc, every_s
        self.stream = stream if stream is not None else sys.stdout
        self.enabled, self.bar = enabled, None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True,
                            file=self.stream)
        self.t0 = self.last = time.monotonic()

    def update(self, **postfix: float) -> None:
        """One step done; `postfix`: values to show (loss=...)."""
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})
            return
        now = time.monotonic()
        if not self.enabled or not (self.n == self.n0 + 1 or now - self.last >= self.every_s or self.n >= self.total):
            return
        self.last = now
        per_step = (now - self.t0) / (self.n - self.n0)
        parts = [f"step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)",
                 *(f"{k} {v:.3f}" for k, v in postfix.items()),
                 f"{per_step:.1f} s/step" if per_step >= 1 else f"{1 / max(per_step, 1e-9):.1f} steps/s"]
        if self.n < self.total:
            parts.append(f"~{_duration(per_step * (self.total - self.n))} left")
        print(log_line(f"{self.desc}: {', '.join(parts)}"), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def keep_records(path: Path, keep) -> None:
    """Rewrite a JSON-lines file with only the records `keep(record)` accepts (a resume drops what it redoes);
    a torn last line of a killed run goes too. Atomically: a second kill while rewriting must not lose the
    records before the checkpoint."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # the torn last line of a killed run
            continue
        if keep(rec):
            lines.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl on rank 0, and the same scalars to the trackers of `output.report_to` (HF style):
    TensorBoard event files in `<output_dir>/tensorboard/`, a Weights & Biases run in `<output_dir>/wandb/`
    (project $WANDB_PROJECT or ds-cl; WANDB_MODE=offline works without a network). The trackers also get
    the accuracy matrix, a row per finished task. Tracker names are HF Trainer's (its rewrite_logs): a step's
    scalars under `train/` (`train/loss`, `train/lr`, ...), a task's score under `eval/<task>`, and `cl/AA`,
    `cl/BWT`; metrics.jsonl keeps the bare keys."""

    def __init__(self, out: Path, rank: int, report_to: list[str] = (), config: dict | None = None):
        self.rank = rank
        self.path = out / "metrics.jsonl"
        self.tb = self.wandb = None
        if rank != 0:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            import secrets

            import wandb

            # One W&B run per output folder: a --resume continues it instead of starting another.
            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ds-cl"), name=out.name, id=run_id,
                                    dir=str(out), resume="allow", config=config or {})

    def _scalars(self, values: dict, step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def write(self, rec: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._scalars({f"train/{k}": v for k, v in rec.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool) and k not in ("step", "task")}, rec.get("step", 0))

    def write_matrix_row(self, names: list[str], matrix: list, step: int, tuning_matrix: list | None = None) -> None:
        """The trackers' view of the accuracy matrix after a task: its last row, and AA/BWT so far; with a
        tuning split (eval.tuning_size), its matrix's last row under `tuning/<task>` and `cl/tuning_AA`."""
        if self.rank != 0 or (self.tb is None and self.wandb is None):
            return
        from ds_cl.evaluation.cl_metrics import average_accuracy, summarize

        values = {f"eval/{name}": v for name, v in zip(names, matrix[-1]) if v is not None}
        summ = summarize(matrix, names[: len(matrix)])
        values.update({f"cl/{k}": summ[k] for k in ("AA", "BWT") if summ.get(k) is not None})
        if tuning_matrix:
            values.update({f"tuning/{name}": v for name, v in zip(names, tuning_matrix[-1]) if v is not None})
            values["cl/tuning_AA"] = average_accuracy(tuning_matrix)
        self._scalars(values, step)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resume redoes them)."""
        if self.rank == 0:
            keep_records(self.path, lambda rec: rec.get("step", 0) <= step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() can return before W&B's service process has written the run's .wandb file out (a
            # read right after it missed a resumed session's row: once in 135 repeats, once in CI);
            # teardown waits for the service to exit, so the files are complete when close() returns, not
            # only at interpreter exit (whose atexit hook is the only other flush, and is skipped on a kill).
            wandb.teardown()
            self.wandb = None


def write_results(out: Path, method: str, task_names: list[str], matrix: list, baseline, losses: list,
                  boundaries: list, complete: bool, plots: bool, tuning_matrix: list | None = None) -> None:
    """cl_matrix.json, summary.json (AA, BWT, FWT), and the heatmap and loss curve PNGs. `tuning_matrix`
    (eval.tuning_size > 0): the tuning split's rows, in both files, and its AA (summary.json `tuning_AA`)."""
    from ds_cl.evaluation.cl_metrics import average_accuracy, summarize

    summ = summarize(matrix, task_names[: len(matrix)], baseline=baseline)
    summ["method"] = method
    summ["complete"] = complete
    cl_matrix = {"tasks": task_names, "matrix": matrix, "baseline": baseline}
    if tuning_matrix is not None:
        cl_matrix["tuning_matrix"] = summ["tuning_matrix"] = [list(row) for row in tuning_matrix]
        summ["tuning_AA"] = average_accuracy(tuning_matrix) if tuning_matrix else None
    # Atomically: a reader (a dashboard, `ds-cl compare`) or a crash never sees half a file.
    for name, data in (("cl_matrix.json", cl_matrix), ("summary.json", summ)):
        tmp = out / f"{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out / name)
    if plots:
        from ds_cl.training.plots import heatmap, loss_curve

        aa, bwt = summ.get("AA"), summ.get("BWT")
        scores = ", ".join(f"{k} {100 * v:+.1f}" if k == "BWT" else f"{k} {100 * v:.1f}"
                           for k, v in (("AA", aa), ("BWT", bwt)) if v is not None)
        heatmap(matrix, out / "cl_matrix.png", tasks=task_names,
                title=f"{method}: accuracy x 100{f' ({scores})' if scores else ''}")
        leaks = []
        if (out / "metrics.jsonl").is_file():  # osft's audited leak, for the curve's second panel
            for line in (out / "metrics.jsonl").read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("leak") is not None:
                    leaks.append((rec["step"], rec["leak"]))
        loss_curve(losses, boundaries, out / "loss.png", tasks=task_names, title=f"{method}: training loss",
                   leaks=leaks)


def fmt_row(scores: list[float]) -> str:
    return " ".join(f"{100 * s:5.1f}" for s in scores)


def format_matrix(matrix: list[list[float]], names: list[str]) -> str:
    w = max(8, *(len(n) for n in names))
    lines = ["after \\ on  " + " ".join(f"{n[:w]:>{w}}" for n in names)]
    for i, row in enumerate(matrix):
        cells = [f"{100 * v:>{w}.1f}" for v in row] + [f"{'':>{w}}"] * (len(names) - len(row))
        lines.append(f"{names[i] if i < len(names) else i!s:<11} " + " ".join(cells))
    return "\n".join(lines)
