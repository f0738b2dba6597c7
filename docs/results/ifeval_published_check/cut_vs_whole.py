"""IFEval strict/loose prompt-level accuracy of the answers cut by max_new_tokens against those that ended.

    python docs/results/ifeval_published_check/cut_vs_whole.py PATH/TO/ifeval/input_data.jsonl runs/ifeval541
"""
import json
import os
import sys

from transformers import AutoTokenizer

from ds_cl.evaluation.ifeval import check_prompt, read_ifeval_prompts

prompts, out = sys.argv[1], sys.argv[2]
meta = json.load(open(os.path.join(out, "eval.json")))
tok = AutoTokenizer.from_pretrained(os.path.expanduser(meta["model"]))
by_prompt = {p["prompt"]: p for p in read_ifeval_prompts(prompts)}
counts = {"cut": [0, 0, 0], "ended": [0, 0, 0]}  # answers, strict, loose
for line in open(os.path.join(out, "responses_ifeval.jsonl")):
    r = json.loads(line)
    n = len(tok(r["response"], add_special_tokens=False)["input_ids"])
    c = counts["cut" if n >= meta["max_new_tokens"] - 7 else "ended"]  # the decoded text re-tokenizes a few short
    v = check_prompt(by_prompt[r["prompt"]], r["response"])
    c[0] += 1
    c[1] += v["follow_all_instructions_strict"]
    c[2] += v["follow_all_instructions_loose"]
for k, (n, s, lo) in counts.items():
    print(f"{k}: {n} answers, prompt strict {100 * s / n:.1f} %, loose {100 * lo / n:.1f} %")
