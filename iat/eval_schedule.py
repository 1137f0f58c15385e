"""Which evaluations run during training, after which epochs (``--train-eval``).

The original's schedule is written for its 110-epoch recipe: clean and PGD-10 after every
epoch, PGD-50 every 20 epochs and in the last 2, PGD-100 every 10 epochs and in the last 5. A
run of another length gets the same schedule scaled to it: a period of P epochs becomes
round(P * E / 110) epochs (none if that rounds to 0), the last K epochs become the last
ceil(K * E / 110). So a 2-epoch run evaluates PGD-50 and PGD-100 once, after its last epoch,
and a 110-epoch run exactly as the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RECIPE_EPOCHS = 110  # Feature Denoising Sec 5 (ImageNet in 1 Hour's schedule, stretched)


@dataclass(frozen=True)
class EvalSpec:
    """One in-training evaluation: its name, PGD iterations, and when it runs."""

    name: str
    attack_iter: int
    period: int | None = None  # every `period` epochs of the recipe (None: after every epoch)
    last: int = 0  # and in the recipe's last `last` epochs

    def runs_after(self, epoch: int, epochs: int) -> bool:
        """Whether this evaluation runs after `epoch` (1-based) of a run of `epochs` epochs."""
        if self.period is None:
            return True
        period = round(self.period * epochs / RECIPE_EPOCHS)
        final = math.ceil(self.last * epochs / RECIPE_EPOCHS)
        return (period > 0 and epoch % period == 0) or epoch > epochs - final


_CLEAN = EvalSpec("eval-clean", 0)
_PGD10 = EvalSpec("eval-10step", 10)
# --train-eval choices.
EVAL_SCHEDULES: dict[str, list[EvalSpec]] = {
    "original": [
        _CLEAN,
        _PGD10,
        EvalSpec("eval-50step", 50, period=20, last=2),
        EvalSpec("eval-100step", 100, period=10, last=5),
    ],
    "light": [_CLEAN, _PGD10],
    "none": [],
}
