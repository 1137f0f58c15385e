"""Robustness outside the threat model: ``--eval --eval-set imagenet-c|imagenet-r|imagenet-a``.

* **ImageNet-C** (Hendrycks & Dietterich, ICLR 2019): ``--data`` holds
  ``corruption/severity/wnid/*``; the clean model's top-1 error per corruption and severity,
  each corruption's Corruption Error CE = (sum of its errors over the severities) / (AlexNet's),
  and the mean CE (mCE) over the 15 benchmark corruptions present (Sec 3 of the paper; AlexNet's
  errors as the authors publish them). Its images are 224 x 224 crops already: only the centre
  crop is taken.
* **ImageNet-R** (Hendrycks et al., ICCV 2021) and **ImageNet-A** (Hendrycks et al., CVPR 2021):
  ``--data`` holds ``wnid/*`` for their 200 classes; top-1 error with the logits restricted to
  the classes present (as their authors and EasyRobust evaluate them), the usual validation
  preprocessing.

* **ImageNet-Sketch** (Wang et al., NeurIPS 2019): ``--data`` is its ``sketch`` folder (or the
  folder holding it): ``wnid/*`` for all 1000 classes; **ImageNet-V2** (Recht et al., ICML
  2019; any of its three sets, e.g. ``imagenetv2-matched-frequency-format-val``): folders named
  by the class index, ``0`` to ``999``, which is the position of the WordNet id in sorted order.
  Both: top-1 / top-5 error over all 1000 logits, the usual validation preprocessing.

Class folders map to the model's logits through ImageNet-1k's WordNet ids in their sorted order
(``iat/data/reference/imagenet_class_to_id_map.json``): a 1000-class ImageNet model is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from iat.config import Config
from iat.data.augment import center_crop_transform, eval_transform
from iat.data.layouts import IMAGE_EXTENSIONS, DataError, Sample, read_image_bgr
from iat.eval.metrics import EvalResult

CLASS_MAP = Path(__file__).parent.parent / "data" / "reference" / "imagenet_class_to_id_map.json"
# AlexNet's top-1 error per corruption, averaged over the 5 severities (Hendrycks & Dietterich
# 2019; the values their evaluation code normalises by).
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip
SEVERITIES = ("1", "2", "3", "4", "5")

Evaluate = Callable[[nn.Module, list[Sample], Callable, str], EvalResult]


class RestrictedLogits(nn.Module):
    """`model`'s logits at `classes` only: class i of the subset is logit classes[i]."""

    def __init__(self, model: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("classes", torch.tensor(classes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.classes.to(x.device)]


def class_index() -> dict[str, int]:
    return json.loads(CLASS_MAP.read_text())


def _images(folder: Path) -> list[Path]:
    images = (p for p in folder.iterdir() if p.is_file())
    return sorted(p for p in images if p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path, index: dict[str, int], what: str) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(f"{what}: {root / unknown[0]} is not an ImageNet-1k class (WordNet id)")
    if not folders:
        raise DataError(f"{what}: {root} holds no class folders")
    return folders


def corruption_samples(root: Path) -> dict[tuple[str, str], list[Sample]]:
    """ImageNet-C's ``corruption/severity/wnid/*`` as samples labelled with the 1000-class
    index of their WordNet id, per (corruption, severity)."""
    if not root.is_dir():
        raise DataError(f"--eval-set imagenet-c: {root} is not a directory")
    index = class_index()
    found: dict[tuple[str, str], list[Sample]] = {}
    for corruption in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "."):
        for severity in sorted(p for p in corruption.iterdir() if p.is_dir() and p.name[0] != "."):
            if severity.name not in SEVERITIES:
                raise DataError(
                    f"--eval-set imagenet-c: {severity} is not a severity folder (1 to 5)"
                )
            what = f"--eval-set imagenet-c {corruption.name}/{severity.name}"
            found[corruption.name, severity.name] = [
                (str(image), index[folder.name])
                for folder in _class_folders(severity, index, what)
                for image in _images(folder)
            ]
            if not found[corruption.name, severity.name]:  # never scored as error 0 in its CE
                raise DataError(f"{what}: {severity} holds no images")
    if not found:
        raise DataError(f"--eval-set imagenet-c: {root} holds no corruption/severity folders")
    return found


def subset_samples(root: Path, name: str) -> tuple[list[Sample], list[int]]:
    """ImageNet-R / -A's ``wnid/*``: samples labelled by position among the classes present,
    and those classes' 1000-class indices (the logits kept)."""
    if not root.is_dir():
        raise DataError(f"--eval-set {name}: {root} is not a directory")
    index = class_index()
    folders = _class_folders(root, index, f"--eval-set {name}")
    samples = [(str(image), i) for i, folder in enumerate(folders) for image in _images(folder)]
    if not samples:
        raise DataError(f"--eval-set {name}: {root}'s class folders hold no images")
    return samples, [index[f.name] for f in folders]


def evaluate_set(cfg: Config, model: nn.Module, evaluate: Evaluate) -> tuple[dict, list[str]]:
    """The record and the summary lines of --eval-set on `model` (1000 classes), each image
    scored clean through `evaluate(model, samples, transform, description)`."""
    if cfg.num_classes != len(class_index()):
        raise ValueError(
            f"--eval-set {cfg.eval_set}: needs a 1000-class ImageNet model, got {cfg.num_classes}"
        )
    root = Path(cfg.data)
    if cfg.eval_set == "imagenet-c":
        return _corruptions(root, model, evaluate, cfg.image_size)
    if cfg.eval_set in ALL_CLASS_SETS:
        return _all_classes(cfg.eval_set, ALL_CLASS_SETS[cfg.eval_set](root), model, evaluate)
    samples, classes = subset_samples(root, cfg.eval_set)
    result = evaluate(
        RestrictedLogits(model, classes), samples, eval_transform, f"eval {cfg.eval_set}"
    )
    record = {"eval_set": cfg.eval_set, "classes": len(classes), **result.as_dict()}
    for key in ("attack_success_rate", "robust_accuracy", "details"):
        record.pop(key)
    line = (
        f"{cfg.eval_set}: top-1 error {result.top1_error:.4f}, top-5 error "
        f"{result.top5_error:.4f} on {result.images} images (clean; logits restricted to its "
        f"{len(classes)} classes)"
    )
    return record, [line]


def _cropped(evaluate: Evaluate, model: nn.Module, samples: list[Sample], desc: str, size: int):
    """``evaluate`` with the centre crop; an image too small for it is named (the crop's own
    error cannot name it: it sees the pixels only)."""
    try:
        return evaluate(model, samples, center_crop_transform, desc)
    except ValueError as error:
        if "cannot centre-crop" not in str(error):
            raise
        for path, _ in samples:  # the error path only: find the culprit
            height, width = read_image_bgr(path).shape[:2]
            if height < size or width < size:
                raise DataError(
                    f"--eval-set imagenet-c: {path} is {height}x{width}, smaller than the "
                    f"{size}x{size} crop (--image-size)"
                ) from None
        raise


def _corruptions(
    root: Path, model: nn.Module, evaluate: Evaluate, size: int
) -> tuple[dict, list[str]]:
    errors: dict[str, dict[str, float]] = {}
    images = 0
    for (corruption, severity), samples in corruption_samples(root).items():
        desc = f"eval imagenet-c {corruption} {severity}"
        result = _cropped(evaluate, model, samples, desc, size)
        errors.setdefault(corruption, {})[severity] = result.top1_error
        images += result.images
    corruptions, lines = {}, []
    for name, by_severity in errors.items():
        mean = sum(by_severity.values()) / len(by_severity)
        # Hendrycks & Dietterich 2019, Sec 3: CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c} over
        # severities 1-5; with AlexNet's 5-severity average, the ratio of the means. With some
        # severities missing the two sums would not cover the same severities: no CE.
        complete = set(by_severity) == set(SEVERITIES)
        ce = mean / ALEXNET_ERRORS[name] if name in ALEXNET_ERRORS and complete else None
        corruptions[name] = {"errors": by_severity, "mean_error": mean, "ce": ce}
        severities = ", ".join(f"{s}: {e:.4f}" for s, e in by_severity.items())
        if ce is not None:
            ce_words = f", CE {ce:.4f}"
        elif name in ALEXNET_ERRORS:
            ce_words = " (CE needs severities 1-5)"
        else:
            ce_words = " (not one of the 15: no CE)"
        lines.append(f"imagenet-c {name}: mean error {mean:.4f} ({severities}){ce_words}")
    ces = [c["ce"] for c in corruptions.values() if c["ce"] is not None]
    mce = sum(ces) / len(ces) if ces else None
    mean_error = sum(c["mean_error"] for c in corruptions.values()) / len(corruptions)
    mce_words = f"mCE {mce:.4f} over {len(ces)} of the 15 corruptions" if ces else "no mCE"
    lines.append(
        f"imagenet-c: {mce_words} (relative to AlexNet), mean error {mean_error:.4f}, "
        f"{images} images (clean)"
    )
    record = {
        "eval_set": "imagenet-c",
        "corruptions": corruptions,
        "mce": mce,
        "mce_corruptions": len(ces),
        "mean_error": mean_error,
        "images": images,
    }
    return record, lines


def sorted_class_index() -> dict[str, int]:
    """The class map, checked to be the WordNet ids' sorted order (ImageNet-V2's folder k is the
    k-th WordNet id in that order, as in the class index of torchvision's ImageNet models)."""
    index = class_index()
    if index != {wnid: i for i, wnid in enumerate(sorted(index))}:
        raise DataError(f"{CLASS_MAP}: the class indices are not the WordNet ids' sorted order")
    return index


def _all_folders(root: Path, names: list[str], what: str) -> list[tuple[Path, int]]:
    """Each of `names` (the 1000 classes' folder names, by class index) under `root`, with its
    class index; an error naming the first missing class, or a folder that is none of them."""
    if not root.is_dir():
        raise DataError(f"{what}: {root} is not a directory")
    present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted(present - set(names))
    if unknown:
        raise DataError(f"{what}: {root / unknown[0]} is not one of its 1000 class folders")
    missing = [name for name in names if name not in present]
    if missing:
        raise DataError(
            f"{what}: {len(missing)} of its 1000 class folders are not under {root} "
            f"(first: {missing[0]})"
        )
    return [(root / name, label) for label, name in enumerate(names)]


def _samples_of(folders: list[tuple[Path, int]], root: Path, what: str) -> list[Sample]:
    samples = [(str(image), label) for folder, label in folders for image in _images(folder)]
    if not samples:
        raise DataError(f"{what}: no images under {root}")
    return samples


def sketch_samples(root: Path) -> list[Sample]:
    """ImageNet-Sketch's ``sketch/wnid/*`` (its release's layout: all 1000 WordNet ids),
    labelled with the 1000-class index; `root` is the ``sketch`` folder or the one holding it."""
    if (root / "sketch").is_dir():
        root = root / "sketch"
    what = "--eval-set imagenet-sketch"
    index = sorted_class_index()
    return _samples_of(_all_folders(root, sorted(index), what), root, what)


def v2_samples(root: Path) -> list[Sample]:
    """ImageNet-V2's ``k/*`` (its releases' layout: folders ``0`` to ``999``, the class index),
    labelled k: the k-th WordNet id in sorted order, the class map's index (checked)."""
    what = "--eval-set imagenet-v2"
    sorted_class_index()
    names = [str(k) for k in range(len(class_index()))]
    return _samples_of(_all_folders(root, names, what), root, what)


ALL_CLASS_SETS = {"imagenet-sketch": sketch_samples, "imagenet-v2": v2_samples}


def _all_classes(
    name: str, samples: list[Sample], model: nn.Module, evaluate: Evaluate
) -> tuple[dict, list[str]]:
    """ImageNet-Sketch / -V2: the top-1 and top-5 error over all 1000 logits."""
    result = evaluate(model, samples, eval_transform, f"eval {name}")
    record = {"eval_set": name, "classes": len(class_index()), **result.as_dict()}
    for key in ("attack_success_rate", "robust_accuracy", "details"):
        record.pop(key)
    line = (
        f"{name}: top-1 error {result.top1_error:.4f}, top-5 error {result.top5_error:.4f} on "
        f"{result.images} images (clean; all 1000 classes)"
    )
    return record, [line]
