"""The memory SubspaceProjector adds per rank, computed from the target shapes alone.

`ds-cl bench --plan` prints it for a model, world size, rank policy and bucket size; `ds-cl bench
--memory` measures it on CPU ranks and tests/test_projector_memory.py holds the two within 15% (the small
and medium bench models at worlds 1-3; measured within 9%).

The model follows the projector's code path by path: each function below names the tensors alive at
the moments where a phase peaks, in float32 elements (fp32 elements are what the projector allocates;
bytes = 4 x elements). It counts what the projector allocates, not what the training step around it
does: the step peak is the projector's own live memory at its busiest point (the bases it owns, the
pre-step copy when it is on the device, the exchange buffers of the buckets in flight and the
projection and audit temporaries). Where the training step itself peaks elsewhere (activations in
the backward pass), a run needs less than this on top of plain ZeRO-3: the figure is an upper bound
of the extra.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ds_cl.core import subspace as S
from ds_cl.core.projector import DEFAULT_BUCKET_NUMEL_PER_RANK, plan_buckets

FP32 = 4


def local_numel(numel: int, world: int, rank: int) -> int:
    """ZeRO-3's partition of a parameter: ceil(numel / world) elements per rank, the last ones shorter."""
    part = -(-numel // world)
    return max(0, min(part, numel - rank * part))


def bases_numel(shape: Sequence[int], r: int, projection: str = "two_sided") -> int:
    """U_h (m x r) and V_h (n x r), and past ~0.41 min(m, n) the short side's complement (s x (s - r))."""
    m, n = shape
    if r == 0:
        return 0
    side = S.complement_side(shape, r) if projection == "two_sided" else None
    s = min(m, n)
    return (m + n) * r + (s * (s - r) if side else 0)


def projection_temp_numel(k: int, shape: Sequence[int], r: int, projection: str = "two_sided") -> int:
    """Peak of `_project_owned` for a group of k matrices: the stacked input and the products alive at
    once (see ds_cl.core.subspace.project and project_two_sided_via)."""
    m, n = shape
    mn = k * m * n
    if r == 0:
        return 0
    side = S.complement_side(shape, r) if projection == "two_sided" else None
    if side == "right":  # x = G C; x - U (U^T x); (x) C^T
        a = k * m * (n - r)
        return mn + max(3 * a + k * r * (n - r), a + mn)
    if side == "left":  # x = C^T G; x - (x V) V^T; C x
        b = k * (m - r) * n
        return mn + max(3 * b + k * (m - r) * r, b + mn)
    if projection == "paper":  # G - U (((U^T G) V) V^T): G, U^T G, ..., the result
        return 3 * mn + k * m * r + k * r * n
    # two-sided directly: G, G1 = G - U (U^T G), G1 V, (G1 V) V^T, the result
    return 4 * mn + k * m * r


def audit_temp_numel(k: int, shape: Sequence[int], r: int) -> int:
    """Peak of the float64 leak of one matrix (the group's projected result alive beside it): dW, and
    U_h or V_h with its product, each in float64 (2 fp32 elements per value)."""
    m, n = shape
    if r == 0:
        return 0
    return k * m * n + 2 * m * n + 2 * r * (m + n)


def svd_temp_numel(shape: Sequence[int]) -> int:
    """A fit's SVD of one m x n matrix (`torch.linalg.svd(full_matrices=False)`, LAPACK gesdd with
    jobz="S"): the column-major copy of the input, U (m x s), Vh (s x n), and gesdd's workspace: 3 s^2
    for the bidiagonal SVD, plus s^2 for the triangular factor when l >= 11 s / 6 (gesdd's QR-first path)."""
    m, n = shape
    s, l = min(m, n), max(m, n)
    work = (4 if 6 * l >= 11 * s else 3) * s * s + 8 * s
    return m * n + m * s + s * n + work


def complement_temp_numel(k: int, shape: Sequence[int], r: int) -> int:
    """`subspace.complement` of a group's short-side basis beyond the complement kept: the complete Q
    (k x s x s) and R (k x s x r)."""
    s = min(shape)
    return k * s * s + k * s * r


def _group_temps(bucket: Sequence[str], owner, shapes, ranks, rank: int, projection: str, *, project: bool,
                 audit: bool) -> int:
    """Largest temporary of `_project_owned` over this rank's groups (same shape and rank) in a bucket."""
    groups: dict[tuple, int] = {}
    for n in bucket:
        if owner[n] == rank:
            key = (tuple(shapes[n]), ranks[n])
            groups[key] = groups.get(key, 0) + 1
    t = 0
    for (shape, r), k in groups.items():
        if project:
            t = max(t, projection_temp_numel(k, shape, r, projection))
        if audit:
            t = max(t, audit_temp_numel(k, shape, r))
    return t


def _pipeline_peak(buckets: list[list[str]], owner: Mapping[str, int], shapes, world: int, rank: int,
                   temps: list[int], *, write: bool, read_temp: int) -> int:
    """Peak of `SubspaceProjector._pipeline` (and of the gathers in `fit`) on `rank`, beside `temps[i]`,
    the largest temporary of working on bucket i: bucket i arriving and unpacked, i + 1 travelling to
    its owners, i - 1 travelling back (write=True).

    read_temp: how many temporaries of one piece `read` makes (the update pass's W - W_old: 1, or 2 when
    W_old comes from the host); at world 1 nothing travels and `read` runs for a whole bucket at once.
    """
    if not buckets:
        return 0
    nb = len(buckets)
    own = [sum(math.prod(shapes[n]) for n in b if owner[n] == rank) for b in buckets] + [0]
    loc = [sum(local_numel(math.prod(shapes[n]), world, rank) for n in b) for b in buckets] + [0]
    piece = [max([local_numel(math.prod(shapes[n]), world, rank) for n in b] + [0]) for b in buckets] + [0]
    peak = 0
    if world == 1:
        # read(n) of bucket i + 1 runs when it is "sent", before bucket i is worked on; with write, the
        # previous bucket's result lives until its "receipt" after this bucket's work.
        for i in range(nb):
            held = own[i] + own[i + 1] + (own[i - 1] if write and i else 0) if read_temp else 0
            peak = max(peak, held + temps[i])
        return peak
    pending = 0  # the previous bucket travelling back: its send buffer (own) and receive buffer (loc)
    for i in range(nb):
        # wait(): the send buffer is freed, the receive buffer unpacked into new full matrices
        peak = max(peak, pending + 2 * own[i])
        # the next bucket's send buffer, filled one piece at a time, then its receive buffer
        peak = max(peak, pending + own[i] + loc[i + 1] + max(read_temp * piece[i + 1], own[i + 1]))
        nxt = loc[i + 1] + own[i + 1]
        # the work on this bucket
        peak = max(peak, pending + own[i] + nxt + temps[i])
        if write:
            # the previous bucket's pieces arrive and are written (W_old + dW: one piece), then this one leaves
            peak = max(peak, (loc[i - 1] if i else 0) + own[i] + nxt + (piece[i] if read_temp else 0))
            peak = max(peak, 2 * own[i] + loc[i] + nxt)
            pending = own[i] + loc[i]
    return peak


def projector_memory(shapes: Mapping[str, Sequence[int]], world: int, ranks: Mapping[str, int], *,
                     names: Sequence[str] | None = None,
                     bucket_numel_per_rank: int = DEFAULT_BUCKET_NUMEL_PER_RANK, projection: str = "two_sided",
                     project_update: bool = True, audit: bool = True, pre_step_copy: str = "device",
                     accumulate: bool = True) -> dict:
    """Bytes the projector adds per rank for targets `shapes` ({name: (m, n)}, in parameter order) with
    protected ranks `ranks` ({name: r}) on `world` ranks.

    pre_step_copy: "device" or "host" (where the update projection keeps W_old, see SubspaceProjector).
    accumulate: the osft default (`extend` at each task end): the refit also holds the old bases and a
    host copy of the owned targets (the task's start weights).
    Returns the busiest rank's `projector_extra_bytes_per_rank` (step peak) and
    `projector_refit_bytes_per_rank` (task-boundary peak), `projector_host_bytes_per_rank`, and the
    parts of each, per rank.
    """
    if pre_step_copy not in ("device", "host"):
        raise ValueError(f"pre_step_copy must be 'device' or 'host', got {pre_step_copy!r}")
    names = list(names or shapes)
    ranks = {n: int(ranks.get(n, 0)) for n in names}
    buckets, owner = plan_buckets(shapes, names, world, bucket_numel_per_rank)
    constrained = [b for b in ([n for n in b if ranks[n] > 0] for b in buckets) if b]
    need_update = project_update or audit
    per_rank = []
    for rank in range(world):
        owned = [n for n in names if owner[n] == rank]
        bases = sum(bases_numel(shapes[n], ranks[n], projection) for n in owned)
        old = sum(local_numel(math.prod(shapes[n]), world, rank) for b in constrained for n in b)

        # Optimizer step: the gradient pass, then (W_old kept) the update pass.
        temps = [_group_temps(b, owner, shapes, ranks, rank, projection, project=True, audit=False) for b in constrained]
        grad_pass = _pipeline_peak(constrained, owner, shapes, world, rank, temps, write=True, read_temp=0)
        update_pass = 0
        if need_update:
            temps = [_group_temps(b, owner, shapes, ranks, rank, projection, project=project_update, audit=audit)
                     for b in constrained]
            update_pass = _pipeline_peak(constrained, owner, shapes, world, rank, temps, write=project_update,
                                         read_temp=2 if pre_step_copy == "host" else 1)
        old_device = old if need_update and pre_step_copy == "device" else 0
        step = bases + max(grad_pass, old_device + update_pass)

        # Task boundary, fit: the old bases are freed first; each owned matrix's SVD runs beside the
        # gathered buckets and the new bases made so far; then the bases are stacked per group and the
        # complements computed.
        svd, made = [], 0
        for b in buckets:
            t = 0
            for n in b:
                if owner[n] == rank:
                    t = max(t, made + svd_temp_numel(shapes[n]))
                    made += (shapes[n][0] + shapes[n][1]) * ranks[n]
            svd.append(t)
        gather = _pipeline_peak(buckets, owner, shapes, world, rank, svd, write=False, read_temp=0)
        groups: dict[tuple, int] = {}
        for n in owned:
            if ranks[n] > 0:
                key = (next(i for i, b in enumerate(buckets) if n in b), tuple(shapes[n]), ranks[n])
                groups[key] = groups.get(key, 0) + 1
        install = max([k * (shape[0] + shape[1]) * r for (_, shape, r), k in groups.items()] + [0])
        comp = max([complement_temp_numel(k, shape, r) for (_, shape, r), k in groups.items()
                    if projection == "two_sided" and S.complement_side(shape, r)] + [0])
        refit = max(gather, bases + install, bases + comp)
        if accumulate:
            # extend: a bucket's old bases stay until its extended ones are packed, bucket by bucket; per
            # matrix, dW (the anchor brought to the device, the difference, its projection) and then
            # dW's SVD, beside the bucket's extended bases made so far.
            work = []
            for b in buckets:
                made, t = 0, 0
                for n in b:
                    if owner[n] == rank:
                        mn = math.prod(shapes[n])
                        t = max(t, made + max(mn + projection_temp_numel(1, shapes[n], ranks[n]),
                                              mn + svd_temp_numel(shapes[n])))
                        made += (shapes[n][0] + shapes[n][1]) * ranks[n]
                comp_b = max([complement_temp_numel(1, shapes[n], ranks[n]) for n in b if owner[n] == rank
                              and projection == "two_sided" and S.complement_side(shapes[n], ranks[n])] + [0])
                work.append(max(t, made + comp_b))
            extend = bases + _pipeline_peak(buckets, owner, shapes, world, rank, work, write=False, read_temp=0)
            refit = max(refit, extend)
        host = (sum(math.prod(shapes[n]) for n in owned) if accumulate else 0) + \
            (old if need_update and pre_step_copy == "host" else 0)
        per_rank.append({"bases": FP32 * bases, "pre_step_copy": FP32 * old_device,
                         "grad_pass": FP32 * grad_pass, "update_pass": FP32 * update_pass,
                         "step": FP32 * step, "fit_gather": FP32 * gather, "refit": FP32 * refit,
                         "host": FP32 * host})
    busiest = lambda key: max(range(world), key=lambda r: per_rank[r][key])  # noqa: E731
    return {
        "world": world,
        "buckets": len(buckets),
        "projector_extra_bytes_per_rank": per_rank[busiest("step")]["step"],
        "projector_refit_bytes_per_rank": per_rank[busiest("refit")]["refit"],
        "projector_host_bytes_per_rank": per_rank[busiest("host")]["host"],
        "busiest_rank": per_rank[busiest("step")],
        "per_rank": per_rank,
    }


def ranks_for(shapes: Mapping[str, Sequence[int]], policy, importance: Mapping[str, float] | None = None) -> dict[str, int]:
    """Protected ranks per target under a rank policy. For AdaptiveRank without measured importance,
    layer importances spread evenly over [0, 1] (what min-max normalisation gives the first and last
    layer; the middle ones vary by model)."""
    policy = S.rank_policy_from(policy)
    if policy.needs_importance and importance is None:
        layers = sorted({S.layer_of(n) for n in shapes} - {None}, key=lambda s: (len(s), s))
        importance = {layer: (i / (len(layers) - 1) if len(layers) > 1 else 1.0) for i, layer in enumerate(layers)}
    out = {}
    for n, shape in shapes.items():
        imp = importance.get(S.layer_of(n), 1.0) if policy.needs_importance else None
        out[n] = policy.rank(tuple(shape), imp)
    return out
