"""Embedding-space defenses of the NIPS-2018 defense project: a layer's activations exported,
compressed by PCA, and LESCI — classification by the nearest neighbours of the compressed
activation in a stored embedding space, falling back to the network where they disagree.

``--export-activations LAYER`` (``iat.app.export``) writes the activations of a named module (a
``nets`` module path, e.g. ``group3`` or ``gap``) over a split, with their labels, as ``.npz`` or
MATLAB ``.mat`` (SciPy), as the original project did. ``PCA`` and ``nearest_neighbours`` are plain
torch; ``LESCI`` wraps a model and is attackable: its backward pass is the network's own (BPDA
through the k-NN step, Athalye, Carlini & Wagner 2018, Sec 4.1), so white-box attacks are not fooled
by the non-differentiable vote."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iat.data.layouts import DataError
from iat.defenses.registry import classifier_of
from iat.runtime.atomic_io import atomic_write

ACTIVATIONS_KEY, LABELS_KEY = "activations", "labels"
OVERRIDE_MARGIN = 1.0  # where the vote overrides the network, its class leads by this logit


@contextmanager
def captured(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Collects the output of ``model``'s module named `layer`, flattened per example, for every
    forward pass inside the block. Behind a model-level defense the classifier's layers go by
    their own names (``gap``, not ``classifier.gap``)."""
    network = classifier_of(model)
    modules = dict(network.named_modules())
    if layer not in modules or not layer:
        names = ", ".join(n for n in modules if n and "." not in n)
        raise ValueError(f"--export-activations: no layer {layer!r}; top-level layers: {names}")
    outputs: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(
        lambda _module, _inputs, output: outputs.append(output.flatten(1))
    )
    try:
        yield outputs
    finally:
        handle.remove()


def save_activations(path: str | Path, activations: np.ndarray, labels: np.ndarray) -> Path:
    """``.npz`` (NumPy) or ``.mat`` (MATLAB, through SciPy), written atomically."""
    path = Path(path)
    arrays = {ACTIVATIONS_KEY: activations, LABELS_KEY: labels}
    if path.suffix == ".mat":
        from scipy.io import savemat

        return atomic_write(path, lambda f: savemat(f, arrays))
    if path.suffix == ".npz":
        return atomic_write(path, lambda f: np.savez(f, **arrays))
    raise DataError(f"--activations-file: {path} must end in .npz or .mat")


def load_activations(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """What ``save_activations`` wrote (never unpickled)."""
    path = Path(path)
    if path.suffix == ".mat":
        from scipy.io import loadmat

        arrays = loadmat(path)
        return arrays[ACTIVATIONS_KEY], arrays[LABELS_KEY].reshape(-1)
    with np.load(path, allow_pickle=False) as arrays:
        return arrays[ACTIVATIONS_KEY], arrays[LABELS_KEY]


class PCA:
    """Principal components of rows of `data` (centred), via the SVD."""

    def __init__(self, data: torch.Tensor, components: int) -> None:
        if not 1 <= components <= min(data.shape):
            raise ValueError(f"PCA: components must be in [1, {min(data.shape)}], got {components}")
        self.mean = data.mean(dim=0)
        _, _, vh = torch.linalg.svd(data - self.mean, full_matrices=False)
        self.components = vh[:components]  # [k, D], orthonormal rows

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T

    def restore(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components + self.mean


def nearest_neighbours(queries: torch.Tensor, space: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[Q, k]`` of each query's `k` nearest rows of `space` (Euclidean), nearest
    first."""
    return torch.cdist(queries, space).topk(k, dim=1, largest=False).indices


def knn_vote(
    neighbour_labels: torch.Tensor, num_classes: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(majority class, whether it reaches `threshold`)`` of each row of neighbour labels."""
    counts = torch.nn.functional.one_hot(neighbour_labels, num_classes).sum(dim=1)
    top = counts.max(dim=1)
    return top.indices, top.values >= threshold * neighbour_labels.shape[1]


class LESCI(nn.Module):
    """Classify by the k nearest neighbours of the PCA-compressed activation of `layer` among a
    stored embedding space (majority with at least `threshold` of the votes), else by the
    network.

    Returns the network's logits, except where the vote overrides the network: there the voted
    class's logit is raised just enough to lead by ``OVERRIDE_MARGIN``. The raise is a constant
    on the backward pass (BPDA: the k-NN step is the identity), and it is small, so a loss on
    these logits is not saturated: attacks get the network's gradient, never a masked one."""

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        pca: PCA,
        space: torch.Tensor,
        space_labels: torch.Tensor,
        k: int = 10,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.model, self.layer, self.pca, self.k, self.threshold = model, layer, pca, k, threshold
        self.register_buffer("space", pca.compress(space))
        self.register_buffer("space_labels", space_labels.long())

    def decide(self, logits: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """The class of each example: the confident vote, else the network's."""
        neighbours = nearest_neighbours(self.pca.compress(activations), self.space, self.k)
        vote, confident = knn_vote(self.space_labels[neighbours], logits.shape[1], self.threshold)
        return torch.where(confident, vote, logits.argmax(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with captured(self.model, self.layer) as outputs:
            logits = self.model(images)
        decided = self.decide(logits.detach(), outputs[-1].detach())
        plain = logits.detach()
        gap = plain.max(dim=1).values - plain.gather(1, decided[:, None]).squeeze(1)
        raise_by = torch.where(gap > 0, gap + OVERRIDE_MARGIN, torch.zeros_like(gap))
        return logits + raise_by[:, None] * nn.functional.one_hot(decided, logits.shape[1])
