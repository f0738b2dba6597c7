"""Does this machine run two single-threaded processes in parallel? Time `matmul N` (N 1024 x 1024
matmuls) or `svd N` (N SVDs of 1024 x 1024 and 2752 x 1024 weights) in one process, then half the
work in each of two processes at once. On an idle 2-core machine the halves take half the time;
on a busy one they do not, and SVD-scaling figures from `ds-cl bench` mean nothing.

    python docs/scripts/core_check.py matmul 40
    python docs/scripts/core_check.py matmul 20 & python docs/scripts/core_check.py matmul 20; wait
    python docs/scripts/core_check.py svd 14
    python docs/scripts/core_check.py svd 7 & python docs/scripts/core_check.py svd 7; wait
"""
import sys
import time

import torch

torch.set_num_threads(1)
kind, n = sys.argv[1], int(sys.argv[2])
if kind == "matmul":
    a = torch.randn(1024, 1024)
    work = [lambda: a @ a] * n
elif kind == "svd":
    ws = [torch.randn(1024, 1024) for _ in range(n - 3 * n // 7)] + [torch.randn(2752, 1024) for _ in range(3 * n // 7)]
    work = [lambda w=w: torch.linalg.svd(w, full_matrices=False) for w in ws]
else:
    raise SystemExit("usage: core_check.py matmul|svd N")
t = time.perf_counter()
for f in work:
    f()
print(f"{n} {kind}s {time.perf_counter() - t:.2f}s", flush=True)
