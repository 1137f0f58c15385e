"""--eval-directory: classify every image of a folder and write a black-box prediction file.

As the original (its CAAD submission format): files sorted by name, read by OpenCV as BGR,
naively resized to image_size x image_size with cubic interpolation, one `filename,label` line
per image. An unreadable file stops the run with an error naming every such file and no
prediction file is written, unless --skip-unreadable is given (then each is named in a warning).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from atomic_io import atomic_write_text
from config import Config
from data import to_model_input
from runtime import checkpoint_classes, load_model
from third_party.imagenet import CorruptImageError, DataError, read_image_bgr


def list_directory(directory: str | Path) -> list[Path]:
    """Every regular, non-hidden file of `directory`, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--eval-directory: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"--eval-directory: {directory} contains no files")
    return files


class DirectoryImages(Dataset):
    """(image uint8 HxWx3, readable?) per file; unreadable files give an empty image."""

    def __init__(self, files: list[Path], image_size: int):
        self.files = files
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            img = read_image_bgr(str(self.files[index]))
        except CorruptImageError:
            return torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8), False
        size = (self.image_size, self.image_size)
        img = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
        return torch.from_numpy(np.ascontiguousarray(img)), True


def predict_files(
    model: torch.nn.Module,
    files: list[Path],
    *,
    batch: int,
    image_size: int,
    workers: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Top-5 classes and probabilities of every file (rows of unreadable files are -1)."""
    loader = DataLoader(DirectoryImages(files, image_size), batch_size=batch, num_workers=workers)
    model.eval()
    classes, probs, bad = [], [], []
    offset = 0
    for images, ok in tqdm(loader, desc="predict", unit="batch"):
        with torch.no_grad():
            p = model(to_model_input(images, device)).float().softmax(dim=1).cpu()
        top = p.topk(min(5, p.shape[1]), dim=1)
        classes.append(torch.where(ok[:, None], top.indices, -1))
        probs.append(top.values)
        bad += [files[offset + i] for i in torch.nonzero(~ok).flatten().tolist()]
        offset += len(ok)
    return torch.cat(classes), torch.cat(probs), bad


def load_class_names(path: str | Path) -> list[str]:
    """One class per line, e.g. ImageNet's LOC_synset_mapping.txt ("n01440764 tench, ...")."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"--class-names: cannot read {path}: {e.strerror}") from e


def format_top5(name: str, classes: list[int], probs: list[float], names: list[str] | None):
    def label(c: int) -> str:
        return f"{c} ({names[c]})" if names and c < len(names) else str(c)

    return f"{name}: " + ", ".join(
        f"{label(c)} {p:.3f}" for c, p in zip(classes, probs, strict=True)
    )


def run_predict(cfg: Config, device: torch.device) -> Path:
    files = list_directory(cfg.eval_directory)
    names = load_class_names(cfg.class_names) if cfg.class_names else None
    model = load_model(cfg, checkpoint_classes(cfg), device)
    top_classes, top_probs, bad = predict_files(
        model, files, batch=cfg.batch, image_size=cfg.image_size, workers=cfg.workers, device=device
    )
    if bad and not cfg.skip_unreadable:
        listing = ", ".join(str(p) for p in bad)
        raise CorruptImageError(
            f"--eval-directory: {len(bad)} unreadable file(s): {listing} "
            "(no prediction file written; --skip-unreadable skips them)"
        )
    for path in bad:
        print(f"warning: skipped unreadable file {path}", file=sys.stderr)
    lines = []
    for path, classes, probs in zip(files, top_classes.tolist(), top_probs.tolist(), strict=True):
        if classes[0] < 0:
            continue
        lines.append(f"{path.name},{classes[0]}\n")
        if cfg.print_top5:
            print(format_top5(path.name, classes, probs, names))
    atomic_write_text(cfg.prediction_file, "".join(lines))
    print(f"wrote {len(lines)} predictions to {cfg.prediction_file}", file=sys.stderr)
    return Path(cfg.prediction_file)
