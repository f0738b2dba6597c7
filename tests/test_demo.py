"""`ds-cl demo --quick`: the embedded demo's wiring end to end on the real model (SmolLM2-135M-Instruct,
`make model`): both methods on 2 ZeRO-3 ranks, the printed matrices, the per-method outputs. The full
demo's numbers are in docs/demo.md; its contrast over three seeds: tests/test_demo_seeds.py (slow)."""

import json
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env

pytestmark = pytest.mark.distributed


def test_demo_quick_runs_both_methods_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for method in ("seqft", "osft"):
        summ = json.loads((out / method / "summary.json").read_text())
        assert [len(r) for r in summ["matrix"]] == [1, 2, 3] and summ["complete"]
        assert (out / method / "cl_matrix.json").is_file() and (out / method / "cl_matrix.png").is_file()
        assert f"{method}: AA=" in proc.stdout
    demo = json.loads((out / "demo_summary.json").read_text())
    assert set(demo) == {"seed", "model", "seqft", "osft"} and demo["seed"] == 0
    assert "SmolLM2-135M-Instruct" in demo["model"] and "city" in proc.stdout and str(out) in proc.stdout
    # The osft run really was constrained: the audited steps after the first task have a tiny leak.
    recs = [json.loads(line) for line in (out / "osft" / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in recs if r["phase"] > 0 and "leak" in r]
    assert later and all(r["leak"] < 1e-4 for r in later)


def test_demo_rejects_unknown_method(tmp_path):
    from ds_cl.tools.demo import main

    assert main(["--methods", "lora", "--out", str(tmp_path)]) == 2
