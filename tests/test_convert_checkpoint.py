"""python -m iat.convert_checkpoint: timm and torchvision state dicts (plain, wrapped, RobustBench
-normalised, .safetensors) become self-describing weights whose logits on BGR pixels are the
reference's (tests/data/reference_models), loaded by nets.load_model, --eval and
--finetune-checkpoint without architecture flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import write_imagenet
from reference_weights import CASES, IMAGENET_MEAN, IMAGENET_STD, seeded_pixels
from test_reference_models import ATOL, FIXTURES, RTOL, reference_state

import nets
from iat.convert.checkpoint import main as convert_main
from iat.convert.checkpoint import matched_state, plan_architecture
from main import main


def _write(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _convert(src: Path, out: Path, name: str, *extra: str) -> int:
    case = CASES[name]
    return convert_main(
        [str(src), str(out), "--source", case["source"], "--arch", case["arch"], *extra]
    )


def _logits(model: torch.nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(seeded_pixels(CASES[name]["image_size"]))


# How each case's file is wrapped: every wrapper on some layout.
WRAPPERS = {
    "convnext": ("plain", ".pth"),
    "convnext_convstem": ("base_model", ".pth"),
    "convnext_b_convstem": ("plain", ".safetensors"),
    "vit_convstem": ("robustbench", ".pt"),  # the authors' vit_s_cvst is normalize_model'ed
    "vit": ("module", ".pt"),
    "vit_at_112": ("model", ".safetensors"),
    "vit_huge": ("plain", ".safetensors"),
    "vit_giant_at_112": ("state_dict", ".pt"),
    "swin": ("state_dict", ".pth"),
    "resnet": ("robustbench", ".pt"),
    "wide_resnet": ("madrylab", ".pt"),
}


def _wrapped(state: dict, wrapper: str) -> dict:
    if wrapper == "module":
        return {f"module.{k}": v for k, v in state.items()}
    if wrapper in ("model", "base_model"):
        return {f"{wrapper}.{k}": v for k, v in state.items()}
    if wrapper == "state_dict":
        return {"state_dict": state, "epoch": torch.tensor(300)}
    if wrapper == "madrylab":  # robustness' AttackerModel, DataParallel'ed
        model = _wrapped(state, "model")
        normaliser = {
            "normalizer.new_mean": torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
            "normalizer.new_std": torch.tensor(IMAGENET_STD).view(3, 1, 1),
        }
        attacker = {f"attacker.{k}": v for k, v in {**model, **normaliser}.items()}
        return {f"module.{k}": v for k, v in {**model, **normaliser, **attacker}.items()}
    if wrapper == "robustbench":  # normalize_model(model, mean, std), DataParallel'ed
        normaliser = {
            "normalize.mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
            "normalize.std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
        }
        return {f"module.{k}": v for k, v in {**normaliser, **_wrapped(state, "model")}.items()}
    return state


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_logits_match_the_reference(name: str, tmp_path: Path, capsys) -> None:
    wrapper, suffix = WRAPPERS[name]
    src = _write(_wrapped(reference_state(name), wrapper), tmp_path / f"src{suffix}")
    out = tmp_path / "converted.pt"
    assert _convert(src, out, name) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = nets.load_model(out)
    assert not model.training
    expected = torch.tensor(FIXTURES[name]["logits"])
    torch.testing.assert_close(_logits(model, name), expected, atol=ATOL, rtol=RTOL)
    record = nets.read_weights(out).architecture
    assert (record["arch"], record["width"], record["num_classes"]) == (
        CASES[name]["arch"],
        CASES[name]["width"],
        10,
    )
    assert record["num_blocks"] == list(CASES[name]["num_blocks"])


def _full_size_state(arch: str) -> dict[str, torch.Tensor]:
    """timm's full-size state dict of `arch` as meta tensors: the fixture's first block's shapes
    repeated for every block."""
    reference = FIXTURES["full_size"][arch]
    state = {}
    for key, shape in reference["shapes"]:
        blocks = range(reference["blocks"]) if key.startswith("blocks.0.") else [0]
        for block in blocks:
            state[key.replace("blocks.0.", f"blocks.{block}.")] = torch.empty(shape, device="meta")
    return state


@pytest.mark.parametrize("arch", sorted(FIXTURES["full_size"]))
def test_full_size_timm_state_dicts_are_read_as_the_published_size(arch: str) -> None:
    """A full-size ViT-H/14 or ViT-g/14 checkpoint of timm's shapes (on the meta device): its
    size reads as the published one and every tensor maps by name and shape."""
    state = _full_size_state(arch)
    record = plan_architecture("timm.pth", arch, state)
    assert (record.depth, record.num_blocks, record.width, record.num_classes) == (
        nets.depths_of(arch)[0],
        None,
        64,
        1000,
    )
    with torch.device("meta"):
        matched = matched_state("timm.pth", record.build(), state, arch)
    assert set(matched) == {*state, "preprocess.mean", "preprocess.std"}


def test_mean_and_std_are_folded_into_the_model(tmp_path: Path) -> None:
    src = _write(reference_state("convnext"), tmp_path / "src.pth")
    out = tmp_path / "converted.safetensors"
    assert _convert(src, out, "convnext", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.5,1") == 0
    model = nets.load_model(out)
    pixels = seeded_pixels(64)
    rgb = pixels.flip(1) / 255.0
    normalised = (rgb - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = model.head(model.stages(model.stem(normalised)))
        torch.testing.assert_close(model(pixels), direct, atol=1e-6, rtol=1e-6)


def test_a_mismatch_is_one_error_naming_every_tensor_and_nothing_is_written(
    tmp_path: Path, capsys
) -> None:
    state = reference_state("convnext")
    state["stages.0.blocks.0.gamma"] = torch.zeros(5)  # mis-shaped
    del state["head.norm.bias"]  # missing
    state["head.extra.weight"] = torch.zeros(3)  # unmapped
    src = _write(state, tmp_path / "src.pth")
    out = tmp_path / "converted.pt"
    assert _convert(src, out, "convnext") == 1
    error = capsys.readouterr().err
    assert error.count("error:") == 1
    assert "1 unmapped: head.extra.weight" in error
    assert "1 missing: head.norm.bias" in error
    assert "1 mis-shaped: stages.0.blocks.0.gamma (file 5, model 12)" in error
    assert not out.exists()


def test_a_name_of_the_other_library_or_unknown_is_refused(tmp_path: Path, capsys) -> None:
    src = _write(reference_state("resnet"), tmp_path / "src.pth")
    out = tmp_path / "converted.pt"
    argv = [str(src), str(out), "--source", "timm", "--arch", "resnet50"]
    assert convert_main(argv) == 1
    error = capsys.readouterr().err
    assert "--arch resnet50: not a timm model this project has; timm names: " in error
    assert "convnext_tiny" in error and "vit_s_cvst" in error
    assert not out.exists()


def test_flags_that_contradict_robustbench_normalisation_are_refused(tmp_path: Path, capsys):
    src = _write(_wrapped(reference_state("resnet"), "robustbench"), tmp_path / "src.pt")
    assert _convert(src, tmp_path / "out.pt", "resnet", "--mean", "0.5,0.5,0.5") == 1
    assert "--mean 0.5,0.5,0.5 differs from its normalisation wrapper's" in capsys.readouterr().err


def test_eval_and_finetune_take_a_converted_file_without_architecture_flags(tmp_path: Path):
    src = _write(reference_state("convnext"), tmp_path / "src.pth")
    converted = tmp_path / "convnext.pt"
    assert _convert(src, converted, "convnext") == 0
    data = write_imagenet(tmp_path / "data", classes=4)
    common = ["--data", str(data), "--image-size", "32", "--batch", "4", "--workers", "0"]
    result = tmp_path / "eval.json"
    evaluate = [  # the README's second command, small
        "--eval", "--load", str(converted), *common, "--attack", "strong", "--attack-iter", "1",
        "--attack-epsilon", "4", "--masking-checks", "0", "--threads", "1",
        "--eval-output", str(result), "--class-subset",  # 4 of its 10 classes
    ]  # fmt: skip
    assert main(evaluate) == 0
    assert json.loads(result.read_text())["images"] == 7
    run = tmp_path / "run"
    finetune = [
        "--finetune-checkpoint", str(converted), "--finetune-exclude-scopes", "head/fc",
        *common, "--loader", "local", "--logdir", str(run), "--attack-iter", "1",
        "--attack-epsilon", "4", "--steps-per-epoch", "1", "--epochs", "1",
        "--train-eval", "none", "--threads", "1",
    ]  # fmt: skip
    assert main(finetune) == 0
    trained = nets.read_weights(run / "checkpoint-epoch0001.pt")
    assert trained.architecture["arch"] == "convnext_tiny"
    assert trained.num_classes == 4
    start = nets.load_model(converted).state_dict()
    # Loaded, then trained: a block's depthwise kernel moved from the converted one, a little.
    moved = (
        trained.tensors["stages.0.blocks.0.conv_dw.weight"]
        - start["stages.0.blocks.0.conv_dw.weight"]
    )
    assert 0 < moved.abs().max() < 0.5


def test_safetensors_carry_the_architecture_record_in_their_metadata(tmp_path: Path) -> None:
    model = nets.build_model("vit_small_patch16_224", num_blocks=(1,), width=8, num_classes=5)
    record = {"arch": "vit_small_patch16_224", "depth": None, "num_blocks": [1], "width": 8,
              "num_classes": 5}  # fmt: skip
    path = tmp_path / "vit.safetensors"
    nets.save_weights(model, path, architecture=record)
    metadata = safetensors.safe_open(str(path), framework="pt").metadata()
    complete = nets.ArchitectureRecord.from_dict(record).to_dict()  # written with its defaults
    assert json.loads(metadata["architecture"]) == complete
    assert nets.read_weights(path).architecture == complete
    loaded = nets.load_model(path)
    pixels = seeded_pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), model.eval()(pixels), atol=0, rtol=0)


def test_load_model_needs_a_record(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    nets.save_weights(nets.build_model("resnet50", num_blocks=(1, 1, 1, 1), width=8), path)
    with pytest.raises(nets.CheckpointError, match="records no architecture"):
        nets.load_model(path)
