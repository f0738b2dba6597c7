"""Model construction under deepspeed.zero.Init on 2 real CPU ranks, from a config and from a folder.

transformers imports model code lazily; done for the first time inside zero.Init (which patches
torch.Tensor.__new__) it failed with transformers 5.24 (torch._dynamo's polyfill check). This runs in
fresh rank processes, the situation of `ds-cl train`, `ds-cl bench` and the demo.
"""

import json

import pytest
import torch

from tests.dist_utils import REPO, launch
from tests.fixtures import TINY_LLAMA

pytestmark = pytest.mark.distributed


def test_tiny_llama_builds_partitioned_under_zero_init(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(TINY_LLAMA)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc)).save_pretrained(
        tmp_path / "tiny")
    launch(REPO / "tests" / "zero_init_ranks.py", 2, str(tmp_path / "tiny"), str(tmp_path / "r.json"), timeout=300)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world"] == 2 and r["partitioned"] and r["loaded_partitioned"], r
    # float32 asked, float32 held (deepspeed's zero.Init turned a given float32 into bfloat16 on CPUs
    # without fp16 support).
    assert r["dtypes"] == r["loaded_dtypes"] == ["torch.float32"], r
    assert r["n_params"] > 30_000  # the whole tiny LLaMA, not an empty shell
    assert r["n_compared"] >= 20 and r["max_diff_vs_file"] == 0.0, r
