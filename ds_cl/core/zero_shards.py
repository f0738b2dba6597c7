"""Where each rank's piece of a parameter lives in a DeepSpeed engine, and how to read and write it.

Every backend answers the same questions for a 2-D parameter p of `numel` elements, flattened
row-major: which contiguous flat range [start, start + n) each rank of the data-parallel group
holds, and how to get/set this rank's fp32 gradient and fp32 master weight for that range. Ranges
may start or end mid-row and may be empty; together they cover [0, numel) exactly once.

* ZeRO-3: p is flattened and split in partitions of P = ceil(numel / world) elements; the rank with
  index k *in p.ds_process_group* owns [k P, min((k + 1) P, numel)), the tail of the last one is
  padding. Gradients are read at the accumulation boundary before `engine.step()` through
  deepspeed's local-grad API (so the global norm, clipping and the optimizer see our values; with
  optimizer offload it also refreshes the per-parameter norm DeepSpeed caches).
* ZeRO-2: the optimizer partitions the flattened parameter *group*, so a rank holds an arbitrary
  contiguous fragment of p (`p._hp_mapping`); ranges are exchanged once with all_gather_object.
  Model weights are replicated, so a corrected master must be re-broadcast to every rank's copy.
* No ZeRO, one process, fp32: the whole parameter, `p.grad` and `p.data`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ds_cl.core import collectives

Range = tuple[int, int]  # (start, n) in the parameter's flat row-major index space


def _grad_missing(name: str) -> RuntimeError:
    return RuntimeError(f"{name}: no gradient partition at the accumulation boundary; call engine.backward(loss) "
                        f"before proj.step(), and do not call engine.step() yourself")


class Zero3Shards:

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        first = next(iter(named.values()))
        self.group = first.ds_process_group
        self.world = dist.get_world_size(group=self.group)
        self.rank = dist.get_rank(group=self.group)
        self.params = named
        self.ranges: dict[str, list[Range]] = {}
        for name, p in named.items():
            if p.ds_process_group is not self.group:
                raise ValueError(f"{name}: its ZeRO-3 process group differs from {next(iter(named))}'s; "
                                 f"the projector needs one data-parallel group for all targets")
            numel, part = p.ds_numel, p.ds_tensor.ds_numel
            self.ranges[name] = [(k * part, max(0, min(part, numel - k * part))) for k in range(self.world)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].ds_shape)

    def _pad(self, name: str, t: torch.Tensor) -> torch.Tensor:
        part = self.params[name].ds_tensor.ds_numel
        return t if t.numel() == part else torch.cat([t, t.new_zeros(part - t.numel())])

    def get_grad(self, name: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_grad

        g = safe_get_local_grad(self.params[name])
        if g is None:
            raise _grad_missing(name)
        return g.view(-1)[: self.ranges[name][self.rank][1]]

    def set_grad(self, name: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(self.params[name], self._pad(name, value))

    def get_master(self, name: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(self.params[name]).view(-1)[: self.ranges[name][self.rank][1]]

    def set_master(self, name: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_fp32_param

        p = self.params[name]
        safe_set_local_fp32_param(p, self._pad(name, value))
        # The forward pass gathers p.ds_tensor (the working-precision partition), not the fp32 master.
        p.ds_tensor.data.view(-1)[: value.numel()].copy_(value.to(p.ds_tensor.dtype))

    def finish_master_updates(self, names: list[str], optimizer=None) -> None:
        # Parameters below stage3_param_persistence_threshold stay gathered between steps and
        # engine.step() re-gathered them from the *uncorrected* partitions: gather them again.
        persistent = [self.params[n] for n in names if getattr(self.params[n], "ds_persist", False)]
        if persistent:
            # all_gather skips parameters that are AVAILABLE; release the stale full copies first
            # (has_been_updated=False: the partitions are the truth and are left as they are).
            persistent[0].partition(persistent, has_been_updated=False)
            persistent[0].all_gather(persistent)
        # ZeRO++ hpZ keeps a secondary copy of partitions; drop it so it is rebuilt from ours.
        if optimizer is not None and hasattr(optimizer, "invalidate_secondary_tensor"):
            optimizer.invalidate_secondary_tensor()


class FragmentShards:
    """ZeRO-2 (and any optimizer that links `_hp_mapping` fragments to model parameters)."""


    def __init__(self, named: dict[str, torch.nn.Parameter], group):
        self.group = group
        self.world = dist.get_world_size(group=group)
        self.rank = dist.get_rank(group=group)
        self.params = named
        local = {}
        for name, p in named.items():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                local[name] = (0, 0)
            else:
                addr = mapping.lp_fragment_address
                local[name] = (int(addr.start), int(addr.numel))
        everyone = collectives.all_gather_object(local, group=group)
        self.ranges = {name: [everyone[k][name] for k in range(self.world)] for name in named}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)

    def _grad_view(self, name: str) -> torch.Tensor:
        p = self.params[name]
        start, n = self.ranges[name][self.rank]
        if n == 0:
            return torch.empty(0, device=p.device)
        try:
            frag = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
        except (ValueError, KeyError, IndexError):
            raise _grad_missing(name) from None
        frag = frag.view(-1)
        # Some optimizers keep a full-size accumulation buffer per parameter: take our fragment of it.
        return frag.narrow(0, start, n) if frag.numel() == p.numel() and frag.numel() != n else frag

    def get_grad(self, name: str) -> torch.Tensor:
        return self._grad_view(name).float()

    def set_grad(self, name: str, value: torch.Tensor) -> None:
        view = self._grad_view(name)
        view.copy_(value.to(view.dtype))

    def get_master(self, name: str) -> torch.Tensor:
        p = self.params[name]
        if self.ranges[name][self.rank][1] == 0:
            return torch.empty(0, device=p.device)
        return p._hp_mapping.get_hp_fragment().view(-1)

    def set_master(self, name: str, value: torch.Tensor) -> None:
        if value.numel():
            self.params[name]._hp_mapping.get_hp_fragment().view(-1).copy_(value)

    def finish_master_updates(self, names: list[str], optimizer=None) -> None:
        # Model weights are replicated under ZeRO-2 and engine.step() refreshed them from the
        # uncorrected masters. DeepSpeed's own refresh copies each rank's fp32 partition (which holds our
        # corrected fragments) into its working-precision partition and all-gathers those: no full-size
        # fp32 buffer (a dense all-reduce of every target would cost ~24 GiB per GPU at LLaMA-2-7B).
        if not names:
            return
        if optimizer is None or not hasattr(optimizer, "update_lp_params"):
            raise RuntimeError("ZeRO-2 projection needs DeepSpeed's ZeRO-1/2 optimizer (update_lp_params) to "
                               "refresh the replicated weights from the corrected masters")
        optimizer.update_lp_params()


class PlainShards:
    """No ZeRO on one process: the optimizer updates the fp32 parameters themselves."""

    group = None
    world = 1
    rank = 0

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        self.params = named
        self.ranges = {name: [(0, p.numel())] for name, p in named.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)

    def get_grad(self, name: str) -> torch.Tensor:
        g = self.params[name].grad
        if g is None:
            raise _grad_missing(name)
        return g.view(-1)

    def set_grad(self, name: str, value: torch.Tensor) -> None:
        self.get_grad(name).copy_(value)

    def get_master(self, name: str) -> torch.Tensor:
        return self.params[name].data.view(-1)

    def set_master(self, name: str, value: torch.Tensor) -> None:
        self.params[name].data.view(-1).copy_(value)

    def finish_master_updates(self, names: list[str], optimizer=None) -> None:
        pass


def check_tiling(shards) -> None:
    """Every target's per-rank pieces must tile [0, numel) exactly once. The projector fills full matrices
    from these ranges into uninitialised buffers: a gap (a changed DeepSpeed internal, an unexpected
    partitioning) would project uninitialised memory silently, an overlap would double-write."""
    for name, ranges in shards.ranges.items():
        numel = math.prod(shards.shape(name))
        pieces = sorted((start, n) for start, n in ranges if n > 0)
        end = 0
        for start, n in pieces:
            if start != end:
                what = "a gap" if start > end else "an overlap"
                raise RuntimeError(f"{name}: the ranks' partitions leave {what} at element {min(start, end)} of "
                                   f"{numel} (pieces (start, numel) by rank: {ranges}); this DeepSpeed "
                                   f"version partitions differently from what {type(shards).__name__} reads")
            end = start + n
        if end != numel:
            raise RuntimeError(f"{name}: the ranks' partitions cover {end} of its {numel} elements (pieces "
                               f"(start, numel) by rank: {ranges}); this DeepSpeed version partitions "
                               f"differently from what {type(shards).__name__} reads")


def shards_for(engine, named: dict[str, torch.nn.Parameter]):
    """Pick the backend for `engine`, or raise a clear error for a configuration we cannot make exact."""
    stage = engine.zero_optimization_stage()
    model_dtype, grad_dtype = engine.get_data_types()
    if engine.fp16_enabled():
        raise ValueError("fp16 training is not supported by SubspaceProjector (loss-scaled, overflow-skipped steps); "
                         "use bf16 with \"data_types\": {\"grad_accum_dtype\": \"fp32\"}, or fp32")
    if model_dtype != torch.float32 and grad_dtype != torch.float32:
        raise ValueError(f"{model_dtype} training accumulates gradients in {grad_dtype}, which rounds a projected "
                         f"gradient back (leak ~5e-4 instead of ~1e-7): set \"data_types\": "
                         f"{{\"grad_accum_dtype\": \"fp32\"}} in the DeepSpeed config "
                         f"(ds_cl.core.projector.prepare_ds_config does it for you)")
    if stage == 3:
        return _checked(Zero3Shards(named))
    if stage == 2:
        if engine.zero_offload_optimizer():
            raise ValueError("ZeRO stage 2 with offload_optimizer is not supported by SubspaceProjector; "
                             "use ZeRO stage 3 (offload supported) or stage 2 without offload")
        return _checked(FragmentShards(named, engine.optimizer.dp_process_group))
    if stage == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != 1:
            raise ValueError(f"without ZeRO the projector runs on one process, but the world size is {world}; "
                             f"use ZeRO stage 3 (or 2) for data parallelism")
        if model_dtype != torch.float32:
            raise ValueError(f"without ZeRO the projector needs fp32 training (got {model_dtype}); "
                             f"use ZeRO stage 2/3 for bf16")
        return _checked(PlainShards(named))
    raise ValueError(f"ZeRO stage {stage} is not supported by SubspaceProjector: use stage 3 (the focus), "
                     f"stage 2, or no ZeRO (stage 0) on one process")


def _checked(shards):
    check_tiling(shards)
    return shards
