"""Writes fixtures.json: the reference logits of the cases in tests/reference_weights.py.

Run once in a separate environment holding timm and torchvision (never by the tests; see
ORIGIN.md): PYTHONPATH=. /tmp/refvenv/bin/python tests/data/reference_models/make_fixtures.py
"""

import json
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


def reference_model(case: dict) -> torch.nn.Module:
    kwargs = dict(case["reference"])
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
