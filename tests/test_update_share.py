"""`ds-cl update-share` on real safetensors folders of a tiny Llama: an update built inside the first fit's
protected directions reads as protected, one built in their complement as not, and one in the embeddings
as outside the targets; the numbers of directions to add follow the update's rank."""

import json

import torch

from ds_cl.tools import update_share
from tests.fixtures import TINY_LLAMA


def tiny(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


def test_update_inside_outside_the_fit_and_outside_the_targets(tmp_path, capsys):
    from ds_cl.core.subspace import FixedRank

    model = tiny(tmp_path)
    model.save_pretrained(tmp_path / "ref")
    inside, outside = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, where in ((inside, "top"), (outside, "bottom")):
            w = params[name]
            u, s, vh = torch.linalg.svd(w)
            r = FixedRank(0.5).rank(w.shape)
            # rank-2 update on the fit's own top directions, or on two of the complement's, there below the
            # r-th singular value so that they stay in the complement of the new weights' fit
            pick = slice(0, 2) if where == "top" else slice(r + 2, r + 4)
            w.add_((0.5 * s[r - 1] if where == "top" else 0.5 * (s[r - 1] - s[r + 2])) * u[:, pick] @ vh[pick])
        params["model.embed_tokens.weight"].add_(1e-3)
    model.save_pretrained(tmp_path / "new")

    res = update_share.shares(str(tmp_path / "new"), str(tmp_path / "ref"), ratio=0.5, energy=0.99, log=None)
    rows = {r["name"]: r for r in res["per_matrix"]}
    assert res["targets"] == 14 and len(rows) == 14
    assert rows[inside]["protected_by_fit"] > 0.999 and rows[inside]["directions_to_add"] == 0
    assert rows[outside]["protected_by_fit"] < 1e-3 and rows[outside]["directions_to_add"] == 2
    untouched = [r for n, r in rows.items() if n not in (inside, outside)]
    assert all(r["update_sq"] == 0 for r in untouched)
    assert 0 < res["outside_targets"] < 1  # the embeddings' update
    assert res["per_type"]["up_proj"]["protected_by_fit"] > 0.999

    rc = update_share.main([str(tmp_path / "new"), "--reference", str(tmp_path / "ref"), "--json",
                            str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "| up_proj | 100.0 % |" in out and "| o_proj | 0.0 % |" in out, out
    assert json.loads((tmp_path / "r.json").read_text())["targets"] == 14
    assert update_share.main([str(tmp_path / "new"), "--reference", str(tmp_path / "nope")]) == 2
