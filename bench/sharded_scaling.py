"""Sharded (FSDP2) adversarial training of ViT-L/H/g: what this machine measures, then the
modelled tables (``python bench/scaling.py --part sharded``; formulas: bench/sharding_model.py).

Measured here (CPU, Gloo over loopback, 2 processes):
  * all-gather and reduce-scatter times of 4 KB-16 MB, with the ring model fitted to them;
  * FSDP2 (``fully_shard`` per block and at the root) training a small ViT with the project's
    PGD-k attacker and trainer, under each way of holding the weights during the attack: the
    collectives counted (calls, bytes) against the model's, and the step's time;
  * a small ViT's FLOPs (torch's FlopCounterMode) and the bytes its blocks keep for the backward
    (saved-tensor hooks) against the formulas.
Modelled (no GPU): parameter counts, collective volume, memory per GPU, step time on 64-1,024
GPUs, from datasheet peaks (bench/gpu_bench.py's DENSE_PEAKS) and the stated link rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import sharding_model as sm
import torch
from collectives import fit, measure, ring_seconds, timed_runs
from gpu_bench import DENSE_PEAKS
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

# FSDP2's own collectives, subclassed to count each call (no public counting hook in 2.13).
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultAllGather,
    DefaultReduceScatter,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from train_step import machine, step_fn

from adv_model import NoOpAttacker, PGDAttacker
from iat.attacks.core import Attacker
from iat.runtime import distributed
from nets.vit import VisionTransformer

# AdvXL (Wang et al., CVPR 2024): L-inf epsilon 4/255 (4 in this project's [0, 255] pixels);
# a long stage at 112 px with PGD-1, then a short one at 224 px with PGD-3 (its weak-to-strong,
# coarse-to-fine schedule). A stage: (image size, PGD iterations, images per GPU).
EPSILON = 4.0
STAGES = ((224, 3, 32), (112, 1, 128))
# The CPU checks' model: nets.vit's ViT (patch 16, MLP 4x width), 10 classes.
SMALL = sm.ViT("small ViT", "-", 4, 128, 512, 4, 16, "-", classes=10)
SMALL_IMAGE, SMALL_BATCH = 64, 8
GB = 1e9


# --- FSDP2 on this machine --------------------------------------------------------------------
class CountingAllGather(DefaultAllGather):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.log.append(("gather", output_tensor.numel() * output_tensor.element_size()))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.log.append(("scatter", input_tensor.numel() * input_tensor.element_size()))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


class HeldWeights(Attacker):
    """Runs `inner` with every unit gathered once and kept through the attack ("hold-attack"),
    or also through the training forward ("hold-step"); the root keeps FSDP2's own rule (no
    reshard after a forward)."""

    def __init__(self, inner: Attacker, blocks: list, root: FSDPModule, whole_step: bool) -> None:
        self.inner, self.blocks, self.root, self.whole_step = inner, blocks, root, whole_step

    def attack(self, model, images, labels, generator=None):
        for unit in (*self.blocks, self.root):
            unit.unshard()
            unit.set_reshard_after_backward(False, recurse=False)
        for block in self.blocks:
            block.set_reshard_after_forward(False, recurse=False)
        try:
            return self.inner.attack(model, images, labels, generator)
        finally:
            for block in self.blocks:
                block.set_reshard_after_forward(not self.whole_step, recurse=False)
            for unit in (*self.blocks, self.root):
                unit.set_reshard_after_backward(True, recurse=False)


def small_model(depth: int = SMALL.depth) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(depth, SMALL.width, SMALL.heads, num_classes=SMALL.classes)


def small_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (SMALL_BATCH, 3, SMALL_IMAGE, SMALL_IMAGE), generator=g).float()
    return x, torch.randint(0, SMALL.classes, (SMALL_BATCH,), generator=g)


def sharded_step(mesh, strategy: str, k: int, log: list):
    """One training step of the small ViT under FSDP2 with PGD-k ("clean": no attack)."""
    model = small_model()
    blocks = [fully_shard(block, mesh=mesh) for block in model.blocks]
    root = fully_shard(model, mesh=mesh)
    for unit in (*blocks, root):
        unit.set_custom_all_gather(CountingAllGather(log))
        unit.set_custom_reduce_scatter(CountingReduceScatter(log))
    pgd = PGDAttacker(k, EPSILON, 1.0, num_classes=SMALL.classes)
    attack = {"clean": NoOpAttacker(), "reshard": pgd}.get(strategy)
    attack = attack or HeldWeights(pgd, blocks, root, whole_step=strategy == "hold-step")
    x, y = small_batch()
    return step_fn(model, torch.optim.AdamW(model.parameters()), attack, x, y)


def _fsdp_worker(env: distributed.DistEnv, k: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(env, torch.device("cpu"), timeout_s=300)
    mesh = init_device_mesh("cpu", (env.world_size,))
    results, log = {}, []
    for strategy in ("clean", *sm.STRATEGIES):
        step = sharded_step(mesh, strategy, k, log)
        step()  # warm-up
        log.clear()
        step()
        kinds = {kind: [b for name, b in log if name == kind] for kind in ("gather", "scatter")}
        seconds = timed_runs(step, repeats)
        results[strategy] = {
            "gathers": len(kinds["gather"]),
            "gather_bytes": sum(kinds["gather"]),
            "scatters": len(kinds["scatter"]),
            "scatter_bytes": sum(kinds["scatter"]),
            "seconds": statistics.median(seconds),
        }
    if env.rank == 0:
        Path(out).write_text(json.dumps(results))
    distributed.cleanup()


def measure_fsdp(k: int, repeats: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "fsdp.json")
        distributed.spawn(_fsdp_worker, 2, (k, repeats, out))
        return json.loads(Path(out).read_text())


# --- FLOPs and saved activations of the small ViT ---------------------------------------------
def counted_flops(fn) -> int:
    """FLOPs torch counts for `fn`, attention by the math kernel (its matrix products counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measured_flops() -> dict[str, int]:
    """Forward; training step (forward + backward, weights trainable); attack iteration
    (forward + input gradient, weights frozen): one image's FLOPs of the small ViT."""
    model, (x, _) = small_model(), small_batch()
    forward = counted_flops(lambda: model(x))
    train = counted_flops(lambda: model(x).sum().backward())
    model.requires_grad_(False)
    attack = counted_flops(lambda: model(x.clone().requires_grad_(True)).sum().backward())
    return {
        k: v // SMALL_BATCH for k, v in (("forward", forward), ("train", train), ("attack", attack))
    }


def modelled_flops() -> dict[str, float]:
    f = sm.forward_flops(SMALL, SMALL_IMAGE)
    forward = f.linear + f.attention + f.patch + f.head
    return {
        "forward": forward,
        "train": forward + sm.training_backward(f),
        "attack": forward + sm.attack_backward(f),
    }


def saved_bytes(depth: int, image: int, dtype: torch.dtype, attack: bool) -> int:
    """Bytes of the tensors a forward of the small ViT keeps for its backward (parameters
    excluded), counted once per storage."""
    model = small_model(depth).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.requires_grad_(not attack)
    x = torch.rand(SMALL_BATCH, 3, image, image, dtype=dtype).mul(255).requires_grad_(attack)
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def block_bytes_rows() -> list[tuple[str, int, float]]:
    """(case, measured, modelled) bytes one block keeps, per image: a 2-block minus a 1-block
    model. bf16 at 224 px (the bicubic resampling of pos_embed has no CPU bf16 kernel)."""
    rows = []
    for dtype, image in ((torch.float32, SMALL_IMAGE), (torch.bfloat16, 224)):
        for attack in (False, True):
            block = saved_bytes(2, image, dtype, attack) - saved_bytes(1, image, dtype, attack)
            size = dtype.itemsize
            model = sm.block_saved_bytes(SMALL, SMALL.tokens(image), size, attack)
            what = f"{'attack' if attack else 'training'}, {dtype}, {image} px"
            rows.append((what, block // SMALL_BATCH, model))
    return rows


# --- printing ---------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def print_measured(args: argparse.Namespace) -> None:
    print(f"## Measured on this machine: {machine()}\n")
    print("Gloo over loopback, 2 processes, fp32, fastest of --repeats (slowest rank); ring model")
    print("T = (P - 1) alpha + (P - 1) / P * S / B, S the gathered / reduced size:\n")
    rows = []
    for name in ("all-gather", "reduce-scatter"):
        times = measure(2, args.repeats, name)
        alpha, bandwidth = fit({2: times}, name)
        for size, seconds in times.items():
            model = ring_seconds(4 * size, 2, alpha, bandwidth, name)
            rows.append([name, f"{4 * size / 1e6:.3g}", f"{seconds * 1e3:.2f}",
                         f"{model * 1e3:.2f}", f"{alpha * 1e6:.0f}",
                         f"{bandwidth / GB:.2f}"])  # fmt: skip
    table(["collective", "MB", "measured ms", "model ms", "fitted alpha us", "fitted B GB/s"], rows)

    k = args.cpu_k
    print("FSDP2 (fully_shard per block and at the root, fp32, Gloo, 2 processes) training a")
    print(f"{SMALL.depth}-block ViT (width {SMALL.width}, {sm.parameter_count(SMALL):,} "
          f"parameters) at {SMALL_IMAGE} px, batch {SMALL_BATCH} per process, AdamW, PGD-{k} "
          f"(epsilon {EPSILON:g}/255), the project's trainer and attacker; collectives of one "
          f"step counted, step time the median of {args.cpu_repeats}:\n")  # fmt: skip
    fsdp = measure_fsdp(k, args.cpu_repeats)
    rows = []
    for strategy, r in fsdp.items():
        setup = sm.Setup(k=0 if strategy == "clean" else k, precision=sm.FP32, placement="dim0",
                         strategy="reshard" if strategy == "clean" else strategy)  # fmt: skip
        vol = sm.step_volume(SMALL, setup, 2)
        share = sm.ring_share(2)
        rows.append([strategy, r["gathers"], vol.gathers, f"{r['gather_bytes']:,}",
                     f"{vol.gather_bytes / share:,.0f}", r["scatters"], vol.scatters,
                     f"{r['scatter_bytes']:,}", f"{vol.scatter_bytes / share:,.0f}",
                     f"{r['seconds'] * 1e3:.0f}",
                     f"{r['seconds'] / fsdp['reshard']['seconds']:.2f}"])  # fmt: skip
    table(["strategy", "all-gathers", "model", "gathered bytes", "model", "reduce-scatters",
           "model", "reduce-scattered bytes", "model", "step ms", "step / reshard"],
          rows)  # fmt: skip

    counted, model = measured_flops(), modelled_flops()
    print("FLOPs of one image of the same ViT (FlopCounterMode, attention by the math kernel):\n")
    table(["pass", "counted", "formula", "formula / counted"],
          [[name, f"{counted[name]:,}", f"{model[name]:,.0f}", f"{model[name] / counted[name]:.4f}"]
           for name in counted])  # fmt: skip
    print("Bytes one block keeps for its backward, per image (saved-tensor hooks, parameters")
    print("excluded, a 2-block minus a 1-block model):\n")
    table(
        ["case", "measured", "formula", "formula / measured"],
        [[what, f"{m:,}", f"{f:,.0f}", f"{f / m:.4f}"] for what, m, f in block_bytes_rows()],
    )


def print_parameters() -> None:
    print("## Modelled: parameters (timm's layout; Dosovitskiy et al. 2021, Eq. 1-4)\n")
    print("Per block 4 w^2 + 2 w m + 9 w + m (qkv, proj, fc1, fc2 with biases, two norms); the")
    print("root: patch projection 3 p^2 w + w, class token w, position embeddings (224/p)^2+1 rows")
    print("of w, final norm 2 w, classifier 1000 (w + 1).\n")
    rows = []
    for v in sm.MODELS:
        rows.append([v.name, v.timm, v.depth, v.width, v.mlp, v.heads, v.patch,
                     f"{v.tokens(224)} / {v.tokens(112)}", f"{sm.numel(sm.block_shapes(v)):,}",
                     f"{sm.numel(sm.root_shapes(v)):,}", f"{sm.parameter_count(v):,}",
                     f"{sm.parameter_count(v, head=False):,}", v.published])  # fmt: skip
    table(["model", "timm", "depth", "width w", "MLP m", "heads", "patch p",
           "tokens 224 / 112 px", "per block", "root", "total", "without classifier",
           "published"], rows)  # fmt: skip


def print_volume(args: argparse.Namespace) -> None:
    n = args.volume_gpus
    print(f"## Modelled: collectives per step, per GPU (FSDP2 over {n} GPUs)\n")
    print("One unit per block plus the root; weights gathered in bf16, gradients reduce-scattered")
    print("in fp32; each GPU receives (N - 1) / N of each gathered tensor and sends that share")
    print("of each reduce-scattered one (ring). Parameters split as --fsdp places them: dim 0,")
    print("or the largest dimension N divides where it does not divide dim 0 (pos_embed and")
    print("cls_token, dim 0 of 1, along their width; padded to N rows where N does not divide")
    print("it). PGD-k: k forward and input-gradient passes, then the training forward and")
    print("backward.\n")
    for name, meaning in sm.STRATEGIES.items():
        print(f"- {name}: {meaning}")
    print()
    ks = args.volume_k
    rows = []
    for v in sm.MODELS:
        clean = sm.step_volume(v, sm.Setup(k=0), n).total_bytes
        for strategy in sm.STRATEGIES:
            vols = [sm.step_volume(v, sm.Setup(k=k, strategy=strategy), n) for k in ks]
            cells = [f"{vol.total_bytes / GB:.2f} ({vol.total_bytes / clean:.1f}x)" for vol in vols]
            calls = ", ".join(str(vol.gathers) for vol in vols)
            rows.append([v.name, strategy, calls, *cells])
    table(["model", "strategy", f"all-gathers per step (k = {', '.join(map(str, ks))})",
           *(f"PGD-{k}: GB per GPU (x clean step)" for k in ks)], rows)  # fmt: skip
    print("The root unit (dim-0 padding): MB gathered per forward pass (bf16), fully_shard's")
    print("default placement (dim 0) against --fsdp's (iat.train.fsdp.shard_placement: the")
    print("largest dimension N divides where it does not divide dim 0; else dim 0, padded):\n")
    rows = []
    for v in sm.MODELS:
        cells = []
        for gpus in args.gpus:
            pads = [
                sm.padded_numel(sm.root_shapes(v), gpus, p) * 2 / 1e6 for p in ("dim0", "divisible")
            ]
            cells.append(f"{pads[0]:,.0f} / {pads[1]:,.1f}")
        rows.append([v.name, f"{sm.numel(sm.root_shapes(v)) * 2 / 1e6:.1f}", *cells])
    table(["model", "root MB unpadded", *(f"N={g}: dim 0 / --fsdp" for g in args.gpus)], rows)


def print_memory(args: argparse.Namespace) -> None:
    n, budget = args.memory_gpus, args.memory_gb * GB
    print(f"## Modelled: memory per GPU, FSDP2 over {n} GPUs, {args.memory_gb:g} GB per GPU\n")
    print("AdamW; bf16 gathered weights and activations, fp32 master shard and gradients; 224 px,")
    print("PGD-k (the attack's own activations are smaller than the training step's and freed")
    print("before it, so k does not change the peak). 'ckpt': activation checkpointing per block.")
    print(f"Fits: total within {args.usable:.0%} of {args.memory_gb:g} GB (the rest: CUDA context,")
    print("allocator, workspaces). GB = 1e9 bytes. DDP for comparison: fp32 weights, gradients,")
    print("its gradient buckets, AdamW's two moments (20 bytes per parameter), a bf16 copy of the")
    print("weights (autocast's cache) and the same activations (no checkpointing; autocast keeps")
    print("the residual stream in fp32, so DDP's are somewhat larger).\n")
    rows = []
    for v in sm.MODELS:
        for batch in args.batches:
            cells = []
            for strategy in ("reshard", "hold-attack"):
                for ckpt in (False, True):
                    s = sm.Setup(batch=batch, strategy=strategy, checkpointed=ckpt)
                    total = sm.fsdp_memory(v, s, n).total
                    cells.append(f"{total / GB:.1f}{'' if total <= args.usable * budget else ' ✗'}")
            s = sm.Setup(batch=batch)
            ddp = sm.ddp_state_bytes(v, "adamw") + 2 * sm.parameter_count(v)
            ddp += sm.activation_bytes(v, s)
            mark = "" if ddp <= args.usable * budget else " ✗"
            rows.append([v.name, batch, f"{ddp / GB:.1f}{mark}", *cells])
    table(["model", "images per GPU", "DDP GB", "reshard GB", "reshard, ckpt GB",
           "hold-attack GB", "hold-attack, ckpt GB"], rows)  # fmt: skip

    batch = args.breakdown_batch
    print(
        f"Parts, GB per GPU, batch {batch}, reshard (hold-attack adds 'held'), no checkpointing:\n"
    )
    parts = {
        v.name: sm.fsdp_memory(v, sm.Setup(batch=batch, strategy="hold-attack"), n)
        for v in sm.MODELS
    }
    names = {"master": "fp32 parameter shard (master weights)", "grads": "fp32 gradient shard",
             "optimizer": "AdamW moments (2 x fp32)", "buffers": "gathered units in flight",
             "held": "whole model in bf16 (hold-*)",
             "activations": "activations (training step)"}  # fmt: skip
    table(["part", *parts], [[label, *(f"{getattr(m, key) / GB:.2f}" for m in parts.values())]
                             for key, label in names.items()])  # fmt: skip
    print("Optimizer state per GPU, GB (fp32: AdamW / Adam 8, SGD with momentum 4, SGD 0 bytes")
    print("per parameter):\n")
    rows = []
    for v in sm.MODELS:
        for opt in ("adamw", "sgd-momentum"):
            state = sm.parameter_count(v) * sm.OPTIMIZER_STATE_BYTES[opt]
            rows.append([v.name, opt, *(f"{state / g / GB:.3f}" for g in (1, 8, n))])
    table(["model", "optimizer", "DDP (1 copy per GPU)", "FSDP over 8", f"FSDP over {n}"], rows)


def cluster(args: argparse.Namespace) -> sm.Cluster:
    peak = DENSE_PEAKS[args.gpu].half * 1e12
    return sm.Cluster(args.per_node, args.nvlink_gbs * GB, args.nvlink_us * 1e-6,
                      args.ib_gbs * GB, args.ib_us * 1e-6, peak * args.mfu)  # fmt: skip


def print_time(args: argparse.Namespace) -> None:
    c = cluster(args)
    peak = DENSE_PEAKS[args.gpu]
    print("## Modelled: step time and efficiency on N GPUs (weak scaling)\n")
    print(
        f"Compute: {args.gpu} dense bf16 peak {peak.half:g} TFLOPS ({peak.source}) x "
        f"{args.mfu:g} sustained = {c.flops / 1e12:.0f} TFLOPS per GPU (assumed, not measured);"
    )
    print("the blocks' FLOPs only. Links (datasheet rates, assumed, per GPU and direction):")
    print(
        f"NVLink {args.nvlink_gbs:g} GB/s, {args.nvlink_us:g} us per ring step, "
        f"{args.per_node} GPUs a node; InfiniBand {args.ib_gbs:g} GB/s (one NIC per GPU), "
        f"{args.ib_us:g} us per ring step. bf16 gathers, fp32 reduce-scatters, --fsdp's placement."
    )
    print("Overlap: per pass the root unit's collectives and one block's are exposed; every other")
    print("block takes max(compute, its collectives). Efficiency = compute / step time;")
    print("in brackets without any overlap. Layouts:\n")
    for name, meaning in sm.LAYOUTS.items():
        print(f"- {name}: {meaning}")
    print()
    for image, k, batch in STAGES:
        print(f"### {image} px, PGD-{k}, {batch} images per GPU, no checkpointing\n")
        rows = []
        for v in sm.MODELS:
            for layout in ("hierarchical", "hsdp"):
                for strategy in ("reshard", "hold-attack"):
                    s = sm.Setup(image=image, batch=batch, k=k, strategy=strategy)
                    times = [sm.step_time(v, s, n, c, layout) for n in args.gpus]
                    cells = [
                        f"{t.compute / t.overlapped:.2f} ({t.compute / t.serial:.2f})"
                        for t in times
                    ]
                    last = times[-1]
                    rate = args.gpus[-1] * batch / last.overlapped
                    rows.append([v.name, layout, strategy, f"{times[0].compute * 1e3:.0f}", *cells,
                                 f"{rate:,.0f}"])  # fmt: skip
        table(["model", "layout", "strategy", "compute ms", *(f"N={n}" for n in args.gpus),
               f"img/s at N={args.gpus[-1]}"], rows)  # fmt: skip
    image, k, batch = STAGES[0]
    v = sm.MODELS[-1]
    print(
        f"### Every layout, strategy and placement ({v.name}, {image} px, PGD-{k}, batch {batch})"
    )
    print("\nplacement: dim 0 (fully_shard's default) or --fsdp's (divisible).\n")
    rows = []
    for layout in sm.LAYOUTS:
        for strategy in sm.STRATEGIES:
            for placement in ("dim0", "divisible"):
                s = sm.Setup(image=image, batch=batch, k=k, strategy=strategy, placement=placement)
                times = [sm.step_time(v, s, n, c, layout) for n in args.gpus]
                cells = [
                    f"{t.compute / t.overlapped:.2f} ({t.compute / t.serial:.2f})" for t in times
                ]
                rows.append([layout, strategy, placement, *cells])
    table(["layout", "strategy", "placement", *(f"N={n}" for n in args.gpus)], rows)


def report(args: argparse.Namespace) -> None:
    if not args.model_only:
        print_measured(args)
    print_parameters()
    print_volume(args)
    print_memory(args)
    print_time(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sharded (--part sharded)")
    g.add_argument("--model-only", action="store_true", help="skip the measurements here")
    g.add_argument("--cpu-k", type=int, default=3, help="PGD iterations of the FSDP2 check")
    g.add_argument("--cpu-repeats", type=int, default=5, help="timed steps of the FSDP2 check")
    g.add_argument("--gpus", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    g.add_argument("--volume-gpus", type=int, default=64, help="GPUs of the volume table")
    g.add_argument("--volume-k", type=int, nargs="+", default=[1, 2, 3, 10])
    g.add_argument("--memory-gpus", type=int, default=64, help="GPUs of the memory table")
    g.add_argument("--memory-gb", type=float, default=80.0, help="memory per GPU")
    g.add_argument("--usable", type=float, default=0.9, help="share of it the tensors may take")
    g.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    g.add_argument("--breakdown-batch", type=int, default=32)
    g.add_argument("--gpu", choices=("H100", "H200"), default="H100", help="peak FLOPS from")
    g.add_argument("--mfu", type=float, default=0.4, help="sustained share of the bf16 peak")
    g.add_argument("--per-node", type=int, default=8, help="GPUs per node")
    g.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per direction")
    g.add_argument("--nvlink-us", type=float, default=5.0, help="NVLink latency per ring step")
    g.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU")
    g.add_argument("--ib-us", type=float, default=10.0, help="InfiniBand latency per ring step")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any(n < 2 or n % args.per_node for n in args.gpus):
        p.error(f"--gpus: each a multiple of --per-node {args.per_node}")
    if not 0 < args.mfu <= 1 or not 0 < args.usable <= 1:
        p.error("--mfu and --usable: a share in (0, 1]")
    if min(args.batches + [args.breakdown_batch, args.cpu_k + 1, args.cpu_repeats]) < 1:
        p.error("--batches, --breakdown-batch, --cpu-repeats: at least 1; --cpu-k: at least 0")
