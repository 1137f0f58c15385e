"""Throughput of ``third_party/serve-data.py`` as seen by a consumer process (prints one table).

    python bench/data_server.py [--batches 200] [--images 200] [--batch 32]
        [--augment fbresnet randaugment-erasing]

Rows: the ``--fake`` server over ipc (transport only), then, per training augmentation, real
JPEG decoding + augmentation of a generated folder of 500x375 JPEGs with 1 and 2 worker
processes, against a single-process loop doing the same decode + augment work in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make ``iat`` importable when run as a script

from iat.data.augment import TRAIN_AUGMENTATIONS  # noqa: E402
from iat.data.client import ZMQBatchClient  # noqa: E402
from iat.data.layouts import list_split, read_image_bgr  # noqa: E402

SCRIPT = REPO / "third_party" / "serve-data.py"
IMAGE_SIZE = 224
WARMUP_BATCHES = 5


def write_jpeg_folder(root: Path, n_images: int, classes: int = 4) -> Path:
    """``n_images`` 500x375 JPEGs with smooth, photo-like content spread over ``classes``."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        class_dir = root / "train" / f"n{i % classes:08d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (500, 375), interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 24, image.shape, dtype=np.uint8))
        cv2.imwrite(str(class_dir / f"{i:05d}.JPEG"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def measure_server(args: list[str], address: str, batches: int) -> tuple[float, float]:
    """Start the server, pull ``batches`` batches after a warm-up; return (images/s, MB/s)."""
    server = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--bind", address, "--log-every", "3600"],
        start_new_session=True,
    )
    try:
        with ZMQBatchClient(address, timeout_s=120, prefetch=2) as client:
            for _ in range(WARMUP_BATCHES):
                next(client)
            images = 0
            start = time.perf_counter()
            for _ in range(batches):
                batch, _ = next(client)
                images += len(batch)
            elapsed = time.perf_counter() - start
        return images / elapsed, images * batch[0].nbytes / elapsed / 1e6
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def measure_single_process(folder: Path, n_images: int, augment: str) -> tuple[float, float]:
    """Decode + augment ``n_images`` in this process, as one worker would; (images/s, MB/s)."""
    transform = TRAIN_AUGMENTATIONS[augment]
    samples, _ = list_split(folder, "train")
    cv2.setNumThreads(1)  # as in a server worker
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(n_images):
        out = transform(read_image_bgr(samples[i % len(samples)][0]), rng, IMAGE_SIZE)
    elapsed = time.perf_counter() - start
    return n_images / elapsed, n_images * out.nbytes / elapsed / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200, help="batches timed for --fake")
    p.add_argument("--images", type=int, default=200, help="JPEGs in the generated folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts")
    p.add_argument(
        "--augment",
        nargs="+",
        default=["fbresnet", "randaugment-erasing"],
        choices=sorted(TRAIN_AUGMENTATIONS),
        help="training augmentations to compare",
    )
    a = p.parse_args()
    common = ["--batch", str(a.batch), "--image-size", str(IMAGE_SIZE)]
    rows = []
    rate = measure_server([*common, "--fake"], f"ipc://@bench-{uuid.uuid4().hex}", a.batches)
    rows.append(("--fake over ipc", "-", *rate))
    loops = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_jpeg_folder(Path(tmp), a.images)
        real_batches = max(2, 2 * a.images // a.batch)
        for augment in a.augment:
            loops[augment] = measure_single_process(folder, a.images, augment)
            rows.append((f"{augment}, single-process loop", "1", *loops[augment]))
            for workers in a.workers:
                args = [*common, "--data", str(folder), "--workers", str(workers)]
                args += ["--train-augment", augment]
                address = f"ipc://@bench-{uuid.uuid4().hex}"
                rate = measure_server(args, address, real_batches)
                rows.append((f"{augment}, server", str(workers), *rate))
    print(f"\nbatch {a.batch}, {IMAGE_SIZE}x{IMAGE_SIZE}x3 uint8, {os.cpu_count()} CPU cores")
    print(f"{'mode':40s} {'workers':>7s} {'images/s':>10s} {'MB/s':>9s} {'vs loop':>8s}")
    for mode, workers, images_s, mb_s in rows:
        loop = loops.get(mode.split(",")[0])
        speedup = f"{images_s / loop[0]:.2f}x" if loop else ""
        print(f"{mode:40s} {workers:>7s} {images_s:10.1f} {mb_s:9.1f} {speedup:>8s}")


if __name__ == "__main__":
    main()
