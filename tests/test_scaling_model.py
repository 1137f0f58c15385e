"""bench/sharding_model.py, the cost model of sharded adversarial training, against hand
computations and against what torch counts on a small ViT (bench/scaling.py --part sharded
prints the same checks, and FSDP2's own collectives counted on 2 processes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from iat.train import fsdp
from nets.vit import VisionTransformer

_PATH = Path(__file__).resolve().parent.parent / "bench" / "sharding_model.py"
_SPEC = importlib.util.spec_from_file_location("sharding_model", _PATH)
sm = sys.modules.setdefault("sharding_model", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(sm)  # registered first: its dataclasses look their module up

VIT_L, VIT_H, VIT_G = sm.MODELS
SMALL = sm.ViT("small", "-", 2, 64, 256, 4, 16, "-", classes=10)  # nets.vit: MLP 4x, patch 16


def test_parameter_counts_are_the_published_ones():
    # ViT-H/14 by hand: a block 4*1280^2 + 2*1280*5120 + 9*1280 + 5120 = 19,677,440, 32 of them;
    # patch 3*14^2*1280 + 1280, class token 1280, 257 positions x 1280, norm 2560, head 1,281,000.
    block = 4 * 1280**2 + 2 * 1280 * 5120 + 9 * 1280 + 5120
    root = 3 * 196 * 1280 + 1280 + 1280 + 257 * 1280 + 2560 + 1280 * 1000 + 1000
    assert block == 19_677_440 and sm.parameter_count(VIT_H) == 32 * block + root == 632_045_800
    # ViT-g/14 (MLP 6144 = 1408 * 48 / 11): Zhai et al.'s 1,011 M is the count without the head.
    assert sm.parameter_count(VIT_G) == 1_012_611_432
    assert sm.parameter_count(VIT_G, head=False) == 1_011_202_432
    assert round(sm.parameter_count(VIT_L) / 1e5) == 3043  # timm: 304.3 M
    assert round(sm.parameter_count(VIT_H) / 1e5) == 6320  # timm: 632.0 M


def test_parameter_counts_equal_the_models_torch_builds():
    for v in (dataclasses.replace(VIT_L, depth=2), SMALL):  # ViT-L's width, MLP and root
        with torch.device("meta"):
            model = VisionTransformer(v.depth, v.width, v.heads, num_classes=v.classes)
        assert sum(p.numel() for p in model.parameters()) == sm.parameter_count(v)
        shapes = sorted(tuple(p.shape) for p in model.parameters())
        assert shapes == sorted(sm.root_shapes(v) + v.depth * sm.block_shapes(v))


def test_gather_volume_of_one_block_and_the_padded_root():
    # One ViT-L block in bf16 over 8 GPUs: every dim 0 (1024, 3072, 4096) divides by 8.
    block = sm.padded_numel(sm.block_shapes(VIT_L), 8)
    assert block == 12_596_224
    assert block * 2 * sm.ring_share(8) == 22_043_392  # bytes each GPU receives
    # The root: on dim 0, pos_embed (1, 197, 1024) and cls_token (1, 1, 1024) padded to 8 rows.
    root = sm.numel(sm.root_shapes(VIT_L))
    assert sm.padded_numel(sm.root_shapes(VIT_L), 8, "dim0") == root + 7 * 197 * 1024 + 7 * 1024
    assert sm.padded_numel(sm.root_shapes(VIT_L), 8) == root  # --fsdp's: along the width
    assert sm.shard_dim((1, 197, 1024), 64) == 2 and sm.shard_dim((1000, 1024), 64) == 1
    assert sm.shard_dim((3072, 1024), 64) == 0  # 64 divides dim 0: fully_shard's default
    # ViT-g's width 1408 = 11 x 128: over 256 no dimension divides evenly, dim 0 is padded.
    assert sm.shard_dim((1, 257, 1408), 128) == 2 and sm.shard_dim((1, 257, 1408), 256) == 0
    assert sm.padded_numel([(1, 257, 1408)], 256) == 256 * 257 * 1408


def test_step_volume_with_and_without_resharding_during_the_attack():
    n, k = 64, 3
    root = sm.padded_numel(sm.root_shapes(VIT_G), n)
    block = sm.padded_numel(sm.block_shapes(VIT_G), n)
    share = 63 / 64
    reshard = sm.step_volume(VIT_G, sm.Setup(k=k), n)
    # 2 (k + 1) gathers of every block, k + 1 of the root; one fp32 reduce-scatter each.
    assert reshard.gathers == 4 + 8 * 40
    assert reshard.gather_bytes == pytest.approx((4 * root + 8 * 40 * block) * 2 * share)
    assert reshard.scatter_bytes == pytest.approx((root + 40 * block) * 4 * share)
    held = sm.step_volume(VIT_G, sm.Setup(k=k, strategy="hold-attack"), n)
    clean = sm.step_volume(VIT_G, sm.Setup(k=0), n)
    assert held == clean and held.gathers == 1 + 2 * 40  # the attack adds no collective
    assert sm.step_volume(VIT_G, sm.Setup(k=k, strategy="hold-step"), n).gathers == 1 + 40


@pytest.mark.parametrize("strategy", sorted(sm.STRATEGIES))
@pytest.mark.parametrize("k", [0, 1, 3])
def test_the_timed_passes_gather_what_the_volume_counts(strategy, k):
    s = sm.Setup(k=k, strategy=strategy)
    passes = sm.passes(VIT_G, s)
    assert len(passes) == 2 * k + 2
    root, block = sm.gathers_per_step(strategy, k)
    assert sum(p.gathers for p in passes) == block
    assert sum(p.root_gathers for p in passes) == root
    assert sum(p.scatters for p in passes) == 1


def test_optimizer_state_and_shards_per_gpu():
    params = sm.parameter_count(VIT_L)
    memory = sm.fsdp_memory(VIT_L, sm.Setup(), 64)
    assert memory.optimizer == params * 8 / 64  # AdamW: exp_avg and exp_avg_sq in fp32
    assert memory.master == memory.grads == params * 4 / 64
    assert memory.held == 0
    sgd = sm.fsdp_memory(VIT_L, sm.Setup(optimizer="sgd-momentum", strategy="hold-attack"), 64)
    assert sgd.optimizer == params * 4 / 64 and sgd.held == params * 2  # whole model, bf16
    assert sm.ddp_state_bytes(VIT_L, "adamw") == params * 20


def test_checkpointing_keeps_one_input_per_block():
    v, s = VIT_G, sm.Setup(batch=1)
    tokens = v.tokens(224)
    full = sm.activation_bytes(v, s)
    ckpt = sm.activation_bytes(v, sm.Setup(batch=1, checkpointed=True))
    one_block = sm.block_saved_bytes(v, tokens, 2, attack=False)
    assert full - ckpt == pytest.approx(40 * one_block - 40 * tokens * 1408 * 2 - one_block)


def _saved_bytes(depth: int, attack: bool) -> int:
    torch.manual_seed(0)
    model = VisionTransformer(depth, SMALL.width, SMALL.heads, num_classes=SMALL.classes)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.requires_grad_(not attack)
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.rand(3, 3, 64, 64).mul(255).requires_grad_(attack)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


@pytest.mark.parametrize("attack", [False, True])
def test_a_blocks_saved_activations_are_what_torch_keeps(attack):
    measured = _saved_bytes(2, attack) - _saved_bytes(1, attack)
    assert measured == 3 * sm.block_saved_bytes(SMALL, SMALL.tokens(64), 4, attack)


def test_flops_are_what_torch_counts():
    torch.manual_seed(0)
    model = VisionTransformer(SMALL.depth, SMALL.width, SMALL.heads, num_classes=SMALL.classes)
    x = torch.rand(1, 3, 64, 64) * 255

    def count(fn) -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    f = sm.forward_flops(SMALL, 64)
    forward = f.linear + f.attention + f.patch + f.head
    assert count(lambda: model(x)) == forward
    assert count(lambda: model(x).sum().backward()) == forward + sm.training_backward(f)
    model.requires_grad_(False)
    attack = count(lambda: model(x.clone().requires_grad_(True)).sum().backward())
    assert attack == forward + sm.attack_backward(f)
    assert sm.step_flops(SMALL, sm.Setup(image=64, k=2)) == count_step(forward, f)


def count_step(forward: float, f) -> float:
    """A PGD-2 step by hand: the training pass and two attack iterations."""
    return forward + sm.training_backward(f) + 2 * (forward + sm.attack_backward(f))


def test_ring_and_hierarchical_times_by_hand():
    assert sm.ring_seconds(8e6, 8, 1e-5, 1e9) == pytest.approx(7e-5 + 7 / 8 * 8e-3)
    c = sm.Cluster(8, 400e9, 5e-6, 50e9, 1e-5, 1e15)
    size = 64e6
    within = 7 * 5e-6 + 7 / 8 * size / 400e9
    across = 3 * 1e-5 + 3 / 4 * (size / 8) / 50e9  # 4 nodes, an eighth each
    assert sm.gather_seconds(size, 32, c, "hierarchical") == pytest.approx(across + within)
    assert sm.gather_seconds(size, 32, c, "ring") == pytest.approx(
        31 * 1e-5 + 31 / 32 * size / 50e9
    )
    assert sm.scatter_seconds(size, 32, c, "hsdp") == pytest.approx(within + 2 * across)


def test_overlap_never_beats_compute_and_serial_is_the_sum():
    c = sm.Cluster(8, 450e9, 5e-6, 50e9, 1e-5, 400e12)
    for layout in sm.LAYOUTS:
        t = sm.step_time(VIT_G, sm.Setup(), 256, c, layout)
        assert t.compute <= t.overlapped <= t.serial
    fast = sm.Cluster(8, 1e30, 0.0, 1e30, 0.0, 400e12)  # free links: pure compute
    t = sm.step_time(VIT_G, sm.Setup(), 256, fast, "ring")
    assert t.overlapped == pytest.approx(t.compute) and t.serial == pytest.approx(t.compute)
    # The blocks' FLOPs of PGD-3 by hand: 4 forwards, the training backward (2x), 3 attack
    # backwards (1x linear, 2x attention); 32 images.
    f = sm.forward_flops(VIT_G, 224)
    blocks = 4 * (f.linear + f.attention) + 2 * (f.linear + f.attention)
    blocks += 3 * (f.linear + 2 * f.attention)
    assert t.compute == pytest.approx(32 * blocks / 400e12)


@pytest.mark.parametrize(
    "field, value", [("strategy", "keep"), ("optimizer", "lion"), ("placement", "dim1")]
)
def test_an_unknown_setting_is_named(field, value):
    with pytest.raises(ValueError, match=value):
        sm.Setup(**{field: value})


def test_the_models_placement_is_the_one_fsdp_gives_fully_shard():
    shapes = [(1, 257, 1408), (1, 197, 1024), (1000, 1024), (1000,), (3072, 1024), (1, 1, 1280)]
    for shape in shapes:
        for shards in (2, 8, 64, 256, 1024):
            param = torch.nn.Parameter(torch.empty(shape, device="meta"))
            placed = fsdp.shard_placement(param, shards)
            assert (0 if placed is None else placed.dim) == sm.shard_dim(shape, shards)
