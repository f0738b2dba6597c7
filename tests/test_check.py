"""`ds-cl train CONFIG --check` (ds_cl/training/check.py), the launchers that run it before deepspeed, and
launchers/slurm/submit.sh. Real configs, data files and tokenizers (a SentencePiece model trained on the
spot); the check runs in-process where only its result matters and as the real command where its output
and exit status do. Nothing here starts DeepSpeed or a process group.

The shipped LLaMA-2 examples name a hub model that is not on this machine, and data under /path/to: their
test gives each task real files, a local tokenizer (model.tokenizer) and --offline-ok, under which a hub
model absent from the local HF cache is a warning and the plan leaves out what needs it (parameter count,
checkpoint size). Batch arithmetic, ZeRO stage, precision, steps and record lengths are checked in full.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ds_cl.training.check import format_plan, resolve_world, run_check
from tests.dist_utils import REPO, cpu_env
from tests.fixtures import FIXTURES
from tests.slurm_cluster import write_tiny_run

LAUNCHERS = REPO / "launchers"
SBATCH = LAUNCHERS / "slurm" / "llama2_7b.sbatch"
SUBMIT = LAUNCHERS / "slurm" / "submit.sh"
EXAMPLES = sorted((LAUNCHERS / "examples").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    """The launch tests' tiny run: 2 tasks of 16 records (eval_size 4), micro 2, global 4, max_seq_len 64."""
    return write_tiny_run(tmp_path_factory.mktemp("run"))


def check_cli(*args, **env) -> subprocess.CompletedProcess:
    e = cpu_env(**env)  # HF_HUB_OFFLINE=1 among them
    return subprocess.run([sys.executable, "-m", "ds_cl.cli", "train", *map(str, args), "--check"], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=300)


def sh(*cmd, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in cpu_env(**env).items() if k not in ("NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
    e.setdefault("PYTHON", sys.executable)
    return subprocess.run(["bash", *map(str, cmd)], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


# -- the plan ---------------------------------------------------------------------------------------


def test_plan_of_a_tiny_run(run_cfg):
    p = check_cli(run_cfg, "--world-size", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "world size  2 (--world-size)" in out
    assert "batch       micro 2 x accumulation 1 x world 2 = global 4" in out
    assert "model       built from model.config (llama), random init" in out
    assert f"tokenizer   {run_cfg.parent / 'tok.model'} (local)" in out
    # 16 records, eval_size 4 held out: 12 train, 3 steps of 4 per epoch, capped at max_steps_per_task 2.
    assert "colors: 12 training records; 4 held out of 16 for evaluation" in out
    assert "colors: 12 samples -> 2 optimizer steps (3 per epoch x 1 epoch(s), capped by train.max_steps_per_task)" in out
    assert "4 optimizer steps in all" in out
    assert re.search(r"checkpoint  ~[\d.]+ MiB per save \(41,120 parameters, 41,120 trainable, float32, ZeRO 3", out)
    assert re.search(r"disk        [\d.]+ (GiB|MiB) free at ", out)
    assert out.rstrip().endswith("ds-cl train --check: ok") and p.stderr == ""
    # multitask trains both tasks in one phase: the cap is per task, so the phase gets both tasks' steps
    p = check_cli(run_cfg, "--world-size", "2", "method.name=multitask")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"steps       multitask: \d+ samples -> 4 optimizer steps \(\d+ per epoch x 1 epoch\(s\), capped by "
                     r"train.max_steps_per_task\)", p.stdout), p.stdout
    assert "4 optimizer steps in all" in p.stdout


def test_json_plan_parses(run_cfg, tmp_path):
    p = check_cli(run_cfg, "--world-size", "2", "--json", f"output_dir={tmp_path / 'out'}")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["ok"] is True and plan["errors"] == []
    assert plan["world"] == {"size": 2, "from": "--world-size", "assumed": False}
    assert {k: plan["batch"][k] for k in ("micro", "accumulation", "world", "global", "zero_stage")} == \
        {"micro": 2, "accumulation": 1, "world": 2, "global": 4, "zero_stage": 3}
    assert [t["name"] for t in plan["tasks"]] == ["colors", "animals"]
    assert [(t["records"], t["train"], t["held_out"], t["eval"]) for t in plan["tasks"]] == [(16, 12, 4, 4)] * 2
    assert [ph["steps"] for ph in plan["phases"]] == [2, 2] and plan["total_steps"] == 4
    c = plan["checkpoint"]
    assert c["parameters"] == 41120 and c["optimizer_bytes"] == 12 * 41120 and c["weights_bytes"] == 0
    assert c["bytes_per_save"] > c["optimizer_bytes"] + c["method_state_bytes"]
    assert plan["disk"]["measured_at"] == str(tmp_path) and plan["disk"]["free_bytes"] > 0
    assert plan["model"]["kind"] == "config" and plan["tokenizer"]["kind"] == "local"


def test_checkpoint_estimate_counts_the_model_and_osft_state(run_cfg):
    """Parameters counted independently (transformers' LlamaConfig, numel by shape); the optimizer's 12
    bytes per parameter and osft's fp32 bases and anchor at the accumulate cap (0.9 x min(m, n))."""
    from ds_cl.core.projector_memory import bases_numel

    cfg = dict(hidden=32, inter=64, layers=2, heads=2, kv=2, vocab=320)
    h, i, v = cfg["hidden"], cfg["inter"], cfg["vocab"]
    shapes = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]  # q k v o (kv heads = heads), gate up down
    per_layer = sum(m * n for m, n in shapes) + 2 * h
    n_params = 2 * v * h + cfg["layers"] * per_layer + h
    chk = run_check(str(run_cfg), world_size=1)
    assert not chk.errors, chk.errors
    c = chk.plan["checkpoint"]
    assert c["parameters"] == n_params == 41120
    state = 4 * cfg["layers"] * sum(bases_numel(s, int(0.9 * min(s)), "two_sided") + s[0] * s[1] for s in shapes)
    assert c["method_state_bytes"] == state
    # The inputs boundary keeps no anchor (the task-start weights only the update boundary diffs against).
    inputs = run_check(str(run_cfg), ["method.osft.boundary=inputs"], world_size=1).plan["checkpoint"]
    assert inputs["method_state_bytes"] == state - 4 * cfg["layers"] * sum(s[0] * s[1] for s in shapes)
    assert "anchor" not in inputs["method_state"] and "anchor" in c["method_state"]
    # checkpoint.keep saves beyond any disk: a warning, not an error.
    chk = run_check(str(run_cfg), ["checkpoint.keep=100000000"], world_size=1)
    assert not chk.errors
    assert any(w.startswith("checkpoints: checkpoint.keep=100000000 saves of ~") and "free" in w for w in chk.warnings)


def test_batch_that_does_not_fit_the_world_is_one_error_naming_both(run_cfg):
    p = check_cli(run_cfg, "--world-size", "3")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ds-cl train --check: error: batch: train_batch_size 4 does not fit world size 3: ")
    assert "set train.global_batch_size to a multiple of 6 (micro 2 x world 3; e.g. train.global_batch_size=6)" in lines[0]
    assert "or run on a world size dividing 2 (e.g. 2, with accumulation 1)" in lines[0]
    assert p.stdout.rstrip().endswith("ds-cl train --check: 1 error(s)")


def test_every_error_is_reported_not_only_the_first(run_cfg, tmp_path):
    """A batch that does not fit and too few records for a step: two lines."""
    chk = run_check(str(run_cfg), ["train.global_batch_size=24"], world_size=8)
    assert len(chk.errors) == 2, chk.errors
    assert chk.errors[0].startswith("batch: train_batch_size 24 does not fit world size 8")
    assert "12 training records (16 - 4 held out) are fewer than train.global_batch_size 24" in chk.errors[1]


def test_tuning_records_are_listed_per_task_and_too_many_refused(run_cfg):
    """eval.tuning_size: the plan lists each task's tuning records (held out beside the evaluation's) and
    trains on the rest; a split that leaves a task no training record is one error line."""
    chk = run_check(str(run_cfg), ["eval.tuning_size=2"], world_size=1)
    assert not chk.errors, chk.errors
    assert [(t["records"], t["held_out"], t["tuning"], t["train"]) for t in chk.plan["tasks"]] == [(16, 4, 2, 10)] * 2
    assert [ph["samples"] for ph in chk.plan["phases"]] == [10, 10]
    p = check_cli(run_cfg, "--world-size", "2", "eval.tuning_size=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "colors: 10 training records; 4 held out of 16 for evaluation (eval_size 4, at most half the records); " \
           "2 held out for tuning (eval.tuning_size)" in p.stdout
    assert "tuning" not in check_cli(run_cfg, "--world-size", "2").stdout  # off by default
    chk = run_check(str(run_cfg), ["eval.tuning_size=12"], world_size=1)
    assert chk.errors == ["tasks.0 (colors).train: 16 records leave no training record beside eval.tuning_size 12 and "
                          "4 held out for evaluation: a tuning split needs at least 17 records; lower eval.tuning_size"]


def test_eval_size_cap_is_stated_and_warned(run_cfg):
    chk = run_check(str(run_cfg), ["tasks.0.eval_size=100"], world_size=1)
    assert not chk.errors, chk.errors
    colors = chk.plan["tasks"][0]
    assert (colors["records"], colors["held_out"], colors["train"]) == (16, 8, 8)
    assert "at most half the records" in colors["eval_from"]
    assert chk.warnings.count("tasks.0 (colors): eval_size 100 is more than half of its 16 records: 8 held out for "
                              "evaluation (the cap: half the records), 8 left to train") == 1, chk.warnings
    assert not any("animals" in w and "eval_size" in w for w in chk.warnings)


def test_protected_inputs_sources_are_read_and_planned(run_cfg):
    """method.osft.protect_inputs_of: its files checked as method.replay.earlier's (a missing one is an
    error), its records and tokens in the plan, and how many of them are run forward before the first task."""
    src = f"[{{name: prior, train: {run_cfg.parent / 'animals.jsonl'}}}]"
    chk = run_check(str(run_cfg), [f"method.osft.protect_inputs_of={src}", "method.osft.importance_samples=8"],
                    world_size=2)
    assert not chk.errors, chk.errors
    pi = chk.plan["protect_inputs"]
    assert pi["samples"] == 8 and [(t["name"], t["records"], t["train"]) for t in pi["sources"]] == [("prior", 16, 16)]
    assert pi["sources"][0]["tokens"]["of"] == 16
    text = format_plan(chk)
    assert "protects    prior: 16 training records (method.osft.protect_inputs_of)" in text, text
    assert "with fit_before_first_task false, non_target_lr_scale 0 (the defaults once" in text, text
    assert "the inputs of 8 of them (method.osft.importance_samples) before the first task" in text, text
    chk = run_check(str(run_cfg), [f"method.osft.protect_inputs_of={src}", "method.osft.importance_samples=9"],
                    world_size=2)
    assert not chk.errors and chk.plan["protect_inputs"]["samples"] == 8  # 4 per rank, the 9th left out
    chk = run_check(str(run_cfg), [f"method.osft.protect_inputs_of={src}", "method.osft.importance_samples=1"],
                    world_size=2)
    assert chk.errors == ["method.osft.protect_inputs_of: 1 sample(s) to protect the inputs of "
                          "(method.osft.importance_samples 1) are fewer than the 2 ranks: each rank needs one"]
    missing = f"[{{name: prior, train: {run_cfg.parent / 'none.jsonl'}}}]"
    chk = run_check(str(run_cfg), [f"method.osft.protect_inputs_of={missing}"], world_size=2)
    assert len(chk.errors) == 1 and "method.osft.protect_inputs_of.0.train: no such file:" in chk.errors[0], chk.errors


def test_truncation_count_matches_sentencepiece(run_cfg):
    """The count of training records longer than max_seq_len, against lengths computed here with
    sentencepiece itself: bos + the templated prompt + the answer (with its leading space) + eos."""
    import sentencepiece as spm

    from ds_cl.training.config import DEFAULT_INSTRUCTION, DEFAULT_TEMPLATE, load_config

    cfg = load_config(run_cfg)
    sp = spm.SentencePieceProcessor(model_file=str(run_cfg.parent / "tok.model"))
    rows = [json.loads(line) for line in open(run_cfg.parent / "colors.jsonl")]
    labels = ", ".join(sorted({r["output"] for r in rows}))
    lengths = sorted(1 + len(sp.encode(DEFAULT_TEMPLATE.format(instruction=DEFAULT_INSTRUCTION, options=labels,
                                                               input=r["input"]))) + len(sp.encode(r["output"])) + 1
                     for r in rows)
    limit = lengths[len(lengths) // 2]
    chk = run_check(str(run_cfg), [f"train.max_seq_len={limit}", "tasks.0.eval_size=1"], world_size=1)
    assert not chk.errors, chk.errors
    # eval_size 1 holds out one record of 16: 15 train. Which one is the check's (seeded) business: the
    # count must lie between those of the 15 shortest and the 15 longest records.
    tok = chk.plan["tasks"][0]["tokens"]
    over = [n > limit for n in lengths]
    assert sum(over[:15]) <= tok["truncated"] <= sum(over[1:]) and tok["of"] == 15 and cfg.train.max_seq_len == 64
    assert tok["max"] <= lengths[-1] and tok["max_seq_len"] == limit
    assert any(w.startswith(f"tasks.0 (colors): {tok['truncated']} of 15 training records are longer than "
                            f"train.max_seq_len={limit} tokens") for w in chk.warnings)
    chk = run_check(str(run_cfg), ["train.max_seq_len=4096"], world_size=1)
    assert all(t["tokens"]["truncated"] == 0 for t in chk.plan["tasks"]) and not chk.warnings


def test_world_size_from_arguments_and_environment():
    assert resolve_world(world_size=16, environ={})[:2] == (16, "--world-size")
    assert resolve_world(nodes=2, gpus_per_node=8, environ={})[0] == 16
    assert resolve_world(nodes=2, environ={"SLURM_GPUS_ON_NODE": "4"})[0] == 8
    assert resolve_world(environ={"WORLD_SIZE": "6"})[:2] == (6, "WORLD_SIZE")
    w, src, assumed = resolve_world(environ={"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS": "2"})
    assert (w, assumed) == (16, False) and "SLURM_NNODES x SLURM_GPUS_ON_NODE" in src
    assert resolve_world(environ={"SLURM_NTASKS": "3"})[0] == 3
    assert resolve_world(environ={}) == (1, "assumed: no --world-size, --nodes/--gpus-per-node, WORLD_SIZE or "
                                            "SLURM allocation", True)
    from ds_cl.training.config import ConfigError

    with pytest.raises(ConfigError, match="--world-size 8 disagrees with --nodes 2 x --gpus-per-node 8 = 16"):
        resolve_world(world_size=8, nodes=2, gpus_per_node=8, environ={})
    with pytest.raises(ConfigError, match="--nodes 2 needs --gpus-per-node"):
        resolve_world(nodes=2, environ={})


def test_assumed_world_of_one_is_said(run_cfg):
    chk = run_check(str(run_cfg), environ={"HF_HUB_OFFLINE": "1"})
    assert chk.plan["world"]["assumed"] is True and chk.plan["world"]["size"] == 1
    assert any(n.startswith("world size: assumed 1") for n in chk.notes)


def test_missing_hub_model_offline_is_an_error_before_the_job(run_cfg, tmp_path):
    """A hub id that is not cached, offline: one clear line; --offline-ok makes it a warning."""
    args = [run_cfg, "--world-size", "2", "model.config=null", "model.name_or_path=no-such-org/no-such-model"]
    env = dict(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    p = check_cli(*args, **env)
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"ds-cl train --check: error: model.name_or_path: no-such-org/no-such-model is not a local folder and not in "
        f"the local HF cache ({tmp_path / 'hf' / 'hub'}), and HF_HUB_OFFLINE=1: the job would fail when it loads it; "
        f"download it first (`hf download no-such-org/no-such-model`, huggingface_hub's CLI, with the same HF_HOME) or set "
        f"model.name_or_path to a local folder")
    p = check_cli(*args, "--offline-ok", **env)
    assert p.returncode == 0, p.stderr
    assert "warning: model.name_or_path: no-such-org/no-such-model is not a local folder" in p.stdout
    assert "note: checkpoint size: unknown without the model's config" in p.stdout
    assert "tokens per training record" in p.stdout  # model.tokenizer is local: lengths still checked


def test_cached_hub_model_is_found_in_the_local_cache(run_cfg, tmp_path):
    """A hub id in the local HF cache (laid out as huggingface_hub lays it out), offline: found, its config
    read from the snapshot, the model built on the meta device."""
    snap = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=128).save_pretrained(snap)
    (snap / "model.safetensors").write_bytes(b"")  # check_model looks for the file; the check loads no weights
    p = check_cli(run_cfg, "--world-size", "2", "--json", "model.config=null", "model.name_or_path=tiny-org/tiny-llama",
                  HF_HOME=str(tmp_path / "hf"))
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads(p.stdout)
    assert plan["model"] == {"name": "tiny-org/tiny-llama", "kind": "hub", "cached": True, "path": str(snap)}
    assert plan["checkpoint"]["parameters"] == 41120


def test_check_only_options_need_check(run_cfg):
    p = subprocess.run([sys.executable, "-m", "ds_cl.cli", "train", str(run_cfg), "--world-size", "2"], cwd=REPO,
                       env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--world-size only with --check" in p.stderr


# -- every shipped cluster pair -----------------------------------------------------------------------


def sbatch_defaults() -> tuple[int, int]:
    text = SBATCH.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)\s*$", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)\s*$", text, re.M).group(1))
    return nodes, gpus


def example_overrides(example: Path, tmp: Path, spm: Path) -> list[str]:
    """Real data for each task (fixture records in the example's own fields), a local tokenizer, a
    temporary output_dir."""
    import yaml

    data = yaml.safe_load(example.read_text())
    rows = [json.loads(line) for line in open(FIXTURES / "task_a.jsonl")]
    out = [f"output_dir={tmp / example.stem}", f"model.tokenizer={spm}"]
    for i, t in enumerate(data["tasks"]):
        fi, fo = t.get("input_field", "input"), t.get("output_field", "output")
        f = tmp / example.stem / f"{t['name']}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps({fi: r["input"], fo: r["output"]}) + "\n" for r in rows))
        out += [f"tasks.{i}.train={f}", f"tasks.{i}.eval={f}"]
    return out


@pytest.mark.parametrize("ds", DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_sbatch_default_and_example_config_pass(example, ds, run_cfg, tmp_path):
    """launchers/slurm/llama2_7b.sbatch's default allocation x each launchers/examples/*.yaml x each
    ds_configs/*.json: the check passes at that world size (the model: see the module docstring). The
    configs/ runs are CPU demos on 2 ranks (their headers), not cluster runs."""
    nodes, gpus = sbatch_defaults()
    assert len(EXAMPLES) >= 2 and len(DS_CONFIGS) >= 3
    over = example_overrides(example, tmp_path, run_cfg.parent / "tok.model") + [f"deepspeed={ds}"]
    chk = run_check(str(example), over, nodes=nodes, gpus_per_node=gpus, offline_ok=True,
                    environ={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert chk.errors == [], chk.errors
    b = chk.plan["batch"]
    assert b["world"] == nodes * gpus and b["global"] == 8 and b["micro"] * b["accumulation"] * b["world"] == 8
    assert all(ph["steps"] == 6 for ph in chk.plan["phases"])  # 48 records, batch 8


def test_the_old_two_node_default_refused_the_examples(run_cfg, tmp_path):
    """Why the sbatch default is one node: at 2 x 8 the examples' batch of 8 does not fit."""
    example = EXAMPLES[0]
    chk = run_check(str(example), example_overrides(example, tmp_path, run_cfg.parent / "tok.model"), nodes=2,
                    gpus_per_node=8, offline_ok=True, environ={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "HF_HOME": str(tmp_path / "hf")})
    assert len(chk.errors) == 1 and "train_batch_size 8 does not fit world size 16" in chk.errors[0]
    assert "e.g. train.global_batch_size=16" in chk.errors[0]


# -- launchers ------------------------------------------------------------------------------------------


def test_single_node_dry_run_runs_the_check_at_its_world_size(run_cfg):
    p = sh(LAUNCHERS / "single_node.sh", "--dry-run", "--gpus", "2", run_cfg)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[localhost] ") and "deepspeed.launcher.runner --num_gpus 2" in p.stdout
    err = p.stderr
    assert "world size  2 (--world-size)" in err and "micro 2 x accumulation 1 x world 2 = global 4" in err
    assert err.index("preflight ok") < err.index("ds-cl train --check: ok")


def test_a_failing_check_stops_the_launch_before_deepspeed(run_cfg):
    """Not a dry run: preflight passes (16 = 2 x 2 x 4) but the tasks hold 12 training records, fewer than
    one step of 16: the check fails and the launcher stops before deepspeed (no runner output, nothing on
    stdout)."""
    p = sh(LAUNCHERS / "single_node.sh", "--gpus", "2", run_cfg, "train.global_batch_size=16")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "preflight ok" in p.stderr
    assert ("ds-cl train --check: error: tasks.0 (colors).train: 12 training records (16 - 4 held out) are fewer "
            "than train.global_batch_size 16: not one full step") in p.stderr
    assert p.stderr.rstrip().endswith("ds-cl launch: error: ds-cl train --check failed (the lines above); "
                                      "nothing was launched")
    assert p.stdout == "" and "deepspeed.launcher" not in p.stderr and "[INFO]" not in p.stderr


def test_multi_node_dry_run_checks_nodes_times_gpus(run_cfg, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("gpu-a slots=2\ngpu-b slots=2\n")
    p = sh(LAUNCHERS / "multi_node.sh", "--no-ssh", "--dry-run", "--hostfile", hf, run_cfg, "train.global_batch_size=8")
    assert p.returncode == 0, p.stderr
    assert "world size  4 (2 node(s) x 2 GPU(s) per node (arguments))" in p.stderr
    assert "micro 2 x accumulation 1 x world 4 = global 8" in p.stderr and "ds-cl train --check: ok" in p.stderr
    assert [line.split()[0] for line in p.stdout.splitlines()] == ["[gpu-a]", "[gpu-b]"]


# -- submit.sh ----------------------------------------------------------------------------------------


def path_without_sbatch(tmp: Path) -> str:
    """A PATH with every program of this one except sbatch (links in one folder)."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for f in os.listdir(d):
            if f != "sbatch" and not (bin_ / f).exists() and os.access(os.path.join(d, f), os.X_OK):
                (bin_ / f).symlink_to(os.path.join(d, f))
    return str(bin_)


def test_submit_refuses_a_bad_pair_before_sbatch(run_cfg, tmp_path):
    path = path_without_sbatch(tmp_path)
    p = sh(SUBMIT, "--nodes", "2", "--gpus-per-node", "8", "--time=1:00:00", run_cfg, PATH=path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "ds-cl submit: checking" in p.stderr and "world 16" in p.stderr
    assert "error: batch: train_batch_size 4 does not fit world size 16" in p.stderr
    assert "sbatch" not in p.stderr.split("nothing was launched")[-1] and "sbatch is not on PATH" not in p.stderr
    # The same launch with a pair that fits passes the check and reaches sbatch, which is missing here.
    p = sh(SUBMIT, "--nodes", "1", "--gpus-per-node", "2", run_cfg, PATH=path)
    assert p.returncode == 2 and "ds-cl train --check: ok" in p.stderr
    assert p.stderr.rstrip().endswith("sbatch is not on PATH (submit from a SLURM login node); the check passed")


def test_submit_dry_run_prints_sbatch_with_the_script_defaults(run_cfg):
    nodes, gpus = sbatch_defaults()
    batch = ["train.micro_batch_size=1", f"train.global_batch_size={nodes * gpus}"]
    p = sh(SUBMIT, "--dry-run", "--exclusive", "--time=2:00:00", run_cfg, *batch, "--resume-or-start",
           f"output_dir={run_cfg.parent / 'submit-out'}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"sbatch --nodes={nodes} --gpus-per-node={gpus} --exclusive --time=2:00:00 {SBATCH} "
                                f"{run_cfg} {' '.join(batch)} --resume-or-start output_dir={run_cfg.parent / 'submit-out'}")
    assert f"world size  {nodes * gpus} (" in p.stderr



# submit.sh's real sbatch on the test SLURM cluster: tests/test_slurm.py (one cluster for every SLURM test).
