"""Writes this folder's fixture: RobustBench's ImageNet preprocessing of a few odd-sized images.

Run once, never by the tests (ORIGIN.md says how and with which versions):

1. ``python3 tests/data/robustbench/make_fixture.py images`` (the project's environment: the
   images are written with OpenCV, as the tests' data generators write theirs; the one with an
   EXIF orientation with Pillow);
2. ``/tmp/rbvenv/bin/python tests/data/robustbench/make_fixture.py expected`` (a throw-away
   environment with torchvision): each file decoded as torchvision's ImageFolder does (PIL,
   ``convert("RGB")``), then RobustBench's "Res256Crop224": ``Resize(256)``, ``CenterCrop(224)``,
   ``ToTensor()``; saved as uint8 RGB (``ToTensor``'s output times 255) in ``expected.npz``.
"""

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# (file name, height, width): both orientations, a 4:3 photo size, a short edge already 256
IMAGES = (
    ("a_257x300.JPEG", 257, 300),
    ("b_400x257.png", 400, 257),
    ("c_301x401.JPEG", 301, 401),
    ("d_256x310.png", 256, 310),
    ("e_257x300_exif_rotated.JPEG", 257, 300),  # EXIF orientation 6: OpenCV rotates, PIL not
)
EXIF_ORIENTATION = 0x0112


def pixels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random colour blocks of 23 x 17 pixels: sharp edges everywhere for the resampling filter to
    average, flat insides that keep the files small."""
    blocks = rng.integers(0, 256, (h // 23 + 1, w // 17 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(23, axis=0).repeat(17, axis=1)[:h, :w])


def write_images() -> None:
    import cv2
    from PIL import Image

    rng = np.random.default_rng(31)
    for name, h, w in IMAGES:
        if "exif" not in name:
            assert cv2.imwrite(str(HERE / name), pixels(rng, h, w))
            continue
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
        Image.fromarray(pixels(rng, h, w)).save(HERE / name, quality=90, exif=exif)


def write_expected() -> None:
    import torch
    from PIL import Image
    from torchvision import transforms

    # robustbench.data.PREPROCESSINGS["Res256Crop224"]
    res256crop224 = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    )
    expected = {}
    for name, _, _ in IMAGES:
        with open(HERE / name, "rb") as f:  # torchvision.datasets.folder.pil_loader
            img = Image.open(f).convert("RGB")
        tensor = res256crop224(img)
        rgb = (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        crop = transforms.CenterCrop(224)(transforms.Resize(256)(img))
        assert np.array_equal(rgb, np.asarray(crop))  # ToTensor is x / 255: exact in uint8
        expected[name] = rgb
    np.savez_compressed(HERE / "expected.npz", **expected)


if __name__ == "__main__":
    {"images": write_images, "expected": write_expected}[sys.argv[1]]()
