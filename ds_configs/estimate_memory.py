"""Estimated GPU memory per rank for LLaMA-2-7B with the shipped ds_configs (prints a markdown table).

    DS_ACCELERATOR=cpu python ds_configs/estimate_memory.py [--seq 1024] [--micro 1] [--ratio R]

Model states come from DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs_all_cold`,
`estimate_zero2_model_states_mem_needs_all_cold`), which assume 2-byte gradients; we add the fp32
gradient accumulation the osft method needs (+2 bytes/param/world), the osft projector's step peak
as ds_cl.core.projector_memory computes it (the bases this rank owns, the exchange buffers of the
buckets in flight, the projection and audit temporaries; the pre-step copy in host memory, the
projector's default on GPUs), and activations for one micro-batch with gradient checkpointing (one
bf16 hidden state per layer + one layer's working set + fp32 logits). The projector's ranks are
adaptive (mrr 0.1, trr 0.8, layer importances spread evenly), or fixed at --ratio. Not included:
CUDA context and allocator fragmentation (add ~2-4 GB) and DeepSpeed's communication buckets.
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


def osft_memory(world: int, ratio: float | None) -> dict:
    """The projector's memory per rank (ds_cl.core.projector_memory) for LLaMA-2-7B's targets."""
    from ds_cl.core.projector_memory import projector_memory, ranks_for
    from ds_cl.core.subspace import AdaptiveRank, FixedRank
    from ds_cl.tools.bench import target_shapes

    shapes = target_shapes("llama2-7b-shapes")
    ranks = ranks_for(shapes, AdaptiveRank() if ratio is None else FixedRank(ratio))
    return projector_memory(shapes, world, ranks, pre_step_copy="host")


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--ratio", type=float, default=None,
                   help="fixed protected-rank fraction (default: adaptive ranks, trr 0.8)")
    args = p.parse_args()
    act = activations(args.seq, args.micro)
    ranks = "adaptive osft ranks (trr 0.8)" if args.ratio is None else f"osft rank ratio {args.ratio}"
    print(f"LLaMA-2-7B, micro batch {args.micro} x {args.seq} tokens, gradient checkpointing, {ranks}; "
          f"GiB per GPU\n")
    print("| config | GPUs | model states (DeepSpeed est.) | + fp32 grad accum | + osft projector (step peak) "
          "| + activations | total (osft) | total (seqft) | osft refit peak | osft host memory | for |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, stage, off_opt, off_par, for_ in CONFIGS:
        for world in (8, 16, 64):
            states = ds_estimate(stage, world, off_opt, off_par)
            grad32 = 0 if off_opt else 2 * PARAMS / world  # offloaded: the fp32 grads live on the CPU
            mem = osft_memory(world, args.ratio)
            step = mem["projector_extra_bytes_per_rank"]
            total = states + grad32 + step + act
            print(f"| {name} | {world} | {states / GiB:.1f} | {grad32 / GiB:.1f} | {step / GiB:.1f} "
                  f"| {act / GiB:.1f} | **{total / GiB:.1f}** | {(states + grad32 + act) / GiB:.1f} "
                  f"| {mem['projector_refit_bytes_per_rank'] / GiB:.1f} | {mem['projector_host_bytes_per_rank'] / GiB:.1f} "
                  f"| {for_} |")


if __name__ == "__main__":
    main()
