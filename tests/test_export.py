"""HF export (ds_cl/training/export.py) in one process: one file or HF-named shards with a correct index, tied
weights stored once, the folder loads with `from_pretrained` and computes what the model computed."""

import json

import pytest
import torch
from safetensors import safe_open

from ds_cl.training.export import export_hf
from tests.fixtures import TINY_LLAMA


def tiny_model(seed=0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    mc = {**TINY_LLAMA, **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc), dtype=torch.float32)


def stored(folder):
    """{tensor name: (file, bytes)} over every *.safetensors file in folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                assert k not in out, f"{k} in two files"
                out[k] = (f.name, t.numel() * t.element_size())
    return out


def logits(model):
    ids = torch.tensor([[1, 7, 30, 99, 250, 3, 2]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_file_below_the_shard_size(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    out = export_hf(model, tmp_path / "m", dtype="float32")
    assert out == tmp_path / "m" and not (tmp_path / "m.tmp").exists()
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert set(stored(out)) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))


def test_shards_and_index(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    sizes = [p.numel() * 2 for p in model.parameters()]  # bf16
    out = export_hf(model, tmp_path / "m", dtype="bfloat16", shard_bytes=3 * max(sizes) // 2)
    files = stored(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert index["weight_map"] == {k: f for k, (f, _) in files.items()}
    assert index["metadata"]["total_size"] == sum(b for _, b in files.values()) == sum(sizes)
    assert index["metadata"]["total_parameters"] == sum(p.numel() for p in model.parameters())
    # No shard over the limit unless it holds a single tensor.
    for s in shards:
        held = [b for f, b in files.values() if f == s]
        assert sum(held) <= 3 * max(sizes) // 2 or len(held) == 1
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_are_stored_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for shard_bytes in (4 << 30, 40_000):
        out = export_hf(model, tmp_path / f"m{shard_bytes}", dtype="float32", shard_bytes=shard_bytes)
        files = stored(out)
        assert "model.embed_tokens.weight" in files and "lm_head.weight" not in files
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(logits(loaded), logits(model))
    assert (tmp_path / "m40000" / "model.safetensors.index.json").is_file()


def test_rerun_replaces_the_folder(tmp_path):
    model = tiny_model()
    out = export_hf(model, tmp_path / "m", dtype="float32", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    export_hf(model, out, dtype="float32")  # one file now: no stale shards or index left behind
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_dtype(tmp_path, dtype):
    out = export_hf(tiny_model(), tmp_path / "m", dtype=dtype)
    with safe_open(out / "model.safetensors", "pt") as sf:
        assert {str(sf.get_tensor(k).dtype) for k in sf.keys()} == {f"torch.{dtype}"}
        assert sf.metadata() == {"format": "pt"}
