"""Estimated GPU memory per rank for LLaMA-2-7B with the shipped ds_configs (prints a markdown table).

    DS_ACCELERATOR=cpu python ds_configs/estimate_memory.py [--seq 1024] [--micro 1] [--tasks 5]
        [--ratio R | --adaptive] [--eval-batch 8] [--eval-tokens 512]

Model states come from DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs_all_cold`,
`estimate_zero2_model_states_mem_needs_all_cold`), which assume 2-byte gradients; we add the fp32
gradient accumulation the osft method needs (+2 bytes/param/world), the osft projector's step peak
as ds_cl.core.projector_memory computes it (the bases this rank owns, the exchange buffers of the
buckets in flight, the projection and audit temporaries; the pre-step copy in host memory, the
projector's default on GPUs), and activations for one micro-batch with gradient checkpointing (one
bf16 hidden state per layer + one layer's working set + fp32 logits). The projector follows a default
osft run through --tasks tasks (`accumulate_sequence`): the first fit fixed at --ratio (the shipped
first fit; --adaptive: mrr 0.1, trr 0.8, layer importances spread evenly), then each task start's
extend growing the ranks up to method.osft.max_protected_ratio (the worst case), so its columns are
the largest over the sequence. The retention column: a run's `eval.retention_suite` loads the exported
model whole on every GPU beside all of that (ds_cl.evaluation.generate). Not included: CUDA context and
allocator fragmentation (add ~2-4 GB) and DeepSpeed's communication buckets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

GiB = 2 ** 30
# LLaMA-2-7B
H, I, L, V, HEADS = 4096, 11008, 32, 32000, 32
PARAMS = 6_738_415_616
LARGEST = V * H  # embed_tokens / lm_head (untied)


def ds_estimate(stage: int, world: int, offload_optimizer: bool, offload_param: bool) -> float:
    """GPU bytes per rank from DeepSpeed's estimator (parsed from its printed table)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if stage == 3:
            estimate_zero3_model_states_mem_needs_all_cold(PARAMS, LARGEST, num_gpus_per_node=min(world, 8),
                                                           num_nodes=max(1, world // 8))
        else:
            estimate_zero2_model_states_mem_needs_all_cold(PARAMS, num_gpus_per_node=min(world, 8),
                                                           num_nodes=max(1, world // 8))
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*[\d.]+GB \|\s*([\d.]+)GB \| (.*)", line)
        if not m:
            continue
        opts = m.group(2)
        if stage == 3 and "zero_init=1" not in opts:
            continue
        if ("offload_optimizer=OffloadDeviceEnum.cpu" in opts) != offload_optimizer:
            continue
        if stage == 3 and ("offload_param=OffloadDeviceEnum.cpu" in opts) != offload_param:
            continue
        return float(m.group(1)) * GiB
    raise RuntimeError(f"no estimator line for stage {stage}\n{buf.getvalue()}")


def osft_memory(world: int, ratio: float | None, tasks: int) -> dict:
    """The projector's memory per rank (ds_cl.core.projector_memory) for LLaMA-2-7B's targets through a
    `tasks`-task default run: the largest step, task-boundary (fit, mark, extend) and host figures, and
    the largest bases (what stays on the GPU between steps, as during a retention eval)."""
    from ds_cl.core.projector_memory import accumulate_sequence, ranks_for
    from ds_cl.core.subspace import AdaptiveRank, FixedRank
    from ds_cl.tools.bench import target_shapes
    from ds_cl.training.config import OSFTConfig

    shapes = target_shapes("llama2-7b-shapes")
    ranks = ranks_for(shapes, AdaptiveRank() if ratio is None else FixedRank(ratio))
    seq = accumulate_sequence(shapes, world, ranks, tasks, max_ratio=OSFTConfig.max_protected_ratio,
                              pre_step_copy="host")
    largest = lambda where: max(p["device_bytes_per_rank"] for p in seq["phases"] if where(p["phase"]))  # noqa: E731
    return {"step": largest(lambda phase: phase.endswith("steps")),
            "boundary": largest(lambda phase: not phase.endswith("steps")),
            "host": seq["host_peak_bytes_per_rank"], "bases": max(p["bases_bytes_per_rank"] for p in seq["phases"])}


def retention_eval(batch: int, tokens: int) -> float:
    """GPU bytes a retention eval adds per rank: the exported model in bf16 (output.export_dtype, loaded
    with dtype "auto"), and greedy generation's KV cache, K and V per layer for `batch` sequences of
    `tokens` positions (prompt + eval max_new_tokens) in bf16. Freed when the eval ends
    (ds_cl.evaluation.generate.free_memory). Not counted: the prefill's activations, a few hundred MB."""
    return 2 * PARAMS + 2 * L * batch * tokens * H * 2


def activations(seq: int, micro: int) -> float:
    checkpoints = L * micro * seq * H * 2
    layer = micro * seq * (34 * H + 3 * I * 2)  # bf16 working set of one recomputed layer (flash/SDPA attention)
    logits = micro * seq * V * (2 + 4 + 4)  # bf16 logits, fp32 upcast for the loss, its gradient
    return checkpoints + layer + logits


CONFIGS = [  # file, stage, offload optimizer, offload params, GPUs it is for
    ("zero3_bf16.json", 3, False, False, "8 x 80 GB (A100/H100); 8 x 40 GB with micro 1"),
    ("zero3_offload_optimizer.json", 3, True, False, "8 x 24-48 GB (A10/L40/A6000), ~150 GB host RAM per node"),
    ("zero3_offload_nvme.template.json", 3, True, True, "1-8 small GPUs, fast local NVMe (~110 GB free)"),
    ("zero2_bf16.json", 2, False, False, "8 x 80 GB; faster than ZeRO-3 when it fits"),
]


def main() -> None:
    from ds_cl.training.config import OSFTConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--ratio", type=float, default=OSFTConfig.ratio,
                   help="the first fit's fixed protected-rank fraction (default: method.osft.ratio, the shipped first fit)")
    p.add_argument("--adaptive", action="store_true",
                   help="adaptive first fit instead (trr 0.8: with method.osft.first_task_importance_data)")
    p.add_argument("--tasks", type=int, default=5, help="tasks of the accumulate sequence (default 5)")
    p.add_argument("--eval-batch", type=int, default=8, help="retention eval: prompts per generate() (default 8)")
    p.add_argument("--eval-tokens", type=int, default=512,
                   help="retention eval: prompt + new tokens per sequence (default 512: 256 + max_new_tokens 256)")
    args = p.parse_args()
    act = activations(args.seq, args.micro)
    first = "adaptive (trr 0.8)" if args.adaptive else f"fixed at {args.ratio}"
    print(f"LLaMA-2-7B, micro batch {args.micro} x {args.seq} tokens, gradient checkpointing, osft through "
          f"{args.tasks} tasks (first fit {first}, then up to max_protected_ratio {OSFTConfig.max_protected_ratio}); "
          f"retention eval {args.eval_batch} x {args.eval_tokens} tokens; GiB per GPU\n")
    print("| config | GPUs | model states (DeepSpeed est.) | + fp32 grad accum | + osft projector (step peak) "
          "| + activations | total (osft) | total (seqft) | osft task-boundary peak | during a retention eval "
          "| osft host memory | for |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    evaluation = retention_eval(args.eval_batch, args.eval_tokens)
    for name, stage, off_opt, off_par, for_ in CONFIGS:
        for world in (8, 16, 64):
            states = ds_estimate(stage, world, off_opt, off_par)
            grad32 = 0 if off_opt else 2 * PARAMS / world  # offloaded: the fp32 grads live on the CPU
            mem = osft_memory(world, None if args.adaptive else args.ratio, args.tasks)
            total = states + grad32 + mem["step"] + act
            # between tasks: no activations, the projector's bases stay
            during_eval = states + grad32 + mem["bases"] + evaluation
            print(f"| {name} | {world} | {states / GiB:.1f} | {grad32 / GiB:.1f} | {mem['step'] / GiB:.1f} "
                  f"| {act / GiB:.1f} | **{total / GiB:.1f}** | {(states + grad32 + act) / GiB:.1f} "
                  f"| {mem['boundary'] / GiB:.1f} | {during_eval / GiB:.1f} | {mem['host'] / GiB:.1f} | {for_} |")


if __name__ == "__main__":
    main()
