"""--eval-directory: classify every image of a folder and write a black-box prediction file.

As the original (its CAAD submission format): files sorted by name (by relative path when the
folder has subfolders, e.g. class folders), read by OpenCV as BGR,
naively resized to image_size x image_size with cubic interpolation, one `filename,label` line
per image. An unreadable file stops the run with an error naming every such file and no
prediction file is written, unless --skip-unreadable is given (then each is named in a warning).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from iat.builders import load_for_inference
from iat.config import Config, predict_defense
from iat.data.layouts import CorruptImageError, DataError
from iat.data.sources import eval_loader, list_directory, resize_square, to_model_input
from iat.defenses.transforms import defend
from iat.runtime.atomic_io import atomic_write_text, check_writable_file
from iat.runtime.progress import progress_bar


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
    loader = eval_loader(
        [(str(f), -1) for f in files],
        batch=batch,
        image_size=image_size,
        workers=workers,
        rank=0,
        world_size=1,
        pin_memory=False,
        transform=resize_square,
    )
    model.eval()
    classes, probs, bad = [], [], []
    for images, _, indices, ok in progress_bar(loader, desc="predict", unit="batch"):
        with torch.no_grad():
            p = model(to_model_input(images, device)).float().softmax(dim=1).cpu()
        top = p.topk(min(5, p.shape[1]), dim=1)
        classes.append(torch.where(ok[:, None], top.indices, -1))
        probs.append(top.values)
        bad += [files[i] for i in indices[~ok].tolist()]
    return torch.cat(classes), torch.cat(probs), bad


def load_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One class per line, e.g. ImageNet's LOC_synset_mapping.txt ("n01440764 tench, ..."):
    exactly one line per class of the model."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--class-names: cannot read {path}: {e}") from e
    if len(names) != num_classes:
        raise DataError(
            f"--class-names: {path} names {len(names)} classes but the model has {num_classes}"
        )
    return names


def format_top5(name: str, classes: list[int], probs: list[float], names: list[str] | None):
    def label(c: int) -> str:
        return f"{c} ({names[c]})" if names and c < len(names) else str(c)

    return f"{name}: " + ", ".join(
        f"{label(c)} {p:.3f}" for c, p in zip(classes, probs, strict=True)
    )


def check_file_names(files: list[Path], root: str | Path) -> None:
    """Every name must fit on one line of the prediction file: a line break (or any other
    control character) in a file name would forge a line of it. One error naming them."""
    names = [f.relative_to(root).as_posix() for f in files]
    unsafe = [name for name in names if any(ord(c) < 32 or ord(c) == 127 for c in name)]
    if unsafe:
        shown = ", ".join(repr(name) for name in unsafe[:3])
        raise DataError(
            f"--eval-directory: {len(unsafe)} file name(s) hold a line break or another control "
            f"character, which would forge lines of the prediction file: {shown}; rename them"
        )


def run_predict(cfg: Config, device: torch.device) -> Path:
    check_writable_file("--prediction-file", cfg.prediction_file)
    files = list_directory(cfg.eval_directory)
    check_file_names(files, cfg.eval_directory)
    model, cfg = load_for_inference(cfg, device)  # cfg: the checkpoint's recorded architecture
    model = defend(model, predict_defense(cfg))
    names = load_class_names(cfg.class_names, cfg.num_classes) if cfg.class_names else None
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
        name = path.relative_to(cfg.eval_directory).as_posix()  # the file name in a flat folder
        lines.append(f"{name},{classes[0]}\n")
        if cfg.print_top5:
            print(format_top5(name, classes, probs, names))
    atomic_write_text(cfg.prediction_file, "".join(lines))
    print(f"wrote {len(lines)} predictions to {cfg.prediction_file}", file=sys.stderr)
    return Path(cfg.prediction_file)
