"""Reliability on 2 real ZeRO-3 CPU ranks (docs/reliability.md): kill -9 of one rank at a task boundary
and mid-save, a damaged checkpoint, SIGTERM preemption, a failing disk, NaN steps. Every interrupted
sequence, resumed, must end with the weights, accuracy matrix and losses of one uninterrupted run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_cl.training.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from tests.dist_utils import REPO, cpu_env, free_port
from tests.fixtures import train_sentencepiece
from tests.reliability_utils import explain, launch_cmd, run, tiny_config

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    train_sentencepiece(d / "tok.model")
    return d


@pytest.fixture(scope="module")
def reference(tmp):
    out = tmp / "reference"
    p = run(tiny_config(tmp, out))
    assert p.returncode == 0, explain(p)
    return out


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def assert_same_run(ref: Path, out: Path) -> None:
    a, b = (load_file(d / "task_1_b" / "model.safetensors") for d in (ref, out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "cl_matrix.json").read_text()) for d in (ref, out))
    assert ra["matrix"] == rb["matrix"] and len(ra["matrix"]) == 2
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(ref) == losses(out)
    # osft's protected.jsonl: a line per fit/extend, none repeated by a resume that redid a boundary.
    protected = lambda d: [json.loads(l) for l in (d / "protected.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["event"]) for r in protected(ref)] == [(0, "fit"), (1, "extend")]
    assert protected(ref) == protected(out)


def test_kill_at_boundary_and_mid_save_then_damaged_checkpoint_resume_equals_uninterrupted(tmp, reference):
    out = tmp / "killed"
    cfg = tiny_config(tmp, out)
    # 1. kill -9 of rank 1 at the task boundary: after task b's subspace fit, before its first step.
    p = run(cfg, fault="kill@fit:phase=1,rank=1")
    assert p.returncode != 0 and "kill -9 of rank 1 at fit" in p.stdout, explain(p)
    assert latest(out) == "step_00000003" and not (out / "summary.json").read_text().count('"complete": true')
    # 2. resume; kill -9 of rank 1 in the middle of writing checkpoint 5 (its shards are on disk).
    p = run(cfg, "--resume", fault="kill@save:step=5,rank=1")
    assert p.returncode != 0 and "at save" in p.stdout, explain(p)
    ck = out / "checkpoints"
    # Rank 0 sees its peer gone inside the save, removes the partial .tmp-step_00000005 and says what is safe.
    assert latest(out) == "step_00000004" and not (ck / "step_00000005").exists()
    assert f"the previous checkpoint {ck / 'step_00000004'} is intact" in p.stderr, explain(p)
    # 3. damage the newest complete checkpoint: truncate rank 0's optimizer shard.
    shard = ck / "step_00000004" / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    problems = verify_checkpoint(ck / "step_00000004")
    assert problems == [f"{shard}: {size // 2} bytes, the manifest says {size} (truncated or changed)"]
    # A missing projector state is named too (on a copy: the original stays the fallback).
    copy = tmp / "copy_step3"
    shutil.copytree(ck / "step_00000003", copy)
    (copy / "method_rank1.pt").unlink()
    assert verify_checkpoint(copy) == [f"{copy / 'method_rank1.pt'}: missing"]
    # 4. --resume skips the damaged step 4 (naming the file), loads step 3, and finishes the sequence.
    p = run(cfg, "--resume")
    assert p.returncode == 0, explain(p)
    assert f"checkpoint {ck / 'step_00000004'} is damaged" in p.stdout and str(shard) in p.stdout
    assert "resumed from" in p.stdout and "step_00000003" in p.stdout
    assert not list(ck.glob(".tmp-*"))
    assert_same_run(reference, out)


def signal_after_first_step(cmd: list[str], out: Path, sig: int, env: dict) -> tuple[int, str]:
    """Start `cmd` in its own process group, send `sig` to the whole group (as a terminal or SLURM does) once
    the first optimizer step is logged, and return (exit status, output). The limits are for a hang, wide enough
    for a start slowed by the other test worker's ranks on the same cores."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics, t0 = out / "metrics.jsonl", time.time()
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() - t0 < 480, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout


def test_sigterm_checkpoints_then_requeue_resumes(tmp, reference):
    out = tmp / "preempted"
    cfg = tiny_config(tmp, out, checkpoint={"every_steps": 0})  # checkpoints only at task ends...
    # As SLURM does: SIGTERM to every process of the job step (the launcher forwards one more).
    rc, stdout = signal_after_first_step(launch_cmd(cfg), out, signal.SIGTERM, cpu_env())
    assert rc != 0, stdout
    assert "SIGTERM: checkpointing after the current step" in stdout and "preempted: checkpoint" in stdout, stdout
    state = json.loads((out / "checkpoints" / latest(out) / "trainer_state.json").read_text())
    # ...so a checkpoint inside task a can only be the preemption's (unless the signal came as task a ended).
    assert (state["phase"], state["step_in_phase"]) in ((0, 1), (0, 2), (1, 0)) and not state["done"], state
    p = run(cfg, "--resume")  # the requeued job
    assert p.returncode == 0, explain(p)
    assert_same_run(reference, out)


def test_ctrl_c_checkpoints_without_a_traceback_then_resumes(tmp, reference):
    """Ctrl-C in the terminal: SIGINT to the launcher and every rank. The first one checkpoints at the
    next step boundary (as SIGTERM does) instead of ~50 lines of KeyboardInterrupt traceback."""
    out = tmp / "ctrl_c"
    cfg = tiny_config(tmp, out, checkpoint={"every_steps": 0})
    cmd = ["bash", str(REPO / "launchers" / "single_node.sh"), "--gpus", "2", "--port", str(free_port()), str(cfg)]
    _, stdout = signal_after_first_step(cmd, out, signal.SIGINT, cpu_env(PYTHON=sys.executable))
    assert "SIGINT: checkpointing after the current step" in stdout and "preempted: checkpoint" in stdout, stdout
    assert "Traceback" not in stdout and "KeyboardInterrupt" not in stdout, stdout
    state = json.loads((out / "checkpoints" / latest(out) / "trainer_state.json").read_text())
    assert not state["done"], state
    p = run(cfg, "--resume")
    assert p.returncode == 0, explain(p)
    assert_same_run(reference, out)


def test_ctrl_c_exit_status_of_a_single_process_run(tmp):
    """Without a launcher the process's own status is the user's: 130 (128 + SIGINT), after the checkpoint."""
    out = tmp / "ctrl_c_one"
    cfg = tiny_config(tmp, out, steps=40, checkpoint={"every_steps": 0})
    rc, stdout = signal_after_first_step([sys.executable, "-m", "ds_cl.cli", "train", str(cfg)], out, signal.SIGINT,
                                         cpu_env())
    assert rc == 130, stdout
    assert "preempted: checkpoint" in stdout and "Traceback" not in stdout, stdout
    assert (out / "checkpoints" / latest(out) / "trainer_state.json").is_file()


class _RunsACommand:
    """What a crafted pickle does: torch.load(weights_only=False) calls os.system while unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_crafted_shard(tmp, reference):
    """A checkpoint folder from someone else: DeepSpeed's optimizer shard replaced by a pickle that runs a
    command, the manifest rewritten to match it. --resume must refuse it in one line without running it."""
    from ds_cl.training.checkpoint import MANIFEST, file_digest

    out = tmp / "crafted"
    cfg = tiny_config(tmp, out)
    p = run(cfg, "checkpoint.stop_after_steps=2")
    assert p.returncode == 0, explain(p)
    ckpt = out / "checkpoints" / latest(out)
    marker = tmp / "crafted_ran"
    for shard in (ckpt / "deepspeed" / "state").glob("*optim_states.pt"):
        state = torch.load(shard, weights_only=False)  # our own file, to keep its shape
        state["optimizer_state_dict"]["payload"] = _RunsACommand(marker)
        torch.save(state, shard)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name in manifest["files"]:
        f = ckpt / name
        manifest["files"][name] = {"size": f.stat().st_size, "sha256": file_digest(f)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    p = run(cfg, "--resume")
    assert p.returncode != 0 and not marker.exists(), explain(p)
    assert "refused to unpickle" in p.stderr and "posix.system" in p.stderr, explain(p)
    assert "Traceback" not in p.stderr, explain(p)


def test_write_failure_while_saving_keeps_previous_checkpoint(tmp, reference):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) hits the
    optimizer shards mid-save: the error says so, the partial save is removed, the last checkpoint
    still verifies and a later --resume works from it."""
    out = tmp / "diskfull"
    cfg = tiny_config(tmp, out)
    out.mkdir()
    shutil.copytree(reference / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000004\n")
    biggest = max(f.stat().st_size for f in (out / "checkpoints").rglob("*.pt"))
    limit = biggest // 2

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # The cap is for the checkpoint's writes. No DeepSpeed op is compiled under it (a compiler's object files
    # exceed it: "File size limit exceeded signal terminated program cc1plus"): ds-cl's start of the process
    # group skips the shared-memory all-reduce op, and this run's optimizer is torch's AdamW.
    p = run(cfg, "--resume", preexec_fn=cap)
    assert p.returncode == 1, explain(p)
    err = [l for l in p.stderr.splitlines() if l.startswith("ds-cl train: rank")]
    assert err and all("writing checkpoint step_00000005 failed" in l and
                       f"the previous checkpoint {out / 'checkpoints' / 'step_00000004'} is intact" in l
                       for l in err), p.stderr
    assert latest(out) == "step_00000004" and verify_checkpoint(out / "checkpoints" / "step_00000004") == []
    assert not (out / "checkpoints" / "step_00000005").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted by the test's finalizer."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"cannot mount a tmpfs here ({p.stderr.strip()}): skipped")
        pytest.skip(f"needs root and mount: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_to_start_a_save_and_keeps_previous(small_fs, reference):
    ck = small_fs / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step_00000004", ck / "step_00000004")
    (ck / "latest").write_text("step_00000004\n")
    free = shutil.disk_usage(small_fs).free
    (small_fs / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # a real, nearly full filesystem
    mgr = CheckpointManager(ck, rank=0, world=1)
    with pytest.raises(CheckpointError, match=r"not enough space in .* for checkpoint step_00000005: \d+ bytes free.*"
                                              r"nothing was written and the previous checkpoint .*step_00000004 is intact"):
        mgr.save(engine=None, method=None, state={}, global_step=5)
    assert verify_checkpoint(ck / "step_00000004") == [] and not list(ck.glob(".tmp-*"))


def test_full_disk_during_export_is_one_line_and_keeps_the_earlier_export(small_fs):
    """A task's model export that meets a full disk (safetensors raises its own SafetensorError, not an
    OSError) becomes the OSError the trainer prints in one line, naming the folder and the free space; the
    partial folder is removed and the export already there is untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_cl.training.export import export_hf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    out = small_fs / "task_0_a"
    export_hf(model, out, dtype="float32")  # ~0.6 MB: fits
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    free = shutil.disk_usage(small_fs).free
    (small_fs / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # a real, nearly full filesystem
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # a later task's weights, to the same folder
    with pytest.raises(OSError, match=r"exporting the model to .*task_0_a failed: .* \(\d+ bytes free\); removed "
                                      r"the partial folder, and the run's checkpoints are kept"):
        export_hf(model, out, dtype="float32")
    assert not (small_fs / "task_0_a.tmp").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_nan_step_skip_and_stop(tmp):
    # skip: step 2's loss is NaN; DeepSpeed drops its update, the run goes on.
    out = tmp / "nan_skip"
    cfg = tiny_config(tmp, out, train={"on_nonfinite": "skip"}, checkpoint={"every_steps": 1, "stop_after_steps": 3})
    p = run(cfg, fault="nan@loss:step=2")
    assert p.returncode == 0, explain(p)
    assert "non-finite loss (loss=nan, grad_norm=inf) at step 2 (task 0 'a', task step 2): step skipped" in p.stdout
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in recs] == [False, True, False]
    # The weights (fp32 master partitions) of step 2 are those of step 1: nothing was applied.
    ck = out / "checkpoints"
    for r in (0, 1):
        f = f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        s1, s2, s3 = (torch.load(ck / f"step_0000000{i}" / f, weights_only=False)["optimizer_state_dict"]
                      ["fp32_flat_groups"] for i in (1, 2, 3))
        assert all(torch.equal(a, b) for a, b in zip(s1, s2)) and not all(torch.equal(a, b) for a, b in zip(s2, s3))
    # stop (the default): exit 3, one line naming step and task, no checkpoint after it.
    out = tmp / "nan_stop"
    p = run(tiny_config(tmp, out), fault="nan@loss:step=2")
    assert p.returncode == 3, explain(p)
    assert ("non-finite loss (loss=nan, grad_norm=inf) at step 2 (task 0 'a', task step 2): stopped "
            "(train.on_nonfinite=stop)") in p.stderr, explain(p)
    assert latest(out) == "step_00000001"
