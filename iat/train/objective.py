"""The loss adversarial training minimises: the attacked (and clean) images of a batch, the
cross-entropy over them and adversarial logit pairing (ALP) beside it."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks.core import Attacker


def mixed_batch(batch: int, adv_fraction: float, paired: bool) -> tuple[slice, slice]:
    """Which images of a loaded batch of ``batch`` are attacked and which are used clean.

    Unpaired (mixed-minibatch PGD, Kurakin et al. 2017 Sec 4.1): each image once, the first
    ``round(adv_fraction * batch)`` (at least 1) attacked, the rest clean. Paired (ALP Sec 3: a
    minibatch of m clean examples and their m adversarial examples; ALP's train.py concatenates
    the loaded batch with its attacked copy): every loaded image is used, clean or attacked or
    both, and the first images are both, so that ``adv_fraction`` of the ``attacked + clean``
    images trained on are adversarial: all images clean and the first
    ``batch * F / (1 - F)`` attacked for F <= 0.5 (all twice at 0.5), else all attacked and the
    first ``batch * (1 - F) / F`` clean."""
    if not paired:
        attacked = min(batch, max(1, round(adv_fraction * batch)))
        return slice(0, attacked), slice(attacked, batch)
    if adv_fraction <= 0.5:
        attacked = min(batch, max(1, round(batch * adv_fraction / (1 - adv_fraction))))
        return slice(0, attacked), slice(0, batch)
    clean = min(batch, max(1, round(batch * (1 - adv_fraction) / adv_fraction)))
    return slice(0, batch), slice(0, clean)


def logit_pairing_loss(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """The mean squared difference of paired logits (ALP Sec 3, L2 loss between f(x) and
    f(x~)): the first ``min(len(clean), len(adv))`` rows of each are pairs."""
    pairs = min(clean_logits.shape[0], adv_logits.shape[0])
    return F.mse_loss(adv_logits[:pairs], clean_logits[:pairs])


class TrainingTerms(NamedTuple):
    """One batch's training loss and its parts (what the trainer logs)."""

    loss: Tensor  # what is minimised: cross_entropy + lp_weight * pairing
    adv_logits: Tensor  # the adversarial images' logits, detached (what the metrics count)
    targets: Tensor  # the attack's targets of those images
    cross_entropy: Tensor  # detached
    pairing: Tensor | None  # ALP's L(f(x), f(x~)), unweighted and detached; None: no pairing


def training_objective(
    model: nn.Module,
    attack_model: nn.Module,
    attacker: Attacker,
    images: Tensor,
    labels: Tensor,
    label_smoothing: float,
    adv_fraction: float = 1.0,
    lp_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The adversarial training loss of one batch: ``(loss, adv_logits, target_labels)``, the
    first three of ``training_terms``."""
    terms = training_terms(
        model, attack_model, attacker, images, labels, label_smoothing, adv_fraction, lp_weight
    )
    return terms.loss, terms.adv_logits, terms.targets


def training_terms(
    model: nn.Module,
    attack_model: nn.Module,
    attacker: Attacker,
    images: Tensor,
    labels: Tensor,
    label_smoothing: float,
    adv_fraction: float = 1.0,
    lp_weight: float = 0.0,
) -> TrainingTerms:
    """The adversarial training loss of one batch, with its parts.

    The attack runs on ``attack_model`` (the bare network, BatchNorm in inference mode) and the
    loss is computed through ``model`` (e.g. its DDP wrapper) in one forward pass.
    ``adv_fraction`` 1 (the original) trains on adversarial images only; below 1 the batch is
    mixed (``mixed_batch``), and ``lp_weight`` > 0 adds adversarial logit pairing. The logits
    and targets returned are those of the adversarial images, made from the first
    ``len(adv_logits)`` images of the batch (what the training metrics count)."""
    pairing = lp_weight > 0
    attacked, clean = mixed_batch(images.shape[0], adv_fraction, paired=pairing)
    adv, targets = attacker.attack(attack_model, images[attacked], labels[attacked])
    logits = model(torch.cat([adv, images[clean].to(adv.dtype)]))
    # Feature Denoising Sec 5: label smoothing 0.1; ALP Sec 3: the cross-entropy of the mixed
    # minibatch, clean and adversarial images alike.
    cross_entropy = F.cross_entropy(
        logits, torch.cat([labels[attacked], labels[clean]]), label_smoothing=label_smoothing
    )
    return paired_terms(cross_entropy, logits, adv.shape[0], targets, lp_weight)


def paired_terms(
    cross_entropy: Tensor, logits: Tensor, attacked: int, targets: Tensor, lp_weight: float
) -> TrainingTerms:
    """``TrainingTerms`` of a batch whose first `attacked` logits are the adversarial images':
    with ``lp_weight`` > 0, ALP Sec 3's J(M, theta) + lambda * L(f(x), f(x~)) over the pairs."""
    adv_logits, clean_logits = logits[:attacked], logits[attacked:]
    if lp_weight <= 0:
        return TrainingTerms(
            cross_entropy, adv_logits.detach(), targets, cross_entropy.detach(), None
        )
    pairing = logit_pairing_loss(clean_logits, adv_logits)
    return TrainingTerms(
        cross_entropy + lp_weight * pairing,
        adv_logits.detach(),
        targets,
        cross_entropy.detach(),
        pairing.detach(),
    )
