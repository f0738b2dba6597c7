"""One process, one thread: the two-sided projection of one SmolLM2-135M decoder layer's seven target
matrices (batched per shape, as `SubspaceProjector` packs them), directly (8 m n r flops) and through
the short side's complement (`S.project_two_sided_via`, 4 (s - r)(m n + l r) flops), at the protected
ratios osft reaches on the demo's sequence. What a rank pays per projection is this times the layers it
owns (30 layers over the ranks), twice per optimizer step (gradient and update). docs/benchmarks.md.

    python docs/scripts/projection_cost.py
"""
import time

import torch

from ds_cl.core import subspace as S

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 key/value heads of 64.
shapes = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def bases(shape, k, r):
    u = torch.linalg.qr(torch.randn(k, shape[0], r, generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, shape[1], r, generator=g))[0]
    return u, v


def timed(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


print("ratio  direct (ms/layer)  via complement (ms/layer)  speed-up")
for ratio in (0.5, 0.6, 0.8, 0.9):
    direct = via = 0.0
    for shape, k in shapes.items():
        r = int(ratio * min(shape))
        u, v = bases(shape, k, r)
        grad = torch.randn(k, *shape, generator=g)
        side = S.complement_side(shape, r)
        c = S.complement(v if side == "right" else u) if side else None
        direct += timed(lambda: S.project(grad, u, v))
        via += timed(lambda: S.project_two_sided_via(grad, u, v, c, side) if side else S.project(grad, u, v))
    print(f"{ratio:5.1f}  {1000 * direct:17.1f}  {1000 * via:25.1f}  {direct / via:8.2f}x")
