"""A rank's end: once the run is over, a native thread still inside a call at exit must not abort it.

After `dist.destroy_process_group()` the gloo groups' threads still run (ZeRO-3 objects hold the groups,
see `ds_cl.training.environment.end_process`). A native thread that takes the GIL back while Python finalizes is
ended by `pthread_exit`, whose unwind meets a noexcept destructor: "terminate called without an active
exception", SIGABRT, after the run had printed its results (a 20-task soak rank did, once). The probe here
is such a thread made on purpose: a daemon thread looping over a torch op, which releases the GIL inside
and takes it back on return."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, cpu_env, free_port

SPINNER = """
import threading
import torch

def spin():
    a = torch.randn(600, 600)
    while True:
        torch.mm(a, a)  # GIL released inside; taken back when the op returns

def start_spinner():
    torch.set_num_threads(1)
    threading.Thread(target=spin, daemon=True).start()
"""

PROBE = SPINNER + """
import atexit, sys, time
from ds_cl.training.environment import end_process

start_spinner()
atexit.register(print, "atexit handler ran")
print("unflushed line")
time.sleep(1.0)  # the spinner is inside torch.mm by now (its thread started even on busy cores)
{end}
"""


def run_probe(end: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(end=end)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)


def test_end_process_exits_cleanly_with_a_native_thread_mid_call():
    p = run_probe("end_process(0)")
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "terminate called" not in p.stderr
    # What a normal exit does first is done: atexit handlers run, buffered output reaches the pipe.
    assert "unflushed line" in p.stdout and "atexit handler ran" in p.stdout, p.stdout
    # The same process ended by a normal exit aborts: the probe does reproduce the failure.
    control = run_probe("sys.exit(0)")
    assert control.returncode == -6 and "terminate called without an active exception" in control.stderr, (
        control.returncode, control.stderr[-2000:])


def spinner_env(tmp_path) -> dict:
    """cpu_env() with a sitecustomize that makes every rank start the spinner from its last atexit handler.

    Only in the ranks (the launcher sets LOCAL_RANK for its children, not for itself); registered at
    start-up, so it runs last of the atexit handlers."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif 'LOCAL_RANK' in os.environ:\n    import atexit\n"
        + "".join(f"    {line}\n" for line in SPINNER.strip().splitlines())
        + "    atexit.register(start_spinner)\n")
    env = cpu_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


@pytest.mark.distributed
def test_ranks_end_cleanly_with_a_native_thread_mid_call_at_exit(tmp_path):
    """A short 2-rank `ds-cl train` whose ranks start the spinner from their last atexit handler, so a
    native thread is inside a call whenever the interpreter would finalize: every rank exits 0, nothing
    aborts. Before end_process (a plain return to sys.exit) both ranks aborted here, every time."""
    from tests.fixtures import train_sentencepiece
    from tests.reliability_utils import launch_cmd, tiny_config

    train_sentencepiece(tmp_path / "tok.model")
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, out, steps=1, checkpoint={"every_steps": 0, "keep": 1},
                      output={"plots": False, "export_each_task": False}, eval={"batch_size": 8, "max_new_tokens": 2})
    p = subprocess.run(launch_cmd(cfg), cwd=REPO, env=spinner_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "terminate called" not in log, log[-4000:]
    assert "outputs in" in p.stdout and (out / "summary.json").is_file()


@pytest.mark.distributed
def test_own_loop_example_ends_cleanly_with_a_native_thread_mid_call_at_exit(tmp_path):
    """examples/own_loop.py, the loop users copy, ends its ranks with `end_distributed`: with the spinner
    inside a call at exit both ranks still exit 0. It ended with a barrier and a plain exit before, and
    aborted in CI once ("terminate called without an active exception", exit -6) after printing its
    results."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), str(REPO / "examples" / "own_loop.py"), "--out", str(tmp_path / "out"), "--steps", "1"]
    p = subprocess.run(cmd, cwd=REPO, env=spinner_env(tmp_path), capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "terminate called" not in log, log[-4000:]
    assert (tmp_path / "out" / "weights.pt").is_file()
