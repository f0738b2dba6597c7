"""`python -m ds_cl.tools.ops build`: compile DeepSpeed's CPU ops once, ahead (`make test` runs it before
the suite; `make setup` and `make demo` compile nothing), and the stale-lock check `ds-cl train` runs
before DeepSpeed starts.

On CPU, DeepSpeed JIT-compiles its shared-memory all-reduce (`deepspeed_shm_comm`) the first time a
process group starts, and its CPU Adam (`cpu_adam`) the first time its optimizer runs under offload: each
takes one to two minutes on 2 cores, silently. ds-cl's own starts of a process group
(environment.init_distributed) skip the shm op, whose only user is tensor-parallel inference; it is
compiled only where something else starts DeepSpeed's comm (accelerate or the HF Trainer on their own,
without ds-cl's start). ds-cl's trainer uses torch's AdamW on CPU, so `ds-cl train` builds `cpu_adam`
only when its DeepSpeed config asks for it (ds_config.builds_cpu_adam: optimizer offload on a GPU, or
a DeepSpeed `optimizer` section under offload), and then says so first (`announce_first_build`); the
tests build it (the projector's tests on DeepSpeed's CPU Adam).

torch's extension loader guards a build with a `lock` file in the op's build folder and waits, forever
and without a message, while that file exists; a run killed during the compile leaves it behind, and
every later run then hangs. `stale_locks` finds such files (no compiler running), and `ds-cl train`
removes them with a message instead of hanging.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SHM_OP, CPU_ADAM = "deepspeed_shm_comm", "cpu_adam"  # DeepSpeed's op names (its builders' NAME)
OPS = (SHM_OP, CPU_ADAM)


def build_root() -> Path:
    """The folder this torch builds JIT extensions in (torch.utils.cpp_extension._get_build_directory's
    rule, without its side effect of creating the op's folder): $TORCH_EXTENSIONS_DIR, else the default
    root's py<ver>_<cpu|cu...|rocm...> folder."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if torch.version.hip is not None:
        acc = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        acc = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}"


def use_interpreter_ninja() -> None:
    """Build with the ninja installed next to this Python (pip's, a deepspeed requirement), whatever PATH
    finds first. torch's loader runs `ninja` from PATH, and a system ninja of another version reads the
    other's build log as too old and rebuilds the op from scratch: with the venv activated for one run and
    not for the next, every run paid the compile again."""
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")):
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != bindir:
            os.environ["PATH"] = bindir + (os.pathsep + path if path else "")


def _compiler_running() -> bool:
    """Any live ninja / compiler process on this machine (it may be building into the folder)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("ninja", "cc1plus", "c++", "g++", "gcc", "ld"):
            return True
    return False


def stale_locks(min_age_s: float = 30.0, compiler_running=_compiler_running) -> list[Path]:
    """Lock files of DeepSpeed op builds that no build is using: older than `min_age_s`, with no compiler
    running (a build in progress keeps one running throughout). `compiler_running`: the check of this
    machine's processes (its own test must not depend on what else the machine is compiling)."""
    root, now = build_root(), time.time()
    locks = []
    for op in OPS:
        try:
            age = now - (root / op / "lock").stat().st_mtime
        except FileNotFoundError:
            # No lock, or one released just now: torch's loader holds it for a moment every time a process
            # loads the op (to check the build is current), so another process's start races with this.
            continue
        if age > min_age_s:
            locks.append(root / op / "lock")
    if locks and compiler_running():
        return []
    return locks


def clear_stale_locks(log=print, compiler_running=_compiler_running) -> list[Path]:
    """Remove stale build locks (see `stale_locks`), saying so; the op is then rebuilt from scratch."""
    removed = []
    for lock in stale_locks(compiler_running=compiler_running):
        try:
            lock.unlink(missing_ok=True)  # another rank of this machine may have removed it first
        except OSError as e:
            raise RuntimeError(f"{lock}: a stale lock of an interrupted DeepSpeed op build that cannot be removed "
                               f"({e}); delete it by hand, or every run hangs waiting for it") from None
        log(f"removed {lock}: left by a DeepSpeed op build that was interrupted (the op is rebuilt now, "
            f"~1-2 min on 2 cores)")
        removed.append(lock)
    return removed


def announce_first_build(op: str, log=print) -> None:
    """Say so when DeepSpeed is about to compile `op` (not built yet): otherwise a first run is silent for
    one to two minutes. The caller knows the run will build it (`ds-cl train`: cpu_adam, when
    ds_config.builds_cpu_adam)."""
    if not list((build_root() / op).glob("*.so")):
        log(f"building DeepSpeed's {op} op before the first step (once per machine, ~1-2 min on 2 cores; "
            f"`python -m ds_cl.tools.ops build` does it ahead)")


def build(ops=OPS) -> None:
    """Compile the CPU ops now (each prints a line; a no-op when already built)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    use_interpreter_ninja()
    clear_stale_locks()
    builders = {SHM_OP: ShareMemCommBuilder, CPU_ADAM: CPUAdamBuilder}
    for op in ops:
        t = time.time()
        print(f"ds-cl: building DeepSpeed's {op} op (once; ~1-2 min on 2 cores) ...", flush=True)
        builders[op]().load(verbose=False)
        print(f"ds-cl: {op} ready ({time.time() - t:.0f}s)", flush=True)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m ds_cl.tools.ops build", file=sys.stderr)
        return 2
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
