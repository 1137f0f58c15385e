"""Which evaluations run during training, after which epochs (``--train-eval``).

The original's schedule is written for its 110-epoch recipe: clean and PGD-10 after every
epoch, PGD-50 every 20 epochs and in the last 2, PGD-100 every 10 epochs and in the last 5. A
run of E epochs gets the same schedule stretched to it: its epoch e stands for the recipe's
epochs in ((e - 1) * 110 / E, e * 110 / E], and an evaluation runs after it when the recipe runs
it after any of those. So a 110-epoch run evaluates exactly as the original, and the shorter a
run, the larger the share of its epochs that evaluate (a 22-epoch run: PGD-50 after epochs 4,
8, 12, 16, 20, 22; a run of 5 epochs or fewer: after each). Rounding a scaled period instead
gave a 3-epoch run PGD-50 after every epoch and a 2-epoch run once.
"""

from __future__ import annotations

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
        # The recipe's epochs r with (epoch - 1) * R / E < r <= epoch * R / E, in integers.
        first = (epoch - 1) * RECIPE_EPOCHS // epochs + 1
        last = epoch * RECIPE_EPOCHS // epochs
        return any(
            r % self.period == 0 or r > RECIPE_EPOCHS - self.last for r in range(first, last + 1)
        )


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
