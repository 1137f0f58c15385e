"""The command line of ``main.py``: flags -> a frozen ``Config`` -> the chosen mode.

Flags default to None here: the defaults live in ``iat.config.Config``, in one place, and the
choice lists come from the registries (``iat.config.choices``). ``--config RUN/config.json``
replays a run: its stored configuration, with the flags given on the command line over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Callable

import nets
from iat.attacks import attack_info
from iat.attacks.spec import valid_forms
from iat.config import MODEL_FIELDS, Config, choices, depths, read_config_file
from iat.data.client import DataServerTimeout
from iat.data.layouts import DataError
from iat.defenses.registry import MODEL_DEFENSES
from iat.eval.benchmarks import BENCHMARK_DEFAULTS
from iat.recipes.presets import DEFAULT_RECIPE, EPOCH_SCHEDULES, RECIPES, fit_to_epochs
from iat.runtime import distributed
from iat.runtime.atomic_io import NoSpaceError, no_space_errno, space_reason
from iat.runtime.cpus import cpu_share, resolve_threads
from nets import CheckpointError

DESCRIPTION = """Adversarial training and white-box evaluation of ImageNet classifiers.

Train:          python main.py --data DIR --batch 32 --attack-iter 30 --arch ResNet -d 50
Evaluate:       python main.py --eval --load CKPT --data DIR --attack-iter 100 --arch ResNet -d 152
Predict:        python main.py --eval-directory DIR --prediction-file out.txt --load CKPT ...
Replay a run:   python main.py --config RUN/config.json [flags that override it]
Demo:           python main.py --demo
Launch on many processes with mpirun, srun or torchrun; see README.md.
"""

# Errors that are the user's input (a path, a flag, a checkpoint, a server): one line, exit 1.
USER_ERRORS = (
    DataError,
    CheckpointError,
    DataServerTimeout,
    FloatingPointError,
    ValueError,
    NoSpaceError,
    distributed.PeerLostError,
)


class UsageError(ValueError):
    """A flag that cannot be parsed (argparse's message, reported as one line, exit 1)."""


class _Parser(argparse.ArgumentParser):
    """Flags spelled out in full (a prefix such as --lr is not taken for --lr-decay-epochs),
    errors as one line, a mistyped flag with the closest real ones."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        unknown = [w for w in message.split() if w.startswith("--")]
        if message.startswith("unrecognized arguments") and unknown:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=3, cutoff=0.5)
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
        raise UsageError(message)


def _numbers(kind: type) -> Callable[[str], tuple]:
    """A comma-separated list of numbers, e.g. "2,4,8,16"."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None

    return parse


def _help(name: str, text: str) -> str:
    """`text`, then Config's default, unless `text` says its own ("default: ...")."""
    if "default:" in text:
        return text
    field = Config.__dataclass_fields__[name]
    default = field.default if field.default is not dataclasses.MISSING else None
    return f"{text} (default: {default})"


def _depth_help() -> str:
    """Each architecture's depths (the registry's), not the union of all."""
    archs = nets.available_architectures()
    per_arch = "".join(
        f"\n  {arch}: {', '.join(map(str, nets.depths_of(arch)))}"
        for arch in archs
        if len(nets.depths_of(arch)) > 1
    )
    return _help("depth", "depth") + per_arch + "\n  others: the one their name implies"


def _choice_arg(group, flag: str, text: str) -> None:
    name = flag.lstrip("-").replace("-", "_")
    group.add_argument(flag, choices=choices()[name], help=_help(name, text))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(**{f.name: None for f in dataclasses.fields(Config)})
    _mode_args(p)
    _data_args(p)
    _model_args(p)
    _attack_args(p)
    _adversarial_training_args(p)
    _training_args(p)
    _output_args(p)
    return p


def _mode_args(p: argparse.ArgumentParser) -> None:
    """The mode (train by default), --report's folder, --config and --recipe."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true", help="evaluate --load'ed weights on val/")
    mode.add_argument("--eval-directory", help="classify every image file of this folder")
    mode.add_argument("--demo", action="store_true", help="train and attack a tiny model on digits")
    mode.add_argument(
        "--export-activations",
        metavar="LAYER",
        help="write a layer's activations over --split (e.g. gap, group3)",
    )
    mode.add_argument(
        "--report", nargs="+", metavar="DIR", help="plots and a table from runs and evaluations"
    )
    p.add_argument("--out", default="report", help="--report: output folder (default: report)")
    p.add_argument(
        "--quick", action="store_true", help="--demo: fewer epochs and attack iterations (tests)"
    )
    p.add_argument("--config", help="a run's config.json to replay (flags given override it)")
    _choice_arg(p, "--recipe", "a published recipe's settings (README: Recipes); flags override")


def _data_args(p: argparse.ArgumentParser) -> None:
    """Where batches come from and how they are decoded."""
    data = p.add_argument_group("data")
    data.add_argument("--data", help="ImageNet-layout folder (train/<wnid>/*, val/<wnid>/*)")
    data.add_argument("--fake", action="store_true", default=None, help="constant fake batches")
    _choice_arg(data, "--data-layout", "layout of --data (auto: tiny-imagenet if wnids.txt)")
    _choice_arg(data, "--loader", "training batches: the data server or a local loader")
    data.add_argument("--data-server", help="data server address (default: ipc by --batch)")
    data.add_argument("--data-timeout", type=float, help=_help("data_timeout", "seconds"))
    data.add_argument(
        "--workers", type=int, help="decoding processes per process (default: its CPUs, <= 8)"
    )
    data.add_argument("--image-size", type=int, help=_help("image_size", "crop size"))
    _choice_arg(data, "--train-augment", "training augmentation")
    data.add_argument(
        "--size-schedule",
        type=int,
        nargs="+",
        metavar="EPOCH SIDE",
        help="progressive resizing: from EPOCH on, crops resized to SIDE (e.g. 1 128 7 224)",
    )
    data.add_argument("--batch", type=int, help=_help("batch", "images per process"))


def _model_args(p: argparse.ArgumentParser) -> None:
    """The architecture, its weights, its defense and frontend."""
    model = p.add_argument_group("model")
    _choice_arg(model, "--arch", "architecture")
    model.add_argument(
        "-d", "--depth", type=int, choices=depths(), metavar="DEPTH", help=_depth_help()
    )
    model.add_argument(
        "--num-blocks", type=int, nargs="+", help="blocks per group (ViT: one count), overrides -d"
    )
    model.add_argument("--width", type=int, help=_help("width", "base channel count"))
    model.add_argument(
        "--drop-path",
        type=float,
        help=_help("drop_path", "stochastic depth: the last block's drop rate (ConvNeXt/ViT/Swin)"),
    )
    model.add_argument(
        "--grad-checkpointing",
        action="store_true",
        default=None,
        help="recompute block activations in the backward pass (ConvNeXt/ViT/Swin)",
    )
    _choice_arg(model, "--denoise-op", "denoising blocks' operation; None: the arch's original")
    model.add_argument(
        "--denoise-window",
        type=int,
        help=_help("denoise_window", "window side of the local ops bilateral, mean, median"),
    )
    model.add_argument("--num-classes", type=int, help="default: classes in the data, or 1000")
    model.add_argument("--load", help="weights: original .npz, or .pt (resumes a training run)")
    model.add_argument(
        "--defense",
        help="input transforms before the model, e.g. jpeg:75,median:3,noise:8 (median window, "
        "JPEG quality 1-100, noise sigma in pixels); none: no defense",
    )
    _choice_arg(model, "--defense-apply", "when --defense applies: evaluation, training or both")
    model.add_argument(
        "--frontend",
        metavar="FILE",
        help="model-level defense wrapping the classifier: a sparse-coding frontend file (python "
        "-m iat.sparse_frontend train), or NAME:ARGUMENT of a registered one "
        f"({', '.join(MODEL_DEFENSES)})",
    )
    model.add_argument(
        "--frontend-trainable",
        action="store_true",
        default=None,
        help="train the defense's own parameters with the classifier (default: frozen)",
    )
    _choice_arg(
        model, "--frontend-gradient", "white-box attacks through the defense: BPDA or masked"
    )
    model.add_argument("--sync-bn", action="store_true", default=None, help="sync BN (CUDA)")
    model.add_argument(
        "--fsdp",
        nargs="?",
        const="full",
        choices=choices()["fsdp"],
        help="shard weights, gradients and optimizer state (FSDP2): over every process (full, "
        "the default), or within each machine (hybrid); default: DDP",
    )
    _choice_arg(
        model, "--fsdp-attack-gather", "--fsdp: the attack's weights gathered once or per layer"
    )


def _attack_args(p: argparse.ArgumentParser) -> None:
    """The attack: its threat model, --eval's choice and options, precision."""
    attack = p.add_argument_group("attack (pixel units, 0-255)")
    attack.add_argument("--attack-iter", type=int, help=_help("attack_iter", "PGD iterations"))
    attack.add_argument(
        "--attack-epsilon", type=float, help=_help("attack_epsilon", "radius, in --norm")
    )
    attack.add_argument("--attack-step-size", type=float, help=_help("attack_step_size", "step"))
    _choice_arg(attack, "--attack-target", "the attack's goal")
    attack.add_argument(
        "--prob-start-from-clean",
        type=float,
        help=_help(
            "prob_start_from_clean",
            "training: probability that an image's attack starts from it, not a random point",
        ),
    )
    attack.add_argument(
        "--eps-warmup-epochs", type=int, help=_help("eps_warmup_epochs", "training epsilon ramp")
    )
    attack.add_argument(
        "--step-warmup-epochs", type=int, help=_help("step_warmup_epochs", "training step ramp")
    )
    attack.add_argument(
        "--attack-iter-schedule",
        type=int,
        nargs="+",
        metavar="EPOCH ITERS",
        help="training attack in stages (AdvXL): from EPOCH on, ITERS iterations (e.g. 1 1 91 3)",
    )
    attack.add_argument(
        "--overfit-guard",
        type=float,
        help=_help("overfit_guard", "stop + roll back on a PGD accuracy drop > this; Wong: 0.2"),
    )
    _choice_arg(attack, "--attack", "--eval's attack (default: pgd, or clean for --attack-iter 0)")
    _choice_arg(attack, "--norm", "--eval's threat-model norm (L-inf, L2, L1)")
    attack.add_argument(
        "--restarts", type=int, help=_help("restarts", "pgd / apgd-* / fab-t restarts")
    )
    attack.add_argument(
        "--masking-checks",
        type=int,
        help=_help("masking_checks", "strong / autoattack: images the attack-failure checks use"),
    )
    _choice_arg(attack, "--attack-loss", "pgd / fgm loss: cross-entropy or CW margin")
    attack.add_argument(
        "--eps-step", type=float, help=_help("eps_step", "fgm-minimal epsilon increment")
    )
    attack.add_argument(
        "--apgd-targets",
        type=int,
        help=_help("apgd_targets", "apgd-t / fab-t / strong target classes"),
    )
    attack.add_argument(
        "--queries", type=int, help=_help("queries", "square: model queries per example")
    )
    attack.add_argument(
        "--eot-samples", type=int, help=_help("eot_samples", "draws per step vs random defenses")
    )
    attack.add_argument(
        "--use-fp16xla",
        action="store_true",
        default=None,
        help="attack under autocast (bf16 CPU, fp16 CUDA) and torch.compile",
    )
    _choice_arg(attack, "--fast-attack-dtype", "--use-fp16xla's type on CUDA; None: float16")


def _training_args(p: argparse.ArgumentParser) -> None:
    """The optimizer, its LR schedule, epochs and the run's processes."""
    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=int, help=_help("epochs", "total epochs"))
    opt.add_argument("--steps-per-epoch", type=int, help="default: train images // total batch")
    _choice_arg(opt, "--optimizer", "SGD with Nesterov momentum, or AdamW")
    opt.add_argument(
        "--adam-betas", type=float, nargs=2, help=_help("adam_betas", "AdamW's beta1 beta2")
    )
    _choice_arg(opt, "--lr-schedule", "step decay, cosine, or piecewise-linear (cyclic)")
    opt.add_argument("--base-lr", type=float, help=_help("base_lr", "LR per 256 images"))
    opt.add_argument(
        "--warmup-epochs", type=float, help=_help("warmup_epochs", "linear LR warm-up, epochs")
    )
    opt.add_argument(
        "--warmup-factor",
        type=float,
        help="warm-up start, a fraction of the peak LR (default: from --base-lr, if lower)",
    )
    opt.add_argument("--lr-decay-epochs", type=int, nargs="*", help="default: 35 70 95")
    opt.add_argument(
        "--min-lr-factor", type=float, help=_help("min_lr_factor", "cosine's final LR / peak")
    )
    opt.add_argument(
        "--lr-knots",
        type=float,
        nargs="+",
        metavar="EPOCH FACTOR",
        help="cyclic: epoch/factor-of-peak pairs (default: 0 0, 0.4E 1, E 0; Wong et al.)",
    )
    opt.add_argument(
        "--weight-decay", type=float, help=_help("weight_decay", "L2 penalty (AdamW: decoupled)")
    )
    opt.add_argument(
        "--clip-grad", type=float, help=_help("clip_grad", "max global L2 norm of the gradient")
    )
    opt.add_argument(
        "--amp",
        action="store_true",
        default=None,
        help="mixed-precision training: autocast forward/backward, fp32 weights and loss",
    )
    _choice_arg(opt, "--amp-dtype", "--amp's compute type; None: bf16 where native, else fp16")
    opt.add_argument(
        "--label-smoothing", type=float, help=_help("label_smoothing", "of the training loss")
    )
    opt.add_argument("--starting-epoch", type=int, help=_help("starting_epoch", "1-based"))
    _choice_arg(opt, "--train-eval", "in-training evaluations")
    opt.add_argument(
        "--seed", type=int, help=_help("seed", "seeds shuffling, augmentation, attacks")
    )
    opt.add_argument(
        "--collective-timeout",
        type=float,
        help=_help("collective_timeout", "seconds before a dead or hung rank stops the others"),
    )
    opt.add_argument(
        "--threads", type=int, help="torch threads per process (default: usable CPUs / processes)"
    )


def _output_args(p: argparse.ArgumentParser) -> None:
    """The run directory, --eval's outputs and options, --watch, --eval-directory's."""
    out = p.add_argument_group("output")
    out.add_argument("--logdir", help="run directory (default: train_log/PGD-...)")
    out.add_argument(
        "--keep-checkpoints", type=int, help=_help("keep_checkpoints", "epoch checkpoints kept")
    )
    out.add_argument("--log-every", type=int, help=_help("log_every", "steps"))
    out.add_argument(
        "--skip-unreadable", action="store_true", default=None, help="skip unreadable images"
    )
    out.add_argument(
        "--activations-file", help=_help("activations_file", "--export-activations: .npz or .mat")
    )
    out.add_argument(
        "--mlflow",
        nargs="?",
        const="mlruns",
        help="log the run to MLflow: a tracking URI, or a folder (default ./mlruns)",
    )
    evaluation = p.add_argument_group("evaluation (--eval, --eval-directory)")
    _eval_output_args(evaluation)
    _watch_args(evaluation)
    evaluation.add_argument("--prediction-file", help=_help("prediction_file", "--eval-directory"))
    evaluation.add_argument("--print-top5", action="store_true", default=None, help="print top-5")
    evaluation.add_argument(
        "--class-names", help="one class name per line (LOC_synset_mapping.txt)"
    )


def _eval_output_args(out: argparse._ArgumentGroup) -> None:
    """--eval's result files, the images it attacks and how, its sweeps."""
    out.add_argument("--eval-output", help="--eval: write the metrics as JSON here")
    _choice_arg(
        out,
        "--eval-set",
        "--eval: --data is ImageNet-C (corruption/severity/wnid: errors, CE, mCE), "
        "ImageNet-R / -A (wnid: error on their classes), ImageNet-Sketch (sketch/wnid) or "
        "ImageNet-V2 (class index 0-999), scored clean",
    )
    _choice_arg(
        out,
        "--benchmark",
        "--eval: a benchmark's images, preprocessing, threat model and result file "
        "(robustbench: its 5,000 ImageNet images, L-inf 4/255, AutoAttack)",
    )
    for what in ("name", "link", "authors", "venue"):
        out.add_argument(f"--model-{what}", help=f"--benchmark: the model's {what}, as filed")
    out.add_argument(
        "--additional-data",
        type=_true_false,
        metavar="{true,false}",
        help="--benchmark: the model was trained with data beyond ImageNet-1k's (default: unknown)",
    )
    out.add_argument(
        "--eval-state",
        help="--eval: keep finished batches here, so a relaunch resumes "
        "(default: <--eval-output>.state; 'none': off)",
    )
    _choice_arg(out, "--split", "--eval: the split to attack")
    out.add_argument(
        "--quantize",
        action="store_true",
        default=None,
        help="--eval: round adversarial images to uint8 before scoring (as files hold them)",
    )
    out.add_argument(
        "--export-adversarial",
        metavar="DIR",
        help="--eval: write the adversarial images as PNGs (implies --quantize)",
    )
    out.add_argument(
        "--sweep-epsilon", type=_numbers(float), help="--eval: e.g. 2,4,8,16 (pixel units)"
    )
    out.add_argument("--sweep-iters", type=_numbers(int), help="--eval: e.g. 10,50,100")
    out.add_argument("--num-examples", type=int, help="--eval: only the first N images")
    out.add_argument(
        "--class-subset",
        action="store_true",
        default=None,
        help="--eval: the data's N classes are the model's first N (else a count that differs "
        "from the model's outputs is an error)",
    )


def _watch_args(out: argparse._ArgumentGroup) -> None:
    """--eval --watch: a run directory's checkpoints, each evaluated once."""
    out.add_argument("--watch", help="--eval: evaluate each new checkpoint of this run directory")
    out.add_argument(
        "--watch-interval", type=float, help=_help("watch_interval", "--watch: seconds")
    )
    out.add_argument(
        "--watch-timeout",
        type=float,
        help=_help("watch_timeout", "--watch: stop after this long without a new checkpoint"),
    )


def _true_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text == "true"


def _scope_list(text: str) -> tuple[str, ...]:
    """ "a,b" -> ("a", "b"): the original's comma-separated variable-name prefixes."""
    return tuple(scope.strip() for scope in text.split(","))


def _adversarial_training_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "adversarial-training variants (README: Adversarial-training options)"
    )
    group.add_argument(
        "--adv-method",
        help=f"training attack: {valid_forms()} (default: the --attack-* flags)",
    )
    group.add_argument(
        "--adv-fraction",
        type=float,
        help="adversarial fraction of the images trained on (default: 0.5 with --lp-weight, "
        "each image clean and attacked; else 1)",
    )
    group.add_argument("--lp-weight", type=float, help=_help("lp_weight", "logit pairing"))
    group.add_argument(
        "--moving-average-decay",
        type=float,
        help=_help("moving_average_decay", "EMA of the weights, <= 0 disables; ALP: 0.9999"),
    )
    group.add_argument(
        "--eval-ema", action="store_true", default=None, help="evaluate the averaged weights"
    )
    group.add_argument("--finetune-checkpoint", help="weights a fresh run starts from")
    group.add_argument(
        "--finetune-exclude-scopes", type=_scope_list, help="a,b: not loaded (fresh init)"
    )
    group.add_argument(
        "--finetune-trainable-scopes", type=_scope_list, help="a,b: trained; the rest frozen"
    )
    mix = p.add_argument_group("batch mixing (on the device; soft targets)")
    mix.add_argument("--mixup-alpha", type=float, help=_help("mixup_alpha", "Mixup, 0: off"))
    mix.add_argument("--cutmix-alpha", type=float, help=_help("cutmix_alpha", "CutMix, 0: off"))
    mix.add_argument("--mix-prob", type=float, help=_help("mix_prob", "chance a batch is mixed"))
    mix.add_argument(
        "--mix-switch-prob", type=float, help=_help("mix_switch_prob", "CutMix vs Mixup chance")
    )
    group.add_argument("--accumulate", type=int, help=_help("accumulate", "micro-batches/update"))
    group.add_argument(
        "--free-replays", type=int, help=_help("free_replays", "free adversarial training")
    )


_MODE_FLAGS = ("eval", "eval_directory", "export_activations")  # flag dest = mode name
_NOT_CONFIG = ("eval", "demo", "quick", "config", "report", "out")


def config_from_args(args: argparse.Namespace) -> Config:
    """The frozen configuration: flags given on the command line over --config's values (if
    given) over Config's defaults. The mode always comes from the flags."""
    values = read_config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    # A benchmark named on this command line sets its protocol under the flags given; a replayed
    # run's file already holds the values that run resolved.
    if given.get("benchmark") is not None and values.get("benchmark") != given["benchmark"]:
        values.update(BENCHMARK_DEFAULTS.get(given["benchmark"], {}))
    _attack_defaults(values, given)
    # A recipe named on this command line sets its values under the flags given (over a
    # replayed run's); a replayed run's file already holds the values its recipe resolved to.
    if given.get("recipe") is not None and values.get("recipe") != given["recipe"]:
        for name in RECIPES[values.get("recipe", DEFAULT_RECIPE)].settings:
            values.pop(name, None)  # the replayed run's recipe's values: back to the defaults
        values.update(RECIPES[given["recipe"]].settings)
    tuples = ("num_blocks", "lr_decay_epochs", "adam_betas", "lr_knots", *EPOCH_SCHEDULES)
    for name in tuples:
        if name in given:
            given[name] = tuple(given[name])
    # The model fields the user chose: the flags given, and those the replayed run chose.
    explicit = set(given) | set(values.get("explicit_model_fields", ()))
    values.update(given)
    if given.get("recipe") is not None and "epochs" in given:  # a short run of a long recipe
        values.update(fit_to_epochs(given["recipe"], given["epochs"], given))
    _default_depth(values)
    values["explicit_model_fields"] = tuple(name for name in MODEL_FIELDS if name in explicit)
    values["image_size_given"] = "image_size" in values
    values["mode"] = next((m for m in _MODE_FLAGS if getattr(args, m)), "train")
    return Config(**values)


# The flag (Config field) of each AttackSettings field an attack's registered defaults set.
_SETTINGS_FIELDS = {"num_iter": "attack_iter", "top_k": "apgd_targets", "queries": "queries"}


def _attack_defaults(values: dict, given: dict) -> None:
    """An --attack named on this command line with settings of its own (the registry's
    ``defaults``: AutoAttack's 100 iterations, 9 targets, 5,000 queries) sets them under the
    flags given, over the training flags' defaults (--attack-iter 30); a replayed run's file
    already holds the values it resolved."""
    attack = given.get("attack")
    if attack is None or values.get("attack") == attack:
        return
    defaults = attack_info(attack).defaults or {}
    values.update({_SETTINGS_FIELDS[name]: value for name, value in defaults.items()})


def _default_depth(values: dict) -> None:
    """An architecture with a single depth (the timm / torchvision names: convnext_tiny is 18
    blocks) needs no -d."""
    arch = values.get("arch")
    if arch in nets.ARCHITECTURES and "depth" not in values and "num_blocks" not in values:
        depths = nets.depths_of(arch)
        if len(depths) == 1:
            values["depth"] = depths[0]


MAX_DEFAULT_WORKERS = 8  # decoding processes per training process, by default


def resolve_resources(cfg: Config, env: distributed.DistEnv) -> Config:
    """--threads and --workers when not given: this process's share of the usable CPUs (a
    shared machine's affinity mask, divided among this host's processes), so that processes
    never oversubscribe the cores (bench/RESULTS.md, section 13)."""
    threads = resolve_threads(cfg.threads, env.local_world_size)
    share = cpu_share(env.local_world_size)
    workers = cfg.workers if cfg.workers is not None else min(MAX_DEFAULT_WORKERS, share)
    return dataclasses.replace(cfg, threads=threads, workers=workers)


def run(cfg: Config) -> None:
    env = distributed.detect()
    cfg = resolve_resources(cfg, env)
    distributed.set_threads(cfg.threads)
    device = distributed.select_device(env)
    distributed.init(env, device, cfg.collective_timeout)
    try:
        with distributed.naming_lost_peers():
            _dispatch(cfg, env, device)
    finally:
        distributed.cleanup()


def _dispatch(cfg: Config, env: distributed.DistEnv, device) -> None:
    if cfg.mode == "export_activations":
        from iat.app.export import run_export

        run_export(cfg, device)
    elif cfg.mode == "eval_directory":
        from iat.app.predict import run_predict

        run_predict(cfg, device)
    elif cfg.mode == "eval" and cfg.watch is not None:
        from iat.app.watch import watch

        watch(cfg, device)
    elif cfg.mode == "eval":
        from iat.eval.evaluate import run_eval

        run_eval(cfg, device)
    else:
        from iat.train.trainer import run_training

        run_training(cfg, env, device)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.demo:
            from iat.app.demo import run_demo

            return run_demo(args.logdir or "demo_log", quick=args.quick)
        if args.report:
            from iat.app.report import write_report

            for path in write_report(args.report, args.out):
                print(f"wrote {path}")
            return 0
        run(config_from_args(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        code = no_space_errno(e)
        if code is None:
            raise
        # A full disk (or ulimit -f) outside the atomic writer and the appenders (TensorBoard's
        # event file).
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {space_reason(code)}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m iat.app.cli, as python -m iat
    sys.argv[0] = "python -m iat"
    sys.exit(main())
