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
  suffix ``.robustbench.json``): the model's name, link, authors, venue and extra data as the
  ``--model-*`` / ``--additional-data`` flags give them, every setting of the evaluation, and
  those away from the standard (``STANDARD``), which make it "custom" and "unreliable".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iat.attacks import DEFAULT_QUERIES
from iat.config import Config, architecture_name
from iat.data.augment import eval_transform, exported_transform, robustbench_transform
from iat.data.layouts import DataError, Sample, is_export, read_image_pil_bgr
from iat.data.sources import DecodedBy
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
# RobustBench's standard evaluation (Croce et al., NeurIPS 2021): AutoAttack's standard version
# as its authors run it (100 iterations, 9 target classes, Square's 5,000 queries, 1 restart,
# images not rounded) on the 5,000 images at 224 x 224, ImageNet L-inf 4/255. A result under any
# other value is not the leaderboard's: "custom" and "unreliable" in the model_info file.
STANDARD = {
    "robustbench": {
        "attack_epsilon": 4.0,
        "norm": "inf",
        "attack_iter": 100,
        "apgd_targets": 9,
        "queries": DEFAULT_QUERIES,
        "restarts": 1,
        "quantize": False,
        "image_size": 224,
        "split": "val",
        "images": 5000,
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
    """The evaluation's image preprocessing: the benchmark's (decoded with PIL, as RobustBench's
    ImageFolder does); an exported folder's crops as they are; else the original's."""
    if cfg.benchmark == "robustbench":
        return DecodedBy(read_image_pil_bgr, robustbench_transform)
    if is_export(cfg.data, cfg.split):
        return exported_transform
    return eval_transform


def points(cfg: Config) -> list[Config]:
    """The evaluations a benchmark runs: clean accuracy, then its attack."""
    clean = dataclasses.replace(
        cfg, attack="clean", attack_iter=0, restarts=1, attack_loss="ce", queries=DEFAULT_QUERIES
    )
    return [clean, cfg]


def evaluation_settings(cfg: Config, images: int) -> dict[str, object]:
    """The settings of ``STANDARD`` this evaluation ran with (`images`: those it scored)."""
    return {
        "attack_epsilon": cfg.attack_epsilon,
        "norm": cfg.norm,
        "attack_iter": cfg.attack_iter,
        "apgd_targets": cfg.apgd_targets,
        "queries": cfg.queries,
        "restarts": cfg.restarts,
        "quantize": cfg.quantize or cfg.export_adversarial is not None,
        "image_size": cfg.image_size,
        "split": cfg.split,
        "images": images,
    }


def non_standard(cfg: Config, images: int) -> dict[str, dict[str, object]]:
    """Each setting away from the benchmark's standard: {name: {"used": ..., "standard": ...}}."""
    standard = STANDARD[cfg.benchmark]
    return {
        name: {"used": value, "standard": standard[name]}
        for name, value in evaluation_settings(cfg, images).items()
        if value != standard[name]
    }


def model_info(cfg: Config, clean: EvalResult, attacked: EvalResult, version: str) -> dict:
    """RobustBench's model_info fields (accuracies as percentage strings, ε as a fraction of
    255). The model's name, link, authors, venue and extra data are the --model-* and
    --additional-data flags' (empty, and null for the extra data, when not given). Any setting
    away from the standard makes the version "custom" and the result "unreliable"; every setting
    is recorded under "settings", those away from the standard under "non_standard"."""
    architecture = architecture_name(cfg)
    threat = "Linf" if cfg.norm == "inf" else "L2"
    changed = non_standard(cfg, attacked.images)
    version = "custom" if changed else version
    departures = "".join(
        f"; {name} {c['used']} (standard {c['standard']})" for name, c in changed.items()
    )
    return {
        "link": cfg.model_link or "",
        "name": cfg.model_name or "",
        "authors": cfg.model_authors or "",
        "additional_data": cfg.additional_data,
        "number_forward_passes": 1,
        "dataset": "imagenet",
        "venue": cfg.model_venue or "",
        "architecture": architecture,
        "eps": f"{cfg.attack_epsilon:g}/255",
        "clean_acc": f"{100 * (1 - clean.top1_error):.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * attacked.robust_accuracy:.2f}",
        "footnote": (
            f"Evaluated with imagenet-adversarial-training: AutoAttack {version}, {threat}, "
            f"{attacked.images} images{departures}."
        ),
        "unreliable": bool(changed),
        "threat_model": threat,
        "autoattack_version": version,
        "n_ex": attacked.images,
        "settings": evaluation_settings(cfg, attacked.images),
        "non_standard": changed,
    }


def model_info_path(eval_output: str) -> Path:
    return Path(eval_output).with_suffix(".robustbench.json")
