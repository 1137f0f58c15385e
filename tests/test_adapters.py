"""The RobustBench-convention adapters, checked with a third-party attack library (ART)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adv_model import AttackSettings, create_attacker
from iat.convert.adapters import (
    BGRPixelInput,
    UnitRGBInput,
    bgr_pixels_to_unit_rgb,
    from_unit_rgb,
    to_unit_rgb,
)

art_classification = pytest.importorskip("art.estimators.classification")
art_attacks = pytest.importorskip("art.attacks.evasion")


def test_conversions_are_exact_inverses() -> None:
    bgr = torch.randint(0, 256, (2, 3, 5, 4)).float()
    rgb = bgr_pixels_to_unit_rgb(bgr)
    assert torch.equal(rgb[:, 0], bgr[:, 2] / 255) and rgb.max() <= 1
    model = torch.nn.Conv2d(3, 2, 1)
    wrapped = to_unit_rgb(model)
    assert isinstance(wrapped, UnitRGBInput) and from_unit_rgb(wrapped) is model
    external = torch.nn.Conv2d(3, 2, 1)
    assert isinstance(from_unit_rgb(external), BGRPixelInput)
    assert to_unit_rgb(from_unit_rgb(external)) is external
    # Calling through the adapter is calling the model on the converted images.
    assert torch.allclose(to_unit_rgb(model)(rgb), model(bgr), atol=1e-5)
    assert torch.allclose(from_unit_rgb(external)(bgr), external(rgb), atol=1e-6)


def test_third_party_attack_on_the_adapter_fools_our_model(digits) -> None:
    model = digits["model"].eval()
    images, labels = digits["x"][:64], digits["y"][:64]  # BGR pixels
    classifier = art_classification.PyTorchClassifier(
        model=to_unit_rgb(model),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(images.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    eps = 32 / 255
    attack = art_attacks.ProjectedGradientDescent(
        classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=10, verbose=False
    )
    unit = bgr_pixels_to_unit_rgb(images).numpy()
    adversarial = attack.generate(unit)
    assert np.abs(adversarial - unit).max() <= eps + 1e-6
    # ART's examples, converted back, go through our own forward pass: same predictions.
    ours = torch.from_numpy(adversarial).flip(1) * 255
    with torch.no_grad():
        predicted = model(ours).argmax(1)
        clean = model(images).argmax(1)
    assert torch.equal(predicted, torch.from_numpy(classifier.predict(adversarial).argmax(1)))
    clean_accuracy = (clean == labels).float().mean().item()
    robust_accuracy = (predicted == labels).float().mean().item()
    assert robust_accuracy < clean_accuracy - 0.3, (clean_accuracy, robust_accuracy)
    # And they are about as strong as our own untargeted PGD with the same budget.
    pgd = create_attacker("pgd", AttackSettings(10, 32.0, 8.0, target=None))
    with torch.no_grad():
        ours_pgd = model(pgd.attack(model, images, labels)[0]).argmax(1)
    assert abs((ours_pgd == labels).float().mean().item() - robust_accuracy) < 0.15
