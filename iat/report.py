"""``main.py --report DIR [DIR ...] --out FOLDER``: plots and a model-zoo table from runs.

Reads what runs and evaluations leave behind: a run directory's ``metrics.jsonl`` (training
curves) and every evaluation record (JSON files written by ``--eval-output``, ``--watch`` in
``RUN/eval/``, or a list of records from a sweep). Writes PNG plots (matplotlib, headless) —
training curves; accuracy against attack iterations and against epsilon, one curve per model;
the minimal-epsilon histogram when an evaluation recorded one — and ``report.md``, a table in
the original's model-zoo format, every column naming its threat model. Each plot function also
returns the data it drew, so what is plotted can be checked.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from iat.atomic_io import atomic_write, atomic_write_text

TRAIN_PANELS = (  # (metric of metrics.jsonl, panel title)
    ("train/loss", "training loss"),
    ("train/top1_error", "top-1 error: training batches (attacked), evaluations"),
    ("train/attack_success_rate", "attack success rate (training)"),
    ("train/lr", "learning rate"),
)
Curves = dict[str, list[tuple[float, float]]]  # label -> (x, y) points


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--report: cannot read {path}: {e}") from None


def _records_in(value: object) -> list[dict]:
    """An evaluation record, a list of them, or ``{"records": [...]}``."""
    if isinstance(value, dict) and isinstance(value.get("records"), list):
        value = value["records"]
    items = value if isinstance(value, list) else [value]
    return [r for r in items if isinstance(r, dict) and "top1_error" in r and "images" in r]


def collect(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """``(training records of metrics.jsonl, evaluation records)`` under `paths`."""
    training: list[dict] = []
    evaluations: list[dict] = []
    for root in map(Path, paths):
        if not root.exists():
            raise ValueError(f"--report: {root} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        metrics = [] if root.is_file() else sorted(root.rglob("metrics.jsonl"))
        for path in files:
            if path.name != "config.json":
                evaluations += _records_in(_read_json(path))
        for path in metrics:
            lines = path.read_text().splitlines()
            training += [{**json.loads(line), "run": path.parent.name} for line in lines if line]
    return training, evaluations


def training_curves(training: list[dict]) -> dict[str, Curves]:
    """Panel -> {run (and evaluation phase) -> points over steps}."""
    panels: dict[str, Curves] = {name: defaultdict(list) for name, _ in TRAIN_PANELS}
    for r in training:
        for name, _ in TRAIN_PANELS:
            if name in r:
                panels[name][r["run"]].append((r["step"], r[name]))
        phase = str(r.get("phase", ""))
        if phase.startswith("eval-") and f"{phase}/top1_error" in r:
            label = f"{r['run']} {phase}"
            panels["train/top1_error"][label].append((r["step"], r[f"{phase}/top1_error"]))
    return {name: dict(curves) for name, curves in panels.items()}


def model_name(record: dict) -> str:
    checkpoint = record.get("checkpoint") or "model"
    return f"{Path(str(checkpoint)).parent.name}/{Path(str(checkpoint)).name}"


def _attack(record: dict) -> dict:
    return record.get("attack") or {}


def robust_accuracy_curves(evaluations: list[dict], along: str) -> Curves:
    """Per model: accuracy (1 - top-1 error) against the attack's `along` ("iter" or
    "epsilon"); clean evaluations are the point at 0."""
    curves: Curves = defaultdict(list)
    for r in evaluations:
        attack = _attack(r)
        x = 0.0 if attack.get("name") == "clean" else attack.get(along)
        if x is not None:
            curves[model_name(r)].append((float(x), 1.0 - r["top1_error"]))
    return {label: sorted(set(points)) for label, points in curves.items()}


def minimal_epsilons(evaluations: list[dict]) -> dict[str, list[float]]:
    """Per model, the per-example minimal epsilons a minimal-perturbation attack recorded."""
    found = {model_name(r): r["minimal_epsilons"] for r in evaluations if r.get("minimal_epsilons")}
    return {label: [float(e) for e in values] for label, values in found.items()}


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    return path


def _figure(rows: int, cols: int):
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--report: matplotlib is not installed (pip install -e '.[report]')"
        ) from None

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)


def plot_training(panels: dict[str, Curves], out: Path) -> Path:
    figure, axes = _figure(2, 2)
    for ax, (name, title) in zip(axes.flat, TRAIN_PANELS, strict=True):
        for label, points in sorted(panels[name].items()):
            ax.plot(*zip(*points, strict=True), label=label)
        ax.set(title=title, xlabel="step")
        if panels[name]:
            ax.legend(fontsize="small")
    return _save(figure, out / "training.png")


def plot_curves(curves: Curves, out: Path, name: str, xlabel: str) -> Path:
    figure, axes = _figure(1, 1)
    for label, points in sorted(curves.items()):
        axes[0, 0].plot(*zip(*points, strict=True), marker="o", label=label)
    axes[0, 0].set(xlabel=xlabel, ylabel="accuracy (1 - top-1 error)", ylim=(0, 1))
    if curves:
        axes[0, 0].legend(fontsize="small")
    return _save(figure, out / name)


def plot_histogram(values: dict[str, list[float]], out: Path) -> Path:
    figure, axes = _figure(1, 1)
    for label, eps in sorted(values.items()):
        axes[0, 0].hist(eps, bins=20, alpha=0.6, label=label)
    axes[0, 0].set(xlabel="minimal epsilon (pixels)", ylabel="examples")
    axes[0, 0].legend(fontsize="small")
    return _save(figure, out / "minimal_epsilon.png")


def _cell(record: dict | None, with_success: bool = True) -> str:
    if record is None:
        return "–"
    error = f"{100 * record['top1_error']:.1f}"
    if with_success and "attack_success_rate" in record:
        return f"{error} / {100 * record['attack_success_rate']:.1f}"
    return error


def zoo_table(evaluations: list[dict]) -> str:
    """The original's model-zoo table: clean error; targeted PGD-10/100 error / attack success;
    untargeted PGD-100 error; the strongest recorded attack's robust accuracy; in percent."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in evaluations:
        by_model[model_name(r)].append(r)

    def find(records: list[dict], name: str, iters: int | None, target: str | None):
        wanted = {"name": name, "iter": iters, "target": target}
        for r in records:
            a = _attack(r)
            if all(v is None or a.get(k) == v for k, v in wanted.items()):
                return r
        return None

    lines = [
        "| model | clean error | PGD-10 rand-target error / success | PGD-100 rand-target "
        "error / success | PGD-100 untargeted error | lowest robust accuracy (attack) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, records in sorted(by_model.items()):
        attacked = [r for r in records if _attack(r).get("name") != "clean"]
        worst = max(attacked, key=lambda r: r["top1_error"], default=None)
        strongest = (
            "–"
            if worst is None
            else (f"{100 * (1 - worst['top1_error']):.1f} ({worst.get('threat_model', '?')})")
        )
        lines.append(
            f"| {model} | {_cell(find(records, 'clean', None, None), False)} "
            f"| {_cell(find(records, 'pgd', 10, 'random'))} "
            f"| {_cell(find(records, 'pgd', 100, 'random'))} "
            f"| {_cell(find(records, 'pgd', 100, 'none'), False)} | {strongest} |"
        )
    return "\n".join(lines) + "\n"


def write_report(paths: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Every plot the data allows, and report.md; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    training, evaluations = collect(paths)
    if not training and not evaluations:
        raise ValueError("--report: no metrics.jsonl and no evaluation records found")
    written = []
    if training:
        written.append(plot_training(training_curves(training), out))
    if evaluations:
        iters = robust_accuracy_curves(evaluations, "iter")
        written.append(plot_curves(iters, out, "accuracy_vs_iterations.png", "attack iterations"))
        eps = robust_accuracy_curves(evaluations, "epsilon")
        written.append(plot_curves(eps, out, "accuracy_vs_epsilon.png", "epsilon (pixels)"))
        if minimal := minimal_epsilons(evaluations):
            written.append(plot_histogram(minimal, out))
        written.append(atomic_write_text(out / "report.md", zoo_table(evaluations)))
    return written
