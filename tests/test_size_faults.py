"""Sizes read from a file are checked before anything is allocated (issue 32): an architecture
record against the registry's limits and the file's own tensors (on the meta device), an
expanded (stride-0) tensor against its storage, a state dict to convert against its declared
architecture. Every refusal is one line naming the file and the field or tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_checkpoint_faults import TINY_FLAGS, tiny_model
from test_convert_checkpoint import _convert, _write
from test_reference_models import reference_state
from test_run_state_faults import eval_args, write_run_checkpoint
from test_train import error_line

import nets
from iat.runs.state import SET_ASIDE_SUFFIX, list_checkpoints, plan_start
from main import main
from nets import registry

HUGE = 2_500_000_000  # elements: 10 GB of float32, a few hundred bytes on disk when expanded


@pytest.fixture
def meta_only(monkeypatch):
    """A function after whose call the test fails when any registered model is built
    elsewhere than on the meta device."""

    def forbid() -> None:
        for name, entry in list(registry._REGISTRY.items()):

            def builder(*args, _build=entry.builder, **kwargs):
                assert torch.empty(0).device.type == "meta", "a model was built before the check"
                return _build(*args, **kwargs)

            replaced = dataclasses.replace(entry, builder=builder)
            monkeypatch.setitem(registry._REGISTRY, name, replaced)

    return forbid


def recorded(path: Path, **fields: object) -> Path:
    """The tiny model's weights with an architecture record of `fields` (over its own)."""
    record = {"arch": "ResNet", "num_blocks": [1, 1, 1, 1], "width": 8, "num_classes": 10}
    contents = {"model": tiny_model().state_dict(), "architecture": {**record, **fields}}
    if path.suffix == ".safetensors":
        metadata = {"architecture": json.dumps(contents["architecture"])}
        safetensors.torch.save_file(contents["model"], str(path), metadata=metadata)
    else:
        torch.save(contents, path)
    return path


# --- architecture records: limits, and the file's own tensors, before building ----------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_record_wider_than_its_tensors_is_refused_before_building(tmp_path, meta_only, suffix):
    path = recorded(tmp_path / f"w{suffix}", width=640)
    meta_only()
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: does not match the model (it was trained as ResNet ")
    assert "width 640" in message and "(file 8, model 640)" in message


def test_a_record_beyond_the_limits_is_refused_naming_the_field(tmp_path, meta_only):
    path = recorded(tmp_path / "w.pt", num_blocks=[1, 1, 1, 5000])
    meta_only()
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_model(path)
    assert str(caught.value) == (
        f"{path}: field 'architecture' is not a valid architecture record (num_blocks "
        "[1, 1, 1, 5000] is beyond the limit of 128)"
    )


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"width": 640}, "width 640"),
        ({"num_blocks": [1, 1, 1, 5000]}, "num_blocks [1, 1, 1, 5000] is beyond the limit of 128"),
    ],
)
def test_eval_of_a_forged_record_is_one_line(
    tiny_imagenet, tmp_path, capsys, meta_only, fields, said
):
    path = recorded(tmp_path / "w.pt", **fields)
    meta_only()
    assert main(eval_args(tiny_imagenet, path, tmp_path / "e.json")) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: ") and said in line
    assert not (tmp_path / "e.json").exists()


def test_flags_beyond_the_limits_are_refused(meta_only):
    meta_only()
    with pytest.raises(ValueError, match="width 5000 is beyond the limit of 1024"):
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=5000)


# --- expanded (stride-0) tensors: refused from their storage's size ----------------------------
@pytest.mark.parametrize("field", ["model", "ema", "optimizer"])
def test_an_expanded_tensor_is_refused_before_it_is_read(tmp_path, field):
    expanded = torch.zeros(1).expand(HUGE)
    state = tiny_model().state_dict()
    contents = {"model": state, "epoch": 1, "step": 2, "optimizer": {"state": {}}}
    if field == "optimizer":
        contents["optimizer"] = {"state": {0: {"momentum_buffer": expanded}}, "param_groups": []}
    else:
        contents[field] = {**state, "linear.bias": expanded}
    path = tmp_path / "w.pt"
    torch.save(contents, path)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(nets.CheckpointError) as caught:
        nets.read_weights(path)
    name = "optimizer.state.0.momentum_buffer" if field == "optimizer" else f"{field}.linear.bias"
    assert str(caught.value) == (
        f"{path}: tensor {name} declares {HUGE} ({4 * HUGE} bytes) but its storage holds 4 bytes "
        "(an expanded view); nothing was allocated for it"
    )


def test_an_expanded_newest_checkpoint_is_set_aside_and_the_previous_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    older = write_run_checkpoint(run)
    contents = torch.load(older, weights_only=True)
    key = "group1.block0.conv2.weight"
    shape = contents["model"][key].shape
    contents["ema"] = {**contents["model"], key: torch.zeros(1).expand(shape)}  # its own shape
    newest = run / "checkpoint-epoch0002.pt"
    torch.save(contents, newest)
    start = plan_start(run, None, 1)
    assert (start.kind, start.weights.source) == ("resume", str(older))
    assert list_checkpoints(run) == [older]
    assert (run / f"checkpoint-epoch0002.pt{SET_ASIDE_SUFFIX}").is_file()
    assert f"tensor ema.{key} declares" in capsys.readouterr().err


# --- python -m iat.convert_checkpoint: sizes checked before any model is built -----------------
def convert_vit(tmp_path: Path, state: dict, capsys) -> tuple[Path, str]:
    src = _write(state, tmp_path / "src.pt")
    out = tmp_path / "converted.pt"
    assert _convert(src, out, "vit") == 1
    assert not out.exists()
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: {src}: ")
    return src, error


def test_conversion_refuses_an_expanded_classifier(tmp_path, capsys, meta_only):
    state = reference_state("vit")
    state["head.bias"] = torch.zeros(1).expand(10_000_000)
    meta_only()
    _, error = convert_vit(tmp_path, state, capsys)
    assert "tensor head.bias declares 10000000 (40000000 bytes) but its storage holds 4" in error


def test_conversion_refuses_a_block_index_beyond_the_limit(tmp_path, capsys, meta_only):
    state = {**reference_state("vit"), "blocks.19999.norm1.weight": torch.zeros(48)}
    meta_only()
    _, error = convert_vit(tmp_path, state, capsys)
    assert "tensor blocks.19999.norm1.weight: num_blocks [20000] is beyond the limit" in error


def test_conversion_refuses_an_empty_wide_stem_before_building(tmp_path, capsys, meta_only):
    state = {**reference_state("vit"), "patch_embed.proj.weight": torch.zeros(6144, 0, 16, 16)}
    meta_only()
    _, error = convert_vit(tmp_path, state, capsys)
    assert "mis-shaped: " in error and "patch_embed.proj.weight (file 6144x0x16x16" in error


def test_conversion_refuses_non_finite_weights_and_writes_nothing(tmp_path, capsys):
    state = reference_state("vit")
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    _, error = convert_vit(tmp_path, state, capsys)
    assert "1 tensor(s) hold NaN or Inf: blocks.1.mlp.fc1.weight" in error


def test_conversion_into_a_missing_folder_is_refused(tmp_path, capsys):
    src = _write(reference_state("vit"), tmp_path / "src.pt")
    out = tmp_path / "missing" / "converted.pt"
    assert _convert(src, out, "vit") == 1
    assert capsys.readouterr().err == (
        f"error: {out}: no folder {out.parent} to write into; create it first\n"
    )
    assert not out.parent.exists()


def test_eval_flags_are_checked_against_plain_weights_before_building(
    tiny_imagenet, tmp_path, capsys, meta_only
):
    path = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), path)
    meta_only()
    flags = [*TINY_FLAGS[:-4], "--width", "640", "--num-classes", "10"]
    assert main([*eval_args(tiny_imagenet, path, tmp_path / "e.json"), *flags]) == 1
    assert "mis-shaped: conv0.weight (file 8x3x7x7, model 640x3x7x7)" in error_line(capsys)


def test_classes_counted_from_a_final_layer_beyond_the_limit_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({**tiny_model().state_dict(), "linear.bias": torch.zeros(200_000)}, path)
    with pytest.raises(nets.CheckpointError) as caught:
        _ = nets.read_weights(path).num_classes
    assert str(caught.value) == (
        f"{path}: tensor linear.bias: num_classes 200000 is beyond the limit of 100000"
    )


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_a_sparse_tensor_is_refused_before_it_is_densified(tmp_path):
    path = tmp_path / "w.pt"
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (HUGE,))
    torch.save({**tiny_model().state_dict(), "linear.bias": sparse}, path)
    with pytest.raises(nets.CheckpointError, match=r"tensor linear\.bias is sparse_coo, not dense"):
        nets.read_weights(path)
