"""Writes small TF-slim ``resnet_v2`` checkpoints with ALP's variable names, and their logits.

Run by tests/test_convert_alp.py as a child process (TensorFlow stays out of the pytest
process): ``python tests/alp_tf_checkpoint.py OUT_DIR``. tf_slim 1.1 does not run on TensorFlow
2.16 and later (its batch_norm needs tf_keras, and then TF's removed ``ops.Tensor``), so the
forward pass below is TF-slim's resnet_v2 written out with ``tf.nn`` ops, step by step as in
tf_slim/nets/resnet_v2.py (``bottleneck``, ``resnet_v2``, ``resnet_v2_block``) and
tf_slim/nets/resnet_utils.py (``conv2d_same``, ``subsample``, ``resnet_arg_scope``).

Under OUT_DIR: ``small/model.ckpt`` (3 classes), ``background/model.ckpt`` (1001 classes, with
momentum slots, moving averages of every trainable variable and global_step), ``extra/model.ckpt``
(small plus an unknown variable), ``misshaped/model.ckpt`` (small with a 5x5 kernel where slim
has 3x3), and ``expected.npz``: the images (NHWC RGB in [0, 1]) and each model's logits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet: the test reads stderr
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402

SCOPE = "resnet_v2_50"  # ALP's model scope
NUM_UNITS = (2, 1, 1, 1)  # units per block: block1's first unit keeps the stride 1
WIDTH = 8  # root channels and block1's bottleneck depth (slim: 64)
BLOCK_STRIDES = (2, 2, 2, 1)  # resnet_v2_50: on the last unit of block1..block3
EPSILON = 1e-5  # resnet_arg_scope's batch_norm_epsilon
IMAGE_SIZE = 32
BATCH = 4
SMALL_CLASSES = 3  # the classes of tests/conftest.py's tiny ImageNet
EXTRA_VARIABLE = f"{SCOPE}/block1/unit_1/bottleneck_v2/se/weights"
MISSHAPED_VARIABLE = f"{SCOPE}/block2/unit_1/bottleneck_v2/conv2/weights"
TRAINABLE_LEAVES = ("weights", "biases", "gamma", "beta")


def make_variables(rng: np.random.Generator, num_classes: int) -> dict[str, np.ndarray]:
    """Random weights and non-trivial BN statistics under slim's variable names."""
    variables: dict[str, np.ndarray] = {}

    def conv(scope: str, kernel: int, depth_in: int, depth: int, biases: bool) -> None:
        std = np.sqrt(2.0 / (kernel * kernel * depth_in))
        variables[f"{scope}/weights"] = rng.normal(0, std, (kernel, kernel, depth_in, depth))
        if biases:  # slim conv2d with normalizer_fn=None
            variables[f"{scope}/biases"] = rng.normal(0, 0.1, depth)

    def batch_norm(scope: str, depth: int) -> None:
        variables[f"{scope}/gamma"] = rng.uniform(0.5, 1.5, depth)
        variables[f"{scope}/beta"] = rng.normal(0, 0.2, depth)
        variables[f"{scope}/moving_mean"] = rng.normal(0, 0.2, depth)
        variables[f"{scope}/moving_variance"] = rng.uniform(0.5, 2.0, depth)

    conv(f"{SCOPE}/conv1", 7, 3, WIDTH, biases=True)
    depth_in = WIDTH
    for block, units in enumerate(NUM_UNITS):
        bottleneck_depth = WIDTH * 2**block
        depth = 4 * bottleneck_depth
        for unit in range(units):
            scope = f"{SCOPE}/block{block + 1}/unit_{unit + 1}/bottleneck_v2"
            batch_norm(f"{scope}/preact", depth_in)
            if depth != depth_in:
                conv(f"{scope}/shortcut", 1, depth_in, depth, biases=True)
            conv(f"{scope}/conv1", 1, depth_in, bottleneck_depth, biases=False)
            batch_norm(f"{scope}/conv1/BatchNorm", bottleneck_depth)
            conv(f"{scope}/conv2", 3, bottleneck_depth, bottleneck_depth, biases=False)
            batch_norm(f"{scope}/conv2/BatchNorm", bottleneck_depth)
            conv(f"{scope}/conv3", 1, bottleneck_depth, depth, biases=True)
            depth_in = depth
    batch_norm(f"{SCOPE}/postnorm", depth_in)
    conv(f"{SCOPE}/logits", 1, depth_in, num_classes, biases=True)
    return {name: value.astype(np.float32) for name, value in variables.items()}


def batch_norm(net, v, scope):
    """slim batch_norm (is_training=False, scale=True) with activation_fn=relu."""
    net = tf.nn.batch_normalization(
        net,
        v[f"{scope}/moving_mean"],
        v[f"{scope}/moving_variance"],
        v[f"{scope}/beta"],
        v[f"{scope}/gamma"],
        EPSILON,
    )
    return tf.nn.relu(net)


def conv2d(net, v, scope, stride=1, padding="SAME"):
    """slim conv2d: padding SAME by default; a bias where no normalizer follows."""
    net = tf.nn.conv2d(net, v[f"{scope}/weights"], stride, padding)
    biases = v.get(f"{scope}/biases")
    return net if biases is None else net + biases


def conv2d_same(net, v, scope, stride):
    """resnet_utils.conv2d_same: SAME at stride 1, else explicit padding and VALID."""
    if stride == 1:
        return conv2d(net, v, scope)
    pad_total = v[f"{scope}/weights"].shape[0] - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    net = tf.pad(net, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])
    return conv2d(net, v, scope, stride, "VALID")


def bottleneck(net, v, scope, depth, stride):
    """resnet_v2.bottleneck."""
    depth_in = net.shape[-1]
    preact = batch_norm(net, v, f"{scope}/preact")
    if depth == depth_in:
        # resnet_utils.subsample: max_pool2d [1, 1] with the stride, SAME (resnet_arg_scope).
        shortcut = tf.nn.max_pool2d(net, 1, stride, "SAME")
    else:
        shortcut = conv2d(preact, v, f"{scope}/shortcut", stride)
    residual = batch_norm(conv2d(preact, v, f"{scope}/conv1"), v, f"{scope}/conv1/BatchNorm")
    residual = conv2d_same(residual, v, f"{scope}/conv2", stride)
    residual = batch_norm(residual, v, f"{scope}/conv2/BatchNorm")
    residual = conv2d(residual, v, f"{scope}/conv3")
    return shortcut + residual


def resnet_v2(images, v):
    """resnet_v2.resnet_v2 with global_pool=True: logits [N, classes] of RGB images in [-1, 1]."""
    net = conv2d_same(images, v, f"{SCOPE}/conv1", 2)  # root: no BN, no ReLU
    net = tf.nn.max_pool2d(net, 3, 2, "SAME")  # pool1
    for block, (units, stride) in enumerate(zip(NUM_UNITS, BLOCK_STRIDES, strict=True)):
        depth = 4 * WIDTH * 2**block
        for unit in range(units):
            scope = f"{SCOPE}/block{block + 1}/unit_{unit + 1}/bottleneck_v2"
            net = bottleneck(net, v, scope, depth, stride if unit == units - 1 else 1)
    net = batch_norm(net, v, f"{SCOPE}/postnorm")
    net = tf.reduce_mean(net, [1, 2], keepdims=True)  # pool5
    return tf.squeeze(conv2d(net, v, f"{SCOPE}/logits"), [1, 2]).numpy()


def save_checkpoint(variables: dict[str, np.ndarray], prefix: Path) -> None:
    """A TF1 checkpoint holding exactly `variables` under their names."""
    prefix.parent.mkdir(parents=True)
    with tf.Graph().as_default():
        held = {name: tf.compat.v1.Variable(value) for name, value in variables.items()}
        saver = tf.compat.v1.train.Saver(var_list=held)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix), write_meta_graph=False)


def with_training_state(
    rng: np.random.Generator, variables: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`variables` plus momentum slots, moving averages of the trainable ones and global_step;
    and the averaged model (what ExponentialMovingAverage.variables_to_restore loads)."""
    trainable = [n for n in variables if n.rsplit("/", 1)[-1] in TRAINABLE_LEAVES]
    averages = {n: variables[n] + rng.normal(0, 0.05, variables[n].shape) for n in trainable}
    state = dict(variables)
    for name in trainable:
        state[f"{name}/Momentum"] = rng.normal(0, 0.01, variables[name].shape)
        state[f"{name}/ExponentialMovingAverage"] = averages[name]
    state = {name: value.astype(np.float32) for name, value in state.items()}
    state["global_step"] = np.int64(1234)
    averaged = {**variables, **{n: a.astype(np.float32) for n, a in averages.items()}}
    return state, averaged


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    rgb = images * 2 - 1  # ALP's input convention
    small = make_variables(rng, SMALL_CLASSES)
    save_checkpoint(small, out / "small" / "model.ckpt")
    save_checkpoint({**small, EXTRA_VARIABLE: np.ones((1, 1, 8, 8), np.float32)},
                    out / "extra" / "model.ckpt")  # fmt: skip
    misshaped = {**small, MISSHAPED_VARIABLE: np.ones((5, 5, 16, 16), np.float32)}
    save_checkpoint(misshaped, out / "misshaped" / "model.ckpt")
    background = make_variables(rng, 1001)
    state, averaged = with_training_state(rng, background)
    save_checkpoint(state, out / "background" / "model.ckpt")
    np.savez(
        out / "expected.npz",
        images=images,
        small=resnet_v2(rgb, small),
        background=resnet_v2(rgb, background),
        background_averaged=resnet_v2(rgb, averaged),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
