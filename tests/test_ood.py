"""--eval-set imagenet-c / imagenet-r: errors, CE and mCE checked against direct model calls."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import nets
from iat.data.augment import eval_transform
from iat.eval.ood import ALEXNET_ERRORS, class_index
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
WNIDS = ["n01440764", "n01443537", "n09468604"]  # ImageNet-1k classes 0, 1 and a later one


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=1000)
    with torch.no_grad():  # predictions that depend on the image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path_factory.mktemp("model") / "w.pt"
    nets.save_weights(model, path)
    return path, model.eval()


def _write(folder: Path, count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"img{i}.png"), pixels)


def _logits(model: torch.nn.Module, files: list[Path]) -> torch.Tensor:
    images = np.stack([cv2.imread(str(f)) for f in files])  # BGR, as the loader reads them
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).float())


def test_imagenet_c_errors_ce_and_mce(model_file, tmp_path: Path, capsys):
    path, model = model_file
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet-c"
    severities = {"gaussian_noise": "12345", "speckle_noise": "12", "snow": "12"}
    for corruption, levels in severities.items():  # one of the 15, one extra, one incomplete
        for severity in levels:
            for wnid in WNIDS[:2]:
                _write(root / corruption / severity / wnid, 2, rng)
    out = tmp_path / "c.json"
    args = ["--eval", "--load", str(path), "--data", str(root), "--eval-set", "imagenet-c",
            *TINY, "--image-size", "32", "--batch", "4", "--workers", "0",
            "--eval-output", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    index = class_index()
    for corruption, levels in severities.items():
        for severity in levels:
            files = sorted((root / corruption / severity).glob("*/*.png"))
            labels = torch.tensor([index[f.parent.name] for f in files])
            error = (_logits(model, files).argmax(1) != labels).float().mean().item()
            got = record["corruptions"][corruption]["errors"][severity]
            assert got == pytest.approx(error), (corruption, severity)
    gaussian = record["corruptions"]["gaussian_noise"]
    mean = sum(gaussian["errors"].values()) / 5
    assert gaussian["ce"] == pytest.approx(mean / ALEXNET_ERRORS["gaussian_noise"])
    assert record["corruptions"]["speckle_noise"]["ce"] is None  # not one of the 15
    assert record["corruptions"]["snow"]["ce"] is None  # severities 1-2 only: no CE
    assert "snow: mean error" in printed and "(CE needs severities 1-5)" in printed
    assert record["mce"] == pytest.approx(gaussian["ce"]) and record["mce_corruptions"] == 1
    assert record["images"] == 36
    assert "imagenet-c: mCE" in printed and "over 1 of the 15 corruptions" in printed


def test_imagenet_r_restricts_the_logits_to_its_classes(model_file, tmp_path: Path, capsys):
    path, model = model_file
    root = tmp_path / "imagenet-r"
    for wnid in WNIDS:
        _write(root / wnid, 3, np.random.default_rng(len(wnid) + int(wnid[1:])))
    out = tmp_path / "r.json"
    args = ["--eval", "--load", str(path), "--data", str(root), "--eval-set", "imagenet-r",
            *TINY, "--image-size", "32", "--batch", "4", "--workers", "0",
            "--eval-output", str(out)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    files = sorted(root.glob("*/*.png"))
    index = class_index()
    kept = [index[w] for w in WNIDS]
    logits = _logits(model, files)[:, kept]  # only its classes compete
    labels = torch.tensor([WNIDS.index(f.parent.name) for f in files])
    assert record["top1_error"] == pytest.approx((logits.argmax(1) != labels).float().mean().item())
    assert record["classes"] == 3 and record["images"] == 9
    assert "logits restricted to its 3 classes" in capsys.readouterr().out


def test_eval_set_refuses_what_it_cannot_score(model_file, tmp_path: Path, capsys):
    path, _ = model_file
    root = tmp_path / "imagenet-a"
    _write(root / "not_a_wnid", 1, np.random.default_rng(0))
    base = ["--eval", "--data", str(root), "--eval-set", "imagenet-a", *TINY, "--workers", "0"]
    capsys.readouterr()
    assert main([*base, "--load", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_a_wnid is not an ImageNet-1k class" in err[0], err
    small = tmp_path / "small.pt"
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=10), small
    )
    assert main([*base, "--load", str(small)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a 1000-class ImageNet model, got 10" in err[0], err


def _all_classes_folder(root: Path, names: list[str], filled: dict[str, int]) -> list[Path]:
    """Every class folder of `names` under `root` (as the releases hold them), images in those
    of `filled` only (name -> count); the image files, in the loader's order."""
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, count in filled.items():
        _write(root / name, count, np.random.default_rng(len(name) + count))
    return [f for name in names for f in sorted((root / name).glob("*.png"))]


def _run_all_classes(
    model_file, root: Path, eval_set: str, out: Path, capsys
) -> tuple[dict, torch.Tensor]:
    path, model = model_file
    args = ["--eval", "--load", str(path), "--data", str(root), "--eval-set", eval_set,
            *TINY, "--image-size", "32", "--batch", "4", "--workers", "0",
            "--eval-output", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert f"{eval_set}: top-1 error" in capsys.readouterr().out
    return json.loads(out.read_text()), model


def _errors(model: torch.nn.Module, files: list[Path], labels: list[int]) -> tuple[float, float]:
    """Top-1 and top-5 error of direct model calls on the validation crops the loader makes."""
    images = np.stack([eval_transform(cv2.imread(str(f)), 32) for f in files])
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    target = torch.tensor(labels)
    top1 = (logits.argmax(1) != target).float().mean().item()
    top5 = (~(logits.topk(5, 1).indices == target[:, None]).any(1)).float().mean().item()
    return top1, top5


def test_imagenet_sketch_scores_all_1000_classes(model_file, tmp_path: Path, capsys):
    index = class_index()
    wnids = sorted(index)
    root = tmp_path / "ImageNet-Sketch"  # the release unpacks to sketch/<wnid>/*
    files = _all_classes_folder(root / "sketch", wnids, {WNIDS[0]: 2, WNIDS[2]: 3, wnids[-1]: 2})
    record, model = _run_all_classes(
        model_file, root, "imagenet-sketch", tmp_path / "s.json", capsys
    )
    top1, top5 = _errors(model, files, [index[f.parent.name] for f in files])
    assert record["eval_set"] == "imagenet-sketch" and record["classes"] == 1000
    assert record["images"] == 7
    assert record["top1_error"] == pytest.approx(top1)
    assert record["top5_error"] == pytest.approx(top5)


def test_imagenet_v2_folder_k_is_the_kth_sorted_wordnet_id(model_file, tmp_path: Path, capsys):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    names = [str(k) for k in range(1000)]
    files = _all_classes_folder(root, names, {"0": 2, "1": 2, "999": 3})
    labels = [int(f.parent.name) for f in files]
    # the class map's sorted order: folder 999 is the last WordNet id, n15075141 (toilet tissue)
    assert sorted(class_index())[999] == "n15075141" and class_index()["n15075141"] == 999
    record, model = _run_all_classes(model_file, root, "imagenet-v2", tmp_path / "v.json", capsys)
    top1, top5 = _errors(model, files, labels)
    assert record["eval_set"] == "imagenet-v2" and record["images"] == 7
    assert record["top1_error"] == pytest.approx(top1)
    assert record["top5_error"] == pytest.approx(top5)


@pytest.mark.parametrize(
    ("eval_set", "change", "words"),
    [
        ("imagenet-v2", lambda root: (root / "17").rmdir(), "1 of its 1000 class folders are not"),
        ("imagenet-v2", lambda root: (root / "0017").mkdir(), "0017 is not one of its 1000 class"),
        ("imagenet-v2", lambda root: (root / "1000").mkdir(), "1000 is not one of its 1000 class"),
        ("imagenet-sketch", lambda root: (root / "n01440764").rmdir(), "(first: n01440764)"),
        ("imagenet-sketch", lambda root: (root / "cat").mkdir(), "cat is not one of its 1000"),
    ],
)
def test_sketch_and_v2_refuse_an_incomplete_release(
    model_file, tmp_path: Path, capsys, eval_set, change, words
):
    path, _ = model_file
    sketch = eval_set == "imagenet-sketch"
    names = sorted(class_index()) if sketch else [str(k) for k in range(1000)]
    root = tmp_path / "set"
    _all_classes_folder(root, names, {names[5]: 1})
    change(root)
    capsys.readouterr()
    args = ["--eval", "--load", str(path), "--data", str(root), "--eval-set", eval_set, *TINY,
            "--workers", "0"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_v2_needs_the_class_map_in_sorted_order(monkeypatch, tmp_path: Path):
    from iat.eval import ood

    shuffled = dict(zip(sorted(class_index()), [1, 0, *range(2, 1000)], strict=True))
    monkeypatch.setattr(ood, "class_index", lambda: shuffled)
    with pytest.raises(ood.DataError, match="not the WordNet ids' sorted order"):
        ood.v2_samples(tmp_path)


def test_data_it_cannot_score_is_one_line_naming_it(model_file, tmp_path: Path, capsys):
    """An empty ImageNet-C severity is never scored as error 0 (nor enters CE and mCE), empty
    ImageNet-R / -A class folders are not "0 images", and an image too small for the crop is
    named."""
    path, _ = model_file
    rng = np.random.default_rng(0)
    base = ["--eval", "--load", str(path), *TINY, "--image-size", "32", "--workers", "0"]
    c = tmp_path / "imagenet-c"
    for severity in "12345":
        _write(c / "gaussian_noise" / severity / WNIDS[0], 0 if severity == "3" else 1, rng)
    r = tmp_path / "imagenet-r"
    (r / WNIDS[0]).mkdir(parents=True)
    small = tmp_path / "small-c"
    _write(small / "snow" / "1" / WNIDS[0], 2, rng)
    tiny = small / "snow" / "1" / WNIDS[0] / "img1.png"
    assert cv2.imwrite(str(tiny), np.zeros((8, 40, 3), np.uint8))
    for data, eval_set, words in (
        (c, "imagenet-c", f"{c / 'gaussian_noise' / '3'} holds no images"),
        (r, "imagenet-r", "class folders hold no images"),
        (small, "imagenet-c", f"{tiny} is 8x40, smaller than the 32x32 crop"),
    ):
        capsys.readouterr()
        assert main([*base, "--data", str(data), "--eval-set", eval_set]) == 1
        err = capsys.readouterr().err  # after the progress bar: one error line
        assert err.count("error:") == 1 and words in err.splitlines()[-1], err
