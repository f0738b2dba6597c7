"""The package's shape: no import cycles between ds_cl modules (function-level imports included), and
the core library imports neither the run config, the trainer, the methods nor the tools."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ds_cl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """ds_cl module -> the ds_cl modules it imports anywhere in its body (functions included)."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        # Imports for type annotations only (`if TYPE_CHECKING:`) never run: not edges.
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and getattr(b.test, "id", "") ==
                       "TYPE_CHECKING" for stmt in b.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                deps.add(base)
                deps |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles():
    graph = imports()
    assert len(graph) > 30
    # Tarjan's strongly connected components: any with more than one module is a cycle.
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_core_is_a_library():
    graph = imports()
    core = {m: deps for m, deps in graph.items() if m.startswith("ds_cl.core")}
    assert set(core) >= {"ds_cl.core.projector", "ds_cl.core.subspace", "ds_cl.core.zero_shards"}
    outside = {m: sorted(d for d in deps if not d.startswith("ds_cl.core")) for m, deps in core.items()}
    assert all(not v for v in outside.values()), outside
    for m in core:
        src = (PKG.parent / (m.replace(".", "/") + ".py")).read_text() if not m.endswith("core") else ""
        assert "import yaml" not in src, m


def test_the_loop_names_no_method():
    """The loop drives every method through the same hooks: no method name among its strings, no
    method-specific component among its names."""
    from ds_cl.methods import REGISTRY

    tree = ast.parse((PKG / "training" / "train.py").read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert sorted(set(REGISTRY) & strings) == [], "ds_cl/training/train.py branches on method names"
    assert sorted(n for n in names if "projector" in n.lower() or "lora" in n.lower()) == []


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
               "recv", "isend", "irecv", "monitored_barrier"}
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def direct_collectives(tree: ast.AST) -> list[str]:
    """Calls of a torch.distributed / deepspeed.comm collective in `tree`, however the module was imported."""
    aliases, names = set(), set()  # module aliases (`dist`), and collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name in COMM_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module in COMM_MODULES:
                names |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in COMM_MODULES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in names:
            found.append(f"{f.id}() line {node.lineno}")
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in aliases or owner in COMM_MODULES:
                found.append(f"{owner}.{f.attr}() line {node.lineno}")
    return found


def test_collectives_go_through_one_module():
    # NCCL takes accelerator tensors only: a host tensor in a collective passes every CPU test and fails
    # the first GPU step. ds_cl/core/collectives.py builds and checks device tensors; nothing else calls
    # a collective directly.
    offenders = {str(p.relative_to(PKG.parent)): found for p in PKG.rglob("*.py")
                 if p.name != "collectives.py" and (found := direct_collectives(ast.parse(p.read_text())))}
    assert not offenders, f"collectives outside ds_cl/core/collectives.py: {offenders}"
    # The check itself sees each import style.
    sample = ("import torch.distributed as dist\nfrom torch import distributed as td\n"
              "from deepspeed.comm import all_reduce\nimport torch.distributed\n"
              "dist.all_reduce(t)\ntd.barrier()\nall_reduce(t)\ntorch.distributed.broadcast(t, 0)\n"
              "dist.get_rank()\n")
    assert len(direct_collectives(ast.parse(sample))) == 4
