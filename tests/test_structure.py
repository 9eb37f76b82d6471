"""The shape of the code base: no import cycles, a model package that stands alone, tb_train's
sub-packages in layers that never import upwards, a demo app nothing else imports, one copy of each
config file, one job registry that setup.cfg follows, and dependencies declared exactly where imported.

Everything here reads source files (AST), so it is fast and needs no GPU, network or DeepSpeed.
"""
from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tb_core", "tb_model", "tb_train")
# Declared dependencies that no module imports, and why they are still needed.
NOT_IMPORTED = {
    "ninja": "DeepSpeed builds its CPU communication op with it on first use",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(path: Path, module: str) -> list[tuple[str, list[str], bool]]:
    """Every runtime import of a file: (imported module, names taken from it, at module level?).

    Imports inside functions count (a local import that dodges a cycle is still the cycle); imports
    under `if TYPE_CHECKING:` do not run and are skipped. Relative imports are made absolute.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, [a.name for a in child.names], top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def _graph() -> dict[str, set[str]]:
    """Import edges between the project's own modules (`from pkg import mod` points at the submodule)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path, module):
            if target.split(".")[0] not in PACKAGES:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if subs:
                graph[module].update(subs)
                if len(subs) == len(names):
                    continue
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                graph[module].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_are_read_at_every_level(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nimport numpy as np\nfrom . import sib\nfrom ..up import thing\n"
        "if TYPE_CHECKING:\n    from tb_train.train.job import Trainer\n"
        "def f():\n    import deepspeed\n    from .x.y import z\n")
    got = _imports(src, "tb_model.sub.mod")
    assert got == [("typing", ["TYPE_CHECKING"], True), ("numpy", [], True), ("tb_model.sub", ["sib"], True),
                   ("tb_model.up", ["thing"], True), ("deepspeed", [], False), ("tb_model.sub.x.y", ["z"], False)]


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 50 and graph["tb_model.registry"] >= {"tb_model.tokenbridge", "tb_model.config"}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("package,forbidden", [("tb_model", ("tb_train", "deepspeed")),
                                               ("tb_core", ("tb_model", "tb_train", "deepspeed"))])
def test_lower_packages_do_not_reach_up(package, forbidden):
    """tb_model loads and samples a trained model on its own; tb_core is the base of both."""
    modules, graph = _modules(), _graph()
    for module, path in modules.items():
        if module.split(".")[0] != package:
            continue
        direct = {t for t, _, _ in _imports(path, module) if t.split(".")[0] in forbidden}
        assert not direct, f"{path.relative_to(ROOT)} imports {sorted(direct)}"
        reach = {m for m in _reachable(graph, module) if m.split(".")[0] in forbidden}
        assert not reach, f"{module} reaches {sorted(reach)}"


# tb_train's layers, bottom first: a module may import its own sub-package and any LOWER layer, never a
# sibling in its own layer or anything above (the demo app is on top: nothing imports it). The base
# layer's modules (entry points and job registry, config names, ranks and collectives) use each other.
LAYERS = (
    ("tb_train.cli", "tb_train.recipes", "tb_train.dist", "tb_train.__main__"),
    ("tb_train.data", "tb_train.engine"),
    ("tb_train.sample",),
    ("tb_train.eval",),
    ("tb_train.train",),
    ("tb_train.launch",),
    ("tb_train.demo",),
)


def _layer_of(module: str) -> tuple[int, str]:
    for i, group in enumerate(LAYERS):
        for unit in group:
            if module == unit or module.startswith(unit + "."):
                return i, unit
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py LAYERS: place it there")


def test_layer_finder_rejects_an_upward_import():
    assert _layer_of("tb_train.engine.checkpoint") == (1, "tb_train.engine")
    assert _layer_of("tb_train.train.__main__") == (4, "tb_train.train")
    with pytest.raises(AssertionError):
        _layer_of("tb_train.newthing")


def test_tb_train_sub_packages_import_only_lower_layers():
    """Function-level imports count too: a lazy import is still a dependency."""
    bad = []
    for module, targets in _graph().items():
        if not module.startswith("tb_train.") or module == "tb_train":
            continue
        layer, unit = _layer_of(module)
        for target in targets:
            if not target.startswith("tb_train.") or target == "tb_train":
                continue
            t_layer, t_unit = _layer_of(target)
            if t_layer > layer or (t_layer == layer > 0 and t_unit != unit):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that climb a layer (or cross to a sibling): " + ", ".join(sorted(bad))


def test_nothing_outside_the_demo_imports_it():
    users = sorted(m for m, targets in _graph().items() if not m.startswith("tb_train.demo")
                   and any(t == "tb_train.demo" or t.startswith("tb_train.demo.") for t in targets))
    assert not users, f"framework modules import the demo app: {users}"
    tools = [p.name for p in sorted((ROOT / "tools").glob("*.py")) if "tb_train.demo" in p.read_text()
             and p.name not in ("train_demo_vae.py", "bench_precompute.py")]
    assert not tools, f"benchmarks import the demo app: {tools}"


def test_one_copy_of_each_config_file():
    """The packaged configs are the only copy; the repository's `configs` is a link to them."""
    link = ROOT / "configs"
    assert link.is_symlink() and link.resolve() == (ROOT / "tb_train" / "configs").resolve()
    files = [p for p in sorted((ROOT / "tb_train").rglob("*")) if p.suffix in (".yaml", ".yml", ".json")
             and p.is_file() and "assets" not in p.parts]
    assert len(files) >= 15
    seen: dict[bytes, Path] = {}
    same = [(seen.setdefault(p.read_bytes(), p), p) for p in files if p.read_bytes() in seen]
    assert not same, f"identical config files: {[(str(a), str(b)) for a, b in same]}"


def test_setup_cfg_console_scripts_follow_the_job_registry():
    from tb_train.cli import JOBS, console_scripts

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line)
    assert declared == console_scripts()
    assert set(JOBS) >= {"precompute", "train", "export", "sample", "eval", "submit", "demo"}


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _install_requires() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines() if ln.strip()]
    return {_canonical(re.split(r"[<>=!~\[; ]", ln, maxsplit=1)[0]) for ln in lines}


def _third_party_imports(module_level_only: bool) -> dict[str, set[str]]:
    """Top-level import name -> the project modules that import it (stdlib and own packages left out)."""
    out: dict[str, set[str]] = {}
    for module, path in _modules().items():
        for target, _, top in _imports(path, module):
            name = target.split(".")[0]
            if not name or name in PACKAGES or name in sys.stdlib_module_names or name == "__future__":
                continue
            if top or not module_level_only:
                out.setdefault(name, set()).add(module)
    return out


def test_every_import_is_a_declared_dependency():
    """Module-level AND function-level imports: a lazily imported package is still needed at run time."""
    dists = importlib.metadata.packages_distributions()
    declared = _install_requires()
    undeclared = {}
    for name, users in sorted(_third_party_imports(module_level_only=False).items()):
        provided_by = {_canonical(d) for d in dists.get(name, [name])}
        if not provided_by & declared:
            undeclared[name] = sorted(users)[:3]
    assert not undeclared, f"imported but not in setup.cfg install_requires: {undeclared}"


def test_every_declared_dependency_is_imported():
    dists = importlib.metadata.packages_distributions()
    imported = {_canonical(d) for name in _third_party_imports(module_level_only=False)
                for d in dists.get(name, [name])}
    unused = sorted(_install_requires() - imported - set(NOT_IMPORTED))
    assert not unused, f"declared in setup.cfg but never imported: {unused}"
