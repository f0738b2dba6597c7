"""Security basics (docs/reliability.md): a whole `ds-cl train` writes nothing outside `output_dir`.

A real run (2 ZeRO-3 CPU ranks, osft, 2 tasks x 3 steps, checkpoints, exports, plots) whose config file,
tokenizer and data are copied into a fresh folder tree that is also the processes' working directory. The
config names every path relative to itself and `output_dir` sits one level down (`runs/out`), so a file
written next to the config, next to the data, into the cwd or next to `output_dir` (e.g. a `.tmp-out`)
shows up. After the run, every new or changed path in the tree must be inside `output_dir`, and the inputs
must be byte for byte as before.

Not covered, on purpose: caches outside the tree that DeepSpeed, torch and Python keep on their own (for
example DeepSpeed's JIT op builds in ~/.cache/torch_extensions, or temporary files of the launcher under
$TMPDIR). They are not ds-cl's outputs and ds-cl does not choose where they go.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dist_utils import cpu_env
from tests.fixtures import FIXTURES, tiny_run_config, train_sentencepiece
from tests.reliability_utils import explain, launch_cmd

pytestmark = pytest.mark.distributed


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: files by (size, mtime_ns, sha256), folders and links by their kind.

    Folder mtimes are left out: creating `runs/out` changes its parent's mtime, which is not a write
    outside output_dir; a new file or folder anywhere is caught by its path."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def test_train_writes_nothing_outside_output_dir(tmp_path):
    tree = tmp_path / "tree"
    inputs, configs = tree / "inputs", tree / "configs"
    inputs.mkdir(parents=True)
    configs.mkdir()
    train_sentencepiece(inputs / "tok.model")
    for name in ("task_a.jsonl", "task_b.csv"):
        shutil.copyfile(FIXTURES / name, inputs / name)
    out_rel = "runs/out"
    cfg = tiny_run_config(
        inputs, tree / out_rel,
        {"train": {"max_steps_per_task": 3}, "checkpoint": {"every_steps": 2, "keep": 2},
         "output": {"plots": True, "export_each_task": True}})
    # Every path relative to the config file (ds-cl resolves them against its folder, not the cwd).
    cfg["output_dir"] = f"../{out_rel}"
    cfg["model"]["tokenizer"] = "../inputs/tok.model"
    cfg["tasks"][0]["train"] = "../inputs/task_a.jsonl"
    cfg["tasks"][1]["train"] = "../inputs/task_b.csv"
    config = configs / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))

    before = snapshot(tree)
    assert not any(k.startswith("runs") for k in before)
    env = cpu_env()
    proc = subprocess.run(launch_cmd(config), cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    after = snapshot(tree)

    out = tree / out_rel
    assert (out / "summary.json").is_file() and (out / "task_1_b" / "model.safetensors").is_file(), explain(proc)
    # The inputs (config, tokenizer, data) and everything else that was there are unchanged.
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed == [], f"changed or removed outside output_dir: {changed}"
    new = sorted(k for k in after if k not in before)
    outside = [k for k in new if k != out_rel and not k.startswith(out_rel + os.sep)
               and not out_rel.startswith(k + os.sep)]  # `runs/` itself is output_dir's parent, made for it
    assert outside == [], f"written outside output_dir {out}: {outside}"
