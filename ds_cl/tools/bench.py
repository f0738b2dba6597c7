"""`ds-cl bench`: plain ZeRO-3 steps against projected steps, SVD phase time, bases memory, traffic.

    ds-cl bench [--world N] [--model tiny|small|llama2-7b-shapes|HF_FOLDER] [--layers K] [--extend] [--json]
    ds-cl bench --plan [--model llama2-7b-shapes] [--tasks 5] [--json]    # buckets and memory model by world, no run
    ds-cl bench --memory [--model small|medium] [--world N]    # memory model against measured peaks

The command launches `deepspeed --num_gpus W` runs of this module's worker (CPU ranks over gloo
where there is no GPU): one run at world N that alternates, step by step on the same engine and
data, plain `engine.step()`, `proj.step()` with gradient projection only, and with gradient +
update projection (and the same with audit() on); and one SVD-phase run per world 1..N. It prints
a table and, with --json, one JSON object as the last stdout line. --extend also times the task
boundary of osft's default subspace (accumulate): `mark()` before the measured steps and `extend()`
of their update after them.

--memory runs worlds 1..N on CPU and compares the projector's memory as ds_cl.core.projector_memory
computes it with what each rank measures: the resident-set peak of a projected step over that of a
plain one (SGD, so the optimizer adds nothing of its own), plus the bases' resident size, and the
peak of a refit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (64, 172, 2, 4, 4, 512),
    "small": (256, 688, 4, 8, 8, 2048),
    "medium": (1024, 2752, 2, 16, 16, 4096),
    "llama2-7b-shapes": (4096, 11008, 32, 32, 32, 32000),
}


def dims(model: str) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, layers, heads, kv_heads, vocab) of a named bench model, or of the config.json
    of an HF folder (a LLaMA-architecture model such as the one `ds-cl model smollm2` saves)."""
    if model in MODELS:
        return MODELS[model]
    path = Path(model).expanduser() / "config.json"
    c = json.loads(path.read_text())
    return (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"])


MODES = ("plain", "grad", "grad_update", "grad_update_audit")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ds-cl bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks for the step comparison (SVD phase: 1..world)")
    p.add_argument("--model", default="small",
                   help=f"{', '.join(sorted(MODELS))}, or an HF model folder (its config's shapes; random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per micro step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step (default 1)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per mode (>= 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (default 2)")
    p.add_argument("--ratio", type=float, default=None,
                   help="fixed rank ratio of the bases (default: osft's, method.osft.ratio)")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="CPU only: torch threads per rank (default 1: a rank stands for one device, so adding "
                        "ranks adds compute, as adding GPUs does)")
    p.add_argument("--bucket-numel-per-rank", type=int, default=None,
                   help="SubspaceProjector(bucket_numel_per_rank=...) (default: the projector's)")
    p.add_argument("--plan", action="store_true",
                   help="launch nothing: print, from the model's shapes, the projector's buckets and their "
                        "schedule efficiency at worlds 1..64, for the default and a fixed 2^27-element bucket")
    p.add_argument("--rank-policy", choices=["adaptive", "fixed"], default="fixed",
                   help="--plan: the ranks of the memory model (of the first fit, with --tasks): fixed at --ratio "
                        "(default: what osft's first fit uses unless method.osft.first_task_importance_data is set) "
                        "or adaptive (mrr 0.1, trr 0.8, layer importances spread evenly)")
    p.add_argument("--tasks", type=int, default=5,
                   help="--plan: also walk a sequence of this many tasks of osft's default accumulate subspace "
                        "(fit, then an extend at each task start) and report its peak per rank (0: skip)")
    p.add_argument("--max-protected-ratio", type=float, default=None,
                   help="--plan --tasks: the cap extend grows ranks toward (default: method.osft.max_protected_ratio)")
    p.add_argument("--added-ratio", type=float, default=None,
                   help="--plan --tasks: directions each extend adds, as a fraction of min(m, n) (default: the "
                        "worst case, as many as the cap leaves room for)")
    p.add_argument("--pre-step-copy", choices=["host", "device"], default="host",
                   help="--plan: where the update projection keeps W_old (default host, SubspaceProjector's "
                        "default on an accelerator)")
    p.add_argument("--memory", action="store_true",
                   help="measure the projector's memory on CPU ranks at worlds 1..--world against the model")
    p.add_argument("--extend", action="store_true",
                   help="also time mark() before the measured steps and extend(0.99, 0.9) of their update after "
                        "them (the accumulate subspace's task boundary; mark holds an fp32 host copy of the targets)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--log", default=None,
                   help="append the worker runs' output to this file as they go (default: kept in memory and "
                        "shown on failure); their progress lines show how far a run that was cut short got")
    p.add_argument("--worker", choices=["steps", "svd", "memory"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args([a for a in argv if not a.startswith("--local_rank")])
    if args.model not in MODELS:
        try:
            dims(args.model)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--model {args.model!r}: not one of {', '.join(sorted(MODELS))}, and not an HF folder with a "
                    f"LLaMA config.json ({type(e).__name__}: {e})")
    if args.world < 1:
        p.error(f"--world must be >= 1, got {args.world}")
    if args.steps < 1 or args.micro_batch < 1 or args.seq < 2 or args.grad_accum < 1:
        p.error("--steps, --micro-batch, --grad-accum must be >= 1 and --seq >= 2")
    if args.threads_per_rank < 1:
        p.error(f"--threads-per-rank must be >= 1, got {args.threads_per_rank}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    if args.bucket_numel_per_rank is not None and args.bucket_numel_per_rank < 1:
        p.error(f"--bucket-numel-per-rank must be >= 1, got {args.bucket_numel_per_rank}")
    if args.tasks < 0:
        p.error(f"--tasks must be >= 0, got {args.tasks}")
    # The shipped osft options are the defaults: the plan then describes what a default run does.
    from ds_cl.training.config import OSFTConfig
    args.ratio = OSFTConfig.ratio if args.ratio is None else args.ratio
    if args.max_protected_ratio is None:
        args.max_protected_ratio = OSFTConfig.max_protected_ratio
    for flag, v in (("--ratio", args.ratio), ("--max-protected-ratio", args.max_protected_ratio),
                    ("--added-ratio", args.added_ratio)):
        if v is not None and not 0.0 <= v <= 1.0:
            p.error(f"{flag} must be in [0, 1], got {v}")
    return args


def target_shapes(model: str, layers: int | None = None) -> dict[str, tuple[int, int]]:
    """The default targets' shapes of a bench model, in `named_parameters()` order."""
    hidden, inter, n_layers, heads, kv, _ = dims(model)
    kv_dim = hidden // heads * kv
    shapes = {}
    for layer in range(layers or n_layers):
        pre = f"model.layers.{layer}."
        shapes.update({pre + "self_attn.q_proj.weight": (hidden, hidden), pre + "self_attn.k_proj.weight": (kv_dim, hidden),
                       pre + "self_attn.v_proj.weight": (kv_dim, hidden), pre + "self_attn.o_proj.weight": (hidden, hidden),
                       pre + "mlp.gate_proj.weight": (inter, hidden), pre + "mlp.up_proj.weight": (inter, hidden),
                       pre + "mlp.down_proj.weight": (hidden, inter)})
    return shapes


def plan(args) -> dict:
    """Schedule efficiency of the projector's buckets (ds_cl.core.projector.plan_buckets) and its memory per
    rank (ds_cl.core.projector_memory), computed from shapes."""
    from ds_cl.core.projector import DEFAULT_BUCKET_NUMEL_PER_RANK, plan_buckets, schedule_efficiency
    from ds_cl.core.projector_memory import accumulate_sequence, projector_memory, ranks_for
    from ds_cl.core.subspace import AdaptiveRank, FixedRank

    shapes = target_shapes(args.model, args.layers)
    names = list(shapes)
    per_rank = args.bucket_numel_per_rank or DEFAULT_BUCKET_NUMEL_PER_RANK
    policy = AdaptiveRank() if args.rank_policy == "adaptive" else FixedRank(args.ratio)
    ranks = ranks_for(shapes, policy)
    rows = []
    for world in (1, 2, 4, 8, 16, 32, 64):
        mem = projector_memory(shapes, world, ranks, bucket_numel_per_rank=per_rank,
                               pre_step_copy=args.pre_step_copy)
        row = {"world": world, **{k: mem[k] for k in ("projector_extra_bytes_per_rank",
                                                       "projector_refit_bytes_per_rank",
                                                       "projector_host_bytes_per_rank")},
               "memory_parts_of_busiest_rank": mem["busiest_rank"]}
        if args.tasks:
            row["sequence"] = accumulate_sequence(shapes, world, ranks, args.tasks, max_ratio=args.max_protected_ratio,
                                                  added_ratio=args.added_ratio, bucket_numel_per_rank=per_rank,
                                                  pre_step_copy=args.pre_step_copy)
        for label, numel in (("per_rank", per_rank), ("fixed_buckets", (1 << 27) // world)):
            buckets, owner = plan_buckets(shapes, names, world, max(1, numel))
            held = max(sum(math.prod(shapes[n]) for n in b if owner[n] == r) for b in buckets for r in range(world))
            row[label] = {"buckets": len(buckets), "schedule_efficiency": schedule_efficiency(shapes, buckets, owner, world),
                          "max_owned_numel_per_bucket": held}
        rows.append(row)
    return {"model": args.model, "layers": args.layers or dims(args.model)[2], "bucket_numel_per_rank": per_rank,
            "target_params": sum(math.prod(s) for s in shapes.values()), "rank_policy": repr(policy),
            "protected_share": sum(ranks.values()) / sum(min(s) for s in shapes.values()),
            "pre_step_copy": args.pre_step_copy, "tasks": args.tasks, "max_protected_ratio": args.max_protected_ratio,
            "added_ratio": args.added_ratio, "plan": rows}


# ------------------------------------------------------------------------------------------ worker
def _peak_mem_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _build(args, optimizer: str = "adamw"):
    import deepspeed
    import torch
    from transformers import LlamaConfig

    from ds_cl.training.modeling import build_causal_lm
    from ds_cl.core.projector import prepare_ds_config

    hidden, inter, layers, heads, kv, vocab = dims(args.model)
    layers = args.layers or layers
    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = prepare_ds_config({
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "train_batch_size": args.micro_batch * args.grad_accum * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": on_gpu, "contiguous_gradients": True},
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 10**9,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": optimizer != "adamw",
    })
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(args.seq, 64))
    model, keepalive = build_causal_lm(cfg, ds_config)
    if on_gpu:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    # SGD (no momentum) for --memory: its step allocates nothing, so a step's peak is the projector's own.
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-5))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine, cfg


def _barrier_time(fn):
    import torch

    from ds_cl.core.collectives import barrier

    barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    barrier()
    return time.perf_counter() - t, out


def _rss_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def _trim_heap() -> None:
    """glibc's malloc_trim(0) hands the free pages inside the heap back to the system. Left resident, a phase
    would reuse them without its peak showing it (small's refits measured up to 19% under what they allocate;
    with the trim, within 9%), and freeing the bases would not lower the resident set by what they held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measures may then read low
        pass


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the resident-set peak (VmHWM) to the current size, after the heap's
    free pages are trimmed (see _trim_heap)."""
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure_peak(fn) -> int:
    """Bytes of this process's resident-set peak during fn() above its size at the start."""
    from ds_cl.core.collectives import barrier

    barrier()
    _reset_peak()
    start = _rss_kib()["VmRSS"]
    fn()
    peak = _rss_kib()["VmHWM"]
    barrier()
    return (peak - start) * 1024


def memory_worker(args) -> None:
    """Per rank: measured and modelled projector memory (CPU ranks; see the module docstring)."""
    import torch
    import torch.distributed as dist

    from ds_cl import SubspaceProjector
    from ds_cl.core import collectives
    from ds_cl.core.projector import DEFAULT_BUCKET_NUMEL_PER_RANK
    from ds_cl.core.projector_memory import projector_memory
    from ds_cl.core.subspace import FixedRank
    from ds_cl.training.environment import end_distributed, init_distributed

    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads_per_rank)
    engine, cfg = _build(args, optimizer="sgd")
    kwargs = {"bucket_numel_per_rank": args.bucket_numel_per_rank} if args.bucket_numel_per_rank else {}
    proj = SubspaceProjector(engine, audit=True, pre_step_copy="device", **kwargs)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=g)

    def backward():
        engine.backward(engine(input_ids=ids, labels=ids).loss)

    backward()
    engine.step()  # DeepSpeed's first step allocates its own buffers
    # LAPACK's first SVD and QR set up buffers of their own (~4 MiB, whatever the sizes): not the projector's.
    torch.linalg.svd(torch.randn(8, 8))
    torch.linalg.qr(torch.randn(8, 4), mode="complete")
    collectives.barrier()
    # The first fit also pays one-time set-up (the collectives' buffers for these sizes, LAPACK's workspaces
    # for them): 1-2 MiB at `small`, so the bases are measured as what freeing them gives back.
    proj.fit(FixedRank(args.ratio))
    # The median of three refits: a one-off spike (measured once in CI, +2 MiB) is not the projector's.
    refit = sorted(_measure_peak(lambda: proj.fit(FixedRank(args.ratio))) for _ in range(3))[1]
    # Both readings after a trim: the bases freed in the heap count as given back only once the heap's free
    # pages are returned (without it, world 3 read 3.5 MiB for 4.2 MiB of bases in one CI run of three).
    _trim_heap()
    before = _rss_kib()["VmRSS"]
    proj.clear_bases()  # what fit() itself does first
    _trim_heap()
    bases_rss = (before - _rss_kib()["VmRSS"]) * 1024
    proj.fit(FixedRank(args.ratio))
    # The projector's own peaks, measured around its two phases that allocate: the pre-step copy and
    # the pipelines (the gradient pass, then the update pass with the copy resident).
    phases = {"copy": [], "pipeline": []}

    def measured(method, key, resident_delta=False):
        def fn(*a, **k):
            _reset_peak()
            start = _rss_kib()["VmRSS"]
            out = method(*a, **k)
            end = _rss_kib()
            phases[key].append(((end["VmRSS"] if resident_delta else end["VmHWM"]) - start) * 1024)
            return out
        return fn

    backward()
    proj.step()  # warm-up: the first step after a fit sets up more than the next ones
    proj._pre_step_copy = measured(proj._pre_step_copy, "copy", resident_delta=True)
    proj._pipeline = measured(proj._pipeline, "pipeline")
    plain, projected = [], []
    for _ in range(args.steps):
        backward()
        plain.append(_measure_peak(engine.step))
        backward()
        projected.append(_measure_peak(proj.step))
    grad_pass, update_pass = max(phases["pipeline"][0::2]), max(phases["pipeline"][1::2])
    model = projector_memory(proj.shapes, world, proj.ranks, names=proj.names,
                             bucket_numel_per_rank=args.bucket_numel_per_rank or DEFAULT_BUCKET_NUMEL_PER_RANK,
                             audit=True, pre_step_copy="device", accumulate=False)["per_rank"][rank]
    copy = max(phases["copy"])
    # The bases count at their size, not their resident-set share: those under the mmap threshold sit in the
    # heap, which a refit reuses for the new ones after freeing the old (their RSS does not fall), and which
    # stays resident under a step. What is measured is everything the projector allocates on top of them.
    bases = proj.bases_bytes()
    mine = {"rank": rank, "bases_bytes": bases, "bases_rss_bytes": bases_rss,
            # the old bases are freed as a refit starts: its peak above the engine alone
            "refit_measured_bytes": refit + bases,
            "step_measured_bytes": bases + max(grad_pass, copy + update_pass),
            "measured_parts": {"bases": bases_rss, "pre_step_copy": copy, "grad_pass": grad_pass,
                               "update_pass": update_pass},
            # what a run needs on top of plain ZeRO-3 at its step: less than the projector's own peak
            # where DeepSpeed's step allocates more than the pipelines (its peak and the copy coincide)
            "step_over_plain_bytes": bases_rss + max(projected) - max(plain),
            "step_model_bytes": model["step"], "refit_model_bytes": model["refit"], "model_parts": model}
    per_rank = collectives.all_gather_object(mine)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"world": world, "buckets": len(proj.buckets), "ranks": per_rank}))
    engine.destroy()
    end_distributed(0)  # a plain return can abort the rank after its result is written (end_process)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from ds_cl import SubspaceProjector
    from ds_cl.core import collectives
    from ds_cl.training.environment import end_distributed, init_distributed
    from ds_cl.core.projector import matrix_cost
    from ds_cl.core.subspace import FixedRank

    init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads_per_rank)
    engine, cfg = _build(args)
    kwargs = {"bucket_numel_per_rank": args.bucket_numel_per_rank} if args.bucket_numel_per_rank else {}
    proj = SubspaceProjector(engine, audit=False, **kwargs)
    say = (lambda msg: print(f"[ds-cl bench] world {world}: {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    t = time.perf_counter()
    proj.fit(FixedRank(args.ratio))  # warm-up: the first LAPACK call pays one-time set-up
    say(f"warm-up fit {time.perf_counter() - t:.2f}s")
    svd_s, _ = _barrier_time(lambda: proj.fit(FixedRank(args.ratio)))
    say(f"fit {svd_s:.2f}s")
    # Share of the SVD work (m n min(m, n) per matrix) each rank owns: what the design divides,
    # whether or not the hardware runs the ranks in parallel.
    cost = {n: matrix_cost(proj.shapes[n]) for n in proj.names}
    shares = [sum(c for n, c in cost.items() if proj.owner[n] == r) / sum(cost.values()) for r in range(world)]
    result = {"world": world, "svd_seconds": svd_s, "svd_work_share_by_rank": shares}
    result["bases_bytes_by_rank"] = collectives.all_gather_object(proj.bases_bytes())

    if args.worker == "steps":
        if args.extend:
            result["mark_seconds"], _ = _barrier_time(proj.mark)
            say(f"mark {result['mark_seconds']:.2f}s")
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=g).to(engine.device)
        times = {m: [] for m in MODES}
        comm = []

        def one_step(mode):
            for _ in range(args.grad_accum):
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                if mode == "plain":
                    engine.step()
                else:
                    proj.step()

        for i in range(args.warmup + args.steps):
            for mode in MODES:
                proj.project_update = mode.startswith("grad_update")
                proj.audit_enabled = mode == "grad_update_audit"
                before = proj.stats["sent_bytes"]
                dt, _ = _barrier_time(lambda: one_step(mode))
                if i >= args.warmup:
                    times[mode].append(dt)
                    if mode == "grad_update":
                        comm.append(proj.stats["sent_bytes"] - before)
        say(f"{args.warmup + args.steps} steps of each mode, plain median {statistics.median(times['plain']):.3f}s")
        if args.extend:
            result["extend_seconds"], added = _barrier_time(lambda: proj.extend(0.99, 0.9))
            result["extend_added_directions"] = sum(added.values())
            say(f"extend {result['extend_seconds']:.2f}s (+{result['extend_added_directions']} directions)")
        ratios = {}
        for mode in MODES[1:]:
            r = [t / p for t, p in zip(times[mode], times["plain"])]
            ratios[mode] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        per_rank = collectives.all_gather_object({"comm": max(comm), "peak": _peak_mem_bytes(engine.device)})
        result.update(
            step_seconds={m: statistics.median(v) for m, v in times.items()},
            ratios=ratios,
            comm_bytes_per_rank_per_step=max(x["comm"] for x in per_rank),
            peak_mem_bytes_per_rank=max(x["peak"] for x in per_rank),
            tokens_per_step=args.micro_batch * args.seq * args.grad_accum * world,
            target_params=sum(int(torch.tensor(proj.shapes[n]).prod()) for n in proj.names),
            targets=len(proj.names),
            buckets=len(proj.buckets),
            layers=cfg.num_hidden_layers,
            device=(torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads/rank)"),
        )
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    engine.destroy()
    end_distributed(0)  # a plain return can abort the rank after its result is written (end_process)


# ---------------------------------------------------------------------------------------- launcher
def _launch(args, world: int, mode: str, result: Path) -> dict:
    import torch

    from ds_cl.training.environment import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port", str(port),
           "--module", "ds_cl.tools.bench", "--worker", mode, "--result", str(result),
           "--model", args.model, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
           "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--ratio", str(args.ratio), "--threads-per-rank", str(args.threads_per_rank)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.extend:
        cmd += ["--extend"]
    if args.bucket_numel_per_rank:
        cmd += ["--bucket-numel-per-rank", str(args.bucket_numel_per_rank)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if mode == "memory":
        # A fixed mmap threshold: glibc then returns every freed tensor above 64 KiB to the system at once,
        # so the resident set follows the live tensors (its default threshold adapts upwards and keeps
        # freed blocks of up to 32 MiB resident).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if args.log:
        with open(args.log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ds-cl bench: the world-{world} {mode} run failed (exit {proc.returncode}):\n"
                             f"{Path(args.log).read_text()[-6000:]}")
        return json.loads(result.read_text())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ds-cl bench: the world-{world} {mode} run failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def memory_main(args) -> int:
    from tqdm import tqdm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in tqdm(range(1, args.world + 1), desc="ds-cl bench --memory", disable=args.json):
            rows.append(_launch(args, world, "memory", Path(tmp) / f"m{world}.json"))
    mib = 1 << 20
    print(f"model {args.model}, rank ratio {args.ratio}, {args.micro_batch} x {args.seq} tokens per rank: "
          f"projector memory per rank, model (ds_cl.core.projector_memory) against measured (MiB)")
    print("  world rank | step peak: model  measured  (bases, pre-step copy) | refit: model  measured | "
          "projected step over plain")
    for row in rows:
        for r in row["ranks"]:
            p = r["measured_parts"]
            print(f"  {row['world']:5d} {r['rank']:4d} | {r['step_model_bytes'] / mib:16.1f} "
                  f"{r['step_measured_bytes'] / mib:9.1f}  ({p['bases'] / mib:.1f}, {p['pre_step_copy'] / mib:.1f}) | "
                  f"{r['refit_model_bytes'] / mib:12.1f} {r['refit_measured_bytes'] / mib:9.1f} | "
                  f"{r['step_over_plain_bytes'] / mib:.1f}")
    out = {"model": args.model, "rank_ratio": args.ratio, "micro_batch": args.micro_batch, "seq": args.seq,
           "worlds": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker == "memory":
        memory_worker(args)
        return 0
    if args.worker:
        worker(args)
        return 0
    if args.memory:
        return memory_main(args)
    if args.plan:
        out = plan(args)
        print(f"model {out['model']} ({out['layers']} layers, {out['target_params'] / 1e9:.2f}B target params): "
              f"schedule efficiency (sum over buckets of the busiest rank's work / an even split; 1.00 is ideal)")
        print(f"  world | buckets of {out['bucket_numel_per_rank']} x world elements | fixed buckets of 2^27 elements")
        for row in out["plan"]:
            a, b = row["per_rank"], row["fixed_buckets"]
            print(f"  {row['world']:5d} | {a['buckets']:4d} buckets, {a['schedule_efficiency']:.2f}"
                  f" | {b['buckets']:4d} buckets, {b['schedule_efficiency']:.2f}")
        gib = 1 << 30
        print(f"projector memory per rank (GiB; {out['rank_policy']}, protected share {out['protected_share']:.2f}, "
              f"pre-step copy on the {out['pre_step_copy']}; ds_cl.core.projector_memory)")
        print("  world | step peak: bases + pre-step copy + exchange/temporaries | refit peak | host")
        for row in out["plan"]:
            p = row["memory_parts_of_busiest_rank"]
            print(f"  {row['world']:5d} | {row['projector_extra_bytes_per_rank'] / gib:6.2f}: {p['bases'] / gib:.2f} + "
                  f"{p['pre_step_copy'] / gib:.2f} + {(p['step'] - p['bases'] - p['pre_step_copy']) / gib:.2f}"
                  f" | {row['projector_refit_bytes_per_rank'] / gib:6.2f} | {row['projector_host_bytes_per_rank'] / gib:6.2f}")
        if out["tasks"]:
            growth = (f"adds {out['added_ratio']} x min(m, n)" if out["added_ratio"] is not None else
                      "adds as many as the cap leaves room for (the worst case: the first extend reaches it)")
            print(f"through {out['tasks']} tasks of the accumulate subspace (GiB per rank, computed): the fit above, "
                  f"then each task start's extend {growth}, within max_protected_ratio {out['max_protected_ratio']}")
            print("  world | peak, in phase | fit | steps: first task -> last | extends: first -> last | host peak")
            for row in out["plan"]:
                q = row["sequence"]
                dev = lambda kind: [p["device_bytes_per_rank"] / gib for p in q["phases"] if kind in p["phase"]]  # noqa: E731
                steps, ext = dev("steps"), dev("extend") or [0.0]
                print(f"  {row['world']:5d} | {q['peak_bytes_per_rank'] / gib:6.2f}, {q['peak_phase']} | {dev('fit')[0]:.2f}"
                      f" | {steps[0]:.2f} -> {steps[-1]:.2f} | {ext[0]:.2f} -> {ext[-1]:.2f}"
                      f" | {q['host_peak_bytes_per_rank'] / gib:.2f}")
        if args.json:
            print(json.dumps(out))
        return 0
    from tqdm import tqdm

    runs = [(w, "svd") for w in range(1, args.world)] + [(args.world, "steps")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for world, mode in tqdm(runs, desc="ds-cl bench", disable=args.json):
            results[world] = _launch(args, world, mode, Path(tmp) / f"w{world}.json")
    steps = results[args.world]
    out = {
        "model": args.model,
        "layers": steps["layers"],
        "world": args.world,
        "device": steps["device"],
        "tokens_per_step": steps["tokens_per_step"],
        "target_params": steps["target_params"],
        "rank_ratio": args.ratio,
        "step_seconds": steps["step_seconds"],
        "step_ratio_grad": steps["ratios"]["grad"]["median"],
        "step_ratio_grad_update": steps["ratios"]["grad_update"]["median"],
        "step_ratio_grad_update_audit": steps["ratios"]["grad_update_audit"]["median"],
        "step_ratio_minmax": {m: [r["min"], r["max"]] for m, r in steps["ratios"].items()},
        "svd_seconds": {str(w): r["svd_seconds"] for w, r in sorted(results.items())},
        "svd_work_share_max": {str(w): max(r["svd_work_share_by_rank"]) for w, r in sorted(results.items())},
        "bases_bytes_per_rank": max(steps["bases_bytes_by_rank"]),
        "bases_bytes_by_rank": steps["bases_bytes_by_rank"],
        "bases_bytes_total": sum(steps["bases_bytes_by_rank"]),
        "comm_bytes_per_rank_per_step": steps["comm_bytes_per_rank_per_step"],
        "peak_mem_bytes_per_rank": steps["peak_mem_bytes_per_rank"],
        "buckets": steps["buckets"],
        "steps_measured": args.steps,
    }
    if args.extend:
        out.update({k: steps[k] for k in ("mark_seconds", "extend_seconds", "extend_added_directions")})
    mib = 1 << 20
    print(f"model {args.model} ({out['layers']} layers, {out['target_params'] / 1e6:.1f}M target params), "
          f"world {args.world}, {out['tokens_per_step']} tokens/step, device {out['device']}")
    print(f"  step time plain {out['step_seconds']['plain']:.3f}s | ratio grad {out['step_ratio_grad']:.3f} | "
          f"grad+update {out['step_ratio_grad_update']:.3f} | +audit {out['step_ratio_grad_update_audit']:.3f} "
          f"(median of {args.steps})")
    print("  svd phase " + ", ".join(f"world {w}: {s:.2f}s (largest rank share of the work "
                                     f"{out['svd_work_share_max'][w]:.2f})" for w, s in out["svd_seconds"].items()))
    print(f"  bases {out['bases_bytes_total'] / mib:.1f} MiB total, {out['bases_bytes_per_rank'] / mib:.1f} MiB max "
          f"per rank | sent {out['comm_bytes_per_rank_per_step'] / mib:.2f} MiB/rank/step | "
          f"peak mem {out['peak_mem_bytes_per_rank'] / mib:.0f} MiB/rank")
    if args.extend:
        print(f"  task boundary (world {args.world}): mark {out['mark_seconds']:.2f}s, "
              f"extend {out['extend_seconds']:.2f}s (+{out['extend_added_directions']} directions)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
