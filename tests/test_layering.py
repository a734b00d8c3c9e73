"""The package's import structure: dependencies point down the layers of docs/design.md, no module imports one
that (directly or through others) imports it back, function-level imports included, and the loader's modules
stay free of the converter and its dependencies (every DataLoader worker imports them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_seg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the dist_seg modules it imports anywhere in its source (`from X import y` counts X, and
    X.y when y is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            # a package's __init__ is imported before its submodules; that edge is not a cycle
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


# Each part of the package and its layer: a module may import modules of its own part or of a lower layer,
# never of a higher one or of another part at the same layer (so `infer` never imports `train`, and
# `data.loading`, `data.prep` and `models` stay independent of one another). The longest matching prefix wins.
LAYERS: dict[str, int] = {
    "dist_seg": 0,  # the package itself (its version)
    "dist_seg.data": 0,  # the package itself: IGNORE_INDEX, the one constant everything shares
    "dist_seg.viz": 0,  # class palettes and colourised maps (TensorBoard, EDA plots, predict overlays)
    "dist_seg.runtime": 1,  # processes: torch.distributed, precision, RNG state, stop signals, fault drills
    "dist_seg.config": 2,  # the typed config and its loading
    "dist_seg.data.format": 3,  # what a shard is: manifest, tar members, reader, writer, remote storage
    "dist_seg.data.class_weights": 3,
    "dist_seg.data.loading": 4,  # shards -> batches: the data plan, train/eval loaders, augmentation, colour
    "dist_seg.data.prep": 4,  # COCO -> shards: conversion, EDA, splits, synthetic data
    "dist_seg.models": 4,
    "dist_seg.checkpoint": 5,  # what a checkpoint holds: written by train, read by infer
    "dist_seg.infer": 6,
    "dist_seg.train": 7,
    "dist_seg.cli": 8,
}


def _part(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in graph.items():
        for t in targets:
            a, b = _part(m), _part(t)
            if a != b and not LAYERS[b] < LAYERS[a] and not m.startswith(t + "."):
                bad.append(f"{m} ({a}, layer {LAYERS[a]}) imports {t} ({b}, layer {LAYERS[b]})")
    return sorted(bad)


def test_the_graph_sees_the_package() -> None:
    graph = _import_graph()
    assert "dist_seg.train.loop" in graph and "dist_seg.checkpoint" in graph["dist_seg.train.loop"]
    assert all(_part(m) for m in graph)  # every module belongs to a layer
    # the check itself: an upward import is reported
    assert _layer_violations({"dist_seg.infer.predict": {"dist_seg.train.loop"}}) == [
        "dist_seg.infer.predict (dist_seg.infer, layer 6) imports dist_seg.train.loop (dist_seg.train, layer 7)"
    ]
    assert _layer_violations({"dist_seg.data.loading.plan": {"dist_seg.data.prep.coco"}})


def test_dependencies_point_down_the_layers() -> None:
    bad = _layer_violations(_import_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_loader_modules_do_not_import_the_converter() -> None:
    code = (
        "import sys, dist_seg.data.loading.train_loader, dist_seg.data.format.shards\n"
        "heavy = ('dist_seg.data.prep.convert', 'dist_seg.data.prep.coco', 'pycocotools', 'matplotlib')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the loader imports {r.stdout.strip()}"
