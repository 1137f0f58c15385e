"""Input-transform defenses: each transform against OpenCV or a seeded draw, BPDA and EOT
gradients, the digits model behind JPEG (plain PGD is fooled by the zero gradient, BPDA is not,
and evaluation uses BPDA), and --defense through flags, checkpoints and --eval."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nets
from adv_model import PGDAttacker
from iat.defenses import transforms as defenses
from iat.eval.evaluate import attack_images
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]


def _images(n: int, size: int, seed: int, integer: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size + 3, generator=g) * 255
    return x.round() if integer else x


def _hwc_uint8(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8))


# --- each transform against a direct reference ---


@pytest.mark.parametrize("window", [3, 5, 7])
def test_median_smoothing_equals_opencv_median_blur(window):
    x = _images(2, 12, seed=1, integer=True)  # OpenCV's 7x7 median needs uint8 images
    expected = torch.stack(
        [torch.from_numpy(cv2.medianBlur(_hwc_uint8(im), window)).permute(2, 0, 1) for im in x]
    ).float()
    assert torch.equal(defenses.MedianSmoothing(window)(x), expected)


@pytest.mark.parametrize("quality", [10, 75, 100])
def test_jpeg_is_a_real_opencv_round_trip(quality):
    x = _images(3, 16, seed=2) * 1.1 - 10  # out of range and fractional: clipped, rounded
    expected = []
    for image in x.numpy():
        pixels = np.clip(image, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels), [1, quality])
        assert ok  # 1 == cv2.IMWRITE_JPEG_QUALITY
        expected.append(cv2.imdecode(encoded, cv2.IMREAD_COLOR).transpose(2, 0, 1))
    actual = defenses.JpegCompression(quality)(x)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, torch.from_numpy(np.stack(expected)).float())
    assert not torch.equal(actual, x.clamp(0, 255).round())  # it did compress


def test_gaussian_noise_is_the_seeded_draw_clipped_and_fresh_each_call():
    x = _images(2, 8, seed=3)
    noise = defenses.GaussianNoise(6.0, generator=torch.Generator().manual_seed(4))
    first, second = noise(x), noise(x)
    draws = torch.Generator().manual_seed(4)
    for out in (first, second):
        expected = (x + 6.0 * torch.randn(x.shape, generator=draws)).clamp(0, 255)
        assert torch.equal(out, expected)
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("jpeg:75,median:3", ["jpeg:75", "median:3"]),
        ("median:5,noise:2.5", ["median:5", "noise:2.5"]),
        ("none", []),
    ],
)
def test_defense_specs_compose_in_order(spec, expected):
    model = defenses.defend(torch.nn.Identity(), spec)
    transforms = getattr(model, "transforms", [])
    assert [t.spec() for t in transforms] == expected
    x = _images(1, 16, seed=5, integer=True)
    torch.manual_seed(0)  # the noise draws from torch's default generator
    chained = x
    for t in transforms:
        chained = t(chained)
    torch.manual_seed(0)
    assert torch.equal(model(x), chained)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jpeg:0", "'jpeg:0': jpeg needs a quality 1-100, got 0"),
        ("jpeg", "jpeg needs a quality 1-100, as in jpeg:N"),
        ("median:4", "median needs an odd size, got 4"),
        ("noise:nan", "noise needs a sigma > 0"),
        ("blur:3", "unknown defense 'blur'"),
    ],
)
def test_bad_defense_specs_are_one_line_errors(spec, message, tmp_path, capsys):
    assert main(["--fake", "--logdir", str(tmp_path / "run"), *TINY, "--defense", spec]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --defense: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# --- BPDA and EOT ---


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )


def test_bpda_backward_is_the_identity_and_the_real_jpeg_gradient_is_zero():
    net = _small_net()
    defended = defenses.DefendedModel(net, [defenses.JpegCompression(50)])
    x = _images(2, 16, seed=6)
    net(x)  # materialise the lazy layer
    labels = torch.tensor([1, 3])

    def input_gradient(model: torch.nn.Module, at: torch.Tensor) -> torch.Tensor:
        at = at.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(at), labels), at)
        return grad

    compressed = defenses.jpeg_round_trip(x, 50)
    bpda = input_gradient(defended.attack_view(), x)
    # BPDA: the network's gradient at the transformed image, passed back unchanged.
    assert torch.equal(bpda, input_gradient(net, compressed))
    assert bpda.abs().sum() > 0
    assert not input_gradient(defended, x).any()  # the real round trip: zero almost everywhere
    with torch.no_grad():
        assert torch.equal(defended.attack_view()(x), defended(x))  # BPDA's forward is the real one


def test_median_keeps_its_real_gradient_in_the_attack_view():
    view = defenses.DefendedModel(torch.nn.Identity(), [defenses.MedianSmoothing(3)]).attack_view()
    assert isinstance(view[0], defenses.MedianSmoothing)  # differentiable: no BPDA
    x = _images(1, 6, seed=7).requires_grad_(True)
    (grad,) = torch.autograd.grad(view(x)[0, 0, 2, 2], x)
    assert grad.sum() == 1 and (grad > 0).sum() == 1


def test_eot_averages_the_gradient_over_n_draws():
    net = _small_net()
    x = _images(2, 16, seed=8)
    net(x)
    goal = torch.tensor([2, 4])
    n = 5

    def defended(seed: int) -> torch.nn.Module:
        noise = defenses.GaussianNoise(20.0, generator=torch.Generator().manual_seed(seed))
        return defenses.DefendedModel(net, [noise]).attack_view()

    def gradient(objective, model) -> torch.Tensor:
        adv = x.clone().requires_grad_(True)
        return torch.autograd.grad(objective(model, adv, goal), adv)[0]

    attacker = PGDAttacker(1, 8.0, 1.0, num_classes=5, eot_samples=n)
    eot = gradient(attacker.objective(x.device), defended(9))
    model = defended(9)  # the same n draws, one at a time
    one_draw = lambda m, a, y: F.cross_entropy(m(a), y, reduction="sum")  # noqa: E731
    per_draw = [gradient(one_draw, model) for _ in range(n)]
    torch.testing.assert_close(eot, torch.stack(per_draw).mean(0), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(eot, per_draw[0], rtol=1e-2, atol=0)


def test_eot_samples_apply_only_to_random_defenses():
    net = torch.nn.Identity()
    assert defenses.eot_samples(defenses.defend(net, "jpeg:75,noise:4"), 10) == 10
    assert defenses.eot_samples(defenses.defend(net, "jpeg:75,median:3"), 10) == 1
    assert defenses.eot_samples(net, 10) == 1


# --- the digits model behind JPEG: plain PGD vs BPDA, and what evaluation uses ---


def _robust_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def test_bpda_breaks_jpeg_that_plain_pgd_cannot(digits):
    model = defenses.DefendedModel(digits["model"], [defenses.JpegCompression(75)]).eval()
    x, y = digits["x"][:120], digits["y"][:120]
    attacker = PGDAttacker(10, 32.0, 4.0, target=None)

    def attacked(through: torch.nn.Module) -> float:
        adv, _ = attacker.attack(through, x, y, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return _robust_accuracy(model(adv), y)

    with torch.no_grad():
        clean = _robust_accuracy(model(x), y)
    plain, bpda = attacked(model), attacked(model.attack_view())
    assert clean > 0.85
    # Measured: clean 0.97, plain PGD 0.96 (the zero gradient leaves only the random start),
    # BPDA-PGD 0.38 (eps 32, as the demo).
    assert plain > 0.9 and bpda < 0.5, (clean, plain, bpda)

    adv, _ = attack_images(model, attacker, x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the evaluation path attacks through BPDA, scores the real model
        assert _robust_accuracy(model(adv), y) == bpda


# --- --defense through the command line, checkpoints and --eval ---


def test_defense_is_recorded_and_evaluation_attacks_through_bpda(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    common = ["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers", "0"]
    train = [*common, "--loader", "local", "--logdir", str(logdir), *TINY, "--epochs", "1",
             "--steps-per-epoch", "1", "--attack-iter", "0", "--train-eval", "none"]  # fmt: skip
    assert main([*train, "--defense", "jpeg:50,noise:2"]) == 0
    assert (
        json.loads((logdir / "config.json").read_text())["config"]["defense"] == "jpeg:50,noise:2"
    )
    ckpt = logdir / "checkpoint-epoch0001.pt"
    assert (
        torch.load(ckpt, weights_only=True)[nets.ARCHITECTURE_KEY]["defense"] == "jpeg:50,noise:2"
    )

    out = tmp_path / "eval.json"
    evaluate = ["--eval", *common, "--load", str(ckpt), "--eval-output", str(out)]
    capsys.readouterr()
    assert main([*evaluate, "--attack-iter", "1", "--eot-samples", "3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(
        "PGD-1 random target, L-inf eps=16, step 16, defense jpeg:50,noise:2, attacked through "
        "BPDA (identity backward) for jpeg:50 and EOT over 3 draws: 7 images"
    )
    assert json.loads(out.read_text())["defense"] == "jpeg:50,noise:2"
    assert main([*evaluate, "--attack-iter", "0", "--defense", "none"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("clean: 7 images")


# --- --defense-apply: the defense at training time (Dioptra's apply_fit / apply_predict) ---


def test_a_training_step_through_a_defense_is_the_step_on_the_transformed_images():
    from adv_model import NoOpAttacker
    from iat.train.trainer import LossSettings, train_step

    x, y = _images(4, 9, seed=7), torch.tensor([0, 1, 2, 3])
    net = _small_net()
    net(x)  # materialise the lazy layer
    nets_ = [net, copy.deepcopy(net)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets_]
    defended = defenses.DefendedModel(nets_[0], [defenses.JpegCompression(20)])
    loss = LossSettings(label_smoothing=0.0)
    train_step(defended, defended.attack_view(), NoOpAttacker(), optimizers[0], [(x, y)], loss)
    jpeg = defenses.jpeg_round_trip(x, 20)  # the reference: the step on JPEG'd images
    train_step(nets_[1], nets_[1], NoOpAttacker(), optimizers[1], [(jpeg, y)], loss)
    for a, b in zip(nets_[0].parameters(), nets_[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(jpeg, x)


def _weights(ckpt) -> dict:
    state = torch.load(ckpt, weights_only=True)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_defense_apply_fit_trains_behind_the_defense_and_evaluates_without_it(
    tiny_imagenet, tmp_path, capsys
):
    common = ["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers", "0"]
    train = [*common, "--loader", "local", *TINY, "--epochs", "1", "--steps-per-epoch", "1",
             "--attack-iter", "1", "--train-eval", "none"]  # fmt: skip
    runs = {
        "plain": [],
        "predict": ["--defense", "jpeg:10"],
        "fit": ["--defense", "jpeg:10", "--defense-apply", "fit"],
        "both": ["--defense", "jpeg:10", "--defense-apply", "both"],
    }
    ckpts = {}
    for name, flags in runs.items():
        assert main([*train, "--logdir", str(tmp_path / name), *flags]) == 0, name
        ckpts[name] = tmp_path / name / "checkpoint-epoch0001.pt"
    record = torch.load(ckpts["fit"], weights_only=True)[nets.ARCHITECTURE_KEY]
    assert (record["defense"], record["defense_apply"]) == ("jpeg:10", "fit")
    config = json.loads((tmp_path / "both" / "config.json").read_text())["config"]
    assert config["defense_apply"] == "both"

    plain = _weights(ckpts["plain"])
    # A defense applied in evaluation only leaves training untouched, bit for bit; applied in
    # training, the step sees the transformed images.
    assert all(torch.equal(plain[k], v) for k, v in _weights(ckpts["predict"]).items())
    for name in ("fit", "both"):
        assert not all(torch.equal(plain[k], v) for k, v in _weights(ckpts[name]).items())

    summaries = {}
    for name in ("fit", "both"):
        out = tmp_path / f"{name}.json"
        capsys.readouterr()
        evaluate = ["--eval", *common, "--load", str(ckpts[name]), "--eval-output", str(out)]
        assert main([*evaluate, "--attack-iter", "1"]) == 0
        summaries[name] = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(out.read_text())["defense"] == (None if name == "fit" else "jpeg:10")
    assert summaries["fit"].startswith(
        "PGD-1 random target, L-inf eps=16, step 16, trained behind jpeg:10 (--defense-apply fit), "
        "evaluated without it: 7 images"
    )
    assert summaries["both"].startswith(
        "PGD-1 random target, L-inf eps=16, step 16, defense jpeg:10, attacked through BPDA"
    )
    # --defense given at evaluation applies there, whatever phase the checkpoint recorded.
    capsys.readouterr()
    assert main(["--eval", *common, "--load", str(ckpts["fit"]), "--defense", "median:3"]) == 0
    assert ", defense median:3:" in capsys.readouterr().out.strip().splitlines()[-1]


def test_defense_apply_fit_without_a_defense_is_one_line(tmp_path, capsys):
    assert main(["--fake", "--logdir", str(tmp_path / "run"), *TINY, "--defense-apply", "fit"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --defense-apply fit: needs a --defense to apply in training\n"
    assert not (tmp_path / "run").exists()
    # Outside training, "fit" would silently evaluate without the defense.
    args = ["--eval", "--fake", *TINY, "--defense", "jpeg:50", "--defense-apply", "fit"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --defense-apply fit: the defense applies only in training")
    assert err.count("\n") == 1


def test_free_training_behind_jpeg_moves_its_perturbation_through_bpda(tiny_imagenet, tmp_path):
    """Free training takes its perturbation's gradient from the training loss: behind JPEG
    (zero gradient almost everywhere) that loss must be differentiated through BPDA, or the
    perturbation stays 0 and the run is clean training."""
    logdir = tmp_path / "run"
    assert main(["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4",
                 "--workers", "0", "--loader", "local", *TINY, "--epochs", "1",
                 "--steps-per-epoch", "2", "--train-eval", "none", "--logdir", str(logdir),
                 "--free-replays", "2", "--adv-method", "pgd_8_2_1", "--defense", "jpeg:50",
                 "--defense-apply", "fit"]) == 0  # fmt: skip
    delta = torch.load(logdir / "checkpoint-epoch0001.pt", weights_only=True)["free_delta"]
    assert delta.abs().max().item() == 8  # moved by eps * sign(gradient), clipped to eps
