"""What every mode needs from a configuration: the model, its weights and the data's classes."""

from __future__ import annotations

from pathlib import Path

import torch

import nets
from config import Config
from third_party.imagenet import DataError, list_split

Sample = tuple[str, int]
IMAGENET_CLASSES = 1000


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    depth = None if cfg.num_blocks is not None else cfg.depth
    return nets.build_model(
        cfg.arch, depth=depth, num_blocks=cfg.num_blocks, num_classes=num_classes, width=cfg.width
    )


def split_exists(data: str, split: str) -> bool:
    return (Path(data) / split).is_dir()


def dataset_classes(cfg: Config) -> list[str] | None:
    """The class names of the data (sorted wnids of train/, else of val/); None without data."""
    if cfg.fake or cfg.data is None:
        return None
    split = "train" if split_exists(cfg.data, "train") else "val"
    return list_split(cfg.data, split)[1]


def resolve_num_classes(cfg: Config, classes: list[str] | None) -> int:
    """--num-classes if given, else the number of classes in the data, else ImageNet's 1000."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    return len(classes) if classes else IMAGENET_CLASSES


def checkpoint_classes(cfg: Config) -> int:
    """Evaluation: --num-classes if given, else as many classes as the --load'ed checkpoint."""
    return cfg.num_classes or nets.checkpoint_num_classes(cfg.load)


def check_labels(samples: list[Sample], num_classes: int, split: str) -> None:
    top = max((label for _, label in samples), default=-1)
    if top >= num_classes:
        raise DataError(
            f"--data: {split} labels go up to {top} but the model has {num_classes} classes"
        )


def load_model(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The configured model on `device`, with --load weights (strict) if given."""
    model = build_model(cfg, num_classes)
    if cfg.load is not None:
        nets.load_weights(model, cfg.load)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # matches data.to_model_input
    return model.to(device)
