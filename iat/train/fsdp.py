"""Sharded data-parallel training (--fsdp): PyTorch's FSDP2 ``fully_shard`` over a device mesh.

Each process keeps a 1/N shard of every parameter, gradient and optimizer state (ZeRO-3; Rajbhandari
et al. 2020, Sec 5), all-gathers a unit's weights before its forward and backward passes and
reduce-scatters its gradients after the backward pass. The units are what each model family names
(``nets.shard_units``: transformer blocks, stages' downsampling layers, residual blocks and
denoising blocks); the rest (stem, head, norms) is the root's unit. Each parameter is split
along the dimension ``shard_placement`` picks (dim 0 unless the shard group does not divide it).
``full`` shards over every process; ``hybrid`` shards within a machine and replicates across
machines (a 2-D mesh replicate x shard: HSDP, gradients all-reduced across machines after the
reduce-scatter).

The training attack (Feature Denoising Sec 5: k PGD iterations per step, each a forward and an
input-gradient pass) sees constant weights. ``--fsdp-attack-gather once`` gathers every unit once
before the attack and keeps it gathered through the attack and the training forward pass that
follows (each unit is freed after its training forward, gathered again for its backward pass):
about 2 all-gathers per unit and step, at the cost of the whole model's unsharded weights during
the attack. ``per-layer`` leaves FSDP's default, each unit gathered and freed around every forward
and backward pass of the attack: 2(k + 1) all-gathers per unit and step, one unit's weights at a
time. The attack's input-gradient passes compute no parameter gradients (``attack_mode`` freezes
the parameters), so they reduce-scatter nothing.

BatchNorm statistics are buffers, replicated: as DDP (``broadcast_buffers``), rank 0's are
broadcast at the start of every training forward pass that follows one whose gradients were
reduced (with --accumulate, before each update's first micro-batch), and each process updates
its own copy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultAllGather,
    DefaultReduceScatter,
)
from torch.distributed.tensor import DTensor, Shard

import nets
from iat.runtime import distributed


def device_mesh(mode: str, env: distributed.DistEnv, device: torch.device) -> DeviceMesh:
    """The processes as --fsdp `mode` arranges them: one "shard" dimension (full), or
    "replicate" (machines) x "shard" (the processes of a machine). ValueError when the
    processes are not spread evenly over the machines."""
    world, local = env.world_size, env.local_world_size
    if mode == "full":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if world % local:
        raise ValueError(
            f"--fsdp hybrid: {world} processes are not the same number on every machine "
            f"({local} on this one)"
        )
    return init_device_mesh(
        device.type, (world // local, local), mesh_dim_names=("replicate", "shard")
    )


def mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP's policy for --amp's compute type: the weights gathered and computed in `dtype`,
    gradients reduced in fp32, the sharded weights and optimizer state fp32; None: fp32."""
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> nn.Module:
    """`model` sharded in place: each of its ``nets.shard_units`` a unit freed after its forward
    pass, the root (what is left) kept gathered from its forward to its backward pass, each
    parameter split as ``shard_placement`` says; rank 0's buffers broadcast before training
    forward passes as DDP's ``broadcast_buffers`` does (``_BufferBroadcast``)."""
    place = functools.partial(shard_placement, shards=mesh["shard"].size())
    for unit in nets.shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True,
                    shard_placement_fn=place)  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False,
                shard_placement_fn=place)  # fmt: skip
    model.register_forward_pre_hook(_BufferBroadcast())
    return model


def shard_placement(param: nn.Parameter, shards: int) -> Shard | None:
    """The dimension `param` is split along over `shards` processes: dim 0 (fully_shard's
    default) when `shards` divides it, else the largest dimension it divides. fully_shard pads
    an uneven dim 0 to a multiple of `shards` rows and refuses uneven other dimensions: a dim 0
    of 1 (ViT's ``pos_embed`` and ``cls_token``) would be gathered `shards` times over; where no
    dimension divides evenly, dim 0 padded (None)."""
    even = [d for d in range(param.dim()) if param.shape[d] % shards == 0]
    if not even or 0 in even:
        return None
    return Shard(max(even, key=lambda d: param.shape[d]))


class _BufferBroadcast:
    """DDP's ``broadcast_buffers`` (a forward pre-hook of the sharded model): before a training
    forward pass (train mode, gradients on: not the attack's, in eval mode, nor an evaluation's)
    every process takes rank 0's buffers, unless the previous training pass kept its gradients
    unreduced (``sync_gradients``). DDP broadcasts only after a pass whose gradients it reduced:
    with --accumulate, once per update, before its first micro-batch."""

    def __init__(self) -> None:
        self.due = True

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self.due:
            for buffer in module.buffers():
                distributed.broadcast_tensor(buffer, src=0)
        self.due = _reduces_gradients(module)


def _reduces_gradients(model: nn.Module) -> bool:
    """Whether `model`'s backward pass reduces its units' gradients (FSDP2's
    ``set_requires_gradient_sync`` has no getter: its parameter groups' flag)."""
    groups = [g for m in fsdp_modules(model) for g in m._get_fsdp_state()._fsdp_param_groups]
    return all(group.reduce_grads for group in groups)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def sync_gradients(model: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP's ``no_sync``: without `sync`, the backward pass keeps its unsharded gradients
    (accumulated over micro-batches) and reduce-scatters nothing."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered_for_attack(model: nn.Module, mode: str) -> Iterator[None]:
    """The training attack's weights (`model`: the sharded model, or what wraps it).

    ``once``: every unit gathered now and kept through every forward and backward pass of the
    attack; on exit the units free again after their next forward pass (the training step's,
    which reuses these gathered weights). ``per-layer``: FSDP's own gathers around each pass; on
    exit every unit is sharded (the root's last attack forward pass leaves it gathered, with the
    attack's frozen parameters). Without sharding, nothing."""
    modules = fsdp_modules(model)
    if mode == "per-layer" or not modules:
        try:
            yield
        finally:
            for module in modules:
                module.reshard()
        return
    units = [m for m in modules if m is not _root(modules)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.set_reshard_after_backward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
        for module in modules:
            module.set_reshard_after_backward(True, recurse=False)


def _root(modules: list[FSDPModule]) -> FSDPModule:
    """The outermost of `modules` (``model.modules()`` lists it first)."""
    return modules[0]


class GatheredAttacker:
    """A training attacker whose attacks run in ``gathered_for_attack(model, mode)``; the
    attack itself (``attack(model, images, labels or targets)``) is the wrapped one's."""

    def __init__(self, attacker, mode: str) -> None:
        self.attacker = attacker
        self.mode = mode

    def attack(self, model: nn.Module, *args, **kwargs):
        with gathered_for_attack(model, self.mode):
            return self.attacker.attack(model, *args, **kwargs)


def gathering_attacks(make: Callable[[int], object], mode: str) -> Callable[[int], object]:
    """`make` (epoch -> training attacker), each attacker wrapped in ``GatheredAttacker``."""
    return lambda epoch: GatheredAttacker(make(epoch), mode)


# --- the sharded state, whole ------------------------------------------------------------------
def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: its shard when sharded, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every sharded tensor gathered whole (a collective where any is sharded:
    every process calls it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this process holds (its shards, when sharded)."""
    tensors = [local(p) for p in model.parameters()]
    for per_param in optimizer.state.values():
        tensors += [local(v) for v in per_param.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- measuring the collectives -----------------------------------------------------------------
@dataclass
class CollectiveCounts:
    """FSDP's all-gathers and reduce-scatters on this process since counting began."""

    all_gathers: int = 0
    all_gather_bytes: int = 0  # the gathered (output) tensors' bytes
    reduce_scatters: int = 0
    reduce_scatter_bytes: int = 0  # the reduced (input) tensors' bytes


class _CountedAllGather(DefaultAllGather):
    def __init__(self, counts: CollectiveCounts) -> None:
        self.counts = counts

    def __call__(self, output_tensor: torch.Tensor, *args, **kwargs):
        self.counts.all_gathers += 1
        self.counts.all_gather_bytes += output_tensor.numel() * output_tensor.element_size()
        return super().__call__(output_tensor, *args, **kwargs)


class _CountedReduceScatter(DefaultReduceScatter):
    def __init__(self, counts: CollectiveCounts) -> None:
        self.counts = counts

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        self.counts.reduce_scatters += 1
        self.counts.reduce_scatter_bytes += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, *args, **kwargs)


def count_collectives(model: nn.Module, root_only: bool = False) -> CollectiveCounts:
    """Counts every all-gather and reduce-scatter of `model`'s units (with `root_only`, of its
    root unit alone) from now on, through FSDP's custom-collective hooks
    (``set_custom_all_gather`` / ``set_custom_reduce_scatter``), which then run FSDP's default
    collectives."""
    counts = CollectiveCounts()
    modules = fsdp_modules(model)
    for module in modules[:1] if root_only else modules:
        module.set_custom_all_gather(_CountedAllGather(counts))
        module.set_custom_reduce_scatter(_CountedReduceScatter(counts))
    return counts
