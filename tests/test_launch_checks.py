"""Pre-launch checks (ds_cl.tools.launch_checks) and the launchers' --dry-run / bad-input behaviour.

The launchers are run for real (bash); --dry-run stops them right before deepspeed starts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ds_cl.tools import launch_checks as lc
from ds_cl.training import ds_config as dsc
from ds_cl.training.config import ConfigError
from tests.dist_utils import REPO
from tests.slurm_cluster import write_tiny_run

LAUNCHERS = REPO / "launchers"
DS_CONFIGS = REPO / "ds_configs"


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("run"))


def sh(*cmd: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
    e.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", *map(str, cmd)], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The launch must fail with status 2 and one `ds-cl launch: error:` line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ds-cl launch: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- batch arithmetic (ds_cl/training/ds_config.py; tests/test_ds_config.py has the rest) ----------------


def test_batch_auto_filled_from_run_config():
    b = dsc.resolve_batch({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, world=16,
                          micro=1, total=64)
    assert (b.micro, b.accum, b.world, b.total) == (1, 4, 16, 64)
    assert str(b) == "train_batch_size 64 = micro 1 x grad_accum 4 x world 16"


def test_batch_not_fitting_world_shows_arithmetic():
    with pytest.raises(ConfigError, match=r"train_batch_size 8 does not fit world size 16: train.global_batch_size=8 "
                                          r"must be a multiple of train.micro_batch_size=1 x world size 16 = 16"):
        dsc.resolve_batch({}, world=16, micro=1, total=8)
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=2 x deepspeed.gradient_accumulation_steps=2 "
                                          r"x world size 4 = 16"):
        dsc.resolve_batch({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2,
                           "gradient_accumulation_steps": 2}, world=4)


def test_batch_numbers_in_both_configs_must_agree():
    with pytest.raises(ConfigError, match="deepspeed.train_micro_batch_size_per_gpu=4 disagrees with the run config, "
                                          "which gives 2"):
        dsc.resolve_batch({"train_micro_batch_size_per_gpu": 4}, world=2, micro=2, total=8)
    assert dsc.resolve_batch({"gradient_accumulation_steps": 2}, world=2, total=8).micro == 2


# -- ZeRO stage per method ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,world,ok", [(3, 16, True), (2, 16, True), (0, 1, True), (1, 1, False),
                                            (1, 16, False), (0, 2, False)])
def test_zero_stage_supported_by_projector(stage, world, ok):
    cfg = {"zero_optimization": {"stage": stage}}
    if ok:
        assert dsc.check_zero_stage(cfg, world, "osft") == stage
    else:
        with pytest.raises(ConfigError, match=f"ZeRO stage {stage}"):
            dsc.check_zero_stage(cfg, world, "osft")
    assert dsc.check_zero_stage(cfg, world, "seqft") == stage  # no projector: any stage


# -- hostfiles, allocations, ports ------------------------------------------------------------------------


def test_hostfile_parse_and_errors(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# nodes\nnode1 slots=8\n\nnode2 slots=8  # second\n")
    assert lc.parse_hostfile(hf) == [("node1", 8), ("node2", 8)]
    hf.write_text("node1 slots=8\nnode2 slots=8\nnode1 slots=8\n")
    with pytest.raises(lc.LaunchError, match=r"hostfile:3: duplicate host 'node1' \(first on line 1\)"):
        lc.parse_hostfile(hf)
    hf.write_text("node1 8\n")
    with pytest.raises(lc.LaunchError, match="expected 'hostname slots=N'"):
        lc.parse_hostfile(hf)
    with pytest.raises(lc.LaunchError, match="does not exist"):
        lc.parse_hostfile(tmp_path / "nope")


def test_nodes_and_port():
    with pytest.raises(lc.LaunchError, match="4 nodes requested but the allocation has 2: a, b"):
        lc.check_nodes(4, ["a", "b"])
    with pytest.raises(lc.LaunchError, match="duplicate host"):
        lc.write_hostfile(["a", "a"], 8, "/nonexistent/never-written")
    assert lc.port_from_job_id(123456) == 20000 + 3456
    assert lc.port_from_job_id("7") == 20007


# -- shipped DeepSpeed configs ----------------------------------------------------------------------------


def test_shipped_ds_configs_take_batch_and_stage_checks():
    names = sorted(p.name for p in DS_CONFIGS.glob("*.json"))
    assert names == ["zero2_bf16.json", "zero3_bf16.json", "zero3_offload_nvme.template.json",
                     "zero3_offload_optimizer.json"]
    for name in names:
        cfg = dsc.load_ds_config(DS_CONFIGS / name)
        # Paper recipe: effective batch 8 on 8 GPUs, micro 1 -> no accumulation.
        assert dsc.resolve_batch(cfg, world=8, micro=1, total=8).accum == 1
        assert dsc.check_zero_stage(cfg, 8, "osft", "bfloat16") in (2, 3)
        assert cfg["bf16"]["enabled"] and cfg["data_types"]["grad_accum_dtype"] == "fp32"
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert cfg[key] == "auto", (name, key)


# -- preflight through the run config and the shell launchers -----------------------------------------------


def test_preflight_reads_run_config(run_cfg):
    msg = lc.preflight(run_cfg, [], nodes=2, gpus_per_node=1)
    assert "world 2 = 2 node(s) x 1; train_batch_size 4 = micro 2 x grad_accum 1 x world 2; ZeRO 3" in msg
    with pytest.raises(lc.LaunchError, match="does not fit world size 4"):
        lc.preflight(run_cfg, ["train.global_batch_size=6"], nodes=2, gpus_per_node=2)
    with pytest.raises(lc.LaunchError, match="ZeRO stage 1 is not supported by method 'osft'"):
        lc.preflight(run_cfg, ["deepspeed.zero_optimization.stage=1"], nodes=1, gpus_per_node=2)


def test_check_runs_the_preflight_then_the_plan_in_one_process(run_cfg, capsys):
    """`launch_checks check`, what the launchers run: the preflight's line, then `ds-cl train --check`'s plan at the
    same world size, given as the launcher gives it; the plan is not run when the preflight fails."""
    assert lc.main(["check", "--world-size", "2", "--", str(run_cfg), "--resume-or-start"]) == 0
    out, err = capsys.readouterr()
    assert "preflight ok: world 2 = 1 node(s) x 2" in err
    assert "world size  2 (--world-size)" in out and out.rstrip().endswith("ds-cl train --check: ok")
    assert lc.main(["check", "--nodes", "2", "--gpus-per-node", "1", "--", str(run_cfg)]) == 0
    out, err = capsys.readouterr()
    assert "preflight ok: world 2 = 2 node(s) x 1" in err and "world size  2 (2 node(s) x 1 GPU(s) per node" in out
    assert lc.main(["check", "--world-size", "4", "--", str(run_cfg), "train.global_batch_size=6"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("ds-cl launch: error: ") and "does not fit world size 4" in err
    assert len(err.strip().splitlines()) == 1
    assert lc.main(["check", "--world-size", "2", "--nodes", "1", "--", str(run_cfg)]) == 2
    assert capsys.readouterr().err.strip() == ("ds-cl launch: error: give --world-size N or --nodes N --gpus-per-node G, "
                                               "not both")


def test_single_node_dry_run_prints_command(run_cfg):
    # --resume-or-start, not --resume: the launcher's `ds-cl train --check` refuses a --resume of an output_dir
    # that holds no run (as the job would), and this one holds none.
    p = sh(LAUNCHERS / "single_node.sh", "--dry-run", "--gpus", "2", run_cfg, "train.lr=2e-5", "--resume-or-start")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"[localhost] {sys.executable} -m deepspeed.launcher.runner --num_gpus 2 "
                                f"--master_port 29500 --no_local_rank --module ds_cl.cli train {run_cfg} "
                                f"train.lr=2e-5 --resume-or-start")
    assert "preflight ok" in p.stderr


def test_requeued_sbatch_job_passes_resume_or_start(run_cfg, tmp_path):
    """A requeued job (SLURM_RESTART_COUNT > 0) continues its run or, stopped before it wrote anything, starts
    it: --resume-or-start, as plain --resume refuses a folder without a run. Outside SLURM: the script's
    --dry-run in a faked 2-node allocation (the node list is parsed without scontrol). The other launchers
    pass the flag through."""
    alloc = dict(LOG_DIR=str(tmp_path / "logs"), SLURM_JOB_ID="31337", SLURM_JOB_NUM_NODES="2",
                 SLURM_JOB_NODELIST="node[1-2]", SLURM_GPUS_ON_NODE="2")
    for restarts, tail in (("0", ""), ("1", " --resume-or-start")):
        p = sh(LAUNCHERS / "slurm" / "llama2_7b.sbatch", "--dry-run", run_cfg, "train.global_batch_size=8",
               SLURM_RESTART_COUNT=restarts, **alloc)
        assert p.returncode == 0, p.stderr
        lines = [line for line in p.stdout.splitlines() if line.startswith("[node")]
        assert len(lines) == 2 and all(line.endswith(f"train {run_cfg} train.global_batch_size=8{tail}")
                                       for line in lines), lines
    p = sh(LAUNCHERS / "single_node.sh", "--dry-run", "--gpus", "2", run_cfg, "--resume-or-start")
    assert p.returncode == 0 and p.stdout.strip().endswith(f"train {run_cfg} --resume-or-start"), p.stderr


def test_multi_node_dry_run_prints_every_node(run_cfg, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    p = sh(LAUNCHERS / "multi_node.sh", "--no-ssh", "--dry-run", "--hostfile", hf, run_cfg, "train.global_batch_size=8")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["[gpu-a]", "[gpu-b]"]
    assert "--master_addr gpu-a" in lines[1] and "--no_ssh --node_rank 1" in lines[1]
    assert "train_batch_size 8 = micro 2 x grad_accum 1 x world 4" in p.stderr  # 2 nodes x 2 slots


def test_single_node_runs_on_the_gpus_cuda_visible_devices_gives(run_cfg):
    """A shared node: the job's GPUs are CUDA_VISIBLE_DEVICES's. deepspeed gets --include localhost:IDS (given
    --num_gpus its runner drops the variable and takes GPUs 0..N-1, another job's), and the runner does not
    see the variable (it would count only the visible GPUs and refuse index 3)."""
    gpu = {"CUDA_VISIBLE_DEVICES": "2,3", "DS_ACCELERATOR": "cuda"}
    for count in ([], ["--gpus", "2"]):
        p = sh(LAUNCHERS / "single_node.sh", "--dry-run", *count, run_cfg, **gpu)
        assert p.returncode == 0, p.stderr
        assert shlex.split(p.stdout) == ["[localhost]", "env", "-u", "CUDA_VISIBLE_DEVICES", sys.executable, "-m",
                                         "deepspeed.launcher.runner", "--include", "localhost:2,3", "--master_port",
                                         "29500", "--no_local_rank", "--module", "ds_cl.cli", "train", str(run_cfg)]
        assert "world 2 = 1 node(s) x 2" in p.stderr
    line = one_error_line(sh(LAUNCHERS / "single_node.sh", "--gpus", "4", run_cfg, **gpu))
    assert line.endswith("4 GPUs per node requested but CUDA_VISIBLE_DEVICES=2,3 gives 2: request 2 (or leave the "
                         "count out), or change CUDA_VISIBLE_DEVICES")
    line = one_error_line(sh(LAUNCHERS / "single_node.sh", run_cfg, **{**gpu, "CUDA_VISIBLE_DEVICES": "GPU-8f2c1e4a"}))
    assert "CUDA_VISIBLE_DEVICES=GPU-8f2c1e4a is not a list of GPU indices" in line
    # CPU ranks (DS_ACCELERATOR=cpu): the variable selects nothing.
    p = sh(LAUNCHERS / "single_node.sh", "--dry-run", "--gpus", "2", run_cfg, DS_ACCELERATOR="cpu",
           CUDA_VISIBLE_DEVICES="2,3")
    assert p.returncode == 0 and " --num_gpus 2 " in p.stdout and "--include" not in p.stdout, p.stderr


def test_multi_node_includes_the_visible_gpus_on_every_node(run_cfg, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=4\ngpu-b slots=4\n")
    gpu = {"CUDA_VISIBLE_DEVICES": "2,3", "DS_ACCELERATOR": "cuda"}
    p = sh(LAUNCHERS / "multi_node.sh", "--no-ssh", "--dry-run", "--hostfile", hf, run_cfg, "train.global_batch_size=8",
           **gpu)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and all(f"--hostfile {hf} --include gpu-a:2,3@gpu-b:2,3 --master_addr gpu-a"
                                   in " ".join(shlex.split(line)) and "--num_gpus" not in line for line in lines), lines
    assert "world 4 = 2 node(s) x 2" in p.stderr
    hf.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    line = one_error_line(sh(LAUNCHERS / "multi_node.sh", "--hostfile", hf, run_cfg, **gpu))
    assert f"hostfile {hf}: gpu-a has slots=2 but CUDA_VISIBLE_DEVICES=2,3 names GPU 3" in line


@pytest.mark.parametrize("case,expect", [
    ("missing_config", "run config /nonexistent/run.yaml does not exist"),
    ("more_nodes", "3 nodes requested but hostfile"),
    ("duplicate_host", "duplicate host 'gpu-a'"),
    ("batch_world", "train_batch_size 4 does not fit world size 8: train.global_batch_size=4 must be a multiple of "
                    "train.micro_batch_size=2 x world size 8 = 16"),
    ("zero1", "ZeRO stage 1 is not supported by method 'osft'"),
    ("unknown_key", "unknown key 'train.lrr'"),
])
def test_bad_input_fails_before_launch(case, expect, run_cfg, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=4\ngpu-b slots=4\n")
    multi = [LAUNCHERS / "multi_node.sh", "--no-ssh", "--node-rank", "0", "--hostfile", hf]
    args = {
        "missing_config": [LAUNCHERS / "single_node.sh", "--gpus", "2", "/nonexistent/run.yaml"],
        "more_nodes": [*multi, "--nodes", "3", run_cfg],
        "duplicate_host": [*multi, run_cfg],
        "batch_world": [*multi, run_cfg],
        "zero1": [LAUNCHERS / "single_node.sh", "--gpus", "2", run_cfg, "deepspeed.zero_optimization.stage=1"],
        "unknown_key": [LAUNCHERS / "single_node.sh", "--gpus", "2", run_cfg, "train.lrr=1"],
    }[case]
    if case == "duplicate_host":
        hf.write_text("gpu-a slots=4\ngpu-a slots=4\n")
    # Not a dry run: the launch itself must refuse (deepspeed would otherwise start and hang or crash).
    assert expect in one_error_line(sh(*args))


def test_cli_one_line_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ds_cl.tools.launch_checks", "hostfile", "--out", str(tmp_path / "h"),
                        "--slots", "8"], env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")},
                       capture_output=True, text=True)
    assert "not inside a SLURM allocation" in one_error_line(p)
    p = subprocess.run([sys.executable, "-m", "ds_cl.tools.launch_checks", "port", "--job-id", "4242"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "24242"
    bad = tmp_path / "ds.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON: line 1"):
        dsc.load_ds_config(bad)
    assert json.loads((DS_CONFIGS / "zero3_bf16.json").read_text())["zero_optimization"]["stage"] == 3


# -- example LLaMA-2-7B run configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name,ntasks", [("llama2_7b_cl_order1.yaml", 4), ("llama2_7b_trace.yaml", 8)])
def test_example_configs_validate_and_fit_8_gpus(name, ntasks, tmp_path):
    """The examples pass the run config schema once their data paths exist, and fit 1 node x 8 GPUs."""
    import yaml

    from ds_cl.training.config import load_config

    src = REPO / "launchers" / "examples" / name
    data = yaml.safe_load(src.read_text())
    for t in data["tasks"]:
        for k in ("train", "eval"):
            f = tmp_path / Path(t[k]).relative_to("/path/to")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text('{"input": "x", "output": "y"}\n')
            t[k] = str(f)
    data["deepspeed"] = str((src.parent / data["deepspeed"]).resolve())
    cfg = load_config(None, data=data)
    assert len(cfg.tasks) == ntasks and cfg.train.lr == 1e-5 and cfg.train.global_batch_size == 8
    assert cfg.model.dtype == "bfloat16" and cfg.train.epochs == 1 and cfg.method.name == "osft"
    batch, stage = dsc.check_ds_config(cfg, 8)
    assert str(batch) == "train_batch_size 8 = micro 1 x grad_accum 1 x world 8" and stage in (2, 3)
    with pytest.raises(ConfigError, match="does not fit world size 16"):
        dsc.check_ds_config(cfg, 16)
