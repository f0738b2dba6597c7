"""LoRA baselines in the same harness: O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning") and incremental LoRA (the same without the orthogonality term).

Per task t a new LoRA adapter (A_t: r x in, B_t: out x r) on every target Linear; the frozen base plus
every adapter trained so far gives the output  y = W x + b + (alpha / r) * sum_{s<=t} B_s A_s dropout(x).
Earlier adapters are frozen (requires_grad False, learning rate 0), the base is frozen throughout.

Loss of task t (O-LoRA, eq. in the paper; sums over every target layer):

    L = L_task + lambda_orth * sum_{i<t} ||A_i A_t^T||^2 + lambda_l2 * (||A_t||^2 + ||B_t||^2)

with ||.||^2 the squared Frobenius norm (`orth_norm: fro2`, the paper's formula). `orth_norm: l1` is the
entry-wise sum of |A_i A_t^T| that the authors' released trainer computes. Defaults and why: docs/baselines.md.

Own code, not PEFT (docs/baselines.md): a target `nn.Linear` keeps its class's forward and its parameter
names (`...q_proj.weight`), and gains direct parameters `lora_A_<t>`, `lora_B_<t>` for every task, all
created before `deepspeed.initialize`. Direct parameters matter on ZeRO-3: its hooks gather a module's own
parameters around that module's forward and backward, so the adapters and the regulariser computed in
the same forward are available where they are used. The adapters of all tasks exist from the start (their
B is zero until trained), so the engine and its optimizer are built once; one optimizer parameter group per
task lets the trainer give every group but the current task's a learning rate of 0.

Evaluation runs base + all trained adapters; `merged_tensors` yields W + (alpha / r) sum_s B_s A_s per
target for `ds_cl.training.export.export_hf`, so an export is a plain HF model (no adapter keys).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_cl.methods.base import Method


class LoRAMixin:
    """Mixed into a target Linear's class: the base forward plus the active adapters (see module doc)."""

    lora_rank: int
    lora_scale: float
    lora_dropout: float
    lora_tasks: int  # adapters held (one per task)
    lora_active: int  # adapters in the forward (tasks trained so far, the current one included)
    lora_ctl: "LoRAAdapters"

    def lora_pair(self, s: int) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"lora_A_{s}"), getattr(self, f"lora_B_{s}")

    def forward(self, x):
        y = super().forward(x)
        n = self.lora_active
        if n == 0:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout > 0 else x
        for s in range(n):
            a, b = self.lora_pair(s)
            y = y + self.lora_scale * F.linear(F.linear(h, a), b)
        if self.training:
            # The regulariser of the current adapter, here where ZeRO-3 has the adapters gathered
            # (they are this module's own parameters; its backward runs inside this module's backward).
            self.lora_ctl._regularise(self, n - 1)
        return y


def _lora_class(cls: type) -> type:
    return type(f"LoRA{cls.__name__}", (LoRAMixin, cls), {})


def match_targets(module_names: list[str], targets: list[str]) -> list[str]:
    """Names equal to a target or ending in '.' + target (PEFT's rule), e.g. `q_proj`, `self_attn.o_proj`."""
    return [n for n in module_names if any(n == t or n.endswith("." + t) for t in targets)]


def target_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """The Linear modules named by `targets`; a one-line error when they match none."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = match_targets(list(linears), targets)
    if not names:
        sample = sorted({n.rsplit(".", 1)[-1] for n in linears})[:12]
        raise ValueError(f"method.lora.targets={targets} match no Linear module of the model "
                         f"(its Linear names end in: {', '.join(sample)})")
    return [(n, linears[n]) for n in names]


class LoRAAdapters:
    """The adapters of a run: attach, per-task freezing, parameter groups, regulariser, merged export."""

    def __init__(self, model: nn.Module, lcfg, n_tasks: int, orthogonal: bool, dtype: torch.dtype,
                 seed: int = 0):
        if lcfg.rank < 1:
            raise ValueError(f"method.lora.rank must be >= 1, got {lcfg.rank}")
        self.cfg = lcfg
        self.n_tasks = n_tasks
        self.orthogonal = orthogonal
        self.lambda_orth = lcfg.lambda_orth if orthogonal else 0.0
        self.lambda_l2 = lcfg.lambda_l2
        self.current = -1
        self._terms: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        for p in model.parameters():  # the base is frozen: only adapters train
            p.requires_grad_(False)
        self.modules = target_linears(model, lcfg.targets)
        for idx, (name, m) in enumerate(self.modules):
            m.__class__ = _lora_class(type(m))
            m.lora_rank, m.lora_scale, m.lora_dropout = lcfg.rank, lcfg.alpha / lcfg.rank, lcfg.dropout
            m.lora_tasks, m.lora_active, m.lora_ctl = n_tasks, 0, self
            for t in range(n_tasks):
                # PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)), B = 0.
                # A generator per (seed, task, module): every rank makes the same values on its own.
                # On the host, as the generator, whatever the weight's device (under ZeRO-3 an empty
                # placeholder on the accelerator): deepspeed.initialize, which comes next, moves and
                # partitions them with the rest of the model, as it does the host-built weights without ZeRO-3.
                g = torch.Generator().manual_seed(seed * 1_000_003 + t * 10_007 + idx)
                bound = 1.0 / math.sqrt(m.in_features)
                a = torch.rand(lcfg.rank, m.in_features, generator=g, dtype=torch.float32, device="cpu")
                a = (a * 2 - 1) * bound
                m.register_parameter(f"lora_A_{t}", nn.Parameter(a.to(dtype)))
                m.register_parameter(f"lora_B_{t}", nn.Parameter(torch.zeros(m.out_features, lcfg.rank, dtype=dtype,
                                                                             device="cpu")))

    # -- parameters -----------------------------------------------------------------------------

    def adapter_params(self, t: int) -> list[tuple[str, nn.Parameter]]:
        out = []
        for name, m in self.modules:
            a, b = m.lora_pair(t)
            out += [(f"{name}.lora_A_{t}", a), (f"{name}.lora_B_{t}", b)]
        return out

    def param_groups(self) -> list[dict]:
        """One optimizer group per task (group t: adapter t of every target). Every adapter must be
        trainable when the engine is built (ZeRO registers its gradient hooks then)."""
        groups = []
        for t in range(self.n_tasks):
            params = [p for _, p in self.adapter_params(t)]
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": params})
        return groups

    def start_task(self, t: int) -> None:
        """Task t: adapters 0..t in the forward, only adapter t trainable. Call at every task start and
        after a resume."""
        if not 0 <= t < self.n_tasks:
            raise ValueError(f"task {t} out of range: {self.n_tasks} adapters")
        self.current = t
        for s in range(self.n_tasks):
            for _, p in self.adapter_params(s):
                p.requires_grad_(s == t)
        for _, m in self.modules:
            m.lora_active = t + 1

    def group_lr(self, group: int, lr: float) -> float:
        return lr if group == self.current else 0.0

    # -- the regulariser --------------------------------------------------------------------------

    def orth_term(self, a_prev: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
        o = a_prev.float() @ a_new.float().T  # r x r
        return o.abs().sum() if self.cfg.orth_norm == "l1" else o.pow(2).sum()

    def _regularise(self, m: LoRAMixin, t: int) -> None:
        a_t, b_t = m.lora_pair(t)
        orth = l2 = None
        if t > 0:  # logged for inclora too (no gradient there)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_orth > 0):
                orth = sum(self.orth_term(m.lora_pair(i)[0], a_t) for i in range(t))
        if self.lambda_l2 > 0:
            l2 = a_t.float().pow(2).sum() + b_t.float().pow(2).sum()
        self._terms.append((orth, l2))

    def add_regularisers(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Task loss + the regulariser terms of the forward just run; returns (loss, values to log)."""
        terms, self._terms = self._terms, []
        orth = [o for o, _ in terms if o is not None]
        l2 = [q for _, q in terms if q is not None]
        logs = {}
        if orth:
            total = torch.stack([o.float() for o in orth]).sum()
            logs["orth_loss"] = float(total.detach())
            if self.lambda_orth > 0:
                loss = loss + self.lambda_orth * total.to(loss.dtype)
        if l2:
            total = torch.stack(l2).sum()
            logs["l2_loss"] = float(total.detach())
            loss = loss + self.lambda_l2 * total.to(loss.dtype)
        return loss, logs

    def clear(self) -> None:
        self._terms = []

    # -- export -----------------------------------------------------------------------------------

    def merged_tensors(self, model: nn.Module) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """(name, full tensor on rank 0 / None elsewhere) for every base parameter, with
        W + (alpha / r) sum_s B_s A_s for the targets (in fp32, over the trained adapters); no adapter
        keys. Collective under ZeRO-3: every rank iterates."""
        import torch.distributed as dist

        from ds_cl.training.export import _gathered

        rank = dist.get_rank() if dist.is_initialized() else 0
        wrapped = {id(m): m for _, m in self.modules}
        seen = set()  # a tied weight (lm_head = embed_tokens) once, as named_parameters() lists it
        for mod_name, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if pname.startswith("lora_") or id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{mod_name}.{pname}" if mod_name else pname
                if id(mod) in wrapped and pname == "weight" and mod.lora_active > 0:
                    pairs = [mod.lora_pair(s) for s in range(mod.lora_active)]
                    with _gathered_all([p] + [x for ab in pairs for x in ab]):
                        t = None
                        if rank == 0:
                            w = p.detach().to("cpu", torch.float32).clone()
                            for a, b in pairs:
                                w += mod.lora_scale * (b.detach().to("cpu", torch.float32)
                                                       @ a.detach().to("cpu", torch.float32))
                            t = w
                else:
                    with _gathered(p):
                        t = p.detach().to("cpu").clone() if rank == 0 else None
                yield name, t


    def save_adapters(self, path, base_model: str | None = None) -> None:
        """Every trained adapter (tasks 0..current) as full tensors, `<module>.lora_A_<t>` /
        `<module>.lora_B_<t>`, to a safetensors file on rank 0, and the same as one PEFT LoRA folder
        next to it (`path` without its suffix; see `write_peft_adapter`). Collective under ZeRO-3."""
        import json
        from pathlib import Path

        import torch.distributed as dist
        from safetensors.torch import save_file

        from ds_cl.core import collectives
        from ds_cl.training.export import readable_like_other_outputs

        rank = dist.get_rank() if dist.is_initialized() else 0
        out = {}
        for t in range(self.current + 1):
            named = self.adapter_params(t)
            with _gathered_all([p for _, p in named]):
                if rank == 0:
                    out.update({n: p.detach().to("cpu").clone().contiguous() for n, p in named})
        if rank == 0:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"rank": str(self.cfg.rank), "alpha": str(self.cfg.alpha), "tasks": str(self.current + 1),
                    "targets": json.dumps(self.cfg.targets)}
            write_peft_adapter(out, [n for n, _ in self.modules], self.current + 1, self.cfg,
                               path.with_suffix(""), base_model)
            save_file(out, str(path) + ".tmp", metadata=meta)
            readable_like_other_outputs(str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        collectives.barrier()


def write_peft_adapter(tensors: dict, modules: list[str], tasks: int, lcfg, folder, base_model: str | None) -> None:
    """The adapters of tasks 0..tasks-1 as one PEFT LoRA adapter folder (adapter_config.json +
    adapter_model.safetensors) that `PeftModel.from_pretrained(base, folder)` loads onto the frozen base.

    The model after task t is W + (alpha / r) sum_s B_s A_s: stacking the t + 1 adapters gives one LoRA of
    rank (t + 1) r, B = [B_0 ... B_t], A = [A_0; ...; A_t], with lora_alpha (t + 1) alpha so that PEFT's
    scale lora_alpha / r stays alpha / r."""
    import json

    from safetensors.torch import save_file

    from ds_cl.training.export import readable_like_other_outputs, replaced_folder

    peft = {}
    for name in modules:
        a = torch.cat([tensors[f"{name}.lora_A_{t}"] for t in range(tasks)], dim=0)
        b = torch.cat([tensors[f"{name}.lora_B_{t}"] for t in range(tasks)], dim=1)
        peft[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        peft[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lcfg.rank * tasks, "lora_alpha": lcfg.alpha * tasks, "lora_dropout": lcfg.dropout, "bias": "none",
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}), "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    with replaced_folder(folder) as tmp:
        save_file(peft, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        readable_like_other_outputs(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _gathered_all(params):
    import contextlib

    import deepspeed

    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class OLoRA(Method):
    """O-LoRA: a new adapter per task, kept orthogonal to the earlier ones by the loss; base frozen."""

    name = "olora"
    orthogonal = True

    @classmethod
    def check_model(cls, cfg, model):
        target_linears(model, cfg.method.lora.targets)

    def __init__(self, cfg, dist, tokenizer):
        super().__init__(cfg, dist, tokenizer)
        self.adapters: Optional[LoRAAdapters] = None
        self.n_tasks = 0
        self.last_lr = 0.0

    def plan(self, tasks):
        phases = super().plan(tasks)
        self.n_tasks = len(phases)
        return phases

    def prepare_model(self, model):
        self.adapters = LoRAAdapters(model, self.cfg.method.lora, self.n_tasks, orthogonal=self.orthogonal,
                                     dtype=getattr(torch, self.cfg.model.dtype), seed=self.cfg.seed)

    def param_groups(self, model):
        return self.adapters.param_groups()

    def start_task(self, phase, phases, fresh):
        self.adapters.start_task(phase)  # adapters 0..phase in the forward, only this task's learns

    def group_lrs(self, lr, phase):
        t = self.cfg.train
        self.last_lr = lr * (self.cfg.method.lora.lr or t.lr) / t.lr
        return [self.adapters.group_lr(k, self.last_lr) for k in range(len(self.engine.optimizer.param_groups))]

    def loss(self, loss):
        return self.adapters.add_regularisers(loss)

    def step_metrics(self):
        return {"lr": self.last_lr}  # the current adapter's

    def export_tensors(self, module):
        return self.adapters.merged_tensors(module)

    def save_task_outputs(self, out, phase, name):
        # The adapters themselves, unmerged: adapters/task_<i>_<name>.safetensors
        # and as a PEFT LoRA folder adapters/task_<i>_<name>/ for PeftModel.from_pretrained(base, ...)
        self.adapters.save_adapters(out / "adapters" / f"task_{phase}_{name}.safetensors", self.cfg.model.name_or_path)


class IncLoRA(OLoRA):
    """Incremental LoRA: O-LoRA without the orthogonality term."""

    name = "inclora"
    orthogonal = False
