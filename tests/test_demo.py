"""`ds-cl demo --quick`: the embedded demo's wiring end to end on the real model (SmolLM2-135M-Instruct,
`make model`): osft on 2 ZeRO-3 ranks, the printed matrices, the per-method outputs. The full
demo's numbers are in docs/demo.md; its contrast over three seeds: tests/test_demo_seeds.py (slow)."""

import json
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env

pytestmark = pytest.mark.distributed


def test_demo_quick_runs_osft_and_reports(tmp_path):
    # osft alone: its run has every phase seqft's has plus the fit, the boundary extends and the audit. Both
    # methods side by side, with the contrast, over three seeds: tests/test_demo_seeds.py (slow).
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ds_cl.cli", "demo", "--quick", "--methods", "osft", "--out", str(out)],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summ = json.loads((out / "osft" / "summary.json").read_text())
    assert [len(r) for r in summ["matrix"]] == [1, 2, 3] and summ["complete"]
    assert (out / "osft" / "cl_matrix.json").is_file() and (out / "osft" / "cl_matrix.png").is_file()
    assert "osft: AA=" in proc.stdout and not (out / "seqft").exists()
    demo = json.loads((out / "demo_summary.json").read_text())
    assert set(demo) == {"seed", "model", "osft"} and demo["seed"] == 0
    assert "SmolLM2-135M-Instruct" in demo["model"] and "city" in proc.stdout and str(out) in proc.stdout
    # The osft run really was constrained: the audited steps after the first task have a tiny leak.
    recs = [json.loads(line) for line in (out / "osft" / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in recs if r["phase"] > 0 and "leak" in r]
    assert later and all(r["leak"] < 1e-4 for r in later)


def test_demo_rejects_unknown_method(tmp_path):
    from ds_cl.tools.demo import main

    assert main(["--methods", "lora", "--out", str(tmp_path)]) == 2
