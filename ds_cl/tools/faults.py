"""Fault injection for the reliability tests: real faults at exact points of a run.

`DS_CL_FAULT` holds `;`-separated specs `ACTION@POINT[:key=value,...]`, e.g.

    DS_CL_FAULT="kill@fit:phase=1,rank=1"      # SIGKILL rank 1 right after task 1's subspace fit
    DS_CL_FAULT="kill@save:step=5,rank=1"      # SIGKILL rank 1 mid-save of checkpoint step 5
    DS_CL_FAULT="nan@loss:step=3"              # make the loss of optimizer step 3 NaN

A spec fires when every key matches the point's values (`rank` is the global rank). Unset (always, in
real runs) it does nothing. The kill is a real `kill -9` of the process, as a node failure would be.
"""

from __future__ import annotations

import os
import signal


def _specs(env: str | None = None) -> list[tuple[str, str, dict]]:
    raw = os.environ.get("DS_CL_FAULT", "") if env is None else env
    out = []
    for spec in filter(None, (s.strip() for s in raw.split(";"))):
        action, _, rest = spec.partition("@")
        point, _, args = rest.partition(":")
        kv = dict(a.split("=", 1) for a in args.split(",") if "=" in a)
        out.append((action, point, kv))
    return out


def matches(point: str, rank: int, **where) -> list[str]:
    """Actions of the specs that match this point."""
    vals = {k: str(v) for k, v in where.items()}
    vals["rank"] = str(rank)
    return [a for a, p, kv in _specs() if p == point and all(vals.get(k) == v for k, v in kv.items())]


def fault_point(point: str, rank: int, **where) -> bool:
    """Kill or signal this process if a spec says so; True if a `nan` spec matches (the caller poisons)."""
    if "DS_CL_FAULT" not in os.environ:
        return False
    acts = matches(point, rank, **where)
    if "kill" in acts:
        print(f"[ds-cl fault] kill -9 of rank {rank} at {point} {where}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if "term" in acts:
        print(f"[ds-cl fault] SIGTERM to rank {rank} at {point} {where}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    return "nan" in acts


def poisoned(loss, rank: int, step: int):
    """The loss, made NaN where a `nan@loss:step=N` spec matches: a real NaN through backward and step."""
    return loss * float("nan") if fault_point("loss", rank, step=step) else loss
