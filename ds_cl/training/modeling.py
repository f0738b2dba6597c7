"""Building a causal LM, partitioned under ZeRO-3 when the DeepSpeed config asks for stage 3.

`deepspeed.zero.Init` replaces `torch.Tensor.__new__` while it is active, so any library module imported
for the *first* time inside it runs its import-time code against the patched constructor. transformers
imports model modules lazily, and from 5.24 the LLaMA path imports `torch._dynamo`, whose polyfill
registration compares `Tensor.__new__`'s signature and raises ("Signature mismatch ... tensor_pynew").
So every caller builds through `build_causal_lm`, which first builds the same model on the meta device
(no memory, no weights) outside the context: every import the construction path makes happens there.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def hf_config(model_type_and_kwargs: Optional[dict] = None, name_or_path: Optional[str] = None):
    """A transformers config from an inline dict ({"model_type": ..., **kwargs}) or a model folder/name."""
    from transformers import AutoConfig

    if name_or_path is not None:
        return AutoConfig.from_pretrained(name_or_path)
    mc = dict(model_type_and_kwargs or {})
    return AutoConfig.for_model(mc.pop("model_type"), **mc)


@contextlib.contextmanager
def hf_zero3_off():
    """transformers' global "ZeRO-3 is on" flag (a weak reference to the live HfDeepSpeedConfig) set
    aside: a model built or loaded meanwhile is an ordinary whole model."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def meta_model(hf_cfg):
    """The model built on the meta device: its structure (names, shapes) for free, and every lazy import
    of the construction path done."""
    import torch._dynamo  # noqa: F401  (imported by transformers' masking code; see the module docstring)
    from transformers import AutoModelForCausalLM

    with hf_zero3_off(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_cfg)


def build_causal_lm(hf_cfg, ds_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                    name_or_path: Optional[str] = None):
    """The model from `hf_cfg` (random init) or from the weights at `name_or_path`, partitioned on
    construction when `ds_config` is ZeRO-3. Returns (model, keepalive): keep `keepalive` (the
    HfDeepSpeedConfig, None otherwise) referenced for as long as the model lives - transformers reads it
    to know that ZeRO-3 is on, both in `from_pretrained` and when it later gathers weights. `dtype` None:
    transformers' default, and under ZeRO-3 the precision the DeepSpeed config enables."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    meta_model(hf_cfg)
    kw = {} if dtype is None else {"dtype": dtype}
    zero3 = (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3
    keepalive = HfDeepSpeedConfig(ds_config) if zero3 else None
    if name_or_path is not None:
        # With the HfDeepSpeedConfig alive, from_pretrained enters zero.Init itself: each rank loads
        # only its partitions.
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kw), keepalive
    # No dtype for zero.Init: the DeepSpeed config's bf16/fp16 sections decide it. Given one, deepspeed
    # 0.19.8 ignores it wherever the accelerator lacks fp16 (`dtype or fp16 if ... else bf16`): on such
    # CPUs a float32 run silently trained in bfloat16.
    ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_config(hf_cfg, **kw)
    got = {(p.ds_tensor if hasattr(p, "ds_tensor") else p).dtype for p in model.parameters()}
    if dtype is not None and got != {dtype}:
        raise ValueError(f"model built in {sorted(map(str, got))}, not {dtype}: the DeepSpeed config's "
                         f"bf16/fp16 sections must agree with the model dtype")
    return model, keepalive


def build_model(model_cfg, ds_config: dict, seed: int):
    """The run's model (`model` section of the run config), partitioned under ZeRO-3. Returns (model,
    keepalive) as `build_causal_lm`."""
    torch.manual_seed(seed)
    model, keepalive = build_causal_lm(hf_config(model_cfg.config, model_cfg.name_or_path), ds_config,
                                       getattr(torch, model_cfg.dtype), model_cfg.name_or_path)
    model.config.use_cache = True
    if model_cfg.gradient_checkpointing:
        # transformers turns the KV cache off itself while training and back on for generate().
        # 5.x renamed it activation checkpointing; 4.x only has the old name.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model, keepalive


class SafetensorsWeights:
    """Read single tensors of an HF model folder's safetensors (one file or an index of shards) without
    loading the rest: each rank reads only the matrices it owns (method.osft.protect_update_from)."""

    def __init__(self, folder: str):
        import json
        from pathlib import Path

        from safetensors import safe_open

        from ds_cl.training.export import INDEX_NAME

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            files = {name: self.folder / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    files.update((name, f) for name in h.keys())
        if not files:
            raise ValueError(f"{self.folder} has no *.safetensors weights")
        self.files = files
        self._open = safe_open

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.files:
            return None
        with self._open(str(self.files[name]), "pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.folder} has no tensor {name}")
        with self._open(str(self.files[name]), "pt") as h:
            return h.get_tensor(name)
