"""`ds-cl eval` end to end with a tiny random Llama: one process, and 2 real DeepSpeed CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_cl.evaluation.ifeval import read_ifeval_prompts
from ds_cl.evaluation.io import read_safety_prompts
from ds_cl.evaluation.suites import resolve_suite
from tests.dist_utils import launch

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tiny_model(d: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [p["prompt"] for p in read_ifeval_prompts(resolve_suite("ifeval-mini").ifeval)]
    corpus += [p["prompt"] for p in read_safety_prompts(resolve_suite("safety-mini").safety)]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.chat_template = CHAT
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_generate_batched_equals_one_by_one(tiny):
    from ds_cl.evaluation.generate import format_prompt, generate_local, load_model
    model, tok = load_model(str(tiny), "cpu")
    prompts = ["Write a haiku about snow.", "Hi", "Describe a quiet evening at home in many words please."]
    assert format_prompt(tok, "Hi") == "<|user|> Hi <|assistant|>"
    one = [generate_local(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    batched = generate_local(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == one
    assert all(isinstance(a, str) and a for a in one)


def test_evaluate_model_frees_the_model(tiny, tmp_path, monkeypatch):
    """Inside `ds-cl train` the evaluated model is a second full copy beside the ZeRO-3 state: once
    evaluate_model returns, nothing may keep it alive (the answers, the summary, generation caches)."""
    import weakref

    from ds_cl.evaluation import cli, generate

    loaded, freed = [], []
    real_load, real_free = generate.load_model, generate.free_memory

    def load(*a, **k):
        model, tok = real_load(*a, **k)
        loaded.append(weakref.ref(model))
        return model, tok

    def free(device):
        freed.append(device)
        real_free(device)

    monkeypatch.setattr(generate, "load_model", load)
    monkeypatch.setattr(generate, "free_memory", free)
    suite = resolve_suite("retention")
    parts = {k: v[:2] for k, v in cli.load_parts(suite).items()}
    summary = cli.evaluate_model(str(tiny), suite, parts, tmp_path, max_new_tokens=4, batch_size=2)
    assert summary["safety"]["refusal_rate"] is not None
    assert len(loaded) == 1 and freed == ["cpu"]
    assert loaded[0]() is None, "evaluate_model returned with its model still referenced"


def test_free_memory_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    import torch

    from ds_cl.evaluation.generate import free_memory
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    free_memory("cpu")
    assert calls == []
    free_memory("cuda:3")
    assert calls == [1]


def test_eval_errors_before_model_load(tiny, tmp_path, capsys):
    from ds_cl.evaluation.cli import main
    assert main(["--model", str(tiny), "--suite", "no-such-suite", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'no-such-suite'" in capsys.readouterr().err and "retention" in "retention"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    assert main(["--model", str(tiny), "--suite", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nomodel"), "--suite", "retention", "--out", str(tmp_path)]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err


@pytest.mark.distributed
def test_eval_two_ranks_with_base(tiny, tmp_path):
    """The user's command on 2 ranks: answers gathered in order, equal to one process's, scored, reported."""
    from ds_cl.evaluation.generate import generate_local, load_model
    # what `deepspeed --num_gpus 2 --module ds_cl.evaluation.cli ...` runs on each rank
    script = tmp_path / "eval_main.py"
    script.write_text("import sys\nfrom ds_cl.evaluation.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    launch(script, 2, "--model", str(tiny), "--base", str(tiny), "--suite", "retention", "--out", str(out),
           "--max-new-tokens", "8", "--batch-size", "4", "--limit", "6", timeout=300)
    for sub in ("base", "model"):
        d = out / sub
        ife = json.loads((d / "ifeval.json").read_text())
        saf = json.loads((d / "safety.json").read_text())
        assert ife["num_prompts"] == 6 and 0.0 <= ife["inst_level_loose_acc"] <= 1.0
        assert saf["num_prompts"] == 6 and saf["scorer"] == "refusal-patterns"
        summary = json.loads((d / "eval.json").read_text())
        assert summary["chat_template"] is True and summary["world_size"] == 2
    rows = [json.loads(line) for line in (out / "model" / "responses_ifeval.jsonl").read_text().splitlines()]
    prompts = [p["prompt"] for p in read_ifeval_prompts(resolve_suite("ifeval-mini").ifeval)[:6]]
    assert [r["prompt"] for r in rows] == prompts                    # original order after the gather
    model, tok = load_model(str(tiny), "cpu")
    assert [r["response"] for r in rows] == generate_local(model, tok, prompts, max_new_tokens=8, batch_size=1)
    rep = json.loads((out / "report.json").read_text())
    # same weights for base and model: every prompt ties and no metric moves
    assert rep["win_tie_lose"]["model"]["ifeval"]["tie"] == 6
    assert all(v == 0 for v in rep["deltas_vs_base"]["model"].values())
    assert (out / "report.md").is_file() and (out / "retention.png").is_file()


def test_lm_eval_part_says_what_is_missing(tmp_path):
    """General ability: without lm-eval installed the suite fails at once with the install hint."""
    import importlib.util

    from ds_cl.evaluation.cli import load_parts
    from ds_cl.evaluation.io import EvalInputError
    suite_yaml = tmp_path / "general.yaml"
    suite_yaml.write_text("lm_eval: {tasks: [no_such_task_xyz], limit: 2}\n")
    suite = resolve_suite(str(suite_yaml))
    assert suite.lm_eval == {"tasks": ["no_such_task_xyz"], "limit": 2}
    want = "pip install lm-eval" if importlib.util.find_spec("lm_eval") is None else "unknown lm-eval task"
    with pytest.raises(EvalInputError, match=want):
        load_parts(suite)
