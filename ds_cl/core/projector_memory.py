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

`accumulate_sequence` walks osft's default run (the accumulate subspace) through T tasks, whose
protected ranks grow at each task start toward max_protected_ratio: the bases and the extend's
float64 SVD of the task update at the cap, not the first fit's ranks, set its peak. The extend is not
among the phases `ds-cl bench --memory` measures: its figures are computed only.
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


def projection_temp_numel(k: int, shape: Sequence[int], r: int, projection: str = "two_sided", *,
                          via_complement: bool = True) -> int:
    """Peak of `_project_owned` for a group of k matrices: the stacked input and the products alive at
    once (see ds_cl.core.subspace.project and project_two_sided_via). via_complement=False: the two-sided
    product without the complement, as `extend` projects dW (`subspace.project`)."""
    m, n = shape
    mn = k * m * n
    if r == 0:
        return 0
    side = S.complement_side(shape, r) if projection == "two_sided" and via_complement else None
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


def svd_temp_numel(shape: Sequence[int], float64: bool = False) -> int:
    """A fit's SVD of one m x n matrix (`torch.linalg.svd(full_matrices=False)`, LAPACK gesdd with
    jobz="S"): the column-major copy of the input, U (m x s), Vh (s x n), and gesdd's workspace: 3 s^2
    for the bidiagonal SVD, plus s^2 for the triangular factor when l >= 11 s / 6 (gesdd's QR-first path).
    float64: the same in double precision (extend's SVD of dW, `subspace.update_directions`), twice the
    fp32 elements. On CUDA the projector asks for cuSOLVER's gesvd, whose workspace is not modelled here."""
    m, n = shape
    s, l = min(m, n), max(m, n)
    work = (4 if 6 * l >= 11 * s else 3) * s * s + 8 * s
    return (2 if float64 else 1) * (m * n + m * s + s * n + work)


def extend_temp_numel(shape: Sequence[int], r: int, added: int, previous: int = 0) -> int:
    """Peak of `extend` on one m x n matrix with r protected directions growing by `added`, beside the
    bucket (the gathered weights) and the bases: the largest of its three moments, in order.

    1. dW = project(W - anchor): the anchor brought to the device beside the difference, then the direct
       two-sided product; `previous` (the bucket's previous matrix's dW) is alive until dW is reassigned.
    2. `update_directions`: dW, its float64 copy, and the float64 SVD (U m x s, S, Vh s x n and workspace,
       s = min(m, n)): usually the largest, and independent of r.
    3. `extend_bases` (added > 0): dW, U_d and V_d, and per side one Gram-Schmidt pass in float64 (two
       float64 copies of the l x r basis, of the l x added directions, their l x added product and
       difference), the grown U beside V's pass.
    """
    m, n = shape
    mn = m * n
    project = previous + max(2 * mn, projection_temp_numel(1, shape, r, via_complement=False))
    svd = mn + 2 * mn + svd_temp_numel(shape, float64=True)
    grow = 0
    if added:
        side = lambda l: 2 * (2 * l * r + 2 * l * added + r * added)  # noqa: E731
        grow = mn + (m + n) * added + max(side(m), m * (r + added) + side(n))
    return max(project, svd, grow)


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
                     accumulate: bool = True, extended_ranks: Mapping[str, int] | None = None) -> dict:
    """Bytes the projector adds per rank for targets `shapes` ({name: (m, n)}, in parameter order) with
    protected ranks `ranks` ({name: r}) on `world` ranks.

    pre_step_copy: "device" or "host" (where the update projection keeps W_old, see SubspaceProjector).
    accumulate: the osft default (`extend` at each task end): the refit also holds the old bases and a
    host copy of the owned targets (the task's start weights).
    extended_ranks: the ranks `extend` grows `ranks` to (default: `ranks`, nothing added).
    Returns the busiest rank's `projector_extra_bytes_per_rank` (step peak) and
    `projector_refit_bytes_per_rank` (task-boundary peak: the fit at `ranks`, and with accumulate the
    larger of it and an extend), `projector_host_bytes_per_rank`, and the parts of each, per rank
    (with accumulate also "mark" and "extend" on their own, and "host_extend").
    """
    if pre_step_copy not in ("device", "host"):
        raise ValueError(f"pre_step_copy must be 'device' or 'host', got {pre_step_copy!r}")
    names = list(names or shapes)
    ranks = {n: int(ranks.get(n, 0)) for n in names}
    grown = {n: int((extended_ranks or ranks).get(n, ranks[n])) for n in names}
    if any(grown[n] < ranks[n] for n in names):
        raise ValueError("extended_ranks must not be below ranks: extend only adds directions")
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
        fit = max(gather, bases + install, bases + comp)
        refit, extra = fit, {}
        owned_numel = sum(math.prod(shapes[n]) for n in owned)
        host = host_step = (owned_numel if accumulate else 0) + (old if need_update and pre_step_copy == "host" else 0)
        if accumulate:
            # mark: the buckets gathered and copied to the host one by one, beside the bases.
            mark = bases + _pipeline_peak(buckets, owner, shapes, world, rank, [0] * len(buckets), write=False,
                                          read_temp=0)
            # extend: bucket by bucket, a bucket's old bases stay until its extended ones are packed, so
            # the buckets before it hold their grown bases already (`delta`); per matrix, the moments of
            # `extend_temp_numel` beside the bucket's extended bases made so far; then the old packs go
            # and the new ones are stacked, group by group, with their complements.
            work, delta = [], 0
            for b in buckets:
                mine = [n for n in b if owner[n] == rank]
                made, t, previous = 0, 0, 0
                for n in mine:
                    t = max(t, made + extend_temp_numel(shapes[n], ranks[n], grown[n] - ranks[n], previous))
                    made += (shapes[n][0] + shapes[n][1]) * grown[n]
                    previous = math.prod(shapes[n])
                groups: dict[tuple, int] = {}
                for n in mine:
                    if grown[n] > 0:
                        groups[(tuple(shapes[n]), grown[n])] = groups.get((tuple(shapes[n]), grown[n]), 0) + 1
                old_b = sum(bases_numel(shapes[n], ranks[n], projection) for n in mine)
                new_b = sum(bases_numel(shapes[n], grown[n], projection) for n in mine)
                pack = max([max(k * (sh[0] + sh[1]) * r, complement_temp_numel(k, sh, r)
                                if projection == "two_sided" and S.complement_side(sh, r) else 0)
                            for (sh, r), k in groups.items()] + [0])
                work.append(delta + max(t, new_b - old_b + pack))
                delta += new_b - old_b
            extend = bases + _pipeline_peak(buckets, owner, shapes, world, rank, work, write=False, read_temp=0)
            refit = max(refit, extend)
            # the new anchor is built beside the old one, which goes only when extend ends
            host_extend = 2 * owned_numel
            host = max(host, host_extend)
            extra = {"mark": FP32 * mark, "extend": FP32 * extend, "anchor": FP32 * owned_numel,
                     "host_step": FP32 * host_step, "host_extend": FP32 * host_extend}
        per_rank.append({"bases": FP32 * bases, "pre_step_copy": FP32 * old_device,
                         "grad_pass": FP32 * grad_pass, "update_pass": FP32 * update_pass,
                         "step": FP32 * step, "fit_gather": FP32 * gather, "fit": FP32 * fit, "refit": FP32 * refit,
                         "host": FP32 * host, **extra})
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


def grown_ranks(shapes: Mapping[str, Sequence[int]], ranks: Mapping[str, int], max_ratio: float,
                added_ratio: float | None = None) -> dict[str, int]:
    """The ranks after one `extend`: added_ratio x min(m, n) more directions per matrix, or with None as
    many as the cap leaves room for, within `subspace.max_protected_rank` (never fewer than before)."""
    out = {}
    for n, shape in shapes.items():
        cap = S.max_protected_rank(shape, max_ratio)
        want = cap if added_ratio is None else ranks[n] + round(added_ratio * min(shape))
        out[n] = max(ranks[n], min(cap, want))
    return out


def accumulate_sequence(shapes: Mapping[str, Sequence[int]], world: int, first_ranks: Mapping[str, int],
                        tasks: int, *, max_ratio: float = 0.9, added_ratio: float | None = None, **kwargs) -> dict:
    """The projector's memory per rank through a `tasks`-task sequence of the accumulate subspace (osft's
    default), phase by phase as `ds_cl.methods.osft` runs it: the fit at `first_ranks` and `mark` before
    task 0, task 0's steps, then per task t >= 1 the `extend` of task t - 1's update at its start and task
    t's steps (no extend after the last task). kwargs go to `projector_memory`.

    How many directions a boundary adds depends on the update (as many as hold update_energy of |dW|^2),
    which shapes do not tell. added_ratio=None takes the worst case: every boundary adds as many as the
    cap max_ratio x min(m, n) leaves room for, so the first extend takes every matrix to the cap and each
    later one runs its SVD there. Nothing needs more: every figure grows with the ranks, and the SVD of
    dW runs at every boundary whatever it adds. A number adds that fraction of min(m, n) per boundary.
    Returns the phases in order, each with its busiest rank's device and host bytes, the bases per rank
    and the protected share after it, and the peaks with the phase they occur in.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    names = list(kwargs.get("names") or shapes)
    cache: dict[tuple, dict] = {}

    def busiest(before: Mapping[str, int], after: Mapping[str, int], key: str) -> int:
        k = (tuple(before[n] for n in names), tuple(after[n] for n in names))
        if k not in cache:
            cache[k] = projector_memory(shapes, world, before, extended_ranks=after, accumulate=True, **kwargs)
        return max(p[key] for p in cache[k]["per_rank"])

    share = lambda r: sum(r[n] for n in names) / sum(min(shapes[n]) for n in names)  # noqa: E731

    def phase(name: str, before, after, key: str, host: str | None) -> dict:
        return {"phase": name, "device_bytes_per_rank": busiest(before, after, key),
                "host_bytes_per_rank": busiest(before, after, host) if host else 0,
                "bases_bytes_per_rank": busiest(after, after, "bases"), "protected_share": share(after)}

    ranks = {n: int(first_ranks.get(n, 0)) for n in names}
    # before task 0 no anchor exists yet; mark makes it
    phases = [phase("fit before task 0", ranks, ranks, "fit", None),
              phase("mark before task 0", ranks, ranks, "mark", "anchor"),
              phase("task 0 steps", ranks, ranks, "step", "host_step")]
    for t in range(1, tasks):
        grown = grown_ranks({n: shapes[n] for n in names}, ranks, max_ratio, added_ratio)
        phases.append(phase(f"extend at the start of task {t}", ranks, grown, "extend", "host_extend"))
        ranks = grown
        phases.append(phase(f"task {t} steps", ranks, ranks, "step", "host_step"))
    peak = max(phases, key=lambda p: p["device_bytes_per_rank"])
    host = max(phases, key=lambda p: p["host_bytes_per_rank"])
    return {"world": world, "tasks": tasks, "max_ratio": max_ratio, "added_ratio": added_ratio,
            "phases": phases, "peak_bytes_per_rank": peak["device_bytes_per_rank"], "peak_phase": peak["phase"],
            "host_peak_bytes_per_rank": host["host_bytes_per_rank"], "host_peak_phase": host["phase"]}


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
