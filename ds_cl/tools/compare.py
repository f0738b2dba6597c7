"""`ds-cl compare RUN [RUN ...] --out DIR`: one comparison of finished runs (any `ds-cl train` output
folders): final accuracy per task per method, AA / BWT / learnt bars, as `ds-cl benchmark` draws them.

Each run's seed and method are read from its `config.yaml` (which `ds-cl train` writes), not guessed from its
folder name. Runs with one label pool into a row, mean ± std over their seeds: the label is the folder name
without a trailing `_seed<N>` (so `osft_seed0`, `osft_seed1` pool into `osft`, and variants of one method in
folders of their own stay apart), or with `--label-by method` the config's `method.name`. Two runs of one
label and seed are refused. Runs must have the same task names. Writes DIR/comparison.md, comparison.json,
comparison.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ds_cl.tools.benchmark import compare, comparison_json, figure, markdown


def seed_and_method(run: Path) -> tuple[int, str]:
    """The run's `seed` and `method.name`, from the config.yaml ds-cl train wrote into it (ValueError naming it)."""
    from ds_cl.training.config import read_yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run}: no config.yaml (ds-cl train writes the run's config there; compare reads the "
                         "run's seed and method from it)")
    conf = read_yaml(path)  # a YAML error is a ConfigError (a ValueError) naming line and column
    seed = conf.get("seed") if isinstance(conf, dict) else None
    method = (conf.get("method") or {}).get("name") if isinstance(conf, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(method, str):
        raise ValueError(f"{path}: expected an integer seed and a method.name, got seed {seed!r}, method {method!r}")
    return seed, method


def read_runs(runs: list[Path], label_by: str) -> tuple[dict, list[str]]:
    """{(label, seed): summary} and the shared task names; ValueError naming the run that does not fit."""
    summaries, tasks = {}, None
    for run in runs:
        summ_path = run / "summary.json"
        if not summ_path.is_file():
            raise ValueError(f"{run}: no summary.json (not a ds-cl run folder, or it has not finished a task)")
        summ = json.loads(summ_path.read_text())
        if not summ.get("complete"):
            raise ValueError(f"{run}: the run is not complete (summary.json complete: false); finish it with "
                             f"--resume, or leave it out")
        names = json.loads((run / "cl_matrix.json").read_text())["tasks"]
        # Another order of the same tasks is compared task by task (benchmark.compare puts it in this order).
        if tasks is not None and sorted(names) != sorted(tasks):
            raise ValueError(f"{run}: tasks {names} differ from {tasks} of the runs before it")
        tasks = tasks or names
        # The folder name only labels: a seed taken from it (or counted) could be wrong, and two runs of one
        # seed would then pass for two seeds.
        seed, method = seed_and_method(run)
        label = method if label_by == "method" else re.sub(r"_seed\d+$", "", run.resolve().name)
        if (label, seed) in summaries:
            raise ValueError(f"{run}: a second run of {label!r} with seed {seed} (seeds are read from each run's "
                             "config.yaml)")
        summaries[(label, seed)] = summ
    return summaries, tasks or []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl compare", description=__doc__.split("\n\n")[0])  # a whole paragraph
    p.add_argument("runs", nargs="+", type=Path, help="ds-cl train output folders")
    p.add_argument("--out", type=Path, required=True, help="folder for comparison.md/.json/.png")
    p.add_argument("--label-by", choices=["folder", "method"], default="folder",
                   help="what pools runs into one row: the folder name without its _seed<N> (default; variants "
                        "of one method stay apart), or the method")
    p.add_argument("--title", default=None, help="the figure's title (default: the task sequence)")
    args = p.parse_args(argv)
    try:
        summaries, tasks = read_runs(args.runs, args.label_by)
    except (ValueError, OSError, KeyError) as e:
        print(f"ds-cl compare: {e}", file=sys.stderr)
        return 2
    table = compare(summaries, tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(markdown(table, tasks))
    (args.out / "comparison.json").write_text(json.dumps(comparison_json(table, tasks), indent=1))
    figure(table, tasks, args.out / "comparison.png",
           args.title or f"{' -> '.join(tasks)}; mean ± std over seeds")
    print(markdown(table, tasks) + f"\n{args.out}/comparison.md, comparison.json, comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
