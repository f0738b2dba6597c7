"""End to end on 2 real ZeRO-3 CPU ranks: a 2-task run writes every output; the exported model loads
and generates; `--resume` (at a task boundary and mid-task) ends with the same weights as one run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_utils import TRAIN, cpu_env, launch
from tests.fixtures import tiny_run_config, train_sentencepiece, write_run_config

pytestmark = pytest.mark.distributed

METHOD = "osft"


def run_config(tmp, out, method=METHOD, **extra):
    return write_run_config(tiny_run_config(tmp, out, {"method": {"name": method}, **extra}))


def train(config, *args, env=None):
    return launch(TRAIN, 2, str(config), *args, timeout=600, env=env)


def protected_lines(out):
    return [json.loads(line) for line in (out / "protected.jsonl").read_text().splitlines()]


def check_protected(out, stdout):
    """osft's protected.jsonl (ds_cl/methods/osft.py protected_record): the fit before task a, the extend by
    task a's update before task b; shares in [0, 1], the overall share the mean over the target matrices
    and the log line's number, each layer's the mean over its matrices."""
    import re

    recs = protected_lines(out)
    assert [(r["phase"], r["task"], r["event"]) for r in recs] == [(0, "a", "fit"), (1, "b", "extend")], recs
    assert [r["kind"] for r in recs] == [None, "update"], recs  # method.osft.boundary's default
    for r in recs:
        m = r["matrices"]
        assert len(m) == 14 and all(0 <= v <= 1 for v in m.values()), m  # 7 Linear weights x 2 layers
        assert set(r["layers"]) == {"model.layers.0", "model.layers.1"}, r["layers"]
        assert r["share"] == pytest.approx(sum(m.values()) / len(m)) and 0 <= r["share"] <= 1
        for layer, v in r["layers"].items():
            mine = [m[n] for n in m if n.startswith(layer + ".")]
            assert len(mine) == 7 and v == pytest.approx(sum(mine) / 7), layer
    fit, ext = recs
    assert fit["added"] is None and fit["share"] == pytest.approx(0.5)  # method.osft.ratio: 0.5
    assert 0 < ext["added"] <= 1 and ext["share"] == pytest.approx(fit["share"] + ext["added"])
    logged = re.search(r"phase 1: protected the update of a \(\+([\d.]+)% of directions, now ([\d.]+)%\)", stdout)
    assert logged and [float(g) for g in logged.groups()] == [round(100 * ext["added"], 1),
                                                             round(100 * ext["share"], 1)], stdout[-3000:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    train_sentencepiece(tmp / "tok.model")
    out = tmp / "full"
    # Both trackers, W&B offline (no network), as a user turns them on.
    env = dict(cpu_env(), WANDB_MODE="offline", WANDB_SILENT="true")
    proc = train(run_config(tmp, out, output={"export_dtype": "float32", "report_to": ["tensorboard", "wandb"]}),
                 env=env)
    return tmp, out, proc


def test_two_task_run_writes_every_output(full_run):
    tmp, out, proc = full_run
    for f in ("config.yaml", "metrics.jsonl", "cl_matrix.json", "summary.json", "cl_matrix.png", "loss.png"):
        assert (out / f).is_file(), f
    summ = json.loads((out / "summary.json").read_text())
    assert set(summ) >= {"AA", "BWT", "matrix", "final_scores"} and summ["complete"]
    assert [len(r) for r in summ["matrix"]] == [1, 2]
    assert summ["AA"] == pytest.approx(sum(summ["matrix"][1]) / 2)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9)) and [r["task"] for r in recs] == ["a"] * 4 + ["b"] * 4
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    if METHOD == "osft":
        # Audited (method.osft.audit_every: 10) on the first step after each task's fit, and exact there.
        audited = [r for r in recs if "leak" in r]
        assert [(r["task"], r["task_step"]) for r in audited] == [("a", 1), ("b", 1)], audited
        assert all(r["leak"] < 1e-4 for r in audited)
        check_protected(out, proc.stdout)
    from matplotlib.image import imread

    # Real images of a readable size (ds_cl/training/plots.py).
    for png in ("cl_matrix.png", "loss.png") + (("protected.png",) if METHOD == "osft" else ()):
        h, w = imread(out / png).shape[:2]
        assert 200 <= h <= 2000 and 300 <= w <= 2500, (png, h, w)
    assert "AA=" in proc.stdout and "outputs in" in proc.stdout
    # DeepSpeed's calls of collectives that torch deprecates are not repeated in every user's log
    assert "torch.distributed.all_gather_into_tensor` is deprecated" not in proc.stdout + proc.stderr


def test_report_to_tensorboard_and_wandb(full_run):
    """output.report_to: the loss of every metrics.jsonl record, and the accuracy matrix row after each task,
    reach TensorBoard's event files and the offline W&B run."""
    from tests.test_tracking import tensorboard_scalars, wandb_history

    _, out, _ = full_run
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summ = json.loads((out / "summary.json").read_text())
    tb = tensorboard_scalars(out / "tensorboard")
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in recs]
    assert tb["eval/a"] == [(4, pytest.approx(summ["matrix"][0][0])), (8, pytest.approx(summ["matrix"][1][0]))]
    assert tb["cl/AA"][-1] == (8, pytest.approx(summ["AA"]))
    history = wandb_history(out / "wandb")
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [
        (r["step"], pytest.approx(r["loss"])) for r in recs]
    assert [h["eval/b"] for h in history if "eval/b" in h] == [pytest.approx(summ["matrix"][1][1])]


def test_exported_model_loads_and_generates(full_run):
    from transformers import AutoModelForCausalLM

    from ds_cl.training.data import load_tokenizer

    tmp, out, _ = full_run
    folder = out / "task_1_b"
    model = AutoModelForCausalLM.from_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(folder / "model.safetensors") == mode(folder / "config.json") == mode(out / "metrics.jsonl")
    # Full shapes, not the empty ZeRO-3 placeholders.
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(str(folder))
    ids = torch.tensor([[tok.bos_id] + tok.encode_prompt("the meal was great. Answer:")])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
    assert gen.shape[1] > ids.shape[1]
    # task_0 and task_1 differ: the second task trained the weights further.
    sd0 = load_file(out / "task_0_a" / "model.safetensors")
    assert not torch.equal(sd0["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])


def test_resume_at_boundary_and_mid_task_equals_uninterrupted(full_run):
    tmp, full, _ = full_run
    out = tmp / "resumed"
    cfg = run_config(tmp, out)
    train(cfg, "checkpoint.stop_after_steps=4")  # stops at the task boundary (after task a's checkpoint)
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    train(cfg, "checkpoint.stop_after_steps=2", "--resume")  # refit after resume, stop mid task b
    state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
                        / "trainer_state.json").read_text())
    assert (state["phase"], state["step_in_phase"]) == (1, 2)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    train(cfg, "--resume")
    a, b = load_file(full / "task_1_b" / "model.safetensors"), load_file(out / "task_1_b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_sum, res_sum = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    assert full_sum["matrix"] == res_sum["matrix"]
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(full) == losses(out)
    if METHOD == "osft":  # the extend of the 2nd run kept by the mid-task resume, no phase twice
        assert protected_lines(out) == protected_lines(full)


def test_retention_suite_scores_each_exported_model(full_run):
    """eval.retention_suite runs ds_cl.evaluation on task_<i>_<name>/ after each task (1 rank, 1 step per task)."""
    tmp, _, _ = full_run
    out = tmp / "retention"
    train_one = launch(TRAIN, 1, str(run_config(tmp, out, method="seqft")),
                       "eval.retention_suite=safety-mini", "train.max_steps_per_task=1", timeout=600)
    assert "retention after task 1" in train_one.stdout
    for i in (0, 1):
        ev = json.loads((out / f"retention_task_{i}" / "eval.json").read_text())
        assert ev["model"].endswith(f"task_{i}_{'ab'[i]}") and "safety" in ev


def test_retention_after_last_scores_only_the_final_model(full_run):
    tmp, _, _ = full_run
    out = tmp / "retention_last"
    proc = launch(TRAIN, 1, str(run_config(tmp, out, method="seqft")), "eval.retention_suite=safety-mini",
                  "eval.retention_after=last", "train.max_steps_per_task=1", timeout=600)
    assert "retention after task 1" in proc.stdout and "retention after task 0" not in proc.stdout
    assert not (out / "retention_task_0").exists() and (out / "retention_task_1" / "eval.json").is_file()


def test_bf16_run_is_exact_exports_and_resumes_identically(full_run):
    """model.dtype bfloat16 (DeepSpeed bf16, fp32 masters and gradient accumulation): every step's audited
    leak <= 1e-5, the bf16 export loads and generates, and a run stopped mid task 1 and resumed ends with
    the same weights as one uninterrupted run."""
    from transformers import AutoModelForCausalLM

    tmp, _, _ = full_run
    bf16 = {"model": {"dtype": "bfloat16"}, "output": {"export_dtype": "bfloat16"},
            "method": {"name": "osft", "osft": {"rank": "fixed", "ratio": 0.5, "audit_every": 1}}}
    runs = {}
    for name in ("bf16", "bf16_resumed"):
        cfg = write_run_config(tiny_run_config(tmp, tmp / name, bf16))
        if name == "bf16_resumed":
            train(cfg, "checkpoint.stop_after_steps=6")
            train(cfg, "--resume")
        else:
            train(cfg)
        runs[name] = tmp / name
    recs = [json.loads(line) for line in (runs["bf16"] / "metrics.jsonl").read_text().splitlines()]
    leaks = [r["leak"] for r in recs if "leak" in r]
    assert len(leaks) == 8 and max(leaks) <= 1e-5, leaks
    a, b = (load_file(runs[n] / "task_1_b" / "model.safetensors") for n in ("bf16", "bf16_resumed"))
    assert a.keys() == b.keys() and all(v.dtype == torch.bfloat16 for v in a.values())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = AutoModelForCausalLM.from_pretrained(runs["bf16"] / "task_1_b", dtype=torch.bfloat16)
    gen = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == 7


def test_osft_inputs_boundary_runs_once_across_resumes(tmp_path):
    """method.osft.boundary: inputs. A run stopped at the task boundary (before it) protects task a's
    inputs when resumed; stopped again inside task b (after it) and resumed, it does not protect them again:
    one `extend` line of kind `inputs` in protected.jsonl, one log line; every audited leak <= 1e-5."""
    train_sentencepiece(tmp_path / "tok.model")
    out = tmp_path / "inputs"
    cfg = write_run_config(tiny_run_config(tmp_path, out, {"method": {"name": "osft", "osft": {
        "rank": "fixed", "ratio": 0.5, "boundary": "inputs", "importance_samples": 8}}}))
    logged = "phase 1: protected the inputs of a"
    first = train(cfg, "checkpoint.stop_after_steps=4")  # stops at the boundary, before it
    assert logged not in first.stdout
    second = train(cfg, "checkpoint.stop_after_steps=2", "--resume")  # the boundary, then 2 steps of task b
    assert second.stdout.count(logged) == 1, second.stdout[-3000:]
    assert "(2 batches per rank" in second.stdout  # importance_samples 8: 4 per rank, micro batches of 2
    third = train(cfg, "--resume")  # inside task b: the checkpoint holds the grown subspace
    assert logged not in third.stdout, third.stdout[-3000:]
    assert json.loads((out / "summary.json").read_text())["complete"]
    recs = protected_lines(out)
    assert [(r["phase"], r["event"], r["kind"]) for r in recs] == [(0, "fit", None), (1, "extend", "inputs")], recs
    assert 0 < recs[1]["added"] and recs[1]["share"] == pytest.approx(recs[0]["share"] + recs[1]["added"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    leaks = [(r["task"], r["task_step"], r["leak"]) for r in metrics if "leak" in r]
    # Audited on the first step after the fit, the boundary, and the resume inside task b.
    assert [lk[:2] for lk in leaks] == [("a", 1), ("b", 1), ("b", 3)], leaks
    assert max(lk[2] for lk in leaks) <= 1e-5, leaks


def test_osft_protects_the_inputs_of_earlier_data_before_the_first_task(tmp_path):
    """method.osft.protect_inputs_of, on a model with a chat template: before the first task (after the fit)
    the inputs its records feed each target layer are protected, once: stopped inside task a and resumed, the
    run does not protect them again (one log line, one `extend` line of kind `inputs` at phase 0). The added
    input directions V_d hold `input_energy` of those inputs (outside the fitted V_h; computed here in one
    process from the same records), and task a's change of every target maps them to ~0."""
    import glob

    from ds_cl.core import subspace as S
    from ds_cl.training.config import load_config
    from ds_cl.training.data import load_earlier, load_tokenizer
    from tests.test_eval_generate import make_tiny_model
    from tests.test_retention import HARMFUL

    tiny = make_tiny_model(tmp_path / "tiny")
    prior = tmp_path / "prior.jsonl"
    prior.write_text("".join(json.dumps({"instruction": h, "input": "", "output": "I'm sorry, I can't help with that."})
                             + "\n" for h in HARMFUL + [f"{h} Now." for h in HARMFUL[:3]]))  # 8 records
    out = tmp_path / "prot"
    cfg = tiny_run_config(tmp_path, out, {"method": {"name": "osft", "osft": {
        "rank": "fixed", "ratio": 0.5, "importance_samples": 8,
        # the fit too (protect_inputs_of alone would default it off): the inputs are added outside V_h
        "fit_before_first_task": True, "non_target_lr_scale": 1.0,
        "protect_inputs_of": [{"name": "prior", "train": str(prior), "format": "alpaca"}]}}})
    cfg["model"] = {"name_or_path": str(tiny), "dtype": "float32", "chat_template": True}
    cfg["tasks"] = cfg["tasks"][:1]
    path = write_run_config(cfg)
    logged = "phase 0: protected the inputs of prior (2 batches per rank"  # 8 samples: 4 per rank, micro 2
    first = train(path, "checkpoint.stop_after_steps=2")  # inside task a
    assert first.stdout.count(logged) == 1, first.stdout[-3000:]
    states = [torch.load(f, weights_only=True)
              for f in sorted(glob.glob(str(out / "checkpoints" / "*" / "method_rank*.pt")))]
    assert len(states) == 2, states
    second = train(path, "--resume")
    assert "phase 0: protected" not in second.stdout, second.stdout[-3000:]
    assert json.loads((out / "summary.json").read_text())["complete"]
    recs = protected_lines(out)
    assert [(r["phase"], r["event"], r["kind"]) for r in recs] == [(0, "fit", None), (0, "extend", "inputs")], recs
    fit, ext = recs
    assert 0 < ext["added"] and ext["share"] == pytest.approx(fit["share"] + ext["added"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    leaks = [r["leak"] for r in metrics if "leak" in r]
    assert leaks and max(leaks) <= 1e-5, leaks

    # The protected records' inputs to each target, at the starting weights, as the trainer encodes them.
    from transformers import AutoModelForCausalLM

    run = load_config(path)
    tok = load_tokenizer(str(tiny), chat_template=True)
    samples = load_earlier(run.method.osft.protect_inputs_of[0], 0, tok, run.train.max_seq_len,
                           within="method.osft.protect_inputs_of")
    assert len(samples) == 8
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    w0 = {n: p.detach().double() for n, p in model.named_parameters()}
    bases = {n: b for st in states for n, b in st["bases"].items()}
    names = S.select_targets(list(w0))
    assert set(bases) == set(names) and len(names) == 14
    xs = {n: [] for n in names}
    for n in names:
        model.get_submodule(n.rpartition(".")[0]).register_forward_hook(
            lambda mod, args, output, n=n: xs[n].append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for s in samples:
            model(input_ids=torch.tensor([s.input_ids]))
    w1 = load_file(out / "task_0_a" / "model.safetensors")
    reached = 0
    for n in names:
        x = torch.cat(xs[n])
        v = bases[n][1].double()
        r0 = round(fit["matrices"][n] * min(w0[n].shape))
        v_h, v_d = v[:, :r0], v[:, r0:]
        k = v_d.shape[1]
        assert k == round(ext["matrices"][n] * min(w0[n].shape)) - r0 and k > 0, n
        # V_d holds input_energy (0.99) of the inputs outside V_h, unless the cap (0.9 x min(m, n)) stopped it.
        rest = x - (x @ v_h) @ v_h.T
        left = rest - (rest @ v_d) @ v_d.T
        if k < S.max_protected_rank(w0[n].shape, 0.9) - r0:
            assert left.norm() ** 2 <= (1 - 0.99) * rest.norm() ** 2 * (1 + 1e-3), n
            reached += 1
        dw = w1[n].double() - w0[n]
        assert dw.norm() > 1e-4 * w0[n].norm(), f"{n} did not train in task a"
        assert (dw @ v_d).norm() <= 1e-5 * dw.norm(), n
    assert 0 < reached < len(names), reached  # both met: the energy reached (o_proj here), and the cap
