"""``main.py --report DIR [DIR ...] --out FOLDER``: plots and a model-zoo table from runs.

Reads what runs and evaluations leave behind: a run directory's ``metrics.jsonl`` (training
curves, and its newest in-training evaluations as records) and every evaluation record (JSON
files written by ``--eval-output``, ``--watch`` in ``RUN/eval/``, or a list of records from a
sweep). Writes PNG plots (matplotlib, headless) — training curves; accuracy against attack
iterations and against epsilon, one labelled line per model and threat model (attack, target,
norm, the other setting, defense); the median minimal epsilon of each minimal-perturbation
evaluation — and ``report.md``, a table in the original's model-zoo format, every column naming
its threat model. The data behind each plot comes from a function of its own and each
``draw_*`` returns its matplotlib figure, so what is plotted can be checked.

Inputs are read bounded and only from regular files, never through a symbolic link (a FIFO or a
device is refused, never waited on); a ``metrics.jsonl`` line or an evaluation record the report
cannot use (not an object, no numeric ``step`` or ``images``, a string where a number belongs,
nested too deep) is skipped with a warning naming its file and line; an unreadable file or
``--out`` is one error.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from iat.attacks.registry import ATTACKS, attack_words, settings_of_record
from iat.runs.files import CONFIG_FILE, METRICS_FILE
from iat.runtime.atomic_io import atomic_write, atomic_write_text, read_regular

TRAIN_PANELS = (  # (metric of metrics.jsonl, panel title)
    ("train/loss", "training loss"),
    ("train/top1_error", "top-1 error: training batches (attacked), evaluations"),
    ("train/attack_success_rate", "attack success rate (training)"),
    ("train/lr", "learning rate"),
)
LOSS_TERMS = (
    ("train/cross_entropy", "cross-entropy"),
    ("train/logit_pairing", "logit pairing (unweighted)"),
)
MARKERS, LINES = "os^Dv<>p", ("-", "--", "-.", ":")  # accuracy curves' styles, cycled
Curves = dict[str, list[tuple[float, float]]]  # label -> (x, y) points
MAX_RECORDS_BYTES = 64 << 20  # an evaluation record file (a sweep's list is a few MB at most)
MAX_METRICS_BYTES = 1 << 30  # a metrics.jsonl (a line per logged step)
MAX_WARNINGS = 5  # skipped lines named per file; the rest are counted


def _read_text(path: Path, limit: int) -> str:
    """`path`'s text: a regular file of at most `limit` bytes, never through a symbolic link
    (``read_regular``: a FIFO is refused, never waited on)."""
    try:
        return read_regular(path, limit).decode()
    except OSError as e:
        raise ValueError(f"--report: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--report: cannot read {path}: {e}") from None
    except ValueError as e:  # UnsafeFileError: a link, a FIFO, a device, too large
        raise ValueError(f"--report: {e}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path, MAX_RECORDS_BYTES))
    except json.JSONDecodeError as e:
        raise ValueError(f"--report: cannot read {path}: {e}") from None
    except RecursionError:
        raise ValueError(f"--report: cannot read {path}: JSON nested too deep") from None


def _number(value: object, finite: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and (not finite or math.isfinite(value))


def _key(value: object) -> bool:
    """A value the report uses as a key or a label part: a string, a number or null."""
    return value is None or isinstance(value, (str, int, float))


def _record_problem(r: dict) -> str | None:
    """Why evaluation record `r` cannot be reported (None: it can)."""
    attack, details = r.get("attack") or {}, r.get("details") or {}
    if not (_number(r["top1_error"], True) and _number(r["images"], True)):
        return "top1_error and images must be numbers"
    if not all(_number(r[k]) for k in ("top5_error", "attack_success_rate") if k in r):
        return "top5_error and attack_success_rate must be numbers"
    if not (isinstance(attack, dict) and isinstance(details, dict)):
        return "attack and details must be objects"
    if not all(_key(attack.get(k)) for k in ("name", "target", "norm")):
        return "attack name, target and norm must be strings"
    if not all(_number(attack[k]) for k in ("iter", "epsilon") if k in attack):
        return "attack iter and epsilon must be numbers"
    if "iter" in attack and "epsilon" not in attack:
        return "an attack with iter has an epsilon"
    if "median_min_epsilon" in details and not _number(details["median_min_epsilon"]):
        return "details.median_min_epsilon must be a number"
    if not all(r.get(k) is None or isinstance(r[k], str) for k in ("defense", "split")):
        return "defense and split must be strings"
    return None


def _line_problem(line: object) -> str | None:
    """Why `line` of a metrics.jsonl cannot be reported (None: it can)."""
    if not isinstance(line, dict):
        return "not a JSON object"
    if not _number(line.get("step"), True):
        return "no numeric step"
    if not _key(line.get("epoch")) or not _key(line.get("phase")):
        return "epoch and phase must be numbers or strings"
    if bad := [k for k, v in line.items() if "/" in k and not _number(v)]:
        return f"{bad[0]} is not a number"
    phase = str(line.get("phase", ""))
    if phase.startswith("eval-") and "attack" in line and f"{phase}/top1_error" in line:
        record = {
            "top1_error": line[f"{phase}/top1_error"],
            "images": line.get("images"),
            "attack": line["attack"],
            "defense": line.get("defense"),
        }
        if f"{phase}/top5_error" not in line or "threat_model" not in line:
            return f"an evaluation without {phase}/top5_error or threat_model"
        return _record_problem(record)
    return None


def _warn(path: Path, where: str, reason: str, skipped: int) -> None:
    if skipped <= MAX_WARNINGS:
        print(f"warning: --report: {path}:{where}: skipped ({reason})", file=sys.stderr)


def _records_in(value: object, path: Path | str = "?") -> list[dict]:
    """An evaluation record, a list of them, or ``{"records": [...]}``; a record the report
    cannot use is skipped, with a warning naming `path` and its place."""
    if isinstance(value, dict) and isinstance(value.get("records"), list):
        value = value["records"]
    items = value if isinstance(value, list) else [value]
    records, skipped = [], 0
    for number, r in enumerate(items, 1):
        if not (isinstance(r, dict) and "top1_error" in r and "images" in r):
            continue
        if (reason := _record_problem(r)) is None:
            records.append(r)
            continue
        skipped += 1
        _warn(Path(path), f"record {number}", reason, skipped)
    if skipped > MAX_WARNINGS:
        print(f"warning: --report: {path}: {skipped} records skipped in all", file=sys.stderr)
    return records


def read_metrics(path: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl the report can use; each other line is skipped with a
    warning naming the file and the line."""
    lines, skipped = [], 0
    for number, text in enumerate(_read_text(path, MAX_METRICS_BYTES).splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            reason = _line_problem(line)
        except json.JSONDecodeError as e:
            reason = f"not JSON: {e}"
        except RecursionError:
            reason = "nested too deep"
        if reason is None:
            lines.append(line)
            continue
        skipped += 1
        _warn(path, str(number), reason, skipped)
    if skipped > MAX_WARNINGS:
        print(f"warning: --report: {path}: {skipped} lines skipped in all", file=sys.stderr)
    return lines


def collect(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """``(training records of metrics.jsonl, evaluation records)`` under `paths`; a run's
    newest in-training evaluations count as evaluation records too."""
    training: list[dict] = []
    evaluations: list[dict] = []
    for root in map(Path, paths):
        if not root.exists():
            raise ValueError(f"--report: {root} does not exist")
        files = sorted(root.rglob("*.json")) if root.is_dir() else [root]
        metrics = sorted(root.rglob(METRICS_FILE)) if root.is_dir() else []
        for path in files:
            if path.name != CONFIG_FILE:
                evaluations += _records_in(_read_json(path), path)
        for path in metrics:
            lines = read_metrics(path)
            training += [{**line, "run": path.parent.name} for line in lines]
            evaluations += in_training_records(lines, path.parent)
    return training, evaluations


def in_training_records(lines: list[dict], run: Path) -> list[dict]:
    """The newest in-training evaluation of each kind (eval-clean, eval-10step, ...) in a run's
    ``metrics.jsonl`` lines, as evaluation records of the checkpoint saved after its epoch
    (``RUN/epochN`` if none was logged)."""
    checkpoints = {r.get("epoch"): r["path"] for r in lines if r.get("phase") == "checkpoint"}
    newest = {}
    for line in lines:
        phase = str(line.get("phase", ""))
        if phase.startswith("eval-") and "attack" in line and f"{phase}/top1_error" in line:
            newest[phase] = line
    records = []
    for phase, line in newest.items():
        epoch = line.get("epoch")
        record = {
            "top1_error": line[f"{phase}/top1_error"],
            "top5_error": line[f"{phase}/top5_error"],
            "images": line["images"],
            "attack": line["attack"],
            "threat_model": line["threat_model"],
            "checkpoint": checkpoints.get(epoch, str(run / f"epoch{epoch}")),
            "epoch": epoch,
            "split": "val",
            "defense": line.get("defense"),
        }
        if f"{phase}/attack_success_rate" in line:
            record["attack_success_rate"] = line[f"{phase}/attack_success_rate"]
        records.append(record)
    return records


def training_curves(training: list[dict]) -> dict[str, Curves]:
    """Panel -> {run (and evaluation phase) -> points over steps}."""
    panels: dict[str, Curves] = {name: defaultdict(list) for name, _ in TRAIN_PANELS}
    for r in training:
        for name, _ in TRAIN_PANELS:
            if name in r:
                panels[name][r["run"]].append((r["step"], r[name]))
        for name, words in LOSS_TERMS:  # ALP Sec 3's terms, beside the loss they sum to
            if name in r:
                panels["train/loss"][f"{r['run']} {words}"].append((r["step"], r[name]))
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


def series_words(attack: dict, along: str) -> str:
    """A threat model without the swept setting `along`, in the summary line's words (the
    registry's): "PGD-10 random target, L-inf" (along epsilon), "PGD random target, L-inf
    eps=8" (along iterations)."""
    return attack_words(attack["name"], settings_of_record(attack, along))


def on_axis(attack: dict, along: str) -> bool:
    """Whether the attack's `along` setting can be plotted: an attack with a score-based member
    (AutoAttack's Square, its queries) is not measured in iterations."""
    if along != "iter":
        return along in attack
    info = ATTACKS.get(str(attack.get("name")))
    return along in attack and not (info is not None and info.queries)


def robust_accuracy_curves(evaluations: list[dict], along: str) -> Curves:
    """Accuracy (1 - top-1 error) against the attack's `along` ("iter" or "epsilon"): one
    series per model, split, defense and threat model (every other setting of the record's
    ``attack``), each starting from the model's clean accuracy at 0; a model evaluated only
    clean is one point. An attack with queries (AutoAttack, Square) has no iterations axis."""
    series: dict[tuple, dict[float, float]] = defaultdict(dict)
    words: dict[tuple, str] = {}
    clean: dict[tuple, float] = {}
    for r in evaluations:
        attack, accuracy = _attack(r), 1.0 - r["top1_error"]
        model = (model_name(r), r.get("defense"), r.get("split"))
        if attack.get("name") == "clean":
            clean[model] = accuracy
        elif on_axis(attack, along):
            key = (*model, _settings(attack, along))
            series[key][float(attack[along])] = accuracy
            words[key] = series_words(attack, along)
    for model, accuracy in clean.items():
        mine = [key for key in series if key[:3] == model]
        if not mine:
            mine = [(*model, ())]
            words[mine[0]] = "clean"
        for key in mine:
            series[key][0.0] = accuracy
    return {label: sorted(series[key].items()) for key, label in _labels(words).items()}


def _settings(attack: dict, along: str) -> tuple[tuple[str, str], ...]:
    """The attack's settings but the swept one (and the step that follows from it)."""
    kept = {k: v for k, v in attack.items() if k not in (along, "step_size")}
    return tuple(sorted((k, json.dumps(v)) for k, v in kept.items()))


def _labels(words: dict[tuple, str]) -> dict[tuple, str]:
    """Each series' label: model, attack words, defense, split other than val, and where
    series would share a label, the settings that tell them apart."""
    base = {}
    for key, text in words.items():
        model, defense, split, _ = key
        base[key] = f"{model}: {text}" + (f", defense {defense}" if defense else "")
        base[key] += f", {split} split" if split not in (None, "val") else ""
    labels = {}
    for key, label in base.items():
        group = [dict(k[3]) for k in base if base[k] == label]
        differ = [(n, v) for n, v in key[3] if len({g.get(n) for g in group}) > 1]
        labels[key] = label + "".join(f", {n} {json.loads(v)}" for n, v in differ)
    return labels


def minimal_epsilons(evaluations: list[dict]) -> dict[str, tuple[float, float]]:
    """Per model and threat model, ``(median minimal epsilon, largest epsilon tried)`` of each
    minimal-perturbation evaluation (``details.median_min_epsilon``; inf: most examples were
    not broken within the largest epsilon)."""
    found = {}
    for r in evaluations:
        details = r.get("details") or {}
        if "median_min_epsilon" in details:
            label = f"{model_name(r)}: {r.get('threat_model', '?')}"
            tried = float(_attack(r).get("epsilon", math.inf))
            found[label] = (float(details["median_min_epsilon"]), tried)
    return found


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    return path


def _figure(rows: int, cols: int, size: tuple[float, float] = (6, 4)):
    """A matplotlib figure (no pyplot state: nothing to close) and its axes grid."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError(
            "--report: matplotlib is not installed (pip install -e '.[report]')"
        ) from None
    figure = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def draw_training(panels: dict[str, Curves]):
    """Training curves; every series with markers, so that a one-point series shows."""
    figure, axes = _figure(2, 2)
    terms = tuple(words for _, words in LOSS_TERMS)
    paired = any(label.endswith(terms) for label in panels["train/loss"])
    for ax, (name, title) in zip(axes.flat, TRAIN_PANELS, strict=True):
        for label, points in sorted(panels[name].items()):
            ax.plot(*zip(*points, strict=True), marker="o", markersize=5, label=label)
        if name == "train/loss" and paired:  # only a --lp-weight run logs the two terms
            title += " and its two terms (--lp-weight)"
        ax.set(title=title, xlabel="step")
        if panels[name]:
            ax.legend(fontsize="small")
    return figure


def draw_curves(curves: Curves, xlabel: str):
    """Accuracy against `xlabel`, one labelled series per series of ``robust_accuracy_curves``:
    a line along a real sweep (two or more attacked points), only markers where a series has
    its clean point and one attack point (a line would read as a trend). A series with the
    same points as another says so in the legend, and its markers are drawn larger."""
    figure, axes = _figure(1, 1, (9, 5))
    ax = axes[0, 0]
    first_with: dict[tuple, str] = {}
    for i, (label, points) in enumerate(sorted(curves.items())):
        # Hollow markers of different shapes and line styles: coinciding series stay visible.
        swept = sum(1 for x, _ in points if x != 0) >= 2
        style = {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINES[i % len(LINES)]}
        if not swept:
            style["linestyle"] = "none"
        same = first_with.setdefault(tuple(points), label)
        if same != label:
            label = f"{label} (same points as {same})"
            style["markersize"] = 10
        ax.plot(*zip(*points, strict=True), **style, fillstyle="none", label=label)
    ax.set(xlabel=xlabel, ylabel="accuracy (1 - top-1 error)", ylim=(-0.03, 1.05))
    ax.set_title(f"accuracy against {xlabel} (lines: sweeps; markers: one evaluation)")
    if curves:  # below the axes: long threat-model labels never cover the points
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.12))
    return figure


def draw_minimal(values: dict[str, tuple[float, float]]):
    """One bar per minimal-perturbation evaluation, its label above it: its median minimal
    epsilon (a bar to the largest epsilon tried, marked "> eps", where the median example was
    not broken)."""
    figure, axes = _figure(1, 1, (9, 1.2 + 0.8 * len(values)))
    ax = axes[0, 0]
    widths = []
    for row, label in enumerate(sorted(values, reverse=True)):  # the first label on top
        median, tried = values[label]
        widths.append(median if math.isfinite(median) else tried)
        ax.barh(row, widths[-1], height=0.4)
        ax.text(0, row + 0.25, label, va="bottom", fontsize="small")
        value = f"{median:g}" if math.isfinite(median) else f"> {tried:g}"
        ax.annotate(value, (widths[-1], row), xytext=(3, 0), textcoords="offset points")
    ax.set_yticks([])
    ax.set(xlim=(0, 1.15 * max(widths)), ylim=(-0.5, len(values) - 0.1))
    ax.set(xlabel="median minimal epsilon (pixels)", title="minimal-perturbation evaluations")
    return figure


def _cell(record: dict | None, with_success: bool = True) -> str:
    if record is None:
        return "–"
    error = f"{100 * record['top1_error']:.1f}"
    if with_success and "attack_success_rate" in record:
        return f"{error} / {100 * record['attack_success_rate']:.1f}"
    return error


def zoo_table(evaluations: list[dict]) -> str:
    """The original's model-zoo table, all in top-1 error (percent), as the paper reports it:
    clean; targeted PGD-10/100 with its attack success rate; untargeted PGD-100; the highest
    error under any recorded attack (the strongest attack's)."""
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
        "error / success | PGD-100 untargeted error | highest error under attack (attack) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, records in sorted(by_model.items()):
        attacked = [r for r in records if _attack(r).get("name") != "clean"]
        worst = max(attacked, key=lambda r: r["top1_error"], default=None)
        strongest = (
            "–"
            if worst is None
            else (f"{100 * worst['top1_error']:.1f} ({worst.get('threat_model', '?')})")
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
    out = _output_folder(Path(out))
    training, evaluations = collect(paths)
    if not training and not evaluations:
        raise ValueError("--report: no metrics.jsonl and no evaluation records found")
    try:
        return _write_all(training, evaluations, out)
    except OSError as e:
        raise ValueError(f"--report: cannot write in --out {out}: {e}") from None


def _output_folder(out: Path) -> Path:
    """`out`, created if missing, once a file can be created in it (checked before any work:
    a file, ``/proc/...`` or a read-only folder is one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--report: --out {out} is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--report: cannot write in --out {out}: {e.strerror or e}") from None
    return out


def _write_all(training: list[dict], evaluations: list[dict], out: Path) -> list[Path]:
    written = []
    if training:
        written.append(_save(draw_training(training_curves(training)), out / "training.png"))
    if evaluations:
        for along, name, xlabel in (
            ("iter", "accuracy_vs_iterations.png", "attack iterations"),
            ("epsilon", "accuracy_vs_epsilon.png", "epsilon (pixels)"),
        ):
            figure = draw_curves(robust_accuracy_curves(evaluations, along), xlabel)
            written.append(_save(figure, out / name))
        if minimal := minimal_epsilons(evaluations):
            written.append(_save(draw_minimal(minimal), out / "minimal_epsilon.png"))
        written.append(atomic_write_text(out / "report.md", zoo_table(evaluations)))
    return written
