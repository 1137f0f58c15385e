"""The fbresnet augmentation and the validation transform of ``iat.data.augment``."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from iat.data import augment


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w", "size"), [(375, 500, 224), (40, 48, 32), (300, 200, 64)])
def test_augment_shape_dtype(h: int, w: int, size: int) -> None:
    out = augment.fbresnet_augment(_noise(h, w), np.random.default_rng(1), size=size)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_augment_deterministic_per_seed() -> None:
    img = _noise(120, 160)

    def run(seed: int) -> bytes:
        return augment.fbresnet_augment(img, np.random.default_rng(seed), size=64).tobytes()

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_augment_rejects_non_bgr_uint8() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        augment.fbresnet_augment(np.zeros((8, 8), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="float32"):
        augment.eval_transform(np.zeros((8, 8, 3), np.float32))


def test_random_sized_crop_fallback_on_extreme_aspect() -> None:
    # 10x2000: every candidate crop (>= 8% of the area, aspect within [3/4, 4/3]) is taller than
    # 10 pixels, so all attempts fail and the fallback must be used.
    img = _noise(10, 2000)
    out = augment.random_sized_crop(img, np.random.default_rng(3), 32)
    resized = cv2.resize(img, (6400, 32), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(out, resized[:, 3184:3216])


def test_random_sized_crop_takes_the_drawn_window() -> None:
    img = _noise(90, 120)
    out = augment.random_sized_crop(img, np.random.default_rng(5), 48)
    # Replay the draws independently, attempt by attempt, as GoogleNetResize describes them.
    rng = np.random.default_rng(5)
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * 90 * 120
        ratio = rng.uniform(0.75, 4.0 / 3.0)
        w, h = int(math.sqrt(area * ratio) + 0.5), int(math.sqrt(area / ratio) + 0.5)
        if rng.uniform() < 0.5:
            w, h = h, w
        if h <= 90 and w <= 120:
            y, x = int(rng.integers(0, 90 - h + 1)), int(rng.integers(0, 120 - w + 1))
            break
    else:
        pytest.fail("seed chosen so that a crop fits")
    expected = cv2.resize(img[y : y + h, x : x + w], (48, 48), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(out, expected)


def test_lighting_matches_hand_computation() -> None:
    img = np.full((2, 3, 3), 100.0, dtype=np.float32)
    # alpha on the smallest fb.resnet.torch eigenvalue 0.0045 (eigenvector, RGB order,
    # [0.4009, -0.8140, 0.4203]); in BGR the shift is reversed: [0.4203, -0.8140, 0.4009].
    out = augment.lighting(img, np.array([2.0, 0.0, 0.0]))
    scale = 2.0 * 0.0045 * 255.0
    expected_bgr = 100.0 + scale * np.array([0.4203, -0.8140, 0.4009])
    np.testing.assert_allclose(out[1, 2], expected_bgr, rtol=1e-6)
    # alpha on the largest eigenvalue 0.2175 (RGB eigenvector [-0.5675, -0.5808, -0.5836]).
    out = augment.lighting(img, np.array([0.0, 0.0, 1.0]))
    expected_bgr = 100.0 + 0.2175 * 255.0 * np.array([-0.5836, -0.5808, -0.5675])
    np.testing.assert_allclose(out[0, 0], expected_bgr, rtol=1e-6)


def test_saturation_contrast_brightness_match_hand_computation() -> None:
    b, g, r = 40.0, 120.0, 200.0
    img = np.zeros((2, 2, 3), dtype=np.float32)
    img[...] = (b, g, r)
    img[1, 1] = (0.0, 0.0, 0.0)
    gray = 0.114 * b + 0.587 * g + 0.299 * r  # ITU-R BT.601 luma, as cv2.COLOR_BGR2GRAY

    sat = augment.saturation(img, 1.3)
    np.testing.assert_allclose(sat[0, 0], 1.3 * np.array([b, g, r]) - 0.3 * gray, rtol=1e-4)
    np.testing.assert_allclose(sat[1, 1], 0.0, atol=1e-4)

    mean = 3 * gray / 4
    con = augment.contrast(img, 0.5)
    np.testing.assert_allclose(con[0, 0], (np.array([b, g, r]) - mean) * 0.5 + mean, rtol=1e-4)
    np.testing.assert_allclose(con[1, 1], mean * 0.5, rtol=1e-4)

    np.testing.assert_allclose(augment.brightness(img, 1.25)[0, 0], [50.0, 150.0, 250.0])


def test_to_uint8_clips_and_rounds() -> None:
    out = augment.to_uint8(np.array([-5.0, 300.0, 1.4, 1.6, 254.7], dtype=np.float32))
    np.testing.assert_array_equal(out, [0, 255, 1, 2, 255])
    assert out.dtype == np.uint8


def test_horizontal_flip_about_half_the_time() -> None:
    # A gray left-to-right ramp stays gray and monotone under every colour jitter (all factors
    # are positive, saturation leaves gray unchanged, lighting adds a constant per channel), so
    # the sign of right-minus-left tells whether the output was flipped.
    ramp = np.tile(np.linspace(30, 220, 200, dtype=np.float32), (150, 1))
    img = np.repeat(ramp[:, :, None], 3, axis=2).round().astype(np.uint8)
    flipped = 0
    for seed in range(200):
        out = augment.fbresnet_augment(img, np.random.default_rng(seed), size=32).astype(float)
        flipped += out[:, -4:].mean() < out[:, :4].mean()
    assert 60 <= flipped <= 140


def test_eval_transform_resize_and_centre_crop() -> None:
    img = _noise(375, 500)
    out = augment.eval_transform(img, size=224)
    # Shorter edge 375 -> 256 (= 224 * 256 / 224); longer edge 500 * 256 / 375 = 341.33 -> 341.
    resized = cv2.resize(img, (341, 256), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(out, resized[16:240, 58:282])

    tall = _noise(100, 60, seed=2)
    out = augment.eval_transform(tall, size=56)
    # 56 * 256 / 224 = 64: width 60 -> 64, height 100 * 64 / 60 = 106.67 -> 107.
    resized = cv2.resize(tall, (64, 107), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(out, resized[25:81, 4:60])
