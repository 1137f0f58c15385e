"""This project's AutoAttack against an independent one (adversarial-robustness-toolbox's), image
by image, on the demo's adversarially trained digits model: same images, labels and threat model.

    python3 main.py --demo --quick --logdir /tmp/art-demo      # once: the model and its digits
    python3 bench/autoattack_vs_art.py --demo-log /tmp/art-demo --epsilon 16 32 --out /tmp/aa

Per epsilon (pixel units, L-inf):

* ours: ``--eval --attack autoattack`` (its standard version: APGD-CE, APGD-T with 9 targets,
  FAB-T with 9 targets, Square with 5,000 queries, 100 iterations) through the evaluation's own
  code (``evaluate_attack``), its per-image results written and read back as the evaluation
  writes them (``<eval-output>.images.jsonl``: prediction, margin, the member that broke it);
* ART: ``art.attacks.evasion.AutoAttack`` (its ensemble and bookkeeping: each member on the
  images the earlier ones left correct, success = misclassified within epsilon) given members
  as close to the standard version as ART allows, in the standard's order (``ART_DIFFERENCES``
  says where they differ: ART has no FAB, its defaults are other members);
* every "broken" claim of either side checked by scoring the returned image again (within
  epsilon, in [0, 255], misclassified in float32 as the evaluation scores and in float64);
* the 2x2 agreement table and every image the two disagree on: its index, label, which member
  broke it, the L-inf distance of each side's image and its margin (the label's logit minus the
  largest other one, float64: negative = misclassified).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iat.app.cli import build_parser, config_from_args  # noqa: E402
from iat.app.demo import ATTACK_ITER, QUICK  # noqa: E402
from iat.attacks import PIXEL_MAX, PIXEL_MIN, Attacker  # noqa: E402
from iat.attacks.ops import logit_margin  # noqa: E402
from iat.builders import load_for_inference  # noqa: E402
from iat.config import Config  # noqa: E402
from iat.eval.evaluate import (  # noqa: E402
    eval_samples,
    evaluate_attack,
    image_results_path,
    write_image_results,
)
from iat.eval.summary import summary_line  # noqa: E402
from iat.runs.state import latest_checkpoint  # noqa: E402

# The standard version's settings (Croce & Hein 2020, Sec 5; the authors' autoattack.py).
ITERATIONS, TARGETS, QUERIES, SQUARE_P_INIT = 100, 9, 5000, 0.8
ART_MEMBERS = ("APGD-CE", "APGD-T", "DeepFool", "Square")
ART_DIFFERENCES = (
    "ART's AutoAttack runs the members it is given (its defaults: APGD-CE and APGD-DLR with 5 "
    "restarts, DeepFool, Square with 5 restarts); given here, in the standard's order:",
    "- APGD-CE: ART's AutoProjectedGradientDescent, cross-entropy, 100 iterations, 1 restart, "
    "first step 2 eps; an image counts as broken only if its last iterate is misclassified "
    "(the standard keeps any misclassified iterate);",
    "- APGD-T: ART's APGD is targeted only through its untargeted DLR loss with the target as "
    "the label and the gradient negated (maximises (z_t - max_{j!=t} z_j) / (z_pi1 - z_pi3); "
    "the standard's targeted DLR is -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)); run here "
    "toward the 9 classes ranked 2nd to 10th by the clean logits in turn, as the standard "
    "does, each on the images still correct, success = misclassified (ART's APGD itself keeps "
    "a targeted run's last iterate only where it reached the target; ART's AutoAttack alone "
    "would run every member toward every class in class order, after all untargeted runs);",
    "- FAB-T: ART has no FAB; its slot holds DeepFool (ART's default stand-in: 100 iterations, "
    "overshoot 1e-3, 10 classes), minimal and unbounded, counted only where it lands within eps;",
    "- Square: ART's SquareAttack, 5,000 iterations, p_init 0.8, 1 restart, margin loss; its "
    "schedule of p is the paper's rescaled to the budget (halved after iterations 5, 25, 100, "
    "250, 500, 1000, 2000, 3000, 4000: p_init / 512 at the end), the standard runs it unscaled "
    "(after 10, 50, 200, 500, 1000, 2000, 4000: p_init / 128 at the end);",
    "- success: ART's AutoAttack counts an image within eps up to a relative 1e-4 "
    "((1 - 1e-4) * ||delta|| <= eps); every claim is checked again below at eps + 1e-4.",
)
LINF_SLACK = 1e-4  # pixel units: float32 rounding of x + delta near 255 (ulp ~1.5e-5)


def demo_checkpoint(demo_log: Path) -> Path:
    """The demo's adversarially trained (PGD-3) model: the full demo's, else the quick one's."""
    for run in (
        demo_log / f"attack-iter{ATTACK_ITER}",
        demo_log / QUICK.name / f"attack-iter{ATTACK_ITER}",
    ):
        found = latest_checkpoint(run) if run.is_dir() else None
        if found is not None:
            return found
    raise SystemExit(
        f"error: no checkpoint of the demo's adversarial model under {demo_log} (make one with "
        f"python3 main.py --demo --quick --logdir {demo_log})"
    )


def eval_config(checkpoint: Path, data: Path, images: int | None) -> Config:
    """``--eval --attack autoattack`` of `checkpoint` on `data`'s held-out split, every setting
    but epsilon the standard version's (the flags' defaults)."""
    flags = ["--eval", "--load", str(checkpoint), "--data", str(data), "--image-size", "32"]
    flags += ["--attack", "autoattack", "--workers", "0"]
    flags += ["--num-examples", str(images)] if images else []
    return config_from_args(build_parser().parse_args(flags))


class Recorder(Attacker):
    """Passes every call to the evaluation's attacker and keeps what went in and came out."""

    def __init__(self, inner: Attacker) -> None:
        self.inner, self.clean, self.labels, self.adv = inner, [], [], []

    def attack(self, model, images, labels, generator=None):
        adv, targets = self.inner.attack(model, images, labels, generator=generator)
        self.clean.append(images.detach().clone())
        self.labels.append(labels.detach().clone())
        self.adv.append(adv.detach().clone())
        return adv, targets

    def stats_template(self, device):
        return self.inner.stats_template(device)

    def batch_stats(self):
        return self.inner.batch_stats()

    def describe_stats(self, stats, images):
        return self.inner.describe_stats(stats, images)

    def image_results(self):
        return self.inner.image_results()


@dataclass
class Side:
    """One AutoAttack's result on the images: its images, and per image its claim (broken or
    not) and the member that broke it ("clean": misclassified clean; None: not broken)."""

    adv: torch.Tensor
    claimed: np.ndarray
    member: list
    seconds: float


def ours(model, cfg: Config, out: Path) -> tuple[Side, torch.Tensor, torch.Tensor, str]:
    """The evaluation of `cfg` (``--attack autoattack``), its per-image file written under `out`
    and read back; returns our side, the clean images and labels, and its summary line."""
    recorder, rows = None, []

    def record(inner: Attacker) -> Attacker:
        nonlocal recorder
        recorder = Recorder(inner)
        return recorder

    samples = eval_samples(cfg)
    start = time.perf_counter()
    result = evaluate_attack(
        model, cfg, samples, attack_iter=cfg.attack_iter, num_classes=cfg.num_classes,
        device=torch.device("cpu"), desc="ours", name="autoattack", wrap=record, images_out=rows,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    path = image_results_path(out / f"autoattack-eps{cfg.attack_epsilon:g}.json")
    write_image_results(path, [(cfg, rows)])
    read = read_image_results(path)
    clean, labels = torch.cat(recorder.clean), torch.cat(recorder.labels)
    if [r["label"] for r in read] != labels.tolist():
        raise RuntimeError(f"{path}: its labels are not the attacked images'")
    claimed = np.array([r["prediction"] != r["label"] for r in read])
    side = Side(torch.cat(recorder.adv), claimed, [r["broken_by"] for r in read], seconds)
    return side, clean, labels, summary_line(cfg, result)


def read_image_results(path: Path) -> list[dict]:
    """The rows of a per-image file, in image order (its indices must be 0, 1, ...)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if [r["index"] for r in rows] != list(range(len(rows))):
        raise RuntimeError(f"{path}: image indices are not 0..{len(rows) - 1}")
    return rows


def top_targets(logits: np.ndarray, k: int) -> np.ndarray:
    """Per image, the classes ranked 2nd to (k+1)-th by `logits` (APGD-T's targets)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, 1 : k + 1]


def art_targeted_apgd(classifier, apgd, targets: int):
    """ART's targeted APGD run toward each image's top `targets` wrong classes in turn, on the
    images still classified correctly (the standard's APGD-T schedule), as an ART attack."""
    from art.attacks.attack import EvasionAttack

    class TopTargetsAPGD(EvasionAttack):
        _estimator_requirements = ()

        def generate(self, x, y=None, **kwargs):
            labels = y.argmax(axis=1)
            ranked = top_targets(classifier.predict(x), targets)
            adv, robust = x.copy(), classifier.predict(x).argmax(axis=1) == labels
            for rank in range(ranked.shape[1]):
                todo = np.flatnonzero(robust)
                if todo.size == 0:
                    break
                goal = np.eye(classifier.nb_classes, dtype=np.float32)[ranked[todo, rank]]
                found = apgd.generate(x[todo], y=goal)
                won = classifier.predict(found).argmax(axis=1) != labels[todo]
                adv[todo[won]] = found[won]
                robust[todo[won]] = False
            return adv

    return TopTargetsAPGD(estimator=classifier)


def art_side(model, x: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> Side:
    """ART's AutoAttack with the members closest to the standard version (``ART_DIFFERENCES``)."""
    from art.attacks.evasion import (
        AutoAttack,
        AutoProjectedGradientDescent,
        DeepFool,
        SquareAttack,
    )
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(PIXEL_MIN, PIXEL_MAX),  # the model's input space: pixel units
        device_type="cpu",
    )
    n = len(y)

    def apgd(loss: str, targeted: bool):
        return AutoProjectedGradientDescent(
            classifier, norm=np.inf, eps=epsilon, eps_step=2 * epsilon, max_iter=ITERATIONS,
            targeted=targeted, nb_random_init=1, batch_size=n, loss_type=loss, verbose=False,
        )  # fmt: skip

    members = [
        apgd("cross_entropy", targeted=False),
        art_targeted_apgd(classifier, apgd("difference_logits_ratio", targeted=True), TARGETS),
        DeepFool(classifier, max_iter=100, epsilon=1e-3, nb_grads=10, batch_size=n, verbose=False),
        SquareAttack(
            classifier, norm=np.inf, max_iter=QUERIES, eps=epsilon, p_init=SQUARE_P_INIT,
            nb_restarts=1, batch_size=n, verbose=False,
        ),
    ]  # fmt: skip
    attack = AutoAttack(
        classifier, norm=np.inf, eps=epsilon, eps_step=2 * epsilon, attacks=members, batch_size=n
    )
    np.random.seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    adv = attack.generate(x.numpy(), y=y.numpy())
    seconds = time.perf_counter() - start
    names = {-2: "clean", -1: None, **dict(enumerate(ART_MEMBERS))}
    member = [names[int(k)] for k in attack.best_attacks]
    claimed = np.array([k != -1 for k in attack.best_attacks])
    return Side(torch.from_numpy(adv).float(), claimed, member, seconds)


@dataclass
class Check:
    """Each image of one side scored again: its L-inf distance from the clean image, whether it
    lies in [0, 255], whether float32 (as the evaluation scores) and float64 misclassify it, its
    float64 margin; ``broken``: all of these hold."""

    linf: np.ndarray
    in_range: np.ndarray
    wrong32: np.ndarray
    wrong64: np.ndarray
    margin: np.ndarray
    broken: np.ndarray


def check(model, clean: torch.Tensor, labels: torch.Tensor, adv: torch.Tensor, eps: float) -> Check:
    """`adv` scored again by `model` (the whole set in one batch) in float32 and float64."""
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        wrong32 = (model(adv.float()).argmax(dim=1) != labels).numpy()
        margin = logit_margin(double(adv.double()), labels).numpy()
    linf = (adv.double() - clean.double()).abs().flatten(1).amax(dim=1).numpy()
    in_range = ((adv >= PIXEL_MIN) & (adv <= PIXEL_MAX)).flatten(1).all(dim=1).numpy()
    broken = (linf <= eps + LINF_SLACK) & in_range & wrong32 & (margin < 0)
    return Check(linf, in_range, wrong32, margin < 0, margin, broken)


def agreement(ours_broken: np.ndarray, art_broken: np.ndarray) -> dict[str, int]:
    """The 2x2 table of two sides' verified results, image by image."""
    return {
        "both robust": int((~ours_broken & ~art_broken).sum()),
        "both broken": int((ours_broken & art_broken).sum()),
        "only ours broken": int((ours_broken & ~art_broken).sum()),
        "only ART broken": int((~ours_broken & art_broken).sum()),
    }


def unverified(side: Side, checked: Check) -> list[int]:
    """The images a side claims broken that its own image does not break when scored again."""
    return np.flatnonzero(side.claimed & ~checked.broken).tolist()


def disagreement_rows(
    labels: torch.Tensor, ours_side: Side, ours_check: Check, art: Side, art_check: Check
) -> list[dict]:
    """Every image exactly one side breaks (verified), with both sides' figures."""
    differ = np.flatnonzero(ours_check.broken != art_check.broken)
    return [
        {
            "index": int(i),
            "label": int(labels[i]),
            "ours": ours_side.member[i] if ours_check.broken[i] else "robust",
            "ours_linf": float(ours_check.linf[i]),
            "ours_margin": float(ours_check.margin[i]),
            "art": art.member[i] if art_check.broken[i] else "robust",
            "art_linf": float(art_check.linf[i]),
            "art_margin": float(art_check.margin[i]),
        }
        for i in differ
    ]


def print_point(eps: float, n: int, point: dict) -> None:
    table = point["agreement"]
    print(f"\nL-inf eps={eps:g}, {n} held-out digits (clean wrong: {point['clean_wrong']})")
    print(f"{'':24}{'ART robust':>12}{'ART broken':>12}")
    print(f"{'ours robust':24}{table['both robust']:>12}{table['only ART broken']:>12}")
    print(f"{'ours broken':24}{table['only ours broken']:>12}{table['both broken']:>12}")
    for name in ("ours", "art"):
        side = point[name]
        print(
            f"{name}: robust accuracy {side['robust_accuracy']:.4f}, {side['seconds']:.0f} s; "
            f"broken by {side['broken_by']}; claims checked: {side['claimed']} claimed broken, "
            f"{side['claimed'] - len(side['unverified'])} hold"
            + (f" (not: images {side['unverified']})" if side["unverified"] else "")
        )
    rows = point["disagreements"]
    print(f"disagreements: {len(rows)}" + (":" if rows else ""))
    if rows:
        print(f"{'index':>6}{'label':>6}  {'ours':10}{'L-inf':>9}{'margin':>10}  "
              f"{'ART':10}{'L-inf':>9}{'margin':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['index']:>6}{r['label']:>6}  {r['ours']:10}{r['ours_linf']:>9.3f}"
            f"{r['ours_margin']:>10.4f}  {r['art']:10}{r['art_linf']:>9.3f}{r['art_margin']:>10.4f}"
        )


def member_counts(side: Side, checked: Check) -> dict[str, int]:
    """How many verified breaks each member holds."""
    counts: dict[str, int] = {}
    for member, broken in zip(side.member, checked.broken, strict=True):
        if broken:
            counts[member] = counts.get(member, 0) + 1
    return counts


def compare(model, loaded: Config, eps: float, args) -> dict:
    """One epsilon: both AutoAttacks on the same images, checked and compared (`loaded`: the
    evaluation's configuration as loading the model completed it)."""
    cfg = dataclasses.replace(loaded, attack_epsilon=eps)
    mine, clean, labels, summary = ours(model, cfg, args.out)
    print(f"\nours: {summary}", flush=True)
    art = art_side(model, clean, labels, eps, args.seed)
    checks = {
        name: check(model, clean, labels, s.adv, eps) for name, s in (("ours", mine), ("art", art))
    }
    with torch.no_grad():
        clean_wrong = int((model(clean).argmax(dim=1) != labels).sum())
    point = {
        "epsilon": eps,
        "images": len(labels),
        "clean_wrong": clean_wrong,
        "agreement": agreement(checks["ours"].broken, checks["art"].broken),
        "disagreements": disagreement_rows(labels, mine, checks["ours"], art, checks["art"]),
    }
    for name, side in (("ours", mine), ("art", art)):
        point[name] = {
            "robust_accuracy": 1 - float(checks[name].broken.mean()),
            "seconds": side.seconds,
            "broken_by": member_counts(side, checks[name]),
            "claimed": int(side.claimed.sum()),
            "unverified": unverified(side, checks[name]),
        }
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-log", type=Path, default=Path("/tmp/art-demo"))
    parser.add_argument("--epsilon", type=float, nargs="+", default=[16.0, 32.0])
    parser.add_argument("--images", type=int, help="the first N held-out digits (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU)")
    parser.add_argument("--seed", type=int, default=0, help="ART's random draws (numpy, torch)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/autoattack_vs_art"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = demo_checkpoint(args.demo_log)
    data = args.demo_log / "digits"
    cfg = eval_config(checkpoint, data, args.images)
    model, cfg = load_for_inference(cfg, torch.device("cpu"))  # cfg: with the model's classes
    model.eval()
    print(f"checkpoint: {checkpoint}; images: {data / 'val'}; torch threads: {args.threads}")
    print("\n".join(ART_DIFFERENCES))
    points, start = [], time.perf_counter()
    for eps in args.epsilon:
        points.append(compare(model, cfg, eps, args))
        print_point(eps, points[-1]["images"], points[-1])
    (args.out / "autoattack_vs_art.json").write_text(json.dumps(points, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s in all; figures in {args.out}")


if __name__ == "__main__":
    main()
