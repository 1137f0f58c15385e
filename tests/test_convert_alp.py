"""``python -m iat.convert_alp``: TF-slim resnet_v2 checkpoints (ALP's) give identical logits.

TensorFlow runs only in child processes (tests/alp_tf_checkpoint.py writes the checkpoints and
their TF logits; the converter is run as a command), never in the pytest process with torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import nets
from iat.convert.alp import variable_table
from main import main

# Found, not imported: TensorFlow stays out of this process.
needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="TensorFlow is not installed: pip install -e '.[convert]'",
)
HELPER = REPO / "tests" / "alp_tf_checkpoint.py"
SCOPE = "resnet_v2_50/"
# Logits of a converted model equal TensorFlow's up to float32 rounding.
RELATIVE_TOLERANCE = 1e-4
# (checkpoint written by HELPER, converter flags): the runs of `conversions` beside the
# hostile inputs it makes.
CASES = [
    ("small", []),
    ("small", ["--use-moving-average"]),
    ("background", []),
    ("background", ["--keep-background-class"]),
    ("background", ["--use-moving-average"]),
    ("extra", []),
    ("misshaped", []),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def alp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small checkpoints with ALP's names and the TF logits of ``expected.npz``'s images."""
    out = tmp_path_factory.mktemp("alp")
    subprocess.run([sys.executable, str(HELPER), str(out)], check=True, env=_env(),
                   capture_output=True, timeout=300)  # fmt: skip
    return out


@dataclass(frozen=True)
class Conversion:
    """One run of the converter command: its output folder (empty before it ran) and result."""

    checkpoint: Path
    out: Path
    done: subprocess.CompletedProcess


def _convert(checkpoint: Path, out: Path, flags: Sequence[str]) -> Conversion:
    done = subprocess.run(
        [sys.executable, "-m", "iat.convert.alp", str(checkpoint), str(out / "alp.pt"), *flags],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Conversion(checkpoint, out, done)


def _hostile_checkpoints(alp: Path, root: Path) -> dict[str, Path]:
    """A missing checkpoint, a corrupt index, and `small` with its data file cut in half."""
    corrupt, truncated = root / "corrupt", root / "truncated"
    corrupt.mkdir()
    (corrupt / "model.ckpt.index").write_bytes(b"not a checkpoint index")
    shutil.copytree(alp / "small", truncated)
    (data,) = truncated.glob("model.ckpt.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return {name: root / name / "model.ckpt" for name in ("absent", "corrupt", "truncated")}


@pytest.fixture(scope="module")
def conversions(alp: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Conversion]:
    """Every conversion of this file, run at once: each child imports TensorFlow (~10 s)."""
    inputs = _hostile_checkpoints(alp, tmp_path_factory.mktemp("hostile"))
    cases = {
        **{f"{name}{''.join(flags)}": (alp / name / "model.ckpt", flags) for name, flags in CASES},
        **{name: (path, []) for name, path in inputs.items()},
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        running = {key: pool.submit(_convert, ckpt, tmp_path_factory.mktemp("out"), flags)
                   for key, (ckpt, flags) in cases.items()}  # fmt: skip
        return {key: job.result() for key, job in running.items()}


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The converted model, built from the architecture its file records, on ALP's images
    ([N, H, W, 3] RGB in [0, 1]) given as this project's input: NCHW BGR pixels in [0, 255]."""
    weights = nets.read_weights(path)
    record = weights.architecture
    model = nets.build_model(
        record["arch"], depth=record["depth"], num_blocks=record["num_blocks"],
        width=record["width"], num_classes=record["num_classes"],
    ).eval()  # fmt: skip
    nets.load_weights(model, weights)
    bgr = torch.from_numpy(images[..., ::-1].copy()).permute(0, 3, 1, 2) * 255
    with torch.no_grad():
        return model(bgr).numpy()


def _assert_same_logits(ours: np.ndarray, tf_logits: np.ndarray) -> None:
    assert ours.shape == tf_logits.shape
    scale = np.abs(tf_logits).max()
    assert np.abs(ours - tf_logits).max() <= RELATIVE_TOLERANCE * scale


@needs_tensorflow
def test_converted_model_gives_tensorflows_logits(
    alp: Path, conversions: dict[str, Conversion], tmp_path: Path, tiny_imagenet: Path
) -> None:
    run = conversions["small"]
    out = run.out / "alp.pt"
    assert run.done.returncode == 0, run.done.stderr
    assert run.done.stdout.splitlines() == [
        f"wrote {out}: ResNetV2 (blocks 2 1 1 1, width 8, 3 classes) from "
        f"{alp / 'small' / 'model.ckpt'} (96 variables)"
    ]
    expected = np.load(alp / "expected.npz")
    _assert_same_logits(_logits(out, expected["images"]), expected["small"])
    # main.py takes it with the architecture it records (no --arch, --num-blocks, --width).
    result = tmp_path / "eval.json"
    assert main(["--eval", "--load", str(out), "--data", str(tiny_imagenet), "--image-size",
                 "32", "--workers", "0", "--attack-iter", "0", "--eval-output",
                 str(result)]) == 0  # fmt: skip
    record = json.loads(result.read_text())
    assert record["arch"] == "ResNetV2" and record["images"] == 7


@needs_tensorflow
@pytest.mark.parametrize(
    ("flags", "outputs", "logits"),
    [
        ("", slice(1, None), "background"),
        ("--keep-background-class", slice(None), "background"),
        ("--use-moving-average", slice(1, None), "background_averaged"),
    ],
)
def test_background_class_and_moving_averages(
    alp: Path, conversions: dict[str, Conversion], flags: str, outputs: slice, logits: str
) -> None:
    # ALP's ImageNet heads have 1001 outputs, output 0 the background: dropped unless asked.
    run = conversions[f"background{flags}"]
    assert run.done.returncode == 0, run.done.stderr
    (line,) = run.done.stdout.splitlines()
    classes = 1001 if flags == "--keep-background-class" else 1000
    assert f"{classes} classes" in line
    assert ("dropped output 0 (ALP's background class)" in line) == (classes == 1000)
    # Momentum slots, moving averages and global_step are skipped by name, and said so.
    assert "skipped 129 optimizer/moving-average/global_step variables" in line
    expected = np.load(alp / "expected.npz")
    _assert_same_logits(
        _logits(run.out / "alp.pt", expected["images"]), expected[logits][:, outputs]
    )


@needs_tensorflow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("extra", f"does not match TF-slim's resnet_v2 as its shapes describe it (ResNetV2, "
         f"blocks 2 1 1 1, width 8, 3 classes); 1 unexpected: {SCOPE}block1/unit_1/"
         "bottleneck_v2/se/weights"),
        ("misshaped", f"does not match TF-slim's resnet_v2 as its shapes describe it "
         f"(ResNetV2, blocks 2 1 1 1, width 8, 3 classes); 1 mis-shaped: {SCOPE}block2/unit_1/"
         "bottleneck_v2/conv2/weights (file 5x5x16x16, model 3x3x16x16)"),
        ("small--use-moving-average", "--use-moving-average, but 64 of 64 weights have no "
         f"moving average (first {SCOPE}conv1/weights/ExponentialMovingAverage); convert the "
         "weights without the flag"),
    ],
)  # fmt: skip
def test_checkpoints_that_do_not_match_are_one_line(
    conversions: dict[str, Conversion], case: str, message: str
) -> None:
    run = conversions[case]
    assert run.done.returncode == 1 and run.done.stdout == ""
    assert run.done.stderr.splitlines() == [f"error: {run.checkpoint}: {message}"]
    assert list(run.out.iterdir()) == []  # no OUT, no temporary file


@needs_tensorflow
@pytest.mark.parametrize("case", ["absent", "corrupt"])
def test_missing_or_corrupt_checkpoint_is_one_line(
    conversions: dict[str, Conversion], case: str
) -> None:
    run = conversions[case]
    assert run.done.returncode == 1 and run.done.stdout == ""
    (line,) = run.done.stderr.splitlines()
    assert line.startswith(f"error: {run.checkpoint}: not a readable TensorFlow checkpoint (")
    assert list(run.out.iterdir()) == []


@needs_tensorflow
def test_a_checkpoint_whose_data_is_shorter_than_declared_is_refused_unread(
    conversions: dict[str, Conversion],
) -> None:
    """A truncated (or hostile) data file: the header's sizes are checked against the data on
    disk before any tensor is allocated."""
    run = conversions["truncated"]
    assert run.done.returncode == 1
    (line,) = run.done.stderr.splitlines()
    assert line.startswith(f"error: {run.checkpoint}: its variables declare ") and "refused" in line
    assert list(run.out.iterdir()) == []


def test_every_resnet_v2_50_tensor_has_its_slim_name() -> None:
    with torch.device("meta"):
        model = nets.build_model("ResNetV2", depth=50)
    table = variable_table(model, "resnet_v2_50")
    # Counted by hand from resnet_v2.py: conv1 and logits (2 each), 16 units of 16 (preact,
    # conv1 and conv2 BN: 4 each; three kernels; conv3's biases), 4 projections (2), postnorm (4).
    assert len(table) == 272
    unit = f"{SCOPE}block1/unit_3/bottleneck_v2/"
    assert (
        table[f"{unit}conv2/BatchNorm/moving_variance"].key == "group0.block2.conv2.bn.running_var"
    )
    assert table[f"{unit}preact/gamma"].key == "group0.block2.preact.weight"
    assert table[f"{unit}conv3/biases"].key == "group0.block2.conv3.bias"
    projection = table[f"{SCOPE}block4/unit_1/bottleneck_v2/shortcut/weights"]
    assert projection.key == "group3.block0.shortcut.weight" and projection.shape == (
        1,
        1,
        1024,
        2048,
    )
    assert table[f"{SCOPE}conv1/weights"].layout == "root_conv"  # its input channels reversed
    assert table[f"{SCOPE}logits/weights"].shape == (1, 1, 2048, 1000)
    assert table[f"{SCOPE}postnorm/moving_mean"].key == "postnorm.running_mean"


# Runs first in the child: any import of tensorflow fails there.
BLOCK_TENSORFLOW = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("No module named 'tensorflow'")
sys.meta_path.insert(0, _NoTensorFlow())
from iat.convert.alp import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_tensorflow_the_converter_names_the_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW, str(tmp_path / "model.ckpt"),
         str(tmp_path / "out.pt")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: reading a TensorFlow checkpoint needs TensorFlow")
    assert line.endswith("pip install -e '.[convert]'")
