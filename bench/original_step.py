"""One training step of the original release (TensorFlow 1 + tensorpack), timed in its own
environment: run by bench/vs_original.py with the Python that has TensorFlow and tensorpack.

    TF_USE_LEGACY_KERAS=1 /path/venv/bin/python bench/original_step.py --original /path/orig \\
        [--image-size 64] [--batch 16] [--attack-iter 10] [--threads 2] [--warmup 2] [--repeats 5]

Imports the original's modules from the checkout (nets.ResNetModel, ``-d 50``; its
adv_model.PGDAttacker with main.py's training settings: epsilon 16, step size 1 (which its
constructor raises to epsilon / iterations = 1.6 for PGD-10), prob_start_from_clean 0.2; its
loss, label smoothing 0.1 and weight decay; its optimizer, momentum 0.9 Nesterov at lr 0.1) and
builds the training graph as tensorpack's SimpleTrainer does (the single-process form of main.py's
HorovodTrainer). One step is one ``Session.run`` of what the original runs every iteration:
the train op (the PGD attack's ``tf.while_loop``, forward, backward, SGD update) with the
BatchNorm moving-average updates (tensorpack's RunUpdateOps callback) and the moving-summary ops
(its MovingAverageSummary callback). Input: the original's own ``input``/``label`` placeholders
(uint8 BGR images, int32 labels), fed a fixed batch of uniform random pixels in [0, 255] and
random labels; no data pipeline. Data format (``--layout``): the original's NCHW
(resnet_backbone fixes it), which TensorFlow's oneDNN build runs on the CPU except the max-pool's
gradient (shim 4); or NHWC, TensorFlow's own CPU layout (shim 5).
Threads: intra- and inter-op both --threads; fp32 (the original's fp16 attack needs XLA on GPUs).

Prints one JSON line: the step times in seconds (each ``--repeats`` run after ``--warmup``), the
first step's time (graph optimisation included), TensorFlow's version, the data format, and a
check from the first step: the largest |adversarial - clean| over the batch (the attack's
epsilon 16/255*2 = 0.1255 in the model's [-1, 1] input, reached by the attack's clipping) and the
loss, which must be finite.

Shims, applied at run time here because the original targets TensorFlow 1.x (nothing is written
to the checkout):
  1. ``tensorflow`` is aliased to ``tensorflow.compat.v1`` (with ``disable_v2_behavior()``) in
     ``sys.modules`` while the original's modules are imported, so their ``import tensorflow as
     tf`` sees the 1.x API (tf.placeholder, tf.variable_scope, tf.random_uniform, tf.GraphKeys,
     tf.train.MomentumOptimizer, tf.losses ...); the real module is put back afterwards.
  2. ``tf.contrib.layers.l2_regularizer`` (imagenet_utils / adv_model's weight decay; contrib is
     gone in TF 2) is provided on that alias as ``scale * tf.nn.l2_loss(w)``, contrib's formula.
  3. ``TF_USE_LEGACY_KERAS=1`` (set here when unset, before TensorFlow is imported) with the
     ``tf-keras`` package installed: tensorpack 0.11 builds Conv2D, FullyConnected, MaxPooling
     from ``tf.compat.v1.layers``, which Keras 3 no longer provides.
  4. ``--layout nchw`` (the original's): resnet_model's ``MaxPooling`` (pool0, the model's only
     max-pool) is wrapped to pool in NHWC between two transposes: the original is NCHW
     throughout, and TensorFlow's CPU kernel for its gradient (MaxPoolGrad, in every attack
     iteration) takes only NHWC ("Default MaxPoolingGradOp only supports NHWC on device type
     CPU"); oneDNN runs the rest in NCHW.
  5. ``--layout nhwc`` (TensorFlow's native CPU layout, to give the original its best case):
     resnet_model's ``argscope`` turns its ``data_format='NCHW'`` into ``'NHWC'`` (every conv,
     pool, BatchNorm of the backbone), and adv_model's NHWC-to-NCHW ``tf.transpose`` of the
     input image is the identity (adv_model alone gets a copy of the alias with that one
     permutation passed through). The arithmetic is the same; only the memory layout differs.
No shim touches the model's arithmetic, the attack, the loss or the optimizer. The EMA variables
of tensorpack's moving summaries are local variables, initialised here as tensorpack's session
creator does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

# Feature Denoising, Sec 6 / the original's main.py for training.
EPSILON = 16.0
STEP_SIZE = 1.0
PROB_START_FROM_CLEAN = 0.2
DEPTH = 50
NUM_CLASSES = 1000


def v1_alias(tf: types.ModuleType) -> types.ModuleType:
    """A module that answers as ``tensorflow.compat.v1``, plus contrib's l2_regularizer."""
    v1 = tf.compat.v1
    alias = types.ModuleType("tensorflow")
    alias.__dict__.update({k: getattr(v1, k) for k in dir(v1) if not k.startswith("__")})
    alias.__version__ = tf.__version__

    def l2_regularizer(scale: float):
        return lambda weights: scale * v1.nn.l2_loss(weights)

    layers = types.SimpleNamespace(l2_regularizer=l2_regularizer)
    alias.contrib = types.SimpleNamespace(layers=layers)
    return alias


def nhwc_max_pooling(max_pooling, tf: types.ModuleType):
    """Shim 4: tensorpack's MaxPooling on an NCHW tensor, computed in NHWC between two
    transposes (TensorFlow's CPU MaxPoolGrad takes only NHWC); argscope still applies to it."""

    def MaxPooling(name, x, *args, **kwargs):  # noqa: N802 (argscope keys on the name)
        kwargs["data_format"] = "NHWC"
        y = max_pooling(name, tf.transpose(x, [0, 2, 3, 1]), *args, **kwargs)
        return tf.transpose(y, [0, 3, 1, 2])

    MaxPooling.__argscope_enabled__ = True
    return MaxPooling


def nhwc_argscope(argscope):
    """Shim 5: tensorpack's argscope with the backbone's data_format='NCHW' turned NHWC."""

    def nhwc(layers, **kwargs):
        if kwargs.get("data_format") == "NCHW":
            kwargs["data_format"] = "NHWC"
        return argscope(layers, **kwargs)

    return nhwc


def input_transpose_passed(alias: types.ModuleType) -> types.ModuleType:
    """Shim 5: a copy of the alias whose ``transpose`` leaves the NHWC-to-NCHW permutation of
    the input image undone (any other permutation is transposed as before)."""
    copy = types.ModuleType("tensorflow")
    copy.__dict__.update(alias.__dict__)

    def transpose(x, perm=None, *args, **kwargs):
        if list(perm or ()) == [0, 3, 1, 2]:
            return x
        return alias.transpose(x, perm, *args, **kwargs)

    copy.transpose = transpose
    return copy


def import_original(
    checkout: Path, tf: types.ModuleType, layout: str
) -> tuple[types.ModuleType, ...]:
    """The original's ``nets`` and ``adv_model``, imported from `checkout` with shims 1, 2 and
    those of `layout` (4 or 5)."""
    sys.path.insert(0, str(checkout))
    real = sys.modules["tensorflow"]
    sys.modules["tensorflow"] = v1_alias(tf)
    try:  # the original's modules (sys.path[0]), not this project's of the same names
        import resnet_model

        import adv_model
        import nets
    finally:
        sys.modules["tensorflow"] = real
    if layout == "nchw":
        resnet_model.MaxPooling = nhwc_max_pooling(resnet_model.MaxPooling, tf)
    else:
        resnet_model.argscope = nhwc_argscope(resnet_model.argscope)
        adv_model.tf = input_transpose_passed(adv_model.tf)
    for module in (nets, adv_model, resnet_model):
        if Path(module.__file__).resolve().parent != checkout.resolve():
            raise RuntimeError(f"{module.__name__} came from {module.__file__}, not {checkout}")
    return nets, adv_model


def build_step(args: argparse.Namespace, tf: types.ModuleType, nets, adv_model):
    """The training graph as tensorpack's SimpleTrainer builds it; returns (fetches, feeds)."""
    from tensorpack import PlaceholderInput, SimpleTrainer
    from tensorpack.tfutils.summary import MOVING_SUMMARY_OPS_KEY

    v1 = tf.compat.v1
    model = nets.ResNetModel(argparse.Namespace(depth=DEPTH))
    model.image_shape = args.image_size
    model.set_attacker(
        adv_model.PGDAttacker(
            args.attack_iter, EPSILON, STEP_SIZE, prob_start_from_clean=PROB_START_FROM_CLEAN
        )
    )
    trainer = SimpleTrainer()
    trainer.setup_graph(
        model.get_input_signature(), PlaceholderInput(), model.build_graph, model.get_optimizer
    )
    graph = v1.get_default_graph()
    updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
    summaries = v1.get_collection(MOVING_SUMMARY_OPS_KEY)
    step = v1.group(trainer.train_op, *updates, *summaries, name="benchmark_step")
    tensors = {
        name: graph.get_tensor_by_name(f"{name}:0")
        for name in ("input", "label", "adv_training_sample", "cost")
    }
    return step, tensors, len(updates)


def batch(args: argparse.Namespace):
    """Uniform random BGR pixels in [0, 255] (uint8) and random labels, fixed by seed 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, args.batch, dtype=np.int32)
    return images, labels


def check_attack(images, adv, cost: float, epsilon: float, layout: str) -> float:
    """The largest perturbation of the first step; raises unless the attack moved the image
    within epsilon (model input scale) and the loss is finite."""
    import numpy as np

    clean = images.astype(np.float32) * (2.0 / 255) - 1.0
    if layout == "nchw":
        clean = clean.transpose(0, 3, 1, 2)
    largest = float(np.abs(adv - clean).max())
    if not (0 < largest <= epsilon + 1e-5) or not np.isfinite(cost):
        raise RuntimeError(f"attack check failed: max |adv - clean| {largest}, loss {cost}")
    return largest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--original", type=Path, required=True, help="checkout of the original")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw", help="shims 4 / 5")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # shim 3, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    tf.compat.v1.disable_v2_behavior()
    nets, adv_model = import_original(args.original, tf, args.layout)
    step, t, bn_updates = build_step(args, tf, nets, adv_model)
    images, labels = batch(args)
    feed = {t["input"]: images, t["label"]: labels}
    v1 = tf.compat.v1
    config = v1.ConfigProto(
        intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=args.threads
    )
    with v1.Session(config=config) as sess:
        sess.run([v1.global_variables_initializer(), v1.local_variables_initializer()])
        start = time.perf_counter()
        _, adv, cost = sess.run([step, t["adv_training_sample"], t["cost"]], feed)
        first = time.perf_counter() - start
        epsilon = EPSILON * adv_model.IMAGE_SCALE
        largest = check_attack(images, adv, float(cost), epsilon, args.layout)
        for _ in range(args.warmup):
            sess.run(step, feed)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sess.run(step, feed)
            times.append(time.perf_counter() - start)
    result = {
        "times": times,
        "median": statistics.median(times),
        "first_step": first,
        "tf": tf.__version__,
        "data_format": args.layout.upper(),
        "threads": args.threads,
        "max_perturbation": largest,
        "loss": float(cost),
        "bn_update_ops": bn_updates,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
