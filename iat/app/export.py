"""``--export-activations LAYER``: a model's activations over an evaluation split, written for
the embedding-space defenses (``iat.defenses.embedding``: PCA, LESCI's k-NN vote)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from iat.builders import load_for_inference
from iat.data.sources import eval_loader, to_model_input
from iat.defenses.embedding import captured, save_activations
from iat.eval.evaluate import eval_samples
from iat.runtime import distributed


def export_activations(
    model: nn.Module, layer: str, batches, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """The flattened activations of `layer` and the labels over ``(images, labels, ...)``
    batches (uint8 NHWC, as ``sources.eval_loader`` gives them)."""
    model.eval()
    collected, labels = [], []
    with torch.no_grad(), captured(model, layer) as outputs:
        for images, batch_labels, *_ in batches:
            model(to_model_input(images, device))
            collected.append(outputs.pop().cpu())
            labels.append(batch_labels)
    return torch.cat(collected).numpy(), torch.cat(labels).numpy()


def run_export(cfg, device: torch.device) -> Path:
    """--export-activations LAYER: the --load'ed model's activations over --split of --data."""
    samples = eval_samples(cfg)
    model, cfg = load_for_inference(cfg, device)
    loader = eval_loader(
        samples,
        batch=cfg.batch,
        image_size=cfg.image_size,
        workers=cfg.workers,
        rank=0,
        world_size=1,
        pin_memory=device.type == "cuda",
    )
    activations, labels = export_activations(model, cfg.export_activations, loader, device)
    path = Path(cfg.activations_file)
    if distributed.is_main_process():
        save_activations(path, activations, labels)
        print(f"wrote {activations.shape[0]} x {activations.shape[1]} activations to {path}")
    return path
