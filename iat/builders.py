"""The only place a configuration becomes objects: model (weights read once), attack settings and
attacker; the training half (optimizer, schedule, training attack, DDP) is ``iat.train.builders``.

Every choice is looked up in a registry (``nets.ARCHITECTURES``, ``iat.attacks.ATTACKS``); weights
are read once by the caller (``nets.read_weights`` or ``run_state.plan_start``) and loaded here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

import nets
from iat.attacks import Attacker, AttackSettings, create_attacker
from iat.attacks.core import has_native_low_precision
from iat.attacks.registry import default_attack
from iat.attacks.spec import AttackSpec
from iat.config import MODEL_FIELDS, NO_TARGET, Config, training_attack_spec
from iat.defenses.sparse_frontend import (
    FrontendClassifier,
    FrontendSpec,
    empty_frontend,
    frontend_shapes,
    load_frontend,
)
from iat.defenses.transforms import DEFENSE_PHASES, parse_defense
from iat.runs.state import averaged_weights

IMAGENET_CLASSES = 1000


# --- model -----------------------------------------------------------------------------------
def build_model(
    cfg: Config, num_classes: int, device: torch.device, weights: nets.Weights | None = None
) -> torch.nn.Module:
    """The configured architecture on `device`, with `weights` loaded strictly if given;
    behind a sparse-coding frontend when `weights` carry one (their record's, filled by their
    tensors) or else when --frontend names a frontend file. Weights without a frontend (the
    original .npz files included) are loaded into the classifier alone."""
    classifier = build_classifier(cfg, num_classes)
    recorded = recorded_frontend(weights)
    model = classifier
    if recorded is not None or cfg.frontend is not None:
        frontend = empty_frontend(recorded) if recorded else load_frontend(cfg.frontend)
        model = FrontendClassifier(
            frontend, classifier, cfg.frontend_trainable, cfg.frontend_gradient
        )
    if weights is not None:
        nets.load_weights(model if recorded is not None else classifier, weights)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # matches sources.to_model_input
    return model.to(device)


def recorded_frontend(weights: nets.Weights | None) -> FrontendSpec | None:
    """The sparse-coding frontend a training checkpoint carries (its record), if any; checked
    against its tensors before anything of the record's size is built."""
    record = None if weights is None else weights.architecture
    if record is None or record.get("frontend") is None:
        return None
    spec = FrontendSpec.from_record(record["frontend"], weights.source)
    for key, shape in frontend_shapes(spec).items():
        tensor = weights.tensors.get(key)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise nets.CheckpointError(
                f"{weights.source}: its frontend record ({spec.describe()}) does not match "
                f"its tensor {key}"
            )
    return spec


def build_classifier(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The registered classifier of the configuration (``nets.ARCHITECTURES``)."""
    depth = None if cfg.num_blocks is not None else cfg.depth
    return nets.build_model(
        cfg.arch,
        depth=depth,
        num_blocks=cfg.num_blocks,
        num_classes=num_classes,
        width=cfg.width,
        denoise_op=cfg.denoise_op,
        denoise_window=cfg.denoise_window,
        drop_path=cfg.drop_path,
        grad_checkpointing=cfg.grad_checkpointing,
    )


def resolve_num_classes(cfg: Config, classes: list[str] | None) -> int:
    """--num-classes if given, else the number of classes in the data, else ImageNet's 1000."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    return len(classes) if classes else IMAGENET_CLASSES


def architecture_record(
    cfg: Config, num_classes: int, frontend: FrontendSpec | None = None
) -> dict[str, object]:
    """The architecture as a training checkpoint records it (``nets.ARCHITECTURE_KEY``): plain
    values; ``depth`` is None when ``num_blocks`` gives the size; ``denoise_op`` is the op the
    denoising blocks use (None: no denoising blocks). Records written before denoising ops were
    selectable lack the two ``denoise_`` keys: they mean the architecture's original op.
    ``defense`` is the input-transform defense and ``defense_apply``
    when it applies (iat.defenses.transforms;
    records without it mean "predict": the model is evaluated behind it); ``frontend`` the
    sparse-coding frontend's spec (its tensors are in the state_dict under ``frontend.``), None
    without one."""
    denoise = nets.resolve_denoise(cfg.arch, cfg.denoise_op, cfg.denoise_window)
    return model_record(
        cfg.arch,
        depth=cfg.depth,
        num_blocks=cfg.num_blocks,
        width=cfg.width,
        num_classes=num_classes,
        denoise_op=None if denoise is None else denoise.op,
        denoise_window=cfg.denoise_window,
        defense=cfg.defense,
        defense_apply=cfg.defense_apply,
        frontend=frontend,
    )


def model_record(
    arch: str,
    *,
    depth: int | None,
    num_blocks: Sequence[int] | None,
    width: int,
    num_classes: int,
    denoise_op: str | None = None,
    denoise_window: int = nets.DEFAULT_WINDOW,
    defense: str | None = None,
    defense_apply: str = "predict",
    frontend: FrontendSpec | None = None,
) -> dict[str, object]:
    """``architecture_record`` from explicit values (converted weights have no Config);
    ``num_blocks`` given wins over ``depth``, as in ``nets.build_model``."""
    return {
        "arch": arch,
        "depth": None if num_blocks is not None else depth,
        "num_blocks": None if num_blocks is None else list(num_blocks),
        "width": width,
        "num_classes": num_classes,
        "denoise_op": denoise_op,
        "denoise_window": denoise_window,
        "defense": defense,
        "defense_apply": defense_apply,
        "frontend": None if frontend is None else frontend.record(),
    }


def load_for_inference(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The --load'ed model (read once) and the configuration it was built from: the
    architecture a training checkpoint records fills in the model fields the user did not set,
    and ``num_classes`` is --num-classes or the checkpoint's."""
    weights = nets.read_weights(cfg.load)
    cfg = with_recorded_architecture(cfg, weights)
    if recorded_frontend(weights) is not None:  # the checkpoint's frontend, over --frontend
        cfg = dataclasses.replace(cfg, frontend=weights.source)
    if cfg.eval_ema:
        weights = averaged_weights(weights)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or weights.num_classes)
    return build_model(cfg, cfg.num_classes, device, weights), cfg


def with_recorded_architecture(cfg: Config, weights: nets.Weights) -> Config:
    """``cfg`` with the architecture `weights` records where ``cfg.explicit_model_fields`` do
    not set it; a set field that disagrees with the record is one error naming both. The
    defense is a wrapper, not weights: --defense given replaces the recorded one and applies as
    --defense-apply says (default: in evaluation), whatever the record's phase."""
    record = weights.architecture
    if record is None:
        return cfg
    recorded = _recorded_fields(weights.source, record)
    explicit = set(cfg.explicit_model_fields)
    size_given = bool(explicit & {"depth", "num_blocks"})
    disagree = []
    if "arch" in explicit and cfg.arch != recorded["arch"]:
        disagree.append(f"--arch {cfg.arch}")
    arch = cfg.arch if "arch" in explicit else recorded["arch"]
    if size_given and _blocks(arch, cfg.depth, cfg.num_blocks) != _blocks(
        recorded["arch"], recorded["depth"], recorded["num_blocks"]
    ):
        size = cfg.num_blocks
        disagree.append(f"-d {cfg.depth}" if size is None else f"--num-blocks {_words(size)}")
    if "width" in explicit and cfg.width != recorded["width"]:
        disagree.append(f"--width {cfg.width}")
    disagree += _denoise_disagreements(cfg, recorded, explicit)
    if disagree:
        raise ValueError(
            f"{', '.join(disagree)}: {weights.source} was trained as "
            f"{nets.describe_architecture(record)}; leave the flags out to use its architecture"
        )
    unset = [name for name in MODEL_FIELDS if name not in explicit]
    if "defense" in explicit:
        unset = [name for name in unset if name != "defense_apply"]
    if size_given:
        unset = [name for name in unset if name not in ("depth", "num_blocks")]
    return dataclasses.replace(cfg, **{name: recorded[name] for name in unset})


def _denoise_disagreements(
    cfg: Config, recorded: Mapping[str, object], explicit: set[str]
) -> list[str]:
    """The --denoise-op / --denoise-window flags given that differ from what was recorded (an
    op left out, or None, is the architecture's original one)."""
    arch = cfg.arch if "arch" in explicit else recorded["arch"]
    original = nets.DEFAULT_DENOISE_OPS.get(arch)
    disagree = []
    if "denoise_op" in explicit and (cfg.denoise_op or original) != (
        recorded["denoise_op"] or original
    ):
        disagree.append(f"--denoise-op {cfg.denoise_op}")
    if "denoise_window" in explicit and cfg.denoise_window != recorded["denoise_window"]:
        disagree.append(f"--denoise-window {cfg.denoise_window}")
    return disagree


def _recorded_fields(source: str, record: Mapping[str, object]) -> dict[str, object]:
    """MODEL_FIELDS of an architecture record, as Config values; CheckpointError if invalid."""
    blocks, depth = record.get("num_blocks"), record.get("depth")
    known = record.get("arch") in nets.ARCHITECTURES
    valid_size = (
        known
        and isinstance(blocks, list)
        and len(blocks) == nets.num_groups_of(record["arch"])
        and all(_positive(n) for n in blocks)
    ) or (
        blocks is None
        and record.get("arch") in nets.ARCHITECTURES
        and depth in nets.depths_of(record["arch"])
    )
    if record.get("frontend") is not None:
        FrontendSpec.from_record(record["frontend"], source)  # CheckpointError if invalid
    op = record.get("denoise_op")
    window = record.get("denoise_window", nets.DEFAULT_WINDOW)
    defense = record.get("defense")
    defense_apply = record.get("defense_apply", "predict")
    if not (
        _valid_defense(defense)
        and defense_apply in DEFENSE_PHASES
        and record.get("arch") in nets.available_architectures()
        and _positive(record.get("width"))
        and valid_size
        and (op is None or op in nets.DENOISE_OPS)
        and _positive(window)
    ):
        raise nets.CheckpointError(
            f"{source}: field {nets.ARCHITECTURE_KEY!r} is not a valid architecture record"
        )
    return {
        "arch": record["arch"],
        "depth": depth,
        "num_blocks": None if blocks is None else tuple(blocks),
        "width": record["width"],
        "denoise_op": op,
        "denoise_window": window,
        "defense": defense,
        "defense_apply": defense_apply,
    }


def _valid_defense(spec: object) -> bool:
    if spec is None:
        return True
    if not isinstance(spec, str):
        return False
    try:
        parse_defense(spec)
    except ValueError:
        return False
    return True


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _blocks(arch: str, depth: int | None, num_blocks: tuple[int, ...] | None) -> tuple[int, ...]:
    """Blocks per group, as ``nets.build_model`` resolves them (num_blocks over depth)."""
    return tuple(num_blocks) if num_blocks is not None else nets.num_blocks_of(arch, depth)


def _words(values: tuple[int, ...]) -> str:
    return " ".join(map(str, values))


# --- attacker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackPrecision:
    """How the training attack computes (the original's --use-fp16xla, adapted to the device)."""

    autocast: bool
    compiled: bool
    description: str  # said in the run's first lines and in config.json


def attack_precision(use_fp16xla: bool, device: torch.device) -> AttackPrecision:
    """What --use-fp16xla can gain on `device`, as measured (bench/RESULTS.md, sections 1 and
    1b, "what `--use-fp16xla` picks"):

    * CUDA: fp16 autocast, compiled with CUDA graphs (the original's fp16 + XLA);
    * a CPU with AMX: bf16 autocast, compiled (faster than eager fp32);
    * a CPU with AVX512-BF16 but no AMX: bf16 autocast, eager (compiling made the step slower);
    * a CPU without bf16 units: fp32 eager (bf16 autocast is emulated, many times slower;
      compiled fp32 no faster than eager).
    """
    if not use_fp16xla:
        return AttackPrecision(False, False, "fp32, eager")
    if device.type == "cuda":
        return AttackPrecision(True, True, "fp16 (loss x128) autocast, compiled (--use-fp16xla)")
    if not has_native_low_precision(device):
        return AttackPrecision(
            False, False, "fp32, eager: this CPU has no bf16 units, --use-fp16xla would be slower"
        )
    if torch.cpu.get_capabilities().get("amx_bf16"):
        return AttackPrecision(True, True, "bf16 autocast, compiled (--use-fp16xla, AMX)")
    return AttackPrecision(True, False, "bf16 autocast, eager (--use-fp16xla; no AMX)")


def attack_settings(
    cfg: Config,
    *,
    attack_iter: int,
    num_classes: int,
    precision: AttackPrecision | None = None,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
    spec: AttackSpec | None = None,
) -> AttackSettings:
    """The one place an attack's settings are built. With a `precision`, the training attack:
    `spec`, else --adv-method's spec (or the --attack-* flags), starting from the clean image with
    --prob-start-from-clean, computed with `precision`. Without one, an evaluation attack of
    `attack_iter` iterations with every --eval option, from a random start, in fp32.
    `generator` is the default random source (None: torch's); `eot_samples` draws of a random
    defense are averaged per gradient."""
    training = precision is not None
    evaluation = AttackSettings(
        num_iter=attack_iter,
        epsilon=cfg.attack_epsilon,
        step_size=cfg.attack_step_size,
        target=None if cfg.attack_target == NO_TARGET else cfg.attack_target,
        num_classes=num_classes,
        generator=generator,
        norm=cfg.norm,
        restarts=cfg.restarts,
        loss=cfg.attack_loss,
        eps_step=cfg.eps_step,
        top_k=cfg.apgd_targets,
        eot_samples=eot_samples,
        queries=cfg.queries,
    )
    if not training:
        return evaluation
    spec = (spec or training_attack_spec(cfg)).settings
    return dataclasses.replace(
        evaluation,
        num_iter=spec.num_iter,
        epsilon=spec.epsilon,
        step_size=spec.step_size,
        target=spec.target,
        prob_start_from_clean=cfg.prob_start_from_clean,
        autocast=precision.autocast,
        compiled=precision.compiled,
    )


def build_attacker(
    cfg: Config,
    *,
    attack_iter: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    name: str | None = None,
    eot_samples: int = 1,
) -> Attacker:
    """An evaluation attacker from ``iat.attacks.ATTACKS``: `name` (--eval's --attack), else the
    original's PGD-`attack_iter` (clean for 0), with ``attack_settings``."""
    settings = attack_settings(
        cfg,
        attack_iter=attack_iter,
        num_classes=num_classes,
        generator=generator,
        eot_samples=eot_samples,
    )
    return create_attacker(name or default_attack(attack_iter), settings)
