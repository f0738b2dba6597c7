"""Fault injection for the reliability tests: real faults at exact points of a run.

`DS_CL_FAULT` holds `;`-separated specs `ACTION@POINT[:key=value,...]`, e.g.

    DS_CL_FAULT="kill@fit:phase=1,rank=1"      # SIGKILL rank 1 right after task 1's subspace fit
    DS_CL_FAULT="kill@save:step=5,rank=1"      # SIGKILL rank 1 mid-save of checkpoint step 5
    DS_CL_FAULT="nan@loss:step=3"              # make the loss of optimizer step 3 NaN
    DS_CL_FAULT="sleep@save:step=2,seconds=15" # a slow save: every rank sleeps 15 s inside checkpoint 2

A spec fires when every key matches the point's values (`rank` is the global rank; `seconds`, the sleep's
length, is not matched). Unset (always, in real runs) it does nothing. The kill is a real `kill -9` of the
process, as a node failure would be.
"""

from __future__ import annotations

import os
import signal
import time

PARAMS = ("seconds",)  # a spec's arguments, not keys to match


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
    return [a for a, _ in _matching(point, rank, **where)]


def _matching(point: str, rank: int, **where) -> list[tuple[str, dict]]:
    vals = {k: str(v) for k, v in where.items()}
    vals["rank"] = str(rank)
    return [(a, kv) for a, p, kv in _specs() if p == point
            and all(vals.get(k) == v for k, v in kv.items() if k not in PARAMS)]


def fault_point(point: str, rank: int, **where) -> bool:
    """Sleep, kill or signal this process if a spec says so; True if a `nan` spec matches (the caller poisons)."""
    if "DS_CL_FAULT" not in os.environ:
        return False
    found = _matching(point, rank, **where)
    acts = [a for a, _ in found]
    for a, kv in found:
        if a == "sleep":  # a slow point (e.g. a slow filesystem under a save): signals arrive meanwhile
            secs = float(kv.get("seconds", "10"))
            print(f"[ds-cl fault] rank {rank} sleeps {secs:g} s at {point} {where}", flush=True)
            time.sleep(secs)
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
