"""RandAugment (Cubuk et al. 2020) as timm's ``rand-m9-mstd0.5-inc1``, and random erasing
(Zhong et al. 2020) as timm's ``RandomErasing(mode="pixel")``: OpenCV / NumPy on HxWx3 uint8
BGR images, torch-free (they run in the data server's and the local loader's workers).

timm's semantics (``timm/data/auto_augment.py``, the configuration string
``rand-m9-mstd0.5-inc1`` of ARES 2.0's and revisiting-at's recipes): 2 operations drawn with
replacement from the "increasing" set, each applied with probability 0.5 at a magnitude drawn
from N(9, 0.5) clipped to [0, 10]; geometric operations fill with the ImageNet mean and
interpolate bicubically. Each operation follows PIL's definition (the reference the tests
compare with); randomness comes only from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are on a 0-10 scale
# timm's img_mean fill, round(255 * ImageNet mean) in RGB, here BGR.
FILL_BGR = (104, 116, 124)
# ImageNet mean and std in pixel units, BGR: random erasing's "pixel" mode draws normalised
# N(0, 1) values, i.e. mean + std * N(0, 1) in pixels.
MEAN_BGR = np.array([0.406, 0.456, 0.485]) * 255
STD_BGR = np.array([0.225, 0.224, 0.229]) * 255


# --- PIL's operations, on BGR uint8 --------------------------------------------------------
def gray(img: np.ndarray) -> np.ndarray:
    """PIL's "L" conversion (ITU-R 601-2 luma, its fixed-point rounding), uint8 HxW."""
    b, g, r = (img[..., k].astype(np.int64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(degenerate, img, factor)`` (ImageEnhance): truncated, clipped."""
    out = degenerate.astype(np.float32) + np.float32(factor) * (
        img.astype(np.float32) - degenerate.astype(np.float32)
    )
    return np.clip(np.floor(out), 0, 255).astype(np.uint8)


def color(img: np.ndarray, factor: float) -> np.ndarray:
    return blend(np.repeat(gray(img)[..., None], 3, axis=2), img, factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    mean = int(gray(img).mean() + 0.5)
    return blend(np.full_like(img, mean), img, factor)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return blend(np.zeros_like(img), img, factor)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, /13; borders unfiltered)."""
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    smooth = cv2.filter2D(img.astype(np.float32), -1, kernel / 13, borderType=cv2.BORDER_REPLICATE)
    degenerate = img.copy()
    degenerate[1:-1, 1:-1] = np.clip(np.floor(smooth[1:-1, 1:-1] + 0.5), 0, 255)
    return blend(degenerate, img, factor)


def _lut(img: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    out = np.empty_like(img)
    for k, table in enumerate(tables):
        out[..., k] = np.clip(table, 0, 255).astype(np.uint8)[img[..., k]]
    return out


def autocontrast(img: np.ndarray, _: float = 0.0) -> np.ndarray:
    """PIL's ``ImageOps.autocontrast`` (no cutoff): each channel stretched to [0, 255]."""
    tables = []
    for k in range(3):
        lo, hi = int(img[..., k].min()), int(img[..., k].max())
        if hi <= lo:
            tables.append(np.arange(256))
            continue
        scale = 255.0 / (hi - lo)
        tables.append((np.arange(256) * scale - lo * scale).astype(np.int64))
    return _lut(img, tables)


def equalize(img: np.ndarray, _: float = 0.0) -> np.ndarray:
    """PIL's ``ImageOps.equalize``: per channel, the cumulative histogram as the table."""
    tables = []
    for k in range(3):
        hist = np.bincount(img[..., k].ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255 if len(nonzero) > 1 else 0
        if not step:
            tables.append(np.arange(256))
            continue
        before = np.concatenate([[0], np.cumsum(hist)[:-1]])
        tables.append((step // 2 + before) // step)
    return _lut(img, tables)


def invert(img: np.ndarray, _: float = 0.0) -> np.ndarray:
    return 255 - img


def posterize(img: np.ndarray, bits: float) -> np.ndarray:
    """Keep the `bits` most significant bits of each value."""
    return img & np.uint8((0xFF << (8 - int(bits))) & 0xFF)


def solarize(img: np.ndarray, threshold: float) -> np.ndarray:
    """Values at or above `threshold` inverted."""
    return np.where(img >= threshold, 255 - img, img)


def solarize_add(img: np.ndarray, add: float, threshold: int = 128) -> np.ndarray:
    """timm's ``solarize_add``: `add` added (clipped) to values below `threshold`."""
    added = np.minimum(img.astype(np.int64) + int(add), 255).astype(np.uint8)
    return np.where(img < threshold, added, img)


def affine(img: np.ndarray, matrix: tuple[float, ...]) -> np.ndarray:
    """PIL's ``Image.transform(size, AFFINE, matrix)``: output (x, y) samples the input at
    (a x + b y + c, d x + e y + f), PIL's pixel centres at +0.5 converted to OpenCV's; bicubic,
    filled with the mean."""
    a, b, c, d, e, f = matrix
    m = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])
    h, w = img.shape[:2]
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(img, m, (w, h), flags=flags, borderValue=FILL_BGR)


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """PIL's ``Image.rotate(degrees)``: counter-clockwise about the centre (w/2, h/2)."""
    h, w = img.shape[:2]
    angle = -math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine(img, (cos, sin, c, -sin, cos, f))


def shear_x(img: np.ndarray, factor: float) -> np.ndarray:
    return affine(img, (1, factor, 0, 0, 1, 0))


def shear_y(img: np.ndarray, factor: float) -> np.ndarray:
    return affine(img, (1, 0, 0, factor, 1, 0))


def translate_x_rel(img: np.ndarray, fraction: float) -> np.ndarray:
    return affine(img, (1, 0, fraction * img.shape[1], 0, 1, 0))


def translate_y_rel(img: np.ndarray, fraction: float) -> np.ndarray:
    return affine(img, (1, 0, 0, 0, 1, fraction * img.shape[0]))


# --- timm's magnitude -> argument, "increasing" variants -----------------------------------
def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value  # timm's _randomly_negate


def _none(m: float, rng: np.random.Generator) -> float:
    return 0.0


def _rotate_arg(m: float, rng: np.random.Generator) -> float:
    return _negate(m / MAX_LEVEL * 30.0, rng)


def _shear_arg(m: float, rng: np.random.Generator) -> float:
    return _negate(m / MAX_LEVEL * 0.3, rng)


def _translate_rel_arg(m: float, rng: np.random.Generator) -> float:
    return _negate(m / MAX_LEVEL * 0.45, rng)  # timm's translate_pct default


def _enhance_increasing_arg(m: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _negate(m / MAX_LEVEL * 0.9, rng))


def _posterize_increasing_arg(m: float, rng: np.random.Generator) -> float:
    return 4 - int(m / MAX_LEVEL * 4)


def _solarize_increasing_arg(m: float, rng: np.random.Generator) -> float:
    return 256 - int(m / MAX_LEVEL * 256)


def _solarize_add_arg(m: float, rng: np.random.Generator) -> float:
    return int(m / MAX_LEVEL * 110)


Op = tuple[Callable[[np.ndarray, float], np.ndarray], Callable[[float, np.random.Generator], float]]
# timm's _RAND_INCREASING_TRANSFORMS, in its order (the "inc1" set).
INCREASING_OPS: dict[str, Op] = {
    "AutoContrast": (autocontrast, _none),
    "Equalize": (equalize, _none),
    "Invert": (invert, _none),
    "Rotate": (rotate, _rotate_arg),
    "PosterizeIncreasing": (posterize, _posterize_increasing_arg),
    "SolarizeIncreasing": (solarize, _solarize_increasing_arg),
    "SolarizeAdd": (solarize_add, _solarize_add_arg),
    "ColorIncreasing": (color, _enhance_increasing_arg),
    "ContrastIncreasing": (contrast, _enhance_increasing_arg),
    "BrightnessIncreasing": (brightness, _enhance_increasing_arg),
    "SharpnessIncreasing": (sharpness, _enhance_increasing_arg),
    "ShearX": (shear_x, _shear_arg),
    "ShearY": (shear_y, _shear_arg),
    "TranslateXRel": (translate_x_rel, _translate_rel_arg),
    "TranslateYRel": (translate_y_rel, _translate_rel_arg),
}


@dataclass(frozen=True)
class RandAugment:
    """timm's ``rand-m{magnitude}-mstd{magnitude_std}-inc1`` with ``num_ops`` layers."""

    num_ops: int = 2  # timm's default n
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5  # timm's per-op probability in rand_augment_ops

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ops = list(INCREASING_OPS.values())
        for index in rng.integers(0, len(ops), size=self.num_ops):  # with replacement
            if rng.random() > self.prob:
                continue
            magnitude = float(np.clip(rng.normal(self.magnitude, self.magnitude_std), 0, 10))
            op, level = ops[index]
            img = op(img, level(magnitude, rng))
        return img


def random_erasing(
    img: np.ndarray,
    rng: np.random.Generator,
    prob: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
    attempts: int = 10,
) -> np.ndarray:
    """timm's ``RandomErasing(probability, mode="pixel", max_count=1)``: with chance `prob`, one
    rectangle of a random area fraction and log-uniform aspect ratio gets per-pixel normal
    values (N(0, 1) after normalisation: the ImageNet mean + std x N(0, 1) in pixels, rounded
    and clipped to uint8 here, since the workers emit bytes)."""
    if rng.random() > prob:
        return img
    h, w = img.shape[:2]
    for _ in range(attempts):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(*log_aspect))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            noise = MEAN_BGR + STD_BGR * rng.standard_normal((eh, ew, 3))
            out = img.copy()
            out[top : top + eh, left : left + ew] = np.clip(np.round(noise), 0, 255)
            return out
    return img
