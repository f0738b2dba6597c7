"""One checkpoint manager for every stateful part of a run: the DeepSpeed engine (ZeRO-3 shards of
weights and optimizer), the projector's per-rank bases, the trainer's cursor (task, step, accuracy
matrix) and every rank's RNG states.

Layout under `<output_dir>/checkpoints/`:

    step_00000012/           one complete checkpoint
        deepspeed/           engine.save_checkpoint (one file per rank)
        projector_rank<r>.pt the projector's state of rank r (its bases are sharded)
        rng_rank<r>.pt       python/numpy/torch RNG states of rank r
        trainer_state.json   the cursor; written last, with COMPLETE
        COMPLETE
    latest                   name of the last complete checkpoint

Atomic: everything is written into `.tmp-step_N/` and renamed once all ranks are done, so a
crash leaves either the previous checkpoint or the new one, never half of one. `output_dir` must
be on a filesystem shared by all nodes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    import numpy as np

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, rank: int, world: int, keep: int = 2):
        self.root = Path(root)
        self.rank, self.world, self.keep = rank, world, keep

    # -- discovery --------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / MARKER).is_file())

    def latest(self) -> Path | None:
        """The last complete checkpoint (the `latest` pointer, else the newest marked directory)."""
        ptr = self.root / "latest"
        if ptr.is_file():
            p = self.root / ptr.read_text().strip()
            if (p / MARKER).is_file():
                return p
        done = self.complete()
        return done[-1] if done else None

    # -- save / load (collective: every rank calls) -----------------------------------------

    def save(self, engine, projector, state: dict, global_step: int) -> Path:
        name = f"step_{global_step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        if projector is not None:
            torch.save(projector.state_dict(), tmp / f"projector_rank{self.rank}.pt")
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump({**state, "world_size": self.world}, f, indent=1)
            (tmp / MARKER).write_text("ok\n")
            if final.exists():  # a re-run of the same step after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            ptr_tmp = self.root / ".latest.tmp"
            ptr_tmp.write_text(name + "\n")
            os.replace(ptr_tmp, self.root / "latest")
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, engine, projector) -> dict:
        with open(path / "trainer_state.json") as f:
            state = json.load(f)
        if state["world_size"] != self.world:
            raise RuntimeError(f"{path} was written by {state['world_size']} ranks; this run has {self.world} "
                               "(the projector's bases are sharded per rank: resume with the same world size)")
        load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"{path}: deepspeed could not load its checkpoint")
        pfile = path / f"projector_rank{self.rank}.pt"
        if projector is not None and pfile.is_file():
            projector.load_state_dict(torch.load(pfile, weights_only=False))
        set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        return state
