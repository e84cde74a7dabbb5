"""The package's layers import only downward, and no modules import each other in a cycle.

Every ``import`` in ``src/coda_gqa_l`` counts, also those inside functions (they hide cycles and
upward imports from a plain import of the package). The layers, bottom to top:

0. ``base``: config, primitives, state, version, fetch, cpu_threads, cli_help
1. ``kernels``: Triton kernels and their PyTorch references (tensors, numbers, the config)
2. ``core``: the layer itself (banks, attention, differential, baseline, decode, captured prefill, state files)
3. ``models``: adapters, cache, convert, loader, weights files, LoRA, pretrained, the tiny model
4. ``data``: corpora, fact and passkey documents, training rows, token corpora
5. ``apps``: training, evaluation, the neural database and the demo, side by side: none of them
   imports another
6. the package root, which re-exports the public names

A module may import from its own layer (not an app from another app) and from any layer below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "coda_gqa_l"
SOURCE = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("config", "primitives", "state", "version", "fetch", "cpu_threads", "cli_help", "run_settings",
              "fused_linear")),
    ("kernels", ("kernels",)),
    ("core", ("segment_attention", "banded_attention", "decode_view", "step_tables", "differential", "attention",
              "baseline", "decode", "captured_prefill", "statefile", "routing_ahead")),
    ("models", ("models",)),
    ("data", ("data",)),
    ("apps", ("training", "evaluation", "neuraldb", "demo")),
)  # fmt: skip
ROOT_RANK = len(LAYERS)
APPS_RANK = [name for name, _ in LAYERS].index("apps")


def placement(module: str) -> tuple[int, str]:
    """``(layer rank, group)`` of a dotted module under the package; the group is the top-level name
    (``training`` for ``coda_gqa_l.training.cli``). Raises for a module no layer names."""
    if module == PACKAGE:
        return ROOT_RANK, PACKAGE
    top = module.removeprefix(PACKAGE + ".").split(".")[0]
    for rank, (_, groups) in enumerate(LAYERS):
        if top in groups:
            return rank, top
    raise AssertionError(f"module {module} is in no layer: add {top!r} to LAYERS in tests/test_architecture.py")


def package_modules(source: Path = SOURCE) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``) for every module of the package."""
    found = {}
    for path in sorted((source / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_modules(module: str, is_package: bool, tree: ast.AST, known: Iterable[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in ``tree`` (functions included)."""
    known = set(known)
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from . import fetch` names a module; `from .x import y` a name in x
                candidate = f"{source}.{alias.name}"
                targets.add(candidate if candidate in known else source)
    targets.discard(module)
    return targets


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    modules = package_modules(source)
    return {
        name: imported_modules(name, is_package, ast.parse(path.read_text()), modules)
        for name, (path, is_package) in modules.items()
    }


def layering_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import that goes up a layer or across from one app to another."""
    found = []
    for module, targets in sorted(graph.items()):
        rank, group = placement(module)
        for target in sorted(targets):
            target_rank, target_group = placement(target)
            if target_rank > rank:
                found.append(f"{module} imports {target}: up from {_layer(rank)} to {_layer(target_rank)}")
            elif target_rank == rank == APPS_RANK and target_group != group:
                found.append(f"{module} imports {target}: {group} and {target_group} are apps side by side")
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as the modules on it (first repeated at the end); a package's
    ``__init__`` importing its own submodules is not a cycle unless a submodule imports back."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def _layer(rank: int) -> str:
    return "the package root" if rank == ROOT_RANK else LAYERS[rank][0]


def test_every_module_has_a_layer() -> None:
    for module in package_modules():
        placement(module)


def test_imports_go_only_downward() -> None:
    violations = layering_violations(import_graph())
    assert not violations, "upward or sideways imports:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_can_fail() -> None:
    """The checks catch an upward import, an import between apps, an in-function import and a cycle."""
    upward = {"coda_gqa_l.kernels.routing": {"coda_gqa_l.attention"}, "coda_gqa_l.attention": set()}
    assert layering_violations(upward) == [
        "coda_gqa_l.kernels.routing imports coda_gqa_l.attention: up from kernels to core"
    ]
    sideways = {"coda_gqa_l.training.data": {"coda_gqa_l.evaluation.passkey"}}
    assert "apps side by side" in layering_violations(sideways)[0]
    assert layering_violations({"coda_gqa_l.statefile": {"coda_gqa_l"}})  # the root re-exports: nothing imports it
    tree = ast.parse("def f():\n    from ..neuraldb.engine import Engine\n")
    known = {"coda_gqa_l.neuraldb.engine", "coda_gqa_l.models.cache"}
    assert imported_modules("coda_gqa_l.models.cache", False, tree, known) == {"coda_gqa_l.neuraldb.engine"}
    adapters, cache = "coda_gqa_l.models.adapters", "coda_gqa_l.models.cache"
    assert cycles({adapters: {cache}, cache: {adapters}}) == [[adapters, cache, adapters]]
    with pytest.raises(AssertionError, match="in no layer"):
        placement("coda_gqa_l.newthing")
