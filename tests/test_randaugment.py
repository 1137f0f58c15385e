"""RandAugment's operations (iat.data.randaugment, OpenCV/NumPy on BGR) against PIL's on fixed
images (timm applies PIL's), random erasing, and the registered training augmentations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from iat.data import randaugment as ra
from iat.data.augment import TRAIN_AUGMENTATIONS


def _image(h: int = 40, w: int = 48) -> np.ndarray:
    """A fixed BGR image: smooth gradients plus texture (every value range exercised)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 60], axis=2)
    img = img + rng.normal(0, 20, img.shape)
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0)


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img[..., ::-1]))


def _bgr(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil)[..., ::-1]


PIL_OPS = {
    "color": (ra.color, lambda p, a: ImageEnhance.Color(p).enhance(a), (0.1, 0.5, 1.9)),
    "contrast": (ra.contrast, lambda p, a: ImageEnhance.Contrast(p).enhance(a), (0.1, 1.9)),
    "brightness": (ra.brightness, lambda p, a: ImageEnhance.Brightness(p).enhance(a), (0.3, 1.9)),
    "sharpness": (ra.sharpness, lambda p, a: ImageEnhance.Sharpness(p).enhance(a), (0.1, 1.9)),
    "autocontrast": (ra.autocontrast, lambda p, a: ImageOps.autocontrast(p), (0,)),
    "equalize": (ra.equalize, lambda p, a: ImageOps.equalize(p), (0,)),
    "invert": (ra.invert, lambda p, a: ImageOps.invert(p), (0,)),
    "posterize": (ra.posterize, lambda p, a: ImageOps.posterize(p, int(a)), (1, 2, 4)),
    "solarize": (ra.solarize, lambda p, a: ImageOps.solarize(p, a), (26, 128, 256)),
}


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_pixel_operations_equal_pil(name):
    ours, theirs, args = PIL_OPS[name]
    img = _image()
    for arg in args:
        diff = np.abs(ours(img, arg).astype(int) - _bgr(theirs(_pil(img), arg)).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (name, arg, diff.max(), diff.mean())


def test_solarize_add_adds_below_the_threshold_only():
    img = _image()
    out = ra.solarize_add(img, 99)
    low = img < 128
    assert np.array_equal(out[~low], img[~low])
    assert np.array_equal(out[low], np.minimum(img[low].astype(int) + 99, 255))


FILL = tuple(reversed(ra.FILL_BGR))
GEOMETRIC = {
    "rotate": (ra.rotate, lambda p, a: p.rotate(a, Image.BICUBIC, fillcolor=FILL), (27.0, -12.0)),
    "shear_x": (
        ra.shear_x,
        lambda p, a: p.transform(
            p.size, Image.AFFINE, (1, a, 0, 0, 1, 0), Image.BICUBIC, fillcolor=FILL
        ),  # fmt: skip
        (0.27, -0.2),
    ),
    "shear_y": (
        ra.shear_y,
        lambda p, a: p.transform(
            p.size, Image.AFFINE, (1, 0, 0, a, 1, 0), Image.BICUBIC, fillcolor=FILL
        ),  # fmt: skip
        (0.27,),
    ),
    "translate_x_rel": (
        ra.translate_x_rel,
        lambda p, a: p.transform(
            p.size, Image.AFFINE, (1, 0, a * p.size[0], 0, 1, 0), Image.BICUBIC, fillcolor=FILL
        ),  # fmt: skip
        (0.4, -0.25),
    ),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_operations_match_pil_up_to_the_bicubic_kernel(name):
    """Same geometry and fill; OpenCV's bicubic (a = -0.75) vs PIL's (a = -0.5) differ by a few
    levels on edges only."""
    ours, theirs, args = GEOMETRIC[name]
    img = _image()
    for arg in args:
        diff = np.abs(ours(img, arg).astype(int) - _bgr(theirs(_pil(img), arg)).astype(int))
        assert np.median(diff) <= 1 and diff.mean() < 3, (name, arg, diff.mean())


def test_rand_augment_draws_two_ops_with_probability_one_half():
    img = _image()
    changed = [
        not np.array_equal(ra.RandAugment()(img, np.random.default_rng(i)), img) for i in range(400)
    ]
    # P(no op applied) = 0.25; a few ops can leave an image unchanged too.
    assert 0.6 < np.mean(changed) < 0.8
    zero = ra.RandAugment(prob=0.0)
    assert np.array_equal(zero(img, np.random.default_rng(0)), img)


def test_random_erasing_fills_one_rectangle_with_normal_pixels():
    img = np.zeros((64, 64, 3), np.uint8)
    assert np.array_equal(ra.random_erasing(img, np.random.default_rng(0), 0.0), img)
    areas, values = [], []
    for i in range(200):
        out = ra.random_erasing(img, np.random.default_rng(i), 1.0)
        erased = (out != 0).any(axis=2)
        rows, cols = np.nonzero(erased)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert erased.sum() >= 0.9 * box  # one rectangle
        areas.append(box / 64**2)
        values.append(out[erased].reshape(-1, 3).mean(axis=0))
    assert min(areas) > 0.015 and max(areas) < 0.34
    assert np.allclose(np.mean(values, axis=0), ra.MEAN_BGR, atol=4)


@pytest.mark.parametrize("name", ["inception", "randaugment", "randaugment-erasing"])
def test_recipe_augmentations_are_seeded_crops_of_the_size(name):
    img = _image(60, 80)
    transform = TRAIN_AUGMENTATIONS[name]
    outs = [transform(img, np.random.default_rng(s), 32) for s in (1, 1, 2)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
