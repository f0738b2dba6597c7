"""`ds-cl demo [--out DIR]`: the embedded demo. Three short classification tasks shipped with the package
(ds_cl/tools/demo_data/), learnt one after the other by a small LLaMA on 2 ZeRO-3 CPU ranks, once with plain
sequential fine-tuning (seqft) and once with the orthogonal-subspace method (osft); prints both accuracy
matrices with AA and BWT. About 3 minutes on 2 CPU cores. Why this model and these tasks: docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from ds_cl.tools.local_runs import launch_train

DATA = Path(__file__).resolve().parent / "demo_data"
TASKS = [
    # name, instruction; every task answers yes or no (the O-LoRA prompt lists them as options).
    ("sentiment", "Is the following review positive? Choose one from the option."),
    ("topic", "Is the following sentence about food or music? Choose one from the option."),
    ("animal", "Is the animal mentioned a bird? Choose one from the option."),
]
METHODS = ("seqft", "osft")


def train_tokenizer(path: Path, vocab_size: int = 800) -> Path:
    """A LLaMA-style SentencePiece BPE model (byte fallback, bos=1, eos=2) trained on the demo's own
    prompts in about a second: a real tokenizer without a download."""
    import io

    import sentencepiece as spm

    texts = []
    for name, instruction in TASKS:
        rows = [json.loads(line) for line in open(DATA / f"{name}.jsonl")]
        labels = sorted({r["output"] for r in rows})
        texts += [f"{instruction}\nOption: {', '.join(labels)}\n{r['input']}\nAnswer: {r['output']}" for r in rows]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   num_threads=1, minloglevel=2, character_coverage=1.0, split_digits=True)
    path.write_bytes(buf.getvalue())
    return path


def run_config(method: str, out: Path, tokenizer: Path, quick: bool = False) -> dict:
    return {
        "output_dir": str(out / method),
        "seed": 0,
        "deepspeed": {"zero_optimization": {"stage": 3}},
        "model": {
            "config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                       "vocab_size": 800, "max_position_embeddings": 128, "tie_word_embeddings": False},
            "tokenizer": str(tokenizer),
            "dtype": "float32",
        },
        "method": {"name": method,
                   # Task 0 starts from random weights: nothing to protect yet (as the paper's T5 runs).
                   "osft": {"rank": "adaptive", "fit_before_first_task": False, "importance_samples": 32}},
        "train": {"lr": 1e-3, "epochs": 1 if quick else 10, "micro_batch_size": 4, "global_batch_size": 8,
                  "max_seq_len": 64, "warmup_ratio": 0.1, "lr_schedule": "linear"},
        "eval": {"batch_size": 32},
        "checkpoint": {"keep": 1},
        "output": {"export_each_task": False},
        "tasks": [{"name": name, "train": str(DATA / f"{name}.jsonl"), "instruction": instruction,
                   "eval_size": 8 if quick else 40, "max_train_samples": 16 if quick else 160}
                  for name, instruction in TASKS],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ds-cl-demo", help="output folder (default ./ds-cl-demo)")
    p.add_argument("--nprocs", type=int, default=2, help="ZeRO-3 ranks (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default seqft,osft)")
    p.add_argument("--quick", action="store_true", help="a few steps per task, to check the wiring")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from ds_cl.methods import REGISTRY

    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        print(f"ds-cl demo: unknown method {bad[0]!r}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = train_tokenizer(out / "tokenizer.model")
    print(f"ds-cl demo: 3 tasks ({', '.join(n for n, _ in TASKS)}), methods {', '.join(methods)}, "
          f"{args.nprocs} ZeRO-3 ranks; outputs in {out}", flush=True)
    results = {}
    for method in methods:
        if (out / method / "config.yaml").exists():
            # A demo run is ours to replace; `ds-cl train` itself refuses to start over an existing run.
            print(f"replacing the previous demo run in {out / method}", flush=True)
            shutil.rmtree(out / method)
        cfg_path = out / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(run_config(method, out, tok, args.quick), sort_keys=False))
        print(f"== {method}", flush=True)
        t = time.time()
        rc = launch_train(cfg_path, args.nprocs, out / f"{method}.log")
        if rc != 0:
            print(f"ds-cl demo: {method} failed (exit {rc}); see {out / (method + '.log')}", file=sys.stderr)
            return rc
        results[method] = json.loads((out / method / "summary.json").read_text())
        results[method]["wall_s"] = round(time.time() - t, 1)
    from ds_cl.training.outputs import format_matrix

    names = [n for n, _ in TASKS]
    print("\nAccuracy (%) on each task (columns) after training each task (rows):")
    for method, s in results.items():
        print(f"\n{method}: AA={100 * s['AA']:.1f}  BWT={100 * s['BWT']:+.1f}  ({s['wall_s']:.0f}s)")
        print(format_matrix(s["matrix"], names))
    with open(out / "demo_summary.json", "w") as f:
        json.dump({m: {k: s[k] for k in ("AA", "BWT", "matrix", "wall_s")} for m, s in results.items()}, f, indent=1)
    print(f"\nOutputs: {out}/<method>/summary.json, cl_matrix.json, cl_matrix.png, loss.png, metrics.jsonl;"
          f" logs {out}/<method>.log; total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
