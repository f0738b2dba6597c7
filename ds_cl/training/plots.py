"""The run figures, drawn with matplotlib (Agg, headless; no pyplot, so no global figure state): the
accuracy-matrix heatmap (cl_matrix.png), the training-loss curve (loss.png) and, for osft, the protected
share per layer at each boundary (protected.png)."""

from __future__ import annotations

import math
import os
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas: rendering needs no display and no pyplot
    fig.savefig(path, format="png")


def _labels(n: int, tasks: Sequence[str] | None) -> list[str]:
    return [f"{i}: {tasks[i]}" if tasks is not None and i < len(tasks) else str(i) for i in range(n)]


def heatmap(matrix: Sequence[Sequence[float | None]], path: str | os.PathLike,
            tasks: Sequence[str] | None = None, title: str = "Accuracy matrix (score x 100)") -> Figure:
    """matrix[i][j]: the score (0..1) on task j after training task i; rows may be shorter than the
    widest one (tasks not evaluated yet), those cells and None are grey. Each cell shows score x 100, and
    the colours and the colour bar are on that scale (0-100), so that a cell reads the same on both.
    `tasks`: names for the tick labels (else the task indices)."""
    import numpy as np

    rows = len(matrix)
    cols = max((len(r) for r in matrix), default=0)
    data = np.full((max(rows, 1), max(cols, 1)), np.nan)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = 100 * v
    small = max(rows, cols) <= 6
    cell_w, cell_h, size = (0.9, 0.6, 9) if small else (0.6, 0.4, 7)  # inches, inches, points
    fig = Figure(figsize=(max(4.5, cell_w * cols + 3.0), max(3.5, cell_h * rows + 2.2)), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("#dddddd")  # cells not evaluated
    im = ax.imshow(np.ma.masked_invalid(data), cmap="Blues", vmin=0, vmax=100, aspect="auto")
    fig.colorbar(im, ax=ax, label="score x 100")
    for i in range(rows):
        for j in range(cols):
            if not math.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=size,
                        color="white" if data[i, j] > 55 else "black")
    ax.set_xticks(range(cols), _labels(cols, tasks), rotation=30 if tasks else 0,
                  ha="right" if tasks else "center")
    ax.set_yticks(range(rows), _labels(rows, tasks))
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title)
    _save(fig, path)
    return fig


def _moving_average(y, window: int, ends: Sequence[int]):
    """Trailing mean over up to `window` finite values, restarted after each task end (no smearing
    across a boundary); NaN where the window holds no finite value."""
    import numpy as np

    out = np.full(len(y), np.nan)
    for s, e in zip([0] + list(ends), list(ends) + [len(y)]):
        seg = y[s:e]
        ok = np.isfinite(seg)
        cs = np.concatenate([[0.0], np.cumsum(np.where(ok, seg, 0.0))])
        cn = np.concatenate([[0], np.cumsum(ok)])
        hi = np.arange(1, len(seg) + 1)
        lo = np.maximum(hi - window, 0)
        cnt = cn[hi] - cn[lo]
        out[s:e] = np.where(cnt > 0, (cs[hi] - cs[lo]) / np.maximum(cnt, 1), np.nan)
    return out


def loss_curve(losses: Sequence[float], boundaries: Sequence[int], path: str | os.PathLike,
               tasks: Sequence[str] | None = None, title: str = "Training loss",
               leaks: Sequence[tuple[int, float]] = ()) -> Figure:
    """losses[k]: the mean loss of optimizer step k + 1; boundaries: the global steps at which tasks
    ended (dashed verticals between that step and the next). Non-finite losses leave gaps. Each task's
    steps in their own colour; on long runs a moving average over the raw curve. `tasks`: names over
    each task's span. `leaks`: (step, leak) of osft's audited steps, drawn on a second, log-scale panel."""
    import numpy as np

    leaks = [(int(st), float(v)) for st, v in leaks if v is not None and math.isfinite(v)]
    fig = Figure(figsize=(8.0, 5.6 if leaks else 4.0), dpi=100, layout="constrained")
    if leaks:
        ax, lax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    else:
        ax, lax = fig.add_subplot(), None
    (lax or ax).set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    y = np.array([np.nan if v is None else float(v) for v in losses], dtype=float)
    n = len(y)
    if n == 0:
        ax.text(0.5, 0.5, "no training steps", transform=ax.transAxes, ha="center", va="center")
        _save(fig, path)
        return fig
    x = np.arange(1, n + 1)
    ends = sorted({b for b in boundaries if 0 < b < n})
    window = n // 25
    avg = _moving_average(y, window, ends) if window >= 2 else None
    spans = list(zip([0] + ends, ends + [n]))
    for k, (s, e) in enumerate(spans):  # one colour per task
        colour = f"C{k % 10}"
        name = tasks[k] if tasks and k < len(tasks) else f"task {k}"
        ax.plot(x[s:e], y[s:e], color=colour, lw=1.0, alpha=0.35 if avg is not None else 1.0,
                marker="o" if n <= 30 else None, ms=3, label=None if avg is not None else name)
        if avg is not None:
            ax.plot(x[s:e], avg[s:e], color=colour, lw=1.8, label=name)
    for k, b in enumerate(ends):
        for a in (ax, lax) if lax is not None else (ax,):
            a.axvline(b + 0.5, color="0.4", ls="--", lw=1.0, label="task boundary" if k == 0 and a is ax else None)
    if avg is not None:
        ax.text(0.99, 0.97, f"thick: moving average of {window} steps (per task); thin: each step",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3")
    if lax is not None:
        lx, ly = zip(*leaks)
        lax.semilogy(lx, [max(v, 1e-12) for v in ly], "o", color="0.2", ms=3)
        lax.set_ylabel("leak")
        lax.grid(alpha=0.3)
        lax.set_title("osft: share of the update inside the protected subspace (audited steps)", fontsize=8)
    if tasks:  # task names on a top axis, centred over each task's steps
        named = spans[: len(tasks)]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(s + e + 1) / 2 for s, e in named], list(tasks[: len(named)]), fontsize=8)
        top.tick_params(length=0)
    ax.set_xlim(0.5, n + 0.5)
    (lax or ax).xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(fontsize=8, loc="outside lower center", ncols=min(6, len(spans) + 1), frameon=False)
    _save(fig, path)
    return fig


def _layer_order(name: str) -> tuple:
    """Decoder layers by their index (`model.layers.10` after `model.layers.9`), anything else after them."""
    last = name.rsplit(".", 1)[-1]
    return (0, int(last), name) if last.isdigit() else (1, 0, name)


def protected_share(records: Sequence[dict], path: str | os.PathLike,
                    title: str = "Protected share per layer") -> Figure:
    """osft's protected.jsonl records (ds_cl.methods.osft.protected_record): one line per record (a fit or an
    extend, in order, later ones darker), the layers on the x axis (by index; `other` last), each layer's
    mean share of protected directions x 100 on the y axis; the legend names each line's phase, task, event
    (with an extend's kind) and overall share."""
    import matplotlib

    fig = Figure(figsize=(8.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel("protected directions (% of min(m, n))")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    layers = sorted({k for r in records for k in r.get("layers", {})}, key=_layer_order)
    if not layers:
        ax.text(0.5, 0.5, "no subspace fitted yet", transform=ax.transAxes, ha="center", va="center")
        _save(fig, path)
        return fig
    x = range(len(layers))
    cmap = matplotlib.colormaps["viridis"]
    n = len(records)
    for i, r in enumerate(records):
        y = [100 * r["layers"][k] if k in r["layers"] else math.nan for k in layers]
        # `kind`: what an extend protected (records written before it existed have none).
        event = f"{r['event']} ({r['kind']})" if r.get("kind") else r["event"]
        label = f"phase {r['phase']} ({r['task']}) {event}: {100 * r['share']:.1f}%"
        # At most 12 legend entries: the first and last five, the rest unnamed.
        ax.plot(x, y, color=cmap(0.85 * (1 - i / max(n - 1, 1))), lw=1.5, marker="o" if len(layers) <= 40 else None,
                ms=3, label=label if n <= 12 or i < 5 or i >= n - 5 else None)
    labels = [k.rsplit(".", 1)[-1] if _layer_order(k)[0] == 0 else k for k in layers]
    step = max(1, len(layers) // 32)
    ax.set_xticks(list(x)[::step], labels[::step], fontsize=8)
    ax.set_xlabel("layer" + (f" ({layers[0].rsplit('.', 1)[0]}.N)" if _layer_order(layers[0])[0] == 0 else ""))
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return fig
