"""Embedding-space defenses: activations exported, PCA, k-NN and LESCI, against scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_model import digits_tensors
from sklearn.decomposition import PCA as SklearnPCA
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import nets
from iat.data.augment import eval_transform
from iat.data.layouts import list_split
from iat.defenses.embedding import (
    LESCI,
    PCA,
    captured,
    knn_vote,
    load_activations,
    nearest_neighbours,
)
from main import main


def test_pca_matches_scikit_learn_and_round_trips() -> None:
    data = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    ours = PCA(data, 5)
    reference = SklearnPCA(5, svd_solver="full").fit(data.numpy())
    theirs = reference.transform(data.numpy())
    compressed = ours.compress(data).numpy()
    signs = np.sign((compressed * theirs).sum(axis=0))  # components are defined up to sign
    np.testing.assert_allclose(compressed * signs, theirs, atol=1e-8)
    np.testing.assert_allclose(
        ours.restore(ours.compress(data)).numpy(),
        reference.inverse_transform(theirs),
        atol=1e-8,
    )
    full = PCA(data, 12)
    assert torch.allclose(full.restore(full.compress(data)), data, atol=1e-8)


def test_knn_matches_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(0)
    space = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (300,), generator=generator)
    queries = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    ours = nearest_neighbours(queries, space, 7)
    theirs = NearestNeighbors(n_neighbors=7).fit(space.numpy()).kneighbors(queries.numpy())[1]
    assert np.array_equal(ours.numpy(), theirs)
    vote, confident = knn_vote(labels[ours], 4, threshold=0.0)
    counts = F.one_hot(labels[ours], 4).sum(1)
    unique = (counts == counts.max(1, keepdim=True).values).sum(1) == 1  # no tie
    classifier = KNeighborsClassifier(n_neighbors=7).fit(space.numpy(), labels.numpy())
    expected = classifier.predict(queries.numpy())
    assert unique.sum() > 30 and confident.all()
    assert np.array_equal(vote[unique].numpy(), expected[unique.numpy()])
    _, strict = knn_vote(labels[ours], 4, threshold=0.99)
    assert torch.equal(strict, counts.max(1).values == 7)


def test_lesci_classifies_by_neighbours_and_keeps_the_networks_gradient(digits) -> None:
    model = digits["model"].eval()
    train_x, train_y = (t[:1500] for t in digits_tensors())
    with torch.no_grad(), captured(model, "bn2") as outputs:
        model(train_x)
    space = outputs[0]
    defended = LESCI(model, "bn2", PCA(space, 32), space, train_y, k=5, threshold=0.6)
    x, y = digits["x"], digits["y"]
    with torch.no_grad():
        decided = defended(x).argmax(1)
        network = model(x).argmax(1)
    # Independently: the same neighbours with scikit-learn on the same compressed activations.
    with torch.no_grad(), captured(model, "bn2") as outputs:
        model(x)
    pca = defended.pca
    knn = KNeighborsClassifier(n_neighbors=5).fit(pca.compress(space).numpy(), train_y.numpy())
    proba = knn.predict_proba(pca.compress(outputs[0]).numpy())
    expected = np.where(proba.max(1) >= 0.6, proba.argmax(1), network.numpy())
    assert np.array_equal(decided.numpy(), expected)
    assert (decided == y).float().mean() > 0.85
    # BPDA: where the vote agrees with the network, LESCI's logits and input gradient are the
    # network's; where it overrides, the voted class leads by the margin and the gradient
    # still flows (a loss on LESCI is never saturated).
    images = x[:64].clone().requires_grad_(True)
    lesci_logits, net_logits = defended(images), model(images)
    agree = decided[:64] == network[:64]
    assert torch.equal(lesci_logits[agree], net_logits[agree])
    assert (~agree).any(), "no override among these images: the test would prove nothing"
    top2 = lesci_logits[~agree].detach().topk(2, dim=1).values
    assert torch.allclose(top2[:, 0] - top2[:, 1], torch.ones(len(top2)))
    (through_lesci,) = torch.autograd.grad(F.cross_entropy(lesci_logits, y[:64]), images)
    (through_net,) = torch.autograd.grad(F.cross_entropy(net_logits, y[:64]), images)
    assert (through_lesci.flatten(1).abs().sum(1) > 0).all()
    assert torch.allclose(through_lesci[agree], through_net[agree])


@pytest.mark.parametrize("suffix", [".npz", ".mat"])
def test_export_activations_of_a_checkpoint(tiny_imagenet: Path, tmp_path: Path, suffix: str):
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3).eval()
    ckpt = tmp_path / "model.npz"
    nets.save_npz(model, ckpt)
    out = tmp_path / f"activations{suffix}"
    args = ["--export-activations", "gap", "--activations-file", str(out), "--load", str(ckpt),
            "--data", str(tiny_imagenet), "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1",
            "--width", "8", "--image-size", "32", "--batch", "3", "--workers", "0"]  # fmt: skip
    assert main(args) == 0
    activations, labels = load_activations(out)
    samples = list_split(tiny_imagenet, "val")[0]
    images = np.stack([eval_transform(np.asarray(_read(p)), 32) for p, _ in samples])
    with torch.no_grad(), captured(model, "gap") as outputs:
        model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert activations.shape == (7, 256)  # 7 val images, 8 * 2**3 * 4 channels after pooling
    np.testing.assert_allclose(activations, outputs[0].numpy(), rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [label for _, label in samples]


def _read(path: str) -> np.ndarray:
    from iat.data.layouts import read_image_bgr

    return read_image_bgr(path)
