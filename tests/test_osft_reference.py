"""`method.osft.protect_update_from` on 2 real ZeRO-3 CPU ranks: a model made from a reference by a known
low-rank update (as an alignment makes a chat model from its base) is trained one task with osft, and the
task's update leaves that known update's directions untouched, on both sides, in every target matrix."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_utils import TRAIN, launch
from tests.fixtures import TINY_LLAMA, tiny_run_config, train_sentencepiece, write_run_config

pytestmark = pytest.mark.distributed

RANK = 2  # of the known update in each target matrix


def targets(sd):
    return [n for n in sd if ".layers." in n and n.endswith("proj.weight")]


@pytest.mark.parametrize("first_fit", [True, False], ids=["with-first-fit", "reference-only-frozen"])
def test_the_update_that_made_the_starting_model_is_protected(tmp_path, first_fit):
    """with-first-fit: the weights' top quarter fitted, then the reference update added on top.
    reference-only-frozen: no first fit (`fit_before_first_task: false`), the reference update alone
    constrains task 0, with the non-target parameters frozen (`non_target_lr_scale: 0`): task 0 counts as
    constrained, so they must not move (before the fix, no first fit meant task 0 ran at full scale)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    train_sentencepiece(tmp_path / "tok.model")
    torch.manual_seed(0)
    kw = dict(TINY_LLAMA)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    ref.save_pretrained(tmp_path / "ref")
    # The starting model: the reference plus a rank-2 update of each target, as large as its weights'
    # smaller singular values (an alignment's update is small next to what pre-training wrote).
    deltas = {}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in targets(dict(ref.named_parameters())):
                m, k = p.shape
                d = torch.randn(m, RANK) @ torch.randn(RANK, k)
                deltas[n] = d * (0.3 * torch.linalg.svdvals(p)[-1] / torch.linalg.matrix_norm(d, 2))
                p.add_(deltas[n])
    ref.save_pretrained(tmp_path / "start")
    assert len(deltas) == 14  # 7 per decoder layer, 2 layers

    out = tmp_path / "out"
    cfg = tiny_run_config(tmp_path, out, {
        "model": {"name_or_path": str(tmp_path / "start"), "tokenizer": str(tmp_path / "tok.model"),
                  "dtype": "float32"},
        "method": {"name": "osft", "osft": {"rank": "fixed", "ratio": 0.25,
                                            "protect_update_from": str(tmp_path / "ref"),
                                            **({} if first_fit else {"fit_before_first_task": False,
                                                                     "non_target_lr_scale": 0.0})}},
        "tasks": tiny_run_config(tmp_path, out)["tasks"][:1]})
    proc = launch(TRAIN, 2, str(write_run_config(cfg)), timeout=600)
    assert f"phase 0: protected the update from {tmp_path / 'ref'}" in proc.stdout, proc.stdout[-3000:]
    # protected.jsonl: the reference's update is an extend before task 0 (after the first fit, if any).
    recs = [json.loads(line) for line in (out / "protected.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["task"], r["event"]) for r in recs] == [(0, "a", "fit")] * first_fit + [(0, "a", "extend")]
    assert recs[-1]["added"] > 0 and recs[-1]["share"] == pytest.approx(0.25 * first_fit + recs[-1]["added"])

    start = load_file(tmp_path / "start" / "model.safetensors")
    final = load_file(out / "task_0_a" / "model.safetensors")
    for n, d in deltas.items():
        u, _, vh = torch.linalg.svd(d.double())
        u, v = u[:, :RANK], vh[:RANK].T
        dw = (final[n] - start[n]).double()
        assert torch.linalg.matrix_norm(dw) > 1e-4, n  # the task did train this matrix
        # The known update's output and input directions: untouched, up to the 1 % of its squared norm
        # that `update_energy: 0.99` leaves unprotected (measured: <= 3e-4 here, ~1e-7 in most matrices).
        assert torch.linalg.matrix_norm(u.T @ dw) <= 1e-3 * torch.linalg.matrix_norm(dw), n
        assert torch.linalg.matrix_norm(dw @ v) <= 1e-3 * torch.linalg.matrix_norm(dw), n
        # ... which the fit of the weights' own top quarter of directions alone would not have kept.
        top = torch.linalg.svd(start[n].double())[0][:, : min(d.shape) // 4]
        assert torch.linalg.matrix_norm(u - top @ (top.T @ u)) > 0.5 * torch.linalg.matrix_norm(u), n
    if not first_fit:  # frozen while constrained: embeddings and norms are exactly the starting model's
        others = [n for n in start if n not in deltas]
        assert others and all(torch.equal(final[n], start[n]) for n in others), \
            [n for n in others if not torch.equal(final[n], start[n])]
