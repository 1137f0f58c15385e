"""The original checkpoint format: reference logits, manifests, strict loading, round trips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import nets
import nets.layers

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
MANIFESTS = [
    ("ResNet", 50),
    ("ResNet", 152),
    ("ResNetDenoise", 50),
    ("ResNetDenoise", 152),
    ("ResNeXtDenoiseAll", 101),
]
TINY = {"num_blocks": [1, 1, 1, 1], "num_classes": 10, "width": 8}
# The architectures of the original's layout, which the .npz format names.
ORIGINAL_LAYOUT = [a for a in nets.available_architectures() if a not in nets.LAYOUTS]


def _tiny(arch: str) -> torch.nn.Module:
    return nets.build_model(arch, **{**TINY, "num_blocks": [1] * nets.num_groups_of(arch)})


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    """The original implementation's outputs, carried by the repository (see ORIGIN.md)."""
    return REFERENCE_DIR


@pytest.fixture(scope="module")
def reference_io(reference_dir: Path) -> tuple[torch.Tensor, np.ndarray]:
    with np.load(reference_dir / "ResNet-blocks1111.io.npz") as io:
        images = torch.from_numpy(io["images_bgr_uint8"]).permute(0, 3, 1, 2).float()
        return images, io["logits"]


def _reference_model(reference_dir: Path) -> torch.nn.Module:
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1]).eval()
    nets.load_weights(model, reference_dir / "ResNet-blocks1111.npz")
    return model


def _relative_error(model: torch.nn.Module, io: tuple[torch.Tensor, np.ndarray]) -> float:
    images, reference = io
    with torch.no_grad():
        logits = model(images).numpy()
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


def _manifest(reference_dir: Path, arch: str, depth: int) -> dict[str, tuple[int, ...]]:
    lines = (reference_dir / f"{arch}-d{depth}.manifest.txt").read_text().splitlines()
    return {name: tuple(map(int, shape.split("x"))) for name, shape in map(str.split, lines)}


def _cut_in_half(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _touch_marker(path: str) -> None:
    Path(path).touch()


class _Malicious:
    """Unpickling it would create a marker file: proof that the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _touch_marker, (str(self.marker),)


def _randomise_statistics(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


def _assert_float_state_equal(left: torch.nn.Module, right: torch.nn.Module) -> None:
    """Equal weights and statistics (``num_batches_tracked`` is not part of the npz format)."""
    right_state = right.state_dict()
    for key, tensor in left.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, right_state[key]), key


def _assert_same_state(left: torch.nn.Module, right: torch.nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for key, tensor in left_state.items():
        assert torch.equal(tensor, right_state[key]), key


# --- the numeric fixture produced by the original TensorFlow code ---


def test_reference_logits_match_original(reference_dir, reference_io):
    error = _relative_error(_reference_model(reference_dir), reference_io)
    print(f"relative logits error vs original: {error:.3g}")
    assert error <= 1e-4


def test_symmetric_padding_would_not_match(reference_dir, reference_io, monkeypatch):
    def symmetric(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
        pad = (kernel - 1) * dilation // 2
        return pad, pad

    model = _reference_model(reference_dir)
    monkeypatch.setattr(nets.layers, "same_padding", symmetric)
    assert _relative_error(model, reference_io) > 1e-2


def test_reference_npz_round_trip_is_bit_exact(reference_dir, tmp_path):
    model = _reference_model(reference_dir)
    with np.load(reference_dir / "ResNet-blocks1111.npz") as stored:
        original = {name: stored[name] for name in stored.files}
    exported = nets.model_to_npz_dict(model)
    assert exported.keys() == original.keys()
    for name, array in original.items():
        assert exported[name].dtype == np.float32
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    nets.save_npz(model, tmp_path / "copy.npz")
    with np.load(tmp_path / "copy.npz") as written:
        assert sorted(written.files) == sorted(original)
        for name, array in original.items():
            np.testing.assert_array_equal(written[name], array, err_msg=name)


def test_compressed_npz_with_tensorpack_tensor_names_loads(tmp_path):
    source = _randomise_statistics(nets.build_model("ResNet", **TINY))
    tensor_named = {f"{name}:0": array for name, array in nets.model_to_npz_dict(source).items()}
    np.savez_compressed(tmp_path / "tensor_names.npz", **tensor_named)
    target = nets.build_model("ResNet", **TINY)
    nets.load_weights(target, tmp_path / "tensor_names.npz")
    _assert_float_state_equal(source, target)


def test_conv_layout_is_hwio_and_linear_is_in_out(reference_dir):
    model = _reference_model(reference_dir)
    with np.load(reference_dir / "ResNet-blocks1111.npz") as stored:
        conv, linear = stored["group1/block0/conv2/W"], stored["linear/W"]
    weight = model.group1.block0.conv2.weight.detach().numpy()
    assert weight[5, 7, 2, 0] == conv[2, 0, 7, 5]
    assert model.linear.weight.detach().numpy()[3, 11] == linear[11, 3]


@pytest.mark.parametrize(
    ("arch", "size", "missing"),
    [
        ("ResNetDenoise", {"num_blocks": [1, 1, 1, 1]}, "group0_denoise/conv/W"),
        ("ResNet", {"depth": 50}, "group0/block1/conv1/W"),
        ("ResNeXtDenoiseAll", {"num_blocks": [1, 1, 1, 1]}, "group0/block0/non_local/conv/W"),
    ],
)
def test_other_architecture_npz_is_refused(reference_dir, arch, size, missing):
    model = nets.build_model(arch, **size)
    with pytest.raises(nets.CheckpointError, match="missing") as caught:
        nets.load_weights(model, reference_dir / "ResNet-blocks1111.npz")
    assert "ResNet-blocks1111.npz" in str(caught.value)
    assert missing in str(caught.value)


# --- the full-size manifests (built on the meta device: no initialisation cost) ---


@pytest.fixture(scope="module", params=MANIFESTS, ids=lambda p: f"{p[0]}-d{p[1]}")
def full_size(request, reference_dir) -> Iterator[tuple[torch.nn.Module, dict]]:
    arch, depth = request.param
    with torch.device("meta"):
        model = nets.build_model(arch, depth=depth)
    yield model, _manifest(reference_dir, arch, depth)


def test_exported_names_and_shapes_equal_manifest(full_size):
    model, manifest = full_size
    assert nets.npz_variable_shapes(model) == manifest


def test_zero_checkpoint_from_manifest_loads(full_size):
    model, manifest = full_size
    model = model.to_empty(device="cpu")
    zeros = {name: np.zeros(shape, np.float32) for name, shape in manifest.items()}
    nets.load_npz_dict(model, zeros)
    assert not model.conv0.weight.any()
    assert not model.linear.bias.any()
    assert not model.group3.block0.conv3.bn.running_var.any()


@pytest.mark.parametrize("kind", ["missing", "unexpected", "mis-shaped"])
def test_mismatched_variable_is_named(full_size, kind):
    model, manifest = full_size
    arrays = {name: np.zeros(shape, np.float32) for name, shape in manifest.items()}
    culprit = "group2/block1/conv2/W"
    if kind == "missing":
        del arrays[culprit]
    elif kind == "unexpected":
        culprit = "group2/block1/conv9/W"
        arrays[culprit] = np.zeros((1, 1, 4, 4), np.float32)
    else:
        arrays[culprit] = np.zeros((3, 3, 2, 2), np.float32)
    with pytest.raises(nets.CheckpointError, match=f"1 {kind}: {culprit}"):
        nets.load_npz_dict(model, arrays)


def test_error_lists_first_names_and_counts(reference_dir, tmp_path):
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1])
    np.savez(tmp_path / "empty.npz", unrelated=np.zeros(3, np.float32))
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(model, tmp_path / "empty.npz")
    message = str(caught.value)
    assert "87 missing: conv0/W" in message
    assert "... and 84 more" in message  # 3 names listed: the error stays short
    assert "1 unexpected: unrelated" in message


def test_duplicate_variable_and_tensor_name_is_refused(tmp_path):
    model = nets.build_model("ResNet", **TINY)
    arrays = nets.model_to_npz_dict(model)
    arrays["conv0/W:0"] = arrays["conv0/W"]
    with pytest.raises(nets.CheckpointError, match="stored twice: conv0/W"):
        nets.load_npz_dict(model, arrays)


# --- broken or dangerous files ---


def test_truncated_npz_is_refused(reference_dir, tmp_path):
    path = _cut_in_half(reference_dir / "ResNet-blocks1111.npz", tmp_path / "half.npz")
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1])
    with pytest.raises(nets.CheckpointError, match="half.npz"):
        nets.load_weights(model, path)


def test_truncated_pt_is_refused(tmp_path):
    model = nets.build_model("ResNet", **TINY)
    nets.save_weights(model, tmp_path / "full.pt")
    path = _cut_in_half(tmp_path / "full.pt", tmp_path / "half.pt")
    with pytest.raises(nets.CheckpointError, match="half.pt"):
        nets.load_weights(model, path)


def test_pickled_object_in_pt_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"model": _Malicious(marker)}, tmp_path / "evil.pt")
    model = nets.build_model("ResNet", **TINY)
    with pytest.raises(nets.CheckpointError, match="evil.pt.*weights_only"):
        nets.load_weights(model, tmp_path / "evil.pt")
    assert not marker.exists()


def test_pickled_object_in_npz_is_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", **{"conv0/W": np.array([{"a": 1}], dtype=object)})
    model = nets.build_model("ResNet", **TINY)
    with pytest.raises(nets.CheckpointError, match="objects.npz"):
        nets.load_weights(model, tmp_path / "objects.npz")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.npz", None, "no such checkpoint file"),
        ("weights.h5", b"\x89HDF", "unknown checkpoint extension"),
        ("garbage.npz", b"not a zip file at all", "unreadable .npz"),
        ("garbage.pt", b"not a zip file at all", "garbage.pt"),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    model = nets.build_model("ResNet", **TINY)
    with pytest.raises(nets.CheckpointError, match=message) as caught:
        nets.load_weights(model, path)
    assert name in str(caught.value)


def test_single_array_file_is_refused(tmp_path):
    with open(tmp_path / "array.npz", "wb") as file:
        np.save(file, np.zeros(3, np.float32))
    model = nets.build_model("ResNet", **TINY)
    with pytest.raises(nets.CheckpointError, match="array.npz.*single array"):
        nets.load_weights(model, tmp_path / "array.npz")


# --- this project's own .pt format ---


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", nets.available_architectures())
def test_pt_round_trip(arch, suffix, tmp_path):
    source = _randomise_statistics(_tiny(arch))
    nets.save_weights(source, tmp_path / f"weights{suffix}")
    target = _tiny(arch)
    nets.load_weights(target, tmp_path / f"weights{suffix}")
    _assert_same_state(source, target)


@pytest.mark.parametrize("arch", ORIGINAL_LAYOUT)
def test_npz_round_trip_of_every_architecture(arch, tmp_path):
    source = _randomise_statistics(nets.build_model(arch, **TINY))
    nets.save_npz(source, tmp_path / "weights.npz")
    target = nets.build_model(arch, **TINY)
    nets.load_weights(target, tmp_path / "weights.npz")
    exported = nets.model_to_npz_dict(target)
    for name, array in nets.model_to_npz_dict(source).items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    _assert_float_state_equal(source, target)


def test_training_checkpoint_dict_loads(tmp_path):
    source = _randomise_statistics(nets.build_model("ResNetDenoise", **TINY))
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    target = nets.build_model("ResNetDenoise", **TINY)
    nets.load_weights(target, tmp_path / "checkpoint.pt")
    _assert_same_state(source, target)


def test_pt_mismatch_is_named(tmp_path):
    state = nets.build_model("ResNet", **TINY).state_dict()
    del state["group1.block0.conv1.weight"]
    state["group1.block0.extra"] = torch.zeros(1)
    state["linear.bias"] = torch.zeros(11)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(nets.build_model("ResNet", **TINY), tmp_path / "bad.pt")
    message = str(caught.value)
    assert "bad.pt" in message
    assert "1 missing: group1.block0.conv1.weight" in message
    assert "1 unexpected: group1.block0.extra" in message
    assert "1 mis-shaped: linear.bias (file 11, model 10)" in message


def test_failed_save_leaves_previous_file_and_no_temporary(tmp_path, monkeypatch):
    model = nets.build_model("ResNet", **TINY)
    path = tmp_path / "weights.npz"
    path.write_bytes(b"previous")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        nets.save_npz(model, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.npz"]
