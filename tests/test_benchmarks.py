"""--benchmark robustbench: RobustBench's ImageNet images in its order, its preprocessing, its
threat model and its model_info result file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import nets
from iat.app.cli import build_parser, config_from_args
from iat.config import Config
from iat.data.augment import robustbench_transform
from iat.data.layouts import read_image_pil_bgr
from iat.data.sources import ImageFiles
from iat.eval.benchmarks import BENCHMARK_DEFAULTS, IDS_FILE, model_info, read_ids, transform_for
from iat.eval.evaluate import eval_samples
from iat.eval.metrics import EvalResult
from iat.eval.ood import class_index
from main import main

FIXTURE = Path(__file__).parent / "data" / "robustbench"  # ORIGIN.md: torchvision's outputs

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]


def test_the_id_list_is_robustbenchs_5000_images():
    ids = read_ids()
    assert len(ids) == len(set(ids)) == 5000
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"  # its first, in its order
    assert all(i.startswith("n") and i.endswith(".JPEG") and i.count("/") == 1 for i in ids)
    assert (IDS_FILE.parent / "ORIGIN.md").is_file()


def test_preprocessing_crops_where_torchvision_does():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)  # short edge already 256
    out = robustbench_transform(img, 224)
    # torchvision CenterCrop: offsets int(round((256 - 224) / 2)), int(round((300 - 224) / 2))
    np.testing.assert_array_equal(out, img[16:240, 38:262])
    big = rng.integers(0, 256, (512, 700, 3), dtype=np.uint8)
    assert robustbench_transform(big, 224).shape == (224, 224, 3)  # 512x700 -> 256x350 -> crop


def test_preprocessing_is_torchvisions_bit_for_bit():
    """RobustBench's Res256Crop224 as torchvision computes it on PIL-decoded files (ORIGIN.md),
    through the public transform and through the evaluation's loader (which decodes with PIL)."""
    expected = np.load(FIXTURE / "expected.npz")
    assert len(expected.files) == 5
    cfg = _standard_config()
    files = ImageFiles(
        [(str(FIXTURE / name), 0) for name in expected.files], 224, transform_for(cfg)
    )
    for i, name in enumerate(expected.files):
        rgb = expected[name]
        assert rgb.shape == (224, 224, 3)
        out = robustbench_transform(read_image_pil_bgr(str(FIXTURE / name)), 224)
        np.testing.assert_array_equal(out[..., ::-1], rgb, err_msg=name)
        np.testing.assert_array_equal(files[i][0].numpy()[..., ::-1], rgb, err_msg=name)
        if name.endswith(".png"):  # lossless: OpenCV decodes the same pixels
            bgr = cv2.imread(str(FIXTURE / name))
            np.testing.assert_array_equal(robustbench_transform(bgr, 224)[..., ::-1], rgb)


def _standard_config(**changes) -> Config:
    values = {**BENCHMARK_DEFAULTS["robustbench"], **changes}
    return Config(mode="eval", benchmark="robustbench", load="m.pt", data="d", **values)


def _results(images: int) -> tuple[EvalResult, EvalResult]:
    return EvalResult(images, 0.25, 0.1, 0.0), EvalResult(images, 0.75, 0.5, 0.6)


def test_model_info_of_the_standard_evaluation_reads_back(tmp_path: Path):
    cfg = _standard_config(model_name="Ours", model_link="https://x", additional_data=False)
    path = tmp_path / "m.robustbench.json"
    path.write_text(json.dumps(model_info(cfg, *_results(5000), "standard")))
    info = json.loads(path.read_text())
    assert info["autoattack_version"] == "standard" and info["unreliable"] is False
    assert info["non_standard"] == {}
    assert (info["name"], info["link"], info["additional_data"]) == ("Ours", "https://x", False)
    assert info["authors"] == info["venue"] == ""  # not given: empty, never guessed
    assert info["settings"] == {
        "attack_epsilon": 4.0, "norm": "inf", "attack_iter": 100, "apgd_targets": 9,
        "queries": 5000, "restarts": 1, "quantize": False, "image_size": 224, "split": "val",
        "images": 5000,
    }  # fmt: skip
    assert (info["clean_acc"], info["autoattack_acc"], info["n_ex"]) == ("75.00", "25.00", 5000)


def test_model_info_of_an_override_says_every_difference(tmp_path: Path):
    cfg = _standard_config(attack_iter=2, queries=20, apgd_targets=1, quantize=True, image_size=32)
    path = tmp_path / "m.robustbench.json"
    path.write_text(json.dumps(model_info(cfg, *_results(6), "standard")))
    info = json.loads(path.read_text())
    assert info["autoattack_version"] == "custom" and info["unreliable"] is True
    assert info["non_standard"] == {
        "attack_iter": {"used": 2, "standard": 100},
        "apgd_targets": {"used": 1, "standard": 9},
        "queries": {"used": 20, "standard": 5000},
        "quantize": {"used": True, "standard": False},
        "image_size": {"used": 32, "standard": 224},
        "images": {"used": 6, "standard": 5000},
    }
    assert info["name"] == "" and info["additional_data"] is None  # no flags: nothing guessed
    assert "attack_iter 2 (standard 100)" in info["footnote"]
    assert "images 6 (standard 5000)" in info["footnote"]


def _write_benchmark_folder(root: Path, count: int) -> list[str]:
    """val/ holding the first `count` RobustBench images (random pixels) and one other."""
    rng = np.random.default_rng(0)
    ids = read_ids()[:count]
    for image_id in [*ids, "n09468604/not_in_the_list.JPEG"]:
        path = root / "val" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(40, 64, size=2)
        assert cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return ids


def test_benchmark_evaluates_its_images_in_its_order_and_writes_model_info(tmp_path: Path, capsys):
    data = tmp_path / "imagenet"
    ids = _write_benchmark_folder(data, 6)
    ckpt = tmp_path / "model.pt"
    torch.manual_seed(0)
    nets.save_weights(nets.build_model("ResNet", num_blocks=[1] * 4, width=8,
                                       num_classes=1000), ckpt)  # fmt: skip
    out = tmp_path / "r.json"
    args = ["--eval", "--load", str(ckpt), "--data", str(data), *TINY, "--benchmark",
            "robustbench", "--num-examples", "6", "--image-size", "32", "--batch", "4",
            "--workers", "0", "--attack-iter", "2", "--queries", "10", "--apgd-targets", "2",
            "--masking-checks", "0", "--eval-output", str(out), "--model-name", "Tiny",
            "--model-link", "https://example.org/tiny", "--additional-data", "true"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(args))
    assert (cfg.attack, cfg.attack_epsilon, cfg.norm) == ("autoattack", 4.0, "inf")  # defaults
    assert cfg.attack_iter == 2 and cfg.image_size == 32  # flags given win
    samples = eval_samples(cfg)
    order = [Path(p).relative_to(data / "val").as_posix() for p, _ in samples]
    assert order == ids  # the list's order, the other image left out
    index = class_index()  # labels from RobustBench's class map, not from the folders present
    assert [label for _, label in samples] == [index[i.split("/")[0]] for i in ids]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    clean, attacked = json.loads(out.read_text())["records"]
    assert clean["attack"]["name"] == "clean" and attacked["attack"]["name"] == "autoattack"
    assert clean["images"] == attacked["images"] == 6
    info = json.loads(out.with_suffix(".robustbench.json").read_text())
    assert info["dataset"] == "imagenet" and info["eps"] == "4/255"
    assert info["threat_model"] == "Linf" and info["n_ex"] == 6
    assert info["clean_acc"] == f"{100 * (1 - clean['top1_error']):.2f}"
    assert info["autoattack_acc"] == f"{100 * attacked['robust_accuracy']:.2f}"
    assert info["autoattack_version"] == "custom" and info["unreliable"] is True
    assert set(info["non_standard"]) == {"attack_iter", "apgd_targets", "queries", "image_size",
                                         "images"}  # fmt: skip
    assert info["settings"]["queries"] == 10 and info["settings"]["images"] == 6
    assert (info["name"], info["link"]) == ("Tiny", "https://example.org/tiny")
    assert info["additional_data"] is True
    assert f"AutoAttack (custom) accuracy {info['autoattack_acc']} % on 6 images" in printed


def test_part_of_imagenet_is_evaluated_and_marked_partial(tmp_path: Path, capsys):
    """Only some listed images present, beside empty class folders: those present are evaluated
    under their class-map labels, and the result says how many of the list it found."""
    data = tmp_path / "imagenet"
    _write_benchmark_folder(data, 3)
    for wnid in list(class_index())[:20]:  # class folders created but left empty
        (data / "val" / wnid).mkdir(parents=True, exist_ok=True)
    ckpt = tmp_path / "model.pt"
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=1000), ckpt
    )
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert main(["--eval", "--load", str(ckpt), "--data", str(data), *TINY, "--benchmark",
                 "robustbench", "--num-examples", "5", "--workers", "0", "--image-size", "32",
                 "--attack-iter", "1", "--queries", "5", "--apgd-targets", "1",
                 "--masking-checks", "0", "--eval-output", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "3 of its 5 listed images found" in printed and "partial" in printed
    for record in json.loads(out.read_text())["records"]:
        assert record["images"] == 3
        assert record["benchmark_images"] == {"found": 3, "listed": 5, "partial": True}


def test_no_benchmark_image_is_one_line(tmp_path: Path, capsys):
    data = tmp_path / "imagenet"
    (data / "val" / "n01440764").mkdir(parents=True)
    ckpt = tmp_path / "model.pt"
    nets.save_weights(nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=4), ckpt)
    capsys.readouterr()
    code = main(["--eval", "--load", str(ckpt), "--data", str(data), *TINY, "--benchmark",
                 "robustbench", "--num-examples", "5", "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert f"none of its 5 images is under {data / 'val'} (first: {read_ids()[0]}" in err[0]


def test_a_replayed_benchmark_run_keeps_its_own_values(tmp_path: Path):
    from iat.config import config_record

    args = ["--eval", "--load", "m.pt", "--data", "d", "--benchmark", "robustbench",
            "--attack-epsilon", "2", "--attack-iter", "20"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(args))
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config_record(cfg, {})))
    replayed = config_from_args(build_parser().parse_args(["--eval", "--config", str(saved)]))
    assert (replayed.attack_epsilon, replayed.attack_iter) == (2.0, 20)


EVAL = ["--eval", "--load", "m.pt", "--data", "d"]
BENCHMARK = [*EVAL, "--benchmark", "robustbench"]


@pytest.mark.parametrize(
    "flag",
    [
        ["--benchmark", "cifar"],
        ["--fake", "--benchmark", "robustbench"],
        [*BENCHMARK, "--attack", "pgd"],
        [*EVAL, "--model-name", "x"],  # its result file's fields: only --benchmark writes one
        [*BENCHMARK, "--additional-data", "maybe"],
    ],
)
def test_benchmark_flag_errors(flag, capsys):
    assert main(flag) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
