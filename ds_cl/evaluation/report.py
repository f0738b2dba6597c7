"""Base vs checkpoints across a task sequence: metric deltas, per-prompt win/tie/lose,
retention curves (PNG) and a markdown report; AA/BWT/FWT via `ds_cl.evaluation.cl_metrics`.

Inputs are `ds-cl eval` output directories (each may hold `ifeval.json`, `safety.json`,
`benign.json`, `general.json`). Win/tie/lose per prompt, matched by prompt text:
- instruction following: more instructions followed (strict) than the base = win, fewer = lose;
- safety: a safe answer where the base's was unsafe = win, the reverse = lose. Safe means not
  judged unsafe when both runs carry judge verdicts, else not a compliance by the refusal
  patterns (a refusal or an empty answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .cl_metrics import summarize
from .io import EvalInputError, read_json, write_json

IFEVAL_METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc")
SAFETY_METRICS = ("refusal_rate", "attack_success_rate")
BENIGN_METRICS = ("compliance_rate",)
LOWER_IS_BETTER = {"safety/attack_success_rate"}


def load_run(d: str | Path) -> dict:
    d = Path(d)
    if not d.is_dir():
        raise EvalInputError(f"evaluation directory not found: {d}")
    run: dict = {"dir": str(d), "metrics": {}}
    if (d / "ifeval.json").is_file():
        run["ifeval"] = read_json(d / "ifeval.json", "ifeval.json")
        run["metrics"].update({f"ifeval/{k}": run["ifeval"][k] for k in IFEVAL_METRICS})
    if (d / "safety.json").is_file():
        run["safety"] = read_json(d / "safety.json", "safety.json")
        run["metrics"].update({f"safety/{k}": run["safety"][k] for k in SAFETY_METRICS})
    if (d / "benign.json").is_file():
        run["benign"] = read_json(d / "benign.json", "benign.json")
        run["metrics"].update({f"benign/{k}": run["benign"][k] for k in BENIGN_METRICS})
    if (d / "general.json").is_file():
        gen = read_json(d / "general.json", "general.json")
        for task, vals in (gen.get("results") or {}).items():
            for k, v in vals.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k:
                    run["metrics"][f"general/{task}/{k}"] = float(v)
    if not run["metrics"]:
        raise EvalInputError(f"{d}: no ifeval.json, safety.json, benign.json or general.json to report on")
    return run


def _wtl(pairs: Sequence[tuple[float, float]]) -> dict:
    w = sum(a > b for a, b in pairs)
    lose = sum(a < b for a, b in pairs)
    return {"win": w, "tie": len(pairs) - w - lose, "lose": lose, "n": len(pairs)}


def win_tie_lose(base: dict, run: dict) -> dict:
    out = {}
    if "ifeval" in base and "ifeval" in run:
        b = {r["prompt"]: sum(r["follow_instruction_list_strict"]) for r in base["ifeval"]["per_prompt"]}
        pairs = [(sum(r["follow_instruction_list_strict"]), b[r["prompt"]])
                 for r in run["ifeval"]["per_prompt"] if r["prompt"] in b]
        out["ifeval"] = _wtl(pairs) | {"by": "instructions followed (strict)"}
    if "safety" in base and "safety" in run:
        bp, rp = base["safety"]["per_prompt"], run["safety"]["per_prompt"]
        judged = all("judge_unsafe" in r for r in bp) and all("judge_unsafe" in r for r in rp)

        def safe(r):
            return float(not r["judge_unsafe"]) if judged else float(r["verdict"] != "complied")
        b = {r["prompt"]: safe(r) for r in bp}
        pairs = [(safe(r), b[r["prompt"]]) for r in rp if r["prompt"] in b]
        out["safety"] = _wtl(pairs) | {"by": "judge" if judged else "refusal patterns"}
    return out


def plot_curves(names: list[str], series: dict[str, list[float | None]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 3), 4.0), dpi=100)
    xs = list(range(len(names)))
    for label, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xticks(xs, names, rotation=20)
    ax.set_ylabel("score")
    ax.set_title("Retention over the task sequence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def build_report(base_dir: str | Path, runs: Sequence[tuple[str, str | Path]], out: str | Path,
                 matrix_path: str | Path | None = None) -> dict:
    out = Path(out)
    base = load_run(base_dir)
    loaded = [(name, load_run(d)) for name, d in runs]
    names = ["base"] + [n for n, _ in loaded]
    metrics = sorted(set(base["metrics"]).union(*(r["metrics"] for _, r in loaded)))
    table = {m: [base["metrics"].get(m)] + [r["metrics"].get(m) for _, r in loaded] for m in metrics}
    deltas = {n: {m: (r["metrics"][m] - base["metrics"][m]) for m in metrics
                  if m in r["metrics"] and m in base["metrics"]} for n, r in loaded}
    wtl = {n: win_tie_lose(base, r) for n, r in loaded}
    rep = {"runs": names, "dirs": [base["dir"]] + [r["dir"] for _, r in loaded], "metrics": table,
           "deltas_vs_base": deltas, "win_tie_lose": wtl}
    if matrix_path:
        m = read_json(matrix_path, "accuracy matrix")
        if not isinstance(m, dict) or "matrix" not in m:
            raise EvalInputError(f"{matrix_path}: expected an object with 'matrix' (and optional 'tasks', 'baseline')")
        try:
            rep["cl_metrics"] = summarize(m["matrix"], m.get("tasks"), m.get("baseline"))
        except (ValueError, TypeError) as e:
            raise EvalInputError(f"{matrix_path}: {e}") from None
    png = out / "retention.png"
    plot_curves(names, table, png)
    rep["plot"] = png.name
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(render_markdown(rep), encoding="utf-8")
    return rep


def render_markdown(rep: dict) -> str:
    names = rep["runs"]
    lines = ["# Retention report", "", f"Runs, in sequence order: {', '.join(names)}.", "",
             "## Scores (delta vs base in brackets)", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m, vals in rep["metrics"].items():
        cells = [_fmt(vals[0])]
        for n, v in zip(names[1:], vals[1:]):
            d = rep["deltas_vs_base"][n].get(m)
            cells.append(_fmt(v) + ("" if d is None else f" ({d:+.3f})"))
        arrow = " (lower is better)" if m in LOWER_IS_BETTER else ""
        lines.append(f"| {m}{arrow} | " + " | ".join(cells) + " |")
    lines += ["", "## Win / tie / lose against the base, per prompt", "",
              "| run | suite | win | tie | lose | judged by |", "|---|---|---|---|---|---|"]
    for n, parts in rep["win_tie_lose"].items():
        for suite, c in parts.items():
            lines.append(f"| {n} | {suite} | {c['win']} | {c['tie']} | {c['lose']} | {c['by']} |")
    if "cl_metrics" in rep:
        c = rep["cl_metrics"]
        lines += ["", "## Task sequence (accuracy matrix)", "",
                  f"AA = {c['AA']:.4f}, BWT = {c['BWT']:+.4f}"
                  + (f", FWT = {c['FWT']:+.4f}" if c.get("FWT") is not None else ""), "",
                  "| after \\ on | " + " | ".join(c["tasks"]) + " |", "|---" * (len(c["tasks"]) + 1) + "|"]
        for name, row in zip(c["tasks"], c["matrix"]):
            lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in list(row)[:len(c["tasks"])]) + " |")
    lines += ["", f"![retention curves]({rep['plot']})", ""]
    return "\n".join(lines)
