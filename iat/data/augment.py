"""Image transforms as pure functions: the original's ImageNet augmentation (tensorpack
``fbresnet_augmentor``), its validation crop, and the registry of training augmentations.

Images are HxWx3 uint8 BGR arrays (OpenCV order); randomness comes only from the
``np.random.Generator`` passed in, so the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import cv2
import numpy as np
from PIL import Image

from iat.data.randaugment import RandAugment, random_erasing

# fb.resnet.torch (datasets/imagenet.lua) PCA lighting statistics, in RGB order.
_PCA_EIGVAL_RGB = np.array([0.2175, 0.0188, 0.0045], dtype=np.float64) * 255.0
_PCA_EIGVEC_RGB = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ],
    dtype=np.float64,
)
# The original (imagenet_utils.fbresnet_augmentor) reverses both axes of the eigenvector matrix
# and the eigenvalues to work on BGR images.
PCA_EIGVAL_BGR = _PCA_EIGVAL_RGB[::-1].copy()
PCA_EIGVEC_BGR = _PCA_EIGVEC_RGB[::-1, ::-1].copy()

# GoogLeNet-style random-sized crop (Szegedy et al. 2015, "Going Deeper with Convolutions",
# Sec. 6), parameters as in the original's GoogleNetResize.
CROP_AREA_FRACTION = (0.08, 1.0)
CROP_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

# fbresnet_augmentor colour jitter strengths.
BRIGHTNESS_RANGE = (0.6, 1.4)
CONTRAST_RANGE = (0.6, 1.4)
SATURATION_ALPHA = 0.4
LIGHTING_STD = 0.1


def _check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {img.shape} dtype {img.dtype}")


def resize_shortest_edge(img: np.ndarray, size: int) -> np.ndarray:
    """Resize (cubic) so that the shorter side is ``size``, keeping the aspect ratio."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, int(scale * w + 0.5)
    else:
        new_h, new_w = int(scale * h + 0.5), size
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Crop the central ``size`` x ``size`` window (offsets rounded down, as tensorpack)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0 : y0 + size, x0 : x0 + size]


def random_sized_crop(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """GoogLeNet random-sized crop resized to ``size`` x ``size``, with the centre-crop fallback."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(CROP_ATTEMPTS):
        target_area = rng.uniform(*CROP_AREA_FRACTION) * area
        aspect = rng.uniform(*CROP_ASPECT_RATIO)
        crop_w = int(math.sqrt(target_area * aspect) + 0.5)
        crop_h = int(math.sqrt(target_area / aspect) + 0.5)
        if rng.uniform() < 0.5:
            crop_w, crop_h = crop_h, crop_w
        if crop_h <= h and crop_w <= w:
            y0 = int(rng.integers(0, h - crop_h + 1))
            x0 = int(rng.integers(0, w - crop_w + 1))
            crop = img[y0 : y0 + crop_h, x0 : x0 + crop_w]
            return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
    return center_crop(resize_shortest_edge(img, size), size)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale all pixel values by ``factor`` (tensorpack BrightnessScale, no clipping)."""
    return img * np.float32(factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale the deviation from the mean of the grayscale image by ``factor`` (no clipping)."""
    mean = np.float32(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).mean())
    return (img - mean) * np.float32(factor) + mean


def saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grayscale image: ``factor * img + (1 - factor) * gray``."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return img * np.float32(factor) + (gray * np.float32(1.0 - factor))[:, :, np.newaxis]


def lighting(img: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """AlexNet PCA lighting noise (Krizhevsky et al. 2012, Sec. 4.1) with coefficients ``alpha``."""
    shift = PCA_EIGVEC_BGR @ (np.asarray(alpha, dtype=np.float64) * PCA_EIGVAL_BGR)
    return img + shift.astype(np.float32)


def _colour_ops(rng: np.random.Generator) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The four colour jitters with their random parameters drawn, in a random order."""
    ops = [
        partial(brightness, factor=rng.uniform(*BRIGHTNESS_RANGE)),
        partial(contrast, factor=rng.uniform(*CONTRAST_RANGE)),
        partial(saturation, factor=1.0 + rng.uniform(-SATURATION_ALPHA, SATURATION_ALPHA)),
        partial(lighting, alpha=rng.standard_normal(3) * LIGHTING_STD),
    ]
    # fbresnet_augmentor applies the colour jitters through RandomOrderAug.
    return [ops[i] for i in rng.permutation(len(ops))]


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and round to uint8."""
    return np.clip(img, 0, 255).round().astype(np.uint8)


def fbresnet_augment(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Training augmentation of the original: random-sized crop, colour jitter, random flip."""
    _check_image(img)
    out = random_sized_crop(img, rng, size).astype(np.float32)
    for op in _colour_ops(rng):
        out = op(out)
    out = to_uint8(out)
    if rng.uniform() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_transform(img: np.ndarray, size: int = 224) -> np.ndarray:
    """Validation transform of the original: shortest edge to size*256/224, centre crop."""
    _check_image(img)
    resized = resize_shortest_edge(img, int(round(size * 256 / 224)))
    return np.ascontiguousarray(center_crop(resized, size))


def exported_transform(img: np.ndarray, size: int = 224) -> np.ndarray:
    """An image an evaluation exported (``--export-adversarial``: its evaluated crop) as it is
    when it is size x size, so that scoring the export gives the exporting evaluation's numbers
    image by image; any other image as ``eval_transform`` takes it."""
    _check_image(img)
    if img.shape[:2] != (size, size):
        return eval_transform(img, size)
    return np.ascontiguousarray(img)


def robustbench_transform(img: np.ndarray, size: int = 224) -> np.ndarray:
    """RobustBench's ImageNet preprocessing, "Res256Crop224" (torchvision ``Resize(256)``,
    ``CenterCrop(224)``, ``ToTensor()`` on a PIL image), bit for bit on the same decoded pixels:
    the shorter edge to size*256/224 with the longer one truncated as torchvision computes it,
    PIL's antialiased BILINEAR filter (torchvision's default for PIL images), then the centre
    crop with torchvision's rounded offsets. ``ToTensor``'s x/255 is this project's pixel scale.
    RobustBench decodes its files with PIL: ``layouts.read_image_pil_bgr`` (``--benchmark``
    robustbench pairs them: ``iat.eval.benchmarks.transform_for``)."""
    _check_image(img)
    short = int(round(size * 256 / 224))
    h, w = img.shape[:2]
    # torchvision.transforms.functional._compute_resized_output_size (one size: the shorter edge)
    new_h, new_w = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    pil = Image.fromarray(np.ascontiguousarray(img[..., ::-1]))  # RGB
    if (new_h, new_w) != (h, w):  # torchvision returns the image unchanged at its size already
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    # torchvision.transforms.functional.center_crop: offsets int(round((edge - size) / 2.0))
    y0, x0 = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    rgb = np.asarray(pil.crop((x0, y0, x0 + size, y0 + size)))
    return np.ascontiguousarray(rgb[..., ::-1])


def center_crop_transform(img: np.ndarray, size: int = 224) -> np.ndarray:
    """The central crop only, for images already preprocessed to the evaluation size (ImageNet-C
    holds 224 x 224 centre crops: Hendrycks & Dietterich, ICLR 2019)."""
    _check_image(img)
    return np.ascontiguousarray(center_crop(img, size))


def flip_augment(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """The validation crop, flipped horizontally with probability 1/2 (cheap augmentation)."""
    out = eval_transform(img, size)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def no_augment(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """The validation crop only."""
    return eval_transform(img, size)


def pad_crop_flip(img: np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The usual augmentation for small images (CIFAR, Tiny ImageNet; Madry et al. 2018, Sec
    C.1): resized to size x size if needed, zero-padded by size/8 on each side, a random
    size x size crop, and a horizontal flip with probability 1/2."""
    _check_image(img)
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
    pad = max(1, size // SMALL_IMAGE_PAD_FRACTION)
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    y0, x0 = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    out = padded[y0 : y0 + size, x0 : x0 + size]
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def inception_crop_flip(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """The Inception crop (``random_sized_crop``) and a horizontal flip with probability 1/2:
    timm's ``transforms_imagenet_train`` before its auto-augmentation, and fast_adversarial's
    ImageNet training transform."""
    _check_image(img)
    out = random_sized_crop(img, rng, size)
    return np.ascontiguousarray(out[:, ::-1] if rng.uniform() < 0.5 else out)


# timm's rand-m9-mstd0.5-inc1 (ARES 2.0's and revisiting-at's `aa`), and their random erasing
# probability (`reprob: 0.25`).
RAND_M9_MSTD05 = RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5)
RECIPE_ERASING_PROB = 0.25


def randaugment_augment(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Inception crop, flip, RandAugment rand-m9-mstd0.5-inc1 (timm's order)."""
    return np.ascontiguousarray(RAND_M9_MSTD05(inception_crop_flip(img, rng, size), rng))


def randaugment_erasing_augment(
    img: np.ndarray, rng: np.random.Generator, size: int = 224
) -> np.ndarray:
    """``randaugment_augment`` then random erasing with probability 0.25 (timm's order: erasing
    last, on the normalised tensor)."""
    out = randaugment_augment(img, rng, size)
    return np.ascontiguousarray(random_erasing(out, rng, RECIPE_ERASING_PROB))


SMALL_IMAGE_PAD_FRACTION = 8  # 4 pixels of padding for 32x32 images, as Madry et al.
TrainTransform = Callable[[np.ndarray, np.random.Generator, int], np.ndarray]
# --train-augment choices: name -> transform(image, rng, size).
TRAIN_AUGMENTATIONS: dict[str, TrainTransform] = {
    "fbresnet": fbresnet_augment,
    "flip": flip_augment,
    "none": no_augment,
    "pad-crop-flip": pad_crop_flip,
    "inception": inception_crop_flip,
    "randaugment": randaugment_augment,
    "randaugment-erasing": randaugment_erasing_augment,
}
