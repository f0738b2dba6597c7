"""Pieces of `ds-cl train` that need no ranks: the DeepSpeed config's batch arithmetic, the phase plan of
each method, the learning-rate schedule, and an HF tokenizer with a chat template through the data path."""

import pytest

from ds_cl.training.config import ConfigError, RunConfig, TaskConfig, TrainConfig
from ds_cl.training.data import IGNORE_INDEX, Encoded, Example, encode_example
from ds_cl.methods import build_method
from ds_cl.training.ds_config import build_ds_config
from ds_cl.training.train import lr_schedule, schedule_phases


def cfg(**train):
    c = RunConfig(output_dir="x", tasks=[TaskConfig(name="a", train="a"), TaskConfig(name="b", train="b")])
    c.train = TrainConfig(**train)
    c.deepspeed = {"zero_optimization": {"stage": 3}}
    return c


def test_batch_arithmetic_fills_and_checks_the_deepspeed_config():
    ds = build_ds_config(cfg(micro_batch_size=2, global_batch_size=16), world=4, on_cpu=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 16)
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # osft under bf16: bf16 accumulation leaks
    with pytest.raises(ConfigError, match=r"micro_batch_size=4 x world size 3 = 12"):
        build_ds_config(cfg(micro_batch_size=4, global_batch_size=8), world=3, on_cpu=True)
    c = cfg(micro_batch_size=1, global_batch_size=8)
    c.deepspeed["train_batch_size"] = 32
    with pytest.raises(ConfigError, match=r"deepspeed.train_batch_size=32 disagrees .* 8 = micro 1 x world 2 x accumulation 4"):
        build_ds_config(c, world=2, on_cpu=True)


class _Task:
    def __init__(self, name, n):
        self.name, self.train = name, [Encoded([i], [i]) for i in range(n)]


def plan(c, tasks):
    t = c.train
    return schedule_phases(build_method(c, None, None).plan(tasks), t.global_batch_size, t.epochs, t.max_steps_per_task)


def test_phase_plan_per_method():
    tasks = [_Task("a", 40), _Task("b", 20)]
    c = cfg(global_batch_size=8, epochs=2)
    c.method.name = "seqft"
    assert [(p.name, len(p.train), p.steps) for p in plan(c, tasks)] == [("a", 40, 10), ("b", 20, 4)]
    c.method.name = "replay"
    c.method.replay.fraction = 0.5
    ph = plan(c, tasks)
    assert len(ph[1].train) == 30 and all(s in tasks[0].train for s in ph[1].train[20:])
    assert len(tasks[1].train) == 20  # the task's own list is not extended
    c.method.name = "multitask"
    ph = plan(c, tasks)
    assert len(ph) == 1 and len(ph[0].train) == 60 and ph[0].eval_upto == 2
    c.method.name = "seqft"
    c.train.max_steps_per_task = 3
    assert [p.steps for p in plan(c, tasks)] == [3, 3]
    # the cap is per task: multitask's one phase of two tasks gets two tasks' steps, as the sequence does
    c.method.name = "multitask"
    assert [p.steps for p in plan(c, tasks)] == [6]
    c.train.max_steps_per_task = 100
    assert [p.steps for p in plan(c, tasks)] == [14]  # 60 samples / 8 = 7 steps per epoch x 2 epochs
    c.method.name, c.train.max_steps_per_task = "seqft", 3
    with pytest.raises(ConfigError, match="3 training samples do not fill one optimizer step"):
        plan(c, [_Task("a", 3)])


def test_lr_schedule_per_phase():
    t = TrainConfig(lr=1.0, warmup_ratio=0.2, lr_schedule="linear")
    lr = lr_schedule(t, 10)  # 2 warm-up steps (lr/2, lr), then linear decay towards 0 at step 10
    assert [round(lr(s), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    t.lr_schedule = "cosine"
    assert lr_schedule(t, 10)(6) == pytest.approx(0.5)
    t.lr_schedule, t.warmup_ratio = "constant", 0.0
    assert {lr_schedule(t, 10)(s) for s in range(10)} == {1.0}


def test_hf_tokenizer_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ds_cl.training.data import load_tokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the meal was great", "Answer: yes no", "user assistant"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                       "{% if add_generation_prompt %}assistant:{% endif %}"
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path), chat_template=True)
    assert tok.kind == "hf"
    enc, _ = encode_example(tok, Example("the meal was great", "yes"), 64)
    text = hf.decode(enc.input_ids)
    assert text.startswith("<s>user: the meal was great\nassistant:") and text.endswith("yes</s>")
    assert text.count("<s>") == 1  # the template's bos is not doubled
    answer = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert hf.decode(answer) == "yes</s>"
    with pytest.raises(ValueError, match="no chat template"):
        hf.chat_template = None
        hf.save_pretrained(tmp_path / "plain")
        load_tokenizer(str(tmp_path / "plain"), chat_template=True)


def test_lr_schedule_matches_the_closed_forms():
    import math

    for sched in ("constant", "linear", "cosine"):
        for total, ratio in ((10, 0.0), (10, 0.1), (50, 0.1), (7, 0.3)):
            t = TrainConfig(lr=2e-3, warmup_ratio=ratio, lr_schedule=sched)
            warm, lr = int(ratio * total), lr_schedule(t, total)
            for step in range(total):
                frac = (step - warm) / max(1, total - warm)
                want = (t.lr * (step + 1) / warm if step < warm else
                        {"constant": t.lr, "linear": t.lr * (1 - frac),
                         "cosine": t.lr * 0.5 * (1 + math.cos(math.pi * frac))}[sched])
                assert lr(step) == pytest.approx(want, rel=1e-9, abs=1e-15), (sched, total, ratio, step)


def test_train_step_reads_no_device_tensor_per_micro_batch(monkeypatch):
    """A step's micro batches run without a host sync: the loss is summed on the device and read once, by
    the step's all-reduce; tokens are counted on the host's batch. The device here is `meta`, whose
    tensors cannot be read at all: `float(loss)` or a token count on the moved batch would raise."""
    from types import SimpleNamespace as NS

    import torch

    from ds_cl.core import collectives
    from ds_cl.training import train as T

    meta = torch.device("meta")
    samples = [Encoded([1, 5, 6, 7][:n], [IGNORE_INDEX, 6, 7, 2][:n]) for n in (2, 3, 4, 4, 3, 2, 4, 3)]
    calls = []

    class Engine:
        device, optimizer = meta, NS(param_groups=[{}])

        def __call__(self, input_ids, attention_mask, labels):
            assert input_ids.device == meta  # the batch did move
            calls.append(input_ids.shape)
            return NS(loss=torch.empty((), device=meta))

        def train(self):
            pass

        def backward(self, loss):
            pass

        def get_global_grad_norm(self):
            return None

    method = NS(group_lrs=lambda lr, phase: [lr], loss=lambda loss: (loss, {}), step=lambda: None,
                step_metrics=lambda: {})
    trainer = T.Trainer.__new__(T.Trainer)
    trainer.cfg = cfg(micro_batch_size=2, global_batch_size=8)
    trainer.dist = NS(rank=0, world=1)
    trainer.phases = [NS(name="a", train=samples, steps_per_epoch=1)]
    trainer.grad_accum, trainer.engine, trainer.method = 4, Engine(), method
    trainer.tokenizer, trainer.state, trainer.signalled = NS(pad_id=0), T.RunState(), False
    reduced = []
    monkeypatch.setattr(collectives, "all_reduce_values",
                        lambda values: reduced.append(values) or [0.0, values[1], 0.0])
    rec = trainer.train_step(0, 0, 1e-3)
    assert len(calls) == 4 and len(reduced) == 1  # four micro batches, one reduction for the step
    loss_mean, tokens, _ = reduced[0]
    assert torch.is_tensor(loss_mean) and loss_mean.device == meta and loss_mean.dtype == torch.float64
    assert tokens == sum(len(s.input_ids) for s in samples) and rec["tokens_per_s"] > 0
