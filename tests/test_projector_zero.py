"""SubspaceProjector on real DeepSpeed engines (CPU ranks, gloo) against a one-process reference."""

from __future__ import annotations

import json

import pytest
import torch

from ds_cl.core import subspace as S
from tests.dist_utils import REPO, launch
from tests.reference import STEPS, GAS, boundary_batches, fixed_bases, global_batches, reference_run, tiny_llama

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests" / "projector_ranks.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the cases once: world 2 (ZeRO-3 variants, ZeRO-2, fit, errors), world 3, world 1 (no ZeRO)."""
    out = tmp_path_factory.mktemp("projector")
    torch.save(fixed_bases(tiny_llama()), out / "bases.pt")
    launch(SCRIPT, 2, out, "z3", "z3_offload", "z3_cpuadam", "z3_paper", "z3_noupdate", "z3_bf16", "z2", "z3_audit2", "fit",
           "accumulate", "inputs", "errors")
    launch(SCRIPT, 3, out, "z3_nooverlap", "z3_buckets", "z3_host")
    launch(SCRIPT, 1, out, "z0")
    return out


def load(out, case):
    return torch.load(out / f"{case}.pt", weights_only=False)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# case -> (world, reference kwargs)
EXACT = {
    "z3": (2, {}),                 # overlap_comm + contiguous_gradients on, persistence threshold 0
    "z3_offload": (2, {}),         # offload_optimizer to CPU
    "z3_cpuadam": (2, {}),         # offload_optimizer with DeepSpeed's own DeepSpeedCPUAdam (AdamW mode)
    "z2": (2, {}),                 # ZeRO-2: fragments of flattened groups
    "z3_nooverlap": (3, {}),       # 3 ranks, overlap/contiguous off, default persistence (small params stay gathered)
    "z3_buckets": (3, {}),         # 3 ranks, buckets of 1 or 2 matrices: exchanges pipelined across 12 buckets
    "z3_host": (3, {}),            # 3 ranks, pre_step_copy="host": the copy in reused host buffers
    "z3_audit2": (2, {}),          # audit_every=2: the leak is measured on steps 1, 3, 5 only
    "z0": (1, {}),                 # no ZeRO, one process
}


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_constraint_and_equal_to_one_process(runs, case):
    world, kwargs = EXACT[case]
    bases = torch.load(runs / "bases.pt", weights_only=True)
    got = load(runs, case)
    ref_w, ref_losses, _ = reference_run(world, bases, **kwargs)
    init = dict(tiny_llama().named_parameters())

    for name, w in ref_w.items():
        assert rel(got["weights"][name], w) <= TOL, f"{case}: {name} differs from the one-process run"
    for name, (u, v) in bases.items():
        total = got["weights"][name] - init[name].detach()
        assert total.norm() / init[name].norm() > 1e-3, f"{name} did not train"
        # Independent of audit(): the whole trained change, read back from the gathered fp32 masters.
        assert S.leak(total, u, v) <= TOL, f"{case}: {name} left the complement"
    for step_leaks in got["leaks"]:
        assert set(step_leaks) == set(bases)
        assert max(step_leaks.values()) <= TOL
    every = 2 if case == "z3_audit2" else 1
    assert got["audited_at"] == [step - (step - 1) % every for step in range(1, STEPS + 1)]
    # Gradients flow through the constraint: the same sequences every step, so the loss falls.
    first, last = sum(got["losses"][:GAS]) / GAS, sum(got["losses"][-GAS:]) / GAS
    assert last < first - 0.05, (first, last)
    assert got["losses"] == pytest.approx(ref_losses, abs=1e-5)


def test_paper_projection_removes_only_high_high_block(runs):
    bases = torch.load(runs / "bases.pt", weights_only=True)
    got = load(runs, "z3_paper")
    ref_w, _, _ = reference_run(2, bases, projection="paper")
    init = dict(tiny_llama().named_parameters())
    offdiag = []
    for name, (u, v) in bases.items():
        assert rel(got["weights"][name], ref_w[name]) <= TOL
        d = (got["weights"][name] - init[name].detach()).double()
        assert (u.double().T @ d @ v.double()).norm() / d.norm() <= TOL
        offdiag.append(S.leak(d, u, v))
    # ...and is the weaker constraint: the update does reach U_h or V_h.
    assert max(offdiag) > 1e-2


def test_without_update_projection_adamw_leaks(runs):
    """Why project_update exists: projected gradients alone leak under AdamW (its 1/sqrt(v) scaling)."""
    bases = torch.load(runs / "bases.pt", weights_only=True)
    got = load(runs, "z3_noupdate")
    ref_w, _, ref_leaks = reference_run(2, bases, project_update=False)
    for name in ref_w:
        assert rel(got["weights"][name], ref_w[name]) <= TOL
    worst = max(max(step.values()) for step in got["leaks"])
    assert worst > 1e-2
    for mine, ref in zip(got["leaks"], ref_leaks):
        for name in ref:
            assert mine[name] == pytest.approx(ref[name], rel=1e-3, abs=1e-7)


def test_bf16_leak_bound(runs):
    """bf16 working weights, fp32 masters and gradient accumulation: the update projection stays exact."""
    bases = torch.load(runs / "bases.pt", weights_only=True)
    got = load(runs, "z3_bf16")
    # DeepSpeed's fp32 masters start from the bf16-cast model, so that is the starting point.
    init = {n: p.detach().bfloat16().float() for n, p in tiny_llama().named_parameters()}
    measured = max(S.leak(got["weights"][n] - init[n], u, v) for n, (u, v) in bases.items())
    audited = max(max(step.values()) for step in got["leaks"])
    print(f"bf16 leak: measured on fp32 masters {measured:.2e}, audit() {audited:.2e}")
    assert measured <= TOL and audited <= TOL
    assert sum(got["losses"][-GAS:]) < sum(got["losses"][:GAS]) - 0.05


def test_bases_are_sharded(runs):
    bases = torch.load(runs / "bases.pt", weights_only=True)
    # U_h, V_h, and where it saves flops the short side's complement (S.complement_side), all fp32.
    total = 0
    for u, v in bases.values():
        shape, r = (u.shape[0], v.shape[0]), u.shape[1]
        side = S.complement_side(shape, r)
        total += 4 * (u.numel() + v.numel() + (0 if side is None else (min(shape) - r) * min(shape)))
    for case, world in (("z3", 2), ("z3_nooverlap", 3)):
        per_rank = json.loads((runs / f"{case}.bases_bytes.json").read_text())
        assert len(per_rank) == world and sum(per_rank) == total
        assert max(per_rank) <= 1.25 * total / world, per_rank


def test_fit_matches_one_process_svd_and_importance(runs):
    fit = torch.load(runs / "fit.pt", weights_only=False)
    weights = fit["weights"]
    merged = {k: {} for k in ("fixed", "adaptive", "bucketed")}
    for per_rank in fit["bases"]:
        for k in merged:
            merged[k].update(per_rank[k])
    names = S.select_targets(weights)
    assert set(merged["fixed"]) == set(names)
    for name in names:
        w = weights[name]
        r = fit["ranks_fixed"][name]
        assert r == S.FixedRank(0.5).rank(w.shape)
        u_ref, v_ref = S.svd_bases(w.double(), r, torch.float64)
        u, v = merged["fixed"][name]
        # Singular vectors are defined up to sign: compare the subspaces through their projectors.
        assert torch.allclose(u.double() @ u.double().T, u_ref.double() @ u_ref.double().T, atol=1e-4)
        assert torch.allclose(v.double() @ v.double().T, v_ref.double() @ v_ref.double().T, atol=1e-4)
        # The same SVDs when the weights reach their owners in many pipelined buckets.
        ub, vb = merged["bucketed"][name]
        assert torch.allclose(ub.double() @ ub.double().T, u_ref.double() @ u_ref.double().T, atol=1e-4)
        assert torch.allclose(vb.double() @ vb.double().T, v_ref.double() @ v_ref.double().T, atol=1e-4)
    assert fit["buckets"] == 1 and fit["buckets_small"] > 4, (fit["buckets"], fit["buckets_small"])

    # Importance: recompute in one process on the same tokens and masks the two ranks used.
    model = tiny_llama()
    model.load_state_dict(weights)
    model.eval()
    layers = sorted({S.layer_of(n) for n in names})
    sums = {layer: [0.0, 0.0] for layer in layers}
    state = {}

    def hook(layer):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            s, c = S.token_cosine_sum(x_in, x_out, state["mask"])
            sums[layer][0] += s
            sums[layer][1] += c
        return fn

    for layer in layers:
        model.get_submodule(layer).register_forward_hook(hook(layer), with_kwargs=True)
    with torch.no_grad():
        for rank in range(2):
            ids = global_batches()[0][0][rank]
            mask = torch.ones_like(ids)
            mask[:, -3:] = 0
            state["mask"] = mask
            model(input_ids=ids, attention_mask=mask)
    expected = S.layer_importance({k: v[0] for k, v in sums.items()}, {k: v[1] for k, v in sums.items()})
    assert fit["importance"] == pytest.approx(expected, abs=1e-5)
    for name in names:
        k = min(weights[name].shape)
        r = fit["ranks_adaptive"][name]
        assert 0.1 * k - 1e-9 <= r <= 0.8 * k + 1e-9
        assert r == S.AdaptiveRank(0.1, 0.8).rank(weights[name].shape, expected[S.layer_of(name)])
        assert merged["adaptive"][name][0].shape == (weights[name].shape[0], r)


@pytest.mark.parametrize("case, needles", [
    ("pattern_matches_nothing", ["no_such_module", "matches no parameter"]),
    ("not_2d", ["input_layernorm.weight", "2-D"]),
    ("bad_projection", ["sideways"]),
    ("bad_bucket", ["bucket_numel_per_rank must be positive, got 0"]),
    ("bad_pre_step_copy", ["pre_step_copy must be 'auto', 'device' or 'host', got 'gpu'"]),
    ("bad_audit_every", ["audit_every must be >= 1, got 0"]),
    ("wrong_shape", ["q_proj.weight", "42 x 51"]),
    ("not_orthonormal", ["q_proj.weight", "orthonormal"]),
    ("rank_too_big", ["o_proj.weight", "rank 43 > min(m, n) = 42"]),
    ("unknown_name", ["embed_tokens.weight", "not a projector target"]),
    ("adaptive_without_batches", ["importance_batches"]),
    ("bad_policy", ["sometimes"]),
    ("extend_without_mark", ["mark()"]),
    ("inputs_no_batches", ["boundary batches: none given"]),
    ("inputs_uneven_batches", ["boundary batches differ in number across ranks (this rank", "max 2, min 1"]),
    ("inputs_not_linear", ["model.embed_tokens.weight is not the weight of a torch.nn.Linear"]),
    ("zero_stage_1", ["ZeRO stage 1"]),
    ("bf16_without_fp32_accum", ["grad_accum_dtype"]),
])
def test_bad_input_is_a_clear_error(runs, case, needles):
    msg = json.loads((runs / "errors.json").read_text())[case]
    assert msg.startswith("RuntimeError" if case == "extend_without_mark" else "ValueError"), msg
    for needle in needles:
        assert needle in msg, msg


def test_state_dict_round_trip(runs):
    fit = torch.load(runs / "fit.pt", weights_only=False)
    assert fit["state_round_trip"] is True
    assert "resume on the same number of ranks" in fit["wrong_world_error"]


def test_accumulate_protects_the_finished_tasks_update(runs):
    """extend(): the old bases stay, the added directions hold 90% of the task's update, the ranks agree
    on every rank, the state (task-start weights included) round-trips, and the next task's update is
    orthogonal to the grown subspace."""
    acc = torch.load(runs / "accumulate.pt", weights_only=False)
    per_rank = acc["per_rank"]
    assert per_rank[0]["ranks"] == per_rank[1]["ranks"] and per_rank[0]["added"] == per_rank[1]["added"]
    assert all(r["round_trip"] for r in per_rank)
    ranks, added = per_rank[0]["ranks"], per_rank[0]["added"]
    before = {n: b for r in per_rank for n, b in r["before"].items()}
    after = {n: b for r in per_rank for n, b in r["after"].items()}
    names = S.select_targets(acc["w0"])
    assert set(after) == set(names)
    grew = 0
    for n in names:
        r0 = acc["ranks_before"][n]
        assert ranks[n] == r0 + added[n] and ranks[n] <= 0.9 * min(acc["w0"][n].shape) + 1e-9
        u, v = (t.double() for t in after[n])
        for b in (u, v):
            assert torch.allclose(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-6), n
        u0, v0 = (t.double() for t in before[n])
        assert torch.allclose(u[:, :r0] @ u[:, :r0].T, u0 @ u0.T, atol=1e-6), f"{n}: the old subspace moved"
        assert torch.allclose(v[:, :r0] @ v[:, :r0].T, v0 @ v0.T, atol=1e-6), f"{n}: the old subspace moved"
        dw1 = (acc["w1"][n] - acc["w0"][n]).double()
        rest = dw1 - u @ (u.T @ dw1)
        rest = rest - (rest @ v) @ v.T
        if added[n] and ranks[n] < 0.9 * min(dw1.shape) - 1:  # not capped: 90% of |dW|^2 now protected
            assert rest.norm() ** 2 <= 0.1 * dw1.norm() ** 2 + 1e-12, n
        grew += added[n] > 0
        dw2 = (acc["w2"][n] - acc["w1"][n]).double()
        assert S.leak(dw2, u, v) < 1e-5, f"{n}: the second task's update leaks into the grown subspace"
    assert grew == len(names), f"only {grew} of {len(names)} targets gained directions"


def hooked_inputs(weights, names):
    """{target: the inputs (tokens x n, float64) task A's boundary batches of both ranks fed it}, in one
    process with the boundary's weights; masked tokens left out."""
    model = tiny_llama()
    model.load_state_dict(weights)
    model.eval()
    xs, state = {n: [] for n in names}, {}

    def hook(n):
        def fn(module, args, output):
            x = args[0]
            xs[n].append(x.reshape(-1, x.shape[-1])[state["mask"].reshape(-1).bool()].double())
        return fn

    for n in names:
        model.get_submodule(n.rpartition(".")[0]).register_forward_hook(hook(n))
    with torch.no_grad():
        for rank in range(2):
            for batch in boundary_batches(rank):
                state["mask"] = batch["attention_mask"]
                model(**batch)
    return {n: torch.cat(x) for n, x in xs.items()}


def test_inputs_boundary_protects_the_finished_tasks_inputs(runs):
    """extend_inputs() on 2 ZeRO-3 ranks: the added right directions are the ones a one-process covariance of
    task A's (masked) inputs gives, the added left ones span the outputs those inputs produce, the same in one
    bucket as in twelve; then task B's update leaks <= 1e-5 and maps A's protected inputs to ~0."""
    from tests.projector_ranks import INPUTS

    res = load(runs, "inputs")
    per_rank = res["per_rank"]
    assert per_rank[0]["ranks"] == per_rank[1]["ranks"] and per_rank[0]["added"] == per_rank[1]["added"]
    assert per_rank[0]["added_one_bucket"] == per_rank[0]["added"]
    assert per_rank[0]["buckets"][0] > 4 and per_rank[0]["buckets"][1] == 1, per_rank[0]["buckets"]
    before = {n: b for r in per_rank for n, b in r["before"].items()}
    after = {n: b for r in per_rank for n, b in r["after"].items()}
    one_bucket = {n: b for r in per_rank for n, b in r["after_one_bucket"].items()}
    added, w1, w2 = per_rank[0]["added"], res["w1"], res["w2"]
    names = S.select_targets(w1)
    xs = hooked_inputs(w1, names)
    capped = 0
    for n in names:
        x = xs[n]
        c = x.T @ x
        u0, v0 = (t.double() for t in before[n])
        u, v = (t.double() for t in after[n])
        r0, k = u0.shape[1], added[n]
        assert k > 0 and u.shape[1] == v.shape[1] == r0 + k == per_rank[0]["ranks"][n], n
        for b in (u, v):
            assert torch.allclose(b.T @ b, torch.eye(r0 + k, dtype=torch.float64), atol=1e-6), n
        assert torch.allclose(u[:, :r0] @ u[:, :r0].T, u0 @ u0.T, atol=1e-6), f"{n}: the old subspace moved"
        assert torch.allclose(v[:, :r0] @ v[:, :r0].T, v0 @ v0.T, atol=1e-6), f"{n}: the old subspace moved"
        for b, ob in zip((u, v), one_bucket[n]):
            assert torch.allclose(b @ b.T, ob.double() @ ob.double().T, atol=1e-5), f"{n}: one bucket differs"
        u_d, v_d = u[:, r0:], v[:, r0:]
        # As many directions as the one-process covariance asks, and the most energy outside V_h that k can hold.
        room = S.max_protected_rank(w1[n].shape, INPUTS["max_ratio"]) - r0
        assert k == S.input_directions(c, v0, INPUTS["energy"], room).shape[1], n
        rest = c - v0 @ (v0.T @ c)
        rest = rest - (rest @ v0) @ v0.T
        evals = torch.linalg.eigvalsh(rest).flip(0)
        held = torch.trace(v_d.T @ c @ v_d)
        assert held >= evals[:k].sum() * (1 - 1e-5), n
        if k < room:
            assert held >= INPUTS["energy"] * evals.sum() * (1 - 1e-6), n
        capped += k == room
        # The left side: the outputs of the protected inputs, outside U_h.
        y = w1[n].double() @ v_d
        y = y - u0 @ (u0.T @ y)
        assert (y - u_d @ (u_d.T @ y)).norm() <= 1e-6 * y.norm(), n
        # Task B: trained, exact, and blind to A's protected inputs.
        dw = (w2[n] - w1[n]).double()
        assert dw.norm() > 1e-3 * w1[n].norm(), f"{n} did not train in task B"
        assert S.leak(dw, u, v) <= TOL, n
        assert (dw @ v_d).norm() <= TOL * dw.norm(), n
        protected = x @ v_d @ v_d.T
        assert (dw @ protected.T).norm() <= TOL * dw.norm() * protected.norm(), n
    assert 0 < capped < len(names), capped  # both cases met: the energy reached, and the cap
    assert max(max(step.values()) for step in res["leaks"]) <= TOL
