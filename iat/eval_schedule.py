"""Which evaluations run during training, after which epochs (``--train-eval``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSpec:
    """One in-training evaluation: its name, PGD iterations, and when it runs."""

    name: str
    attack_iter: int
    when: Callable[[int, int], bool]  # (epoch, max_epoch) -> run it after this epoch?


_CLEAN = EvalSpec("eval-clean", 0, lambda e, m: True)
_PGD10 = EvalSpec("eval-10step", 10, lambda e, m: True)
# --train-eval choices: the in-training evaluations after each epoch (the original's always
# include the last 2 epochs).
EVAL_SCHEDULES: dict[str, list[EvalSpec]] = {
    "original": [
        _CLEAN,
        _PGD10,
        EvalSpec("eval-50step", 50, lambda e, m: e % 20 == 0 or e > m - 2),
        EvalSpec("eval-100step", 100, lambda e, m: e % 10 == 0 or e > m - 5),
    ],
    "light": [_CLEAN, _PGD10],
    "none": [],
}
