"""RobustBench's protocol for ImageNet (Croce et al., "RobustBench: a standardized adversarial
robustness benchmark", NeurIPS 2021 Datasets and Benchmarks): ``--benchmark robustbench``.

* the images: RobustBench's 5,000-image subset of the validation split, in its order (the list
  is copied from the ``robustbench`` package: ``iat/data/reference/ORIGIN.md``);
  ``--num-examples N`` takes the first N of that list; those present are evaluated (a partial
  evaluation when some are missing, said and recorded), labelled by RobustBench's class map;
* their preprocessing: "Res256Crop224" (``iat.data.augment.robustbench_transform``);
* the threat model: L-inf, ε = 4/255 (4 pixel units here), AutoAttack (standard version,
  100 iterations), each a default that a flag given on the command line overrides;
* the result: the clean and the AutoAttack evaluation, each in this project's record, and a
  file with the fields of RobustBench's ``model_info`` JSON (``<--eval-output>`` with the
  suffix ``.robustbench.json``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iat.attacks import DEFAULT_QUERIES
from iat.config import Config
from iat.data.augment import eval_transform, robustbench_transform
from iat.data.layouts import DataError, Sample
from iat.eval.metrics import EvalResult

IDS_FILE = Path(__file__).parent.parent / "data" / "reference" / "robustbench_imagenet_ids.txt"
BENCHMARK_DEFAULTS = {  # flags --benchmark robustbench sets unless given
    "robustbench": {
        "attack": "autoattack",
        "attack_epsilon": 4.0,  # RobustBench ImageNet L-inf: 4/255 of the [0, 1] range
        "norm": "inf",
        "attack_iter": 100,  # AutoAttack's APGD and FAB iterations
        "image_size": 224,
        "split": "val",
    }
}


def read_ids(path: Path = IDS_FILE) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def benchmark_samples(split_dir: Path, num_examples: int | None) -> list[Sample]:
    """RobustBench's images present under `split_dir` (as its list names them, ``wnid/file``),
    in its order, the first `num_examples` of its list when given; each labelled by
    RobustBench's class map (ImageNet's 1,000 wnids), never by the class folders present, so
    that part of ImageNet can be evaluated. None present is an error; some missing makes the
    evaluation partial (`coverage` says how many were found)."""
    from iat.eval.ood import class_index

    ids = listed_ids(num_examples)
    index = class_index()
    found = [(str(split_dir / i), index[i.split("/")[0]]) for i in ids if (split_dir / i).is_file()]
    if not found:
        raise DataError(
            f"--benchmark robustbench: none of its {len(ids)} images is under {split_dir} "
            f"(first: {ids[0]}, as wnid/file)"
        )
    return found


def listed_ids(num_examples: int | None) -> list[str]:
    """The benchmark's list, its first `num_examples` when given."""
    return read_ids()[:num_examples] if num_examples else read_ids()


def coverage(found: int, num_examples: int | None) -> dict:
    """How many of the listed images an evaluation found (partial: not all of them)."""
    listed = len(listed_ids(num_examples))
    return {"found": found, "listed": listed, "partial": found < listed}


def transform_for(cfg: Config) -> Callable[[np.ndarray, int], np.ndarray]:
    """The evaluation's image preprocessing: the benchmark's, else the original's."""
    return robustbench_transform if cfg.benchmark == "robustbench" else eval_transform


def points(cfg: Config) -> list[Config]:
    """The evaluations a benchmark runs: clean accuracy, then its attack."""
    clean = dataclasses.replace(
        cfg, attack="clean", attack_iter=0, restarts=1, attack_loss="ce", queries=DEFAULT_QUERIES
    )
    return [clean, cfg]


def model_info(cfg: Config, clean: EvalResult, attacked: EvalResult, version: str) -> dict:
    """RobustBench's model_info fields (accuracies as percentage strings, ε as a fraction of
    255), with what this project knows of the model; the rest empty for the author to fill."""
    architecture = f"{cfg.arch}-{cfg.depth}" if cfg.num_blocks is None else cfg.arch
    threat = "Linf" if cfg.norm == "inf" else "L2"
    return {
        "link": "",
        "name": Path(cfg.load).stem if cfg.load else "",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": "imagenet",
        "venue": "",
        "architecture": architecture,
        "eps": f"{cfg.attack_epsilon:g}/255",
        "clean_acc": f"{100 * (1 - clean.top1_error):.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * attacked.robust_accuracy:.2f}",
        "footnote": (
            f"Evaluated with imagenet-adversarial-training: AutoAttack {version}, {threat}, "
            f"{attacked.images} images."
        ),
        "unreliable": False,
        "threat_model": threat,
        "autoattack_version": version,
        "n_ex": attacked.images,
    }


def model_info_path(eval_output: str) -> Path:
    return Path(eval_output).with_suffix(".robustbench.json")
