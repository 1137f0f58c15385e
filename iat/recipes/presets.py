"""Training recipes (``--recipe NAME``): each a dict of configuration values with its source.

A recipe sets its values over ``Config``'s defaults; flags given on the command line override
it (``iat.app.cli``). The architecture and data are never part of a recipe: they are the user's.
Pixel units throughout (epsilon 4 = 4/255); ``base_lr`` is per 256 images (the sources' LR
converted from their batch). README "Recipes" lists each with the numbers its paper reports and
where this re-creation differs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    source: str  # where the values come from: repository and file, paper section
    settings: dict[str, object] = field(default_factory=dict)


# Wong, Rice & Kolter 2020's ImageNet phases (fast_adversarial ImageNet/configs/
# configs_fast_4px_phase{1,2,3}.yml, run_fast_4px.sh): LR 0 -> 0.4 at epoch 1 -> 0.04 at 6 ->
# 0.004 at 12 -> 0.0004 at 15 (lr_epochs / lr_values, interpolated per iteration; 0.4 at their
# phase-1 batch of 512: 0.2 per 256), crops of 128, 224 then 288 (phase data 160 / 352 / full).
_FAST_AT = {
    "epochs": 15,
    "lr_schedule": "cyclic",
    "lr_knots": (0.0, 0.0, 1.0, 1.0, 6.0, 0.1, 12.0, 0.01, 15.0, 0.001),
    "base_lr": 0.2,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,  # main_fast.py: nn.CrossEntropyLoss()
    "train_augment": "inception",  # RandomResizedCrop + RandomHorizontalFlip
    "image_size": 288,
    "size_schedule": (1, 128, 7, 224, 13, 288),
    "overfit_guard": 0.2,  # CIFAR10/train_fgsm.py --early-stop (Sec 5.2)
    # In-training evaluation under the trained threat model (main_fast.py validate_pgd: PGD at
    # clip_eps, untargeted); 4 px here, fast-at-2 sets 2.
    "attack_epsilon": 4.0,
    "attack_target": "none",
}

# Singh, Croce & Hein 2023 (nmndeep/revisiting-at: run_train.sh, main.py, parserr.py
# Arguments_augment). run_train.sh: --lr.lr 1e-3 with 80 images per GPU, not scaled with the
# batch; on 8 GPUs (640 images): 4e-4 per 256. Their APGD-2 (--adv.attack apgd --adv.n_iter 2)
# is --adv-method apgd_4_2 here, on hard labels only: under Mixup / CutMix the soft-target attack
# is PGD, so PGD-2 with steps of epsilon from a random start stands in.
_REVISITING_AT = {
    "optimizer": "adamw",
    "adam_betas": (0.9, 0.95),  # main.py create_optimizer
    "weight_decay": 0.05,
    "lr_schedule": "cosine",
    "base_lr": 4e-4,
    "warmup_epochs": 20.0,  # run_train.sh --lr.lr_peak_epoch 20
    "warmup_factor": 1e-4,  # main.py get_cosine_lr: from 1e-4 x lr
    "min_lr_factor": 0.005,  # lr_min 5e-6 of 1e-3
    "epochs": 300,  # ViT-S / ConvNeXt-T (README table); -b: 250, -l: 100
    "label_smoothing": 0.1,
    "moving_average_decay": 0.9999,  # ModelEmaV2(decay=0.9999)
    "train_augment": "randaugment-erasing",  # aa rand-m9-mstd0.5-inc1, reprob 0.25
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "mix_switch_prob": 0.5,
    "adv_method": "pgd_4_4_2",
    "prob_start_from_clean": 0.0,
    # In-training evaluation under the trained threat model (their eval: untargeted, eps 4/255).
    "attack_epsilon": 4.0,
    "attack_target": "none",
}

# Liu et al. 2023, ARES 2.0 (thu-ml/ares robust_training/train_configs/
# vit_base_patch16_224.yaml, as the Swin and ConvNeXt ones; adversarial_training.py): lrb 5e-4
# per 512 images, warm-up from warmup_lr 1e-6 (0.002 of 5e-4), min_lr 1e-5 (0.02), PGD-3 at
# 4/255 with step 8/255/3 ramped over 5 epochs. Its random_start=False branch
# (ares/utils/adv.py random_uniform) still starts from uniform noise in the ball.
_ARES = {
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "lr_schedule": "cosine",
    "base_lr": 2.5e-4,
    "warmup_epochs": 5.0,
    "warmup_factor": 0.002,
    "min_lr_factor": 0.02,
    "epochs": 300,
    "label_smoothing": 0.1,
    "moving_average_decay": 0.9998,
    "train_augment": "randaugment-erasing",  # aa rand-m9-mstd0.5-inc1, reprob 0.25
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "mix_switch_prob": 0.5,
    "attack_iter": 3,
    "attack_epsilon": 4.0,
    "attack_step_size": 8 / 3,
    "attack_target": "none",
    "prob_start_from_clean": 0.0,
    "step_warmup_epochs": 5,
}

# Wang, Li, Zhu & Xie 2024, AdvXL ("Revisiting Adversarial Training at Scale", CVPR; UCSC-VLAA/
# AdvXL released evaluation code only). Sec 3's two stages, coarse-to-fine and weak-to-strong: a
# long pre-training on images resized to a quarter of the tokens (112 px of 224, antialiased
# bilinear) attacked by PGD-1, then a short fine-tuning at full resolution with PGD-3; L-inf 4/255,
# untargeted, always from a uniform random start (their timm/adversarial/attacker.py). The
# stages' lengths (the last tenth at full resolution), the step (--attack-step-size raised to
# epsilon / iterations: 4, then 8/3) and the optimisation (ARES's ViT recipe, 300 epochs) are
# this project's choices: the paper counts samples seen on web-scale data.
_ADVXL = {
    **_ARES,
    "image_size": 224,
    "size_schedule": (1, 112, 271, 224),
    "attack_iter_schedule": (1, 1, 271, 3),
}

RECIPES: dict[str, Recipe] = {
    # The original: Feature Denoising (Xie et al. 2019) Sec 5-6 and its README's command.
    "iat": Recipe("facebookresearch/ImageNet-Adversarial-Training README; Feature Denoising Sec 5"),
    # Kannan, Kurakin & Goodfellow 2018 (tensorflow/models research/adversarial_logit_pairing
    # README: "train_adv_method=pgdll_16_2_10,train_lp_weight=0.5" at 64x64, EMA 0.9999;
    # model_lib.py default_hparams: batch 32, label smoothing 0.1, weight decay 1e-4). Its
    # RMSProp and exponential LR decay are not here: SGD and the step schedule stay.
    "alp": Recipe(
        "tensorflow/models research/adversarial_logit_pairing README.md, model_lib.py",
        {
            "adv_method": "pgdll_16_2_10",
            "lp_weight": 0.5,
            "moving_average_decay": 0.9999,
            "image_size": 64,
            "batch": 32,
        },
    ),
    "fast-at": Recipe(
        "locuslab/fast_adversarial ImageNet/configs/configs_fast_4px_phase{1,2,3}.yml",
        {**_FAST_AT, "adv_method": "fgsmrs_4"},  # clip_eps 4, fgsm_step 5 = 1.25 eps
    ),
    "fast-at-2": Recipe(
        "locuslab/fast_adversarial ImageNet/configs/configs_fast_2px_phase{1,2,3}.yml",
        {**_FAST_AT, "adv_method": "fgsmrs_2", "attack_epsilon": 2.0},  # clip_eps 2, step 2.5
    ),
    "revisiting-at": Recipe("nmndeep/revisiting-at run_train.sh, main.py", _REVISITING_AT),
    "revisiting-at-b": Recipe(
        "nmndeep/revisiting-at README (ViT-B / ConvNeXt-B: 250 epochs)",
        {**_REVISITING_AT, "epochs": 250},
    ),
    "revisiting-at-l": Recipe(
        "nmndeep/revisiting-at README (ConvNeXt-L: 100 epochs)",
        {**_REVISITING_AT, "epochs": 100},
    ),
    "ares": Recipe("thu-ml/ares robust_training/train_configs/vit_base_patch16_224.yaml", _ARES),
    # ARES's ResNet configuration (train_configs/resnet50.yaml): SGD, lrb 0.2 per 512, step
    # decay x0.1 every 30 epochs, 95 epochs, warm-up 5 epochs from 1e-4 (0.001 of 0.1), no
    # RandAugment or erasing (color_jitter 0.1 is not applied here), CutMix always (switch 1.0).
    "ares-resnet": Recipe(
        "thu-ml/ares robust_training/train_configs/resnet50.yaml",
        {
            **_ARES,
            "optimizer": "sgd",
            "weight_decay": 1e-4,
            "lr_schedule": "step",
            "base_lr": 0.1,
            "warmup_factor": 0.001,
            "lr_decay_epochs": (30, 60, 90),
            "epochs": 95,
            "train_augment": "inception",
            "mix_switch_prob": 1.0,
        },
    ),
    "advxl": Recipe(
        "Wang et al. 2024 (AdvXL) Sec 3 stages over thu-ml/ares vit_base_patch16_224.yaml", _ADVXL
    ),
}
DEFAULT_RECIPE = "iat"


# A recipe's settings counted in epochs, fitted to a run shorter than the recipe (--epochs):
# its warm-ups (and the cyclic schedule's knots, whose first rise is the warm-up) scaled by
# epochs / the recipe's epochs, so that a 2-epoch run of a 300-epoch recipe is not all warm-up;
# and its stages (EPOCH_SCHEDULES), each first epoch scaled alike, so that a short run reaches
# the last stage.
EPOCH_SCHEDULES = ("size_schedule", "attack_iter_schedule")  # (first epoch, value) pairs
_EPOCH_SETTINGS = (
    "warmup_epochs", "eps_warmup_epochs", "step_warmup_epochs", "lr_knots", *EPOCH_SCHEDULES
)  # fmt: skip


def _scaled(name: str, value: object, ratio: float, epochs: int) -> object:
    if name == "lr_knots":  # (epoch, factor) pairs: the epochs scale
        return tuple(v * ratio if i % 2 == 0 else v for i, v in enumerate(value))
    if name in EPOCH_SCHEDULES:
        return _scaled_stages(value, ratio, epochs)
    return round(value * ratio) if isinstance(value, int) else value * ratio


def _scaled_stages(pairs: tuple[int, ...], ratio: float, epochs: int) -> tuple[int, ...]:
    """(first epoch, value) pairs for a run of `epochs`: each stage begins after `ratio` of the
    epochs before it, rounded, by the last epoch at the latest; of stages that begin in the same
    epoch the last is kept."""
    begins: dict[int, int] = {}
    for first, value in zip(pairs[0::2], pairs[1::2], strict=True):
        begins[min(epochs, 1 + round((first - 1) * ratio))] = value
    return tuple(word for first, value in begins.items() for word in (first, value))


def fit_to_epochs(name: str, epochs: int, given: Collection[str] = ()) -> dict[str, object]:
    """Recipe `name`'s epoch-counted settings (those not `given` as flags) for a run of `epochs`
    epochs, where that is shorter than the recipe's; empty otherwise."""
    settings = RECIPES[name].settings
    full = settings.get("epochs")
    if not isinstance(full, int) or epochs >= full:
        return {}
    return {
        key: _scaled(key, value, epochs / full, epochs)
        for key, value in settings.items()
        if key in _EPOCH_SETTINGS and key not in given
    }


def _words(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(_words, value))
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fitted_line(name: str, epochs: int, values: Mapping[str, object]) -> str | None:
    """The line saying which of recipe `name`'s settings `values` (a configuration's) holds
    scaled to its `epochs`; None where none is."""
    fitted = [
        f"--{key.replace('_', '-')} {_words(RECIPES[name].settings[key])} -> {_words(value)}"
        for key, value in fit_to_epochs(name, epochs).items()
        if values.get(key) == value
    ]
    if not fitted:
        return None
    return (
        f"recipe {name}: --epochs {epochs} of its {RECIPES[name].settings['epochs']}, so its "
        f"warm-ups and stages are scaled: {', '.join(fitted)} (give these flags to set them "
        "yourself)"
    )
