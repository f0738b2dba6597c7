"""Print the README's exactness table: every projector case on real CPU ranks against the one-process run.

    DS_ACCELERATOR=cpu python -m tests.exactness_report        (about 1 minute on 2 cores)

The same runs and checks as tests/test_projector_zero.py, reported as numbers instead of asserted.
"""

import sys
import tempfile
from pathlib import Path

import torch

from ds_cl.core import subspace as S
from tests.dist_utils import REPO, launch
from tests.reference import fixed_bases, reference_run, tiny_llama

# case, world, reference options
CASES = [("z3", 2, {}), ("z3_nooverlap", 3, {}), ("z3_buckets", 3, {}), ("z3_offload", 2, {}), ("z2", 2, {}), ("z0", 1, {}),
         ("z3_bf16", 2, {}), ("z3_paper", 2, {"projection": "paper"}), ("z3_noupdate", 2, {"project_update": False})]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bases = fixed_bases(tiny_llama())
        torch.save(bases, out / "bases.pt")
        script = REPO / "tests" / "projector_ranks.py"
        for world in sorted({w for _, w, _ in CASES}):
            launch(script, world, out, *[c for c, w, _ in CASES if w == world])
        print("| case | ranks | weights vs one-process run (max relative) | leak of the trained change | audit() max |")
        print("|---|---|---|---|---|")
        for case, world, kw in CASES:
            got = torch.load(out / f"{case}.pt", weights_only=False)
            ref, _, _ = reference_run(world, bases, **kw)
            # bf16: DeepSpeed's fp32 masters start from the bf16-cast model.
            init = {n: p.detach().bfloat16().float() if case == "z3_bf16" else p.detach()
                    for n, p in tiny_llama().named_parameters()}
            rel = max(float((got["weights"][n] - w).norm() / w.norm()) for n, w in ref.items())
            measured = max(S.leak(got["weights"][n] - init[n], u, v) for n, (u, v) in bases.items())
            audited = max(max(step.values()) for step in got["leaks"])
            print(f"| {case} | {world} | {rel:.1e} | {measured:.1e} | {audited:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
