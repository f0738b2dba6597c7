"""Subspace maths of "Sculpting Subspaces" (arXiv 2504.07097) on full matrices, in one process.

Nothing here knows about DeepSpeed: `ds_cl.core.projector` moves sharded gradients and weights to the
rank that owns a matrix and calls these functions on the full m x n view.

For a target weight W = U S V^T we keep r top singular directions, U_h = U[:, :r], V_h = V[:, :r]
(the "high" subspace), and constrain every update dW of the next task by

* ``two_sided`` (default): dW' = (I - U_h U_h^T) dW (I - V_h V_h^T), so U_h^T dW' = 0 and dW' V_h = 0.
  This is the subspace the authors' released trainers enforce.
* ``paper``: dW' = dW - U_h U_h^T dW V_h V_h^T, the formula printed in the paper. It only removes the
  high-high block, a weaker constraint: U_h^T dW' need not vanish.

Rank policies give r per matrix as a fraction of min(m, n):

* ``FixedRank(ratio)``: one ratio for every matrix.
* ``AdaptiveRank(mrr, trr)``: the paper's r_l = mrr + I_l (trr - mrr) with layer importance I_l in [0, 1].
  I_l comes from c_l = mean over (unmasked) tokens of cos(x_in, x_out) of decoder layer l. The paper
  leaves the normalisation open; we use min-max over the layers of the model,
  I_l = (c_l - min_k c_k) / (max_k c_k - min_k c_k), so the least similar layer keeps mrr and the most
  similar keeps trr. When every layer has the same c (or there is one layer) all get I = 1: with no
  evidence to tell layers apart, protect as much as the policy allows. ``normalize="none"`` uses
  I_l = clamp(c_l, 0, 1) instead.

Accumulating the subspace (ds-cl's variant, `update_directions` / `extend_bases`): instead of refitting
U_h, V_h from the current W at each task boundary, keep them and add the top singular directions of the
finished task's update dW = W_after - W_before. Under the two-sided constraint dW already lies in the
complement of the protected subspace on both sides, so its directions extend the bases exactly, and
the next task cannot move what the previous one wrote. A refit cannot do that: the finished task's
update is small and sits in the low singular directions that the refit leaves free.

Protecting the finished task's inputs instead (`input_directions` / `output_directions`), as gradient
projection memory (GPM) does: with C = sum x x^T over the inputs x that the task fed a Linear layer
(y = W x), any later dW with dW x = 0 leaves the layer's outputs on those inputs unchanged, so the right
basis grows by the top eigenvectors of C outside V_h. The projector keeps as many left directions as
right ones per matrix, so the left basis grows by as many directions: those of the outputs W v_d that
the protected inputs produce now. GPM constrains the input side only; the left side here is an extra
constraint, kept for the equal ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

log = logging.getLogger("ds_cl.core.subspace")

PROJECTIONS = ("two_sided", "paper")

# Attention q/k/v/o and MLP gate/up/down of LLaMA-style models; never embeddings, lm_head, norms, biases.
DEFAULT_TARGET_PATTERNS = (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$",)

# "model.layers.12.self_attn.q_proj.weight" -> "model.layers.12": the decoder layer a parameter lives in.
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer)\.\d+)\.")


@contextlib.contextmanager
def full_fp32():
    """Full fp32 matmuls inside, whatever the host script set: GPU training code often enables TF32
    (`torch.backends.cuda.matmul.allow_tf32 = True`, `torch.set_float32_matmul_precision("high")`),
    whose 10-bit mantissa would leave ~1e-3 of a projected update in the protected subspace; "medium"
    also lets oneDNN use bf16 on CPUs that have it."""
    # torch >= 2.9 keeps the setting per backend (fp32_precision); reading the legacy global after a
    # mix of the two APIs raises, so use the per-backend one where it exists.
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if backends:
        saved = [b.fp32_precision for b in backends]
        # The legacy global too: cuBLAS's TF32 check (every fp32 GEMM on a GPU) reads both, and raises
        # ("mix of the legacy and new APIs") when a host's allow_tf32 / "high" meets a per-backend "ieee".
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # already mixed by the host: nothing readable to restore
            legacy = None
        try:
            torch.set_float32_matmul_precision("highest")
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            if legacy is not None:
                torch.set_float32_matmul_precision(legacy)
            for b, value in zip(backends, saved):
                b.fp32_precision = value
        return
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _in_full_fp32(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_fp32():
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class FixedRank:
    """Keep ``ratio`` x min(m, n) top directions of every target (the authors' production default is 0.75)."""

    ratio: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"FixedRank.ratio must be in [0, 1], got {self.ratio}")

    needs_importance = False

    def rank(self, shape: Sequence[int], importance: float | None = None) -> int:
        return _ratio_to_rank(self.ratio, shape, self.ratio, self.ratio)


@dataclass(frozen=True)
class AdaptiveRank:
    """The paper's adaptive rank: ratio = mrr + importance * (trr - mrr), importance in [0, 1]."""

    mrr: float = 0.1
    trr: float = 0.8
    normalize: str = "minmax"

    def __post_init__(self):
        if not 0.0 <= self.mrr <= self.trr <= 1.0:
            raise ValueError(f"AdaptiveRank needs 0 <= mrr <= trr <= 1, got mrr={self.mrr}, trr={self.trr}")
        if self.normalize not in ("minmax", "none"):
            raise ValueError(f"AdaptiveRank.normalize must be 'minmax' or 'none', got {self.normalize!r}")

    needs_importance = True

    def ratio(self, importance: float) -> float:
        if not 0.0 <= importance <= 1.0 or math.isnan(importance):
            raise ValueError(f"layer importance must be in [0, 1], got {importance}")
        return self.mrr + importance * (self.trr - self.mrr)

    def rank(self, shape: Sequence[int], importance: float | None = None) -> int:
        if importance is None:
            raise ValueError("AdaptiveRank needs a layer importance; give importance batches to fit()")
        return _ratio_to_rank(self.ratio(importance), shape, self.mrr, self.trr)


def rank_policy_from(spec) -> FixedRank | AdaptiveRank:
    """Accept a policy object, "fixed"/"adaptive" (defaults), or a dict {"policy": ..., **options}."""
    if isinstance(spec, (FixedRank, AdaptiveRank)):
        return spec
    if isinstance(spec, str):
        spec = {"policy": spec}
    if isinstance(spec, Mapping):
        opts = dict(spec)
        kind = opts.pop("policy", None)
        if kind == "fixed":
            return FixedRank(**opts)
        if kind == "adaptive":
            return AdaptiveRank(**opts)
        raise ValueError(f"rank policy must be 'fixed' or 'adaptive', got {kind!r}")
    raise TypeError(f"rank_policy must be FixedRank, AdaptiveRank, 'fixed', 'adaptive' or a dict, got {type(spec)}")


def _ratio_to_rank(ratio: float, shape: Sequence[int], lo: float, hi: float) -> int:
    k = min(int(shape[0]), int(shape[1]))
    # Rounding could step outside [lo, hi] x k by half a direction; clamp so policies keep their bounds.
    r = round(ratio * k)
    return int(min(max(r, math.ceil(lo * k - 1e-9)), math.floor(hi * k + 1e-9)))


def max_protected_rank(shape: Sequence[int], max_ratio: float) -> int:
    """The most directions the accumulating subspace protects in an m x n matrix: max_ratio x min(m, n),
    rounded down (float tolerance: 0.9 x 10 is 9, not 8)."""
    return math.floor(max_ratio * min(int(shape[0]), int(shape[1])) + 1e-9)


def layer_importance(cos_sum: Mapping[str, float], count: Mapping[str, float],
                     normalize: str = "minmax") -> dict[str, float]:
    """Importance per layer from summed token cosines and token counts (already reduced over ranks)."""
    if not cos_sum:
        raise ValueError("no decoder layer saw any token: importance batches are empty or all masked")
    mean = {}
    for layer, s in cos_sum.items():
        n = count[layer]
        if n <= 0:
            raise ValueError(f"layer {layer} saw no unmasked token in the importance batches")
        mean[layer] = float(s) / float(n)
    if normalize == "none":
        return {k: min(max(v, 0.0), 1.0) for k, v in mean.items()}
    lo, hi = min(mean.values()), max(mean.values())
    if hi - lo <= 1e-12:
        return {k: 1.0 for k in mean}
    return {k: (v - lo) / (hi - lo) for k, v in mean.items()}


def token_cosine_sum(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    """Sum over unmasked tokens of cos(x_in, x_out) along the hidden dimension, and the token count."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)
    if mask is not None:
        m = mask.to(cos.dtype)
        return float((cos * m).sum()), float(m.sum())
    return float(cos.sum()), float(cos.numel())


def layer_of(param_name: str) -> str | None:
    """The decoder-layer prefix a parameter belongs to, e.g. 'model.layers.3', or None."""
    m = _LAYER_RE.match(param_name)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------- targets
def select_targets(names: Iterable[str], patterns: Sequence[str] | None = None) -> list[str]:
    """Names matching any pattern (regex, `re.search`), in the given order.

    A pattern that matches nothing is an error naming it: a typo would otherwise leave a model
    silently unconstrained.
    """
    names = list(names)
    patterns = list(DEFAULT_TARGET_PATTERNS if patterns is None else patterns)
    if not patterns:
        raise ValueError("targets is empty: give at least one module-name pattern")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"target pattern {p!r} is not a valid regular expression: {e}") from None
    for p, c in zip(patterns, compiled):
        if not any(c.search(n) for n in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"target pattern {p!r} matches no parameter (parameters: {sample})")
    return [n for n in names if any(c.search(n) for c in compiled)]


# ------------------------------------------------------------------------------------------------- SVD
def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.linalg.svd(a, full_matrices=False)`: every SVD of the maths goes through here.

    On CUDA torch's default driver is cuSOLVER's Jacobi gesvdj (gesvd only if it fails), which torch
    documents as losing precision on ill-conditioned matrices; weights and task updates are that (a long
    tail of tiny singular values), so ask for the QR-based gesvd, the accurate one. `driver=` is refused
    for other inputs, hence only on CUDA. Its speed at 7B shapes is not measured yet (docs/benchmarks.md).
    """
    if a.is_cuda:
        return torch.linalg.svd(a, full_matrices=False, driver="gesvd")
    return torch.linalg.svd(a, full_matrices=False)


@_in_full_fp32
def svd_bases(weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` left and right singular vectors (U_h: m x r, V_h: n x r) of `weight`, returned in fp32.

    `dtype=torch.float64` computes the SVD in double precision (slower, for ill-conditioned weights).
    A driver that fails to converge is retried in float64 before giving up.
    """
    if weight.dim() != 2:
        raise ValueError(f"SVD needs a 2-D weight, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside [0, min(m, n) = {min(m, n)}] for a {m} x {n} weight")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries; refusing to fit bases from it")
    try:
        u, _, vh = svd(weight.to(dtype))
    except RuntimeError as e:
        if dtype == torch.float64:
            raise
        log.warning("SVD of a %s weight failed in %s (%s); retrying in float64", tuple(weight.shape), dtype, e)
        u, _, vh = svd(weight.to(torch.float64))
    return u[:, :rank].float().contiguous(), vh[:rank].T.float().contiguous()


@_in_full_fp32
def update_directions(dw: torch.Tensor, energy: float, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular directions of an update dW (m x n) holding `energy` of its squared Frobenius norm,
    at most `max_rank` of them: (U_d m x k, V_d n x k) in fp32. A zero update gives k = 0."""
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    if not torch.isfinite(dw).all():
        raise ValueError("update has non-finite entries; refusing to fit bases from it")
    m, n = dw.shape
    u, s, vh = svd(dw.double())
    total = float((s * s).sum())
    if total <= 0.0 or energy == 0.0 or max_rank <= 0:
        return dw.new_zeros(m, 0, dtype=torch.float32), dw.new_zeros(n, 0, dtype=torch.float32)
    share = torch.cumsum(s * s, 0) / total
    # The smallest k whose directions hold `energy` of the update (float tolerance on the last step);
    # the threshold on share's device, as searchsorted needs.
    k = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype, device=share.device))) + 1
    k = min(k, max_rank, int((s > s[0] * 1e-6).sum()))
    return u[:, :k].float().contiguous(), vh[:k].T.float().contiguous()


@_in_full_fp32
def input_directions(cov: torch.Tensor, v_h: torch.Tensor, energy: float, max_rank: int) -> torch.Tensor:
    """Right directions that protect a finished task's layer inputs (GPM): with C = sum x x^T over the
    inputs x the task fed the layer (n x n) and P = I - V_h V_h^T, the top eigenvectors of P C P, as many
    as hold `energy` of its trace, at most `max_rank` and at most its numerical rank. Returns V_d (n x k):
    orthonormal, orthogonal to V_h, on C's device in V_h's dtype; k = 0 when nothing outside V_h is left.

    In float64 whatever C's dtype: what P C P keeps can be orders of magnitude below C itself when V_h
    already holds most of the inputs, and float32's rounding of C (~1e-7 of it) would then be all of it.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    n = cov.shape[0]
    if cov.dim() != 2 or cov.shape[1] != n or v_h.shape[0] != n:
        raise ValueError(f"the input covariance must be n x n with V_h n x r, got {tuple(cov.shape)} and "
                         f"{tuple(v_h.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError("the input covariance has non-finite entries; refusing to fit bases from it")
    c = cov.double()
    # Below this, rounding: of the projection (~n x 1e-16 of |C| where V_h holds the inputs), or of C
    # itself when it comes in a lower precision (10 ulps of its dtype).
    floor = max(1e-10, 10 * torch.finfo(cov.dtype).eps) * float(torch.linalg.matrix_norm(c))
    v = v_h.to(c.device, torch.float64)
    c = c - v @ (v.T @ c)
    c = c - (c @ v) @ v.T
    # eigh reads one triangle: symmetrise what rounding left unsymmetric.
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)  # largest first
    # The eigenvalues of C are squared singular values of the inputs, so the 1e-12 cut relative to the
    # largest is update_directions' 1e-6 on singular values.
    evals = torch.where(evals > max(floor, float(evals[0]) * 1e-12), evals, 0.0)
    total = float(evals.sum())
    if total <= 0.0 or max_rank <= 0:
        return c.new_zeros(n, 0).to(v_h.dtype)
    share = torch.cumsum(evals, 0) / total
    # The smallest k holding `energy` (float tolerance on the last step).
    k = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype, device=share.device))) + 1
    k = min(k, max_rank, int((evals > 0).sum()))
    d = evecs[:, :k]
    # Eigenvectors of P C P are orthogonal to V_h only up to rounding: one more pass, then re-orthonormalise.
    d, _ = torch.linalg.qr(d - v @ (v.T @ d))
    return d.to(v_h.dtype).contiguous()


@_in_full_fp32
def output_directions(w: torch.Tensor, u_h: torch.Tensor, v_d: torch.Tensor) -> torch.Tensor:
    """Left directions to pair with the input directions V_d (n x k) of an m x n weight W: an orthonormal
    basis (m x k) of the outputs (I - U_h U_h^T) W V_d that the protected inputs produce now, orthogonal
    to U_h. Where those outputs span fewer than k directions (W V_d rank-deficient, or inside U_h), the
    basis is completed with seeded random directions orthogonal to U_h: the projector needs as many left
    directions as right ones (its packs share one rank per matrix), and any direction outside U_h keeps
    the constraint valid. On W's device in U_h's dtype.
    """
    m, n = w.shape
    k, r = v_d.shape[1], u_h.shape[1]
    if v_d.shape[0] != n or u_h.shape[0] != m:
        raise ValueError(f"W is {m} x {n}, so U_h must be {m} x r and V_d {n} x k; got U_h "
                         f"{tuple(u_h.shape)}, V_d {tuple(v_d.shape)}")
    if k > m - r:
        raise ValueError(f"{k} new directions do not fit beside the {r} protected ones in {m} rows")
    u = u_h.to(w.device, torch.float64)
    if k == 0:
        return u.new_zeros(m, 0).to(u_h.dtype)
    y = w.double() @ v_d.to(w.device, torch.float64)
    y = y - u @ (u.T @ y)
    q, s, _ = svd(y)
    keep = int((s > s[0] * 1e-6).sum()) if float(s[0]) > 0.0 else 0
    basis = q[:, :keep]
    if keep < k:
        g = torch.Generator(device=w.device).manual_seed(0)
        extra = torch.randn(m, k - keep, generator=g, dtype=torch.float64, device=w.device)
        basis = torch.cat([basis, extra], dim=1)
    # Two passes of "project away from U_h, orthonormalise": the second removes the first's rounding.
    for _ in range(2):
        basis, _ = torch.linalg.qr(basis - u @ (u.T @ basis))
    return basis.to(u_h.dtype).contiguous()


@_in_full_fp32
def extend_bases(u_h: torch.Tensor, v_h: torch.Tensor, u_d: torch.Tensor,
                 v_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of span[U_h, U_d] and span[V_h, V_d], the first columns spanning U_h / V_h.

    U_d, V_d come from an update projected away from U_h, V_h, so they are orthogonal to them up to
    rounding; one Gram-Schmidt pass in float64 removes the rounding, so bases stay orthonormal to 1e-12
    however many tasks add to them.
    """
    def grow(b, d):
        d = d.double() - b.double() @ (b.double().T @ d.double())
        q, _ = torch.linalg.qr(d)
        return torch.cat([b, q.to(b.dtype)], dim=1).contiguous()

    if u_d.shape[1] != v_d.shape[1]:
        raise ValueError(f"U_d has {u_d.shape[1]} columns but V_d has {v_d.shape[1]}")
    if u_d.shape[1] == 0:
        return u_h, v_h
    return grow(u_h, u_d), grow(v_h, v_d)


def check_bases(name: str, shape: Sequence[int], u_h: torch.Tensor, v_h: torch.Tensor, tol: float = 1e-4) -> None:
    """Raise a ValueError naming `name` unless (U_h, V_h) are orthonormal bases fitting an m x n weight."""
    m, n = int(shape[0]), int(shape[1])
    if u_h.dim() != 2 or v_h.dim() != 2:
        raise ValueError(f"{name}: bases must be 2-D, got U_h {tuple(u_h.shape)}, V_h {tuple(v_h.shape)}")
    if u_h.shape[0] != m or v_h.shape[0] != n:
        raise ValueError(f"{name}: weight is {m} x {n}, so U_h must be {m} x r and V_h {n} x r; "
                         f"got U_h {tuple(u_h.shape)}, V_h {tuple(v_h.shape)}")
    if u_h.shape[1] != v_h.shape[1]:
        raise ValueError(f"{name}: U_h has {u_h.shape[1]} columns but V_h has {v_h.shape[1]}")
    r = u_h.shape[1]
    if r > min(m, n):
        raise ValueError(f"{name}: rank {r} > min(m, n) = {min(m, n)}")
    for label, b in (("U_h", u_h), ("V_h", v_h)):
        if not b.is_floating_point() or not torch.isfinite(b).all():
            raise ValueError(f"{name}: {label} must be finite floating point")
        if r:
            err = (b.double().T @ b.double() - torch.eye(r, dtype=torch.float64, device=b.device)).abs().max().item()
            if err > tol:
                raise ValueError(f"{name}: {label} is not orthonormal (max |B^T B - I| = {err:.2e} > {tol:.0e})")


# ------------------------------------------------------------------------------------------ projection
@_in_full_fp32
def project(g: torch.Tensor, u_h: torch.Tensor, v_h: torch.Tensor, kind: str = "two_sided") -> torch.Tensor:
    """Project an m x n update (or a batch b x m x n with batched bases) away from the high subspace.

    two_sided costs ~8 m n r flops: A = U^T G; G1 = G - U A; B = G1 V; G' = G1 - B V^T.
    """
    if u_h.shape[-1] == 0:
        return g
    ut = u_h.transpose(-1, -2)
    if kind == "two_sided":
        g1 = g - u_h @ (ut @ g)
        return g1 - (g1 @ v_h) @ v_h.transpose(-1, -2)
    if kind == "paper":
        return g - u_h @ ((ut @ g) @ v_h) @ v_h.transpose(-1, -2)
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


def complement_side(shape: Sequence[int], r: int) -> str | None:
    """Which side's complement makes the two-sided projection cheaper, or None.

    With s = min(m, n), l = max(m, n): 8 m n r flops directly, 4 (s - r)(m n + l r) through the
    orthonormal complement of the short side's basis (s - r columns). The complement wins for
    r > (sqrt(2) - 1) s: at r = s/2 it needs 3/4 of the flops, at 0.8 s a quarter, at 0.9 s a tenth.
    """
    m, n = int(shape[0]), int(shape[1])
    s, l = min(m, n), max(m, n)
    if r == 0 or 4 * (s - r) * (m * n + l * r) >= 8 * m * n * r:
        return None
    return "right" if m >= n else "left"


@_in_full_fp32
def complement(q: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (k x (k - r), or batched) of the complement of the orthonormal columns q (k x r):
    the trailing columns of q's complete QR (Householder: orthogonal to q to working precision)."""
    full, _ = torch.linalg.qr(q, mode="complete")
    # A copy: a view would keep all k x k of Q alive where k x (k - r) is needed.
    return full[..., q.shape[-1]:].contiguous()


@_in_full_fp32
def project_two_sided_via(g: torch.Tensor, u_h: torch.Tensor, v_h: torch.Tensor, c: torch.Tensor,
                          side: str) -> torch.Tensor:
    """`project(g, u_h, v_h, "two_sided")` through the short side's complement c (see `complement_side`):
    side "right" (m >= n), c = complement(v_h): (I - U U^T) (G C) C^T; side "left", c = complement(u_h):
    C ((C^T G)(I - V V^T)). Same result, since C C^T = I - V V^T (or I - U U^T)."""
    if side == "right":
        x = g @ c
        x = x - u_h @ (u_h.transpose(-1, -2) @ x)
        return x @ c.transpose(-1, -2)
    if side == "left":
        x = c.transpose(-1, -2) @ g
        x = x - (x @ v_h) @ v_h.transpose(-1, -2)
        return c @ x
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def leak(dw: torch.Tensor, u_h: torch.Tensor, v_h: torch.Tensor) -> float:
    """max(|U_h^T dW|, |dW V_h|) / |dW| (Frobenius); 0 for a zero update or empty bases."""
    return float(leaks(dw.unsqueeze(0), u_h.unsqueeze(0), v_h.unsqueeze(0))[0])


@_in_full_fp32
def leaks(dw: torch.Tensor, u_h: torch.Tensor, v_h: torch.Tensor) -> torch.Tensor:
    """`leak` of a batch b x m x n with bases b x m x r and b x n x r, as a float64 tensor of b values.

    Stays on the device (no host sync), so a training step can audit every matrix and read the
    values once. In float64: a leak of ~1e-7 is below what float32 products resolve.
    """
    if u_h.shape[-1] == 0:
        return torch.zeros(dw.shape[0], dtype=torch.float64, device=dw.device)
    d = dw.double()
    norm = torch.linalg.vector_norm(d, dim=(-2, -1))
    a = torch.linalg.vector_norm(u_h.double().transpose(-1, -2) @ d, dim=(-2, -1))
    b = torch.linalg.vector_norm(d @ v_h.double(), dim=(-2, -1))
    return torch.where(norm > 0, torch.maximum(a, b) / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
