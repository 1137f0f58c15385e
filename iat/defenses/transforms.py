"""Input-transform defenses, and how a white-box attack sees them (BPDA and EOT).

A defense is a chain of transforms applied to the images (float NCHW BGR, pixel units
[0, 255]) before the model: ``--defense jpeg:75,median:3`` compresses to JPEG quality 75, then
smooths with a 3x3 median. ``DEFENSES`` is the registry (name -> factory of the parameter).

Two views of a defended model share the network:

* ``DefendedModel`` scores images through the real transforms. Its JPEG round trip is piecewise
  constant, so its gradient is zero almost everywhere and a plain gradient attack is stuck
  ("obfuscated gradients", Athalye, Carlini & Wagner, ICML 2018, Sec 3.1 "shattered gradients").
* ``DefendedModel.attack_view()`` is what a white-box attack must differentiate: BPDA (Athalye et
  al. Sec 4.1, Backward Pass Differentiable Approximation) replaces the backward pass of a
  non-differentiable transform by the identity's (the forward pass stays the real transform),
  and a random transform draws fresh randomness at every call, so an attack that averages its
  loss over N calls follows the gradient averaged over N draws: EOT (Athalye et al. Sec 4.3,
  Expectation over Transformation; ``adv_model.PGDAttacker(eot_samples=N)``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import PIXEL_MAX

NO_DEFENSE = "none"  # --defense none: explicitly no defense (over a checkpoint's record)
# --defense-apply: the phases a defense applies in (Dioptra's apply_fit / apply_predict).
DEFENSE_PHASES: dict[str, tuple[str, ...]] = {
    "predict": ("predict",),
    "fit": ("fit",),
    "both": ("fit", "predict"),
}


class InputTransform(nn.Module, abc.ABC):
    """One input transform. ``differentiable``: its autograd gradient is the useful one (else
    an attack needs BPDA); ``random``: each call draws fresh randomness (an attack needs EOT)
    from its ``generator`` attribute (``reseed`` replaces it)."""

    differentiable: bool = True
    random: bool = False

    @abc.abstractmethod
    def spec(self) -> str:
        """The transform as ``--defense`` writes it, e.g. ``jpeg:75``."""


class MedianSmoothing(InputTransform):
    """Median spatial smoothing over a ``window`` x ``window`` neighbourhood per channel, with
    replicated borders: OpenCV's ``medianBlur`` (Xu, Evans & Qi, NDSS 2018, "feature squeezing",
    Sec 3.2). Differentiable almost everywhere: the gradient reaches the selected pixel."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.window // 2
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        patches = F.unfold(padded, self.window).reshape(n, c, self.window**2, h * w)
        return patches.median(dim=2).values.reshape(n, c, h, w)

    def spec(self) -> str:
        return f"median:{self.window}"


class _ZeroGradient(torch.autograd.Function):
    """``value`` in the forward pass, a zero gradient for ``x`` in the backward pass: the exact
    derivative of a piecewise-constant (quantising) transform, almost everywhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(grad), None


class JpegCompression(InputTransform):
    """A real JPEG round trip through OpenCV at ``quality`` (1-100) on uint8 BGR images (Guo et
    al., ICLR 2018, "Countering adversarial images using input transformations", Sec 3; Das et
    al. 2017). Images are rounded to uint8 first, as a saved image would be."""

    differentiable = False

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = quality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = jpeg_round_trip(x.detach(), self.quality)
        return _ZeroGradient.apply(x, value) if x.requires_grad else value

    def spec(self) -> str:
        return f"jpeg:{self.quality}"


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image of the float NCHW BGR batch encoded as JPEG and decoded, as float again."""
    pixels = x.clamp(0, PIXEL_MAX).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    decoded = []
    for image in pixels:
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {image.shape} image as JPEG")
        decoded.append(cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=x.device, dtype=x.dtype).contiguous()


class GaussianNoise(InputTransform):
    """Additive Gaussian noise of standard deviation ``sigma`` pixels, clipped to [0, 255]; a
    fresh draw at every call from ``generator`` (None: torch's default). Random: attacks need EOT
    (Athalye et al. Sec 4.3)."""

    random = True

    def __init__(self, sigma: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma = sigma
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device if self.generator is None else self.generator.device
        noise = torch.randn(x.shape, generator=self.generator, device=device, dtype=x.dtype)
        return (x + self.sigma * noise.to(x.device)).clamp(0, PIXEL_MAX)

    def spec(self) -> str:
        return f"noise:{self.sigma:g}"


class _Bpda(torch.autograd.Function):
    """BPDA with the identity (Athalye et al. Sec 4.1): the transform's output forward, the
    incoming gradient passed through unchanged backward."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        with torch.no_grad():
            return transform(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def bpda_identity(
    x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``transform(x)`` forward, the identity's gradient backward (Athalye et al. Sec 4.1): how
    a white-box attack differentiates a shape-preserving non-differentiable step."""
    return _Bpda.apply(x, transform)


class Bpda(nn.Module):
    """``transform`` whose backward pass is the identity's."""

    def __init__(self, transform: InputTransform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bpda_identity(x, self.transform)


class DefendedModel(nn.Module):
    """``model`` fed through ``transforms`` in order (the real ones)."""

    def __init__(self, model: nn.Module, transforms: Sequence[InputTransform]) -> None:
        super().__init__()
        self.model = model
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return self.model(x)

    @property
    def random(self) -> bool:
        """Whether any transform is random (a white-box attack then needs EOT)."""
        return any(t.random for t in self.transforms)

    def attack_view(self) -> nn.Module:
        """The same network behind the transforms as a white-box attack differentiates them:
        BPDA for every non-differentiable one; random ones keep drawing (for EOT)."""
        view = [t if t.differentiable else Bpda(t) for t in self.transforms]
        return nn.Sequential(*view, attack_model(self.model))


@dataclass(frozen=True)
class DefenseKind:
    """A registered transform: its parameter's type and bounds, and the factory."""

    parse: Callable[[str], float]
    check: Callable[[float], bool]
    bounds: str  # the allowed values, in words
    build: Callable[[float, torch.Generator | None], InputTransform]  # (parameter, generator)


DEFENSES: dict[str, DefenseKind] = {
    "median": DefenseKind(
        int, lambda k: k >= 1 and k % 2 == 1, "an odd size", lambda k, _: MedianSmoothing(k)
    ),
    "jpeg": DefenseKind(
        int, lambda q: 1 <= q <= 100, "a quality 1-100", lambda q, _: JpegCompression(q)
    ),
    "noise": DefenseKind(float, lambda s: 0 < s < float("inf"), "a sigma > 0", GaussianNoise),
}


def parse_defense(spec: str | None) -> list[tuple[str, float]]:
    """``"jpeg:75,median:3"`` -> ``[("jpeg", 75), ("median", 3)]``; None or "none" -> []. A
    ValueError names the bad part."""
    if spec is None or spec == NO_DEFENSE:
        return []
    parts = []
    for part in spec.split(","):
        name, _, value = part.partition(":")
        if name not in DEFENSES:
            raise ValueError(
                f"unknown defense {name!r} in {spec!r}; available: {', '.join(sorted(DEFENSES))} "
                f"(e.g. jpeg:75,median:3,noise:8), or {NO_DEFENSE}"
            )
        kind = DEFENSES[name]
        try:
            parameter = kind.parse(value)
        except ValueError:
            raise ValueError(f"{part!r}: {name} needs {kind.bounds}, as in {name}:N") from None
        if not kind.check(parameter):
            raise ValueError(f"{part!r}: {name} needs {kind.bounds}, got {value}")
        parts.append((name, parameter))
    return parts


def applied_defense(spec: str | None, apply: str, phase: str) -> str | None:
    """``spec`` if it applies in ``phase`` ("fit" or "predict") under ``--defense-apply``
    ``apply``, else None."""
    return spec if phase in DEFENSE_PHASES[apply] and parse_defense(spec) else None


def build_transforms(
    spec: str | None, generator: torch.Generator | None = None
) -> list[InputTransform]:
    """The transforms of ``spec`` (``--defense``), in order; random ones draw from
    ``generator`` (None: torch's default)."""
    return [DEFENSES[name].build(value, generator) for name, value in parse_defense(spec)]


def defend(
    model: nn.Module, spec: str | None, generator: torch.Generator | None = None
) -> nn.Module:
    """``model`` behind the transforms of ``spec`` (``--defense``); ``model`` itself if none."""
    transforms = build_transforms(spec, generator)
    return DefendedModel(model, transforms) if transforms else model


def describe(spec: str | None, eot_samples: int, attacked: bool) -> str:
    """The defense and, when `attacked`, how a white-box attack sees it, in words: "defense
    jpeg:75,noise:4, attacked through BPDA (identity backward) for jpeg:75 and EOT over 10
    draws"; empty without a defense."""
    transforms = build_transforms(spec)
    if not transforms:
        return ""
    parts = [f"BPDA (identity backward) for {t.spec()}" for t in transforms if not t.differentiable]
    if any(t.random for t in transforms):
        parts.append(f"EOT over {eot_samples} draws")
    through = f", attacked through {' and '.join(parts)}" if attacked and parts else ""
    return f"defense {','.join(t.spec() for t in transforms)}{through}"


@runtime_checkable
class AttackViewed(Protocol):
    """A model whose white-box attack differentiates another view of it: ``DefendedModel``,
    a model-level defense's wrapper (``iat.defenses.registry``)."""

    def attack_view(self) -> nn.Module: ...


def attack_model(model: nn.Module) -> nn.Module:
    """What a white-box attack on `model` differentiates: its attack view (a defended model's
    BPDA/EOT view, BPDA through a sparse-coding frontend), else `model` itself."""
    return model.attack_view() if isinstance(model, AttackViewed) else model


def reseed(model: nn.Module, seed: int) -> None:
    """Random transforms of a defended `model` draw from a fresh generator seeded with `seed`
    (the attack view shares them): evaluation reseeds per batch, so a random defense's draws
    depend on the batch, not on the process that scores it."""
    if not isinstance(model, DefendedModel):
        return
    device = next(model.model.parameters()).device
    for transform in model.transforms:
        if transform.random:
            transform.generator = torch.Generator(device=device).manual_seed(seed)


def eot_samples(model: nn.Module, requested: int) -> int:
    """Draws an attack averages its gradient over: `requested` for a random defense, else 1."""
    return requested if isinstance(model, DefendedModel) and model.random else 1
