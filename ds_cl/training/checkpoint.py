"""One checkpoint manager for every stateful part of a run: the DeepSpeed engine (ZeRO-3 shards of
weights and optimizer), the method's per-rank state (osft: the projector's bases), the trainer's cursor (task, step, accuracy
matrix) and every rank's RNG states.

Layout under `<output_dir>/checkpoints/`:

    step_00000012/           one complete checkpoint
        deepspeed/           engine.save_checkpoint (one file per rank)
        method_rank<r>.pt    the method's state of rank r, if it has one (osft: its bases, sharded)
        rng_rank<r>.pt       python/numpy/torch RNG states of rank r
        trainer_state.json   the cursor
        manifest.json        size and sha256 of every file above
        COMPLETE             written last
    latest                   name of the last complete checkpoint

Atomic: everything is written into `.tmp-step_N/` and renamed once all ranks are done, so a
crash leaves either the previous checkpoint or the new one, never half of one. `output_dir` must
be on a filesystem shared by all nodes.

Verified: before anything is loaded, every file of the manifest is checked (present, same size, same
sha256; the ranks share the hashing). A checkpoint that fails is reported naming the file, and
`load_latest` falls back to the previous complete one, so a model is never half loaded.

Disk full: a save first checks that the filesystem has room for one more checkpoint of the size of
the last one; a write that fails anyway (ENOSPC, EFBIG, EIO) removes the partial `.tmp-*` folder and
raises `CheckpointError` saying the previous checkpoint is intact (it is never touched before the
new one is complete).

Security: only tensors, plain containers and an allowlist of two DeepSpeed classes are unpickled, in
our files and in DeepSpeed's (`torch.load(..., weights_only=True)`; DeepSpeed's own loader unpickles
anything, so `load` gives the engine a checkpoint engine that does not). A checkpoint folder from
someone else cannot run code when resumed. The manifest catches damage, not tampering: whoever can
write the files can rewrite it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch

from ds_cl.core import collectives

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
SPACE_MARGIN = 1.1  # a save needs this x the size of the last checkpoint free


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _load_weights_only(engine) -> None:
    """Make `engine.load_checkpoint` unpickle with weights_only=True. DeepSpeed's TorchCheckpointEngine
    unpickles with weights_only off, which runs whatever a crafted file asks; its files need two classes
    beyond tensors and containers (the optimizer states' LossScaler and ZeroStageEnum)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:  # another engine (Nebula, decoupled): its own loader
        return

    def load(path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def rng_state() -> dict:
    """RNG states as tensors and plain values only (loadable with weights_only=True)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout on the GPU draws from the device's generator: without it a GPU resume is not bit-identical.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(s: dict) -> None:
    import numpy as np

    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def file_digest(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and p.name not in (MANIFEST, MARKER))


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def verify_checkpoint(path: Path, rank: int = 0, world: int = 1, checksums: bool = True) -> list[str]:
    """Problems of checkpoint `path` found by this rank (its share of the files), each naming a file."""
    path = Path(path)
    man = path / MANIFEST
    if not man.is_file():
        return [f"{man}: missing (no manifest: an incomplete or foreign checkpoint)"]
    try:
        entries = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{man}: unreadable manifest ({e})"]
    problems = []
    for i, (name, meta) in enumerate(sorted(entries.items())):
        if i % world != rank:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: missing")
            continue
        size = f.stat().st_size
        if size != meta["size"]:
            problems.append(f"{f}: {size} bytes, the manifest says {meta['size']} (truncated or changed)")
        elif checksums and file_digest(f) != meta["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest (corrupted)")
    return problems


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

    def candidates(self) -> list[Path]:
        """Complete checkpoints, the one to try first first (`latest`, then newest to oldest)."""
        done = self.complete()[::-1]
        first = self.latest()
        return ([first] if first is not None else []) + [p for p in done if p != first]

    def verify(self, path: Path) -> list[str]:
        """Collective: every problem of `path` (the ranks share the hashing); [] if intact."""
        mine = verify_checkpoint(path, self.rank, self.world)
        return sorted(p for part in collectives.all_gather_object(mine) for p in part)

    # -- save / load (collective: every rank calls) -----------------------------------------

    def _check_space(self, name: str) -> None:
        """Refuse (on every rank) to start a save the filesystem has no room for."""
        msg = None
        if self.rank == 0:
            prev = self.latest()
            if prev is not None:
                need = int(_tree_bytes(prev) * SPACE_MARGIN)
                free = shutil.disk_usage(self.root).free
                if free < need:
                    msg = (f"not enough space in {self.root} for checkpoint {name}: {free} bytes free, "
                           f"the last checkpoint took {need / SPACE_MARGIN:.0f}; nothing was written and the "
                           f"previous checkpoint {prev} is intact")
        msg = collectives.all_gather_object(msg)[0]
        if msg:
            raise CheckpointError(msg)

    def save(self, engine, method, state: dict, global_step: int) -> Path:
        from ds_cl.tools.faults import fault_point

        name = f"step_{global_step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        collectives.barrier()
        self._check_space(name)
        prev = self.latest()
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            collectives.barrier()
            engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            if method is not None and method.has_state:
                torch.save(method.state_dict(), tmp / f"method_rank{self.rank}.pt")
            torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                with open(tmp / "trainer_state.json", "w") as f:
                    json.dump({**state, "world_size": self.world}, f, indent=1)
            fault_point("save", self.rank, step=global_step)
            collectives.barrier()
            # Each rank hashes (and fsyncs: a full disk can surface only then) its share of the files.
            files = _files(tmp)
            mine = {n: {"size": (tmp / n).stat().st_size, "sha256": file_digest(tmp / n, fsync=True)}
                    for i, n in enumerate(files) if i % self.world == self.rank}
            entries = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
            if self.rank == 0:
                with open(tmp / MANIFEST, "w") as f:
                    json.dump({"files": entries}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                with open(tmp / MARKER, "w") as f:
                    f.write("ok\n")
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():  # a re-run of the same step after a resume
                    shutil.rmtree(final)
                os.replace(tmp, final)
                ptr_tmp = self.root / ".latest.tmp"
                ptr_tmp.write_text(name + "\n")
                os.replace(ptr_tmp, self.root / "latest")
                for old in self.complete()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as e:
            # This rank cannot go on with the collective save; free the space and say what is safe.
            # (torch.save reports a failed write as a RuntimeError of its zip writer, without the errno.)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                what = f"{e.strerror or e} ({e.filename or tmp})"
            else:
                what = f"{str(e).splitlines()[0][:160]} ({tmp}; {shutil.disk_usage(self.root).free} bytes free)"
            kept = f"the previous checkpoint {prev} is intact" if prev else "there is no earlier checkpoint"
            raise CheckpointError(f"writing checkpoint {name} failed on rank {self.rank}: {what}; "
                                  f"removed the partial {tmp.name}; {kept}") from e
        collectives.barrier()
        return final

    def load(self, path: Path, engine, method) -> dict:
        """Load a checkpoint already verified (see `load_latest`)."""
        with open(path / "trainer_state.json") as f:
            state = json.load(f)
        if state["world_size"] != self.world:
            raise CheckpointError(f"{path} was written by {state['world_size']} ranks; this run has {self.world} "
                                  "(the method's state, e.g. osft's bases, is sharded per rank: resume with the same "
                                  "world size)")
        pfile = path / f"method_rank{self.rank}.pt"
        stateful = method is not None and method.has_state
        if stateful and not pfile.is_file():
            raise CheckpointError(f"{pfile}: missing (the method state of rank {self.rank})")
        _load_weights_only(engine)
        try:
            load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        except pickle.UnpicklingError as e:
            lines = str(e).strip().splitlines()
            why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
            raise CheckpointError(f"{path / 'deepspeed'}: refused to unpickle it (only tensors, plain containers and "
                                  f"DeepSpeed's LossScaler/ZeroStageEnum are allowed): {why.strip()[:300]}") from None
        if load_path is None:
            raise CheckpointError(f"{path}: deepspeed could not load its checkpoint")
        if stateful:
            method.load_state_dict(torch.load(pfile, weights_only=True))
        set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=True))
        return state

    def load_latest(self, engine, method, log=print) -> tuple[Path, dict] | None:
        """Collective: load the newest checkpoint that verifies; report and skip the ones that do not.
        None if there is no checkpoint at all; CheckpointError if none is intact."""
        if self.rank == 0 and self.root.is_dir():
            for stale in self.root.glob(".tmp-step_*"):  # a save that never finished
                log(f"removing the unfinished checkpoint {stale}")
                shutil.rmtree(stale, ignore_errors=True)
        cands = self.candidates()
        bad = []
        for path in cands:
            problems = self.verify(path)
            if not problems:
                return path, self.load(path, engine, method)
            bad.append(f"{path.name}: {problems[0]}")
            log(f"checkpoint {path} is damaged, not loading it: " + "; ".join(problems[:3])
                + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
                + ("; trying the previous one" if path != cands[-1] else ""))
        if bad:
            raise CheckpointError(f"no intact checkpoint in {self.root}: " + " | ".join(bad))
        return None
