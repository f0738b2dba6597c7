"""The DeepSpeed-config rules (ds_cl/training/ds_config.py) and the rank/world/SLURM rules
(ds_cl/training/environment.py) that `ds-cl train`, its preflight and the launch checks share."""

from __future__ import annotations

import os
import stat

import pytest

from ds_cl.training import ds_config as dsc
from ds_cl.training import environment as env
from ds_cl.training.config import ConfigError, RunConfig, TaskConfig, TrainConfig


def run_cfg(method="osft", dtype="bfloat16", ds=None, **train) -> RunConfig:
    c = RunConfig(output_dir="x", tasks=[TaskConfig(name="a", train="a")])
    c.train = TrainConfig(**train)
    c.model.dtype = dtype
    c.method.name = method
    c.deepspeed = {"zero_optimization": {"stage": 3}} if ds is None else ds
    return c


# -- batch arithmetic: train_batch_size = micro x grad_accum x world -------------------------------------


def test_batch_from_run_config_fills_auto():
    b = dsc.resolve_batch({"train_batch_size": "auto"}, world=4, micro=2, total=16)
    assert (b.micro, b.accum, b.world, b.total) == (2, 2, 4, 16)
    assert str(b) == "train_batch_size 16 = micro 2 x grad_accum 2 x world 4"
    # DeepSpeed's numbers fill what the run config leaves open; two settle the third.
    assert dsc.resolve_batch({"train_batch_size": 24, "gradient_accumulation_steps": 3}, world=4) == dsc.Batch(2, 3, 4)
    assert dsc.resolve_batch({"train_batch_size": 8}, world=4) == dsc.Batch(1, 2, 4)
    assert dsc.resolve_batch({}, world=4) == dsc.Batch(1, 1, 4)


def test_batch_messages_name_the_keys_and_show_the_arithmetic():
    with pytest.raises(ConfigError) as e:
        dsc.resolve_batch({}, world=3, micro=2, total=8)
    assert str(e.value) == ("train_batch_size 8 does not fit world size 3: train.global_batch_size=8 must be a multiple "
                            "of train.micro_batch_size=2 x world size 3 = 6 (gradient accumulation = 8/6 = 1.33 is not "
                            "an integer)")
    with pytest.raises(ConfigError) as e:
        dsc.resolve_batch({"train_batch_size": 10, "gradient_accumulation_steps": 2}, world=4)
    assert str(e.value) == ("train_batch_size 10 does not fit world size 4: deepspeed.train_batch_size=10 must be a "
                            "multiple of deepspeed.gradient_accumulation_steps=2 x world size 4 = 8 (micro batch = 10/8 "
                            "= 1.25 is not an integer)")
    with pytest.raises(ConfigError) as e:
        dsc.resolve_batch({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2,
                           "gradient_accumulation_steps": 2}, world=4)
    assert str(e.value) == ("train_batch_size 12 does not fit world size 4: deepspeed.train_batch_size=12 but "
                            "deepspeed.train_micro_batch_size_per_gpu=2 x deepspeed.gradient_accumulation_steps=2 x "
                            "world size 4 = 16; change the batch settings or the number of processes")
    with pytest.raises(ConfigError) as e:
        dsc.resolve_batch({"gradient_accumulation_steps": 2}, world=2, micro=1, total=8)
    assert str(e.value) == ("deepspeed.gradient_accumulation_steps=2 disagrees with the run config, which gives 4 "
                            "(train.global_batch_size 8 = micro 1 x world 2 x accumulation 4); remove it from the "
                            "deepspeed config or set it to \"auto\"")
    for bad in (0, -1, "8", 2.0, True):
        with pytest.raises(ConfigError, match=r'deepspeed.train_batch_size must be a positive integer or "auto"'):
            dsc.resolve_batch({"train_batch_size": bad}, world=1)
    with pytest.raises(ConfigError, match="world size must be a positive integer, got 0"):
        dsc.resolve_batch({}, world=0)


def test_build_ds_config_fills_batch_precision_optimizer():
    ds = dsc.build_ds_config(run_cfg(micro_batch_size=2, global_batch_size=16), world=4, on_cpu=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 16)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # osft under bf16 (ds_cl.core.projector.prepare_ds_config)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"] == {"stage": 3} and ds["steps_per_print"] == 10 ** 9
    # seqft keeps bf16 accumulation; no zero section -> stage 3; the run config's dict is not changed.
    c = run_cfg("seqft", ds={}, global_batch_size=8)
    ds = dsc.build_ds_config(c, world=1, on_cpu=False)
    assert "data_types" not in ds and ds["zero_optimization"] == {"stage": 3} and c.deepspeed == {}
    with pytest.raises(ConfigError, match=r"deepspeed.gradient_clipping=0.5 disagrees with the run config, which gives "
                                          r"1.0 \(train.grad_clip\)"):
        dsc.build_ds_config(run_cfg(ds={"gradient_clipping": 0.5}), world=1, on_cpu=True)


def test_optimizer_needs_no_compiler_on_any_accelerator():
    """torch's AdamW on CPU and GPU alike: DeepSpeed's default there, FusedAdam, is JIT-compiled with nvcc
    in deepspeed.initialize, which fails on a machine with torch's CUDA wheels and no CUDA toolkit."""
    for on_cpu in (False, True):
        params = dsc.build_ds_config(run_cfg("seqft", ds={}), world=1, on_cpu=on_cpu)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["adam_w_mode"] is True, on_cpu
    # Optimizer offload on a GPU: DeepSpeed's CPU Adam (host C++ compiler only), as the offload configs say.
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert "torch_adam" not in dsc.build_ds_config(run_cfg(ds=offload), world=1, on_cpu=False)["optimizer"]["params"]
    assert dsc.build_ds_config(run_cfg(ds=offload), world=1, on_cpu=True)["optimizer"]["params"]["torch_adam"]
    # An optimizer the DeepSpeed config names is its own (FusedAdam on purpose: docs/training.md).
    named = {"type": "AdamW", "params": {"lr": 1e-5}}
    assert dsc.build_ds_config(run_cfg(ds={"optimizer": named}), world=1, on_cpu=False)["optimizer"] == named


def test_cpu_adam_is_built_only_where_deepspeed_runs_it():
    """`ds-cl train` announces DeepSpeed's CPU Adam compile (~1-2 min, silent otherwise) when the run will build
    it: under optimizer offload, on a GPU, or on CPU with the config's own optimizer section (on CPU without
    one, build_ds_config gives torch's AdamW); never without offload."""
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    named = {**offload, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    assert dsc.builds_cpu_adam(offload, on_cpu=True) is False
    assert dsc.builds_cpu_adam(offload, on_cpu=False) is True
    assert dsc.builds_cpu_adam(named, on_cpu=True) is True
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    assert dsc.builds_cpu_adam(nvme, on_cpu=False) is True
    for plain in ({}, {"zero_optimization": {"stage": 3}}, {"optimizer": named["optimizer"]},
                  {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}):
        for on_cpu in (True, False):
            assert dsc.builds_cpu_adam(plain, on_cpu=on_cpu) is False, (plain, on_cpu)


# -- precision and ZeRO stage ----------------------------------------------------------------------------


def test_precision_rules():
    with pytest.raises(ConfigError, match="^deepspeed.bf16.enabled is true but model.dtype=float32$"):
        dsc.check_precision({"bf16": {"enabled": True}}, "float32")
    with pytest.raises(ConfigError, match="^deepspeed.fp16.enabled is true but model.dtype=bfloat16$"):
        dsc.check_precision({"fp16": {"enabled": True}}, "bfloat16")
    dsc.check_precision({"fp16": {"enabled": True}}, "float16", "seqft")
    with pytest.raises(ConfigError, match="model.dtype=float16 is not supported by method 'osft'"):
        dsc.check_precision({}, "float16", "osft")
    ds = dsc.build_ds_config(run_cfg(dtype="float32", ds={"zero_optimization": {"stage": 3}}), world=1, on_cpu=True)
    assert "bf16" not in ds and "data_types" not in ds  # fp32: nothing to round


def test_zero_stage_rules():
    with pytest.raises(ConfigError, match=r"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got 4"):
        dsc.zero_stage({"zero_optimization": {"stage": 4}})
    assert dsc.zero_stage({}) == 0 and dsc.zero_stage({"zero_optimization": {}}) == 0  # DeepSpeed's default
    off = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="ZeRO stage 2 with optimizer offload is not supported by method 'osft'"):
        dsc.check_zero_stage(off, 8, "osft")
    assert dsc.check_zero_stage(off, 8, "seqft") == 2
    with pytest.raises(ConfigError, match="ZeRO stage 0 with method 'osft' needs model.dtype=float32"):
        dsc.check_zero_stage({"zero_optimization": {"stage": 0}}, 1, "osft", "bfloat16")


def test_check_ds_config_is_what_preflight_and_launch_run():
    batch, stage = dsc.check_ds_config(run_cfg(micro_batch_size=1, global_batch_size=8), 8)
    assert (str(batch), stage) == ("train_batch_size 8 = micro 1 x grad_accum 1 x world 8", 3)
    # No zero_optimization section: stage 3, as build_ds_config gives it (not DeepSpeed's 0).
    assert dsc.check_ds_config(run_cfg(ds={}, global_batch_size=8), 2)[1] == 3
    with pytest.raises(ConfigError, match="ZeRO stage 1 is not supported by method 'osft'"):
        dsc.check_ds_config(run_cfg(ds={"zero_optimization": {"stage": 1}}), 1)
    with pytest.raises(ConfigError, match="must be a multiple of train.micro_batch_size=2 x world size 3"):
        dsc.check_ds_config(run_cfg(micro_batch_size=2, global_batch_size=8), 3)


def test_load_ds_config_errors(tmp_path):
    p = tmp_path / "ds.json"
    with pytest.raises(ConfigError, match=f"^deepspeed: no such file: {p}$"):
        dsc.load_ds_config(p)
    p.write_text("{zero: 3}")
    with pytest.raises(ConfigError, match=r"ds.json is not valid JSON: line 1: Expecting property name"):
        dsc.load_ds_config(p)
    p.write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        dsc.load_ds_config(p)
    p.write_text('{"zero_optimization": {"stage": 2}}')
    assert dsc.load_ds_config(str(p)) == {"zero_optimization": {"stage": 2}}


# -- SLURM node lists, rank and world ---------------------------------------------------------------------


def test_expand_nodelist():
    assert env.expand_nodelist("node[1-2]") == ["node1", "node2"]
    assert env.expand_nodelist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert env.expand_nodelist("r[1-2]-n[8-10]") == ["r1-n8", "r1-n9", "r1-n10", "r2-n8", "r2-n9", "r2-n10"]
    assert env.expand_nodelist("a,b") == ["a", "b"]
    for bad in ("node[1-2", "node[2-1]", "node[x]", ","):
        with pytest.raises(ValueError, match="cannot expand SLURM node list"):
            env.expand_nodelist(bad)


def _path_with(tmp_path, scontrol: str | None) -> str:
    """A PATH holding only a `scontrol` script (or none at all)."""
    d = tmp_path / "bin"
    d.mkdir()
    if scontrol is not None:
        f = d / "scontrol"
        f.write_text("#!/bin/sh\n" + scontrol + "\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return str(d)


def test_slurm_hostnames_without_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path, None))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    assert env.slurm_hostnames() == ["node1", "node2"]
    assert env.slurm_hostnames("gpu[3-4]") == ["gpu3", "gpu4"]
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    with pytest.raises(ValueError, match="not inside a SLURM allocation"):
        env.slurm_hostnames()


def test_slurm_hostnames_asks_scontrol_first_and_falls_back_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path, 'echo "$3"-from-scontrol'))
    assert env.slurm_hostnames("node[1-2]") == ["node[1-2]-from-scontrol"]
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'fatal: no configuration' >&2\nexit 1\n")
    assert env.slurm_hostnames("node[1-2]") == ["node1", "node2"]


def _clear_dist_env(monkeypatch):
    """Unset the rank variables, so that monkeypatch also removes what the code under test sets (it
    restores only the keys it touched; a leaked WORLD_SIZE=4 makes later tests wait for 3 ranks)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def test_env_from_slurm_master_is_first_expanded_host(tmp_path, monkeypatch):
    _clear_dist_env(monkeypatch)
    monkeypatch.setenv("PATH", _path_with(tmp_path, None))
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    assert env.world_size() == 4
    env.env_from_slurm()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}


def test_world_size_rules(monkeypatch):
    _clear_dist_env(monkeypatch)
    assert env.world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert env.world_size() == 1  # SLURM_NTASKS alone (an sbatch script, no srun task): not a rank
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert env.world_size() == 8
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's torch variables win over SLURM's
    assert env.world_size() == 2
    env.env_from_slurm()
    assert "RANK" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a positive integer"):
        env.world_size()


def test_free_port_from_the_kernel_or_from_a_range(monkeypatch):
    """free_port: the kernel's pick by default; with DS_CL_PORT_RANGE=LO-HI (each xdist worker of the suite has
    one, tests/conftest.py) a free port of the range, never a taken one; a malformed range names the variable."""
    import socket

    monkeypatch.delenv("DS_CL_PORT_RANGE", raising=False)
    assert 0 < env.free_port() <= 65535
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("DS_CL_PORT_RANGE", f"{port}-{port}")
        with pytest.raises(OSError, match=f"no free TCP port in DS_CL_PORT_RANGE={port}-{port}"):
            env.free_port()
    assert env.free_port() == port  # released: free again
    for bad in ("10", "20-10", "a-b", "0-5", "60000-70000", "1-2-3"):
        monkeypatch.setenv("DS_CL_PORT_RANGE", bad)
        with pytest.raises(ValueError, match=f"DS_CL_PORT_RANGE='{bad}': expected LO-HI"):
            env.free_port()


# -- process group ------------------------------------------------------------------------------------------


def test_train_gives_the_process_group_the_run_configs_timeout(tmp_path, monkeypatch):
    """train.dist_timeout_minutes (default 60: rank 0 exports, evaluates and deletes old checkpoints while
    the others wait in a collective), train.deterministic and the DeepSpeed config (to announce a CPU Adam
    compile) reach the process's start-up."""
    from ds_cl.training import train
    from tests.fixtures import tiny_run_config, train_sentencepiece, write_run_config

    class Started(Exception):
        pass

    seen = []

    def build_distributed(**kwargs):
        seen.append(kwargs)
        raise Started

    monkeypatch.setattr(env, "build_distributed", build_distributed)
    train_sentencepiece(tmp_path / "tok.model")
    zero3 = {"zero_optimization": {"stage": 3}}  # tiny_run_config's DeepSpeed config, as the user gave it
    for extra, expect in (({}, {"timeout_minutes": 60.0, "deterministic": False, "ds_config": zero3}),
                          ({"train": {"dist_timeout_minutes": 90, "deterministic": True}},
                           {"timeout_minutes": 90.0, "deterministic": True, "ds_config": zero3})):
        with pytest.raises(Started):
            train.main([str(write_run_config(tiny_run_config(tmp_path, tmp_path / "out", extra)))])
        assert seen.pop() == expect


def test_the_process_group_gets_the_timeout_and_determinism():
    """One process, its own process group: the timeout torch's group holds is the one asked for, and
    deterministic=True leaves torch's deterministic mode and cuBLAS's workspace setting on, set before the
    device (train.deterministic: GPU runs that resume bit-identically)."""
    import subprocess
    import sys

    from tests.dist_utils import REPO, cpu_env

    code = ("import os, sys, torch, torch.distributed as dist\n"
            "from ds_cl.training.environment import build_distributed\n"
            "print('before', torch.are_deterministic_algorithms_enabled())\n"
            "build_distributed(timeout_minutes=7.5, deterministic=sys.argv[1] == 'on')\n"
            "pg = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
            "print('timeout', pg.options._timeout.total_seconds())\n"
            "print('deterministic', torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,"
            " torch.backends.cudnn.benchmark, os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
            "dist.destroy_process_group()\n")
    e = {k: v for k, v in cpu_env().items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "CUBLAS_WORKSPACE_CONFIG")}
    for mode, want in (("on", "deterministic True True False :4096:8"),
                       ("off", "deterministic False False False None")):
        p = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO, env=e, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        ours = [line for line in p.stdout.splitlines() if line.split(" ")[0] in ("before", "timeout", "deterministic")]
        assert ours == ["before False", "timeout 450.0", want], p.stdout
