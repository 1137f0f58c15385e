"""The package's shape: installed names, a torch-free data server, replayable configurations."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, copy_sources

from iat.app.cli import build_parser, config_from_args
from main import main

# What a wheel must hold at the top level: the package and the original's two module names.
TOP_LEVEL = {"iat", "nets", "adv_model.py"}
SOURCES = (
    "pyproject.toml", "README.md", "LICENSE", "adv_model.py", "main.py", "iat", "nets",
    "third_party",
)  # fmt: skip


def test_wheel_installs_only_the_package_nets_and_the_attack_modules(tmp_path: Path) -> None:
    # Built from a copy, so that the build leaves nothing in the working tree.
    source = copy_sources(tmp_path / "src", SOURCES)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("*.whl")
    names = {entry.split("/")[0] for entry in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == TOP_LEVEL
    listing = zipfile.ZipFile(wheel).namelist()
    assert "iat/data/server.py" in listing and "nets/resnet.py" in listing
    for data in ("robustbench_imagenet_ids.txt", "imagenet_class_to_id_map.json", "ORIGIN.md"):
        assert f"iat/data/reference/{data}" in listing  # --benchmark and --eval-set read them
    # The public commands, and the license beside the metadata.
    (entry_points,) = [n for n in listing if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (
        "iat = iat.app.cli:main" in scripts and "iat-serve-data = iat.data.server:main" in scripts
    )
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in listing)


def test_python_dash_m_iat_is_main_py() -> None:
    """`python -m iat` and `python -m iat.app.cli` take main.py's flags (the `iat` command's)."""
    for module in ("iat", "iat.app.cli"):
        run = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("usage: python -m iat") and "--attack-epsilon" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "iat", "--atack", "pgd"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--attack" in bad.stderr


# Runs first in the child: any import of torch fails there.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""

DATA_SERVER_MODULES = (
    "layouts",
    "augment",
    "randaugment",
    "sampling",
    "protocol",
    "client",
    "server",
)


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_data_server_modules_import_and_serve_without_torch() -> None:
    blocked = _run_without_torch("import torch")
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr
    imports = "\n".join(f"import iat.data.{m}" for m in DATA_SERVER_MODULES)
    done = _run_without_torch(f"{imports}\nassert 'torch' not in sys.modules\nprint('ok')")
    assert done.returncode == 0, done.stderr
    # The entry script itself serves fake batches (benchmark mode: no consumer needed).
    script = REPO / "third_party" / "serve-data.py"
    serve = _run_without_torch(
        "import runpy\n"
        f"sys.argv = [{str(script)!r}, '--fake', '--benchmark', '--batch', '2',"
        " '--image-size', '16', '--max-batches', '3', '--log-every', '100']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    assert serve.returncode == 0, serve.stderr
    assert "serve-data: 3 batches" in serve.stderr


def test_a_run_replays_from_its_config_json(tiny_imagenet: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    flags = [
        "--data", str(tiny_imagenet), "--logdir", str(first), "--arch", "ResNet",
        "--num-blocks", "1", "1", "1", "1", "--width", "8", "--image-size", "32",
        "--batch", "4", "--workers", "0", "--loader", "local", "--attack-iter", "1",
        "--attack-epsilon", "4", "--steps-per-epoch", "1", "--epochs", "1",
        "--train-eval", "none", "--lr-decay-epochs", "7", "9", "--seed", "5",
    ]  # fmt: skip
    assert main(flags) == 0
    stored = json.loads((first / "config.json").read_text())["config"]

    # Parsing alone gives back the same configuration.
    replayed = config_from_args(build_parser().parse_args(["--config", str(first / "config.json")]))
    assert json.loads(json.dumps(replayed.__dict__)) == stored

    # Replaying runs it again; flags given override the stored values.
    second = tmp_path / "second"
    assert main(["--config", str(first / "config.json"), "--logdir", str(second)]) == 0
    again = json.loads((second / "config.json").read_text())["config"]
    assert again == {**stored, "logdir": str(second)}
    assert main(["--config", str(first / "config.json"), "--seed", "x"]) == 1
