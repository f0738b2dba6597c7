"""Subspace maths on full matrices, against float64 references."""

import math

import pytest
import torch

from ds_cl.core import subspace as S


def orthonormal(m, r, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("m, n, r", [(37, 51, 9), (64, 16, 8), (20, 20, 1)])
def test_two_sided_matches_float64_formula(m, n, r):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    U, V = orthonormal(m, r, 1), orthonormal(n, r, 2)
    expected = (torch.eye(m, dtype=torch.float64) - U @ U.T) @ G @ (torch.eye(n, dtype=torch.float64) - V @ V.T)
    got = S.project(G.float(), U.float(), V.float(), "two_sided").double()
    assert torch.allclose(got, expected, atol=1e-5)
    assert S.leak(got, U.float(), V.float()) < 1e-6
    # A projection: applying it twice changes nothing.
    assert torch.allclose(S.project(got.float(), U.float(), V.float()).double(), got, atol=1e-5)


def test_paper_formula_removes_only_the_high_high_block():
    m, n, r = 30, 40, 6
    G = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    U, V = orthonormal(m, r, 4), orthonormal(n, r, 5)
    expected = G - U @ U.T @ G @ V @ V.T
    got = S.project(G, U, V, "paper")
    assert torch.allclose(got, expected, atol=1e-12)
    assert (U.T @ got @ V).norm() < 1e-10
    assert S.leak(got, U, V) > 0.1  # the weaker constraint: U_h^T G' is not zero


def test_batched_projection_equals_per_matrix():
    G = torch.randn(3, 12, 10, dtype=torch.float64)
    U = torch.stack([orthonormal(12, 4, i) for i in range(3)])
    V = torch.stack([orthonormal(10, 4, 10 + i) for i in range(3)])
    batched = S.project(G, U, V)
    for i in range(3):
        assert torch.allclose(batched[i], S.project(G[i], U[i], V[i]), atol=1e-12)


def test_rank_zero_and_zero_update():
    G = torch.randn(5, 4)
    assert S.project(G, torch.zeros(5, 0), torch.zeros(4, 0)) is G
    assert S.leak(torch.zeros(5, 4), orthonormal(5, 2, 0).float(), orthonormal(4, 2, 1).float()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_bases_are_top_singular_vectors(dtype):
    W = torch.randn(40, 25, generator=torch.Generator().manual_seed(7))
    U, V = S.svd_bases(W, 10, dtype)
    assert U.dtype == torch.float32 and U.shape == (40, 10) and V.shape == (25, 10)
    u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
    ref_u, ref_v = u[:, :10], vh[:10].T
    assert torch.allclose(U.double() @ U.double().T, ref_u @ ref_u.T, atol=1e-5)
    assert torch.allclose(V.double() @ V.double().T, ref_v @ ref_v.T, atol=1e-5)
    # The high subspace carries the top singular values: U_h^T W V_h = diag(s[:r]).
    assert torch.allclose((U.double().T @ W.double() @ V.double()).diagonal().abs(), s[:10], rtol=1e-4)


def test_svd_rejects_bad_input():
    with pytest.raises(ValueError, match="rank 6 outside"):
        S.svd_bases(torch.randn(5, 4), 6)
    with pytest.raises(ValueError, match="non-finite"):
        S.svd_bases(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        S.svd_bases(torch.randn(3), 1)


def test_fixed_rank_policy():
    assert S.FixedRank(0.5).rank((37, 51)) == round(0.5 * 37)
    assert S.FixedRank(1.0).rank((8, 3)) == 3
    assert S.FixedRank(0.0).rank((8, 3)) == 0
    with pytest.raises(ValueError):
        S.FixedRank(1.5)


@pytest.mark.parametrize("k", [3, 10, 37, 51, 4096])  # k = 1 has no integer in [0.1, 0.8]
def test_adaptive_rank_stays_within_bounds_and_follows_importance(k):
    policy = S.AdaptiveRank(0.1, 0.8)
    ranks = [policy.rank((k, k + 5), imp) for imp in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]]
    for r in ranks:
        assert math.ceil(0.1 * k - 1e-9) <= r <= math.floor(0.8 * k + 1e-9)
    assert ranks == sorted(ranks)  # more important layers keep more directions
    if k >= 100:
        assert ranks[0] == round(0.1 * k) and ranks[-1] == math.floor(0.8 * k)  # 3276.8 is clamped down
        assert ranks[3] == round(0.45 * k)  # r = mrr + I (trr - mrr) at I = 0.5


def test_adaptive_rank_rejects_bad_parameters():
    with pytest.raises(ValueError, match="mrr <= trr"):
        S.AdaptiveRank(0.9, 0.2)
    with pytest.raises(ValueError, match="importance"):
        S.AdaptiveRank().rank((10, 10), 1.5)
    with pytest.raises(ValueError, match="needs a layer importance"):
        S.AdaptiveRank().rank((10, 10), None)


def test_rank_policy_from_specs():
    assert S.rank_policy_from("fixed") == S.FixedRank()
    assert S.rank_policy_from({"policy": "adaptive", "mrr": 0.2}) == S.AdaptiveRank(mrr=0.2)
    with pytest.raises(ValueError, match="'fixed' or 'adaptive'"):
        S.rank_policy_from({"policy": "maybe"})


def test_layer_importance_minmax_normalisation():
    imp = S.layer_importance({"a": 9.0, "b": 5.0, "c": 7.0}, {"a": 10, "b": 10, "c": 10})
    assert imp == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.5})
    # No evidence to tell layers apart: protect all as much as the policy allows.
    assert S.layer_importance({"a": 3.0, "b": 6.0}, {"a": 4, "b": 8}) == {"a": 1.0, "b": 1.0}
    assert S.layer_importance({"a": -2.0, "b": 6.0}, {"a": 4, "b": 4}, "none") == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="no unmasked token"):
        S.layer_importance({"a": 0.0}, {"a": 0})


def test_token_cosine_sum_ignores_masked_tokens():
    x = torch.randn(2, 4, 8)
    y = x.clone()
    y[:, 2:] = -x[:, 2:]  # masked positions would drag the mean to 0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    s, c = S.token_cosine_sum(x, y, mask)
    assert c == 4 and s == pytest.approx(4.0, abs=1e-5)


def test_default_targets_on_llama_names():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"]
    assert S.select_targets(names) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert S.layer_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert S.layer_of("lm_head.weight") is None
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        S.select_targets(names, ["q_proj", "nope"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        S.select_targets(names, ["q_proj("])


def test_check_bases():
    U, V = orthonormal(6, 2, 0).float(), orthonormal(4, 2, 1).float()
    S.check_bases("w", (6, 4), U, V)
    with pytest.raises(ValueError, match="w: weight is 6 x 4"):
        S.check_bases("w", (6, 4), V, U)
    with pytest.raises(ValueError, match="not orthonormal"):
        S.check_bases("w", (6, 4), U * 1.1, V)
    with pytest.raises(ValueError, match="columns"):
        S.check_bases("w", (6, 4), U, orthonormal(4, 3, 2).float())


def test_update_directions_hold_the_asked_energy_with_the_fewest_directions():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    dw = (u * s) @ v.T
    share = torch.cumsum(s * s, 0) / (s * s).sum()  # 0.76, 0.95, 0.99, ...
    for energy, k in ((0.5, 1), (0.9, 2), (0.95, 2 if share[1] >= 0.95 else 3), (1.0, 6)):
        ud, vd = S.update_directions(dw.float(), energy, max_rank=30)
        assert ud.shape == (40, k) and vd.shape == (30, k), (energy, ud.shape)
        assert torch.allclose(ud.double() @ ud.double().T, u[:, :k] @ u[:, :k].T, atol=1e-5)
    assert S.update_directions(dw.float(), 1.0, max_rank=3)[0].shape[1] == 3  # the cap wins
    assert S.update_directions(torch.zeros(40, 30), 0.9, max_rank=30)[0].shape == (40, 0)
    with pytest.raises(ValueError, match="non-finite"):
        S.update_directions(torch.full((4, 3), float("nan")), 0.9, 3)
    with pytest.raises(ValueError, match="energy"):
        S.update_directions(dw.float(), 1.5, 3)


def test_extend_bases_keeps_the_old_directions_and_stays_orthonormal():
    torch.manual_seed(1)
    w = torch.randn(20, 16)
    u_h, v_h = S.svd_bases(w, 5)
    # An update projected away from the bases, then its top directions, added five times over.
    for _ in range(5):
        dw = S.project(torch.randn(20, 16), u_h, v_h)
        ud, vd = S.update_directions(dw, 0.3, max_rank=2)
        r = u_h.shape[1]
        u_new, v_new = S.extend_bases(u_h, v_h, ud, vd)
        assert u_new.shape == (20, r + ud.shape[1]) and v_new.shape == (16, r + vd.shape[1])
        assert torch.equal(u_new[:, :r], u_h) and torch.equal(v_new[:, :r], v_h)
        S.check_bases("w", (20, 16), u_new, v_new, tol=1e-6)
        assert S.leak(S.project(dw, u_new, v_new), u_new, v_new) < 1e-6
        u_h, v_h = u_new, v_new
    assert S.extend_bases(u_h, v_h, torch.zeros(20, 0), torch.zeros(16, 0))[0] is u_h


def inputs(tokens, n, scales, seed):
    """tokens x n inputs whose covariance has eigenvalues ~ scales^2 (len(scales) <= n: that rank)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, len(scales), generator=g, dtype=torch.float64)
    return (z * torch.tensor(scales, dtype=torch.float64)) @ orthonormal(n, len(scales), seed + 1).T


def residual_eigenvalues(c, v_h):
    p = torch.eye(c.shape[0], dtype=torch.float64) - v_h @ v_h.T
    return torch.linalg.eigvalsh(p @ c @ p).flip(0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_input_directions_hold_the_asked_share_of_the_inputs_outside_v_h(energy):
    x = inputs(300, 30, [2.0 ** -i for i in range(30)], seed=3)
    c = x.T @ x
    v_h = orthonormal(30, 8, 4)
    v_d = S.input_directions(c, v_h, energy, max_rank=30)
    k = v_d.shape[1]
    assert 0 < k <= 22
    assert torch.allclose(v_d.T @ v_d, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert (v_h.T @ v_d).abs().max() < 1e-12
    evals = residual_eigenvalues(c, v_h)
    held = torch.trace(v_d.T @ c @ v_d)
    assert held >= energy * evals.sum() * (1 - 1e-12)  # the asked share of what V_h leaves ...
    assert evals[:k - 1].sum() < energy * evals.sum()  # ... with the fewest directions ...
    assert held >= evals[:k].sum() * (1 - 1e-10)  # ... the top ones
    # What the next task may not touch: an update projected with the grown basis maps these inputs to 0.
    u_h = orthonormal(40, 8, 5)
    u_d = S.output_directions(torch.randn(40, 30, dtype=torch.float64), u_h, v_d)
    u, v = S.extend_bases(u_h, v_h, u_d, v_d)
    dw = S.project(torch.randn(40, 30, dtype=torch.float64), u, v)
    protected = x @ v_d @ v_d.T
    assert (dw @ protected.T).norm() <= 1e-12 * dw.norm() * protected.norm()


def test_input_directions_rank_cap_and_edge_cases():
    v_h = orthonormal(30, 8, 4)
    low = inputs(100, 30, [3.0, 2.0, 1.0], seed=6)  # rank 3
    assert S.input_directions(low.T @ low, v_h, 1.0, max_rank=30).shape == (30, 3)
    assert S.input_directions(low.T @ low, v_h[:, :0], 1.0, max_rank=30).shape == (30, 3)
    full = inputs(300, 30, [1.0] * 30, seed=7)
    assert S.input_directions(full.T @ full, v_h, 1.0, max_rank=5).shape == (30, 5)  # the cap wins
    assert S.input_directions(full.T @ full, v_h, 0.99, max_rank=0).shape == (30, 0)
    assert S.input_directions(full.T @ full, v_h, 1.0, max_rank=30).shape == (30, 22)  # all that V_h leaves
    inside = torch.randn(50, 8, dtype=torch.float64) @ v_h.T  # inputs V_h already holds
    assert S.input_directions(inside.T @ inside, v_h, 0.99, max_rank=30).shape == (30, 0)
    assert S.input_directions(torch.zeros(30, 30, dtype=torch.float64), v_h, 0.99, 30).shape == (30, 0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="energy"):
            S.input_directions(low.T @ low, v_h, bad, 30)
    with pytest.raises(ValueError, match="non-finite"):
        S.input_directions(torch.full((30, 30), float("nan")), v_h, 0.9, 30)
    with pytest.raises(ValueError, match="n x n"):
        S.input_directions(low.T @ low, orthonormal(20, 2, 1), 0.9, 30)


def test_output_directions_span_the_outputs_of_the_protected_inputs():
    u_h, v_h = orthonormal(40, 8, 1), orthonormal(30, 6, 2)
    x = inputs(200, 30, [2.0 ** -i for i in range(30)], seed=3)
    v_d = S.input_directions(x.T @ x, v_h, 0.99, max_rank=5)
    k = v_d.shape[1]
    assert k > 2  # more than the rank-2 weight below has outputs for
    g = torch.Generator().manual_seed(9)
    for w in (torch.randn(40, 30, generator=g, dtype=torch.float64),  # k independent outputs
              torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64),
              u_h @ torch.randn(8, 30, generator=g, dtype=torch.float64),  # outputs inside U_h: all completed
              torch.zeros(40, 30, dtype=torch.float64)):
        u_d = S.output_directions(w, u_h, v_d)
        assert u_d.shape == (40, k)
        assert torch.allclose(u_d.T @ u_d, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert (u_h.T @ u_d).abs().max() < 1e-12
        y = w @ v_d - u_h @ (u_h.T @ (w @ v_d))
        assert (y - u_d @ (u_d.T @ y)).norm() <= 1e-10 * max(float(y.norm()), 1.0)
    assert S.output_directions(w, u_h, v_d[:, :0]).shape == (40, 0)
    with pytest.raises(ValueError, match="do not fit"):
        S.output_directions(torch.randn(10, 30, dtype=torch.float64), orthonormal(10, 8, 3), orthonormal(30, 3, 5))
    with pytest.raises(ValueError, match="V_d"):
        S.output_directions(torch.randn(40, 20, dtype=torch.float64), u_h, v_d)


def test_input_and_output_directions_follow_the_data_dtype():
    """Returned in the bases' dtype (what extend_bases grows) on the data's device; float64 inside."""
    x = inputs(100, 12, [1.0, 0.5, 0.25, 0.1], seed=11)
    for dtype in (torch.float32, torch.float64):
        u_h, v_h = orthonormal(16, 3, 1).to(dtype), orthonormal(12, 3, 2).to(dtype)
        # energy 1: every direction of the rank-4 inputs, none of a float32 covariance's rounding
        v_d = S.input_directions((x.T @ x).to(dtype), v_h, 1.0, max_rank=6)
        u_d = S.output_directions(torch.randn(16, 12, dtype=dtype), u_h, v_d)
        assert v_d.dtype == u_d.dtype == dtype and v_d.device == u_d.device == x.device
        assert v_d.shape[1] == u_d.shape[1] == 4
        S.check_bases("w", (16, 12), *S.extend_bases(u_h, v_h, u_d, v_d), tol=1e-6)
    # A float32 covariance with float64 bases: the bases' dtype.
    v_d = S.input_directions((x.T @ x).float(), orthonormal(12, 3, 2), 0.99, max_rank=6)
    assert v_d.dtype == torch.float64


def test_projection_runs_in_full_fp32_whatever_the_host_set():
    """A training script that enables TF32 (or oneDNN bf16) must not reach the projection's matmuls:
    TF32's 10-bit mantissa leaves ~1e-3 of the update in the protected subspace. The mode records the
    precision each matmul of the maths saw; the host's setting is back afterwards."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm"):
                seen.append((torch.backends.cuda.matmul.fp32_precision,
                             torch.backends.mkldnn.matmul.fp32_precision))
            return func(*args, **(kwargs or {}))

    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        with Record():
            u, v = S.svd_bases(w, 8)
            dw = S.project(torch.randn(48, 32, generator=g), u, v)
            S.leaks(dw[None], u[None], v[None])
            S.update_directions(dw, 0.9, 8)
        assert seen and set(seen) == {("ieee", "ieee")}, set(seen)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == \
            ("tf32", "bf16")
        assert S.leak(dw, u, v) < 1e-6
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved


def test_partition_ranges_must_tile_each_matrix():
    """The projector builds full matrices from each rank's (start, numel) piece; pieces that leave a gap
    or overlap (a DeepSpeed whose partitioning changed) are refused at construction."""
    from ds_cl.core.zero_shards import check_tiling

    class Shards:
        def __init__(self, ranges):
            self.ranges = {"w": ranges}

        def shape(self, name):
            return (4, 6)

    check_tiling(Shards([(0, 12), (12, 12)]))
    check_tiling(Shards([(12, 12), (0, 12), (0, 0)]))  # any order; an empty piece (ZeRO-3 padding rank)
    for bad, word in [([(0, 12), (13, 11)], "gap"), ([(0, 13), (12, 12)], "overlap"), ([(0, 12), (12, 10)], "cover 22")]:
        with pytest.raises(RuntimeError, match=word):
            check_tiling(Shards(bad))


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 1.0])
def test_projection_through_the_complement_equals_the_direct_one(shape, ratio):
    g = torch.Generator().manual_seed(1)
    r = int(ratio * min(shape))
    u, v = S.svd_bases(torch.randn(*shape, generator=g), r)
    side = S.complement_side(shape, r)
    assert side == ("right" if shape[0] >= shape[1] else "left")  # cheaper at all these ratios
    c = S.complement(v if side == "right" else u)
    assert c.shape == ((shape[1] if side == "right" else shape[0]), min(shape) - r)
    grads = torch.randn(3, *shape, generator=g)
    direct = S.project(grads, u.expand(3, *u.shape), v.expand(3, *v.shape))
    via = S.project_two_sided_via(grads, u.expand(3, *u.shape), v.expand(3, *v.shape), c.expand(3, *c.shape), side)
    assert (via - direct).abs().max() < 1e-5
    assert max(S.leak(x, u, v) for x in via) < 1e-5


def test_complement_is_chosen_only_where_it_saves_flops():
    assert S.complement_side((4096, 4096), 1024) is None          # r = s/4: 8 m n r is cheaper
    assert S.complement_side((4096, 4096), 2048) == "right"       # r = s/2: 3/4 of the flops
    assert S.complement_side((4096, 11008), 3277) == "left"       # wide: the rows' complement
    assert S.complement_side((64, 32), 0) is None
