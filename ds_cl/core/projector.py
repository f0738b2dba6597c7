"""SubspaceProjector: exact orthogonal-subspace fine-tuning on a DeepSpeed engine (ZeRO-3 first).

Usage (one task of a sequence)::

    proj = SubspaceProjector(engine)                      # targets: LLaMA q/k/v/o/gate/up/down by default
    proj.fit(rank_policy=AdaptiveRank(), importance_batches=batches)   # task boundary (collective)
    for batch in data:
        loss = engine(**batch).loss
        engine.backward(loss)
        proj.step()                                       # instead of engine.step()
    proj.audit()                                          # {param_name: leak} of the last optimizer step

Design: one owner rank per matrix ("per-shard bases"; the sizes behind it: docs/benchmarks.md).
Each target matrix is assigned to one rank of the data-parallel group, balancing m*n*min(m, n)
(greedy, largest first). Only the owner holds that matrix's U_h, V_h and computes its SVD at a task
boundary. At each optimizer step the ranks send the owner their flat partitions of the matrix's
fp32 gradient (one asynchronous all_to_all_single per bucket of matrices), the owner projects the
full m x n view with `ds_cl.core.subspace.project` (same-shaped matrices batched) and sends the pieces
back; the exchanges of the neighbouring buckets run while a bucket is projected. The update
projection after `engine.step()` takes the same path with (W_new - W_old).

Why this design and not the alternative (all-reduce of the small products U_h^T G and
G V_h from the rows each rank holds): the all-reduce design needs all of V_h (and U_h) on every
rank, so bases memory per rank does not shrink with the world size (~5 GB per rank for an 8B model
at r = min/2, as the authors' FSDP trainer found), or it all-gathers V_h every step; and it all-reduces
r (m + n) elements per matrix per step, which at r = min(m, n)/2 is ~numel per matrix on every rank
whatever the world size. The owner design sends each rank's own partition twice, ~2 N / world
elements per rank per step (N = target parameters), keeps bases at ~total / world per rank, and
spreads the SVDs over the ranks. `ds-cl bench` measures both quantities (bases bytes per rank,
bytes sent per rank per step); docs/benchmarks.md records the numbers.

Exactness under AdamW needs the update projected too (Adam's 1/sqrt(v) scaling and decoupled weight
decay act after any gradient hook): before `engine.step()` we keep this rank's fp32 master partition
of each target (one fp32 copy of the local target partitions: in host memory on an accelerator, see
`pre_step_copy`), and after it we set W = W_old + P(W_new - W_old), as W_new - (dW - P(dW)): the owners
send back what the projection removes, so W_old travels back from the host once per step, for the
difference only. The low-precision working copy is
refreshed from the corrected master. What all this costs in memory per rank: ds_cl.core.projector_memory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ds_cl.core import collectives
from ds_cl.core import subspace as S
from ds_cl.core.zero_shards import shards_for

STATE_FORMAT = 1
DEFAULT_BUCKET_NUMEL_PER_RANK = 1 << 26  # 256 MiB of fp32 full matrices per owner per bucket


def prepare_ds_config(ds_config: dict) -> dict:
    """Return a copy of a DeepSpeed config made safe for exact projection.

    Under bf16, gradients must accumulate in fp32 or a projected gradient is rounded back to bf16.
    """
    cfg = dict(ds_config)
    if cfg.get("bf16", {}).get("enabled") in (True, "auto"):
        data_types = dict(cfg.get("data_types") or {})
        data_types.setdefault("grad_accum_dtype", "fp32")
        cfg["data_types"] = data_types
    return cfg


def matrix_cost(shape: Sequence[int]) -> int:
    """Relative cost of a matrix's SVD and projection: both grow like m n min(m, n)."""
    return shape[0] * shape[1] * min(shape)


def plan_buckets(shapes: Mapping[str, Sequence[int]], names: Sequence[str], world: int,
                 numel_per_rank: int) -> tuple[list[list[str]], dict[str, int]]:
    """Split the targets (in order) into buckets of at most `numel_per_rank * world` elements and give
    each matrix an owner rank.

    Every bucket ends in a collective, so a step takes about the sum over buckets of the busiest
    rank's work in that bucket: owners are balanced within each bucket (longest first, ties to the
    rank with least work overall), and buckets grow with the world so that each has work for every
    rank. Fixed buckets of 2^27 elements (3 or 4 LLaMA-2-7B matrices) would leave most of 8 ranks idle
    in every bucket: `ds-cl bench --plan` prints `schedule_efficiency` for both.
    """
    buckets, current, size = [], [], 0
    for name in names:
        numel = math.prod(shapes[name])
        if current and size + numel > numel_per_rank * world:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += numel
    if current:
        buckets.append(current)
    total, owner = [0] * world, {}
    for bucket in buckets:
        load = [0] * world
        for name in sorted(bucket, key=lambda n: -matrix_cost(shapes[n])):
            k = min(range(world), key=lambda r: (load[r], total[r], r))
            owner[name] = k
            load[k] += matrix_cost(shapes[name])
            total[k] += matrix_cost(shapes[name])
    return buckets, owner


def schedule_efficiency(shapes: Mapping[str, Sequence[int]], buckets: list[list[str]], owner: Mapping[str, int],
                        world: int) -> float:
    """Sum over buckets of the busiest rank's work, divided by a perfect split of all work (1.0 is ideal)."""
    busiest = 0
    for bucket in buckets:
        load = [0] * world
        for n in bucket:
            load[owner[n]] += matrix_cost(shapes[n])
        busiest += max(load)
    return busiest / (sum(matrix_cost(shapes[n]) for b in buckets for n in b) / world)


class SubspaceProjector:
    """Constrain a DeepSpeed engine's updates of target matrices to the complement of their top subspace.

    Args:
        engine: a `deepspeed.DeepSpeedEngine` (ZeRO stage 3 or 2, or stage 0 on one process).
        targets: regex patterns matched (re.search) against `engine.module.named_parameters()` names;
            default: q/k/v/o/gate/up/down projection weights of LLaMA-style models.
        projection: "two_sided" (default) or "paper" (see `ds_cl.core.subspace`).
        project_update: project (W_new - W_old) after the optimizer step, making the constraint exact
            under AdamW with weight decay (default True).
        audit: measure each target's leak (in float64, about half the projection's flops; with
            project_update=False it also costs sending the update to the owners, without sending it back).
        audit_every: audit the first optimizer step after each fit/set_bases/load_state_dict and every
            audit_every-th step after it (default 1: every step).
        svd_dtype: torch.float32 (default) or torch.float64 for the task-boundary SVD.
        bucket_numel_per_rank: a bucket (the matrices exchanged in one collective) holds up to this many
            target elements times the world size, so each owner holds ~this many elements of full
            matrices per bucket, and at most three buckets at once (one arriving, one being projected,
            one travelling back). Buckets grow with the world so that each has work for every rank:
            see `plan_buckets`.
        pre_step_copy: where the update projection keeps this rank's fp32 master partitions of the
            targets during `engine.step()` (N / world elements): "device", "host" (pinned on CUDA: two
            transfers of that size per step instead of the device memory: one out before the step, one
            back after it), or "auto" (default): host on an accelerator, device on CPU.
    """

    def __init__(self, engine, targets: Sequence[str] | None = None, projection: str = "two_sided",
                 project_update: bool = True, *, audit: bool = True, audit_every: int = 1,
                 svd_dtype: torch.dtype = torch.float32, bucket_numel_per_rank: int = DEFAULT_BUCKET_NUMEL_PER_RANK,
                 pre_step_copy: str = "auto"):
        if projection not in S.PROJECTIONS:
            raise ValueError(f"projection must be one of {S.PROJECTIONS}, got {projection!r}")
        if svd_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
        if bucket_numel_per_rank < 1:
            raise ValueError(f"bucket_numel_per_rank must be positive, got {bucket_numel_per_rank}")
        if audit_every < 1:
            raise ValueError(f"audit_every must be >= 1, got {audit_every}")
        if pre_step_copy not in ("auto", "device", "host"):
            raise ValueError(f"pre_step_copy must be 'auto', 'device' or 'host', got {pre_step_copy!r}")
        if isinstance(targets, str):
            targets = [targets]
        self.engine = engine
        self.projection = projection
        self.project_update = project_update
        self.audit_enabled = audit
        self.audit_every = audit_every
        self.svd_dtype = svd_dtype
        # "auto": host memory on an accelerator, where the copy would otherwise be the largest part of
        # the projector's device memory (ds_cl.core.projector_memory); on CPU both are the same memory.
        self.pre_step_copy_on_host = pre_step_copy == "host" or (pre_step_copy == "auto"
                                                                 and engine.device.type != "cpu")
        self._host_copy: dict[str, torch.Tensor] = {}

        all_params = dict(engine.module.named_parameters())
        self.names: list[str] = S.select_targets(all_params.keys(), targets)
        named = {}
        for name in self.names:
            p = all_params[name]
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if len(shape) != 2:
                raise ValueError(f"target {name} has shape {shape}; only 2-D weights can be projected "
                                 f"(narrow the target patterns)")
            if not p.requires_grad:
                raise ValueError(f"target {name} does not require grad; remove it from the targets")
            named[name] = p
        self.shards = shards_for(engine, named)
        self.group, self.world, self.rank = self.shards.group, self.shards.world, self.shards.rank
        self.shapes = {n: self.shards.shape(n) for n in self.names}
        self.index = {n: i for i, n in enumerate(self.names)}
        self.buckets, self.owner = plan_buckets(self.shapes, self.names, self.world, bucket_numel_per_rank)

        self.ranks: dict[str, int] = {n: 0 for n in self.names}
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # owned targets only (views into packs)
        # (bucket, shape, rank) -> (names, U, V, complement, side): see _install
        self._packs: dict[tuple, tuple] = {}
        self.importance: dict[str, float] | None = None
        # Owned targets' fp32 weights at the start of the task (host memory), for `extend`; None until `mark`.
        self.anchor: dict[str, torch.Tensor] | None = None
        self._leaks: dict[str, float] = {}
        self._steps_since_bases = 0
        # audited_at: the optimizer step (1-based) whose leaks audit() returns; 0 before any.
        self.stats = {"optimizer_steps": 0, "sent_bytes": 0, "audited_at": 0}

    # ------------------------------------------------------------------------------------ layout
    @property
    def device(self) -> torch.device:
        return self.engine.device

    def owned(self, names: Iterable[str] | None = None) -> list[str]:
        return [n for n in (self.names if names is None else names) if self.owner[n] == self.rank]

    # ------------------------------------------------------------------------------ communication
    def _send_to_owners(self, names: list[str], read: Callable[[str], torch.Tensor]) -> "_InFlight":
        """Start sending every rank's flat piece of each matrix in `names` (`read(name)`) to its owner.

        `.wait()` on the result gives {name: full flat tensor} of the matrices this rank owns. The
        exchange runs asynchronously, so the caller can project another bucket meanwhile.
        """
        mine = self.owned(names)
        if self.world == 1:
            local = {n: read(n) for n in mine}
            return _InFlight(None, lambda: local)
        # Filled piece by piece: at most one piece read into a temporary at a time (the memory model in
        # ds_cl.core.projector_memory counts on it).
        size = {n: self.shards.ranges[n][self.rank][1] for n in names}
        order = [n for d in range(self.world) for n in names if self.owner[n] == d]
        in_split = [sum(size[n] for n in names if self.owner[n] == d) for d in range(self.world)]
        send = torch.empty(sum(in_split), dtype=torch.float32, device=self.device)
        offset = 0
        for n in order:
            if size[n]:
                send[offset:offset + size[n]].copy_(read(n))
                offset += size[n]
        out_split = [sum(self.shards.ranges[n][s][1] for n in mine) for s in range(self.world)]
        recv = send.new_empty(sum(out_split))
        work = collectives.all_to_all_single(recv, send, out_split, in_split, self.group, async_op=True)
        self.stats["sent_bytes"] += (sum(in_split) - in_split[self.rank]) * send.element_size()

        def unpack() -> dict[str, torch.Tensor]:
            full = {n: recv.new_empty(math.prod(self.shapes[n])) for n in mine}
            offset = 0
            for s in range(self.world):
                for n in mine:
                    start, k = self.shards.ranges[n][s]
                    full[n][start:start + k] = recv[offset:offset + k]
                    offset += k
            return full

        return _InFlight(work, unpack, send)

    def _send_from_owners(self, names: list[str], full: Mapping[str, torch.Tensor]) -> "_InFlight":
        """Inverse of `_send_to_owners`: `.wait()` gives this rank's flat piece of every matrix in `names`."""
        mine = self.owned(names)
        if self.world == 1:
            return _InFlight(None, lambda: dict(full))
        pieces = [[full[n][slice(*self._span(n, d))] for n in mine] for d in range(self.world)]
        in_split = [sum(t.numel() for t in ts) for ts in pieces]
        # An empty send buffer in fp32 too: every rank's buffers of the exchange have one dtype.
        send = (torch.cat([t for ts in pieces for t in ts]) if sum(in_split)
                else torch.empty(0, dtype=torch.float32, device=self.device))
        out_split = [sum(self.shards.ranges[n][self.rank][1] for n in names if self.owner[n] == s)
                     for s in range(self.world)]
        recv = send.new_empty(sum(out_split))
        work = collectives.all_to_all_single(recv, send, out_split, in_split, self.group, async_op=True)
        self.stats["sent_bytes"] += (sum(in_split) - in_split[self.rank]) * send.element_size()

        def unpack() -> dict[str, torch.Tensor]:
            local, offset = {}, 0
            for s in range(self.world):
                for n in names:
                    if self.owner[n] == s:
                        k = self.shards.ranges[n][self.rank][1]
                        local[n] = recv[offset:offset + k]
                        offset += k
            return local

        return _InFlight(work, unpack, send)

    def _gathered(self, buckets: list[list[str]],
                  read: Callable[[str], torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Yield, bucket by bucket, {name: full flat tensor} of the matrices this rank owns, built from
        every rank's `read(name)`; the next bucket travels to its owners while the caller works on this one."""
        inbound = self._send_to_owners(buckets[0], read) if buckets else None
        for i in range(len(buckets)):
            full = inbound.wait()
            if i + 1 < len(buckets):
                inbound = self._send_to_owners(buckets[i + 1], read)
            yield full
            del full  # let the caller free this bucket before the next one is unpacked

    def _pipeline(self, buckets: list[tuple[int, list[str]]], read: Callable[[str], torch.Tensor],
                  write: Callable[[str, torch.Tensor], None] | None, leaks: dict | None = None,
                  removed: bool = False) -> None:
        """For each (bucket index, names): gather the matrices on their owners, project them there, and
        `write` each rank's projected piece back (write=None: only measure `leaks`, send nothing back;
        removed=True: send back what the projection removed, x - P(x), instead of P(x)).

        Software pipeline: while bucket i is projected, bucket i + 1 travels to its owners and bucket
        i - 1 travels back, so with many buckets (LLaMA-2-7B on 8 ranks: 13) the exchanges can hide
        behind the projection. Ranks post the collectives in the same order, as collectives require.
        At most three buckets are in memory at once.
        """
        outbound = None
        for (b, names), full in zip(buckets, self._gathered([names for _, names in buckets], read)):
            self._project_owned(b, full, leaks, project=write is not None, removed=removed)
            if write is None:
                continue
            if outbound is not None:
                for n, t in outbound.wait().items():
                    write(n, t)
                outbound = None  # its receive buffer goes before the next one is allocated
            outbound = self._send_from_owners(names, full)
            del full  # sent (copied): free it before the next bucket is unpacked
        if outbound is not None:
            for n, t in outbound.wait().items():
                write(n, t)

    def _install(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int]) -> None:
        """Keep the owned bases packed per (bucket, shape, rank) group, so a step projects each group with
        one batched product and no per-step copy of the bases; `self.bases[n]` are views into the packs."""
        self.clear_bases()  # peak memory: the old packs go first (see _pack_bucket)
        for b in range(len(self.buckets)):
            self._pack_bucket(b, bases, ranks)
        self._installed(ranks)

    def _pack_bucket(self, b: int, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: Mapping[str, int]) -> None:
        """Pack bucket b's owned bases, dropping each group's per-matrix bases from `bases` (the caller's
        dict) as soon as they are stacked, so at most one group exists twice."""
        groups: dict[tuple, list[str]] = defaultdict(list)
        for n in self.buckets[b]:
            if n in bases and ranks[n] > 0:
                groups[(self.shapes[n], ranks[n])].append(n)
        for (shape, r), names in groups.items():
            u = torch.stack([bases[n][0] for n in names])
            v = torch.stack([bases.pop(n)[1] for n in names])
            # Past ~0.41 min(m, n) protected directions, projecting through the short side's
            # complement costs fewer flops (S.complement_side): computed here, once per fit.
            side = S.complement_side(shape, r) if self.projection == "two_sided" else None
            c = S.complement(v if side == "right" else u) if side else None
            self._packs[(b, shape, r)] = (names, u, v, c, side)

    def clear_bases(self) -> None:
        """Drop the owned bases (the packs and the views into them), freeing their memory."""
        self._packs, self.bases = {}, {}

    def _installed(self, ranks: Mapping[str, int]) -> None:
        self.bases = {n: (u[i], v[i]) for names, u, v, _, _ in self._packs.values() for i, n in enumerate(names)}
        self.ranks, self._leaks = dict(ranks), {}
        self._steps_since_bases = 0

    def _span(self, name: str, rank: int) -> tuple[int, int]:
        start, k = self.shards.ranges[name][rank]
        return start, start + k

    # -------------------------------------------------------------------------------- projection
    def _project_owned(self, bucket: int, full: dict[str, torch.Tensor], leaks: dict | None = None,
                       project: bool = True, removed: bool = False) -> None:
        """Project the owned full flat tensors of bucket `bucket` in place, one batched call per packed
        group (removed=True: replace each by what the projection removes, x - P(x)); with `leaks`, record
        each matrix's leak (of the projected tensor, or with project=False of the tensor as it is) as a
        device tensor."""
        for (b, shape, _), (names, u, v, c, side) in self._packs.items():
            if b != bucket:
                continue
            g = torch.stack([full[n].view(shape) for n in names])
            if project:
                g = S.project_two_sided_via(g, u, v, c, side) if side else S.project(g, u, v, self.projection)
                for i, n in enumerate(names):
                    if removed:
                        full[n].sub_(g[i].reshape(-1))
                    else:
                        full[n].copy_(g[i].reshape(-1))
            if leaks is not None:
                # One matrix at a time: the audit works in float64, whose temporaries would otherwise
                # be twice the whole group's size.
                for i, n in enumerate(names):
                    leaks[n] = S.leaks(g[i:i + 1], u[i:i + 1], v[i:i + 1])[0]

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.ranks.values())

    @torch.no_grad()
    def step(self) -> None:
        """Use instead of `engine.step()` after every `engine.backward(loss)` (every micro step)."""
        engine = self.engine
        if not self.active or not engine.is_gradient_accumulation_boundary():
            engine.step()
            return
        buckets = [(b, [n for n in bucket if self.ranks[n] > 0]) for b, bucket in enumerate(self.buckets)]
        buckets = [(b, names) for b, names in buckets if names]
        constrained = [n for _, names in buckets for n in names]
        self._pipeline(buckets, lambda n: self.shards.get_grad(n).float(), self.shards.set_grad)

        audit_now = self.audit_enabled and self._steps_since_bases % self.audit_every == 0
        self._steps_since_bases += 1
        need_update = self.project_update or audit_now
        old = self._pre_step_copy(constrained) if need_update else {}
        engine.step()
        self.stats["optimizer_steps"] += 1
        if not need_update:
            return
        leaks: dict[str, torch.Tensor] = {}
        dev = self.device
        # W_old + P(dW) = W_new - (dW - P(dW)): the owners send back what the projection removes, and
        # each rank subtracts it from its updated master, so W_old (in host memory on an accelerator)
        # comes back to the device once per step, here, for the difference.
        write = (lambda n, r: self.shards.set_master(n, self.shards.get_master(n).float() - r)) \
            if self.project_update else None
        self._pipeline(buckets, lambda n: self.shards.get_master(n).float() - old[n].to(dev, non_blocking=True),
                       write, leaks if audit_now else None, removed=True)
        if self.project_update:
            self.shards.finish_master_updates(constrained, self.engine.optimizer)
        if audit_now:
            self._leaks = self._share_leaks(leaks, constrained)
            self.stats["audited_at"] = self.stats["optimizer_steps"]

    def _pre_step_copy(self, names: list[str]) -> dict[str, torch.Tensor]:
        """This rank's fp32 master partitions of `names` before the optimizer step, on the device or in
        host buffers reused across steps (pinned on CUDA: the copies run asynchronously in stream order,
        before the optimizer's kernels overwrite the master and before the update pass reads them back)."""
        if not self.pre_step_copy_on_host:
            return {n: self.shards.get_master(n).detach().clone() for n in names}
        out = {}
        for n in names:
            t = self.shards.get_master(n)
            buf = self._host_copy.get(n)
            if buf is None or buf.shape != t.shape:
                buf = self._host_copy[n] = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                                       pin_memory=t.device.type == "cuda")
            out[n] = buf.copy_(t, non_blocking=True)
        return out

    def _share_leaks(self, leaks: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, float]:
        vec = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        if leaks:
            vec[torch.tensor([self.index[n] for n in leaks], device=self.device)] = torch.stack(list(leaks.values()))
        if self.world > 1:
            collectives.all_reduce_(vec, group=self.group)
        values = vec.tolist()  # the step's one host sync for the audit
        return {n: values[self.index[n]] for n in names}

    def audit(self) -> dict[str, float]:
        """{param_name: leak} of the last audited optimizer step (`stats["audited_at"]`), for every
        constrained target (same on all ranks).

        leak = max(|U_h^T dW|, |dW V_h|) / |dW| of the update dW applied to the fp32 master (with
        project_update=False: of the optimizer's unprojected update). Empty before the first step.
        """
        if not self.audit_enabled:
            raise RuntimeError("audit() needs SubspaceProjector(..., audit=True)")
        return dict(self._leaks)

    # ------------------------------------------------------------------------------- task boundary
    @torch.no_grad()
    def fit(self, rank_policy=None, importance_batches: Sequence[Mapping[str, torch.Tensor]] | None = None) -> dict[str, int]:
        """Task boundary (collective): SVD of the current fp32 master weights, each on its owner rank.

        rank_policy: FixedRank / AdaptiveRank / "fixed" / "adaptive" / {"policy": ..., ...};
            default AdaptiveRank() when importance batches are given, else FixedRank(0.5).
        importance_batches: batches (dicts with input_ids and optional attention_mask) for the
            adaptive policy's layer importance; the same number on every rank (each rank its own
            data); the sums are reduced over the data-parallel group.
        Returns {param_name: rank}.
        """
        if rank_policy is None:
            rank_policy = S.AdaptiveRank() if importance_batches is not None else S.FixedRank(0.5)
        policy = S.rank_policy_from(rank_policy)
        importance = None
        if policy.needs_importance:
            if importance_batches is None:
                raise ValueError("the adaptive rank policy needs importance_batches (samples of the previous "
                                 "task or general data); or use FixedRank")
            importance = self.layer_importance(importance_batches, policy.normalize)
        ranks = {}
        for n in self.names:
            layer_imp = None
            if importance is not None:
                # A target outside any decoder layer gets the policy's most protective ratio.
                layer_imp = importance.get(S.layer_of(n), 1.0)
            ranks[n] = policy.rank(self.shapes[n], layer_imp)
        self.importance = importance

        self.clear_bases()  # a refit does not read the old bases: free them before the new ones are built
        bases = {}
        # The next bucket's weights travel to their owners while this bucket's SVDs run.
        for full in self._gathered(self.buckets, lambda n: self.shards.get_master(n).float()):
            # One SVD per matrix: a batched call per shape measured 10% slower on CPU and needs a stacked
            # copy of the bucket's weights (docs/benchmarks.md).
            for n, w in full.items():
                try:
                    bases[n] = S.svd_bases(w.view(self.shapes[n]), ranks[n], self.svd_dtype)
                except ValueError as e:
                    raise ValueError(f"{n}: {e}") from None
            del full
        self._install(bases, ranks)
        return dict(ranks)

    @torch.no_grad()
    def mark(self) -> None:
        """Start of a task (collective): remember the owned targets' weights, so that `extend` at the
        end can protect what the task changed. Kept in host memory: one fp32 copy of the owned targets
        (total / world per rank), touched only at task boundaries."""
        anchor = {}
        for full in self._gathered(self.buckets, lambda n: self.shards.get_master(n).float()):
            anchor.update((n, w.to("cpu", copy=True)) for n, w in full.items())
        self.anchor = anchor

    @torch.no_grad()
    def mark_from(self, read: Callable[[str], torch.Tensor]) -> None:
        """Like `mark`, but the weights to diff against are `read(name)` (each owned target's full matrix),
        not the current ones: the next `extend` protects what changed since those weights, e.g. the
        alignment that made the starting model from its base. Local, no collective: a rank reads only
        the matrices it owns, so each reference matrix is read once in all."""
        anchor = {}
        for n in self.owned():
            w = read(n)
            if tuple(w.shape) != tuple(self.shapes[n]):
                raise ValueError(f"{n}: the reference has shape {tuple(w.shape)}, the model {tuple(self.shapes[n])}")
            if not torch.isfinite(w).all():
                raise ValueError(f"{n}: the reference has non-finite values")
            anchor[n] = w.detach().to("cpu", torch.float32).reshape(-1).clone()
        self.anchor = anchor

    @torch.no_grad()
    def extend(self, energy: float, max_ratio: float) -> dict[str, int]:
        """End of a task (collective): add to every target's protected subspace the top directions of the
        task's update dW = W - W(mark), as many as hold `energy` of |dW|^2 while the total stays within
        `max_ratio` x min(m, n); then mark the current weights for the next task. Keeps what was
        protected (see `ds_cl.core.subspace.extend_bases`). Returns {param_name: directions added}."""
        if self.anchor is None:
            raise RuntimeError("extend() needs mark() at the start of the task (the weights to diff against)")
        anchor = {}

        def directions(n, w, u, v, room):
            # Projected again: without project_update the optimizer's step leaks, and rounding always does.
            dw = S.project(w - self.anchor[n].to(w.device).view(w.shape), u, v, "two_sided")
            anchor[n] = w.reshape(-1).to("cpu", copy=True)
            return S.update_directions(dw, energy, room)

        added = self._extend_buckets(self._gathered(self.buckets, lambda n: self.shards.get_master(n).float()),
                                     directions, max_ratio)
        self.anchor = anchor
        return added

    @torch.no_grad()
    def extend_inputs(self, batches: Sequence[Mapping[str, torch.Tensor]], energy: float,
                      max_ratio: float) -> dict[str, int]:
        """End of a task, gradient projection memory's way (collective): protect the span of the inputs
        the task fed each target Linear (y = W x), so that a later update dW with dW x = 0 leaves the
        layer's outputs on them unchanged.

        `batches` (dicts with input_ids and optional attention_mask; the same number on every rank, each
        rank its own data) run forward with hooks on the target modules; C = sum x x^T over their unmasked
        tokens is summed over the ranks. Per matrix, V_h grows by the top eigenvectors of C outside it, as
        many as hold `energy` of that part's trace while the total stays within `max_ratio` x min(m, n)
        (`ds_cl.core.subspace.input_directions`), and U_h by as many directions: those of the outputs
        W v_d the protected inputs produce now (`output_directions`). The equal count is because the
        packs keep one rank per matrix for both sides; it makes the constraint stricter than GPM's, which
        leaves the output side free. Needs no `mark()`. Returns {param_name: directions added}.

        Memory and time: the covariances of one bucket at a time (n x n float64 per distinct input, every
        rank), so the batches run forward once per bucket.
        """
        batches = self._same_batches(batches, "boundary batches")
        model = self.engine.module
        modules = {}
        for n in self.names:
            path, _, leaf = n.rpartition(".")
            mod = model.get_submodule(path) if path else None
            if leaf != "weight" or not isinstance(mod, torch.nn.Linear):
                raise ValueError(f"{n} is not the weight of a torch.nn.Linear; protecting inputs needs y = W x "
                                 f"layers (narrow the target patterns)")
            modules[n] = mod
        covs: dict[str, torch.Tensor] = {}

        def gathered():
            # One bucket at a time: its forwards (collective under ZeRO-3) never run beside an exchange.
            for names in self.buckets:
                covs.clear()
                covs.update(self._input_covariances({n: modules[n] for n in names}, batches))
                yield from self._gathered([names], lambda n: self.shards.get_master(n).float())
            covs.clear()

        def directions(n, w, u, v, room):
            v_d = S.input_directions(covs.pop(n), v, energy, room)
            return S.output_directions(w, u, v_d), v_d

        return self._extend_buckets(gathered(), directions, max_ratio)

    def _extend_buckets(self, fulls: Iterable[dict[str, torch.Tensor]], directions: Callable, max_ratio: float) -> dict[str, int]:
        """Grow the owned bases bucket by bucket: `fulls` yields each bucket's {name: full flat weight} of
        the owned matrices (in bucket order), `directions(name, W m x n, U_h, V_h, room)` gives the (U_d,
        V_d) to add, at most `room` of them (what keeps the total within `max_ratio` x min(m, n))."""
        added = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        bases = {}
        for b, full in enumerate(fulls):
            for n, w in full.items():
                m, k = self.shapes[n]
                u, v = self.bases.get(n, (w.new_zeros(m, 0), w.new_zeros(k, 0)))
                room = max(0, S.max_protected_rank((m, k), max_ratio) - u.shape[1])
                try:
                    u_d, v_d = directions(n, w.view(m, k), u, v, room)
                except ValueError as e:
                    raise ValueError(f"{n}: {e}") from None
                bases[n] = S.extend_bases(u, v, u_d.to(u.device), v_d.to(v.device))
                added[self.index[n]] = u_d.shape[1]
            # This bucket's extended bases replace its old ones now: old and new coexist for one bucket,
            # not for all of them (ds_cl.core.projector_memory).
            u = v = None  # the old bases' last views go with them
            for key in [k for k in self._packs if k[0] == b]:
                del self._packs[key]
            for n in full:
                self.bases.pop(n, None)
            self._pack_bucket(b, bases, {n: int(bases[n][0].shape[1]) for n in full})
        if self.world > 1:
            collectives.all_reduce_(added, group=self.group)
        counts = added.tolist()
        self._installed({n: self.ranks[n] + int(counts[self.index[n]]) for n in self.names})
        return {n: int(counts[self.index[n]]) for n in self.names}

    def _input_covariances(self, modules: Mapping[str, torch.nn.Module],
                           batches: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{name: C} of the owned matrices among `modules` (target name -> its Linear), C = sum x x^T over
        the unmasked tokens of every input x the module saw in `batches`, summed over the ranks
        (collective), in float64 (see `ds_cl.core.subspace.input_directions`) on the device.

        Modules that read the same input tensor one after the other (q/k/v, gate/up) share one sum: the
        first batch decides which do, from the input's memory and version (ZeRO-3 hands each module its
        own detached view of the same tensor, so object identity cannot tell), and later batches must agree.
        """
        names = list(modules)
        sums: dict[str, torch.Tensor] = {}
        leader: dict[str, str] = {}
        state: dict = {"mask": None, "last": None}

        def hook(n):
            def fn(module, args, output):
                x = args[0]
                key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x._version)
                last = state["last"]
                same = last is not None and last[0] == key
                if n not in leader:
                    leader[n] = last[1] if same else n
                elif leader[n] != n and not (same and last[1] == leader[n]):
                    raise RuntimeError(f"{n} read the same input as {leader[n]} in the first batch but not in a "
                                       f"later one; its input covariance cannot be shared")
                if leader[n] == n:
                    flat = x.reshape(-1, x.shape[-1])
                    mask = state["mask"]
                    if mask is not None:
                        if tuple(x.shape[:-1]) != tuple(mask.shape):
                            raise ValueError(f"{n}: input of shape {tuple(x.shape)} does not match the attention "
                                             f"mask's {tuple(mask.shape)}")
                        flat = flat[mask.reshape(-1).bool()]
                    flat = flat.double()  # exact for fp32/bf16 inputs: see input_directions
                    sums[n] = flat.T @ flat if n not in sums else sums[n].addmm_(flat.T, flat)
                # x stays referenced until the next hook: its memory cannot be reused by another tensor
                # that would then look like the same input.
                state["last"] = (key, leader[n], x)
            return fn

        self._forward(batches, {modules[n]: hook(n) for n in names}, state)
        missing = [n for n in names if n not in leader]
        if missing:
            raise ValueError(f"{missing[0]} saw no input in the boundary batches")
        # Every rank must have grouped the same way, or the sums' all-reduces would not pair up.
        order = torch.tensor([[names.index(leader[n]), -names.index(leader[n])] for n in names],
                             dtype=torch.float64, device=self.device).reshape(-1)
        agreed = order.clone()
        if self.world > 1:
            collectives.all_reduce_(agreed, "max", group=self.group)
        if not torch.equal(agreed, order):
            raise RuntimeError("ranks grouped the target modules' shared inputs differently")
        for n in [n for n in names if leader[n] == n]:
            k = self.shapes[n][1]
            if n not in sums:  # every token masked on this rank: nothing to add, but the sum is collective
                sums[n] = torch.zeros(k, k, dtype=torch.float64, device=self.device)
            if tuple(sums[n].shape) != (k, k):
                raise ValueError(f"{n}: inputs of size {sums[n].shape[0]}, but the weight has {k} columns")
            # One all-reduce per sum, in place: a single buffer of them all would hold the bucket's sums twice.
            if self.world > 1:
                collectives.all_reduce_(sums[n], group=self.group)
        return {n: sums[leader[n]] for n in self.owned(names)}

    def _same_batches(self, batches, what: str) -> list:
        """`batches` as a list, after checking that every rank has as many (ZeRO-3 forwards are collective)."""
        batches = list(batches)
        counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            collectives.all_reduce_(counts, "max", group=self.group)
            if counts[0] != len(batches) or -counts[1] != len(batches):
                raise ValueError(f"{what} differ in number across ranks (this rank {len(batches)}, "
                                 f"max {int(counts[0])}, min {int(-counts[1])}); ZeRO-3 forwards are collective")
        if not batches:
            raise ValueError(f"{what}: none given")
        return batches

    def _forward(self, batches: list, hooks: Mapping[torch.nn.Module, Callable], state: dict,
                 with_kwargs: bool = False) -> None:
        """Run each batch through the model (eval mode, no gradients) with `hooks` as forward hooks on their
        modules; state["mask"] holds the batch's attention mask (None without one) and state["last"] is
        reset to None before each batch."""
        model = self.engine.module
        handles = [mod.register_forward_hook(fn, with_kwargs=with_kwargs) for mod, fn in hooks.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    if "input_ids" not in batch:
                        raise ValueError("each batch needs 'input_ids'")
                    ids = batch["input_ids"].to(self.device)
                    mask = batch.get("attention_mask")
                    mask = mask.to(self.device) if mask is not None else None
                    state["mask"], state["last"] = mask, None
                    model(input_ids=ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            state["last"] = None

    def layer_importance(self, batches: Sequence[Mapping[str, torch.Tensor]], normalize: str = "minmax") -> dict[str, float]:
        """Per decoder layer, normalised importance from input/output cosine similarity (collective)."""
        batches = self._same_batches(batches, "importance batches")
        model = self.engine.module
        layers = sorted({S.layer_of(n) for n in self.names} - {None}, key=lambda s: (len(s), s))
        if not layers:
            raise ValueError("no target lives in a decoder layer ('...layers.N...'); use FixedRank")
        sums = {layer: [0.0, 0.0] for layer in layers}
        state = {"mask": None}

        def hook(layer):
            def fn(module, args, kwargs, output):
                x_in = args[0] if args else kwargs["hidden_states"]
                x_out = output[0] if isinstance(output, (tuple, list)) else output
                s, c = S.token_cosine_sum(x_in, x_out, state["mask"])
                sums[layer][0] += s
                sums[layer][1] += c
            return fn

        self._forward(batches, {model.get_submodule(layer): hook(layer) for layer in layers}, state, with_kwargs=True)
        vec = torch.tensor([v for layer in layers for v in sums[layer]], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            collectives.all_reduce_(vec, group=self.group)
        cos_sum = {layer: float(vec[2 * i]) for i, layer in enumerate(layers)}
        count = {layer: float(vec[2 * i + 1]) for i, layer in enumerate(layers)}
        return S.layer_importance(cos_sum, count, normalize)

    def set_bases(self, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Use explicit full bases {param_name: (U_h, V_h)}, the same on every rank; targets not named
        are left unconstrained. Each rank keeps only the matrices it owns."""
        unknown = [n for n in bases if n not in self.index]
        if unknown:
            raise ValueError(f"set_bases: {unknown[0]!r} is not a projector target "
                             f"(targets: {', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''})")
        ranks, mine = {n: 0 for n in self.names}, {}
        for n, pair in bases.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"set_bases: {n} needs a pair (U_h, V_h)")
            u, v = pair
            S.check_bases(n, self.shapes[n], u, v)
            ranks[n] = int(u.shape[1])
            if self.owner[n] == self.rank:
                mine[n] = (u.detach().to(self.device, torch.float32).contiguous(),
                           v.detach().to(self.device, torch.float32).contiguous())
        self._install(mine, ranks)

    # ---------------------------------------------------------------------------------- checkpoints
    def bases_bytes(self) -> int:
        """Bytes of bases held by this rank."""
        return sum(t.numel() * t.element_size() for _, u, v, c, _ in self._packs.values()
                   for t in (u, v, c) if t is not None)

    def state_dict(self) -> dict:
        """This rank's state (its owned bases, every rank's ranks): save one file per rank."""
        return {
            "format": STATE_FORMAT,
            "projection": self.projection,
            "world": self.world,
            "rank": self.rank,
            "targets": list(self.names),
            "owner": dict(self.owner),
            "ranks": dict(self.ranks),
            "importance": self.importance,
            "bases": {n: (u.cpu().clone(), v.cpu().clone()) for n, (u, v) in self.bases.items()},
            "anchor": None if self.anchor is None else {n: w.clone() for n, w in self.anchor.items()},
        }

    def load_state_dict(self, sd: Mapping) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"projector state format {sd.get('format')!r}, expected {STATE_FORMAT}")
        if list(sd["targets"]) != self.names:
            raise ValueError("projector state was saved for other targets than this engine's "
                             f"({len(sd['targets'])} saved, {len(self.names)} now)")
        if sd["world"] != self.world or sd["rank"] != self.rank or dict(sd["owner"]) != self.owner:
            raise ValueError(f"projector state of rank {sd['rank']} of {sd['world']} cannot be loaded on rank "
                             f"{self.rank} of {self.world}: bases are sharded by owner rank; resume on the same "
                             f"number of ranks, or re-fit at the task boundary")
        if sd["projection"] != self.projection:
            raise ValueError(f"projector state uses projection {sd['projection']!r}, this projector {self.projection!r}")
        bases = {}
        for n, (u, v) in sd["bases"].items():
            S.check_bases(n, self.shapes[n], u, v)
            bases[n] = (u.to(self.device, torch.float32), v.to(self.device, torch.float32))
        missing = [n for n in self.owned() if sd["ranks"][n] > 0 and n not in bases]
        if missing:
            raise ValueError(f"projector state lacks the bases of {missing[0]} (rank {sd['ranks'][missing[0]]})")
        anchor = sd.get("anchor")
        if anchor is not None and sorted(anchor) != sorted(self.owned()):
            raise ValueError("projector state's task-start weights do not match this rank's targets")
        self._install(bases, dict(sd["ranks"]))
        self.importance = sd.get("importance")
        self.anchor = None if anchor is None else {n: w.to("cpu", torch.float32) for n, w in anchor.items()}


class _InFlight:
    """A started exchange: `wait()` finishes it and returns what `unpack` makes of the received buffer."""

    def __init__(self, work, unpack: Callable[[], dict], send: torch.Tensor | None = None):
        self._work, self._unpack = work, unpack
        self._send = send  # the send buffer must outlive the asynchronous collective

    def wait(self) -> dict[str, torch.Tensor]:
        if self._work is not None:
            self._work.wait()
        self._work = self._send = None
        # Dropping the closure frees the receive buffer once it is unpacked (unless unpack returned views).
        unpack, self._unpack = self._unpack, None
        return unpack()
