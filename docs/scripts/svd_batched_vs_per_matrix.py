"""One process, one thread: per-matrix SVD against one batched call per shape, on the `medium`
bench model's target shapes. Why `fit` takes one SVD per matrix (docs/benchmarks.md).

    python docs/scripts/svd_batched_vs_per_matrix.py
"""
import time

import torch

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
shapes = {(1024, 1024): 8, (2752, 1024): 4, (1024, 2752): 2}
mats = {s: [torch.randn(*s, generator=g) / 32 for _ in range(k)] for s, k in shapes.items()}


def per_matrix():
    for ms in mats.values():
        for m in ms:
            torch.linalg.svd(m, full_matrices=False)


def batched():
    for ms in mats.values():
        torch.linalg.svd(torch.stack(ms), full_matrices=False)


per_matrix(), batched()  # warm-up: the first LAPACK calls pay one-time set-up
res = {"per_matrix": [], "batched": []}
for _ in range(4):
    for name, fn in (("per_matrix", per_matrix), ("batched", batched)):
        t = time.perf_counter()
        fn()
        res[name].append(time.perf_counter() - t)
for k, v in res.items():
    print(k, " ".join(f"{x:.2f}" for x in v), "median %.2f" % sorted(v)[len(v) // 2])
