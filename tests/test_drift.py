"""`ds-cl drift`: putting a parameter group back to the reference's values removes exactly that group's part
of the drift, on a real (tiny) Llama and real files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ds_cl.tools import drift as D
from tests.test_eval_generate import make_tiny_model


def _answers(d: Path) -> Path:
    d.mkdir(parents=True)
    rows = [{"prompt": f"Write a note about item {i}.", "response": f"Here is a short note about item {i}."}
            for i in range(5)]
    (d / "responses_ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per = [{"id": f"h{i}", "prompt": f"How do I break lock {i}?", "response": "I'm sorry, I can't help with that.",
            "verdict": "refusal" if i % 2 == 0 else "complied"} for i in range(4)]
    (d / "safety.json").write_text(json.dumps({"per_prompt": per}))
    return d


def test_putting_a_group_back_removes_its_drift(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ref = make_tiny_model(tmp_path / "ref")
    moved = tmp_path / "moved"
    m = AutoModelForCausalLM.from_pretrained(ref)
    with torch.no_grad():  # a drift in the norms only
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(1.5)
    m.save_pretrained(moved)
    for f in ref.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            (moved / f.name).write_bytes(f.read_bytes())
    answers = _answers(tmp_path / "eval")
    out = tmp_path / "drift.json"
    assert D.main([str(ref), str(moved), "--answers", str(answers), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prompts"] == {"ifeval": 5, "refusal": 2}
    rows = {r["variant"]: r for r in res["rows"]}
    keys = ("eos_inside", "eos_early", "ifeval_nll", "refusal_nll", "refusal_eos_early")
    assert any(abs(rows["as trained"][k] - rows["reference"][k]) > 1e-4 for k in keys)
    for k in keys:  # the norms carried all of it: putting them back is the reference, the others change nothing
        assert abs(rows["norms put back"][k] - rows["reference"][k]) < 1e-5
        assert abs(rows["non-targets put back"][k] - rows["reference"][k]) < 1e-5
        assert abs(rows["targets put back"][k] - rows["as trained"][k]) < 1e-5
        assert abs(rows["embeddings put back"][k] - rows["as trained"][k]) < 1e-5
    assert rows["norms put back"]["update_share_put_back"] == 1.0
    assert rows["targets put back"]["update_share_put_back"] == 0.0
    assert (tmp_path / "drift.md").read_text().startswith("Teacher-forced on the reference's answers (5 IFEval")


def test_bad_input_is_one_line(tmp_path, capsys):
    ref = make_tiny_model(tmp_path / "ref")
    assert D.main([str(ref), str(tmp_path / "nope"), "--answers", str(tmp_path)]) == 2
    assert "nope: not a model folder (no config.json)" in capsys.readouterr().err
    assert D.main([str(ref), str(ref), "--answers", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no responses_ifeval.jsonl (a `ds-cl eval` folder of the reference)" in err and len(err.splitlines()) == 1
