"""`ds-cl drift REFERENCE MODEL [MODEL ...] --answers EVAL_DIR`: which parameters carried a model's drift away
from the behaviour of the model it started from? For each MODEL (e.g. the end of a task sequence that
started from REFERENCE, the aligned model), the model as trained and with one group of its parameters put
back to REFERENCE's values in turn: the embeddings (tied to `lm_head` in SmolLM2), the norms, osft's target
matrices, everything but the targets. Each is scored by teacher forcing REFERENCE's own answers
(EVAL_DIR: a `ds-cl eval` folder of REFERENCE, its `responses_ifeval.jsonl` and the harmful prompts it
refused, `safety.json`) through the chat template; no generation, so a model takes about a minute.

Scores:

- `eos_inside` / `eos_early`: the log of the mean probability of the end-of-turn token over the positions
  inside REFERENCE's answers / over their first 3 tokens: how hard the model pushes to stop early (the
  one-word tasks teach it to end after one word).
- `ifeval_nll`: the mean negative log-likelihood per token of REFERENCE's answers to the IFEval prompts.
- `refusal_nll`: the same for REFERENCE's refusals of harmful requests (how much of the refusal is kept).

A group whose reversal brings the scores back to REFERENCE's carried that part of the drift. One process,
no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GROUPS = ("embeddings", "norms", "targets", "non-targets")


def group_of(name: str, targets: set[str]) -> str:
    """embeddings (and an untied lm_head), norms, targets, or other (a non-target weight of another kind)."""
    if name in targets:
        return "targets"
    if "embed" in name or "lm_head" in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    return "other"


def reference_answers(eval_dir: Path, max_prompts: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) pairs of REFERENCE's evaluation: every IFEval answer and every refusal it gave."""
    from ds_cl.evaluation.io import read_jsonl

    f = eval_dir / "responses_ifeval.jsonl"
    s = eval_dir / "safety.json"
    for p in (f, s):
        if not p.is_file():
            raise FileNotFoundError(f"--answers {eval_dir}: no {p.name} (a `ds-cl eval` folder of the reference)")
    ifeval = [(r["prompt"], r["response"]) for r in read_jsonl(f, "IFEval responses") if r["response"].strip()]
    refusals = [(r["prompt"], r["response"]) for r in json.loads(s.read_text())["per_prompt"]
                if r.get("verdict") == "refusal" and r["response"].strip()]
    return {"ifeval": ifeval[:max_prompts], "refusal": refusals[:max_prompts]}


def encode(tok, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Each pair as (token ids of prompt + answer + end-of-turn, index of the answer's first token)."""
    from ds_cl.evaluation.generate import format_prompt

    out = []
    for prompt, answer in pairs:
        p = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(((p + a)[:max_len], len(p)))
    return out


EARLY = 3  # answer tokens counted as "early" for eos_early


def score(model, tok, seqs: list[tuple[list[int], int]], batch_size: int) -> dict[str, float]:
    """Mean answer NLL per token; log of the mean end-of-turn probability inside the answers (before their
    end) and over their first EARLY tokens. Log of the mean, not mean of the logs: the pressure to stop
    shows at the few positions where stopping is plausible, which a mean of logs would drown."""
    import math

    import torch

    nll_sum = n_tok = eos_sum = n_in = early_sum = n_early = 0.0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s:s + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (x, _) in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        with torch.no_grad():  # right padding: a causal model's logits at real positions do not see it
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (x, start) in enumerate(batch):
            # position t predicts token t+1: the answer's tokens are x[start:], predicted at start-1 .. len-2
            pos = torch.arange(start - 1, len(x) - 1)
            tgt = torch.tensor(x[start:])
            nll_sum += float(-logp[i, pos, tgt].sum())
            n_tok += len(tgt)
            inside = pos[:-1] if x[-1] == tok.eos_token_id else pos  # the answer's own end is not "early"
            p_eos = logp[i, inside, tok.eos_token_id].exp()
            eos_sum += float(p_eos.sum())
            n_in += len(inside)
            early_sum += float(p_eos[:EARLY].sum())
            n_early += min(EARLY, len(inside))
    return {"nll": nll_sum / max(n_tok, 1), "eos_inside": math.log(max(eos_sum / max(n_in, 1), 1e-30)),
            "eos_early": math.log(max(early_sum / max(n_early, 1), 1e-30))}


def drift(reference: str, models: list[str], pairs: dict[str, list[tuple[str, str]]], *, max_len: int = 320,
          batch_size: int = 8, log=print) -> dict:
    """pairs: reference_answers' (prompt, answer) pairs, read by the caller before any model is loaded."""
    from ds_cl.core import subspace as S
    from ds_cl.evaluation.generate import load_model

    ref_model, tok = load_model(reference, "cpu", "float32")
    ref_sd = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    targets = set(S.select_targets(list(ref_sd)))
    seqs = {k: encode(tok, v, max_len) for k, v in pairs.items()}

    def measure(model) -> dict:
        i, r = score(model, tok, seqs["ifeval"], batch_size), score(model, tok, seqs["refusal"], batch_size)
        return {"eos_inside": i["eos_inside"], "eos_early": i["eos_early"], "ifeval_nll": i["nll"],
                "refusal_nll": r["nll"], "refusal_eos_early": r["eos_early"]}

    rows = [{"model": reference, "variant": "reference", **measure(ref_model)}]
    del ref_model
    for path in models:
        t0 = time.time()
        model, _ = load_model(path, "cpu", "float32")
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if set(trained) != set(ref_sd):
            raise ValueError(f"{path}: its parameters are not {reference}'s (a different architecture?)")
        kinds = {k: group_of(k, targets) for k in trained}
        moved = {k: float((trained[k] - ref_sd[k]).pow(2).sum()) for k in trained}  # each tensor's |dW|^2
        total = sum(moved.values())
        for variant in ("as trained",) + GROUPS:
            put_back = {k for k, g in kinds.items()
                        if variant == g or (variant == "non-targets" and g != "targets")}
            model.load_state_dict({k: ref_sd[k] if k in put_back else trained[k] for k in trained})
            share = sum(moved[k] for k in put_back) / total if total else 0.0
            rows.append({"model": path, "variant": variant if variant == "as trained" else f"{variant} put back",
                         "update_share_put_back": share, **measure(model)})
        log(f"[drift] {path}: {time.time() - t0:.0f}s")
        del model
    return {"reference": reference, "prompts": {k: len(v) for k, v in pairs.items()}, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Teacher-forced on the reference's answers ({result['prompts']['ifeval']} IFEval answers, "
             f"{result['prompts']['refusal']} refusals).", "",
             "| model | variant | share of the update put back | end-of-turn log mean prob. inside IFEval answers "
             f"| ... in their first {EARLY} tokens | IFEval answers NLL/token | refusals NLL/token | end-of-turn in the "
             f"refusals' first {EARLY} tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        share = f"{100 * r['update_share_put_back']:.1f} %" if "update_share_put_back" in r else ""
        lines.append(f"| {Path(r['model']).parent.name}/{Path(r['model']).name} | {r['variant']} | {share} | "
                     f"{r['eos_inside']:.2f} | {r['eos_early']:.2f} | {r['ifeval_nll']:.3f} | {r['refusal_nll']:.3f} | "
                     f"{r['refusal_eos_early']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl drift", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="the model the others started from (an HF folder)")
    p.add_argument("models", nargs="+", help="models trained from it (HF folders)")
    p.add_argument("--answers", type=Path, required=True,
                   help="a `ds-cl eval` folder of the reference: its IFEval answers and refusals are scored")
    p.add_argument("--max-prompts", type=int, default=60, help="answers of each kind scored (default 60)")
    p.add_argument("--out", type=Path, help="write the result as JSON here (and the table beside it, .md)")
    args = p.parse_args(argv)
    for m in [args.reference] + args.models:
        if not (Path(m) / "config.json").is_file():
            print(f"ds-cl drift: {m}: not a model folder (no config.json)", file=sys.stderr)
            return 2
    try:
        pairs = reference_answers(args.answers, args.max_prompts)  # before any model is loaded
        result = drift(args.reference, args.models, pairs)
        result["answers"] = str(args.answers)
    except (FileNotFoundError, ValueError) as e:
        print(f"ds-cl drift: {e}", file=sys.stderr)
        return 2
    md = markdown(result)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
