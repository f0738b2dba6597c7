"""`ds-cl benchmark CONFIG --data ROOT [--methods ...] [--seeds ...] [--out DIR]`: one task sequence, several
methods and seeds, one comparison table.

CONFIG is a run config whose relative task paths are relative to `--data`: folders of the continual-learning
benchmark's layout (e.g. `train: SC/SST-2`) or any task file (e.g. `train: city.jsonl`); each (method, seed)
run gets its own output folder under --out, run one after another with `ds-cl train` on local ranks. Besides
the method names, `--methods` takes the labels of variants defined in CONFIG's `variants:` section, each a
fragment merged into the run config (e.g. `osft-paper: {method: {name: osft, osft: {subspace: refit}}}`):
an ablation is one benchmark. A run already complete there is read, not redone, so
an interrupted benchmark continues where it stopped. Then:

    DIR/comparison.md     per method: final accuracy per task, AA, BWT, mean of the matrix diagonal
                          (how well each task was learnt when it was trained), mean +- std over seeds; with
                          eval.tuning_size, the tuning AA too (records held out of train: the column an
                          lr sweep selects by, the others scoring the test items); for each pair of methods
                          with two or more common seeds, the AA difference seed by seed and a sign test
    DIR/comparison.json   the same numbers and every run's matrix
    DIR/comparison.png    final accuracy per task and AA/BWT per method, with the spread over seeds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from ds_cl.tools.local_runs import launch_train


def merged(base: dict, fragment: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in fragment.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def run_configs(base: dict, data: Path, methods: list[str], seeds: list[int], out: Path,
                variants: dict | None = None) -> dict:
    """(label, seed) -> run config: the base (merged with the label's variant, if it names one) with method,
    seed, output_dir and task folders filled."""
    runs, variants = {}, variants or {}
    for method in methods:
        for seed in seeds:
            if method in variants:
                cfg = merged(base, variants[method])
            else:
                cfg = copy.deepcopy(base)
                cfg.setdefault("method", {})["name"] = method
            cfg["seed"] = seed
            cfg["output_dir"] = str(out / f"{method}_seed{seed}")
            for task in cfg.get("tasks", []):
                if not Path(task["train"]).is_absolute():
                    task["train"] = str(data / task["train"])
            runs[(method, seed)] = cfg
    return runs


def checked_run_configs(base: dict, data: Path, methods: list[str], seeds: list[int], out: Path,
                        overrides: list[str] = (), source: str = "CONFIG", edit=None) -> dict:
    """run_configs for the labels in `methods` (method names, or variants in base's `variants:` section) with
    `overrides` applied, then `edit(run_config)` if given (a caller's own substitutions, e.g. ds-cl retention's
    alignment data), each validated as `ds-cl train` validates its config; raises ConfigError naming the
    first problem. Writes nothing, so a benchmark fails on bad input before its first run or output."""
    from ds_cl.methods import REGISTRY
    from ds_cl.training.config import ConfigError, apply_override, load_config

    base = dict(base)
    variants = base.pop("variants", None) or {}
    bad = [m for m in methods if m not in REGISTRY and m not in variants]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r} (methods: {', '.join(REGISTRY)}; variants in {source}: "
                          f"{', '.join(variants) or 'none'})")
    odd = [k for k, v in variants.items() if not isinstance(v, dict) or "name" not in (v.get("method") or {})]
    if odd:
        raise ConfigError(f"variant {odd[0]!r} in {source} must be a config fragment that sets method.name")
    runs = run_configs(base, data, methods, seeds, out, variants)
    for item in overrides:
        for cfg in runs.values():
            apply_override(cfg, item)
    for cfg in runs.values():
        if edit is not None:
            edit(cfg)
        load_config(None, data=cfg)
    return runs


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _order(summary: dict, tasks: list[str] | None) -> list[str] | None:
    """The run's task order where it trained the same tasks as `tasks` in another order (a variant's second
    order), else None."""
    names = summary.get("tasks")
    return names if tasks and names and sorted(names) == sorted(tasks) and names != list(tasks) else None


def _final_row(summary: dict, tasks: list[str] | None) -> list[float]:
    """The run's accuracies after its last task, in `tasks`' order (by name where it trained them in another)."""
    last = summary["matrix"][-1]
    return [last[summary["tasks"].index(t)] for t in tasks] if _order(summary, tasks) else last


def compare(summaries: dict, tasks: list[str] | None = None) -> dict:
    """summaries: (method, seed) -> summary.json of a complete run. Per method, mean and std over seeds; where
    every run of a method has a tuning split (eval.tuning_size), its `tuning_AA` and `tuning_matrices` too.
    A method that trained `tasks` in another order has its final accuracies put in `tasks`' order (by name, so
    a column is one task for every method) and that order under `order`."""
    from ds_cl.evaluation.cl_metrics import average_accuracy

    table = {}
    for method in dict.fromkeys(m for m, _ in summaries):
        runs = [s for (m, _), s in summaries.items() if m == method]
        order = _order(runs[0], tasks)
        final = list(zip(*[_final_row(s, tasks) for s in runs]))
        diag = [statistics.fmean(s["matrix"][i][i] for i in range(len(s["matrix"]))) for s in runs]
        table[method] = {
            "seeds": [seed for (m, seed) in summaries if m == method],
            "final": [_mean_std([100 * v for v in col]) for col in final],
            "AA": _mean_std([100 * s["AA"] for s in runs]),
            "BWT": _mean_std([100 * s["BWT"] for s in runs]),
            "learnt": _mean_std([100 * v for v in diag]),
            "matrices": [s["matrix"] for s in runs],
        }
        if order:
            table[method]["order"] = order
        if all(s.get("tuning_matrix") for s in runs):
            table[method]["tuning_AA"] = _mean_std([100 * average_accuracy(s["tuning_matrix"]) for s in runs])
            table[method]["tuning_matrices"] = [s["tuning_matrix"] for s in runs]
    return table


def paired_seeds(table: dict) -> list[dict]:
    """For each pair of methods (in the table's order) run with at least two common seeds: the AA difference
    seed by seed (the first method's minus the second's; both runs of a seed share its data order and held-out
    split, so the seed is the unit of pairing) and the exact sign test on them: how often the first method is
    ahead, and how likely that many wins are if neither method is better."""
    from ds_cl.evaluation.cl_metrics import average_accuracy
    from ds_cl.evaluation.stats import sign_test

    aa = {m: {s: 100 * average_accuracy(mat) for s, mat in zip(r["seeds"], r["matrices"])} for m, r in table.items()}
    out = []
    methods = list(table)
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            seeds = [s for s in aa[a] if s in aa[b]]
            if len(seeds) < 2:
                continue
            diffs = [aa[a][s] - aa[b][s] for s in seeds]
            out.append({"a": a, "b": b, "seeds": seeds, "AA_diffs": diffs,
                        "mean_diff": statistics.fmean(diffs), **sign_test(diffs)})
    return out


def paired_markdown(pairs: list[dict]) -> str:
    if not pairs:
        return ""
    lines = ["", "AA paired by seed (A minus B; sign test: seeds A is ahead / behind, two-sided exact p):", "",
             "| A | B | seeds | AA difference per seed | mean | A ahead / behind / tied | sign test p |",
             "|---|---|---|---|---|---|---|"]
    for r in pairs:
        lines.append(f"| `{r['a']}` | `{r['b']}` | {','.join(map(str, r['seeds']))} | "
                     f"{', '.join(f'{d:+.1f}' for d in r['AA_diffs'])} | {r['mean_diff']:+.1f} | "
                     f"{r['wins']} / {r['losses']} / {r['ties']} | {r['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


TUNING_NOTE = ("The `tuning AA` column scores records held out of each task's training data (eval.tuning_size): "
               "pick each method's learning rate by it. Every other column scores the test items.")


def comparison_json(table: dict, tasks: list[str]) -> dict:
    """comparison.json: the tasks and the table; with a tuning split, the note saying which column selects."""
    out = {"tasks": tasks, "methods": table, "paired_by_seed": paired_seeds(table)}
    if any("tuning_AA" in r for r in table.values()):
        out["note"] = TUNING_NOTE
    return out


def markdown(table: dict, tasks: list[str]) -> str:
    def cell(ms):
        return f"{ms[0]:.1f} ± {ms[1]:.1f}"

    tuning = any("tuning_AA" in r for r in table.values())
    head = ["method", *tasks, "AA", *(["tuning AA"] if tuning else []), "BWT", "learnt (diag.)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in table.items():
        tuning_cell = [cell(r["tuning_AA"]) if "tuning_AA" in r else "–"] if tuning else []
        name = f"`{method}`" + (f" ({' -> '.join(r['order'])})" if r.get("order") else "")
        lines.append("| " + " | ".join([name, *map(cell, r["final"]), cell(r["AA"]), *tuning_cell,
                                        cell(r["BWT"]), cell(r["learnt"]), ",".join(map(str, r["seeds"]))]) + " |")
    return "\n".join(lines) + "\n" + (f"\n{TUNING_NOTE}\n" if tuning else "") + paired_markdown(paired_seeds(table))


def figure(table: dict, tasks: list[str], path: Path, title: str) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[max(2, len(tasks)), 3])
    methods = list(table)
    w = 0.8 / len(methods)
    for k, m in enumerate(methods):
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * w
        left.bar(x, [v for v, _ in table[m]["final"]], w, yerr=[s for _, s in table[m]["final"]], label=m, capsize=2)
        x = np.arange(3) + (k - (len(methods) - 1) / 2) * w
        vals = [table[m][key] for key in ("AA", "BWT", "learnt")]
        n = len(table[m]["seeds"])  # methods may have different seed counts; one seed has no spread
        right.bar(x, [v for v, _ in vals], w, yerr=[s for _, s in vals], capsize=2,
                  label=f"{m} ({n} seed{'s' if n != 1 else ''})")
    left.set_xticks(range(len(tasks)), tasks)
    left.set_ylabel("accuracy after the last task (%)")
    left.set_ylim(0, 100)
    left.set_title("final accuracy per task")
    right.set_xticks(range(3), ["AA", "BWT", "learnt (diag.)"])
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel("points")
    right.set_title("summary (mean ± std over seeds)")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl benchmark", description=__doc__.split("\n\n")[0])  # a whole paragraph
    p.add_argument("config", type=Path, help="base run config (tasks relative to --data)")
    p.add_argument("--data", type=Path, required=True,
                   help="root of the task paths (the benchmark's <group>/<task>/ folders, or task files)")
    p.add_argument("--methods", default="seqft,osft", help="comma-separated (default seqft,osft)")
    p.add_argument("--seeds", default="0,1", help="comma-separated (default 0,1)")
    p.add_argument("--out", type=Path, default=Path("ds-cl-benchmark"),
                   help="folder of the runs (<label>_seed<N>/) and the comparison (default ./ds-cl-benchmark)")
    p.add_argument("--nprocs", type=int, default=2, help="ranks per run (default 2)")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: the table from the complete runs under --out, naming the missing ones")
    # default=[]: else argparse calls the optional overrides required when the config is missing.
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value applied to every run config")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    methods = [m for m in args.methods.split(",") if m]
    from ds_cl.training.config import ConfigError, read_yaml

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        base = read_yaml(args.config)  # duplicate keys refused, as for a run config
    except (ValueError, OSError, yaml.YAMLError) as e:  # ConfigError is a ValueError
        print(f"ds-cl benchmark: {e}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    try:  # every run config checked before the first run starts or anything is written
        runs = checked_run_configs(base, args.data.resolve(), methods, seeds, out, args.overrides, str(args.config))
    except ConfigError as e:
        print(f"ds-cl benchmark: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for (method, seed), cfg in runs.items():
        run_dir = Path(cfg["output_dir"])
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("complete"):
            print(f"== {method} seed {seed}: complete in {run_dir}, read", flush=True)
        elif args.report_only:
            print(f"== {method} seed {seed}: not complete in {run_dir}, left out", flush=True)
            continue
        else:
            resume = (run_dir / "checkpoints" / "latest").is_file()
            path = out / f"{method}_seed{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            print(f"== {method} seed {seed}{' (resuming)' if resume else ''}", flush=True)
            t = time.time()
            rc = launch_train(path, args.nprocs, out / f"{method}_seed{seed}.log", resume=resume)
            if rc != 0:
                print(f"ds-cl benchmark: {method} seed {seed} failed (exit {rc}); see "
                      f"{out / f'{method}_seed{seed}.log'}; rerun the same command to continue", file=sys.stderr)
                return rc
            print(f"   {time.time() - t:.0f}s", flush=True)
        summaries[(method, seed)] = json.loads(summary.read_text())
    tasks = [t["name"] for t in base["tasks"]]
    if not summaries:
        print(f"ds-cl benchmark: no complete run under {out}", file=sys.stderr)
        return 1
    table = compare(summaries, tasks)
    (out / "comparison.md").write_text(markdown(table, tasks))
    (out / "comparison.json").write_text(json.dumps(comparison_json(table, tasks), indent=1))
    figure(table, tasks, out / "comparison.png", f"{' -> '.join(tasks)}; mean ± std over seeds")
    print("\n" + markdown(table, tasks) + f"\n{out}/comparison.md, comparison.json, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
