"""Continual fine-tuning with ds-cl's SubspaceProjector inside your own DeepSpeed ZeRO-3 loop.

The README's snippet ("The projector in your own training loop"), made whole: a model, three tiny
tasks, a ZeRO-3 config, the projector fitted before task 0 and extended at every later task boundary
(osft-acc), the leak audited per task, a checkpoint after every task (the engine's plus the projector's
state, one file per rank) and a resume from it that ends where an uninterrupted run ends.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/own_loop.py --out runs/own_loop

On CPU ranks (DS_ACCELERATOR=cpu; OMP_NUM_THREADS=1 keeps two ranks from fighting over two cores) it
takes well under a minute. Stop after task 1, then resume from the checkpoint written there:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/own_loop.py --out runs/own_loop --stop-after-task 1
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/own_loop.py --out runs/own_loop --resume runs/own_loop/task_1

Without --model the model is a tiny randomly initialised LLaMA on byte tokens, so this runs anywhere
without a download; --model PATH takes a small LLaMA-style Hugging Face causal LM (and its tokenizer).
Resume on the same number of ranks: the projector's bases are sharded by rank.
"""

import argparse
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_tasks, however this file is started
from tiny_tasks import EOS, PAD, TASKS, encode, tiny_llama  # noqa: E402

from ds_cl import SubspaceProjector  # noqa: E402
from ds_cl.core.projector import prepare_ds_config  # noqa: E402  (bf16: sets fp32 gradient accumulation)
from ds_cl.core.subspace import FixedRank  # noqa: E402
from ds_cl.training.environment import end_distributed, init_distributed  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", help="a small LLaMA-style HF causal LM folder (default: a tiny random LLaMA)")
p.add_argument("--out", default="runs/own_loop", help="checkpoints and final weights go here")
p.add_argument("--steps", type=int, default=8, help="optimizer steps per task")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--ratio", type=float, default=0.5, help="share of each matrix's directions protected before task 0")
p.add_argument("--stop-after-task", type=int, help="end after this task's checkpoint (to try --resume)")
p.add_argument("--resume", help="a checkpoint folder written by this script (OUT/task_N)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
args = p.parse_args()

# ---------------------------------------------------------------------------------------------- data
# Three tiny tasks of (prompt, answer) pairs (examples/tiny_tasks.py); the loss is on the answer only.
# Each has 8 examples, so with 2 ranks x micro batch 2 x 2 accumulation steps one optimizer step sees the
# whole task once.
MICRO_BATCH, ACCUMULATION = 2, 2

# ---------------------------------------------------------------------------------------------- setup
# deepspeed.init_distributed() would do; on CPU ds-cl's wrapper also skips DeepSpeed's shared-memory
# all-reduce op (a compile, and a segment left in /dev/shm after every run; only inference uses it).
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(args.seed)  # every rank builds the same initial model

if args.model:
    tok = AutoTokenizer.from_pretrained(args.model)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # fp32 weights: on a GPU set "bf16" in the config below; prepare_ds_config then keeps the projected
    # gradients in fp32. (A model too big for one rank's memory would be built under deepspeed.zero.Init.)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
else:
    eos, pad = EOS, PAD  # bytes are the tokens (`encode`): no tokenizer to download
    model = tiny_llama(args.seed)


def batches(examples):
    """This rank's micro batches of a task: its share of the examples (rank::world), padded to the
    task's longest. Every rank gets the same number of micro batches: ZeRO-3 forwards are collective."""
    seqs = [(encode(q), encode(a) + [eos]) for q, a in examples]
    length = max(len(q) + len(a) for q, a in seqs)
    ids, labels, mask = [], [], []
    for q, a in seqs[rank::world]:
        pad_n = length - len(q) - len(a)
        ids.append(q + a + [pad] * pad_n)
        labels.append([-100] * len(q) + a + [-100] * pad_n)  # -100: no loss on the prompt and padding
        mask.append([1] * (len(q) + len(a)) + [0] * pad_n)
    t = lambda rows, i: torch.tensor(rows[i:i + MICRO_BATCH])  # noqa: E731
    return [{"input_ids": t(ids, i), "labels": t(labels, i), "attention_mask": t(mask, i)}
            for i in range(0, len(ids), MICRO_BATCH)]


tasks = [(name, batches(examples)) for name, examples in TASKS.items()]

ds_config = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "gradient_accumulation_steps": ACCUMULATION,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3},
    "steps_per_print": 10 ** 9,
}
# Weight decay on purpose: AdamW's decay and 1/sqrt(v) act after any gradient hook, which is why the
# projector also projects the update (project_update=True) and the audit still reads ~1e-7.
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=prepare_ds_config(ds_config))
# targets=None: LLaMA's q/k/v/o/gate/up/down projections; embeddings, norms and lm_head train freely.
proj = SubspaceProjector(engine, targets=None, projection="two_sided", project_update=True)


def mean_loss(task_batches) -> float:
    """Answer loss on a task's examples, averaged over ranks (a forgetting check, no training)."""
    with torch.no_grad():
        loss = torch.stack([engine(**{k: v.to(engine.device) for k, v in b.items()}).loss for b in task_batches]).mean()
    dist.all_reduce(loss)
    return loss.item() / world


def protected() -> float:
    """Mean share of each target matrix's directions that the projector protects."""
    return sum(r / min(proj.shapes[n]) for n, r in proj.ranks.items()) / len(proj.ranks)


# ------------------------------------------------------------------------------------ resume or start
if args.resume:
    # The engine restores weights and AdamW moments; the projector its bases and the task-start weights
    # that mark() took (extend() at the next boundary diffs against them). The same on every rank, so
    # the run goes on exactly as if it had not stopped.
    # (DeepSpeed unpickles its files with weights_only=False: load only checkpoints you wrote. `ds-cl train`
    # restricts that loader to tensors; see ds_cl/training/checkpoint.py.)
    _, client = engine.load_checkpoint(args.resume, tag="engine")
    proj.load_state_dict(torch.load(Path(args.resume) / f"proj_rank{rank}.pt", weights_only=True))
    first = client["task"] + 1
    if rank == 0:
        print(f"resumed from {args.resume}: task {client['task']} done, continuing at task {first}", flush=True)
else:
    proj.fit(rank_policy=FixedRank(args.ratio))  # before task 0: protect the base model
    first = 0

# ---------------------------------------------------------------------------------------------- train
for t in range(first, len(tasks)):
    name, task = tasks[t]
    if t == 0:
        proj.mark()  # remember the weights the task starts from
    else:
        proj.extend(energy=0.99, max_ratio=0.9)  # osft-acc: also protect what task t-1 wrote
        # the paper's method instead refits from the current weights at every task start:
        # proj.fit(rank_policy=AdaptiveRank(mrr=0.1, trr=0.8), importance_batches=tasks[t - 1][1])
    losses = []
    for step in range(args.steps * ACCUMULATION):  # micro steps; the task's batches, round and round
        batch = {k: v.to(engine.device) for k, v in task[step % len(task)].items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        proj.step()  # instead of engine.step(), at every micro step
        losses.append(loss.item())
    leak = max(proj.audit().values())  # leak of the last optimizer step: a few 1e-7 (fp32 rounding)
    seen = " ".join(f"{n}={mean_loss(b):.3f}" for n, b in tasks[:t + 1])  # collective: every rank
    if rank == 0:
        print(f"task {t} ({name}): loss {losses[0]:.3f} -> {losses[-1]:.3f}, leak {leak:.2e}, "
              f"protected {100 * protected():.1f}% | answer loss on tasks so far: {seen}", flush=True)

    # Checkpoint at the task boundary: the engine's (weights, optimizer; client_state remembers the task)
    # and the projector's. Bases are sharded (each matrix's live on its owner rank): one file per rank.
    ckpt = Path(args.out) / f"task_{t}"
    engine.save_checkpoint(str(ckpt), tag="engine", client_state={"task": t})
    os.makedirs(ckpt, exist_ok=True)
    torch.save(proj.state_dict(), ckpt / f"proj_rank{rank}.pt")
    if t == args.stop_after_task:
        break

# The fp32 master weights, gathered (a collective under ZeRO-3: every rank calls it), saved by rank 0.
weights = {n: safe_get_full_fp32_param(q).cpu() for n, q in engine.module.named_parameters()}
if rank == 0:
    torch.save(weights, Path(args.out) / "weights.pt")
    print(f"weights: {Path(args.out) / 'weights.pt'}", flush=True)
# A barrier (rank 0's file is written before any rank exits), the process group destroyed, and the end of
# the process without interpreter finalization: ZeRO-3 keeps the gloo groups' threads alive past the
# destroy, and a plain exit can abort a rank with SIGABRT after its work is done.
end_distributed()
