"""ConvNeXt, ViT, Swin and torchvision's ResNets against their reference definitions: exact
parameter counts (ViT-H/14 and ViT-g/14: timm's counts and tensor shapes, on the meta device),
and the logits timm / torchvision computed from the same seeded weights and pixels
(tests/data/reference_models, see its ORIGIN.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference_weights import CASES, representative, seeded_pixels, seeded_state

import nets

FIXTURES = json.loads(
    (Path(__file__).parent / "data" / "reference_models" / "fixtures.json").read_text()
)
# float32 rounding: the references compute the same operations, sometimes in another order.
ATOL, RTOL = 1e-5, 1e-5


def build_case(name: str) -> torch.nn.Module:
    case = CASES[name]
    return nets.build_model(
        case["arch"], num_blocks=case["num_blocks"], width=case["width"], num_classes=10
    )


def reference_state(name: str) -> dict[str, torch.Tensor]:
    return seeded_state([(key, shape) for key, shape in FIXTURES[name]["shapes"]])


@pytest.mark.parametrize(
    ("arch", "count"),
    [
        ("convnext_tiny", 28_589_128),  # timm convnext_tiny
        ("vit_small_patch16_224", 22_050_664),  # timm vit_small_patch16_224
        ("swin_tiny_patch4_window7_224", 28_288_354),  # timm swin_tiny_patch4_window7_224
        ("resnet50", 25_557_032),  # torchvision resnet50
        ("wide_resnet50_2", 68_883_240),  # torchvision wide_resnet50_2
        # The authors' get_new_model (nmndeep/revisiting-at, rb_architecture_util.py):
        ("convnext_t_cvst", 28_627_432),
        ("convnext_b_cvst", 88_753_416),
        ("vit_s_cvst", 22_777_576),
        ("vit_b_cvst", 87_147_112),
    ],
)
def test_parameter_count(arch: str, count: int) -> None:
    with torch.device("meta"):
        model = nets.build_model(arch, depth=nets.depths_of(arch)[0])
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("arch", sorted(FIXTURES["full_size"]))
def test_full_size_vits_have_timms_parameters_and_shapes(arch: str) -> None:
    """ViT-H/14 and ViT-g/14 (g/14's MLP hidden width 6144 = int(1408 * 48 / 11)), built on the
    meta device as the fixture's timm models were: nothing is allocated."""
    reference = FIXTURES["full_size"][arch]
    with torch.device("meta"):
        model = nets.build_model(arch, depth=nets.depths_of(arch)[0])
    assert sum(p.numel() for p in model.parameters()) == reference["parameters"]
    assert len(model.blocks) == reference["blocks"]
    shapes = {
        key: list(tensor.shape)
        for key, tensor in model.state_dict().items()
        if representative(key) and not key.startswith("preprocess.")
    }
    assert shapes == dict(reference["shapes"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_reference(name: str) -> None:
    model = build_case(name).eval()
    state = model.state_dict()
    reference = reference_state(name)
    assert set(state) - set(reference) == {"preprocess.mean", "preprocess.std"}
    model.load_state_dict({**state, **reference})
    with torch.no_grad():
        logits = model(seeded_pixels(CASES[name]["image_size"]))
    expected = torch.tensor(FIXTURES[name]["logits"])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["convnext", "vit", "swin"])
def test_grad_checkpointing_gives_the_same_gradients(name: str) -> None:
    case = CASES[name]
    pixels = seeded_pixels(case["image_size"])[:1].requires_grad_()
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = nets.build_model(
            case["arch"],
            num_blocks=case["num_blocks"],
            width=case["width"],
            num_classes=10,
            grad_checkpointing=checkpointed,
        )
        model(pixels).sum().backward()
        grads.append((pixels.grad.clone(), [p.grad.clone() for p in model.parameters()]))
        pixels.grad = None
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_drops_whole_residual_branches_in_training_only() -> None:
    case = CASES["vit"]
    torch.manual_seed(0)
    model = nets.build_model(case["arch"], num_blocks=(4,), width=8, num_classes=10, drop_path=0.5)
    rates = [block.drop_path.rate for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])  # linear from 0 to the rate
    pixels = seeded_pixels(32)
    model.eval()
    assert torch.equal(model(pixels), model(pixels))
    model.train()
    assert not torch.equal(model(pixels), model(pixels))


def test_options_are_refused_where_the_architecture_lacks_them() -> None:
    with pytest.raises(ValueError, match="ResNet has no drop path option; .*convnext_tiny"):
        nets.build_model("ResNet", depth=50, drop_path=0.1)
    with pytest.raises(ValueError, match="resnet50 has no grad checkpointing option"):
        nets.build_model("resnet50", depth=50, grad_checkpointing=True)
    with pytest.raises(ValueError, match="1 positive integers"):
        nets.build_model("vit_small_patch16_224", num_blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="width 5 scales its 96 channels to 7.5"):
        nets.build_model("convnext_tiny", num_blocks=(1, 1, 1, 1), width=5)


def test_models_take_bgr_pixels_and_refuse_other_input() -> None:
    model = build_case("convnext").eval()
    pixels = seeded_pixels(64)
    with torch.no_grad():
        flipped = model.preprocess(pixels.flip(1))
    # Swapping the channel order is not the same image: the model reads BGR.
    assert not torch.allclose(flipped, model.preprocess(pixels))
    with pytest.raises(ValueError, match="float tensor in \\[0, 255\\]"):
        model(pixels.to(torch.uint8))
