"""A small trained model for attack tests: a conv net with BatchNorm on scikit-learn's digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """A tiny conv net with BatchNorm taking 3x16x16 images in pixel units [0, 255]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 127.5 - 1.0
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.avg_pool2d(x, 2).flatten(1))


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) * (255.0 / 16.0)
    images = F.interpolate(images[:, None], scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    return images.contiguous(), torch.tensor(data.target, dtype=torch.int64)


def train_digits_model() -> dict[str, torch.Tensor | nn.Module]:
    """A DigitsNet trained on 1500 digits; 297 held out. Left in train mode."""
    torch.manual_seed(0)
    images, labels = digits_tensors()
    train_x, train_y, test_x, test_y = images[:1500], labels[:1500], images[1500:], labels[1500:]
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return {"model": model, "x": test_x, "y": test_y}


def eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was_training)
    return logits


def snapshot(model: nn.Module) -> tuple[list[bool], list[bool], dict[str, torch.Tensor]]:
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return modes, flags, buffers


def assert_unchanged(model: nn.Module, before) -> None:
    modes, flags, buffers = before
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())
