"""What a run writes besides checkpoints: metrics.jsonl (+ TensorBoard), the accuracy matrix and its
summary (cl_matrix.json, summary.json), the two figures, and the text tables printed at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path


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

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resume redoes them)."""
        if self.rank != 0 or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # the torn last line of a killed run
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        # Atomically: a second kill while rewriting must not lose the records before the checkpoint.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_results(out: Path, method: str, task_names: list[str], matrix: list, baseline, losses: list,
                  boundaries: list, complete: bool, plots: bool) -> None:
    """cl_matrix.json, summary.json (AA, BWT, FWT), and the heatmap and loss curve PNGs."""
    from ds_cl.evaluation.cl_metrics import summarize

    summ = summarize(matrix, task_names[: len(matrix)], baseline=baseline)
    summ["method"] = method
    summ["complete"] = complete
    # Atomically: a reader (a dashboard, `ds-cl compare`) or a crash never sees half a file.
    for name, data in (("cl_matrix.json", {"tasks": task_names, "matrix": matrix, "baseline": baseline}),
                       ("summary.json", summ)):
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
