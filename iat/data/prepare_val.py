"""Turn ImageNet's flat validation folder into class folders: ``val/<wnid>/<image>``.

The official validation set is one flat folder (``ILSVRC2012_val_00000001.JPEG`` ...); its
labels come in a separate file the user has. Two forms are read:

* Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` rows whose string starts
  with the wnid (``ILSVRC2012_val_00000001,n01751748 43 ...``);
* a text file of ``<filename> <wnid>`` lines (any whitespace; the extension may be omitted).

    python -m iat.data.prepare_val /path/to/imagenet/val LOC_val_solution.csv

Every listed image must exist before anything moves, so a wrong file changes nothing. Images are
moved (instant on one filesystem); ``--copy`` copies them instead. Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

from iat.data.layouts import IMAGE_EXTENSIONS, DataError

WNID_PREFIX = "n"


def read_ground_truth(path: Path) -> dict[str, str]:
    """``{image name without extension: wnid}`` from a Kaggle CSV or a two-column text file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read ground truth {path}: {e}") from None
    lines = text.splitlines()
    if lines and lines[0].strip().startswith("ImageId,"):
        pairs = [(row[0], row[1].split()[0] if row[1].split() else "") for row in _csv(lines[1:])]
    else:
        pairs = [tuple(line.split()[:2]) for line in lines if line.strip()]
    labels: dict[str, str] = {}
    for lineno, pair in enumerate(pairs, start=2):
        if len(pair) != 2 or not pair[1].startswith(WNID_PREFIX):
            raise DataError(f"{path}: entry {lineno - 1} is not '<image> <wnid>': {pair!r:.80}")
        labels[Path(pair[0]).stem] = pair[1]
    if not labels:
        raise DataError(f"{path}: no labels")
    return labels


def _csv(lines: list[str]) -> list[list[str]]:
    return [row for row in csv.reader(lines) if row]


def plan_moves(val_dir: Path, labels: dict[str, str]) -> list[tuple[Path, Path]]:
    """``(source, destination)`` of every image; DataError if any labelled image is missing."""
    images = {p.stem: p for p in val_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DataError(
            f"{val_dir}: {len(missing)} labelled images are missing, e.g. {missing[0]}; "
            "nothing was moved"
        )
    return [(images[stem], val_dir / wnid / images[stem].name) for stem, wnid in labels.items()]


def prepare(val_dir: Path, ground_truth: Path, copy: bool) -> int:
    if not val_dir.is_dir():
        raise DataError(f"{val_dir} is not a folder")
    moves = plan_moves(val_dir, read_ground_truth(ground_truth))
    for source, destination in moves:
        destination.parent.mkdir(exist_ok=True)
        (shutil.copy2 if copy else shutil.move)(source, destination)
    return len(moves)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("val_dir", type=Path, help="the flat validation folder")
    p.add_argument("ground_truth", type=Path, help="LOC_val_solution.csv or '<image> <wnid>' lines")
    p.add_argument("--copy", action="store_true", help="copy instead of moving")
    args = p.parse_args(argv)
    try:
        count = prepare(args.val_dir, args.ground_truth, args.copy)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'copied' if args.copy else 'moved'} {count} images into {args.val_dir}/<wnid>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
