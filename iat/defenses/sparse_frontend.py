"""The sparse-coding frontend of Bakiskan, Cekic, Sezer & Madhow, "Sparse Coding Frontend for
Robust Neural Networks" (ICLR 2021 workshop on Security and Safety in ML Systems; their public
code: github.com/canbakiskan/sparse_coding_frontend), before any registered classifier.

* **Dictionary** (paper Sec 2): an overcomplete dictionary of colour patches (patch x patch x 3)
  learned from training images with scikit-learn's ``MiniBatchDictionaryLearning``. The patches
  are normalised before learning (each made zero-mean over its 3*patch*patch values, then unit
  L2 norm), so the atoms learn shape, not brightness; the one thing that normalisation removes,
  a patch's mean, is given back by a constant (DC) atom placed first. Every atom has unit L2
  norm.
* **Encoder** (paper Sec 2): each patch of the image (pixel units, at ``stride``) is correlated
  with every atom (a conv2d with the atoms as filters); at each patch location only the ``top_t``
  coefficients of largest magnitude are kept, then the paper's activation keeps a kept
  coefficient c_k of atom d_k only if |c_k| > threshold * ||d_k||_1 and outputs it as
  sign(c_k) * ||d_k||_1 (a ternary code). An L-inf perturbation of e pixels moves c_k by at most
  e * ||d_k||_1, so threshold = beta * assumed epsilon (the authors' code: beta 3, epsilon 8/255,
  i.e. 24 pixels, ``activation_quantization`` in src/models/bpda.py) removes what such a
  perturbation could create on its own.
* **Decoder**: a transposed convolution (one patch per code location, at the same stride), ReLU
  and a 3x3 convolution, trained to reconstruct the image (MSE), output in pixel units so that
  any registered classifier takes it unchanged.

Top-T and the activation are piecewise constant in the input (the activation's gradient is zero
everywhere it is defined), so plain autograd through the frontend masks the gradient. A
white-box attack therefore differentiates ``FrontendClassifier.attack_view()``: BPDA (Athalye,
Carlini & Wagner, ICML 2018, Sec 4.1) keeps the real top-T and activation in the forward pass
and passes the gradient to every coefficient unchanged in the backward pass (the authors' "identity"
backward, src/models/bpda.py). ``attack_gradient="autograd"`` keeps the masked view, for
comparison only.

It is one model-level defense (``iat.defenses.registry``), registered below as ``sparse``: what
``--frontend FILE`` (or ``sparse:FILE``) names; its spec is the architecture record's
``frontend`` field and its tensors are under ``frontend.`` in a checkpoint's state_dict.

Files (``.npz``, never pickled, written atomically): a dictionary (``learn``) holds ``atoms``
[K, 3, p, p] and ``stride``; a frontend (``train``) holds those, ``top_t``, ``threshold`` and the
decoder's tensors under ``decoder/``. Commands (README "Sparse-coding frontend")::

    python -m iat.sparse_frontend learn --data DIR --dict-atoms 64 --patch-size 4 --stride 2 \
        --out dict.npz
    python -m iat.sparse_frontend train --dictionary dict.npz --data DIR --out frontend.npz
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nets
from iat.data.layouts import DataError
from iat.defenses.registry import ATTACK_GRADIENTS, ModelDefense, WrapOptions, register
from iat.defenses.transforms import bpda_identity
from iat.runtime.atomic_io import atomic_write
from iat.runtime.cli_help import DefaultsHelpFormatter
from iat.runtime.progress import progress_bar
from nets.layers import PIXEL_MAX

DEFAULT_TOP_T = 8  # kept coefficients per patch location (the paper uses 15 of 500 on CIFAR)
# Activation threshold in pixels per unit L1 norm of an atom: beta 3 x assumed epsilon 8
# pixels, the authors' defaults (config.toml: activation_beta 3, assumed_budget 8/255).
DEFAULT_THRESHOLD = 24.0
DEFAULT_HIDDEN = 64  # decoder channels after the transposed convolution
MAX_PATCHES = 50_000  # patches `learn` draws (evenly over the images) to learn the atoms from
_MIN_PATCH_NORM = 1e-6  # flat patches (all one value) carry no shape and are not learned from
_MAX_FILE_BYTES = 1 << 30  # a frontend or dictionary file declaring more is refused unread
_DICTIONARY_KEYS = ("atoms", "stride")
_FRONTEND_KEYS = (*_DICTIONARY_KEYS, "top_t", "threshold")
_DECODER_PREFIX = "decoder/"


class FrontendError(ValueError):
    """A dictionary or frontend file that cannot be used (one line naming the file)."""


@dataclass(frozen=True)
class FrontendSpec:
    """The frontend's shape and settings, as a checkpoint's architecture record holds them."""

    atoms: int  # dictionary atoms, the DC atom included
    patch_size: int
    stride: int
    top_t: int
    threshold: float  # activation threshold, pixels per unit L1 norm of an atom
    hidden: int  # decoder channels

    def __post_init__(self) -> None:
        ints = (self.atoms, self.patch_size, self.stride, self.top_t, self.hidden)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints):
            raise ValueError(f"frontend sizes must be positive integers: {self}")
        if not 1 <= self.top_t <= self.atoms:
            raise ValueError(f"--top-t {self.top_t}: must be in [1, {self.atoms}] (the atoms)")
        if self.stride > self.patch_size:
            raise ValueError(f"--stride {self.stride}: must be <= --patch-size {self.patch_size}")
        if not (isinstance(self.threshold, float) and 0 <= self.threshold < math.inf):
            raise ValueError(f"--threshold {self.threshold}: must be a finite number >= 0")

    def record(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: object, source: str) -> FrontendSpec:
        """The spec a checkpoint records; CheckpointError naming `source` if it is not one."""
        try:
            if not isinstance(record, Mapping) or set(record) != set(cls.__dataclass_fields__):
                raise ValueError("wrong fields")
            return cls(**record)
        except (TypeError, ValueError):
            raise nets.CheckpointError(
                f"{source}: field 'frontend' of {nets.ARCHITECTURE_KEY!r} is not a valid "
                "sparse-coding frontend record"
            ) from None

    def describe(self) -> str:
        return (
            f"sparse-coding frontend ({self.atoms} atoms {self.patch_size}x{self.patch_size} "
            f"stride {self.stride}, top-{self.top_t}, threshold {self.threshold:g})"
        )


# --- dictionary learning -------------------------------------------------------------------
def extract_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Every ``patch_size`` square of the NCHW batch at ``stride``, as rows [P, C*p*p] in the
    (channel, row, column) order of a conv2d filter."""
    columns = F.unfold(images, patch_size, stride=stride)  # [N, C*p*p, L]
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each row made zero-mean, then unit L2 norm; flat rows (nothing left) are dropped."""
    centred = patches - patches.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    keep = norms[:, 0] > _MIN_PATCH_NORM * PIXEL_MAX
    return centred[keep] / norms[keep]


def dc_atom(patch_size: int, channels: int = 3) -> torch.Tensor:
    """The constant unit-norm atom: the patch mean, which normalisation removed."""
    size = channels * patch_size * patch_size
    return torch.full((channels, patch_size, patch_size), 1.0 / math.sqrt(size))


def sample_patches(
    images: torch.Tensor, patch_size: int, stride: int, per_image: int, generator: torch.Generator
) -> torch.Tensor:
    """``per_image`` patches of each image of the NCHW batch, at distinct grid positions (the
    ``extract_patches`` grid) drawn from ``generator``, as rows [N * k, C*p*p]: only the
    drawn patches are ever copied."""
    n, c, h, w = images.shape
    rows, cols = (h - patch_size) // stride + 1, (w - patch_size) // stride + 1
    k = min(per_image, rows * cols)
    drawn = torch.stack([torch.randperm(rows * cols, generator=generator)[:k] for _ in range(n)])
    offsets = torch.arange(patch_size)
    top = (drawn // cols * stride)[..., None] + offsets  # [n, k, p]
    left = (drawn % cols * stride)[..., None] + offsets
    batch = torch.arange(n)[:, None, None, None]
    patches = images.permute(0, 2, 3, 1)[batch, top[..., :, None], left[..., None, :]]
    return patches.permute(0, 1, 4, 2, 3).reshape(n * k, c * patch_size * patch_size)


def learn_dictionary(
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    atoms: int,
    patch_size: int,
    stride: int,
    epochs: int = 2,
    batch: int = 256,
    alpha: float = 1.0,
    max_patches: int = MAX_PATCHES,
    patches_per_image: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Unit-norm atoms [atoms + 1, 3, p, p]: the DC atom, then `atoms` learned by
    ``MiniBatchDictionaryLearning`` (L1 penalty `alpha`, as the authors' lamda 1.0) from at
    most `max_patches` normalised patches of `images` (float NCHW pixel batches, or one such
    tensor), `epochs` passes of `batch` patches each. ``patches_per_image`` draws that many
    patches of each image at random positions (None: every patch), so that a large data set
    never has all its patches in memory at once."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    generator = torch.Generator().manual_seed(seed)
    parts = []
    for chunk in [images] if isinstance(images, torch.Tensor) else images:
        chunk = chunk.float()
        patches = (
            extract_patches(chunk, patch_size, stride)
            if patches_per_image is None
            else sample_patches(chunk, patch_size, stride, patches_per_image, generator)
        )
        parts.append(normalise_patches(patches))
    patches = torch.cat(parts)
    if len(patches) < atoms:
        raise DataError(
            f"--dict-atoms {atoms}: only {len(patches)} non-flat patches to learn them from"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(patches))[:max_patches]
    data = patches[torch.from_numpy(chosen)].double().numpy()
    learner = MiniBatchDictionaryLearning(
        n_components=atoms, alpha=alpha, batch_size=batch, random_state=seed
    )
    steps = [(e, s) for e in range(epochs) for s in range(0, len(data), batch)]
    for _, start in progress_bar(steps, desc="dictionary", leave=False):
        learner.partial_fit(data[start : start + batch])
    learned = torch.from_numpy(learner.components_).float()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(_MIN_PATCH_NORM)
    learned = learned.reshape(atoms, 3, patch_size, patch_size)
    return torch.cat([dc_atom(patch_size)[None], learned])


# --- encoder ---------------------------------------------------------------------------------
def keep_top_t(coefficients: torch.Tensor, top_t: int) -> torch.Tensor:
    """The `top_t` coefficients of largest magnitude at each location (dim 1), the rest zero."""
    indices = coefficients.abs().topk(top_t, dim=1).indices
    mask = torch.zeros_like(coefficients, dtype=torch.bool).scatter(1, indices, True)
    return coefficients * mask


def activation(
    coefficients: torch.Tensor, l1_norms: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The paper's activation (Sec 2; the authors' ``activation_quantization``): a coefficient
    of atom k survives only if |c| > threshold * ||d_k||_1, as sign(c) * ||d_k||_1."""
    scale = l1_norms.view(1, -1, 1, 1)
    kept = coefficients.abs() > threshold * scale
    return torch.where(kept, coefficients.sign() * scale, torch.zeros_like(coefficients))


def sparse_code(
    coefficients: torch.Tensor, l1_norms: torch.Tensor, top_t: int, threshold: float
) -> torch.Tensor:
    """Top-T selection, then the activation: the frontend's non-differentiable step."""
    return activation(keep_top_t(coefficients, top_t), l1_norms, threshold)


class SparseEncoder(nn.Module):
    """Correlation with the (frozen) atoms at `stride`, then top-T and the activation."""

    def __init__(self, atoms: torch.Tensor, stride: int, top_t: int, threshold: float) -> None:
        super().__init__()
        count, channels, patch, _ = atoms.shape
        self.conv = nn.Conv2d(channels, count, patch, stride=stride, bias=False)
        self.conv.weight.data.copy_(atoms)
        self.conv.weight.requires_grad_(False)  # the dictionary is learned once, never trained
        self.top_t, self.threshold = top_t, threshold

    def l1_norms(self) -> torch.Tensor:
        return self.conv.weight.abs().sum(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor, bpda: bool = False) -> torch.Tensor:
        coefficients = self.conv(x)
        code = partial(
            sparse_code, l1_norms=self.l1_norms(), top_t=self.top_t, threshold=self.threshold
        )
        # BPDA (Athalye et al. 2018, Sec 4.1): the real sparse code forward, the gradient passed
        # to every coefficient unchanged backward.
        return bpda_identity(coefficients, code) if bpda else code(coefficients)


class Decoder(nn.Module):
    """Code [N, K, L, L] -> image in pixel units: transposed conv (patch, stride), ReLU, 3x3
    conv."""

    def __init__(self, atoms: int, patch_size: int, stride: int, hidden: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(atoms, hidden, patch_size, stride=stride)
        self.conv = nn.Conv2d(hidden, 3, 3, padding=1)

    def forward(self, code: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        features = F.relu(self.deconv(code, output_size=size))
        return PIXEL_MAX * (0.5 + self.conv(features))


class SparseFrontend(nn.Module):
    """Encoder then decoder: images (float NCHW BGR, pixel units) to reconstructed images."""

    def __init__(self, atoms: torch.Tensor, spec: FrontendSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = SparseEncoder(atoms, spec.stride, spec.top_t, spec.threshold)
        self.decoder = Decoder(spec.atoms, spec.patch_size, spec.stride, spec.hidden)

    def forward(self, x: torch.Tensor, bpda: bool = False) -> torch.Tensor:
        if min(x.shape[-2:]) < self.spec.patch_size:
            raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than one patch")
        return self.decoder(self.encoder(x, bpda), x.shape[-2:])


class FrontendClassifier(nn.Module):
    """``classifier(frontend(x))``. The frontend is trained with the classifier (`trainable`)
    or frozen (its decoder's parameters then have requires_grad False: no optimizer moves
    them). ``attack_view()`` is what a white-box attack differentiates: BPDA through the sparse
    code (`attack_gradient` "bpda"), or plain autograd ("autograd", gradient-masked)."""

    def __init__(
        self,
        frontend: SparseFrontend,
        classifier: nn.Module,
        trainable: bool = False,
        attack_gradient: str = "bpda",
    ) -> None:
        super().__init__()
        if attack_gradient not in ATTACK_GRADIENTS:
            raise ValueError(f"attack_gradient {attack_gradient!r}: one of {ATTACK_GRADIENTS}")
        self.frontend, self.classifier = frontend, classifier
        self.attack_gradient = attack_gradient
        frontend.decoder.requires_grad_(trainable)

    @property
    def spec(self) -> FrontendSpec:
        return self.frontend.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.frontend(x))

    def attack_view(self) -> nn.Module:
        return _BpdaView(self) if self.attack_gradient == "bpda" else self


class _BpdaView(nn.Module):
    """The same frontend and classifier, with BPDA through the sparse code."""

    def __init__(self, model: FrontendClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.frontend(x, bpda=True))


def frontend_spec(model: nn.Module) -> FrontendSpec | None:
    """The spec of the sparse-coding frontend `model` classifies behind, if any."""
    return model.frontend.spec if isinstance(model, FrontendClassifier) else None


def describe_attack(attack_gradient: str) -> str:
    """The frontend and how a white-box attack sees it, in words."""
    how = {
        "bpda": "BPDA (identity backward) for its top-T and threshold",
        "autograd": "plain autograd (gradient-masked, for comparison only)",
    }[attack_gradient]
    return f"sparse-coding frontend, attacked through {how}"


# --- files ---------------------------------------------------------------------------------
def save_dictionary(path: str | Path, atoms: torch.Tensor, stride: int) -> Path:
    arrays = {"atoms": atoms.float().numpy(), "stride": np.int64(stride)}
    return atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def save_frontend(path: str | Path, frontend: SparseFrontend) -> Path:
    spec = frontend.spec
    arrays = {
        "atoms": frontend.encoder.conv.weight.detach().cpu().float().numpy(),
        "stride": np.int64(spec.stride),
        "top_t": np.int64(spec.top_t),
        "threshold": np.float64(spec.threshold),
    }
    for key, value in frontend.decoder.state_dict().items():
        arrays[_DECODER_PREFIX + key] = value.detach().cpu().float().numpy()
    return atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def _read_arrays(path: str | Path, required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file after its headers are checked (``nets.read_weights``: no
    pickles, every member's declared size what its zip entry holds) and their total is bounded."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise FrontendError(f"{path}: a {what} file must be .npz")
    try:
        members = nets.read_weights(path).tensors
    except nets.CheckpointError as error:
        raise FrontendError(f"{what} file {error}") from None
    missing = [name for name in required if name not in members]
    if missing:
        raise FrontendError(f"{path}: not a {what} file (no {', '.join(missing)})")
    if sum(m.nbytes for m in members.values()) > _MAX_FILE_BYTES:
        raise FrontendError(f"{path}: declares more than {_MAX_FILE_BYTES} bytes of arrays")
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in members}


def _check_atoms(path: str | Path, atoms: np.ndarray) -> torch.Tensor:
    ok = (
        atoms.ndim == 4
        and atoms.shape[1] == 3
        and atoms.shape[2] == atoms.shape[3]
        and atoms.shape[0] >= 1
        and np.issubdtype(atoms.dtype, np.floating)
        and np.isfinite(atoms).all()
    )
    if not ok:
        raise FrontendError(
            f"{path}: 'atoms' must be finite floats [K, 3, p, p], got {atoms.shape}"
        )
    tensor = torch.from_numpy(np.array(atoms, dtype=np.float32))
    if not torch.allclose(tensor.flatten(1).norm(dim=1), torch.ones(len(tensor)), atol=1e-3):
        raise FrontendError(f"{path}: the atoms are not unit-norm")
    return tensor


def _integer(path: str | Path, arrays: Mapping[str, np.ndarray], name: str) -> int:
    value = arrays[name]
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise FrontendError(f"{path}: '{name}' must be one integer")
    return int(value)


def load_dictionary(path: str | Path) -> tuple[torch.Tensor, int]:
    """``(atoms [K, 3, p, p], stride)`` of a dictionary (or frontend) file."""
    arrays = _read_arrays(path, _DICTIONARY_KEYS, "dictionary")
    return _check_atoms(path, arrays["atoms"]), _integer(path, arrays, "stride")


def load_frontend(path: str | Path) -> SparseFrontend:
    """The frontend ``save_frontend`` wrote; FrontendError (one line) if the file is not one."""
    arrays = _read_arrays(path, _FRONTEND_KEYS, "frontend")
    atoms = _check_atoms(path, arrays["atoms"])
    threshold = arrays["threshold"]
    if threshold.shape != () or not np.issubdtype(threshold.dtype, np.floating):
        raise FrontendError(f"{path}: 'threshold' must be one number")
    deconv = arrays.get(_DECODER_PREFIX + "deconv.weight")
    if deconv is None or deconv.ndim != 4:
        raise FrontendError(f"{path}: no decoder (decoder/deconv.weight)")
    try:
        spec = FrontendSpec(
            atoms=atoms.shape[0],
            patch_size=atoms.shape[2],
            stride=_integer(path, arrays, "stride"),
            top_t=_integer(path, arrays, "top_t"),
            threshold=float(threshold),
            hidden=int(deconv.shape[1]),
        )
    except ValueError as error:
        raise FrontendError(f"{path}: {error}") from None
    frontend = SparseFrontend(atoms, spec)
    decoder = {
        k.removeprefix(_DECODER_PREFIX): torch.from_numpy(np.array(v))
        for k, v in arrays.items()
        if k.startswith(_DECODER_PREFIX)
    }
    try:
        frontend.decoder.load_state_dict(decoder, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise FrontendError(f"{path}: the decoder does not fit its dictionary ({first})") from None
    return frontend


def frontend_shapes(spec: FrontendSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors that size a frontend of `spec`, by their state_dict keys in a
    ``FrontendClassifier`` (checked before one is built from a checkpoint's record)."""
    patch = (spec.patch_size, spec.patch_size)
    return {
        "frontend.encoder.conv.weight": (spec.atoms, 3, *patch),
        "frontend.decoder.deconv.weight": (spec.atoms, spec.hidden, *patch),
    }


def empty_frontend(spec: FrontendSpec) -> SparseFrontend:
    """A frontend of `spec`'s shape whose tensors a checkpoint then fills."""
    atoms = dc_atom(spec.patch_size).expand(spec.atoms, -1, -1, -1).contiguous()
    return SparseFrontend(atoms, spec)


def _wrap(
    frontend: SparseFrontend, classifier: nn.Module, options: WrapOptions
) -> FrontendClassifier:
    return FrontendClassifier(frontend, classifier, options.trainable, options.attack_gradient)


def _from_file(path: str, classifier: nn.Module, options: WrapOptions) -> FrontendClassifier:
    """--frontend FILE: the frontend ``python -m iat.sparse_frontend train`` wrote."""
    return _wrap(load_frontend(path), classifier, options)


def _from_spec(
    spec: FrontendSpec, classifier: nn.Module, options: WrapOptions
) -> FrontendClassifier:
    """A checkpoint's frontend: its record's shape, its tensors to be filled."""
    return _wrap(empty_frontend(spec), classifier, options)


register(
    ModelDefense(
        name="sparse",
        record_field="frontend",
        title="sparse-coding frontend",
        wrapper=FrontendClassifier,
        build=_from_file,
        from_record=FrontendSpec.from_record,
        shapes=frontend_shapes,
        empty=_from_spec,
        attack_words=describe_attack,
    )
)


# --- training the decoder ------------------------------------------------------------------
def reconstruction_loss(frontend: SparseFrontend, images: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the reconstruction, in units of the full pixel range."""
    return F.mse_loss(frontend(images) / PIXEL_MAX, images / PIXEL_MAX)


def train_decoder(
    frontend: SparseFrontend,
    batches,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
) -> float:
    """Adam on the decoder's reconstruction MSE over `epochs` passes of `batches` (a
    re-iterable of float NCHW pixel batches), on `device`; returns the last epoch's mean loss."""
    frontend.to(device).train()
    optimizer = torch.optim.Adam(frontend.decoder.parameters(), lr=lr)
    mean = math.nan
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        progress = progress_bar(batches, desc=f"decoder epoch {epoch}/{epochs}", leave=False)
        for images in progress:
            images = images.to(device)
            loss = reconstruction_loss(frontend, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(images), count + len(images)
            progress.set_postfix(mse=f"{loss.item():.4f}", refresh=False)
        mean = total / max(count, 1)
        print(f"decoder epoch {epoch}: reconstruction MSE {mean:.5f}", file=sys.stderr)
    frontend.eval()
    return mean


# --- command line ----------------------------------------------------------------------------
class _ImageBatches:
    """Float NCHW pixel batches of the --data train split (centre crops), in a seeded shuffled
    order that changes every pass."""

    def __init__(self, data: str, image_size: int, batch: int, max_images: int | None, seed: int):
        from iat.data.layouts import create_reader
        from iat.data.sources import ImageFiles

        samples = create_reader(data).samples("train")
        if not samples:
            raise DataError(f"--data: {data} has no training images")
        if max_images is not None and max_images < len(samples):
            # A seeded random subset: the readers list the images class by class.
            chosen = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
            samples = [samples[i] for i in sorted(chosen)]
        self.files = ImageFiles(samples, image_size)
        self.batch, self.generator = batch, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            self.files, batch_size=self.batch, shuffle=True, generator=self.generator
        )
        for images, _, _, ok in loader:
            yield images[ok].permute(0, 3, 1, 2).float().contiguous()


def _learn(args: argparse.Namespace) -> None:
    batches = _ImageBatches(args.data, args.image_size, 64, args.max_images, args.seed)
    atoms = learn_dictionary(
        progress_bar(batches, desc="sampling patches", leave=False),
        patches_per_image=math.ceil(MAX_PATCHES / len(batches.files)),
        max_patches=MAX_PATCHES,
        atoms=args.dict_atoms,
        patch_size=args.patch_size,
        stride=args.stride,
        epochs=args.epochs,
        alpha=args.alpha,
        seed=args.seed,
    )
    save_dictionary(args.out, atoms, args.stride)
    print(f"wrote {len(atoms)} atoms ({args.dict_atoms} learned + DC) to {args.out}")


def _train(args: argparse.Namespace) -> None:
    atoms, stride = load_dictionary(args.dictionary)
    spec = FrontendSpec(
        atoms=len(atoms),
        patch_size=atoms.shape[-1],
        stride=stride,
        top_t=args.top_t,
        threshold=float(args.threshold),
        hidden=args.hidden,
    )
    torch.manual_seed(args.seed)
    frontend = SparseFrontend(atoms, spec)
    batches = _ImageBatches(args.data, args.image_size, args.batch, args.max_images, args.seed)
    from iat.runtime import distributed

    device = distributed.select_device(distributed.detect())
    mse = train_decoder(frontend, batches, epochs=args.epochs, lr=args.lr, device=device)
    save_frontend(args.out, frontend)
    print(f"wrote {spec.describe()} to {args.out} (reconstruction MSE {mse:.5f})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iat.sparse_frontend", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = DefaultsHelpFormatter  # each command's help shows its defaults
    learn = commands.add_parser(
        "learn", help="learn the patch dictionary", formatter_class=defaults
    )
    learn.add_argument("--dict-atoms", type=int, default=64, help="learned atoms (+1 DC atom)")
    learn.add_argument("--patch-size", type=int, default=4, help="patch side, pixels")
    learn.add_argument("--stride", type=int, default=2, help="stride of the encoder's patches")
    learn.add_argument("--alpha", type=float, default=1.0, help="L1 penalty of the learning")
    train = commands.add_parser(
        "train", help="train the decoder of a frontend", formatter_class=defaults
    )
    train.add_argument("--dictionary", required=True, help="a dictionary file from `learn`")
    train.add_argument("--top-t", type=int, default=DEFAULT_TOP_T, help="kept coefficients")
    train.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="beta x epsilon, pixels"
    )
    train.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="decoder channels")
    train.add_argument("--batch", type=int, default=64, help="images per step")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    # learn draws its patches from 2,000 images by default (the authors used Imagenette's 9,469).
    for sub, epochs, max_images in ((learn, 2, 2000), (train, 5, None)):
        sub.add_argument("--data", required=True, help="image folder with a train/ split")
        sub.add_argument("--out", required=True, help="output .npz file")
        sub.add_argument("--image-size", type=int, default=224, help="centre-crop side")
        sub.add_argument(
            "--max-images", type=int, default=max_images, help="a seeded random N training images"
        )
        sub.add_argument("--epochs", type=int, default=epochs, help="passes over the data")
        sub.add_argument("--seed", type=int, default=0, help="seeds sampling and initialisation")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        (_learn if args.command == "learn" else _train)(args)
    except (ValueError, OSError) as error:  # FrontendError, DataError, CheckpointError
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
