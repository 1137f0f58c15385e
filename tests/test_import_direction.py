"""The package's rooms and the one direction imports run between them (README, "Layout").

Every import is counted, those inside functions too: a lazy import that runs back up is still a
dependency that runs back up."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Top to bottom: a room imports only rooms of lower layers (and itself); rooms of one layer
# import none of each other. README "Layout" states the same order.
LAYERS = (
    ("app", "convert"),  # the commands
    ("train",),  # the training loop and its parts
    ("eval",),  # evaluation and its protocols
    ("builders",),  # a configuration becomes objects
    ("config",),  # the one configuration
    ("recipes", "defenses", "runs"),  # recipe ingredients, defenses, the run directory
    ("attacks", "data"),  # the attack zoo; datasets, augmentation, the data server
    ("nets",),  # architectures and weight formats
    ("runtime",),  # distributed setup, atomic writes, progress, CPUs
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
# Thin public paths kept at the package's top (``python -m iat.cli`` ...): each is in the room of
# the module it forwards to.
ALIASES = {
    "__main__": "app",
    "cli": "app",
    "convert_alp": "convert",
    "convert_checkpoint": "convert",
    "export_sharded": "convert",
    "sparse_frontend": "defenses",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    """Every project module `path` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("iat/**/*.py"), *ROOT.glob("nets/*.py"), ROOT / "adv_model.py"]
    return {module_name(path): path for path in files}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {target for target in imported(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "iat":
        return parts[0]
    if len(parts) == 1:
        return "iat"
    return ALIASES.get(parts[1], parts[1])


def test_every_room_has_its_place() -> None:
    rooms = {room(module) for module in project_modules()} - {"iat", "adv_model"}
    assert rooms == set(RANK), f"rooms without a layer: {rooms - set(RANK)}"


def test_imports_run_down_the_layers_only() -> None:
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if room(source) in RANK
        and room(target) in RANK
        and room(source) != room(target)
        and RANK[room(target)] <= RANK[room(source)]
    )
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)


def test_no_project_module_imports_the_root_shims() -> None:
    """``adv_model`` re-exports the package for the original's users; the package never leans on
    it, and ``iat/__init__`` stays free of the rooms (importing ``iat`` is cheap)."""
    edges = graph()
    assert not [m for m, targets in edges.items() if "adv_model" in targets]
    assert not [t for t in edges["iat"] if t != "iat.runtime.cpus" and t.startswith("iat.")]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (the import circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a circle of decisions.
    for name in edges:
        edges[name] = {
            t for t in edges[name] if not (t.startswith(name + ".") or name.startswith(t + "."))
        }
    assert strongly_connected(edges) == []


def test_the_direction_test_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself: a data module importing the trainer is caught."""
    edges = {"iat.data.x": {"iat.train.trainer"}, "iat.train.trainer": set()}
    upward = [(s, t) for s, ts in edges.items() for t in ts if RANK[room(t)] <= RANK[room(s)]]
    assert upward == [("iat.data.x", "iat.train.trainer")]
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
