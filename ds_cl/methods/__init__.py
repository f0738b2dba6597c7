"""Continual-learning methods: each a `Method` (ds_cl/methods/base.py) the training loop drives through
the same hooks. Adding one: a new module with its class, and a line here."""

from __future__ import annotations

import importlib

from ds_cl.methods.base import Method, Phase

# name -> "module:class" (imported when used: the config reads the names without importing torch code)
REGISTRY = {
    "osft": "ds_cl.methods.osft:OSFT",
    "seqft": "ds_cl.methods.base:Method",
    "replay": "ds_cl.methods.plain:Replay",
    "osft-replay": "ds_cl.methods.osft:OSFTReplay",
    "multitask": "ds_cl.methods.plain:Multitask",
    "olora": "ds_cl.methods.lora:OLoRA",
    "inclora": "ds_cl.methods.lora:IncLoRA",
}

# The methods whose plan() mixes replayed samples into tasks (method.replay: fraction, earlier).
REPLAYING = ("replay", "osft-replay")
# The methods that constrain every step with the subspace projector (method.osft).
PROJECTING = ("osft", "osft-replay")


def build_method(cfg, dist, tokenizer) -> Method:
    module, cls = REGISTRY[cfg.method.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, dist, tokenizer)


__all__ = ["PROJECTING", "REGISTRY", "REPLAYING", "Method", "Phase", "build_method"]
