"""cuSOLVER's SVD drivers at LLaMA-2-7B's target shapes, on one GPU: time and accuracy of the top-r subspace.

    python docs/scripts/svd_driver_gpu.py [--out FILE.json]

`ds_cl.core.subspace.svd` asks for the QR-based `gesvd` on CUDA (torch's default tries the Jacobi
`gesvdj` first). This measures what that choice costs and buys on the shapes osft fits at a task boundary:
4096 x 4096 (q, k, v, o) and 11008 x 4096 (gate, up; down is its transpose), fp32 for `fit` (rank 2048,
half the directions) and float64 for `extend` (the update's directions). The matrices are random with a
decaying spectrum (singular values 1/(1 + i/64), a long tail like trained weights'); the reference
subspace is a float64 `gesvd`. Accuracy: the largest principal-angle sine between each driver's top-r
left subspace and the reference's, ||(I - U U^T) U_ref||_2. Prints one JSON.
"""
import argparse
import json
import time

import torch


def matrix(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float64) / 64)
    return (q1 * s) @ q2.T


def timed(fn, reps: int = 1) -> tuple[float, object]:
    out = fn()  # warm-up: the first call pays cuSOLVER's set-up and workspace
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, n in ((4096, 4096), (11008, 4096)):
        a64 = matrix(m, n, gen).cuda()
        r = min(m, n) // 2
        t_ref, (u_ref, _, _) = timed(lambda: torch.linalg.svd(a64, full_matrices=False, driver="gesvd"), reps=1)
        u_ref = u_ref[:, :r]
        for dtype in (torch.float32, torch.float64):
            a = a64.to(dtype)
            for driver in ("gesvd", None):  # None: torch's default (gesvdj first)
                t, (u, _, _) = timed(lambda: torch.linalg.svd(a, full_matrices=False, driver=driver))
                u = u[:, :r].double()
                err = torch.linalg.matrix_norm(u_ref - u @ (u.T @ u_ref), ord=2).item()
                rows.append({"shape": [m, n], "dtype": str(dtype).removeprefix("torch."),
                             "driver": driver or "default", "seconds": round(t, 3),
                             "subspace_sin_max": err, "rank": r})
                print(json.dumps(rows[-1]), flush=True)
        rows.append({"shape": [m, n], "reference": "float64 gesvd", "seconds": round(t_ref, 3)})
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
