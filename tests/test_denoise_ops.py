"""Denoising operations (Feature Denoising Sec 4.1): each op against a reference written here
(loops over window offsets or positions, einsum), forward and input gradients; their blocks,
checkpoint names, one training step per op, and the op through flags, config and checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nets
from adv_model import PGDAttacker
from iat import builders
from iat.config import Config
from iat.train import builders as train_builders
from iat.train.trainer import LossSettings, train_step
from main import main

TINY = ["--num-blocks", "1", "1", "1", "1", "--width", "8"]
NEW_OPS = ["gaussian", "bilateral", "mean", "median"]


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- references: offsets of the window, written without unfold ---


def _offsets(window: int) -> list[tuple[int, int]]:
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def _shifted(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x at (i + dy, j + dx) for every (i, j), and whether that position is inside the map."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    inside = torch.zeros(h, w, dtype=torch.bool)
    rows = slice(max(0, -dy), min(h, h - dy))
    cols = slice(max(0, -dx), min(w, w - dx))
    src_rows = slice(rows.start + dy, rows.stop + dy)
    src_cols = slice(cols.start + dx, cols.stop + dx)
    out[..., rows, cols] = x[..., src_rows, src_cols]
    inside[rows, cols] = True
    return out, inside


def _reference_gaussian(x: torch.Tensor) -> torch.Tensor:
    """Eqn. (1) with f = exp(x_i . x_j / sqrt(C)), normalised over all positions j."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    affinity = torch.einsum("nci,ncj->nij", flat, flat) / math.sqrt(c)
    weights = affinity.exp() / affinity.exp().sum(dim=2, keepdim=True)
    return torch.einsum("nij,ncj->nci", weights, flat).reshape(n, c, h, w)


def _reference_bilateral(theta, phi, g, window: int) -> torch.Tensor:
    """Eqn. (2): Eqn. (1)'s embedded Gaussian weights over the window's positions in the map."""
    scores, values = [], []
    for dy, dx in _offsets(window):
        phi_q, inside = _shifted(phi, dy, dx)
        g_q, _ = _shifted(g, dy, dx)
        score = (theta * phi_q).sum(dim=1) / math.sqrt(theta.shape[1])
        scores.append(torch.where(inside, score, torch.full_like(score, -math.inf)))
        values.append(g_q)
    weights = torch.stack(scores).exp()
    weights = weights / weights.sum(dim=0)
    return sum(weights[k][:, None] * values[k] for k in range(len(values)))


def _reference_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    total, count = torch.zeros_like(x), torch.zeros(x.shape[-2:], dtype=x.dtype)
    for dy, dx in _offsets(window):
        shifted, inside = _shifted(x, dy, dx)
        total, count = total + shifted, count + inside
    return total / count


def _reference_median(x: torch.Tensor, window: int) -> torch.Tensor:
    """Per position: sort the window's values inside the map, take the lower middle one."""
    h, w = x.shape[-2:]
    r = window // 2
    rows = []
    for i in range(h):
        row = []
        for j in range(w):
            patch = x[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].flatten(2)
            ordered = patch.sort(dim=2).values
            row.append(ordered[:, :, (ordered.shape[2] - 1) // 2])
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)


# --- ops against references, forward and backward ---


def _assert_same_with_gradients(op, reference, inputs: list[torch.Tensor], seed: int) -> None:
    """Outputs equal, and so do the gradients of <output, random> with respect to every input."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    copies = [t.clone().requires_grad_(True) for t in inputs]
    actual, expected = op(*leaves), reference(*copies)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    upstream = _random(*actual.shape, seed=seed)
    got = torch.autograd.grad((actual * upstream).sum(), leaves)
    want = torch.autograd.grad((expected * upstream).sum(), copies)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (1, 3, 1, 1)])
def test_gaussian_equals_reference(shape):
    x = _random(*shape, seed=1)
    op = nets.DENOISE_OPS["gaussian"]
    assert not op.embed and not op.local
    _assert_same_with_gradients(lambda x: op.means(x, x, x, 3), _reference_gaussian, [x], seed=2)


@pytest.mark.parametrize(
    ("window", "shape"), [(3, (2, 5, 4, 6)), (5, (1, 3, 6, 5)), (3, (1, 2, 1, 2))]
)
def test_bilateral_equals_reference(window, shape):
    n, c, h, w = shape
    theta, phi, g = (
        _random(n, 4, h, w, seed=3),
        _random(n, 4, h, w, seed=4),
        _random(*shape, seed=5),
    )
    _assert_same_with_gradients(
        lambda t, p, v: nets.bilateral_filter(t, p, v, window),
        lambda t, p, v: _reference_bilateral(t, p, v, window),
        [theta, phi, g],
        seed=6,
    )


@pytest.mark.parametrize(
    ("window", "shape"), [(3, (2, 3, 5, 6)), (5, (1, 2, 7, 4)), (3, (1, 1, 1, 3))]
)
def test_mean_filter_equals_reference(window, shape):
    _assert_same_with_gradients(
        lambda x: nets.mean_filter(x, window),
        lambda x: _reference_mean(x, window),
        [_random(*shape, seed=7)],
        seed=8,
    )


@pytest.mark.parametrize(
    ("window", "shape"), [(3, (2, 3, 5, 6)), (5, (1, 2, 6, 7)), (3, (1, 1, 2, 2))]
)
def test_median_filter_equals_reference(window, shape):
    _assert_same_with_gradients(
        lambda x: nets.median_filter(x, window),
        lambda x: _reference_median(x, window),
        [_random(*shape, seed=9)],
        seed=10,
    )


def test_median_gradient_reaches_only_the_selected_element():
    x = _random(1, 1, 5, 5, seed=11).requires_grad_(True)
    out = nets.median_filter(x, 3)
    (grad,) = torch.autograd.grad(out[0, 0, 2, 2], x)
    selected = (x[0, 0, 1:4, 1:4] == out[0, 0, 2, 2]).nonzero()[0] + 1
    expected = torch.zeros_like(x)
    expected[0, 0, selected[0], selected[1]] = 1.0
    assert torch.equal(grad, expected)


def test_median_removes_an_outlier_the_mean_spreads():
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = 100.0  # Feature Denoising Sec 4.1: median filters remove salt-and-pepper noise
    assert not nets.median_filter(x, 3).any()
    assert (nets.mean_filter(x, 3)[0, 0, 1:4, 1:4] == 100.0 / 9).all()


# --- blocks: wiring, names, errors ---


@pytest.mark.parametrize("op", NEW_OPS)
def test_block_is_residual_conv_bn_of_the_op(op):
    block = nets.DenoisingBlock(8, op).double().eval()
    x = _random(2, 8, 5, 4, seed=12)
    assert torch.equal(block(x), x)  # zero-initialised BN gamma: the block starts as identity
    bn = block.conv.bn
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(_random(8, seed=13))
        references = {
            "gaussian": lambda: _reference_gaussian(x),
            "bilateral": lambda: _reference_bilateral(
                block.embedding_theta(x), block.embedding_phi(x), x, 3
            ),
            "mean": lambda: _reference_mean(x, 3),
            "median": lambda: _reference_median(x, 3),
        }
        f = references[op]()
        y = F.batch_norm(F.conv2d(f, block.conv.weight), bn.running_mean, bn.running_var,
                         bn.weight, bn.bias, eps=bn.eps)  # fmt: skip
        torch.testing.assert_close(block(x), x + y, rtol=1e-10, atol=1e-10)


def test_checkpoint_names_keep_the_originals_and_drop_missing_embeddings():
    def names(arch: str, op: str | None) -> set[str]:
        with torch.device("meta"):
            model = nets.build_model(arch, num_blocks=[1, 1, 1, 1], width=32, denoise_op=op)
        return set(nets.npz_variable_shapes(model))

    for arch in ("ResNetDenoise", "ResNeXtDenoiseAll"):
        original = names(arch, None)
        assert names(arch, nets.DEFAULT_DENOISE_OPS[arch]) == original
        plain = original - _embedding_names(original)
        for op in NEW_OPS:
            embed = nets.DENOISE_OPS[op].embed
            assert names(arch, op) == (plain | _embedding_names(plain) if embed else plain), op
    assert "group3_denoise/embedding_phi/W" in names("ResNetDenoise", None)
    assert not any("embedding" in n for n in names("ResNeXtDenoiseAll", None))


def _embedding_names(names: set[str]) -> set[str]:
    """The embedding convs that the denoising blocks among `names` have when they embed."""
    ends = ("_denoise/conv/W", "non_local/conv/W")
    blocks = {n.removesuffix("/conv/W") for n in names if n.endswith(ends)}
    return {f"{b}/embedding_{e}/W" for b in blocks for e in ("theta", "phi")}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "ResNet", "denoise_op": "median"}, "ResNet has no denoising blocks"),
        ({"arch": "ResNetDenoise", "denoise_op": "wiener"}, "'wiener'.*bilateral, dot_product"),
        ({"arch": "ResNetDenoise", "denoise_op": "median", "denoise_window": 4}, "odd size, got 4"),
        ({"arch": "ResNetDenoise", "denoise_window": 5}, "non-local op 'embedded_gaussian'"),
    ],
)
def test_bad_denoise_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nets.build_model(num_blocks=[1, 1, 1, 1], width=8, **kwargs)


def test_window_sets_the_local_ops_neighbourhood():
    model = nets.build_model(
        "ResNeXtDenoiseAll", num_blocks=[1, 1, 1, 1], width=8, denoise_op="median", denoise_window=5
    )
    blocks = [m for m in model.modules() if isinstance(m, nets.DenoisingBlock)]
    assert len(blocks) == 4 and all((b.op, b.window) == ("median", 5) for b in blocks)


# --- one training step per new op ---


@pytest.mark.parametrize("arch", ["ResNetDenoise", "ResNeXtDenoiseAll"])
@pytest.mark.parametrize("op", NEW_OPS)
def test_every_new_op_trains_one_step(arch, op):
    torch.manual_seed(0)
    cfg = Config(fake=True, arch=arch, num_blocks=(1, 1, 1, 1), width=8, denoise_op=op)
    model = builders.build_model(cfg, 5, torch.device("cpu"))
    for block in (m for m in model.modules() if isinstance(m, nets.DenoisingBlock)):
        torch.nn.init.normal_(block.conv.bn.weight)  # let gradients reach the op's inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = train_builders.build_optimizer(model, cfg)
    attacker = PGDAttacker(1, 8.0, 4.0, num_classes=5)
    images, labels = torch.rand(4, 3, 16, 16) * 255, torch.arange(4) % 5
    result = train_step(model, model, attacker, optimizer, [(images, labels)], LossSettings(0.1))
    assert math.isfinite(result.loss.item())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    denoise_weights = {
        k for k in before if ("_denoise." in k or "non_local." in k) and "conv.weight" in k
    }
    assert denoise_weights and denoise_weights <= changed


# --- the op through flags, config.json, the checkpoint's record and --eval ---


def test_denoise_op_is_recorded_and_restored_by_eval(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    common = ["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers", "0"]
    train = [*common, "--loader", "local", "--logdir", str(logdir), *TINY, "--epochs", "1",
             "--steps-per-epoch", "1", "--attack-iter", "1", "--train-eval", "none"]  # fmt: skip
    assert main([*train, "--arch", "ResNetDenoise", "--denoise-op", "median"]) == 0
    config = json.loads((logdir / "config.json").read_text())["config"]
    assert (config["denoise_op"], config["denoise_window"]) == ("median", 3)
    ckpt = logdir / "checkpoint-epoch0001.pt"
    record = torch.load(ckpt, weights_only=True)[nets.ARCHITECTURE_KEY]
    assert (record["arch"], record["denoise_op"], record["denoise_window"]) == (
        "ResNetDenoise", "median", 3,
    )  # fmt: skip

    cfg = Config(mode="eval", data="x", load=str(ckpt), explicit_model_fields=())
    model, resolved = builders.load_for_inference(cfg, torch.device("cpu"))
    assert (resolved.arch, resolved.denoise_op) == ("ResNetDenoise", "median")
    assert model.group0_denoise.op == "median"

    evaluate = ["--eval", *common, "--load", str(ckpt), "--attack-iter", "0"]
    capsys.readouterr()
    assert main([*evaluate, "--denoise-op", "embedded_gaussian"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--denoise-op embedded_gaussian" in line and "denoising median 3x3" in line
    assert main(evaluate) == 0


def test_old_records_without_denoise_keys_mean_the_original_op(tmp_path: Path):
    model = nets.build_model("ResNetDenoise", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    record = {"arch": "ResNetDenoise", "depth": None, "num_blocks": [1, 1, 1, 1], "width": 8,
              "num_classes": 3}  # fmt: skip
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), nets.ARCHITECTURE_KEY: record}, path)
    cfg = Config(mode="eval", data="x", load=str(path), explicit_model_fields=())
    loaded, resolved = builders.load_for_inference(cfg, torch.device("cpu"))
    assert resolved.denoise_op is None and loaded.group0_denoise.op == "embedded_gaussian"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "ResNet", "--denoise-op", "mean"], "--denoise-op: ResNet has no denoising"),
        (["--arch", "ResNetDenoise", "--denoise-op", "mean", "--denoise-window", "2"], "odd"),
        (["--arch", "ResNetDenoise", "--denoise-op", "bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_denoise_flags_are_one_line(argv, message, tmp_path, capsys):
    assert main(["--fake", "--logdir", str(tmp_path / "run"), *TINY, *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
