"""An architecture is one unit (nets.registry): one module registers it with what it is, and
``nets.create_model``, the ``--arch`` choices and the checkpoint's architecture record follow
from that registration alone. nets/ imports without cycles; one writer owns the ``.pt`` layout."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_attack_registry import run_python

import nets

NEW_ARCHITECTURE = '''
"""A new architecture in one module: a small MLP on pooled pixels (a test's example)."""
from torch import nn

from nets.registry import register


class PooledMLP(nn.Sequential):
    def __init__(self, num_blocks, num_classes, width):
        layers, features = [nn.AdaptiveAvgPool2d(2), nn.Flatten()], 12
        for _ in range(num_blocks[0]):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        super().__init__(*layers, nn.Linear(features, num_classes))


@register("pooled_mlp", depths={1: (1,), 2: (2,)})
def pooled_mlp(num_blocks, num_classes=1000, width=64, denoise=None):
    return PooledMLP(num_blocks, num_classes, width)
'''


def test_a_new_architecture_is_one_module_and_its_registration(tmp_path):
    """Measured: an architecture module from outside the repository, imported once, is built by
    nets.create_model, offered and validated by --arch, and its weights go through a save / load
    round trip with their architecture record (nets.load_model and --eval --load alike)."""
    (tmp_path / "pooled_mlp.py").write_text(NEW_ARCHITECTURE)
    run = run_python(
        """
        import pooled_mlp
        import torch
        import nets
        from iat.app.cli import build_parser, config_from_args
        from iat.builders import load_for_inference

        torch.manual_seed(0)
        model = nets.create_model("pooled_mlp", depth=2, num_classes=3, width=8).eval()
        parse = lambda flags: config_from_args(build_parser().parse_args(flags))
        flags = ["--eval", "--load", "w.pt", "--data", "d"]
        cfg = parse([*flags, "--arch", "pooled_mlp", "-d", "2", "--width", "8"])
        print(cfg.arch, cfg.depth, cfg.width)
        record = nets.ArchitectureRecord(arch="pooled_mlp", depth=2, width=8, num_classes=3)
        nets.save_weights(model, "w.pt", record)
        pixels = torch.rand(2, 3, 8, 8) * 255
        assert torch.equal(nets.load_model("w.pt")(pixels), model(pixels))
        loaded, cfg = load_for_inference(parse(flags), torch.device("cpu"))
        assert torch.equal(loaded.eval()(pixels), model(pixels))
        print(cfg.arch, cfg.depth, cfg.width, cfg.num_classes)
        print(nets.read_weights("w.pt").architecture == record.to_dict())
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["pooled_mlp 2 8", "pooled_mlp 2 8 3", "True"]


def test_the_flags_offer_and_check_the_new_architectures_depths(tmp_path):
    (tmp_path / "pooled_mlp.py").write_text(NEW_ARCHITECTURE)
    run = run_python(
        """
        import pooled_mlp
        from main import main
        flags = ["--eval", "--load", "w.pt", "--data", "d", "--arch", "pooled_mlp"]
        print(main([*flags, "-d", "50"]), main([*flags, "-d", "3"]))
        """,
        tmp_path,
    )
    assert run.stdout.split() == ["1", "1"], run.stderr
    first, second = run.stderr.splitlines()[:2]
    assert first == "error: --depth: 50 is not one of (1, 2)", first
    assert "invalid choice: 3 (choose from 1, 2, 12" in second, second


@pytest.mark.parametrize("module", ["nets.resnet", "nets.reference_models"])
def test_each_nets_module_imports_alone_and_the_registry_is_complete(tmp_path, module):
    run = run_python(
        f"""
        import sys
        import {module}
        registry = sys.modules["nets.registry"]
        names = registry.available_architectures()
        print(len(names), sorted(registry.LAYOUTS) == [n for n in names if n[0].islower()])
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["28", "True"]


def _nets_imports() -> dict[str, tuple[set[str], bool]]:
    """Each nets module's imports of other nets modules, and whether it imports anything after
    its first definition or statement (an end-of-file import)."""
    found = {}
    for path in sorted((REPO / "nets").glob("*.py")):
        name = "nets" if path.stem == "__init__" else f"nets.{path.stem}"
        body = ast.parse(path.read_text()).body
        imported, late, started = set(), False, False
        for node in body:
            is_import = isinstance(node, ast.Import | ast.ImportFrom)
            is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            late |= is_import and started
            started |= not (is_import or is_docstring)
            imported |= _nets_targets(node)
        found[name] = (imported - {name}, late)
    return found


def _nets_targets(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.startswith("nets")}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nets"):
        if node.module == "nets":  # from nets import resnet: the submodule
            return {f"nets.{alias.name}" for alias in node.names}
        return {node.module}
    return set()


def test_nets_has_no_import_cycle_and_no_late_import():
    modules = _nets_imports()
    assert [name for name, (_, late) in modules.items() if late] == []
    graph = {name: {t for t in targets if t in modules} for name, (targets, _) in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_each_architecture_is_registered_by_its_family_module():
    families = {family.__name__ for family in nets.FAMILIES} | {"nets.reference_models"}
    modules = {name: nets.ARCHITECTURES[name].__module__ for name in nets.ARCHITECTURES}
    assert set(modules.values()) <= families, modules
    assert modules["ResNetV2"] == "nets.resnet_variants"


def test_conversion_depends_on_nets_not_on_the_builders():
    for path in sorted((REPO / "iat" / "convert").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.module == "iat.builders"), path


def test_the_record_is_written_complete_and_read_with_its_defaults(tmp_path: Path):
    model = nets.create_model("ResNet", num_blocks=(1, 1, 1, 1), width=8, num_classes=3)
    given = {"arch": "ResNet", "depth": 50, "num_blocks": [1, 1, 1, 1], "width": 8}
    nets.save_weights(model, tmp_path / "w.pt", given)
    written = torch.load(tmp_path / "w.pt", weights_only=True)[nets.ARCHITECTURE_KEY]
    assert tuple(written) == nets.RECORD_FIELDS
    assert written["depth"] is None and written["defense_apply"] == "predict"
    with pytest.raises(ValueError, match="unknown architecture 'NoSuchNet'"):
        nets.save_weights(model, tmp_path / "x.pt", {"arch": "NoSuchNet", "width": 8})


def test_training_state_goes_through_the_one_writer(tmp_path: Path):
    model = nets.create_model("ResNet", num_blocks=(1, 1, 1, 1), width=8, num_classes=3)
    record = nets.ArchitectureRecord(arch="ResNet", num_blocks=(1, 1, 1, 1), width=8)
    nets.save_weights(model, tmp_path / "c.pt", record, training_state={"epoch": 2, "step": 7})
    assert set(torch.load(tmp_path / "c.pt", weights_only=True)) == {
        "model", nets.ARCHITECTURE_KEY, "epoch", "step"
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown training-state fields \\['payload'\\]"):
        nets.save_weights(model, tmp_path / "d.pt", record, training_state={"payload": 1})
