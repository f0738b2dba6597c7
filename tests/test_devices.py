"""Every tensor the maths makes takes the device of the data it meets (issue 31).

No GPU here, so the behavioural tests run the maths on CPU data with the default device set to "meta":
a factory call without `device=` then makes a meta tensor, and the next op that meets the real data
fails, as a host tensor meeting CUDA data does on a GPU. The structural test reads the sources for
factory calls without `device=`, which the behavioural ones only catch on the paths they run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ds_cl.core import subspace as S

PKG = Path(__file__).resolve().parents[1] / "ds_cl"
FACTORIES = ("tensor", "eye", "zeros", "ones", "arange", "empty", "full", "linspace", "rand", "randn",
             "randint", "randperm")


def meta():
    """Default device "meta" inside (restored on exit): a tensor made without the data's device is meta."""
    return torch.device("meta")


def rand(*shape, seed=0, dtype=torch.float32):
    """Test data, on the host whatever the default device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype, device="cpu")


def assert_cpu(*tensors):
    for t in tensors:
        assert t.device.type == "cpu" and bool(torch.isfinite(t).all()), t.device


# ------------------------------------------------------------------------------------ behaviour
def test_meta_default_device_catches_a_factory_without_device():
    """The premise of the tests below: inside, a factory without device= gives a tensor that fails next to
    the data."""
    x = torch.randn(3, 3)
    with meta():
        assert torch.zeros(3).is_meta and torch.zeros(3, device=x.device).device.type == "cpu"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (x - torch.eye(3, dtype=x.dtype)).abs().max().item()


def test_fit_project_and_leak_keep_the_data_device():
    ws = [rand(37, 51, seed=1), rand(20, 12, seed=2), rand(16, 16, seed=3, dtype=torch.float64)]
    with meta():
        for k, w in enumerate(ws):
            r = min(w.shape) // 2
            u, v = S.svd_bases(w, r, torch.float64 if k == 1 else torch.float32)
            assert_cpu(u, v)
            g = rand(*w.shape, seed=10 + k, dtype=w.dtype)
            p = S.project(g, u.to(w.dtype), v.to(w.dtype))
            assert_cpu(p)
            assert S.leak(p, u, v) < 1e-5 and S.leak(g, u, v) > 0.1
            side = S.complement_side(w.shape, r) or "right"
            c = S.complement(v if side == "right" else u)
            via = S.project_two_sided_via(g.float(), u, v, c, side)
            assert torch.allclose(via, p.float(), atol=1e-4)
            assert_cpu(S.leaks(p.unsqueeze(0), u.unsqueeze(0), v.unsqueeze(0)))
            empty = S.leaks(p.unsqueeze(0), u[None, :, :0], v[None, :, :0])  # no bases: zeros of the data's device
            assert_cpu(empty)
            assert empty.tolist() == [0.0]


def test_update_directions_and_extend_keep_the_data_device():
    w = rand(30, 24, seed=4)
    with meta():
        u, v = S.svd_bases(w, 6)
        dw = S.project(rand(30, 3, seed=5) @ rand(3, 24, seed=6), u, v)  # a rank-3 update off the bases
        u_d, v_d = S.update_directions(dw, 0.99, 10)
        assert_cpu(u_d, v_d)
        assert u_d.shape == (30, 3) and v_d.shape == (24, 3)
        u2, v2 = S.extend_bases(u, v, u_d, v_d)
        assert_cpu(u2, v2)
        S.check_bases("w", w.shape, u2, v2)
        z_u, z_v = S.update_directions(torch.zeros(30, 24, device=w.device), 0.9, 10)
        assert z_u.shape == (30, 0) and z_v.shape == (24, 0)
        assert_cpu(z_u, z_v)


def test_input_and_output_directions_keep_the_data_device():
    x = rand(50, 24, seed=8)
    w = rand(30, 24, seed=9)
    with meta():
        u, v = S.svd_bases(w, 6)
        v_d = S.input_directions(x.T @ x, v, 0.99, 10)
        u_d = S.output_directions(w, u, v_d)
        assert_cpu(u_d, v_d)
        assert u_d.shape == (30, 10) and v_d.shape == (24, 10)
        S.check_bases("w", w.shape, *S.extend_bases(u, v, u_d, v_d))
        # Rank-deficient outputs: the completion's random directions made on the data's device too.
        assert_cpu(S.output_directions(torch.zeros(30, 24, device=w.device), u, v_d))
        z = S.input_directions(torch.zeros(24, 24, device=w.device), v, 0.99, 10)
        assert z.shape == (24, 0)
        assert_cpu(z)


def test_check_bases_keeps_the_data_device():
    u, v = S.svd_bases(rand(12, 9, seed=7), 4)
    with meta():
        S.check_bases("w", (12, 9), u, v)
        S.check_bases("w", (12, 9), u.double(), v.double())
        with pytest.raises(ValueError, match="not orthonormal"):
            S.check_bases("w", (12, 9), 2 * u, v)


class _Layer(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.q_proj = nn.Linear(h, h, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return x + self.q_proj(x) + self.down_proj(torch.tanh(self.up_proj(x)))


class _Tiny(nn.Module):
    """Targets named as the default patterns expect (`layers.N.q_proj.weight`, ...), plus a non-target."""

    def __init__(self, vocab=13, h=12, f=9, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(_Layer(h, f) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


class _Engine:
    """The DeepSpeed engine methods SubspaceProjector uses, for stage 0 on one process (no DeepSpeed)."""

    device = torch.device("cpu")

    def __init__(self, module):
        self.module = module
        # SGD: its state is clones of the gradients, so engine.step() (inside proj.step()) makes no
        # factory tensor of its own that the meta default device would break.
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)

    def zero_optimization_stage(self):
        return 0

    def get_data_types(self):
        return torch.float32, torch.float32

    def fp16_enabled(self):
        return False

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_projector_keeps_the_engine_device():
    """fit (adaptive, with the importance forward) / mark / step / audit / extend / extend_inputs / set_bases /
    load_state_dict of a one-process projector; only the projector's calls run under the meta default."""
    from ds_cl.core.projector import SubspaceProjector

    torch.manual_seed(0)
    model = _Tiny()
    engine = _Engine(model)
    # "host": the pre-step copy in reused host buffers, the accelerator's default.
    proj = SubspaceProjector(engine, pre_step_copy="host")
    ids = torch.randint(0, 13, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0

    def train(steps):
        for _ in range(steps):
            model(ids).backward()
            with meta():
                proj.step()
                leaks = proj.audit()
            assert leaks and max(leaks.values()) < 1e-5, leaks

    with meta():
        ranks = proj.fit(S.AdaptiveRank(0.25, 0.5), importance_batches=[{"input_ids": ids, "attention_mask": mask}])
        proj.mark()
    assert all(r > 0 for r in ranks.values())
    train(2)
    with meta():
        added = proj.extend(0.9, 0.75)
    assert sum(added.values()) > 0
    train(1)
    with meta():  # the inputs boundary: hooks, covariances (q_proj and up_proj share one), new directions
        added = proj.extend_inputs([{"input_ids": ids, "attention_mask": mask}], 0.9, 0.9)
    assert sum(added.values()) > 0
    train(1)
    bases = {n: tuple(t.clone() for t in b) for n, b in proj.bases.items()}
    state = proj.state_dict()
    with meta():
        proj.set_bases(bases)
        proj.load_state_dict(state)
    for n, (u, v) in proj.bases.items():
        assert_cpu(u, v)
    assert all(w.device.type == "cpu" for w in proj.anchor.values())
    train(1)


def test_svd_helper_passes_no_driver_on_cpu(monkeypatch):
    """`S.svd` asks for cuSOLVER's QR-based gesvd on CUDA data only: `driver=` is refused for CPU inputs."""
    x = rand(9, 7, seed=8, dtype=torch.float64)
    u, s, vh = S.svd(x)  # runs on CPU: no driver= reached torch
    assert u.shape == (9, 7) and s.shape == (7,) and vh.shape == (7, 7)
    assert torch.allclose(u @ torch.diag(s) @ vh, x, atol=1e-12)

    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *args, **kw: calls.append(kw) or real(a, *args, **kw))
    S.svd(x)
    S.svd_bases(x, 3)
    S.update_directions(x, 0.9, 3)
    assert len(calls) == 3 and all("driver" not in kw and kw.get("full_matrices") is False for kw in calls), calls

    class FakeCuda:  # the helper's one decision, without a GPU: what it asks torch for on CUDA data
        is_cuda = True

    calls.clear()
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *args, **kw: calls.append(kw))
    S.svd(FakeCuda())
    assert calls == [{"full_matrices": False, "driver": "gesvd"}]


# ----------------------------------------------------------------------------------- structure
def calls_without_device(source: str, filename: str) -> list[str]:
    """`file:line torch.NAME` for each `torch.NAME(...)` factory call (NAME in FACTORIES) without a
    `device=` keyword, and each `from torch import NAME` that would hide such calls from this check."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name)
                    and f.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                out.append((node.lineno, f"{filename}:{node.lineno} torch.{f.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            out += [(node.lineno, f"{filename}:{node.lineno} from torch import {a.name}")
                    for a in node.names if a.name in FACTORIES]
    return [text for _, text in sorted(out)]


def test_structural_check_catches_a_call_without_device():
    src = ("import torch\n"
           "a = torch.zeros(3, dtype=torch.float64)\n"
           "b = torch.tensor(1.0, device=x.device)\n"
           "c = torch.zeros_like(x)\n"
           "d = x.new_zeros(3)\n"
           "e = torch.eye(3)\n"
           "from torch import ones\n")
    assert calls_without_device(src, "m.py") == ["m.py:2 torch.zeros", "m.py:6 torch.eye", "m.py:7 from torch import ones"]


def test_every_factory_call_in_the_maths_names_a_device():
    files = sorted((PKG / "core").glob("*.py")) + sorted((PKG / "methods").glob("*.py"))
    assert len(files) >= 8
    offenders = [c for p in files for c in calls_without_device(p.read_text(), str(p.relative_to(PKG.parent)))]
    assert not offenders, ("factory calls without device= (take the device of the data they meet, or "
                           "device=\"cpu\" for a host buffer):\n  " + "\n  ".join(offenders))


def test_the_host_pre_step_copy_goes_back_once_per_step():
    """With the pre-step copy in host memory, each step reads every target's copy back once (for the
    difference dW), not twice (once more to rebuild W_old + P(dW)): on a GPU each read is a host-to-device
    transfer of the rank's target partitions. The projector runs for real; only the dict of copies it
    makes is wrapped to count the reads. The weights still move inside the complement only."""
    from ds_cl.core.projector import SubspaceProjector

    class Counting(dict):
        reads: dict = {}

        def __getitem__(self, k):
            Counting.reads[k] = Counting.reads.get(k, 0) + 1
            return dict.__getitem__(self, k)

    class Projector(SubspaceProjector):
        def _pre_step_copy(self, names):
            return Counting(super()._pre_step_copy(names))

    torch.manual_seed(0)
    model = _Tiny()
    proj = Projector(_Engine(model), pre_step_copy="host")
    proj.fit(S.FixedRank(0.5))
    ids = torch.randint(0, 13, (2, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in proj.names}
    for _ in range(2):
        model(ids).backward()
        proj.step()
    assert set(Counting.reads) == set(proj.names) and set(Counting.reads.values()) == {2}, Counting.reads  # 2 steps
    for n, (u, v) in proj.bases.items():
        dw = dict(model.named_parameters())[n].detach() - before[n]
        assert dw.norm() > 0 and S.leak(dw, u, v) < 1e-5, n
