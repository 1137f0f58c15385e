"""The one place predictions are counted: top-1 / top-5 errors and attack success.

``count_batch`` is used by training (``Meter``, summed on the device and read only when
logging) and by evaluation (summed on the device, then over ranks).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from iat.attacks import attack_success

COUNTS = ("images", "top1_wrong", "top5_wrong", "attack_success")


def count_batch(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 ``[images, top-1 wrong, top-5 wrong, attack successes]`` of one batch."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    in_top5 = (top5 == labels[:, None]).any(dim=1)
    return torch.stack(
        [
            torch.tensor(labels.shape[0], device=logits.device),
            (logits.argmax(dim=1) != labels).sum(),
            (~in_top5).sum(),
            attack_success(logits, labels, targets).sum(),
        ]
    ).double()


@dataclass(frozen=True)
class EvalResult:
    images: int  # images evaluated, over all processes
    top1_error: float  # fraction of (attacked) images whose top-1 prediction is wrong
    top5_error: float  # fraction whose label is not among the top 5
    attack_success_rate: float  # fraction where the attack reached its goal (see attack_success)
    skipped: int = 0  # unreadable images left out (--skip-unreadable)
    # the attacker's own figures (Attacker.describe_stats): e.g. the median minimal epsilon,
    # each ensemble member's success
    details: dict = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        """Top-1 accuracy under attack: 1 - top-1 error (clean accuracy for clean evaluation)."""
        return 1.0 - self.top1_error

    @classmethod
    def from_counts(
        cls, counts: torch.Tensor, skipped: int = 0, details: dict | None = None
    ) -> EvalResult:
        n, top1, top5, success = counts.tolist()
        rates = (top1 / max(n, 1), top5 / max(n, 1), success / max(n, 1))
        return cls(int(n), *rates, skipped=skipped, details=details or {})

    def as_dict(self) -> dict:
        return {**asdict(self), "robust_accuracy": self.robust_accuracy}


class Meter:
    """Training counts and the loss, summed on the device; read (one host sync) when logging."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(COUNTS), dtype=torch.float64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.parts_sum: torch.Tensor | None = None  # cross-entropy, logit pairing (with ALP)
        self.start = time.perf_counter()

    def add(self, step) -> None:
        """Count one update (a ``trainer.StepResult``): its loss weighted by its images."""
        images = step.labels.shape[0]
        self.counts += count_batch(step.logits, step.labels, step.targets)
        self.loss_sum += step.loss.detach().double() * images
        if step.pairing is not None:
            parts = torch.stack([step.cross_entropy, step.pairing]).double() * images
            self.parts_sum = parts if self.parts_sum is None else self.parts_sum + parts

    def read(self) -> dict[str, float]:
        r = EvalResult.from_counts(self.counts)
        seconds = time.perf_counter() - self.start
        images = max(r.images, 1)
        scalars = {
            "train/loss": self.loss_sum.item() / images,
            "train/top1_error": r.top1_error,
            "train/top5_error": r.top5_error,
            "train/attack_success_rate": r.attack_success_rate,
            "train/images_per_sec_per_process": r.images / max(seconds, 1e-9),
        }
        if self.parts_sum is not None:  # ALP Sec 3: the loss's two terms, the pairing unweighted
            cross_entropy, pairing = (self.parts_sum / images).tolist()
            scalars |= {"train/cross_entropy": cross_entropy, "train/logit_pairing": pairing}
        return scalars
