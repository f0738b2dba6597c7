"""ds_cl.tools.ops: a build lock left by a killed first run is found and removed (else every later run hangs
in torch's extension loader, silently); a lock of a build in progress is left alone."""

import os
import time

from ds_cl.tools import ops


def test_stale_build_lock_is_removed_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.build_root() == tmp_path
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert ops.stale_locks() == []  # just created: a build may be starting
    old = time.time() - 600
    os.utime(lock, (old, old))
    assert ops.stale_locks() == [lock]
    said = []
    assert ops.clear_stale_locks(log=said.append) == [lock]
    assert not lock.exists() and "interrupted" in said[0] and str(lock) in said[0]


def test_first_build_is_announced_only_when_the_op_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    ops.announce_first_build(log=said.append)
    assert len(said) == 1 and "once per machine" in said[0]
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    ops.announce_first_build(log=said.append)
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
