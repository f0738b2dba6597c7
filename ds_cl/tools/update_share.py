"""`ds-cl update-share MODEL --reference REF`: where does the update that made MODEL from REF (e.g. a safety
alignment of a base model) live, as osft sees it? Before the first task osft protects, in every target matrix,
the top `--ratio` of the current weights' singular directions (two-sided: the update projection removes any
component touching them). This says, per matrix type, how much of the update's squared norm that first fit
protects, how many more directions `method.osft.protect_update_from` would add to hold `--energy` of the
rest, and how much of the update lies outside the targets (embeddings, norms, lm_head), which no subspace
protects. One process, no DeepSpeed; matrices read one at a time from the safetensors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def shares(model: str, reference: str, ratio: float, energy: float, targets=None, log=print) -> dict:
    import torch

    from ds_cl.core import subspace as S
    from ds_cl.training.config import OSFTConfig
    from ds_cl.training.modeling import SafetensorsWeights

    new, ref = SafetensorsWeights(model), SafetensorsWeights(reference)
    missing = sorted(set(new.files) - set(ref.files))
    if missing:
        raise ValueError(f"{reference} lacks {len(missing)} of {model}'s tensors (first: {missing[0]})")
    names = S.select_targets(list(new.files), targets)
    rows = []
    other = {"update_sq": 0.0, "weights_sq": 0.0}
    t0 = time.time()
    for i, n in enumerate(sorted(new.files)):
        w, w0 = new.read(n).double(), ref.read(n).double()
        if w.shape != w0.shape:
            raise ValueError(f"{n}: shape {tuple(w.shape)} in {model}, {tuple(w0.shape)} in {reference}")
        d = w - w0
        if n not in names:
            other["update_sq"] += float((d * d).sum())
            other["weights_sq"] += float((w0 * w0).sum())
            continue
        r = S.FixedRank(ratio).rank(w.shape)  # as osft's first fit without importance data
        u, v = S.svd_bases(w, r, dtype=torch.float64)
        rest = S.project(d, u.double(), v.double(), "two_sided")
        total, left = float((d * d).sum()), float((rest * rest).sum())
        room = max(0, S.max_protected_rank(w.shape, OSFTConfig.max_protected_ratio) - r)
        # what is left at the fp32 bases' rounding level (an update inside the fit) needs no directions
        added = S.update_directions(rest, energy, room)[0].shape[1] if left > 1e-10 * total else 0
        rows.append({"name": n, "kind": re.sub(r".*\.", "", n.removesuffix(".weight")), "update_sq": total,
                     "left_sq": left, "weights_sq": float((w0 * w0).sum()),
                     "protected_by_fit": 1 - left / total if total else 1.0, "directions_to_add": added,
                     "directions": min(w.shape), "fit_rank": r})
        if log and (i + 1) % 50 == 0:
            log(f"[update-share] {i + 1}/{len(new.files)} tensors, {time.time() - t0:.0f}s")
    targets_sq = sum(r["update_sq"] for r in rows)
    return {"model": model, "reference": reference, "ratio": ratio, "energy": energy,
            "max_protected_ratio": OSFTConfig.max_protected_ratio, "targets": len(rows),
            "relative_update_targets": (targets_sq / sum(r["weights_sq"] for r in rows)) ** 0.5 if rows else 0.0,
            **_pooled(rows),
            "outside_targets": other["update_sq"] / (other["update_sq"] + targets_sq) if targets_sq else 0.0,
            "relative_update_outside": (other["update_sq"] / other["weights_sq"]) ** 0.5 if other["weights_sq"] else 0.0,
            "per_type": {k: {**_pooled(g), "matrices": len(g)}
                         for k, g in sorted(_by_kind(rows).items())},
            "per_matrix": rows}


def _by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["kind"], []).append(r)
    return out


def _pooled(rows: list[dict]) -> dict:
    """Over matrices: the share of the update's squared norm the first fit protects, and the directions
    to add as a share of all directions."""
    update = sum(r["update_sq"] for r in rows)
    return {"protected_by_fit": 1 - sum(r["left_sq"] for r in rows) / update if update else 1.0,
            "directions_to_add": sum(r["directions_to_add"] for r in rows) / max(1, sum(r["directions"] for r in rows))}


def markdown(res: dict) -> str:
    lines = [f"Update {res['reference']} -> {res['model']}: |dW| / |W| = {res['relative_update_targets']:.4f} in the "
             f"{res['targets']} targets, {res['relative_update_outside']:.4f} outside them; "
             f"{100 * res['outside_targets']:.1f} % of |dW|^2 lies outside the targets.",
             f"The first fit (top {res['ratio']:.0%} of each target's directions) protects "
             f"{100 * res['protected_by_fit']:.1f} % of the targets' |dW|^2; protecting {res['energy']:.0%} of the rest "
             f"adds {100 * res['directions_to_add']:.1f} % of the directions (within max_protected_ratio "
             f"{res['max_protected_ratio']}).", "",
             "| matrix | protected by the first fit | directions to add | matrices |", "|---|---|---|---|"]
    for k, t in res["per_type"].items():
        lines.append(f"| {k} | {100 * t['protected_by_fit']:.1f} % | {100 * t['directions_to_add']:.1f} % | {t['matrices']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl update-share", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder (safetensors): the weights osft would start from")
    p.add_argument("--reference", required=True, help="model folder of the weights MODEL was tuned from")
    p.add_argument("--ratio", type=float, default=0.5, help="the first fit's retained fraction (method.osft.ratio)")
    p.add_argument("--energy", type=float, default=0.99, help="method.osft.update_energy")
    p.add_argument("--json", type=Path, help="also write the full result (per matrix) here")
    args = p.parse_args(argv)
    for f, what in ((args.model, "MODEL"), (args.reference, "--reference")):
        if not Path(f).expanduser().is_dir():
            print(f"ds-cl update-share: {what}: no such model folder: {f}", file=sys.stderr)
            return 2
    if not 0 <= args.ratio <= 1 or not 0 <= args.energy <= 1:
        print("ds-cl update-share: --ratio and --energy must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        res = shares(str(Path(args.model).expanduser()), str(Path(args.reference).expanduser()), args.ratio,
                     args.energy, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, KeyError, OSError) as e:
        print(f"ds-cl update-share: {e}", file=sys.stderr)
        return 2
    print(markdown(res), end="")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
