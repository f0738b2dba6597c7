"""Continual fine-tuning with osft inside TRL's SFTTrainer (or Hugging Face's Trainer) on DeepSpeed ZeRO-3.

Two tiny tasks (sentiment, then topic: examples/tiny_tasks.py) on a tiny randomly initialised LLaMA over
byte tokens, so nothing is downloaded; one `trainer.train()` per task; `OSFTCallback` fits the projector
before task 0 and extends it before task 1, projects every optimizer step, logs `osft/leak`, and saves its
state with every Trainer checkpoint (one file per rank). The audited leak is printed per task.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/sft_two_tasks.py --out runs/sft_two_tasks

    --trainer hf     transformers.Trainer on data tokenized here (DataCollatorForSeq2Seq pads it)
    --trainer loop   no Trainer: the same batches and hyper-parameters in a plain DeepSpeed loop with
                     SubspaceProjector, which the hf path must equal (tests/test_hf_trainer.py) ...
    --trainer loop --fused-head   ... and the sft path with the loss computed as TRL computes it
    --resume runs/sft_two_tasks/task_1/checkpoint-2    go on from a Trainer checkpoint (same number of ranks)

Rank 0 prints a line per task and writes OUT/weights.pt (the fp32 master weights at the end, gathered);
the Trainer paths write their checkpoints to OUT/task_N/checkpoint-S. On a GPU: `bf16=True` in the
arguments below; the DeepSpeed config's "auto" then turns DeepSpeed's bf16 on, and `prepare_ds_config`
keeps the projected gradients in fp32. (Tested on 2 CPU ranks only.)
"""

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_tasks, however this file is started
from tiny_tasks import PAD, TASKS, byte_tokenizer, encode, tiny_llama  # noqa: E402

from ds_cl.core.projector import prepare_ds_config  # noqa: E402
from ds_cl.core.subspace import FixedRank  # noqa: E402
from ds_cl.training.environment import end_distributed, init_distributed  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--trainer", choices=["sft", "hf", "loop"], default="sft")
p.add_argument("--out", default="runs/sft_two_tasks", help="OUT/task_N/checkpoint-S and OUT/weights.pt")
p.add_argument("--steps", type=int, default=4, help="optimizer steps per task (each sees the task's 8 examples once)")
p.add_argument("--save-steps", type=int, help="a Trainer checkpoint every this many steps (default: --steps)")
p.add_argument("--fused-head", action="store_true",
               help="--trainer loop: the loss as SFTTrainer computes it (TRL's fused LM head), to compare with it")
p.add_argument("--resume", help="a checkpoint folder OUT/task_N/checkpoint-S written by a Trainer path")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--ratio", type=float, default=0.5, help="share of each matrix's directions protected before task 0")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
args = p.parse_args()
if args.resume and args.trainer == "loop":
    p.error("--resume is for the Trainer paths")

TASK_NAMES = ["sentiment", "topic"]
MICRO_BATCH, ACCUMULATION = 2, 2  # x 2 ranks = 8 examples per optimizer step: one epoch of a task
WEIGHT_DECAY, MAX_GRAD_NORM = 0.01, 1.0
ENERGY, MAX_RATIO = 0.99, 0.9  # extend() before task 1 (osft-acc)
# The DeepSpeed config the Trainer completes from its arguments ("auto"); bf16 off on CPU (see the docstring).
DS_CONFIG = prepare_ds_config({
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3},
    "steps_per_print": 10 ** 9,
})

init_distributed()  # deepspeed.init_distributed, without DeepSpeed's CPU shared-memory op (nothing left in /dev/shm)
rank, world = dist.get_rank(), dist.get_world_size()
model = tiny_llama(args.seed)  # the same initial weights on every rank and in every path


def say(msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def protected(ranks: dict, shapes: dict) -> float:
    """Mean share of each target matrix's directions the projector protects."""
    return sum(r / min(shapes[n]) for n, r in ranks.items()) / len(ranks)


def report(t: int, losses: list, leak: float, pct: float) -> None:
    say(f"task {t} ({TASK_NAMES[t]}): loss {losses[0]:.3f} -> {losses[-1]:.3f}, leak {leak:.2e}, "
        f"protected {100 * pct:.1f}%")


def save_weights(named_params) -> None:
    """The fp32 master weights, gathered (a collective under ZeRO-3: every rank calls it), saved by rank 0."""
    weights = {n: safe_get_full_fp32_param(q).cpu() for n, q in named_params}
    if rank == 0:
        torch.save(weights, Path(args.out) / "weights.pt")
        print(f"weights: {Path(args.out) / 'weights.pt'}", flush=True)
    dist.barrier()


# ------------------------------------------------------------------------------------ the Trainer paths
def train_with_trainer() -> None:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ds_cl.integrations.hf_trainer import OSFTCallback, use_process_group_on_cpu

    osft = OSFTCallback(rank_policy=FixedRank(args.ratio), energy=ENERGY, max_ratio=MAX_RATIO)
    tok = byte_tokenizer()
    first = OSFTCallback.task_of(args.resume) if args.resume else 0
    if args.resume:
        say(f"resumed from {args.resume}: continuing task {first}")
    trainer = None
    for t in range(first, len(TASK_NAMES)):
        examples = TASKS[TASK_NAMES[t]]
        # CPU ranks only: accelerate would otherwise count one process (see use_process_group_on_cpu).
        cpu_ranks = {} if torch.cuda.is_available() else use_process_group_on_cpu()
        common = dict(
            output_dir=str(Path(args.out) / f"task_{t}"),  # a folder per task: checkpoint-S restarts at every task
            deepspeed=copy.deepcopy(DS_CONFIG),
            per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
            weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
            # What the plain loop (--trainer loop) does too: torch's AdamW (not the fused kernel the Trainer picks
            # with torch >= 2.8: another rounding) and the examples in their order.
            optim="adamw_torch", train_sampling_strategy="sequential",
            bf16=False, seed=args.seed, logging_steps=1, report_to="none", disable_tqdm=True,
            save_strategy="steps", save_steps=args.save_steps or args.steps, **cpu_ranks,
        )
        if args.trainer == "sft":
            from trl import SFTConfig, SFTTrainer

            # Prompt-completion pairs: SFTTrainer tokenizes them, appends EOS and trains on the completion only.
            data = Dataset.from_list([{"prompt": q, "completion": a} for q, a in examples])
            # TRL defaults to bf16 and activation checkpointing; neither on CPU here.
            trainer = SFTTrainer(model=model, train_dataset=data, processing_class=tok,
                                 args=SFTConfig(**common, gradient_checkpointing=False))
        else:
            def tokenized(q, a):
                prompt, answer = encode(q), encode(a) + [tok.eos_token_id]
                return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                        "labels": [-100] * len(prompt) + answer}  # the loss on the answer only

            data = Dataset.from_list([tokenized(q, a) for q, a in examples])
            trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(**common),
                              data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        osft.attach(trainer)
        trainer.train(resume_from_checkpoint=args.resume if t == first else None)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report(t, losses, osft.leak, protected(osft.ranks, osft.shapes))
    save_weights(trainer.model.named_parameters())


# ------------------------------------------------------------------------------------ the plain loop
def train_in_a_loop() -> None:
    """The two Trainer paths, written out with SubspaceProjector. What had to match the Trainer:
    - a new engine and a new AdamW per task (the Trainer builds both at every train() call), torch's AdamW
      with the Trainer's groups (weight decay on all but the norms; LLaMA has no biases), constant lr;
    - the data: accelerate gives rank r the micro batches r, r + world, ... of the examples in order,
      each padded to its longest (pad 256, label -100, mask 0), as the collators do;
    - the loss: the Trainer divides each micro batch's summed token loss by the answer tokens of the whole
      optimizer step on all ranks (`num_items_in_batch`) and multiplies by the world size (DeepSpeed
      averages over ranks), with DeepSpeed's own division by the accumulation steps turned off;
    - the projector: fit + mark before task 0, its state carried to the next engine and extended before task 1.
    """
    import deepspeed

    from ds_cl import SubspaceProjector

    if args.fused_head:
        from trl.trainer.utils import add_fused_lm_head

        # What SFTTrainer does to the model: per-token log-probabilities of the labels, computed in tiles
        # (another rounding than the model's own cross entropy: ~1e-5 relative in the weights after 8 steps).
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": ACCUMULATION,
                 "gradient_clipping": MAX_GRAD_NORM, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    carried = None
    for t, name in enumerate(TASK_NAMES):
        seqs = [(encode(q), encode(a) + [PAD]) for q, a in TASKS[name]]  # PAD is EOS: byte_tokenizer's <eos>
        micro = [seqs[i:i + MICRO_BATCH] for i in range(0, len(seqs), MICRO_BATCH)][rank::world]
        batches = []
        for rows in micro:
            length = max(len(q) + len(a) for q, a in rows)
            pad = [length - len(q) - len(a) for q, a in rows]
            batches.append({
                "input_ids": torch.tensor([q + a + [PAD] * k for (q, a), k in zip(rows, pad)]),
                "attention_mask": torch.tensor([[1] * (len(q) + len(a)) + [0] * k for (q, a), k in zip(rows, pad)]),
                "labels": torch.tensor([[-100] * len(q) + a + [-100] * k for (q, a), k in zip(rows, pad)]),
            })
        # Answer tokens the shifted labels score, over this step's micro batches on every rank.
        items = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        dist.all_reduce(items)
        items = items / 1  # a float tensor, as the Trainer passes it

        decay = [q for n, q in model.named_parameters() if "norm" not in n]
        no_decay = [q for n, q in model.named_parameters() if "norm" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=prepare_ds_config(ds_config))
        proj = SubspaceProjector(engine, targets=None, projection="two_sided", project_update=True)
        if carried is None:
            proj.fit(rank_policy=FixedRank(args.ratio))
            proj.mark()
        else:
            proj.load_state_dict(carried)
            proj.extend(energy=ENERGY, max_ratio=MAX_RATIO)
        losses = []
        for step in range(args.steps):
            step_loss = torch.zeros(())
            for b in batches:
                inputs = {k: v.to(engine.device) for k, v in b.items()}
                if args.fused_head:  # trl's SFTTrainer.compute_loss
                    out = engine(**inputs, use_cache=False, fused_lm_head=True)
                    loss = -out.log_probs.sum() / items.clamp(min=1) * world
                else:
                    loss = engine(**inputs, num_items_in_batch=items).loss * world
                engine.backward(loss, scale_wrt_gas=False)
                proj.step()  # instead of engine.step(), at every micro step
                step_loss += loss.detach().cpu()
            dist.all_reduce(step_loss)
            losses.append(step_loss.item() / world)
        report(t, losses, max(proj.audit().values()), protected(proj.ranks, proj.shapes))
        if t + 1 < len(TASK_NAMES):
            carried = proj.state_dict()
            engine.destroy()  # as accelerator.free_memory() before the Trainer's next engine
    save_weights(engine.module.named_parameters())


os.makedirs(args.out, exist_ok=True)
train_in_a_loop() if args.trainer == "loop" else train_with_trainer()
end_distributed()  # not a plain exit: ZeRO-3's gloo threads can abort it after the work is done
