"""Rank script for the projector tests: run one or more cases on real DeepSpeed engines.

    deepspeed --num_gpus N tests/projector_ranks.py OUT_DIR CASE [CASE ...]

Each case builds the same tiny LLaMA (awkward sizes: hidden 51, intermediate 37), trains it with
`SubspaceProjector.step()` on this rank's share of a fixed global batch set, and rank 0 writes
OUT_DIR/CASE.pt with the gathered fp32 weights, losses and per-step audit() leaks. The test compares
that against a one-process pure-torch run of the same maths (tests/reference.py).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_cl import SubspaceProjector  # noqa: E402
from ds_cl.training.environment import end_distributed, init_distributed  # noqa: E402
from ds_cl.core.subspace import AdaptiveRank, FixedRank  # noqa: E402
from tests.reference import (EPS, GAS, LR, MICRO_BS, STEPS, WEIGHT_DECAY, CLIP, boundary_batches,  # noqa: E402
                             global_batches, tiny_llama)

# case name -> (ds_config overrides, projector kwargs)
BASE_ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
              "stage3_param_persistence_threshold": 0}
CASES = {
    "z3": ({"zero_optimization": BASE_ZERO3}, {}),
    "z3_nooverlap": ({"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": False}}, {}),
    "z3_offload": ({"zero_optimization": {**BASE_ZERO3, "offload_optimizer": {"device": "cpu"}},
                    "zero_force_ds_cpu_optimizer": False}, {}),
    # DeepSpeed's own optimizer, as the trainer's offload config gets it: DeepSpeedCPUAdam (AdamW mode).
    "z3_cpuadam": ({"zero_optimization": {**BASE_ZERO3, "offload_optimizer": {"device": "cpu"}},
                    "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "eps": EPS}}},
                   {}),
    "z3_paper": ({"zero_optimization": BASE_ZERO3}, {"projection": "paper"}),
    # Small buckets: many exchanges in flight at once, ranks that own nothing in a bucket.
    "z3_noupdate": ({"zero_optimization": BASE_ZERO3}, {"project_update": False, "bucket_numel_per_rank": 1000}),
    "z3_buckets": ({"zero_optimization": BASE_ZERO3}, {"bucket_numel_per_rank": 700}),
    # The pre-step copy in separate host buffers reused across steps (the default on an accelerator).
    "z3_host": ({"zero_optimization": BASE_ZERO3}, {"pre_step_copy": "host", "bucket_numel_per_rank": 700}),
    "z3_audit2": ({"zero_optimization": BASE_ZERO3}, {"audit_every": 2}),
    "z3_bf16": ({"zero_optimization": BASE_ZERO3, "bf16": {"enabled": True},
                 "data_types": {"grad_accum_dtype": "fp32"}}, {}),
    "z2": ({"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}}, {}),
    "z0": ({"zero_optimization": {"stage": 0}}, {}),
}


def ds_config(overrides: dict, world: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BS,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": MICRO_BS * GAS * world,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(overrides)
    return cfg


def make_engine(overrides: dict, world: int):
    model = tiny_llama()
    # A config "optimizer" section: DeepSpeed builds its own (DeepSpeedCPUAdam under offload).
    opt = None if "optimizer" in overrides else torch.optim.AdamW(model.parameters(), lr=LR,
                                                                   weight_decay=WEIGHT_DECAY, eps=EPS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=model.parameters(),
                                      config=ds_config(overrides, world))
    if "optimizer" in overrides:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        assert isinstance(engine.optimizer.optimizer, DeepSpeedCPUAdam), type(engine.optimizer.optimizer)
    return engine


def gather_weights(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO: the parameter is the master
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def run_training(name: str, out_dir: Path, rank: int, world: int) -> None:
    overrides, kwargs = CASES[name]
    engine = make_engine(overrides, world)
    proj = SubspaceProjector(engine, **kwargs)
    bases = torch.load(out_dir / "bases.pt", weights_only=True)
    proj.set_bases(bases)
    batches = global_batches()
    losses, leaks, audited_at = [], [], []
    for step in range(STEPS):
        for micro in range(GAS):
            ids = batches[step][micro][rank].to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            proj.step()
            lt = loss.detach().float().clone()
            dist.all_reduce(lt)
            losses.append(float(lt) / world)
        leaks.append(proj.audit())
        audited_at.append(proj.stats["audited_at"])
    weights = gather_weights(engine)
    if rank == 0:
        torch.save({"weights": weights, "losses": losses, "leaks": leaks, "audited_at": audited_at,
                    "bases_bytes": proj.bases_bytes(), "owner": proj.owner}, out_dir / f"{name}.pt")
    # every rank reports its own bases bytes, for the sharding check
    per_rank = [None] * world
    dist.all_gather_object(per_rank, proj.bases_bytes())
    if rank == 0:
        (out_dir / f"{name}.bases_bytes.json").write_text(json.dumps(per_rank))
    engine.destroy()


def run_fit(out_dir: Path, rank: int, world: int) -> None:
    """fit() end to end: bases from the gathered fp32 weights, fixed and adaptive policies."""
    engine = make_engine(CASES["z3"][0], world)
    proj = SubspaceProjector(engine)
    ranks_fixed = proj.fit(FixedRank(0.5))
    bases_fixed = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    bucketed = SubspaceProjector(engine, bucket_numel_per_rank=1000)
    bucketed.fit(FixedRank(0.5))
    bases_bucketed = {n: tuple(t.cpu() for t in b) for n, b in bucketed.bases.items()}
    ids = global_batches()[0][0][rank].to(engine.device)
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0  # masked tokens must not count
    ranks_adaptive = proj.fit(AdaptiveRank(0.1, 0.8), importance_batches=[{"input_ids": ids, "attention_mask": mask}])
    bases_adaptive = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    # state_dict round trip through a file, as a checkpoint does it (one file per rank)
    torch.save(proj.state_dict(), out_dir / f"proj_state_{rank}.pt")
    restored = SubspaceProjector(engine)
    restored.load_state_dict(torch.load(out_dir / f"proj_state_{rank}.pt", weights_only=True))
    same = restored.ranks == proj.ranks and restored.bases.keys() == proj.bases.keys() and all(
        torch.equal(restored.bases[n][i], proj.bases[n][i]) for n in proj.bases for i in (0, 1))
    wrong_world = dict(proj.state_dict(), world=world + 1)
    try:
        restored.load_state_dict(wrong_world)
        wrong_world_error = "no error"
    except ValueError as e:
        wrong_world_error = str(e)
    weights = gather_weights(engine)
    everyone = [None] * world
    dist.all_gather_object(everyone, {"fixed": bases_fixed, "adaptive": bases_adaptive, "bucketed": bases_bucketed})
    if rank == 0:
        torch.save({"weights": weights, "ranks_fixed": ranks_fixed, "ranks_adaptive": ranks_adaptive,
                    "importance": proj.importance, "bases": everyone, "owner": proj.owner,
                    "buckets": len(proj.buckets), "buckets_small": len(bucketed.buckets),
                    "state_round_trip": same, "wrong_world_error": wrong_world_error},
                   out_dir / "fit.pt")
    engine.destroy()


def run_accumulate(out_dir: Path, rank: int, world: int) -> None:
    """fit -> mark -> train -> extend -> train: the subspace grows by the first task's update."""
    engine = make_engine(CASES["z3"][0], world)
    proj = SubspaceProjector(engine)
    batches = global_batches()

    def train(steps):
        for step in steps:
            for micro in range(GAS):
                ids = batches[step][micro][rank].to(engine.device)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                proj.step()

    proj.fit(FixedRank(0.25))
    before = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    ranks_before = dict(proj.ranks)
    proj.mark()
    w0 = gather_weights(engine)
    train(range(STEPS // 2))
    w1 = gather_weights(engine)
    added = proj.extend(energy=0.9, max_ratio=0.9)
    after = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    torch.save(proj.state_dict(), out_dir / f"acc_state_{rank}.pt")
    restored = SubspaceProjector(engine)
    restored.load_state_dict(torch.load(out_dir / f"acc_state_{rank}.pt", weights_only=True))
    same = restored.ranks == proj.ranks and restored.anchor.keys() == proj.anchor.keys() and all(
        torch.equal(restored.anchor[n], proj.anchor[n]) for n in proj.anchor)
    train(range(STEPS // 2, STEPS))
    w2 = gather_weights(engine)
    everyone = [None] * world
    dist.all_gather_object(everyone, {"before": before, "after": after, "ranks": dict(proj.ranks), "added": added,
                                      "round_trip": same})
    if rank == 0:
        torch.save({"w0": w0, "w1": w1, "w2": w2, "ranks_before": ranks_before, "per_rank": everyone},
                   out_dir / "accumulate.pt")
    engine.destroy()


# The inputs boundary's settings, read by the test too.
INPUTS = {"fit_ratio": 0.25, "energy": 0.9, "max_ratio": 0.9, "steps_a": 2, "steps_b": 3}


def run_inputs(out_dir: Path, rank: int, world: int) -> None:
    """fit -> train task A -> extend_inputs with A's batches -> train task B (other sequences), in buckets
    of one or two matrices (a forward pass per bucket); and the same boundary in one bucket (q/k/v and
    gate/up sharing their inputs' covariance) by a second projector, for comparison."""
    engine = make_engine(CASES["z3"][0], world)
    proj = SubspaceProjector(engine, bucket_numel_per_rank=1000)
    s = INPUTS

    def train(batches, steps):
        leaks = []
        for step in range(steps):
            for micro in range(GAS):
                ids = batches[step][micro][rank].to(engine.device)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                proj.step()
            leaks.append(proj.audit())
        return leaks

    proj.fit(FixedRank(s["fit_ratio"]))
    train(global_batches(), s["steps_a"])
    before = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    ranks_before = dict(proj.ranks)
    w1 = gather_weights(engine)
    batches = [{k: t.to(engine.device) for k, t in b.items()} for b in boundary_batches(rank)]
    full_before, gathered = {}, [None] * world
    dist.all_gather_object(gathered, before)
    for part in gathered:
        full_before.update(part)
    one_bucket = SubspaceProjector(engine)
    one_bucket.set_bases(full_before)
    added_one_bucket = one_bucket.extend_inputs(batches, s["energy"], s["max_ratio"])
    after_one_bucket = {n: tuple(t.cpu() for t in b) for n, b in one_bucket.bases.items()}
    buckets_one = len(one_bucket.buckets)
    del one_bucket
    added = proj.extend_inputs(batches, s["energy"], s["max_ratio"])
    after = {n: tuple(t.cpu() for t in b) for n, b in proj.bases.items()}
    leaks = train(global_batches(seed=7), s["steps_b"])
    w2 = gather_weights(engine)
    everyone = [None] * world
    dist.all_gather_object(everyone, {"before": before, "after": after, "ranks": dict(proj.ranks), "added": added,
                                      "buckets": (len(proj.buckets), buckets_one), "added_one_bucket": added_one_bucket,
                                      "after_one_bucket": after_one_bucket})
    if rank == 0:
        torch.save({"w1": w1, "w2": w2, "leaks": leaks, "ranks_before": ranks_before, "per_rank": everyone},
                   out_dir / "inputs.pt")
    engine.destroy()


def run_errors(out_dir: Path, rank: int, world: int) -> None:
    """Bad input: each case records the error message (or 'no error')."""
    results = {}

    def record(key, fn):
        try:
            fn()
            results[key] = "no error"
        except (ValueError, TypeError, RuntimeError) as e:
            results[key] = f"{type(e).__name__}: {e}"

    engine = make_engine(CASES["z3"][0], world)
    record("pattern_matches_nothing", lambda: SubspaceProjector(engine, targets=[r"q_proj\.weight$", "no_such_module"]))
    record("not_2d", lambda: SubspaceProjector(engine, targets=[r"input_layernorm\.weight$"]))
    record("bad_projection", lambda: SubspaceProjector(engine, projection="sideways"))
    record("bad_bucket", lambda: SubspaceProjector(engine, bucket_numel_per_rank=0))
    record("bad_pre_step_copy", lambda: SubspaceProjector(engine, pre_step_copy="gpu"))
    record("bad_audit_every", lambda: SubspaceProjector(engine, audit_every=0))
    proj = SubspaceProjector(engine)
    q = "model.layers.0.self_attn.q_proj.weight"
    m, n = proj.shapes[q]
    u, _ = torch.linalg.qr(torch.randn(m, 4))
    v, _ = torch.linalg.qr(torch.randn(n, 4))
    record("wrong_shape", lambda: proj.set_bases({q: (v, u)}))
    record("not_orthonormal", lambda: proj.set_bases({q: (u * 2, v)}))
    o = "model.layers.0.self_attn.o_proj.weight"  # 51 x 42: an orthonormal U_h of 43 columns exists
    record("rank_too_big", lambda: proj.set_bases({o: (torch.linalg.qr(torch.randn(51, 43))[0], torch.randn(42, 43))}))
    record("unknown_name", lambda: proj.set_bases({"model.embed_tokens.weight": (u, v)}))
    record("adaptive_without_batches", lambda: proj.fit("adaptive"))
    record("bad_policy", lambda: proj.fit("sometimes"))
    record("extend_without_mark", lambda: proj.extend(0.9, 0.9))
    batches = boundary_batches(rank)
    record("inputs_no_batches", lambda: proj.extend_inputs([], 0.9, 0.9))
    record("inputs_uneven_batches", lambda: proj.extend_inputs(batches[:1 + rank], 0.9, 0.9))
    embed = SubspaceProjector(engine, targets=[r"q_proj\.weight$", r"embed_tokens\.weight$"])
    record("inputs_not_linear", lambda: embed.extend_inputs(batches, 0.9, 0.9))
    engine.destroy()
    engine = make_engine({"zero_optimization": {"stage": 1}}, world)
    record("zero_stage_1", lambda: SubspaceProjector(engine))
    engine.destroy()
    engine = make_engine({"zero_optimization": BASE_ZERO3, "bf16": {"enabled": True}}, world)
    record("bf16_without_fp32_accum", lambda: SubspaceProjector(engine))
    engine.destroy()
    if rank == 0:
        (out_dir / "errors.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, cases = Path(args[0]), args[1:]
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    try:
        for case in cases:
            if case == "fit":
                run_fit(out_dir, rank, world)
            elif case == "accumulate":
                run_accumulate(out_dir, rank, world)
            elif case == "inputs":
                run_inputs(out_dir, rank, world)
            elif case == "errors":
                run_errors(out_dir, rank, world)
            else:
                run_training(case, out_dir, rank, world)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
    end_distributed()  # barrier, destroy, and no interpreter finalization (a plain exit can abort a rank)


if __name__ == "__main__":
    main()
