"""ds_cl.tools.ops: a build lock left by a killed first run is found and removed (else every later run hangs
in torch's extension loader, silently); a lock of a build in progress is left alone. And ds-cl's start of a
process group compiles and starts no DeepSpeed shared-memory all-reduce op."""

import os
import time

from ds_cl.tools import ops


def test_stale_build_lock_is_removed_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.build_root() == tmp_path
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    idle, compiling = (lambda: False), (lambda: True)  # what else this machine compiles is not the test's
    assert ops.stale_locks(compiler_running=idle) == []  # just created: a build may be starting
    old = time.time() - 600
    os.utime(lock, (old, old))
    assert ops.stale_locks(compiler_running=compiling) == []  # old, but a compiler may be writing it
    assert ops.stale_locks(compiler_running=idle) == [lock]
    said = []
    assert ops.clear_stale_locks(log=said.append, compiler_running=idle) == [lock]
    assert not lock.exists() and "interrupted" in said[0] and str(lock) in said[0]


def test_a_lock_released_while_it_is_looked_at_does_not_stop_the_run(tmp_path, monkeypatch):
    """torch's loader takes the lock for a moment whenever a process loads the op: another process's check
    could see the file, then find it gone when it read its age, and died with FileNotFoundError."""
    from pathlib import Path

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 600
    os.utime(lock, (old, old))
    stat, reads = Path.stat, []

    def released_after_the_first_look(self, *a, **k):
        if self == lock:
            reads.append(1)
            if len(reads) > 1:  # the other process released it between two reads of the file
                lock.unlink(missing_ok=True)
        return stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", released_after_the_first_look)
    said = []
    ops.clear_stale_locks(log=said.append, compiler_running=lambda: False)  # no FileNotFoundError
    assert not lock.exists()


def test_first_build_is_announced_only_when_the_op_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    ops.announce_first_build("cpu_adam", log=said.append)
    assert len(said) == 1 and "once per machine" in said[0] and "cpu_adam" in said[0]
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").touch()
    ops.announce_first_build("cpu_adam", log=said.append)
    assert len(said) == 1


def test_ops_build_with_the_interpreters_ninja(monkeypatch):
    import sys

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    ops.use_interpreter_ninja()
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")):  # pip's ninja (a deepspeed requirement) is in the venv
        assert os.environ["PATH"].split(os.pathsep)[0] == bindir
        ops.use_interpreter_ninja()  # once only
        assert os.environ["PATH"].count(bindir) == 1
    else:
        assert os.environ["PATH"] == "/usr/bin:/bin"


def test_a_process_group_start_builds_and_starts_no_shm_op(tmp_path):
    """`ds-cl train`, `ds-cl eval`, `ds-cl bench` and the tests' ranks start DeepSpeed through
    environment.init_distributed. On CPU DeepSpeed 0.19.8 would JIT-compile its shared-memory all-reduce
    (`deepspeed_shm_comm`, ~1-2 min on 2 cores: again whenever another ninja built it, and inside a
    file-size-capped process it failed) and start it (a ~66 MB /dev/shm segment per rank), in every
    process group, for `inference_all_reduce` alone, which ds-cl never calls. From an empty extensions
    folder, with the system's ninja first on PATH and all ranks local (LOCAL_SIZE, as DeepSpeed's launcher
    sets it: the op then creates its segment), a start builds nothing, maps no segment and leaves DeepSpeed's
    comm backend without the op."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.dist_utils import REPO, cpu_env, free_port

    ext = tmp_path / "ext"
    ext.mkdir()
    port = str(free_port())
    start = ("from ds_cl.training.environment import init_distributed; init_distributed('gloo'); "
             "import deepspeed.comm as c; c.barrier(); "
             "print('shm op', c.comm.cdb.shm_comm_op); "
             "print('mapped', sum('deepspeed_allreduce_buffer' in l for l in open('/proc/self/maps')))")
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(ext))
    env.update(PATH="/usr/bin:/bin:" + env["PATH"], WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    p = subprocess.run([sys.executable, "-c", start], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "shm op None" in p.stdout, p.stdout + p.stderr
    assert "mapped 0" in p.stdout, p.stdout  # unlinked by release_cpu_shm, a segment stays mapped
    assert not (ext / "deepspeed_shm_comm").exists(), sorted(ext.rglob("*"))
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
