"""Step speed of the demo's runs with glibc's default malloc and with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(transparent huge pages for ZeRO-3's large host buffers), the setting `ds-cl demo` and `ds-cl benchmark`
launch their ranks with. Each (method, setting) is the demo's own run config (`ds_cl.tools.demo.run_config`)
cut to the first task and 8 optimizer steps, launched as the demo launches it (2 ranks, one thread each),
one after the other; run it on an otherwise idle machine. Prints, per run, the mean tokens/s of steps 3-8
(the first two include start-up effects), the ranks' user and system CPU time, the wall time and the
task's accuracy (the same with both settings: only the memory's backing changes). docs/benchmarks.md.

    make model
    DS_ACCELERATOR=cpu .venv/bin/python docs/scripts/malloc_hugepages.py [--out DIR] [--methods seqft,osft]
"""
import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import yaml

from ds_cl.tools.demo import demo_model, run_config
from ds_cl.tools.local_runs import launch_train

SETTINGS = {"default malloc": "", "glibc.malloc.hugetlb=1": "glibc.malloc.hugetlb=1"}  # "": glibc's defaults

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", type=Path, default=Path("runs/malloc-hugepages"))
p.add_argument("--methods", default="seqft,osft")
p.add_argument("--steps", type=int, default=8)
args = p.parse_args()
args.out = args.out.resolve()  # a run config's relative output_dir is relative to the config file
if args.out.exists():
    raise SystemExit(f"{args.out} exists: give a new --out (each run needs a fresh output folder)")
model = demo_model()
rows = []
for method in args.methods.split(","):
    for label, tunables in SETTINGS.items():
        root = args.out / ("thp" if tunables else "default")  # the demo's layout: root/<method>{,.yaml,.log}
        cfg = run_config(method, root, model)
        cfg["tasks"] = cfg["tasks"][:1]
        cfg["train"]["max_steps_per_task"] = args.steps
        out, path, log = root / method, root / f"{method}.yaml", root / f"{method}.log"
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        os.environ["GLIBC_TUNABLES"] = tunables  # launch_train keeps a value that is already set
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        rc = launch_train(path, 2, log, echo=False)
        wall, after = time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc != 0:
            raise SystemExit(f"{method} with {label} failed (exit {rc}): {log}")
        steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"tokens_per_s"' in line]
        rows.append((method, label, statistics.fmean(s["tokens_per_s"] for s in steps[2:]),
                     after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, wall,
                     100 * json.loads((out / "summary.json").read_text())["AA"]))
        print(f"{method:6s} {label:24s} {rows[-1][2]:6.1f} tokens/s", flush=True)

print(f"\n| method | setting | tokens/s, steps 3-{args.steps} (mean) | user / system CPU | wall | accuracy |")
print("|---|---|---|---|---|---|")
for method, label, tps, user, system, wall, acc in rows:
    base = next(r[2] for r in rows if r[0] == method)
    gain = f" ({tps / base:.2f}x)" if label != "default malloc" else ""
    print(f"| {method} | {label} | {tps:.1f}{gain} | {user:.0f} s / {system:.0f} s | {wall:.1f} s | {acc:.1f} |")
