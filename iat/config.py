"""The run configuration: one frozen object, validated once, written into the run directory.

``iat.app.cli`` builds it from the command line (or replays a run's ``config.json`` with flags over
it); every other module receives the fields it needs as explicit arguments. Defaults reproduce
the original ImageNet-Adversarial-Training recipe. Flag choices come from the registries that
hold them (architectures, batch sources, augmentations, in-training evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nets
from iat.attacks import ATTACK_LOSSES, ATTACKS, DEFAULT_QUERIES, NORMS, TARGET_MODES, attack_info
from iat.attacks.core import pgd_step_size
from iat.attacks.registry import AttackInfo, default_attack, evaluation_attacks, takes
from iat.attacks.spec import AttackSpec, flags_attack_spec, parse_attack_spec
from iat.data.augment import TRAIN_AUGMENTATIONS
from iat.data.layouts import AUTO_LAYOUT, FOLDER_ITSELF, READERS
from iat.data.sources import TRAIN_SOURCES
from iat.defenses.registry import ATTACK_GRADIENTS, WrapOptions, check_options, parse_frontend
from iat.defenses.transforms import DEFENSE_PHASES, applied_defense, parse_defense
from iat.recipes.eval_schedule import EVAL_SCHEDULES
from iat.recipes.optim import LR_SCHEDULES, OPTIMIZERS
from iat.recipes.presets import DEFAULT_RECIPE, RECIPES, fit_to_epochs

MODES = ("train", "eval", "eval_directory", "export_activations")
# The fields of a checkpoint's architecture record that a run's configuration sets.
MODEL_FIELDS = nets.CONFIG_FIELDS
NO_TARGET = "none"  # --attack-target for untargeted attacks
DATA_SERVER_TRANSPORTS = ("ipc://", "tcp://")
EVAL_SPLITS = ("val", "train", FOLDER_ITSELF)  # "." the --data folder itself (an export)
BENCHMARKS = ("robustbench",)  # --benchmark: protocols iat.eval.benchmarks implements
# --benchmark's result file: what it says of the model (iat.eval.benchmarks.model_info)
BENCHMARK_INFO_FIELDS = (
    "model_name", "model_link", "model_authors", "model_venue", "additional_data"
)  # fmt: skip
# --eval-set: iat.eval.ood
EVAL_SETS = ("imagenet-c", "imagenet-r", "imagenet-a", "imagenet-sketch", "imagenet-v2")
AMP_DTYPES = ("bfloat16", "float16")  # --amp-dtype: torch's names (timm's --amp-dtype)
FSDP_MODES = ("full", "hybrid")  # --fsdp (iat.train.fsdp): over every process, within a machine
FSDP_ATTACK_GATHERS = ("once", "per-layer")  # --fsdp-attack-gather (iat.train.fsdp)


def choices() -> dict[str, tuple[str, ...]]:
    """Every flag with a fixed set of values, from the registry that owns them."""
    return {
        "arch": tuple(nets.available_architectures()),
        "denoise_op": tuple(nets.available_denoise_ops()),
        "loader": tuple(TRAIN_SOURCES),
        "attack": evaluation_attacks(),
        "norm": NORMS,
        "attack_loss": ATTACK_LOSSES,
        "attack_target": tuple(t or NO_TARGET for t in TARGET_MODES),
        "train_augment": tuple(TRAIN_AUGMENTATIONS),
        "data_layout": (AUTO_LAYOUT, *READERS),
        "split": EVAL_SPLITS,
        "train_eval": tuple(EVAL_SCHEDULES),
        "defense_apply": tuple(DEFENSE_PHASES),
        "frontend_gradient": ATTACK_GRADIENTS,
        "benchmark": BENCHMARKS,
        "eval_set": EVAL_SETS,
        "optimizer": tuple(OPTIMIZERS),
        "lr_schedule": tuple(LR_SCHEDULES),
        "recipe": tuple(RECIPES),
        "amp_dtype": AMP_DTYPES,
        "fast_attack_dtype": AMP_DTYPES,
        "fsdp": FSDP_MODES,
        "fsdp_attack_gather": FSDP_ATTACK_GATHERS,
    }


def depths() -> tuple[int, ...]:
    """Every -d some architecture accepts (each checks its own: nets.depths_of)."""
    return tuple(
        sorted({d for arch in nets.available_architectures() for d in nets.depths_of(arch)})
    )


@dataclass(frozen=True)
class Config:
    # --- what to run -------------------------------------------------------------------------
    mode: str = "train"  # "train", "eval" or "eval_directory" (chosen by main.py's flags)
    # The training recipe whose values were applied under the flags (iat.recipes.presets.RECIPES):
    # "iat" (the original, these defaults), "alp", "fast-at", "revisiting-at", "ares", ...
    recipe: str = DEFAULT_RECIPE

    # --- data ----------------------------------------------------------------------------------
    data: str | None = None  # ImageNet-layout folder: train/<wnid>/*, val/<wnid>/* (or val.txt)
    fake: bool = False  # constant uint8 batches instead of data, for throughput tests
    data_layout: str = "auto"  # data folder layout (layouts.READERS) or "auto" to detect it
    loader: str = "server"  # "server": the machine's serve-data.py (as the original); "local"
    data_server: str | None = None  # server address; None = ipc://@imagenet-train-b{batch}
    data_timeout: float = 60.0  # seconds without a batch before the server is declared gone
    workers: int | None = None  # decoding processes per process; None: its CPU share, <= 8
    image_size: int = 224  # side of the square crops fed to the network
    train_augment: str = "fbresnet"  # "fbresnet" (the original), "flip" (eval crop + flip), "none"
    # Progressive resizing (Wong et al. 2020, fast_adversarial ImageNet phases 128/224/288):
    # (first epoch, side) pairs, flattened; the --image-size crops are resized to the side on
    # the device (bilinear, antialiased) from that epoch on. None: --image-size throughout.
    size_schedule: tuple[int, ...] | None = None
    batch: int = 32  # images per process and step (the original's --batch: per GPU)

    # --- model ---------------------------------------------------------------------------------
    # nets registry: ResNet, ResNetDenoise, ResNeXtDenoiseAll, ...; timm's and torchvision's
    # names (convnext_tiny, vit_small_patch16_224, resnet50, ...) for their layouts.
    arch: str = "ResNet"
    # 50 / 101 / 152 (ResNetBasic: 18 / 34; a timm / torchvision name: its only depth, implied by
    # the command line); num_blocks overrides it.
    depth: int | None = 50
    num_blocks: tuple[int, ...] | None = None  # blocks per group, e.g. (1, 1, 1, 1); ViT: (12,)
    # Base channel count (64 = the original); smaller for tiny models. The timm / torchvision
    # architectures scale every layer by width / 64 (64: the published model).
    width: int = 64
    # Stochastic depth (Huang et al. 2016): the last block's drop rate, rising linearly from 0
    # (ConvNeXt, ViT and Swin only: nets.options_of); off at 0.
    drop_path: float = 0.0
    # Recompute each block's activations in the backward pass instead of storing them (less
    # memory, one more forward; ConvNeXt, ViT and Swin only).
    grad_checkpointing: bool = False
    # Denoising operation of the denoising blocks (nets.DENOISE_OPS; Feature Denoising Sec 4.1);
    # None: the architecture's original one (ResNetDenoise embedded_gaussian, ResNeXtDenoiseAll
    # dot_product). Only for architectures with denoising blocks.
    denoise_op: str | None = None
    # Side of the local ops' window (bilateral, mean, median); odd.
    denoise_window: int = nets.DEFAULT_WINDOW
    num_classes: int | None = None  # None: number of classes in the data (1000 for ImageNet)
    load: str | None = None  # .npz (original) or .pt weights / training checkpoint to start from
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes (CUDA only)
    # Sharded data parallelism (iat.train.fsdp, FSDP2's fully_shard) instead of DDP: "full"
    # shards parameters, gradients and optimizer state over every process, "hybrid" within each
    # machine (replicated across machines); checkpoints are sharded folders. None: DDP.
    fsdp: str | None = None
    # How the training attack holds the sharded weights: "once" gathers each unit once per step
    # (the whole model unsharded during the attack), "per-layer" around each of its passes.
    fsdp_attack_gather: str = "once"
    # Input-transform defense before the model, attacked through BPDA/EOT
    # (iat.defenses.transforms), e.g.
    # "jpeg:75,median:3,noise:8"; None or "none": no defense. Checkpoints record it.
    defense: str | None = None
    # When it applies (Dioptra's apply_fit / apply_predict): "predict" (evaluation, in-training
    # evaluation included, and prediction), "fit" (training only) or "both".
    defense_apply: str = "predict"
    # Model-level defense wrapping the classifier (iat.defenses.registry): a sparse-coding
    # frontend file from `python -m iat.sparse_frontend train` (iat.defenses.sparse_frontend;
    # Bakiskan et al. 2021), or NAME:ARGUMENT of another registered one. Checkpoints carry its
    # tensors and spec; --eval of such a checkpoint uses the checkpoint's (and sets this to it).
    frontend: str | None = None
    frontend_trainable: bool = False  # train the defense's own parameters (the frontend's decoder)
    # What white-box attacks differentiate through the defense: "bpda" (its attack view; the
    # frontend's: identity backward for top-T and threshold, Athalye et al. 2018 Sec 4.1) or
    # "autograd" (gradient-masked: only to compare against).
    frontend_gradient: str = "bpda"

    # --- attack (pixel units, 0-255; Feature Denoising Sec 6: eps 16) ----------------------------
    attack_iter: int = 30  # PGD iterations; 0 = train / evaluate on clean images
    attack_epsilon: float = 16.0  # radius of the perturbation (L-inf; --eval: in --norm)
    attack_step_size: float = 1.0  # per-iteration step (raised to epsilon / attack_iter if lower)
    attack_target: str = "random"  # "random" wrong class, "least_likely", or "none" (untargeted)
    prob_start_from_clean: float = 0.2  # training only: chance a batch starts from the clean image
    use_fp16xla: bool = False  # attack under autocast and compiled (the original's fp16 + XLA)
    # --use-fp16xla's compute type on CUDA, "float16" (loss x128, the original's) or "bfloat16"
    # (no scaling); None: float16. CPUs: bf16 (iat.builders.attack_precision)
    fast_attack_dtype: str | None = None
    # The training attack as a spec (iat.attacks.spec: clean, pgd_EPS_STEP_NITER, pgdll_...,
    # pgdrnd_..., fgsmrs_EPS); None: the --attack-* flags above (random-target PGD).
    adv_method: str | None = None

    # Linear warm-up of the training attack over the first epochs: in epoch e (1-based) epsilon,
    # or the step, is min(1, (e - 1) / W) of its value (ARES 2.0's adversarial_training.py
    # ramps the step over 5 epochs); 0: off
    eps_warmup_epochs: int = 0
    step_warmup_epochs: int = 0
    # AdvXL's weak-to-strong attack (Wang et al. 2024, "Revisiting Adversarial Training at Scale",
    # Sec 3: few PGD steps in the long first stage, more in the short last one): (first epoch,
    # iterations) pairs, flattened, as --size-schedule's; from that epoch on the training attack
    # (PGD or APGD) takes that many iterations, a PGD step raised to epsilon / iterations
    # (adv_model.pgd_step_size) at each. None: the attack's own iterations throughout.
    attack_iter_schedule: tuple[int, ...] | None = None
    # Catastrophic-overfitting guard (Wong et al. 2020 Sec 5.2; iat.train.overfit_guard): stop and
    # roll back to the previous epoch's weights when PGD accuracy on a held-out batch falls by
    # more than this since the last epoch while FGSM accuracy rises (Wong's code: 0.2); 0: off
    overfit_guard: float = 0.0

    # --- adversarial-training variants (ALP; "Fast is better than free"; free training) -------
    # Fraction of the images trained on that are adversarial (adv_model.mixed_batch); None: 0.5
    # with --lp-weight > 0 (ALP Sec 3: each image clean and attacked), else 1 (Feature Denoising
    # Sec 5: adversarial images only). Below 1 without pairing: M-PGD.
    adv_fraction: float | None = None
    lp_weight: float = 0.0  # adversarial logit pairing weight (ALP Sec 3); <= 0: no pairing
    moving_average_decay: float = -1.0  # EMA of the weights (ALP: 0.9999); <= 0 disables
    eval_ema: bool = False  # evaluate the averaged weights (training: in-training evaluation)
    finetune_checkpoint: str | None = None  # weights (.npz / .pt) a fresh run starts from
    finetune_exclude_scopes: tuple[str, ...] = ()  # not loaded: freshly initialised
    finetune_trainable_scopes: tuple[str, ...] | None = None  # None: all; else others frozen
    accumulate: int = 1  # micro-batches (of --batch each) per update: a virtual batch
    free_replays: int = 1  # free adversarial training: each batch replayed M times (Shafahi)

    # --- batch mixing (iat.recipes.mixing: on the device, timm's Mixup in "batch" mode) -----
    mixup_alpha: float = 0.0  # Mixup's Beta(a, a) (Zhang et al. 2018; ARES: 0.8); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(a, a) (Yun et al. 2019; ARES: 1.0); 0: off
    mix_prob: float = 1.0  # chance that a batch is mixed (timm's mixup_prob)
    mix_switch_prob: float = 0.5  # both on: chance of CutMix rather than Mixup (timm's default)

    # --- --eval's attack (iat.attacks.ATTACKS; README "Evaluation" lists them) ------------
    attack: str | None = None  # registry name; None: "pgd", or "clean" when attack_iter is 0
    norm: str = "inf"  # the threat model's norm: "inf", "2" or "1" (per attack: its registry entry)
    restarts: int = 1  # runs per example of pgd / apgd-* / fab-t, each on those not yet broken
    attack_loss: str = "ce"  # pgd / fgm objective: "ce" cross-entropy or "cw" logit margin
    eps_step: float = 1.0  # fgm-minimal: epsilon grows by this many pixel units per trial
    apgd_targets: int = 9  # apgd-t / fab-t / strong: target classes (the k likeliest wrong ones)
    queries: int = DEFAULT_QUERIES  # square: queries per example after the initial one

    eot_samples: int = 10  # evaluation attacks on a random defense average this many draws (EOT)
    # strong / autoattack: run iat.eval.masking's attack-failure checks on the first this many
    # images the evaluation attacks (a subsample, after the result; 0: off)
    masking_checks: int = 20

    # --- optimisation ("ImageNet in 1 Hour"; Feature Denoising Sec 5) ----------------------------
    epochs: int = 110  # total training epochs
    steps_per_epoch: int | None = None  # None: training images // total batch
    optimizer: str = (
        "sgd"  # "sgd" (Nesterov, the original) or "adamw" (iat.recipes.optim.OPTIMIZERS)
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays (torch's defaults)
    # "step" (the original: x0.1 after each --lr-decay-epochs), "cosine" (to --min-lr-factor x
    # the peak at the last epoch) or "cyclic" (piecewise linear through --lr-knots)
    lr_schedule: str = "step"
    base_lr: float = 0.1  # learning rate per 256 images (scaled linearly with the total batch)
    warmup_epochs: float = 5.0  # linear warm-up, per iteration (step and cosine schedules)
    # Where the warm-up starts, a fraction of the peak LR; None: at base_lr, and only when the
    # scaled LR is higher ("ImageNet in 1 Hour" Sec 2.2)
    warmup_factor: float | None = None
    lr_decay_epochs: tuple[int, ...] = (35, 70, 95)  # LR divided by 10 after each of these epochs
    min_lr_factor: float = 0.0  # cosine: the LR at the end of the run, a fraction of the peak
    # cyclic: (epoch, fraction of the peak) pairs, flattened, interpolated linearly; None: Wong et
    # al.'s triangle 0 -> 1 at 2/5 of the epochs -> 0
    lr_knots: tuple[float, ...] | None = None
    momentum: float = 0.9  # Nesterov momentum (SGD)
    # Not on norms, biases, layer scales, position embeddings or tokens (iat.recipes.optim.decays)
    weight_decay: float = 1e-4
    clip_grad: float | None = None  # clip the gradient's global L2 norm to this; None: off
    # Mixed-precision training (timm's --amp; iat.train.amp): the training forward and backward
    # under autocast; weights, optimizer state, loss and BatchNorm statistics fp32. Apart from
    # the attack's precision (use_fp16xla); evaluation stays fp32.
    amp: bool = False
    # --amp's compute type, "bfloat16" or "float16" (loss scaled by a GradScaler); None: the
    # device's (iat.train.builders.training_precision: bf16 where computed natively, else fp16
    # on CUDA; fp32 on a CPU without bf16 units)
    amp_dtype: str | None = None
    label_smoothing: float = 0.1  # on the adversarial cross-entropy
    starting_epoch: int = 1  # first epoch to run (1-based, as the original); resume sets it
    train_eval: str = "original"  # in-training evaluation: "original", "light" (clean+10) or "none"
    seed: int = 0  # seeds data order, augmentation, attacks and initialisation

    # --- output --------------------------------------------------------------------------------
    logdir: str | None = None  # None: train_log/PGD-{arch}{depth}-Batch{b}-{N}GPUs-iter...
    keep_checkpoints: int = 10  # most recent per-epoch checkpoints kept
    log_every: int = 20  # training steps between logged scalars
    split: str = "val"  # --eval: the split to attack ("val", "train", "." the folder itself)
    num_examples: int | None = None  # --eval: only the first N images of the split
    quantize: bool = False  # --eval: round adversarial images to uint8 before scoring them
    export_adversarial: str | None = None  # --eval: write them as PNGs here (implies quantize)
    sweep_epsilon: tuple[float, ...] | None = None  # --eval: evaluate at each of these epsilons
    sweep_iters: tuple[int, ...] | None = None  # --eval: ... and at each of these iterations
    watch: str | None = None  # --eval: evaluate each new checkpoint of this run directory
    watch_interval: float = 10.0  # --watch: seconds between looks at the run directory
    watch_timeout: float = 3600.0  # --watch: stop after this long without a new checkpoint
    export_activations: str | None = None  # layer whose activations --export-activations writes
    activations_file: str = "activations.npz"  # where: .npz (NumPy) or .mat (MATLAB)
    mlflow: str | None = None  # MLflow tracking URI or local folder; None: no MLflow run
    eval_output: str | None = None  # --eval: also write the metrics as JSON here
    # --eval: where finished batches are kept until the result is written, so that a killed
    # evaluation relaunched continues (iat.eval.state); None: <eval_output>.state; "none": off
    eval_state: str | None = None
    # --eval: a benchmark's protocol (iat.eval.benchmarks): its images, preprocessing, threat model
    # and result file; "robustbench" (RobustBench's ImageNet L-inf evaluation)
    benchmark: str | None = None
    # --benchmark: what its result file says of the model (RobustBench's model_info fields name,
    # link, authors, venue, additional_data); None: left empty (additional_data: null, unknown)
    model_name: str | None = None
    model_link: str | None = None
    model_authors: str | None = None
    model_venue: str | None = None
    additional_data: bool | None = None  # trained with data beyond ImageNet-1k's training set
    # --eval: robustness outside the threat model (iat.eval.ood): --data is an ImageNet-C folder
    # (corruption/severity/wnid), ImageNet-R / -A's (wnid), ImageNet-Sketch's (sketch/wnid, all
    # 1000) or ImageNet-V2's (class index 0-999), scored clean
    eval_set: str | None = None
    eval_directory: str | None = None  # --eval-directory: folder of images to classify
    prediction_file: str = "predictions.txt"  # --eval-directory: output, "filename,label" lines
    skip_unreadable: bool = False  # --eval-directory: skip unreadable files with a warning
    # --eval: the data's N classes are the model's first N (in sorted order); without it a class
    # count that differs from the model's outputs is an error (labels would name other classes)
    class_subset: bool = False
    print_top5: bool = False  # --eval-directory: print the top-5 classes of every image
    class_names: str | None = None  # file with one class name per line (LOC_synset_mapping.txt)
    collective_timeout: float = 300.0  # seconds a rank waits for the others in a collective
    threads: int | None = None  # torch threads per process; None: usable CPUs / local processes
    # MODEL_FIELDS the user set (flags or --config); for the others --eval and --eval-directory
    # use the architecture a .pt training checkpoint records. The command line sets it.
    explicit_model_fields: tuple[str, ...] = MODEL_FIELDS
    # --image-size set (flag, --config or --recipe); else --eval of a training checkpoint uses
    # the size its run trained at (the config.json beside it). The command line sets it.
    image_size_given: bool = True

    def __post_init__(self) -> None:
        validate(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: object, allowed: tuple) -> None:
    _check(value in allowed, f"{_flag(name)}: {value!r} is not one of {allowed}")


def _finite(cfg: Config) -> None:
    """Every number must be finite (nan or inf in a flag is always a mistake)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{_flag(field.name)}: must be a finite number, got {v}")


# (field, lowest allowed value, whether the bound itself is allowed)
_LOWER_BOUNDS = (
    ("batch", 1, True),
    ("attack_iter", 0, True),
    ("attack_epsilon", 0, True),
    ("attack_step_size", 0, False),
    ("epochs", 1, True),
    ("image_size", 16, True),
    ("workers", 0, True),
    ("keep_checkpoints", 1, True),
    ("log_every", 1, True),
    ("base_lr", 0, False),
    ("warmup_epochs", 0, True),
    ("weight_decay", 0, True),
    ("momentum", 0, True),
    ("label_smoothing", 0, True),
    ("data_timeout", 0, False),
    ("width", 1, True),
    ("num_classes", 2, True),
    ("steps_per_epoch", 1, True),
    ("threads", 1, True),
    ("eot_samples", 1, True),
    ("collective_timeout", 0, False),
    ("num_examples", 1, True),
    ("watch_interval", 0, False),
    ("watch_timeout", 0, False),
    ("accumulate", 1, True),
    ("free_replays", 1, True),
    ("restarts", 1, True),
    ("eps_step", 0, False),
    ("apgd_targets", 1, True),
    ("masking_checks", 0, True),
    ("queries", 1, True),
    ("seed", 0, True),  # numpy's SeedSequence takes non-negative integers only
    ("min_lr_factor", 0, True),
    ("mixup_alpha", 0, True),
    ("eps_warmup_epochs", 0, True),
    ("step_warmup_epochs", 0, True),
    ("overfit_guard", 0, True),
    ("cutmix_alpha", 0, True),
    ("clip_grad", 0, False),
)


def _bounds(cfg: Config) -> None:
    for name, low, inclusive in _LOWER_BOUNDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        ok = value >= low if inclusive else value > low
        _check(ok, f"{_flag(name)}: must be {'>=' if inclusive else '>'} {low}, got {value}")
    _check(cfg.label_smoothing < 1, "--label-smoothing: must be < 1")
    _check(cfg.seed < 2**64, f"--seed: must be < 2**64 (torch's seeds), got {cfg.seed}")
    for name in ("sweep_epsilon", "sweep_iters"):
        values = getattr(cfg, name) or ()
        _check(all(v >= 0 for v in values), f"{_flag(name)}: must be >= 0, got {list(values)}")
    _check(cfg.momentum < 1, "--momentum: must be < 1")
    _optimisation(cfg)
    _check(0.0 <= cfg.prob_start_from_clean <= 1.0, "--prob-start-from-clean: must be in [0, 1]")
    _check(
        all(e >= 0 for e in cfg.lr_decay_epochs),
        f"--lr-decay-epochs: must be >= 0, got {list(cfg.lr_decay_epochs)}",
    )
    _check(
        1 <= cfg.starting_epoch <= cfg.epochs + 1,
        f"--starting-epoch: must be in [1, {cfg.epochs + 1}], got {cfg.starting_epoch}",
    )


def _optimisation(cfg: Config) -> None:
    """The optimizer's and the LR schedule's values that bounds alone do not check."""
    _check(
        all(0 <= b < 1 for b in cfg.adam_betas) and len(cfg.adam_betas) == 2,
        f"--adam-betas: two values in [0, 1), got {list(cfg.adam_betas)}",
    )
    _check(cfg.min_lr_factor <= 1, "--min-lr-factor: must be <= 1")
    if cfg.warmup_factor is not None:
        _check(0 <= cfg.warmup_factor <= 1, "--warmup-factor: must be in [0, 1]")
    knots = cfg.lr_knots
    if knots is not None:
        epochs = knots[0::2]
        _check(
            len(knots) >= 4 and len(knots) % 2 == 0,
            f"--lr-knots: epoch/factor pairs, at least two, got {list(knots)}",
        )
        _check(
            all(a < b for a, b in zip(epochs, epochs[1:], strict=False)) and min(knots) >= 0,
            f"--lr-knots: epochs must increase and values be >= 0, got {list(knots)}",
        )
        _check(cfg.lr_schedule == "cyclic", "--lr-knots: only --lr-schedule cyclic takes them")
    _check(cfg.amp_dtype is None or cfg.amp, f"--amp-dtype {cfg.amp_dtype}: needs --amp")
    _check(
        cfg.fast_attack_dtype is None or cfg.use_fp16xla,
        f"--fast-attack-dtype {cfg.fast_attack_dtype}: needs --use-fp16xla",
    )


# None: the default (none, or the device's for amp_dtype)
_OPTIONAL_CHOICES = (
    "denoise_op",
    "attack",
    "benchmark",
    "eval_set",
    "amp_dtype",
    "fast_attack_dtype",
    "fsdp",
)


def _denoise(cfg: Config) -> None:
    """The denoising op and window suit the architecture. When --eval or --eval-directory take
    the architecture from a checkpoint, only the op and window are checked here; the rest when
    the model is built (builders.build_model)."""
    flag = _flag("denoise_window" if cfg.denoise_window != nets.DEFAULT_WINDOW else "denoise_op")
    try:
        if cfg.mode == "train" or "arch" in cfg.explicit_model_fields:
            nets.resolve_denoise(cfg.arch, cfg.denoise_op, cfg.denoise_window)
        elif cfg.denoise_op is not None:
            nets.check_denoise_op(cfg.denoise_op, cfg.denoise_window)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def _model_defense(cfg: Config) -> None:
    """--frontend-trainable needs a model-level defense; the defense takes its flags."""
    _check(
        not cfg.frontend_trainable or cfg.frontend is not None,
        "--frontend-trainable: needs --frontend FILE",
    )
    if cfg.frontend is not None:
        defense, _ = parse_frontend(cfg.frontend)
        check_options(defense, WrapOptions(cfg.frontend_trainable, cfg.frontend_gradient))


def _model_options(cfg: Config) -> None:
    """--drop-path and --grad-checkpointing suit the architecture (checked when the model is
    built where --eval takes the architecture from a checkpoint)."""
    known = cfg.mode == "train" or "arch" in cfg.explicit_model_fields
    for name in nets.MODEL_OPTIONS:
        try:
            nets.model_options(cfg.arch if known else None, **{name: getattr(cfg, name)})
        except ValueError as e:
            raise ValueError(f"{_flag(name)}: {e}") from None


def validate(cfg: Config) -> None:
    """Raise ValueError with one line naming the first bad field."""
    _choice("mode", cfg.mode, MODES)
    for name, allowed in choices().items():
        if getattr(cfg, name) is not None or name not in _OPTIONAL_CHOICES:
            _choice(name, getattr(cfg, name), allowed)
    if cfg.num_blocks is None:
        _choice("depth", cfg.depth, nets.depths_of(cfg.arch))
    else:
        groups = nets.num_groups_of(cfg.arch)
        _check(
            len(cfg.num_blocks) == groups and all(n >= 1 for n in cfg.num_blocks),
            f"--num-blocks: {cfg.arch} takes {groups} positive counts, got {list(cfg.num_blocks)}",
        )
    _model_options(cfg)
    _check(
        set(cfg.explicit_model_fields) <= set(MODEL_FIELDS),
        f"explicit_model_fields: {list(cfg.explicit_model_fields)} not all in {MODEL_FIELDS}",
    )
    _finite(cfg)
    _bounds(cfg)
    _adversarial_training(cfg)
    _mixing(cfg)
    _schedules(cfg)
    _sharded(cfg)
    _denoise(cfg)
    _model_defense(cfg)
    try:
        parse_defense(cfg.defense)
    except ValueError as e:
        raise ValueError(f"--defense: {e}") from None
    _check(
        cfg.mode != "train" or cfg.defense_apply == "predict" or fit_defense(cfg) is not None,
        f"--defense-apply {cfg.defense_apply}: needs a --defense to apply in training",
    )
    _check(
        cfg.mode == "train"
        or cfg.defense_apply != "fit"
        or "defense_apply" not in cfg.explicit_model_fields,
        "--defense-apply fit: the defense applies only in training, this run would evaluate "
        "without it (predict or both apply it here)",
    )
    if cfg.data_server is not None:
        _check(
            cfg.data_server.startswith(DATA_SERVER_TRANSPORTS),
            f"--data-server: {cfg.data_server!r} is not a ZeroMQ address "
            f"({' or '.join(t + '...' for t in DATA_SERVER_TRANSPORTS)})",
        )
    _attack_options(cfg)
    for name in BENCHMARK_INFO_FIELDS:
        _check(
            getattr(cfg, name) is None or cfg.benchmark is not None,
            f"{_flag(name)}: only --benchmark takes it (its result file's model_info)",
        )
    needs_data = cfg.mode in ("train", "eval", "export_activations") and not cfg.fake
    _check(not needs_data or cfg.data is not None, "--data: required (or --fake)")
    _check(
        not cfg.fake or cfg.data is None,
        "--fake: constant batches replace --data (nothing of it would be read); give one of them",
    )
    _check(
        not cfg.fake or cfg.mode == "train",
        f"--fake: constant batches are for training; --{cfg.mode.replace('_', '-')} needs --data",
    )
    if cfg.mode == "eval_directory":
        _check(cfg.eval_directory is not None, "--eval-directory: a folder is required")
        _check(cfg.load is not None, "--load: weights are required with --eval-directory")
    if cfg.mode == "export_activations":
        _check(cfg.load is not None, "--load: weights are required with --export-activations")
        _check(
            cfg.activations_file.endswith((".npz", ".mat")),
            f"--activations-file: {cfg.activations_file} must end in .npz or .mat",
        )
    if cfg.mode == "eval":
        _check(
            cfg.load is not None or cfg.watch is not None,
            "--load: weights are required with --eval (or --watch RUN_DIR)",
        )


def attack_target(cfg: Config) -> str | None:
    """--attack-target as attacks take it: None for "none" (untargeted)."""
    return None if cfg.attack_target == NO_TARGET else cfg.attack_target


def training_attack_spec(cfg: Config) -> AttackSpec:
    """The training attack: --adv-method's spec, else the original's --attack-* flags."""
    if cfg.adv_method is not None:
        return parse_attack_spec(cfg.adv_method)
    return flags_attack_spec(
        cfg.attack_iter, cfg.attack_epsilon, cfg.attack_step_size, attack_target(cfg)
    )


def evaluation_point(cfg: Config, attack_iter: int) -> Config:
    """The configuration an in-training evaluation by PGD-`attack_iter` (clean for 0) is recorded
    under: `cfg` with that attack, and without what only shapes the training attack (its
    warm-ups, --attack-iter-schedule, free training's replays), which the --attack-* flags would
    otherwise tie to the evaluation's attack (a clean one has nothing to warm up or replay)."""
    return dataclasses.replace(
        cfg,
        attack_iter=attack_iter,
        eps_warmup_epochs=0,
        step_warmup_epochs=0,
        attack_iter_schedule=None,
        free_replays=1,
    )


def adv_fraction(cfg: Config) -> float:
    """--adv-fraction, or its default: 0.5 with logit pairing (ALP Sec 3), else 1."""
    if cfg.adv_fraction is not None:
        return cfg.adv_fraction
    return 0.5 if cfg.lp_weight > 0 else 1.0


def fit_defense(cfg: Config) -> str | None:
    """The defense training passes its images through (--defense-apply fit or both)."""
    return applied_defense(cfg.defense, cfg.defense_apply, "fit")


def predict_defense(cfg: Config) -> str | None:
    """The defense evaluation and prediction pass images through (--defense-apply predict or
    both)."""
    return applied_defense(cfg.defense, cfg.defense_apply, "predict")


def ema_enabled(cfg: Config) -> bool:
    # ALP's train.py averages the weights only for a positive --moving_average_decay.
    return cfg.moving_average_decay > 0


def _scopes(name: str, scopes: tuple[str, ...] | None) -> None:
    _check(
        scopes is None or all(scopes),
        f"{_flag(name)}: empty scope in {','.join(scopes or ())!r}",
    )


def _adversarial_training(cfg: Config) -> None:
    """The training variants' flags: each bad value or combination, one line."""
    spec = training_attack_spec(cfg)
    if cfg.adv_fraction is not None:
        _check(
            0 < cfg.adv_fraction <= 1, f"--adv-fraction: must be in (0, 1], got {cfg.adv_fraction}"
        )
    _check(
        cfg.lp_weight <= 0 or adv_fraction(cfg) < 1,
        "--lp-weight: logit pairing needs clean images in the batch (--adv-fraction < 1)",
    )
    _check(
        cfg.moving_average_decay < 1,
        f"--moving-average-decay: must be < 1 (<= 0 disables), got {cfg.moving_average_decay}",
    )
    _check(
        not (cfg.eval_ema and cfg.mode == "train" and not ema_enabled(cfg)),
        "--eval-ema: training keeps no averaged weights without --moving-average-decay > 0",
    )
    _scopes("finetune_exclude_scopes", cfg.finetune_exclude_scopes)
    _scopes("finetune_trainable_scopes", cfg.finetune_trainable_scopes)
    scoped = cfg.finetune_exclude_scopes or cfg.finetune_trainable_scopes is not None
    _check(
        not scoped or cfg.finetune_checkpoint is not None,
        "--finetune-exclude-scopes/--finetune-trainable-scopes: need --finetune-checkpoint",
    )
    _check(
        cfg.finetune_checkpoint is None or cfg.load is None,
        "--finetune-checkpoint: starts a run from weights; --load cannot be given with it",
    )
    if cfg.free_replays > 1:
        _check(
            attack_info(spec.name).perturbs, "--free-replays: needs an attack epsilon (not clean)"
        )
        _check(
            adv_fraction(cfg) == 1 and cfg.accumulate == 1,
            "--free-replays: cannot be combined with --adv-fraction < 1, --lp-weight or "
            "--accumulate",
        )


def _sharded(cfg: Config) -> None:
    """--fsdp's combinations: what a sharded model cannot do here, refused in one line."""
    if cfg.fsdp is None:
        _check(cfg.fsdp_attack_gather == "once", "--fsdp-attack-gather: needs --fsdp")
        return
    refused = (
        (cfg.sync_bn, "--sync-bn (rank 0's BatchNorm statistics are broadcast, as DDP's)"),
        (cfg.free_replays > 1, "--free-replays (free training's perturbation is not sharded)"),
        (cfg.overfit_guard > 0, "--overfit-guard (its roll-back copies whole weights)"),
        (cfg.use_fp16xla, "--use-fp16xla (its compiled attack is untested on a sharded model)"),
        (cfg.amp_dtype == "float16", "--amp-dtype float16 (its loss scaler takes no sharded "
         "gradients; use bfloat16)"),
    )  # fmt: skip
    for given, flag in refused:
        _check(not given, f"--fsdp: not with {flag}")


def mixing_enabled(cfg: Config) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def _mixing(cfg: Config) -> None:
    """Mixup / CutMix: probabilities, and a training attack that has a soft-target form."""
    for name in ("mix_prob", "mix_switch_prob"):
        _check(0 <= getattr(cfg, name) <= 1, f"{_flag(name)}: must be in [0, 1]")
    if not mixing_enabled(cfg):
        return
    spec = training_attack_spec(cfg)
    form = attack_info(spec.name).training
    soft = [name for name, info in ATTACKS.items() if info.training and info.training.soft_target]
    _check(
        form is not None and form.soft_target is not None and spec.settings.target is None,
        "--mixup-alpha/--cutmix-alpha: the attack maximises the soft target's loss, so it must "
        f"be untargeted and one with a soft-target form ({', '.join(soft)}; --attack-target "
        f"none for the --attack-* flags), not {spec.name}",
    )
    _check(cfg.free_replays == 1, "--mixup-alpha/--cutmix-alpha: not with --free-replays")


def _schedules(cfg: Config) -> None:
    """--size-schedule's and --attack-iter-schedule's pairs, and the attacks the iteration
    schedule and the warm-ups change."""
    sizes = cfg.size_schedule
    if sizes is not None:
        _check(
            _epoch_pairs(sizes, lambda side: 16 <= side <= cfg.image_size),
            "--size-schedule: (first epoch, side) pairs from epoch 1, epochs increasing, sides "
            f"in [16, --image-size {cfg.image_size}], got {list(sizes)}"
            + _recipes_words(
                cfg, "size_schedule", f"give --size-schedule 1 {cfg.image_size} for one size"
            ),
        )
    iters = cfg.attack_iter_schedule
    if iters is not None:
        _check(
            _epoch_pairs(iters, lambda n: n >= 1),
            "--attack-iter-schedule: (first epoch, iterations) pairs from epoch 1, epochs "
            f"increasing, iterations >= 1, got {list(iters)}",
        )
        spec = training_attack_spec(cfg)
        iterated = [f for info in ATTACKS.values() if info.iterations for f in _forms(info)]
        _check(
            attack_info(spec.name).iterations and cfg.free_replays == 1,
            "--attack-iter-schedule: sets the iterations of a training attack that has them "
            f"(--attack-iter >= 1, {', '.join(iterated)}), not {spec.name}"
            f"{' (--attack-iter 0)' * (cfg.adv_method is None)} or --free-replays"
            + _recipes_words(cfg, "attack_iter_schedule", "give another attack or recipe"),
        )
    _check(cfg.overfit_guard < 1, "--overfit-guard: an accuracy drop, must be < 1")
    _check(
        not cfg.overfit_guard or training_attack_spec(cfg).settings.epsilon > 0,
        "--overfit-guard: checks robustness at the training attack's epsilon, which is 0",
    )
    if cfg.eps_warmup_epochs or cfg.step_warmup_epochs:
        spec = training_attack_spec(cfg)
        form = attack_info(spec.name).training
        warmups = () if form is None or cfg.free_replays > 1 else form.warmups
        _check(
            "epsilon" in warmups,
            "--eps-warmup-epochs/--step-warmup-epochs: need a training attack that warms up "
            f"({', '.join(_warming('epsilon'))}; not {spec.name} or --free-replays)",
        )
        _check(
            "step" in warmups or not cfg.step_warmup_epochs,
            f"--step-warmup-epochs: {spec.name}'s step follows its epsilon (use "
            f"--eps-warmup-epochs; a step warms up in {', '.join(_warming('step'))})",
        )


def _epoch_pairs(pairs: tuple[int, ...], valid: Callable[[int], bool]) -> bool:
    """Whether `pairs` are (first epoch, value) pairs from epoch 1, epochs increasing, each
    value `valid`."""
    firsts = pairs[0::2]
    return (
        len(pairs) >= 2
        and len(pairs) % 2 == 0
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pairs)
        and firsts[0] == 1
        and all(a < b for a, b in zip(firsts, firsts[1:], strict=False))
        and all(valid(v) for v in pairs[1::2])
    )


def _recipes_words(cfg: Config, name: str, remedy: str) -> str:
    """Where field `name` holds --recipe's value (or its value fitted to --epochs): words naming
    the recipe and the `remedy`, for an error; else nothing."""
    recipe = RECIPES[cfg.recipe].settings.get(name)
    fitted = fit_to_epochs(cfg.recipe, cfg.epochs).get(name)
    if recipe is None or getattr(cfg, name) not in (recipe, fitted):
        return ""
    return f" (from --recipe {cfg.recipe}: {remedy}, or your own pairs)"


def _forms(info: AttackInfo) -> tuple[str, ...]:
    return info.training.forms if info.training else ()


def epoch_value(pairs: tuple[int, ...] | None, epoch: int) -> int | None:
    """The value (first epoch, value) `pairs` (--size-schedule, --attack-iter-schedule) give
    epoch `epoch` (1-based): that of the last pair begun by then; None without pairs."""
    if pairs is None:
        return None
    firsts, values = pairs[0::2], pairs[1::2]
    return values[max(k for k, first in enumerate(firsts) if first <= epoch)]


def stage_attack_spec(cfg: Config, epoch: int) -> AttackSpec:
    """The training attack of epoch `epoch` at full strength (warm-ups aside): the spec with
    --attack-iter-schedule's iterations, a PGD step raised to epsilon / iterations at them
    (``pgd_step_size``, the original's rule, for the soft-target PGD too); the spec itself
    without the schedule."""
    spec = training_attack_spec(cfg)
    iters = epoch_value(cfg.attack_iter_schedule, epoch)
    if iters is None:
        return spec
    settings = spec.settings
    step = settings.step_size
    if attack_info(spec.name).step:
        step = pgd_step_size(settings.epsilon, iters, step)
    staged = dataclasses.replace(settings, num_iter=iters, step_size=step)
    return dataclasses.replace(spec, settings=staged)


def _warming(warmup: str) -> list[str]:
    """The training attacks that a warm-up ("epsilon" or "step") scales."""
    return [n for n, info in ATTACKS.items() if info.training and warmup in info.training.warmups]


def depth_applies(cfg: Config) -> bool:
    """Whether ``-d`` chooses anything: not under --num-blocks, nor for an architecture whose
    name implies its one depth (convnext_tiny, vit_small_patch16_224)."""
    known = cfg.arch in nets.ARCHITECTURES
    return cfg.num_blocks is None and (not known or len(nets.depths_of(cfg.arch)) > 1)


def architecture_name(cfg: Config) -> str:
    """The architecture as records name it: ResNet-50, ResNetBasic-18, convnext_tiny."""
    return f"{cfg.arch}-{cfg.depth}" if depth_applies(cfg) else cfg.arch


def eval_attack(cfg: Config) -> str:
    """The registry name of --eval's attack: --attack, else the original's PGD (clean for 0
    iterations)."""
    return cfg.attack if cfg.attack is not None else default_attack(cfg.attack_iter)


_EVAL_ONLY_DEFAULTS = (
    ("attack", None),
    ("benchmark", None),
    ("eval_set", None),
    ("norm", "inf"),
    ("restarts", 1),
    ("attack_loss", "ce"),
    ("queries", DEFAULT_QUERIES),
)


def _attack_options(cfg: Config) -> None:
    """--attack and its options: only --eval attacks with them (training and its evaluations
    use the original's L-inf PGD), and only where the attack takes them."""
    if cfg.mode != "eval":
        for name, default in _EVAL_ONLY_DEFAULTS:
            _check(getattr(cfg, name) == default, f"{_flag(name)}: only --eval takes it")
        return
    attack = eval_attack(cfg)
    info = attack_info(attack)
    _check(
        cfg.norm in info.norms,
        f"--norm {cfg.norm}: --attack {attack} supports {', '.join(info.norms)}",
    )
    _check(  # the benchmark's own clean evaluation runs as attack "clean"
        cfg.benchmark is None or attack in ("autoattack", "clean"),
        f"--benchmark {cfg.benchmark}: its result is AutoAttack's, not --attack {attack}'s",
    )
    _check(
        not info.iterations or cfg.attack_iter >= 1,
        f"--attack-iter: --attack {attack} needs >= 1 iterations, got {cfg.attack_iter}",
    )
    taken = (
        ("loss", "attack_loss", "ce"),
        ("restarts", "restarts", 1),
        ("queries", "queries", DEFAULT_QUERIES),
    )
    for trait, field, default in taken:
        value = getattr(cfg, field)
        _check(
            value == default or getattr(info, trait),
            f"{_flag(field)} {value}: only --attack {', '.join(takes(trait))} take it",
        )


def default_logdir(cfg: Config, world_size: int) -> str:
    """The original's run-directory name: PGD-ResNet50-Batch32-8GPUs-iter30-epsilon16.0-step1.0"""
    model = f"{cfg.arch}{cfg.depth}"
    if cfg.num_blocks is not None:
        model = f"{cfg.arch}-blocks{''.join(str(n) for n in cfg.num_blocks)}"
    if cfg.denoise_op is not None:
        model += f"-{cfg.denoise_op}"
    if cfg.adv_method is not None:
        return os.path.join(
            "train_log", f"PGD-{model}-Batch{cfg.batch}-{world_size}GPUs-{cfg.adv_method}"
        )
    iters = cfg.attack_iter_schedule  # staged: each stage's, PGD-1 then PGD-3 as "iter1-3"
    iterations = cfg.attack_iter if iters is None else "-".join(map(str, iters[1::2]))
    return os.path.join(
        "train_log",
        f"PGD-{model}-Batch{cfg.batch}-{world_size}GPUs-iter{iterations}"
        f"-epsilon{float(cfg.attack_epsilon)}-step{float(cfg.attack_step_size)}",
    )


def config_record(cfg: Config, run: dict) -> dict:
    """What ``config.json`` holds: the configuration, and the run's facts beside it."""
    return {"config": dataclasses.asdict(cfg), "run": run}


_TUPLE_FIELDS = (
    "sweep_epsilon",
    "sweep_iters",
    "num_blocks",
    "lr_decay_epochs",
    "adam_betas",
    "lr_knots",
    "size_schedule",
    "attack_iter_schedule",
    "explicit_model_fields",
    "finetune_exclude_scopes",
    "finetune_trainable_scopes",
)


def read_config_file(path: str | Path) -> dict:
    """The configuration fields stored in a run's ``config.json`` (to replay the run)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config: cannot read {path}: {e}") from None
    values = record.get("config") if isinstance(record, dict) else None
    if not isinstance(values, dict):
        raise ValueError(f'--config: {path} has no "config" object')
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config: {path} has unknown fields {unknown}")
    for name in _TUPLE_FIELDS:
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return values
