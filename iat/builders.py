"""The only place a configuration becomes objects: model (weights read once), attack settings and
attacker; the training half (optimizer, schedule, training attack, DDP) is ``iat.train.builders``.

Every choice is looked up in a registry (``nets.ARCHITECTURES``, ``iat.attacks.ATTACKS``); weights
are read once by the caller (``nets.read_weights`` or ``run_state.plan_start``) and loaded here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import nets
from iat.attacks import Attacker, AttackSettings, create_attacker
from iat.attacks.core import has_native_low_precision
from iat.attacks.registry import default_attack
from iat.attacks.spec import AttackSpec
from iat.config import MODEL_FIELDS, Config, attack_target, read_config_file
from iat.defenses.registry import (
    WrapOptions,
    check_record,
    frontend_flag,
    parse_frontend,
    recorded_defense,
)
from iat.defenses.transforms import DEFENSE_PHASES, parse_defense
from iat.runs.files import CONFIG_FILE
from iat.runs.state import averaged_weights
from iat.runtime import distributed

IMAGENET_CLASSES = 1000


# --- model -----------------------------------------------------------------------------------
def build_model(
    cfg: Config, num_classes: int, device: torch.device, weights: nets.Weights | None = None
) -> torch.nn.Module:
    """The configured architecture on `device`, with `weights` loaded strictly if given;
    behind a model-level defense (``iat.defenses.registry``) when `weights` carry one (their
    record's, filled by their tensors) or else when --frontend names one. Weights without one
    (the original .npz files included) are loaded into the classifier alone. With `weights`,
    the model is first built on the meta device and checked against them (``nets.check_fits``):
    a size the file's tensors do not have is refused before anything is allocated."""
    recorded = recorded_defense(weights)
    options = WrapOptions(cfg.frontend_trainable, cfg.frontend_gradient)

    def filled() -> torch.nn.Module:  # what `weights` fill: the classifier, or its defense's
        classifier = build_classifier(cfg, num_classes)
        return (
            classifier if recorded is None else recorded[0].empty(recorded[1], classifier, options)
        )

    if weights is not None:
        nets.check_fits(filled, weights)
    model = loaded = filled()
    if recorded is None and cfg.frontend is not None:
        defense, argument = parse_frontend(cfg.frontend)
        model = defense.build(argument, loaded, options)
    if weights is not None:
        nets.load_weights(loaded, weights)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # matches sources.to_model_input
    return model.to(device)


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
    cfg: Config, num_classes: int, model_defense: Mapping[str, object] | None = None
) -> dict[str, object]:
    """The architecture as a training checkpoint records it (``nets.ArchitectureRecord``'s
    plain values): ``denoise_op`` the op the denoising blocks use (None: no denoising blocks);
    ``model_defense`` the field of a model-level defense (``iat.defenses.registry.defense_record``:
    the sparse-coding frontend's spec under ``frontend``, its tensors in the state_dict under
    ``frontend.``)."""
    denoise = nets.resolve_denoise(cfg.arch, cfg.denoise_op, cfg.denoise_window)
    configured = {name: getattr(cfg, name) for name in MODEL_FIELDS}
    record = nets.ArchitectureRecord(
        **{**configured, "denoise_op": None if denoise is None else denoise.op},
        num_classes=num_classes,
    )
    return {**record.to_dict(), **(model_defense or {})}


def load_for_inference(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The --load'ed model (read once) and the configuration it was built from: the
    architecture a training checkpoint records fills in the model fields the user did not set,
    and ``num_classes`` is --num-classes or the checkpoint's."""
    weights = nets.read_weights(cfg.load)
    cfg = with_recorded_architecture(cfg, weights)
    cfg = with_trained_image_size(cfg)
    recorded = recorded_defense(weights)
    if recorded is not None:  # the checkpoint's model-level defense, over --frontend
        cfg = dataclasses.replace(cfg, frontend=frontend_flag(recorded[0], weights.source))
    if cfg.eval_ema:
        weights = averaged_weights(weights)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or weights.num_classes)
    return build_model(cfg, cfg.num_classes, device, weights), cfg


def trained_image_size(checkpoint: str | Path) -> int | None:
    """The --image-size a training checkpoint's run used: its run directory's config.json (the
    checkpoint's folder); None without one (a converted or bare weights file)."""
    path = Path(checkpoint).parent / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        size = read_config_file(path).get("image_size")
    except ValueError:
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def with_trained_image_size(cfg: Config) -> Config:
    """``cfg`` evaluating at the size the --load'ed checkpoint was trained at unless --image-size
    was given; one line says which size and why (or that the flag overrides it, when it
    differs)."""
    trained = trained_image_size(cfg.load) if cfg.load else None
    if trained is None:
        return cfg
    if cfg.image_size_given and cfg.image_size == trained:
        return cfg
    if cfg.image_size_given:
        line = f"--image-size {cfg.image_size}: given, overriding the {trained} its run trained at"
    else:
        line = f"--image-size {trained}: the size its run trained at ({cfg.load}'s config.json)"
        cfg = dataclasses.replace(cfg, image_size=trained)
    if distributed.is_main_process():
        print(line, file=sys.stderr)
    return cfg


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
    try:
        parsed = nets.ArchitectureRecord.from_dict(record)
    except ValueError as error:
        raise nets.CheckpointError(
            f"{source}: field {nets.ARCHITECTURE_KEY!r} is not a valid architecture record "
            f"({error})"
        ) from None
    check_record(record, source)  # a model-level defense's field: CheckpointError if invalid
    if not (_valid_defense(parsed.defense) and parsed.defense_apply in DEFENSE_PHASES):
        raise nets.CheckpointError(
            f"{source}: field {nets.ARCHITECTURE_KEY!r} is not a valid architecture record "
            f"(defense {parsed.defense!r} applied at {parsed.defense_apply!r})"
        )
    return {name: getattr(parsed, name) for name in MODEL_FIELDS}


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
    dtype: torch.dtype | None = None  # the autocast's type; None: the device's (autocast_dtype)


FP32_EAGER = AttackPrecision(False, False, "fp32, eager")  # evaluation's, and --use-fp16xla off's


def attack_precision(
    use_fp16xla: bool, device: torch.device, dtype: str | None = None
) -> AttackPrecision:
    """What --use-fp16xla can gain on `device`, as measured (bench/RESULTS.md, sections 1 and
    1b, "what `--use-fp16xla` picks"):

    * CUDA: autocast compiled with CUDA graphs, in fp16 with the loss x128 (the original's fp16
      + XLA; `dtype` None or "float16") or in bf16 (`dtype` "bfloat16": fp32's range, no
      scaling; refused on a GPU without bf16 units);
    * a CPU with AMX: bf16 autocast, compiled (faster than eager fp32);
    * a CPU with AVX512-BF16 but no AMX: bf16 autocast, eager (compiling made the step slower);
    * a CPU without bf16 units: fp32 eager (bf16 autocast is emulated, many times slower;
      compiled fp32 no faster than eager).

    A CPU's type is bf16: `dtype` "float16" is refused there. ValueError (one line) if refused.
    """
    if not use_fp16xla:
        return FP32_EAGER
    if device.type == "cuda":
        if dtype == "bfloat16":
            if not torch.cuda.is_bf16_supported():
                raise ValueError("--fast-attack-dtype bfloat16: this GPU has no bf16 units")
            return AttackPrecision(
                True, True, "bf16 autocast, compiled (--use-fp16xla)", torch.bfloat16
            )
        return AttackPrecision(
            True, True, "fp16 (loss x128) autocast, compiled (--use-fp16xla)", torch.float16
        )
    if dtype == "float16":
        raise ValueError(
            f"--fast-attack-dtype float16: the fast attack on {device.type} is bf16 (fp16 is "
            "CUDA's); leave the flag out or give bfloat16"
        )
    if not has_native_low_precision(device):
        return AttackPrecision(
            False, False, "fp32, eager: this CPU has no bf16 units, --use-fp16xla would be slower"
        )
    if torch.cpu.get_capabilities().get("amx_bf16"):
        return AttackPrecision(
            True, True, "bf16 autocast, compiled (--use-fp16xla, AMX)", torch.bfloat16
        )
    return AttackPrecision(
        True, False, "bf16 autocast, eager (--use-fp16xla; no AMX)", torch.bfloat16
    )


def attack_settings(
    cfg: Config,
    *,
    attack_iter: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
) -> AttackSettings:
    """An evaluation attack's settings: `attack_iter` iterations of the --attack-* flags with
    every --eval option, from a random start, in fp32. `generator` is the default random source
    (None: torch's); `eot_samples` draws of a random defense are averaged per gradient."""
    flags = AttackSettings(
        attack_iter, cfg.attack_epsilon, cfg.attack_step_size, target=attack_target(cfg)
    )
    return _settings(
        cfg, flags, num_classes=num_classes, generator=generator, eot_samples=eot_samples
    )


def training_attack_settings(
    cfg: Config,
    spec: AttackSpec,
    *,
    num_classes: int,
    precision: AttackPrecision,
    generator: torch.Generator,
) -> AttackSettings:
    """The training attack's settings: `spec`'s iterations, epsilon, step and target (the
    epoch's, ``iat.train.builders.epoch_attack_spec``), starting from the clean image with
    --prob-start-from-clean, computed with `precision`, drawing from `generator`."""
    return _settings(
        cfg,
        spec.settings,
        num_classes=num_classes,
        generator=generator,
        precision=precision,
        prob_start_from_clean=cfg.prob_start_from_clean,
    )


def _settings(
    cfg: Config,
    attack: AttackSettings,
    *,
    num_classes: int,
    generator: torch.Generator | None,
    eot_samples: int = 1,
    precision: AttackPrecision = FP32_EAGER,
    prob_start_from_clean: float = 0.0,
) -> AttackSettings:
    """The one place an attack's settings are built: `attack`'s iterations, epsilon, step and
    target with the run's attack options."""
    return AttackSettings(
        num_iter=attack.num_iter,
        epsilon=attack.epsilon,
        step_size=attack.step_size,
        target=attack.target,
        prob_start_from_clean=prob_start_from_clean,
        num_classes=num_classes,
        generator=generator,
        autocast=precision.autocast,
        autocast_dtype=precision.dtype,
        compiled=precision.compiled,
        norm=cfg.norm,
        restarts=cfg.restarts,
        loss=cfg.attack_loss,
        eps_step=cfg.eps_step,
        top_k=cfg.apgd_targets,
        eot_samples=eot_samples,
        queries=cfg.queries,
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
