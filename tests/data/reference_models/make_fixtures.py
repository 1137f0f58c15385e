"""Writes fixtures.json: the reference logits of the cases in tests/reference_weights.py.

Run once in a separate environment holding timm and torchvision (never by the tests; see
ORIGIN.md), REVISITING_AT naming the authors' rb_architecture_util.py (ConvStem):
PYTHONPATH=. /tmp/refvenv/bin/python tests/data/reference_models/make_fixtures.py
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

from tests.reference_weights import CASES, reference_input, seeded_pixels, seeded_state


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
        return VisionTransformer(img_size=224, patch_size=16, dynamic_img_size=True, **kwargs)
    if case["arch"].startswith("swin"):
        return SwinTransformer(img_size=224, patch_size=4, window_size=7, **kwargs)
    return ResNet(Bottleneck, **kwargs)


def main() -> None:
    fixtures = {
        "versions": {
            "timm": timm.__version__,
            "torchvision": torchvision.__version__,
            "torch": torch.__version__,
        }
    }
    for name, case in CASES.items():
        model = reference_model(case).eval()
        shapes = [(key, list(t.shape)) for key, t in model.state_dict().items()]
        model.load_state_dict(seeded_state(shapes))
        with torch.no_grad():
            logits = model(reference_input(seeded_pixels(case["image_size"])))
        fixtures[name] = {"shapes": shapes, "logits": logits.tolist()}
        print(name, len(shapes), "tensors", file=sys.stderr)
    out = Path(__file__).with_name("fixtures.json")
    out.write_text(json.dumps(fixtures, indent=None) + "\n")


if __name__ == "__main__":
    main()
