"""White-box evaluation, distributed over all processes, every image counted exactly once.

The validation split is cut into fixed batches of `batch` images (``sources.rank_batches``);
batch j goes to rank j % world_size and the attack's randomness for it is a generator seeded by
j, passed through ``attacker.attack(..., generator=...)``. So the numbers do not depend on the
number of processes (the original dropped the split's remainder and averaged per-worker
averages; here counts are summed across ranks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from iat.attacks import (
    PIXEL_MAX,
    PIXEL_MIN,
    Attacker,
    NoOpAttacker,
    attack_info,
    autoattack,
    registry,
)
from iat.attacks.ops import logit_margin
from iat.builders import build_attacker, load_for_inference
from iat.config import (
    Config,
    config_record,
    eval_attack,
    predict_defense,
)
from iat.data.augment import eval_transform
from iat.data.layouts import (
    EXPORT_LABELS,
    CorruptImageError,
    Sample,
    check_class_count,
    check_labels,
    create_reader,
)
from iat.data.sources import eval_loader, rank_batches, to_model_input, unreadable
from iat.defenses import transforms as defenses
from iat.eval import benchmarks, ood
from iat.eval.masking import Check, MaskingProbe, run_checks
from iat.eval.metrics import EvalResult, count_batch
from iat.eval.state import (
    BatchRecord,
    EvalState,
    EvalStateError,
    fingerprint,
    state_dir,
    stats_tensors,
)
from iat.eval.summary import eval_settings, random_draws, summary_line, threat_model
from iat.runs.logger import RunLogger
from iat.runs.trackers import evaluation_logger
from iat.runtime import distributed
from iat.runtime.atomic_io import atomic_write, atomic_write_text, check_writable_file
from iat.runtime.progress import progress_bar

DEFENSE_SEED_OFFSET = 500_000  # a random defense's draws: a stream apart from the attack's


def batch_seed(seed: int, batch_index: int) -> int:
    """The attack's seed for global evaluation batch `batch_index`."""
    return seed * 1_000_003 + batch_index


def evaluate(
    model: torch.nn.Module,
    attacker: Attacker,
    samples: Sequence[Sample],
    *,
    batch: int,
    image_size: int,
    workers: int,
    device: torch.device,
    seed: int,
    skip_unreadable: bool = False,
    quantize: bool = False,
    export: AdversarialExport | None = None,
    desc: str = "eval",
    state: EvalState | None = None,
    transform: Callable = eval_transform,
    images_out: list | None = None,
    estimate: bool = False,
) -> EvalResult:
    """Top-1/top-5 error and attack success of `model` under `attacker` on `samples`.

    With `images_out`, a row per image attacked here is appended to it (``image_rows``).

    With `quantize` the adversarial images are rounded to uint8 (as a file would hold them)
    before they are scored; `export` writes them as PNGs. With `state`, the batches it holds
    are not attacked again (their counts are added once, by rank 0) and every finished batch
    is added to it (``iat.eval.state``). With `estimate`, the time of the first batch and the
    whole evaluation's expected time are printed once it is attacked.

    The attack differentiates ``defenses.attack_model(model)`` (a defended model's BPDA/EOT
    view); the images are scored by `model` itself. An unreadable image is an error naming it,
    or, with `skip_unreadable`, left out of the counts and counted in ``EvalResult.skipped``."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    done = state.done if state is not None else {}
    mine = [j for j in rank_batches(len(samples), batch, rank, world) if j not in done]
    loader = eval_loader(
        samples,
        batch=batch,
        image_size=image_size,
        workers=workers,
        rank=rank,
        world_size=world,
        pin_memory=device.type == "cuda",
        batches=mine,
        transform=transform,
    )
    generator = torch.Generator(device=device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    skipped = torch.zeros((), dtype=torch.float64, device=device)
    # The attacker's own counts (e.g. minimal epsilons, ensemble members), summed like totals;
    # a rank without batches still joins the sums with zeros.
    stats = attacker.stats_template(device)
    if state is not None:
        resume_counts(state, math.ceil(len(samples) / batch), totals, skipped, stats)
    bar = progress_bar(loader, desc=desc, disable=not distributed.is_main_process(), leave=False)
    began = time.perf_counter()
    for j, (images, labels, indices, ok) in zip(mine, bar, strict=True):
        distributed.mark_progress(j, "batch")  # a peer silent for the timeout stops this here
        batch_skipped = 0
        if not ok.all():
            batch_skipped = skip_unreadable_images(samples, indices, ok, skip_unreadable)
            images, labels = images[ok], labels[ok]
        images, labels = to_model_input(images, device), labels.to(device)
        this_seed = batch_seed(seed, j)
        adv, targets, logits = attack_batch(
            model, attacker, images, labels, generator, this_seed, quantize
        )
        if export is not None:
            export.write(adv, indices[ok] if not ok.all() else indices)
        if images_out is not None:
            images_out += image_rows(logits, labels, indices[ok], attacker.image_results())
        counts, batch_stats = count_batch(logits, labels, targets), attacker.batch_stats()
        totals += counts
        skipped += batch_skipped
        for key, value in batch_stats.items():
            stats[key] += value
        if state is not None:
            state.append(batch_record(j, counts, batch_skipped, batch_stats))
        if not bar.disable:  # a host sync: only where the bar is shown
            bar.set_postfix_str(running_accuracy(totals), refresh=False)
        if estimate and j == mine[0] and distributed.is_main_process():
            seconds = time.perf_counter() - began  # progress, not a result: stderr, as the bar
            tqdm.write(cost_estimate(attacker, len(images), seconds, len(mine)), file=sys.stderr)
    model.train(was_training)
    return summed_result(attacker, totals, skipped, stats)


def attack_batch(
    model: torch.nn.Module,
    attacker: Attacker,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    seed: int,
    quantize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(attacked images, attack targets, their logits)`` of one batch, the attack's and a
    random defense's draws seeded by `seed`."""
    generator.manual_seed(seed)
    defenses.reseed(model, seed + DEFENSE_SEED_OFFSET)
    adv, targets = attack_images(model, attacker, images, labels, generator, quantize)
    with torch.no_grad():
        logits = model(adv).float()
    return adv, targets, logits


def cost_estimate(attacker: Attacker, images: int, seconds: float, batches: int) -> str:
    """The expected time of an evaluation from its first batch (`seconds` for `images`)."""
    total = seconds * batches
    took = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min"
    return (
        f"first batch of {images} images attacked in {seconds:.1f} s: about {took} for this "
        f"process's {batches} batches (the attack-failure checks come after the result)"
    )


def resume_counts(
    state: EvalState,
    batches: int,
    totals: torch.Tensor,
    skipped: torch.Tensor,
    stats: dict[str, torch.Tensor],
) -> None:
    """Add the counts of the batches `state` holds (rank 0 alone, so that they count once),
    after checking they are this evaluation's `batches`; every rank reads the state before any
    rank adds to it."""
    done = state.done
    if any(j >= batches for j in done):
        raise EvalStateError(
            f"{state.folder}: a batch beyond this evaluation's {batches}; "
            "delete the folder to start this evaluation afresh"
        )
    if done and distributed.get_rank() == 0:
        add_done_batches(done.values(), totals, skipped, stats, state.folder)
    # Every rank has read the state before any rank adds to it: nothing is counted twice.
    distributed.all_reduce_sum(torch.zeros(1, device=totals.device))


def skip_unreadable_images(
    samples: Sequence[Sample], indices: torch.Tensor, ok: torch.Tensor, skip_unreadable: bool
) -> int:
    """The number of a batch's unreadable images, each named in a warning; an error naming the
    first without `skip_unreadable`."""
    bad = unreadable(samples, indices, ok)
    if not skip_unreadable:
        raise CorruptImageError(
            f"cannot decode image {bad[0]} (--skip-unreadable skips such images)"
        )
    tqdm.write(f"warning: skipped unreadable image(s) {', '.join(bad)}", file=sys.stderr)
    return len(bad)


def summed_result(
    attacker: Attacker,
    totals: torch.Tensor,
    skipped: torch.Tensor,
    stats: dict[str, torch.Tensor],
) -> EvalResult:
    """The result of every rank's counts, summed (a collective: every rank calls it)."""
    distributed.all_reduce_sum(totals)
    distributed.all_reduce_sum(skipped)
    for key in sorted(stats):  # the same order on every rank
        distributed.all_reduce_sum(stats[key])
    images = int(totals[0].item())
    details = attacker.describe_stats(stats, images)
    return EvalResult.from_counts(totals, skipped=int(skipped.item()), details=details)


def image_rows(
    logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, results: dict[str, list]
) -> list[dict]:
    """Per image of a batch, as the per-image file records it: its index in the evaluated
    samples, label, prediction, final margin (the label's logit minus the largest other one:
    negative when misclassified) and the attacker's own per-image results (``image_results``:
    an ensemble's ``broken_by``)."""
    margins = logit_margin(logits, labels).tolist()
    predictions = logits.argmax(dim=1).tolist()
    rows = zip(indices.tolist(), labels.tolist(), predictions, margins, strict=True)
    out = [{"index": i, "label": y, "prediction": p, "margin": m} for i, y, p, m in rows]
    for key, values in results.items():
        for row, value in zip(out, values, strict=True):
            row[key] = value
    return out


def image_results_path(eval_output: str | Path) -> Path:
    """The per-image file beside --eval-output: ``<eval-output>.images.jsonl``."""
    return Path(f"{eval_output}.images.jsonl")


def write_image_results(path: Path, points: list[tuple[Config, list[dict]]]) -> None:
    """One JSON line per image and evaluation point (``point``: its place in the sweep, as
    the evaluation records are written), ordered by point and image index."""
    lines = [
        json.dumps({"point": k, "epsilon": cfg.attack_epsilon, "iter": cfg.attack_iter, **row})
        for k, (cfg, rows) in enumerate(points)
        for row in sorted(rows, key=lambda r: r["index"])
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def randomness_line(details: dict) -> str | None:
    """AutoAttack's randomness check in one line (the authors' ``check_randomized``), when two
    passes of the model on the same images differed; None otherwise."""
    if not details.get("randomized_batches"):
        return None
    return (
        f"warning: the model is random: two forward passes on the same images differed in "
        f"{details['randomized_batches']} batch(es); the standard version overstates its "
        "robustness: evaluate it behind its random defense (--defense, --eot-samples > 1), "
        "which runs the rand version"
    )


def add_done_batches(
    records: Iterable[BatchRecord],
    totals: torch.Tensor,
    skipped: torch.Tensor,
    stats: dict[str, torch.Tensor],
    folder: Path,
) -> None:
    """Add the counts of the batches a killed evaluation finished (read from its state)."""
    for record in records:
        totals += torch.tensor(record.counts, dtype=totals.dtype, device=totals.device)
        skipped += record.skipped
        for key, value in stats_tensors(record, stats, folder).items():
            stats[key] += value


def batch_record(
    batch_index: int, counts: torch.Tensor, skipped: int, stats: dict[str, torch.Tensor]
) -> BatchRecord:
    values = {key: value.double().flatten().tolist() for key, value in stats.items()}
    return BatchRecord(batch_index, counts.tolist(), float(skipped), values)


def running_accuracy(totals: torch.Tensor) -> str:
    """The progress bar's figures so far: accuracy on the attacked images (this rank's, and
    the batches resumed from a state on rank 0)."""
    images, wrong = totals[0].item(), totals[1].item()
    return f"accuracy {1 - wrong / images:.4f} of {images:.0f}" if images else ""


def attack_images(
    model: torch.nn.Module,
    attacker: Attacker,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attacked images, attack targets)``: the attack runs on what a white-box attacker must
    differentiate (BPDA/EOT for a defended model, Athalye et al. 2018 Sec 4); scoring them is
    `model`'s, with its real transforms. `quantize` rounds them to whole pixel values."""
    adv, targets = attacker.attack(
        defenses.attack_model(model), images, labels, generator=generator
    )
    return (quantize_images(adv) if quantize else adv), targets


def quantize_images(adv: torch.Tensor) -> torch.Tensor:
    """Adversarial images rounded to uint8 values, as a PNG keeps them. Rounding moves a pixel
    by at most 0.5; clean images are whole numbers, so an L-inf ball of whole-pixel radius is
    never left (other norms may grow by that rounding)."""
    return adv.round().clamp(PIXEL_MIN, PIXEL_MAX)


class AdversarialExport:
    """Writes evaluated adversarial images as lossless PNGs (uint8, BGR) under `root`, at the
    same relative paths as the samples under `split_dir` (class folders kept), ``.png``, and
    their labels in ``labels.txt``."""

    def __init__(self, root: str | Path, samples: Sequence[Sample], split_dir: str | Path) -> None:
        self.root, self.samples, self.split_dir = Path(root), samples, Path(split_dir)

    def path(self, index: int) -> Path:
        relative = Path(self.samples[index][0]).relative_to(self.split_dir)
        return (self.root / relative).with_suffix(".png")

    def write_labels(self) -> None:
        """``labels.txt``: each exported image's path relative to the root and its label, so
        that ``--eval --data ROOT --split .`` scores the folder (a transfer attack's accuracy)."""
        exported = [(self.path(i), label) for i, (_, label) in enumerate(self.samples)]
        lines = [
            f"{path.relative_to(self.root).as_posix()} {label}\n"
            for path, label in exported
            if path.is_file()  # not an image --skip-unreadable left out
        ]
        atomic_write_text(self.root / EXPORT_LABELS, "".join(lines))

    def write(self, adv: torch.Tensor, indices: torch.Tensor) -> None:
        pixels = adv.round().clamp(PIXEL_MIN, PIXEL_MAX).to(torch.uint8).permute(0, 2, 3, 1)
        for image, index in zip(pixels.cpu().numpy(), indices.tolist(), strict=True):
            ok, encoded = cv2.imencode(".png", image)
            if not ok:
                raise ValueError(f"--export-adversarial: cannot encode image {index} as PNG")
            atomic_write(self.path(index), lambda f, data=encoded: f.write(data.tobytes()))


def evaluate_attack(
    model: torch.nn.Module,
    cfg: Config,
    samples: Sequence[Sample],
    *,
    attack_iter: int,
    num_classes: int,
    device: torch.device,
    desc: str,
    name: str | None = None,
    export: AdversarialExport | None = None,
    state: EvalState | None = None,
    wrap: Callable[[Attacker], Attacker] | None = None,
    images_out: list | None = None,
    estimate: bool = False,
) -> EvalResult:
    """`evaluate` under the attack registered as `name` (default: the configured PGD-
    `attack_iter`, clean for 0), fp32, of `model` behind the configured defense (--defense),
    attacked through BPDA and EOT (nothing when it applies only in training); resumed from
    and recorded in `state` when given; the attacker passed through `wrap` when given."""
    model = defenses.defend(model, predict_defense(cfg))
    eot = defenses.eot_samples(model, cfg.eot_samples)
    attacker = build_attacker(
        cfg, attack_iter=attack_iter, num_classes=num_classes, name=name, eot_samples=eot
    )
    attacker = wrap(attacker) if wrap is not None else attacker
    return evaluate(
        model,
        attacker,
        samples,
        batch=cfg.batch,
        image_size=cfg.image_size,
        workers=cfg.workers,
        device=device,
        seed=cfg.seed,
        skip_unreadable=cfg.skip_unreadable,
        quantize=cfg.quantize or export is not None,
        export=export,
        desc=desc,
        state=state,
        transform=benchmarks.transform_for(cfg),
        images_out=images_out,
        estimate=estimate,
    )


def eval_samples(cfg: Config) -> list[Sample]:
    """The samples --eval attacks: the --split of --data, its first --num-examples if given;
    with --benchmark, the benchmark's images of the split, in its order."""
    if cfg.benchmark is not None:  # its list and class map, not the folders present
        return benchmarks.benchmark_samples(Path(cfg.data) / cfg.split, cfg.num_examples)
    samples = create_reader(cfg.data, cfg.data_layout).samples(cfg.split)
    return samples[: cfg.num_examples] if cfg.num_examples else samples


def evaluate_checkpoint(
    cfg: Config, samples: list[Sample], device: torch.device, logger: RunLogger, label: str = ""
) -> list[EvalResult]:
    """The --load'ed model (read once) on `samples` under the configured attack, or under each
    point of the --sweep-epsilon x --sweep-iters grid; every result is logged (as ``eval``) and
    its summary line printed (after `label`: the checkpoint's name when watching)."""
    model, cfg = load_for_inference(cfg, device)  # cfg: the checkpoint's recorded architecture
    where = str(Path(cfg.data) / cfg.split)
    covered = None
    if cfg.benchmark is None:
        classes = create_reader(cfg.data, cfg.data_layout).named_classes(cfg.split)
        check_class_count(classes, cfg.num_classes, where, cfg.class_subset)
    else:  # labelled by the benchmark's class map: the folders present do not count
        covered = benchmarks.coverage(len(samples), cfg.num_examples)
        partial = " (a partial evaluation)" if covered["partial"] else ""
        print_main(
            f"--benchmark {cfg.benchmark}: {covered['found']} of its {covered['listed']} "
            f"listed images found under {where}{partial}"
        )
    check_labels(samples, cfg.num_classes, cfg.split)
    export = None
    if cfg.export_adversarial is not None:
        split_dir = Path(cfg.data) / cfg.split
        export = AdversarialExport(cfg.export_adversarial, samples, split_dir)
    results, states, per_image = [], [], []
    for point in sweep(cfg):
        state = open_state(point, len(samples))
        states.append(state)
        per_image.append((point, []))
        probe = masking_probe(point)
        result = evaluate_attack(
            model,
            point,
            samples,
            attack_iter=point.attack_iter,
            num_classes=point.num_classes,
            device=device,
            desc=f"eval {threat_model(point)}",
            name=eval_attack(point),
            export=export,
            state=state,
            images_out=per_image[-1][1],
            wrap=None if probe is None else (lambda inner, probe=probe: probe.watch(inner)),
            estimate=True,
        )
        record = {**eval_record(point, result), "device": str(device)}
        if covered is not None:
            record["benchmark_images"] = covered
        logger.log_result("eval", record)
        if distributed.is_main_process():
            print(label + summary_line(point, result), flush=True)
            line = randomness_line(result.details)
            if line:
                print(line, flush=True)
        if probe is not None:
            n = min(point.masking_checks, len(samples))
            print_main(f"attack-failure checks on {n} of the images (--masking-checks) ...")
            checks = masking_checks(model, point, probe, device)
            checked = [dataclasses.asdict(c) for c in checks]
            logger.log_result("masking_checks", {"masking_checks": checked})
            for check in checks:
                if check.warn:
                    print_main(check.line())
        results.append(result)
    if cfg.benchmark is not None and cfg.eval_output and distributed.is_main_process():
        write_model_info(cfg, results)
    if export is not None and distributed.is_main_process():
        export.write_labels()
    gathered = [(point, distributed.gather_lists(rows)) for point, rows in per_image]
    if cfg.eval_output and distributed.is_main_process():
        write_image_results(image_results_path(cfg.eval_output), gathered)
    logger.flush()
    for state in states:  # every point's result is written: nothing left to resume
        if state is not None:
            state.close()
            if distributed.is_main_process():
                state.remove()
    return results


def write_model_info(cfg: Config, results: list[EvalResult]) -> None:
    """The benchmark's result file (RobustBench's model_info fields) beside --eval-output."""
    clean, attacked = results
    info = benchmarks.model_info(cfg, clean, attacked, autoattack.version(random_draws(cfg)))
    path = benchmarks.model_info_path(cfg.eval_output)
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    print(
        f"RobustBench ImageNet {info['threat_model']} eps {info['eps']}: clean accuracy "
        f"{info['clean_acc']} %, AutoAttack ({info['autoattack_version']}) accuracy "
        f"{info['autoattack_acc']} % on {info['n_ex']} images; model_info in {path}",
        flush=True,
    )


def print_main(line: str) -> None:
    if distributed.is_main_process():
        print(line, flush=True)


def masking_probe(cfg: Config) -> MaskingProbe | None:
    """The probe watching a strong / autoattack evaluation's first --masking-checks images (None
    for other attacks, or with --masking-checks 0)."""
    if not attack_info(eval_attack(cfg)).checked or cfg.masking_checks == 0:
        return None
    world = distributed.get_world_size()
    return MaskingProbe(None, limit=math.ceil(cfg.masking_checks / world))


def masking_checks(
    model: torch.nn.Module, cfg: Config, probe: MaskingProbe, device: torch.device
) -> list[Check]:
    """``iat.eval.masking``'s checks of a strong / autoattack evaluation that `probe` watched:
    the checks' own attacks on the probed images, in batches of --batch, behind the configured
    defense like the evaluation."""
    defended = defenses.defend(model, predict_defense(cfg))
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)

    def attack(attacker: Attacker, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kept = []
        for i in range(0, len(images), cfg.batch):
            x, y = images[i : i + cfg.batch].to(device), labels[i : i + cfg.batch].to(device)
            adv, _ = attack_images(defended, attacker, x, y, generator)
            with torch.no_grad():
                kept.append((defended(adv).argmax(dim=1) == y).cpu())
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool)

    def total(count: float) -> float:
        summed = torch.tensor(count, dtype=torch.float64, device=device)
        return float(distributed.all_reduce_sum(summed).item())

    return run_checks(cfg, probe, attack, total)


def open_state(cfg: Config, num_images: int) -> EvalState | None:
    """This evaluation's resumable state (``iat.eval.state``), saying what it resumes."""
    folder = state_dir(cfg)
    if folder is None or cfg.export_adversarial is not None:
        return None  # an export writes every image: it runs whole
    key, rank = fingerprint(cfg, num_images), distributed.get_rank()
    state = EvalState(folder, key, rank, num_images=num_images, batch=cfg.batch)
    if state.done and distributed.is_main_process():
        batches = math.ceil(num_images / cfg.batch)
        print(
            f"resuming the evaluation from {folder}: {len(state.done)} of {batches} batches "
            "done (delete the folder to start afresh)",
            flush=True,
        )
    return state


def sweep(cfg: Config) -> list[Config]:
    """The configurations --sweep-epsilon and --sweep-iters ask for (just `cfg` without them);
    a benchmark's clean evaluation first."""
    if cfg.benchmark is not None:
        return benchmarks.points(cfg)
    epsilons = cfg.sweep_epsilon or (cfg.attack_epsilon,)
    iterations = cfg.sweep_iters or (cfg.attack_iter,)
    return [
        dataclasses.replace(cfg, attack_epsilon=float(eps), attack_iter=k)
        for eps in epsilons
        for k in iterations
    ]


def run_eval(cfg: Config, device: torch.device) -> list[EvalResult]:
    """--eval: the --load'ed model on the validation split under the configured attack(s)."""
    main_proc = distributed.is_main_process()
    if main_proc and cfg.eval_output:
        check_writable_file("--eval-output", cfg.eval_output)  # before the work, not after
    name = f"eval {Path(cfg.load).name}"
    settings = dataclasses.asdict(cfg)
    with evaluation_logger(name, settings, cfg.eval_output or None, main_proc) as logger:
        logger.log_config(config_record(cfg, {"world_size": distributed.get_world_size()}))
        if cfg.eval_set is not None:
            evaluate_set_of(cfg, device, logger)
            return []
        return evaluate_checkpoint(cfg, eval_samples(cfg), device, logger)


def evaluate_set_of(cfg: Config, device: torch.device, logger: RunLogger) -> None:
    """--eval-set: the --load'ed model (behind --defense) on ImageNet-C, -R or -A, clean."""
    model, cfg = load_for_inference(cfg, device)
    defended = defenses.defend(model, predict_defense(cfg))

    def run(scored: torch.nn.Module, samples, transform, desc: str) -> EvalResult:
        return evaluate(
            scored,
            NoOpAttacker(),
            samples,
            batch=cfg.batch,
            image_size=cfg.image_size,
            workers=cfg.workers,
            device=device,
            seed=cfg.seed,
            skip_unreadable=cfg.skip_unreadable,
            desc=desc,
            transform=transform,
        )

    record, lines = ood.evaluate_set(cfg, defended, run)
    logger.log_result("eval", {**record, "checkpoint": cfg.load, "device": str(device)})
    if distributed.is_main_process():
        print("\n".join(lines), flush=True)


def attack_record(cfg: Config) -> dict:
    """The record's ``attack``: the attack's name and every setting it takes (the name alone
    for the clean evaluation)."""
    attack = eval_attack(cfg)
    if not attack_info(attack).perturbs:
        return {"name": attack}
    return {"name": attack, **registry.record(attack, eval_settings(cfg))}


def eval_record(cfg: Config, r: EvalResult) -> dict:
    record = r.as_dict()
    if not attack_info(eval_attack(cfg)).perturbs:
        for key in ("attack_success_rate", "robust_accuracy", "details"):
            del record[key]
    return {
        **record,
        "threat_model": threat_model(cfg),
        "attack": attack_record(cfg),
        "checkpoint": cfg.load,
        "split": cfg.split,
        "image_size": cfg.image_size,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "num_blocks": cfg.num_blocks,
        "denoise_op": cfg.denoise_op,
        "defense": predict_defense(cfg),
        "frontend": cfg.frontend,
        "frontend_gradient": cfg.frontend_gradient if cfg.frontend is not None else None,
        "world_size": distributed.get_world_size(),
    }
