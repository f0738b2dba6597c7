"""O-LoRA / incremental LoRA (ds_cl/methods/lora.py): the regulariser against hand-computed values, the merged
export against base + adapters, bad input; and a 2-task `ds-cl train` run on 2 real ZeRO-3 CPU ranks
(earlier adapters bitwise unchanged, base frozen, export = base + adapters)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ds_cl.training.config import ConfigError, load_config
from tests.dist_utils import TRAIN, launch
from tests.fixtures import FIXTURES, TINY_LLAMA, tiny_run_config, train_sentencepiece


def lora_cfg(**kw):
    from ds_cl.training.config import LoRAConfig

    return LoRAConfig(**{"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj"], **kw})


def tiny_model(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    mc = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc), dtype=torch.float32)


def adapters_after_task_1(model, lcfg, filled: int):
    """Adapters for 3 tasks on `model`, at task 1 (adapters 0 and 1 active), with random B for the first
    `filled` adapters (B = 0 is their untrained start); returns (adapters, input ids, the model's logits)."""
    from ds_cl.methods.lora import LoRAAdapters

    lora = LoRAAdapters(model, lcfg, n_tasks=3, orthogonal=True, dtype=torch.float32)
    lora.start_task(1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, m in lora.modules:
            for s in range(filled):
                m.lora_pair(s)[1].copy_(torch.randn(m.lora_pair(s)[1].shape, generator=g) * 0.1)
    ids = torch.tensor([[1, 7, 30, 99, 250, 3, 2]])
    model.eval()
    with torch.no_grad():
        return lora, ids, model(input_ids=ids).logits


def forward_loss(model, lora):
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    return lora.add_regularisers(loss)


def test_orthogonality_and_l2_loss_match_hand_computed_values():
    from ds_cl.methods.lora import LoRAAdapters

    model = tiny_model()
    lora = LoRAAdapters(model, lora_cfg(lambda_orth=0.5, lambda_l2=0.25), n_tasks=2, orthogonal=True,
                        dtype=torch.float32)
    assert [n for n, _ in lora.modules] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        for _, m in lora.modules:
            a0, _ = m.lora_pair(0)
            a1, _ = m.lora_pair(1)
            a0.zero_(), a1.zero_()
            a0[0, 0], a0[1, 1] = 1.0, 1.0  # A_0 rows: e0, e1
            a1[0, 0], a1[0, 1], a1[1, 2] = 1.0, 2.0, 3.0  # A_1 rows: (1, 2, 0, ...), (0, 0, 3, ...)
    lora.start_task(1)
    # A_0 A_1^T = [[1, 0], [2, 0]]: squared Frobenius 1 + 4 = 5 per layer, 2 layers -> 10.
    # ||A_1||^2 = 1 + 4 + 9 = 14, ||B_1||^2 = 0 per layer -> 28.
    total, logs = forward_loss(model, lora)
    assert logs["orth_loss"] == pytest.approx(10.0) and logs["l2_loss"] == pytest.approx(28.0)
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 13, 2]])
        task = model(input_ids=ids, labels=ids).loss
    assert float(total.detach()) == pytest.approx(float(task) + 0.5 * 10 + 0.25 * 28, rel=1e-6)
    # The gradient reaches the current A only (d/dA_1 of 0.5 * ||A_0 A_1^T||^2 = A_0^T A_0 A_1 at rows 0, 1)
    total.backward()
    m = lora.modules[0][1]
    assert m.lora_pair(0)[0].grad is None and m.weight.grad is None
    want = 0.5 * 2 * (m.lora_pair(0)[0].T @ m.lora_pair(0)[0] @ m.lora_pair(1)[0].detach().T).T
    want = want + 0.25 * 2 * m.lora_pair(1)[0].detach()
    torch.testing.assert_close(m.lora_pair(1)[0].grad, want, rtol=1e-5, atol=1e-6)
    # The released O-LoRA code's entry-wise L1: |1| + |2| = 3 per layer.
    lora.cfg.orth_norm = "l1"
    _, logs = forward_loss(model, lora)
    assert logs["orth_loss"] == pytest.approx(6.0)


def test_inclora_logs_but_does_not_train_the_orthogonality_term():
    from ds_cl.methods.lora import LoRAAdapters

    model = tiny_model()
    lora = LoRAAdapters(model, lora_cfg(lambda_orth=0.5), n_tasks=2, orthogonal=False, dtype=torch.float32)
    lora.start_task(0)
    total, logs = forward_loss(model, lora)
    assert logs == {}  # first task: no earlier adapter
    lora.start_task(1)
    total, logs = forward_loss(model, lora)
    assert logs["orth_loss"] > 0
    model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert float(total.detach()) == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-6)


def test_merged_export_loads_and_matches_base_plus_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    from ds_cl.training.export import export_hf

    model = tiny_model()
    lora, ids, want = adapters_after_task_1(model, lora_cfg(targets=["q_proj", "v_proj", "down_proj"]), filled=3)
    with torch.no_grad():
        m0 = model.model.layers[0].self_attn.q_proj
        plain = torch.nn.functional.linear(torch.ones(1, 32), m0.weight)
        assert not torch.allclose(m0(torch.ones(1, 32)), plain)  # the adapters do change the output
    export_hf(model, tmp_path / "merged", dtype="float32", tensors=lora.merged_tensors(model))
    sd = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k for k in sd)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert set(sd) == {n for n, _ in loaded.named_parameters()}
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Adapter 2 (not trained yet) is not merged: W + s (B0 A0 + B1 A1) exactly as computed in fp32.
    w = m0.weight + m0.lora_scale * (m0.lora_B_0 @ m0.lora_A_0 + m0.lora_B_1 @ m0.lora_A_1)
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], w.detach(), rtol=1e-6, atol=1e-6)


def test_peft_loads_the_adapter_folder_with_the_same_logits(tmp_path):
    """adapters/task_<i>_<name>/ is a PEFT LoRA folder: PeftModel.from_pretrained(base, folder) on the
    untouched base gives ds-cl's model after task i (adapters 0..i stacked into one LoRA)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_cl.methods.lora import write_peft_adapter

    model = tiny_model()
    model.save_pretrained(tmp_path / "base")  # before the adapters: the frozen base PEFT starts from
    lcfg = lora_cfg(targets=["q_proj", "v_proj", "down_proj"])
    lora, ids, want = adapters_after_task_1(model, lcfg, filled=2)
    tensors = {n: p.detach().clone() for t in range(2) for n, p in lora.adapter_params(t)}
    write_peft_adapter(tensors, [n for n, _ in lora.modules], 2, lcfg, tmp_path / "task_1_b", str(tmp_path / "base"))
    config = json.loads((tmp_path / "task_1_b" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["down_proj", "q_proj",
                                                                                              "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "task_1_b").eval()
        got = peft_model(input_ids=ids).logits
    assert (plain - want).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_lora_input_is_a_one_line_error(tmp_path):
    from ds_cl.methods.lora import OLoRA, target_linears
    from ds_cl.training.modeling import hf_config, meta_model

    base = {"output_dir": str(tmp_path / "o"), "model": {"config": TINY_LLAMA, "tokenizer": str(FIXTURES / "task_a.jsonl")},
            "tasks": [{"name": "a", "train": str(FIXTURES / "task_a.jsonl")}]}
    with pytest.raises(ConfigError, match=r"method.lora.rank: must be >= 1, got 0"):
        load_config(None, ["method.name=olora", "method.lora.rank=0"], data=base)
    with pytest.raises(ConfigError, match=r"method.lora.dropout"):
        load_config(None, ["method.lora.dropout=1.5"], data=base)
    cfg = load_config(None, ["method.name=olora", "method.lora.targets=[qproj]"], data=base)
    model = meta_model(hf_config(cfg.model.config))  # what preflight checks the targets on
    with pytest.raises(ValueError, match=r"match no Linear module .* q_proj") as e:
        OLoRA.check_model(cfg, model)
    assert "\n" not in str(e.value)
    assert len(target_linears(model, ["self_attn.o_proj", "up_proj"])) == 4


# ---------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3.


def zero3_config(tmp_path, out):
    return tiny_run_config(tmp_path, out, {
        "method": {"name": "olora", "lora": {"rank": 4, "lr": 1e-2, "targets": ["q_proj", "v_proj", "up_proj"]}},
        "train": {"weight_decay": 0.1}, "output": {"plots": False}})


def train(path, *args):
    return launch(TRAIN, 2, str(path), *args, timeout=600)


@pytest.fixture(scope="module")
def olora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("olora")
    train_sentencepiece(tmp / "tok.model")
    out = tmp / "olora"
    path = tmp / "olora.yaml"
    path.write_text(yaml.safe_dump(zero3_config(tmp, out)))
    return tmp, out, train(path)


@pytest.mark.distributed
def test_two_rank_zero3_olora_run(olora_run):
    tmp_path, out, proc = olora_run
    assert "olora: AA=" in proc.stdout

    summ = json.loads((out / "summary.json").read_text())
    assert summ["method"] == "olora" and summ["complete"] and [len(r) for r in summ["matrix"]] == [1, 2]
    assert json.loads((out / "cl_matrix.json").read_text())["matrix"] == summ["matrix"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in recs] == ["a"] * 4 + ["b"] * 4
    assert all("orth_loss" not in r for r in recs[:4]) and all(r["orth_loss"] > 0 for r in recs[4:])
    assert all(r["lr"] == 1e-2 and r["grad_norm"] > 0 for r in recs)

    # Earlier adapters bitwise unchanged by the later task; the later one trained.
    ad0 = load_file(out / "adapters" / "task_0_a.safetensors")
    ad1 = load_file(out / "adapters" / "task_1_b.safetensors")
    assert set(ad0) < set(ad1) and len(ad0) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
    for k in ad0:
        assert torch.equal(ad0[k], ad1[k]), k
    assert all(ad1[k].abs().sum() > 0 for k in ad1 if "lora_B_1" in k)
    # ... and as PEFT LoRA folders (rank 4 per task, stacked: 8 after task 1).
    assert json.loads((out / "adapters" / "task_1_b" / "adapter_config.json").read_text())["r"] == 8
    assert (out / "adapters" / "task_0_a" / "adapter_model.safetensors").is_file()

    # Exports: plain HF models; the base stayed frozen on ZeRO-3 (non-targets bitwise equal between
    # tasks) and task 1's export adds exactly (alpha / r) B_1 A_1 to each target.
    from transformers import AutoModelForCausalLM

    e0 = load_file(out / "task_0_a" / "model.safetensors")
    e1 = load_file(out / "task_1_b" / "model.safetensors")
    assert not any("lora" in k for k in e1)
    scale = 32.0 / 4
    for k in e1:
        mod = k.rsplit(".", 1)[0]
        if f"{mod}.lora_A_1" in ad1:
            delta = scale * ad1[f"{mod}.lora_B_1"] @ ad1[f"{mod}.lora_A_1"]
            torch.testing.assert_close(e1[k] - e0[k], delta, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(e0[k], e1[k]), k
    model = AutoModelForCausalLM.from_pretrained(out / "task_1_b")
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 400)


@pytest.mark.distributed
def test_resume_mid_task_equals_uninterrupted(olora_run):
    tmp, full, _ = olora_run
    out = tmp / "resumed"
    path = tmp / "resumed.yaml"
    path.write_text(yaml.safe_dump(zero3_config(tmp, out)))
    train(path, "checkpoint.stop_after_steps=6")  # stops in task b: adapters 0 and 1 in the checkpoint
    train(path, "--resume")
    for f in ("task_1_b/model.safetensors", "adapters/task_1_b.safetensors"):
        a, b = load_file(full / f), load_file(out / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    recs = lambda d: [(r["loss"], r.get("orth_loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert recs(full) == recs(out)
