"""The sparse-coding frontend: top-T and the threshold against references, the encoder against
unfold + einsum, BPDA's backward against the identity's, dictionary learning, and the digits
end to end (Python, then the commands of README "Sparse-coding frontend")."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_model import DigitsNet, digits_tensors

import nets
from adv_model import PGDAttacker
from iat.builders import architecture_record, load_for_inference
from iat.config import Config
from iat.defenses import sparse_frontend as sf
from iat.eval.evaluate import attack_images
from main import main

PATCH, STRIDE = 4, 2


def _unit_atoms(count: int, patch: int, seed: int) -> torch.Tensor:
    atoms = torch.randn(count, 3, patch, patch, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.flatten(1).norm(dim=1)[:, None, None, None]


def _spec(atoms: torch.Tensor, top_t: int, threshold: float, hidden: int = 8) -> sf.FrontendSpec:
    return sf.FrontendSpec(len(atoms), atoms.shape[-1], STRIDE, top_t, threshold, hidden)


# --- top-T, the threshold and the encoder against references ---


@pytest.mark.parametrize("top_t", [1, 3, 7, 12])
def test_top_t_keeps_exactly_t_largest_magnitudes_per_location(top_t):
    c = torch.randn(2, 12, 5, 4, generator=torch.Generator().manual_seed(top_t))
    kept = sf.keep_top_t(c, top_t)
    assert ((kept != 0).sum(dim=1) == top_t).all()
    # Reference: per location, the T largest |c| by a sort, every other one zero.
    order = c.abs().argsort(dim=1, descending=True)
    expected = torch.zeros_like(c).scatter(1, order[:, :top_t], c.gather(1, order[:, :top_t]))
    assert torch.equal(kept, expected)


def test_activation_zeroes_below_threshold_times_l1_and_quantises_the_rest():
    l1 = torch.tensor([1.0, 2.0, 4.0])  # atom k survives iff |c| > 2 * l1[k] (strictly)
    c = torch.tensor([[0.5, -3.0, 2.5], [-1.5, 4.0, 4.5], [9.0, -8.0, -8.5]])  # [atom, location]
    expected = torch.tensor([[0.0, -1.0, 1.0], [0.0, 0.0, 2.0], [4.0, 0.0, -4.0]])
    assert torch.equal(sf.activation(c[None, :, :, None], l1, threshold=2.0)[0, :, :, 0], expected)


def test_encoder_equals_an_unfold_einsum_reference():
    atoms = _unit_atoms(10, PATCH, seed=1)
    top_t, threshold = 4, 3.0
    encoder = sf.SparseEncoder(atoms, STRIDE, top_t, threshold)
    x = torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(2)) * 255
    patches = F.unfold(x, PATCH, stride=STRIDE)  # [N, 3*p*p, L]
    rows, cols = (13 - PATCH) // STRIDE + 1, (11 - PATCH) // STRIDE + 1
    correlation = torch.einsum("kd,ndl->nkl", atoms.flatten(1), patches).reshape(2, 10, rows, cols)
    torch.testing.assert_close(encoder.conv(x), correlation, rtol=1e-5, atol=1e-3)
    l1 = atoms.abs().flatten(1).sum(1)[None, :, None, None]
    ranks = correlation.abs().argsort(dim=1, descending=True).argsort(dim=1)
    kept = (ranks < top_t) & (correlation.abs() > threshold * l1)
    expected = torch.where(kept, correlation.sign() * l1, torch.zeros_like(correlation))
    assert torch.equal(encoder(x), expected)
    assert ((encoder(x) != 0).sum(dim=1) <= top_t).all()


def test_bpda_backward_equals_the_identitys_and_plain_autograd_is_masked():
    atoms = _unit_atoms(10, PATCH, seed=3)
    torch.manual_seed(0)
    frontend = sf.SparseFrontend(atoms, _spec(atoms, top_t=3, threshold=1.0))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 5))
    model = sf.FrontendClassifier(frontend, classifier)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4)) * 255
    labels = torch.tensor([1, 4])

    def input_gradient(through: torch.nn.Module) -> torch.Tensor:
        at = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(through(at), labels), at)
        return grad

    # Reference: the gradient at the real sparse code, taken back through the correlation as
    # if the selection were the identity (the correlation's adjoint: a transposed conv).
    code = frontend.encoder(x).requires_grad_(True)
    loss = F.cross_entropy(classifier(frontend.decoder(code, x.shape[-2:])), labels)
    (code_grad,) = torch.autograd.grad(loss, code)
    expected = F.conv_transpose2d(code_grad, atoms, stride=STRIDE)
    bpda = input_gradient(model.attack_view())
    torch.testing.assert_close(bpda, expected, rtol=1e-4, atol=1e-6)
    assert bpda.abs().sum() > 0
    assert not input_gradient(model).any()  # the real top-T + activation: zero gradient
    with torch.no_grad():
        assert torch.equal(model.attack_view()(x), model(x))  # BPDA's forward is the real one
    masked = sf.FrontendClassifier(frontend, classifier, attack_gradient="autograd")
    assert masked.attack_view() is masked


def test_learned_dictionary_is_unit_norm_zero_mean_after_the_dc_atom():
    images, _ = digits_tensors()
    atoms = sf.learn_dictionary(images[:200], atoms=12, patch_size=PATCH, stride=STRIDE, epochs=1)
    assert atoms.shape == (13, 3, PATCH, PATCH)
    torch.testing.assert_close(atoms.flatten(1).norm(dim=1), torch.ones(13))
    assert torch.allclose(atoms[0], sf.dc_atom(PATCH))
    assert atoms[1:].flatten(1).mean(dim=1).abs().max() < 1e-3  # learned from zero-mean patches


# --- the digits behind a frozen frontend: BPDA vs the masked gradient ---


@pytest.fixture(scope="module")
def defended_digits() -> dict:
    """DigitsNet trained behind a frozen frontend learned on 1500 digits (297 held out)."""
    images, labels = digits_tensors()
    train_x, train_y = images[:1500], labels[:1500]
    atoms = sf.learn_dictionary(
        train_x, atoms=32, patch_size=PATCH, stride=STRIDE, epochs=1, max_patches=8000
    )
    torch.manual_seed(0)
    frontend = sf.SparseFrontend(atoms, _spec(atoms, top_t=8, threshold=24.0, hidden=16))
    generator = torch.Generator().manual_seed(0)
    batches = list(train_x[torch.randperm(1500, generator=generator)].split(64))
    sf.train_decoder(frontend, batches, epochs=1, lr=3e-3, device=torch.device("cpu"))
    model = sf.FrontendClassifier(frontend, DigitsNet())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.classifier.parameters()))  # the frontend is frozen
    with torch.no_grad():  # frozen: its outputs are fixed, computed once for the 80 steps
        reconstructed = frontend(train_x)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(80):
        idx = torch.randint(0, 1500, (64,), generator=generator)
        loss = F.cross_entropy(model.classifier(reconstructed[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"model": model.eval(), "x": images[1500:1620], "y": labels[1500:1620]}


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_bpda_evaluation_breaks_what_the_masked_gradient_cannot(defended_digits):
    model, x, y = defended_digits["model"], defended_digits["x"], defended_digits["y"]
    attacker = PGDAttacker(10, 32.0, 4.0, target=None)  # eps 32, as test_defenses' JPEG

    def robust(attack_gradient: str) -> float:
        model.attack_gradient = attack_gradient
        adv, _ = attack_images(model, attacker, x, y, torch.Generator().manual_seed(0))
        return _accuracy(model, adv, y)

    clean = _accuracy(model, x, y)
    masked, bpda = robust("autograd"), robust("bpda")
    model.attack_gradient = "bpda"
    # Measured: clean 0.96, masked PGD-10 0.96 (only the random start moves anything), BPDA
    # PGD-10 0.45.
    assert clean > 0.85 and masked > 0.85 and bpda < masked - 0.3, (clean, masked, bpda)
    print(f"clean {clean:.3f}, masked PGD-10 {masked:.3f}, BPDA PGD-10 {bpda:.3f}")


def test_frontend_file_round_trip(defended_digits, tmp_path):
    frontend = defended_digits["model"].frontend
    sf.save_frontend(tmp_path / "frontend.npz", frontend)
    loaded = sf.load_frontend(tmp_path / "frontend.npz")
    assert loaded.spec == frontend.spec
    x = defended_digits["x"][:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), frontend(x))
    with zipfile.ZipFile(tmp_path / "frontend.npz") as archive:
        assert not any(np.load(archive.open(n)).dtype.hasobject for n in archive.namelist())


# --- the commands of README "Sparse-coding frontend" on a digits folder ---


def _write_digits(root: Path, train: int, val: int) -> Path:
    images, labels = digits_tensors()
    for split, indices in (("train", range(train)), ("val", range(1500, 1500 + val))):
        for i in indices:
            folder = root / split / f"n{int(labels[i]):05d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = images[i].permute(1, 2, 0).round().to(torch.uint8).numpy()
            assert cv2.imwrite(str(folder / f"{i:04d}.png"), pixels)
    return root


def _robust_accuracy(path: Path) -> float:
    return json.loads(path.read_text())["robust_accuracy"]


def test_commands_learn_train_classify_and_evaluate(tmp_path, capsys):
    data = _write_digits(tmp_path / "digits", train=400, val=60)
    dictionary, frontend = tmp_path / "dict.npz", tmp_path / "frontend.npz"
    size = ["--data", str(data), "--image-size", "16"]
    assert sf.main(["learn", *size, "--dict-atoms", "16", "--patch-size", "4", "--stride", "2",
                    "--epochs", "1", "--out", str(dictionary)]) == 0  # fmt: skip
    assert sf.main(["train", "--dictionary", str(dictionary), *size, "--top-t", "4",
                    "--hidden", "16", "--epochs", "1", "--out", str(frontend)]) == 0  # fmt: skip
    logdir = tmp_path / "run"
    common = [*size, "--batch", "20", "--workers", "0", "--arch", "ResNetBasic",
              "--num-blocks", "1", "1", "1", "1", "--width", "8"]  # fmt: skip
    assert main([*common, "--loader", "local", "--logdir", str(logdir), "--epochs", "1",
                 "--steps-per-epoch", "6", "--attack-iter", "0", "--train-eval", "none",
                 "--frontend", str(frontend), "--frontend-trainable"]) == 0  # fmt: skip
    recorded = json.loads((logdir / "config.json").read_text())["config"]
    assert recorded["frontend"] == str(frontend) and recorded["frontend_trainable"]
    ckpt = logdir / "checkpoint-epoch0001.pt"
    saved = torch.load(ckpt, weights_only=True)
    spec = sf.load_frontend(frontend).spec
    assert saved[nets.ARCHITECTURE_KEY]["frontend"] == spec.record()
    assert not torch.equal(  # trainable: the decoder moved
        saved["model"]["frontend.decoder.conv.weight"],
        sf.load_frontend(frontend).decoder.conv.weight,
    )

    # The checkpoint reloads with its frontend: the logits of the parts assembled by hand.
    cfg = Config(mode="eval", load=str(ckpt), data=str(data), image_size=16,
                 explicit_model_fields=())  # fmt: skip
    model, cfg = load_for_inference(cfg, torch.device("cpu"))
    assert cfg.frontend == str(ckpt) and sf.frontend_spec(model) == spec
    parts = sf.empty_frontend(spec)
    parts.load_state_dict({k[9:]: v for k, v in saved["model"].items() if k[:9] == "frontend."})
    classifier = nets.build_model("ResNetBasic", num_blocks=[1] * 4, width=8, num_classes=10)
    classifier.load_state_dict({k[11:]: v for k, v in saved["model"].items() if k[:11] == "classi"
                                "fier."})  # fmt: skip
    x = digits_tensors()[0][1500:1510]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), classifier.eval()(parts(x)))

    evaluate = ["--eval", *common, "--load", str(ckpt), "--attack-iter", "5", "--attack-target",
                "none", "--attack-epsilon", "32", "--attack-step-size", "8"]  # fmt: skip
    capsys.readouterr()
    assert main([*evaluate, "--eval-output", str(tmp_path / "bpda.json")]) == 0
    assert main([*evaluate, "--eval-output", str(tmp_path / "masked.json"),
                 "--frontend-gradient", "autograd"]) == 0  # fmt: skip
    bpda_line, masked_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert bpda_line.startswith(
        "PGD-5 untargeted, L-inf eps=32, step 8, sparse-coding frontend, attacked through BPDA "
        "(identity backward) for its top-T and threshold: 60 images"
    )
    assert "plain autograd (gradient-masked" in masked_line
    bpda, masked = (
        _robust_accuracy(tmp_path / "bpda.json"),
        _robust_accuracy(tmp_path / "masked.json"),
    )
    assert bpda <= masked, (bpda, masked)
    print(f"{bpda_line}\n{masked_line}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip file", "unreadable .npz"),
        (None, "not a frontend file (no atoms, stride, top_t, threshold)"),
    ],
)
def test_a_corrupt_frontend_file_is_one_error_line(content, message, tmp_path, capsys):
    bad = tmp_path / "frontend.npz"
    if content is None:
        np.savez(bad, something=np.zeros(3))
    else:
        bad.write_bytes(content)
    args = ["--fake", "--logdir", str(tmp_path / "run"), "--arch", "ResNetBasic",
            "--num-blocks", "1", "1", "1", "1", "--width", "8", "--frontend", str(bad)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    assert sf.main(["train", "--dictionary", str(bad), "--data", str(tmp_path), "--out",
                    str(tmp_path / "x.npz")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_frontend_record_that_lies_about_its_size_is_refused(tmp_path):
    atoms = _unit_atoms(5, PATCH, seed=6)
    spec = _spec(atoms, top_t=2, threshold=1.0)
    classifier = nets.build_model("ResNetBasic", num_blocks=[1] * 4, width=4, num_classes=3)
    model = sf.FrontendClassifier(sf.SparseFrontend(atoms, spec), classifier)
    resnet = Config(arch="ResNetBasic", num_blocks=(1,) * 4, width=4, fake=True)
    record = architecture_record(resnet, 3)
    lying = {**spec.record(), "atoms": 10**9}  # would allocate terabytes if believed
    path = tmp_path / "lying.pt"
    state = {"model": model.state_dict(), nets.ARCHITECTURE_KEY: {**record, "frontend": lying}}
    torch.save(state, path)
    cfg = Config(mode="eval", load=str(path), data=str(tmp_path), explicit_model_fields=())
    with pytest.raises(nets.CheckpointError, match="frontend record .* does not match"):
        load_for_inference(cfg, torch.device("cpu"))
    state[nets.ARCHITECTURE_KEY]["frontend"] = spec.record()
    torch.save(state, path)
    loaded, _ = load_for_inference(cfg, torch.device("cpu"))
    x = torch.rand(2, 3, 16, 16) * 255
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_frontend_trainable_needs_a_frontend(tmp_path, capsys):
    assert main(["--fake", "--logdir", str(tmp_path / "run"), "--frontend-trainable"]) == 1
    assert "--frontend-trainable: needs --frontend FILE" in capsys.readouterr().err


def test_architecture_words_name_the_frontend():
    record = {"arch": "ResNet", "num_blocks": [1, 1, 1, 1], "width": 8, "num_classes": 3}
    assert nets.describe_architecture(record) == "ResNet (blocks 1 1 1 1, width 8, 3 classes)"
    with_frontend = {**record, "frontend": {"atoms": 9}}
    assert nets.describe_architecture(with_frontend) == (
        "ResNet (blocks 1 1 1 1, width 8, 3 classes), behind a sparse-coding frontend"
    )


def test_finetuning_behind_a_frontend_scopes_the_classifier(tiny_imagenet, tmp_path, capsys):
    """--frontend with --finetune-checkpoint of plain classifier weights: the weights fill the
    classifier behind the frontend, the scopes are the classifier's own names, and the frozen
    frontend stays as its file has it."""
    from main import main

    atoms = _unit_atoms(9, PATCH, seed=5)
    frontend = sf.SparseFrontend(atoms, _spec(atoms, top_t=3, threshold=1.0))
    sf.save_frontend(tmp_path / "frontend.npz", frontend)
    torch.manual_seed(0)
    donor = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=7)
    nets.save_weights(donor, tmp_path / "donor.pt")
    logdir = tmp_path / "run"
    args = ["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers",
            "0", "--loader", "local", "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1",
            "--width", "8", "--epochs", "1", "--steps-per-epoch", "2", "--attack-iter", "1",
            "--train-eval", "none", "--logdir", str(logdir), "--frontend",
            str(tmp_path / "frontend.npz"), "--finetune-checkpoint", str(tmp_path / "donor.pt"),
            "--finetune-exclude-scopes", "linear", "--finetune-trainable-scopes",
            "linear"]  # fmt: skip
    assert main(args) == 0
    state = torch.load(logdir / "checkpoint-epoch0001.pt", weights_only=True)["model"]
    for key, value in donor.state_dict().items():
        trained = state[f"classifier.{key}"]
        if key.startswith("linear."):
            assert trained.shape[0] == 3  # the data's 3 classes, freshly initialised
        elif key.endswith(("weight", "bias")) and "bn" not in key:
            assert torch.equal(trained, value), key  # loaded, and frozen
    for key, value in frontend.state_dict().items():
        assert torch.equal(state[f"frontend.{key}"], value), key

    # From a checkpoint that carries its own frontend: the whole model is filled, and the
    # scopes still name the classifier's tensors.
    again = tmp_path / "again"
    first = logdir / "checkpoint-epoch0001.pt"
    rest = args[: args.index("--finetune-checkpoint")]
    rest[rest.index("--logdir") + 1] = str(again)
    assert main([*rest, "--finetune-checkpoint", str(first),
                 "--finetune-exclude-scopes", "linear", "--finetune-trainable-scopes",
                 "linear"]) == 0  # fmt: skip
    second = torch.load(again / "checkpoint-epoch0001.pt", weights_only=True)["model"]
    for key, value in state.items():
        if key.startswith("classifier.linear."):
            assert not torch.equal(second[key], value), key  # initialised afresh, trained
        elif key.startswith("frontend.") or (key.endswith(("weight", "bias")) and "bn" not in key):
            assert torch.equal(second[key], value), key
    # A frontend file with other settings than the checkpoint's: one line, not a mixture.
    other = sf.SparseFrontend(atoms, _spec(atoms, top_t=2, threshold=1.0))
    sf.save_frontend(tmp_path / "other.npz", other)
    mixed = [
        str(tmp_path / "other.npz") if a == str(tmp_path / "frontend.npz") else a for a in rest
    ]
    mixed[mixed.index("--logdir") + 1] = str(tmp_path / "mixed")
    capsys.readouterr()
    assert main([*mixed, "--finetune-checkpoint", str(first)]) == 1
    assert "top-3" in capsys.readouterr().err
    bare = [a for a in rest if a != str(tmp_path / "frontend.npz") and a != "--frontend"]
    bare[bare.index("--logdir") + 1] = str(tmp_path / "bare")
    capsys.readouterr()
    assert main([*bare, "--finetune-checkpoint", str(first)]) == 1
    assert "carries a sparse-coding frontend; give --frontend FILE" in capsys.readouterr().err


def test_sampled_patches_are_rows_of_the_full_extraction():
    images = torch.rand(3, 3, 12, 13, generator=torch.Generator().manual_seed(2)) * 255
    sampled = sf.sample_patches(images, PATCH, STRIDE, 5, torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    locations = ((12 - PATCH) // STRIDE + 1) * ((13 - PATCH) // STRIDE + 1)
    expected = [
        sf.extract_patches(images[i : i + 1], PATCH, STRIDE)[
            torch.randperm(locations, generator=draws)[:5]
        ]
        for i in range(3)
    ]
    assert torch.equal(sampled, torch.cat(expected))


def test_resuming_with_another_frontend_trainable_names_the_flag(tiny_imagenet, tmp_path, capsys):
    from main import main

    atoms = _unit_atoms(9, PATCH, seed=5)
    sf.save_frontend(tmp_path / "fe.npz", sf.SparseFrontend(atoms, _spec(atoms, 3, 1.0)))
    args = ["--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers",
            "0", "--loader", "local", "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1",
            "--width", "8", "--steps-per-epoch", "1", "--attack-iter", "1", "--train-eval",
            "none", "--logdir", str(tmp_path / "run"),
            "--frontend", str(tmp_path / "fe.npz")]  # fmt: skip
    assert main([*args, "--frontend-trainable", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frontend-trainable" in err


def test_activations_behind_a_frontend_go_by_the_classifiers_layer_names():
    from iat.defenses.embedding import captured

    atoms = _unit_atoms(9, PATCH, seed=5)
    frontend = sf.SparseFrontend(atoms, _spec(atoms, 3, 1.0)).eval()
    classifier = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3).eval()
    model = sf.FrontendClassifier(frontend, classifier)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad(), captured(model, "gap") as behind:
        model(x)
    with torch.no_grad(), captured(classifier, "gap") as direct:
        classifier(frontend(x))
    assert behind[0].shape == (2, 256) and torch.equal(
        behind[0], direct[0]
    )  # group3: 4 x 8 x width 8
    with (
        pytest.raises(ValueError, match="top-level layers: preprocess, conv0, "),
        captured(model, "classifier"),
    ):
        pass
