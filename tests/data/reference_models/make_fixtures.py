"""Writes fixtures.json: the reference logits of the cases in tests/reference_weights.py, and
the parameter counts and tensor shapes of timm's full-size FULL_SIZE models (built on the meta
device: no memory).

Run once in a separate environment holding timm and torchvision (never by the tests; see
ORIGIN.md), REVISITING_AT naming the authors' rb_architecture_util.py (ConvStem):
PYTHONPATH=. /tmp/refvenv/bin/python tests/data/reference_models/make_fixtures.py [CASE ...]
Naming cases recomputes only those (and the full-size models), keeping the file's other entries.
"""

import json
import os
import sys
from pathlib import Path

import timm
import torch
import torchvision
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.resnet import Bottleneck, ResNet

from tests.reference_weights import (
    CASES,
    FULL_SIZE,
    reference_input,
    representative,
    seeded_pixels,
    seeded_state,
)


def convstem_classes() -> dict:
    """The authors' stem classes: their module's text before load_model (which does not parse)."""
    source = Path(os.environ["REVISITING_AT"]).read_text()
    namespace: dict = {}
    exec(
        compile(source[: source.index("def load_model(")], "rb_architecture_util", "exec"),
        namespace,
    )
    return namespace


def reference_model(case: dict) -> torch.nn.Module:
    kwargs = dict(case["reference"])
    if "stem" in case:
        name, args = case["stem"]
        stem = convstem_classes()[name](*args)
        if case["arch"].startswith("vit"):
            model = VisionTransformer(img_size=224, patch_size=16, **kwargs)
            model.patch_embed.proj = stem
        else:
            model = ConvNeXt(**kwargs)
            model.stem = stem
        return model
    if case["arch"].startswith("convnext"):
        return ConvNeXt(**kwargs)
    if case["arch"].startswith("vit"):
        vit = {"img_size": 224, "patch_size": 16, "dynamic_img_size": True}
        return VisionTransformer(**{**vit, **kwargs})
    if case["arch"].startswith("swin"):
        return SwinTransformer(img_size=224, patch_size=4, window_size=7, **kwargs)
    return ResNet(Bottleneck, **kwargs)


def full_size(name: str) -> dict:
    """timm's `name` with 1,000 classes, on the meta device: its parameter count, blocks and
    the shapes of the tensors outside the blocks and of the first block."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    shapes = [(key, list(t.shape)) for key, t in model.state_dict().items() if representative(key)]
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "blocks": len(model.blocks), "shapes": shapes}


def main(names: list[str]) -> None:
    out = Path(__file__).with_name("fixtures.json")
    fixtures = json.loads(out.read_text()) if names else {}
    fixtures["versions"] = {
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
    }
    for name in names or CASES:
        case = CASES[name]
        model = reference_model(case).eval()
        shapes = [(key, list(t.shape)) for key, t in model.state_dict().items()]
        model.load_state_dict(seeded_state(shapes))
        with torch.no_grad():
            logits = model(reference_input(seeded_pixels(case["image_size"])))
        fixtures[name] = {"shapes": shapes, "logits": logits.tolist()}
        print(name, len(shapes), "tensors", file=sys.stderr)
    fixtures["full_size"] = {name: full_size(name) for name in FULL_SIZE}
    out.write_text(json.dumps(fixtures, indent=None) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
