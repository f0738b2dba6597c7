"""Continual-learning metrics from an accuracy matrix: the one implementation shared by
`ds-cl train` and the evaluation reports.

R[i][j] is the score on task j after training task i (i, j from 0; T = number of rows).
Entries for tasks not yet seen (j > i) may be None; they are only used by FWT.
"""

from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check(matrix: Matrix) -> int:
    t = len(matrix)
    if t == 0:
        raise ValueError("accuracy matrix is empty")
    for i, row in enumerate(matrix):
        if len(row) < i + 1:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries; needs at least {i + 1} "
                             f"(tasks 0..{i} are seen after training task {i})")
    return t


def average_accuracy(matrix: Matrix) -> float:
    """AA = mean_j R[T-1][j] over the tasks seen by the end."""
    t = _check(matrix)
    last = matrix[t - 1][:t]
    return float(sum(last) / t)


def backward_transfer(matrix: Matrix) -> float:
    """BWT = mean_{j < T-1} (R[T-1][j] - R[j][j]); 0.0 for a single task. Negative means forgetting."""
    t = _check(matrix)
    if t == 1:
        return 0.0
    return float(sum(matrix[t - 1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1))


def forward_transfer(matrix: Matrix, baseline: Sequence[float]) -> float | None:
    """FWT = mean_{j > 0} (R[j-1][j] - b_j), b_j the score of the untrained model on task j.

    Needs the above-diagonal entries (task j evaluated before it is trained); None if any is missing.
    """
    t = _check(matrix)
    if t == 1:
        return None
    vals = []
    for j in range(1, t):
        row = matrix[j - 1]
        if len(row) <= j or row[j] is None or j >= len(baseline):
            return None
        vals.append(row[j] - baseline[j])
    return float(sum(vals) / len(vals))


def summarize(matrix: Matrix, task_names: Sequence[str] | None = None,
              baseline: Sequence[float] | None = None) -> dict:
    """The `summary.json` / `cl_matrix.json` payload: AA, BWT, (FWT), the matrix, per-task final scores."""
    t = _check(matrix)
    names = list(task_names) if task_names is not None else [f"task_{j}" for j in range(t)]
    out = {
        "AA": average_accuracy(matrix),
        "BWT": backward_transfer(matrix),
        "matrix": [list(row) for row in matrix],
        "tasks": names[:t],
        "final_scores": {names[j]: matrix[t - 1][j] for j in range(t)},
    }
    if baseline is not None:
        out["FWT"] = forward_transfer(matrix, baseline)
    return out
