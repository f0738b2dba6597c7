"""`ds-cl demo [--out DIR] [--seed N]`: the embedded demo. Three knowledge updates we wrote about the same eight
invented people (the city each lives in, the sport each plays, the instrument each plays; each task with
its own answer words; ds_cl/tools/demo_data/), learnt one after the other by SmolLM2-135M-Instruct (a real
pretrained model, materialised offline by `ds-cl model smollm2`) on 2 ZeRO-3 CPU ranks, once with plain
sequential fine-tuning (seqft) and once with osft; prints both accuracy matrices with AA and BWT. About 11
minutes on 2 CPU cores (2026-12-05; 17-25 on 2026-12-02); what it shows and how stable it is over seeds: docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from ds_cl.tools.local_runs import launch_train

DATA = Path(__file__).resolve().parent / "demo_data"
TASKS = [
    # name, instruction (the O-LoRA prompt lists each task's answer words as its options)
    ("city", "Which city does the person live in? Choose one from the option."),
    ("sport", "Which sport does the person play? Choose one from the option."),
    ("instrument", "Which instrument does the person play? Choose one from the option."),
]
METHODS = ("seqft", "osft")
# 80 records per task: 40 held out for evaluation, 40 trained on for 3 epochs (15 optimizer steps of 8). 4
# epochs learnt the later tasks fully under osft too but took 16-25 min with both methods; docs/demo.md.
EPOCHS, EVAL_ITEMS = 3, 40


def run_config(method: str, out: Path, model: Path, seed: int = 0, quick: bool = False) -> dict:
    return {
        "output_dir": str(out / method),
        "seed": seed,
        "deepspeed": {"zero_optimization": {"stage": 3}},
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "method": {"name": method},  # osft with the shipped defaults
        "train": {"lr": 1e-4, "micro_batch_size": 4, "global_batch_size": 8, "max_seq_len": 64,
                  "epochs": EPOCHS, **({"max_steps_per_task": 1} if quick else {})},
        "eval": {"batch_size": 20},
        "checkpoint": {"keep": 1},
        "output": {"export_each_task": False},
        "tasks": [{"name": name, "train": str(DATA / f"{name}.jsonl"), "instruction": instruction,
                   "eval_size": 8 if quick else EVAL_ITEMS}
                  for name, instruction in TASKS],
    }


def demo_model() -> Path:
    """SmolLM2-135M-Instruct's folder, materialised from the installed wheel on first use."""
    from ds_cl.tools.models import materialise

    return materialise("smollm2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl demo", description=__doc__.split("\n\n")[0])  # a whole paragraph
    p.add_argument("--out", default="ds-cl-demo", help="output folder (default ./ds-cl-demo)")
    p.add_argument("--nprocs", type=int, default=2, help="ZeRO-3 ranks (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default seqft,osft)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation seed (default 0)")
    p.add_argument("--quick", action="store_true", help="1 step per task, to check the wiring")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from ds_cl.methods import REGISTRY

    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        print(f"ds-cl demo: unknown method {bad[0]!r}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        model = demo_model()
    except (FileNotFoundError, ImportError) as e:
        print(f"ds-cl demo: the demo's model is not available: {e}\n(`make model` installs it once)",
              file=sys.stderr)
        return 2
    print(f"ds-cl demo: {model.name} on 3 tasks ({', '.join(n for n, _ in TASKS)}), methods "
          f"{', '.join(methods)}, seed {args.seed}, {args.nprocs} ZeRO-3 ranks; outputs in {out}", flush=True)
    results = {}
    for method in methods:
        if (out / method / "config.yaml").exists():
            # A demo run is ours to replace; `ds-cl train` itself refuses to start over an existing run.
            print(f"replacing the previous demo run in {out / method}", flush=True)
            shutil.rmtree(out / method)
        cfg_path = out / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(run_config(method, out, model, args.seed, args.quick), sort_keys=False))
        print(f"== {method}", flush=True)
        t = time.time()
        rc = launch_train(cfg_path, args.nprocs, out / f"{method}.log")
        if rc != 0:
            print(f"ds-cl demo: {method} failed (exit {rc}); see {out / (method + '.log')}", file=sys.stderr)
            return rc
        results[method] = json.loads((out / method / "summary.json").read_text())
        results[method]["wall_s"] = round(time.time() - t, 1)
    from ds_cl.training.outputs import format_matrix

    names = [n for n, _ in TASKS]
    print("\nAccuracy (%) on each task (columns) after training each task (rows):")
    for method, s in results.items():
        print(f"\n{method}: AA={100 * s['AA']:.1f}  BWT={100 * s['BWT']:+.1f}  ({s['wall_s']:.0f}s)")
        print(format_matrix(s["matrix"], names))
    with open(out / "demo_summary.json", "w") as f:
        json.dump({"seed": args.seed, "model": str(model),
                   **{m: {k: s[k] for k in ("AA", "BWT", "matrix", "wall_s")} for m, s in results.items()}}, f,
                  indent=1)
    print(f"\nOutputs: {out}/<method>/summary.json, cl_matrix.json, cl_matrix.png, loss.png, metrics.jsonl;"
          f" logs {out}/<method>.log; total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
