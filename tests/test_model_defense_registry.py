"""A model-level defense is one unit (iat.defenses.registry): one module registers the wrapper
with what it is, and training, the checkpoint, evaluation and the summary line follow from that
registration alone."""

import dataclasses
import json

import pytest
import torch
from test_attack_registry import run_python

from iat.defenses.registry import (
    MODEL_DEFENSES,
    classifier_of,
    defense_record,
    parse_frontend,
    register,
)

# A defense that lives outside the repository: each channel scaled by a learnable gate.
NEW_DEFENSE = '''
from dataclasses import asdict, dataclass

import torch
from torch import nn

import nets
from iat.defenses.registry import ModelDefense, WrapOptions, register


@dataclass(frozen=True)
class GateSpec:
    channels: int

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"channel gate ({self.channels} channels)"

    @classmethod
    def from_record(cls, record: object, source: str) -> "GateSpec":
        if not isinstance(record, dict) or set(record) != {"channels"}:
            raise nets.CheckpointError(f"{source}: not a channel gate record")
        return cls(**record)


class Gated(nn.Module):
    def __init__(self, spec, classifier, options: WrapOptions, value: float = 1.0) -> None:
        super().__init__()
        self.spec, self.classifier = spec, classifier
        self.gate = nn.Parameter(torch.full((spec.channels, 1, 1), value))
        self.gate.requires_grad_(options.trainable)

    def forward(self, x):
        return self.classifier(x * self.gate)

    def attack_view(self):
        return self


def gate_from_value(value: str, classifier: nn.Module, options: WrapOptions) -> Gated:
    """--frontend gate:VALUE: every channel's gate starts at VALUE."""
    return Gated(GateSpec(3), classifier, options, float(value))


register(
    ModelDefense(
        name="gate",
        record_field="channel_gate",
        title="channel gate",
        wrapper=Gated,
        build=gate_from_value,
        from_record=GateSpec.from_record,
        shapes=lambda spec: {"gate": (spec.channels, 1, 1)},
        empty=lambda spec, classifier, options: Gated(spec, classifier, options),
        attack_words=lambda gradient: f"channel gate, attacked through {gradient}",
        gradients=("bpda",),
    )
)
'''


def test_a_new_model_level_defense_is_one_module_and_its_registration(tiny_imagenet, tmp_path):
    """Measured: a wrapper registered from outside the repository trains behind --frontend
    NAME:ARGUMENT, its checkpoint records it and reloads it (nets.load_model refuses it as a bare
    classifier), --eval names it in the summary line, and a flag it does not take is refused —
    with no other file changed."""
    (tmp_path / "channel_gate.py").write_text(NEW_DEFENSE)
    run = run_python(
        f"""
        import channel_gate
        import torch
        import nets
        from iat.builders import load_for_inference
        from iat.config import Config
        from main import main
        data, run = {str(tiny_imagenet)!r}, {str(tmp_path / "run")!r}
        tiny = ["--data", data, "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1",
                "--width", "8", "--image-size", "32", "--batch", "4", "--workers", "0",
                "--threads", "1"]
        assert main([*tiny, "--logdir", run, "--loader", "local", "--steps-per-epoch", "2",
                     "--train-eval", "none", "--epochs", "1", "--attack-iter", "1",
                     "--frontend", "gate:0.5", "--frontend-trainable"]) == 0
        ckpt = run + "/checkpoint-epoch0001.pt"
        saved = torch.load(ckpt, weights_only=True)
        print(">", saved["architecture"]["channel_gate"], saved["architecture"]["frontend"])
        print(">", bool((saved["model"]["gate"] != 0.5).any()))  # trainable: the gate moved
        cfg = Config(mode="eval", load=ckpt, data=data, image_size=32, explicit_model_fields=())
        model, cfg = load_for_inference(cfg, torch.device("cpu"))
        print(">", cfg.frontend == "gate:" + ckpt, torch.equal(model.gate, saved["model"]["gate"]))
        try:  # the classifier alone cannot take it
            nets.load_model(ckpt)
        except nets.CheckpointError as error:
            print(">", "carries a model-level defense" in str(error))
        evaluate = ["--eval", *tiny, "--load", ckpt, "--attack-iter", "1", "--attack-target",
                    "none", "--eval-output", run + "/eval.json"]
        assert main(evaluate) == 0
        print(">", "refused", main([*evaluate, "--frontend-gradient", "autograd"]))
        """,
        tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    results = [line[2:] for line in run.stdout.splitlines() if line.startswith("> ")]
    recorded, moved, reloaded, bare, refused = results
    assert recorded == "{'channels': 3} None" and moved == "True"
    assert reloaded == "True True" and bare == "True"
    words = "PGD-1 untargeted, L-inf eps=16, step 16, channel gate, attacked through bpda"
    assert f"{words}: 7 images" in run.stdout
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["threat_model"] == words
    assert refused == "refused 1"
    assert "--frontend-gradient autograd: the channel gate takes bpda" in run.stderr


def test_the_sparse_frontend_is_one_registered_wrapper():
    """--frontend FILE names the sparse-coding frontend; the rest asks the registry."""
    sparse = MODEL_DEFENSES["sparse"]
    assert sparse.record_field == "frontend" and sparse.wrapper.__module__.endswith("frontend")
    assert parse_frontend("weights/frontend.npz") == (sparse, "weights/frontend.npz")
    assert parse_frontend("sparse:a:b.npz") == (sparse, "a:b.npz")
    bare = torch.nn.Linear(2, 2)
    assert classifier_of(bare) is bare and defense_record(bare) == {}
    assert register(sparse) is sparse  # its module run as a command after its import
    with pytest.raises(ValueError, match="name or record field taken"):
        register(dataclasses.replace(sparse, name="other"))
    assert "other" not in MODEL_DEFENSES
