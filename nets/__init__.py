"""Model zoo: ResNet / ResNeXt (-Denoise) classifiers compatible with the original checkpoints."""

from nets.checkpoint import (
    ARCHITECTURE_KEY,
    CheckpointError,
    Weights,
    checkpoint_num_classes,
    describe_architecture,
    load_npz_dict,
    load_weights,
    model_to_npz_dict,
    npz_variable_shapes,
    read_weights,
    save_npz,
    save_weights,
)
from nets.denoise import DenoisingBlock, dot_product_nonlocal, softmax_nonlocal
from nets.resnet import (
    ARCHITECTURES,
    NUM_BLOCKS,
    Bottleneck,
    DenoisedBottleneck,
    ResNet,
    available_architectures,
    build_model,
    register,
)

__all__ = [
    "ARCHITECTURE_KEY",
    "ARCHITECTURES",
    "NUM_BLOCKS",
    "Bottleneck",
    "CheckpointError",
    "checkpoint_num_classes",
    "DenoisedBottleneck",
    "DenoisingBlock",
    "describe_architecture",
    "ResNet",
    "available_architectures",
    "build_model",
    "dot_product_nonlocal",
    "load_npz_dict",
    "load_weights",
    "model_to_npz_dict",
    "npz_variable_shapes",
    "read_weights",
    "register",
    "save_npz",
    "save_weights",
    "softmax_nonlocal",
    "Weights",
]
