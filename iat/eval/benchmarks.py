"""RobustBench's protocol for ImageNet (Croce et al., "RobustBench: a standardized adversarial
robustness benchmark", NeurIPS 2021 Datasets and Benchmarks): ``--benchmark robustbench``.

* the images: RobustBench's 5,000-image subset of the validation split, in its order (the list
  is copied from the ``robustbench`` package: ``iat/data/reference/ORIGIN.md``);
  ``--num-examples N`` takes the first N of that list;
* their preprocessing: "Res256Crop224" (``iat.data.augment.robustbench_transform``);
* the threat model: L-inf, ε = 4/255 (4 pixel units here), AutoAttack (standard version,
  100 iterations), each a default that a flag given on the command line overrides;
* the result: the clean and the AutoAttack evaluation, each in this project's record, and a
  file with the fields of RobustBench's ``model_info`` JSON (``<--eval-output>`` with the
  suffix ``.robustbench.json``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iat.attacks import DEFAULT_QUERIES
from iat.config import Config, architecture_name
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


def benchmark_samples(
    samples: Sequence[Sample], split_dir: Path, num_examples: int | None
) -> list[Sample]:
    """RobustBench's images among `samples` (the split's), in its order; the first
    `num_examples` of its list when given. A missing image is an error naming it."""
    by_id = {Path(path).relative_to(split_dir).as_posix(): (path, label) for path, label in samples}
    ids = read_ids()[:num_examples] if num_examples else read_ids()
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"--benchmark robustbench: {len(missing)} of its {len(ids)} images are not under "
            f"{split_dir} (first: {missing[0]}); --num-examples N takes the first N of its list"
        )
    return [by_id[i] for i in ids]


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
    architecture = architecture_name(cfg)
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
