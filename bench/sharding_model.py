"""The cost model of sharded (FSDP2 / ZeRO-3) adversarial training of a ViT: formulas only.

Parameters, FLOPs and saved activations are counted from a ViT's width, depth and MLP width
(Dosovitskiy et al. 2021, Sec 3.1, Eq. 1-4, in timm's layout: ``nets.vit``); communication from
how FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per block and one root unit) shards,
gathers and reduce-scatters them; time from link and compute rates given by the caller.
``bench/scaling.py`` prints the tables and checks the counts against torch on small models;
``tests/test_scaling_model.py`` checks the formulas against hand computations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ViT:
    """A ViT's shape; ``published`` is its quoted parameter count with its source."""

    name: str
    timm: str  # timm's model name
    depth: int
    width: int
    mlp: int  # the MLP's hidden width
    heads: int
    patch: int
    published: str
    classes: int = 1000
    train_size: int = 224  # the resolution whose grid pos_embed stores (resampled for others)

    def tokens(self, image: int) -> int:
        """Patches plus the class token (Eq. 1)."""
        return (image // self.patch) ** 2 + 1


# Dosovitskiy et al. 2021, Table 1 (L, H); Zhai et al. 2022 ("Scaling Vision Transformers"),
# Table 2 (g: width 1408, depth 40, MLP 6144, 16 heads); timm's vit_*_224 definitions.
MODELS = (
    ViT("ViT-L/16", "vit_large_patch16_224", 24, 1024, 4096, 16, 16, "304.3 M (timm)"),
    ViT("ViT-H/14", "vit_huge_patch14_224", 32, 1280, 5120, 16, 14, "632.0 M (timm)"),
    ViT("ViT-g/14", "vit_giant_patch14_224", 40, 1408, 6144, 16, 14, "1,011 M (Zhai et al.)"),
)

# Optimizer state in fp32 bytes per parameter: Adam and AdamW keep exp_avg and exp_avg_sq,
# SGD with momentum its momentum buffer (torch.optim).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd-momentum": 4, "sgd": 0}


@dataclass(frozen=True)
class Precision:
    """FSDP2's MixedPrecisionPolicy: the dtype of gathered weights and activations, of the
    gradient reduce-scatter, and of the sharded parameters (the optimizer's master copy)."""

    name: str
    param_bytes: int  # gathered (unsharded) weights and activations
    reduce_bytes: int  # gradients, as reduce-scattered and kept in the shard
    master_bytes: int = 4  # the sharded parameters stay fp32


BF16 = Precision("bf16 (param_dtype bf16, reduce_dtype fp32)", 2, 4)
FP32 = Precision("fp32", 4, 4)


# --- parameters -------------------------------------------------------------------------------
def block_shapes(v: ViT) -> list[Shape]:
    """One transformer block's parameters: norm1, qkv, proj, norm2, fc1, fc2 (weights, biases)."""
    w, m = v.width, v.mlp
    return [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (m, w), (m,), (w, m), (w,)]


def root_shapes(v: ViT) -> list[Shape]:
    """The parameters outside the blocks (FSDP's root unit): patch projection, class token,
    position embeddings of the training grid, final norm, classifier."""
    w = v.width
    return [
        (w, 3, v.patch, v.patch),
        (w,),
        (1, 1, w),
        (1, v.tokens(v.train_size), w),
        (w,),
        (w,),
        (v.classes, w),
        (v.classes,),
    ]


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def parameter_count(v: ViT, head: bool = True) -> int:
    count = numel(root_shapes(v)) + v.depth * numel(block_shapes(v))
    return count if head else count - v.classes * (v.width + 1)


PLACEMENTS = ("divisible", "dim0")


def shard_dim(shape: Shape, shards: int, placement: str = "divisible") -> int:
    """The dimension FSDP2 splits a parameter of `shape` along over `shards` ranks: always 0
    ("dim0", fully_shard's default), or as --fsdp places it ("divisible",
    ``iat.train.fsdp.shard_placement``): dim 0 when `shards` divides it, else the largest
    dimension it divides (fully_shard refuses uneven splits of other dimensions), else 0."""
    even = [d for d, size in enumerate(shape) if size % shards == 0]
    if placement == "dim0" or not even or 0 in even:
        return 0
    return max(even, key=shape.__getitem__)


def padded_numel(shapes: list[Shape], shards: int, placement: str = "divisible") -> int:
    """Elements FSDP2 gathers for these parameters over `shards` ranks. Each is split into
    `shards` equal chunks along its ``shard_dim``, the last ones padded: on dim 0 a dim of 1,
    as ``pos_embed`` and ``cls_token`` have, is gathered `shards` times over."""
    total = 0
    for shape in shapes:
        dim = shard_dim(shape, shards, placement)
        total += math.ceil(shape[dim] / shards) * shards * math.prod(shape) // shape[dim]
    return total


# --- one configuration ------------------------------------------------------------------------
# How the weights are held during the attack (PGD-k: k forward and input-gradient passes, then
# the training forward and backward). FSDP2 keeps the root unit gathered from a forward to its
# backward; each block is resharded after its forward and after its backward by default.
STRATEGIES = {
    "reshard": "every block gathered for each forward and each backward, the attack's included",
    "hold-attack": "all weights gathered once before the attack, kept to the training forward",
    "hold-step": "all weights gathered once before the attack, kept to the step's end",
}


@dataclass(frozen=True)
class Setup:
    """Everything besides the model and the GPU count that changes a figure."""

    image: int = 224  # pixels per side
    batch: int = 32  # images per GPU
    k: int = 3  # PGD iterations
    strategy: str = "reshard"  # a STRATEGIES key
    checkpointed: bool = False  # activation checkpointing per block
    optimizer: str = "adamw"  # an OPTIMIZER_STATE_BYTES key
    precision: Precision = BF16
    placement: str = "divisible"  # shard_dim's: --fsdp's, or "dim0" (fully_shard's default)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; one of {sorted(STRATEGIES)}")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; one of {PLACEMENTS}")


def unit_numels(v: ViT, s: Setup, shards: int) -> tuple[int, int]:
    """Gathered elements of the root unit and of one block."""
    return (
        padded_numel(root_shapes(v), shards, s.placement),
        padded_numel(block_shapes(v), shards, s.placement),
    )


# --- communication ----------------------------------------------------------------------------
def gathers_per_step(strategy: str, k: int) -> tuple[int, int]:
    """All-gathers per step of the root unit and of each block (one reduce-scatter each)."""
    if strategy == "reshard":
        return k + 1, 2 * (k + 1)
    return (1, 2) if strategy == "hold-attack" else (1, 1)


def ring_share(ranks: int) -> float:
    """The share of a gathered (or reduce-scattered) tensor each rank receives (sends) in a
    ring: (P - 1) / P."""
    return (ranks - 1) / ranks


@dataclass(frozen=True)
class Volume:
    """One step's collectives, per GPU: calls and bytes received (all-gather) or sent
    (reduce-scatter)."""

    gathers: int
    gather_bytes: float
    scatters: int
    scatter_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.gather_bytes + self.scatter_bytes


def step_volume(v: ViT, s: Setup, shards: int) -> Volume:
    root_n, block_n = gathers_per_step(s.strategy, s.k)
    root, block = unit_numels(v, s, shards)
    share = ring_share(shards)
    gathered = (root_n * root + block_n * v.depth * block) * s.precision.param_bytes * share
    scattered = (root + v.depth * block) * s.precision.reduce_bytes * share
    return Volume(root_n + block_n * v.depth, gathered, 1 + v.depth, scattered)


# --- FLOPs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """One image's forward FLOPs (2 per multiply-accumulate) by kind; element-wise work (norms,
    GELU, softmax, the optimizer) is left out."""

    linear: float  # the blocks' qkv, proj, fc1, fc2
    attention: float  # q k^T and the product with v
    patch: float  # the patch projection
    head: float  # the classifier on the class token


def forward_flops(v: ViT, image: int) -> Flops:
    s, w, m = v.tokens(image), v.width, v.mlp
    linear = v.depth * 2 * s * (4 * w * w + 2 * w * m)
    attention = v.depth * 4 * s * s * w
    patch = 2 * (s - 1) * 3 * v.patch**2 * w
    return Flops(linear, attention, patch, 2 * w * v.classes)


def training_backward(f: Flops) -> float:
    """Weight and input gradients (2x the forward) of the blocks and the head; the patch
    projection's weight gradient only (the image needs none)."""
    return 2 * (f.linear + f.attention + f.head) + f.patch


def attack_backward(f: Flops) -> float:
    """The input gradient with frozen weights: 1x the forward for a linear layer or the patch
    projection, 2x for attention (q, k and v all need gradients)."""
    return f.linear + 2 * f.attention + f.head + f.patch


def step_flops(v: ViT, s: Setup) -> float:
    """One image's FLOPs in a PGD-k training step; checkpointing recomputes the blocks' forward
    in every backward pass (the attack's too: nets.blocks.run_blocks)."""
    f = forward_flops(v, s.image)
    forward = f.linear + f.attention + f.patch + f.head
    recompute = f.linear + f.attention if s.checkpointed else 0.0
    attack = forward + attack_backward(f) + recompute
    return forward + training_backward(f) + recompute + s.k * attack


# --- memory -----------------------------------------------------------------------------------
def block_saved_bytes(v: ViT, tokens: int, act_bytes: int, attack: bool) -> float:
    """Bytes one block keeps for its backward, per image (bench/scaling.py counts them with
    torch's saved-tensor hooks). Training: norm1's input, the qkv input (norm1's output), q, k,
    v, attention's output (proj's input), norm2's input and output, fc1's output (GELU's input),
    GELU's output (fc2's input): 8 w + 2 m per token. Under the attack the weights are frozen, so
    a linear layer keeps no input: 6 w + m. Both keep the norms' means and inverse standard
    deviations (4 per token, in the activations' dtype as torch's CPU kernels keep them) and
    attention's log-sum-exp (fp32, one per head and token)."""
    w, m = v.width, v.mlp
    elements = 6 * w + m if attack else 8 * w + 2 * m
    return tokens * ((elements + 4) * act_bytes + 4 * v.heads)


def root_saved_bytes(v: ViT, image: int, act_bytes: int) -> float:
    """Per image, outside the blocks (an estimate, under 1 % of the total here): the image
    (the patch projection's input), the final norm's input and the classifier's input."""
    return (3 * image * image + v.tokens(image) * v.width + v.width) * act_bytes


def activation_bytes(v: ViT, s: Setup) -> float:
    """Peak saved activations per GPU of a training step, at the end of its forward (an attack
    iteration keeps less: ``block_saved_bytes(attack=True)``, and frees it before the training
    forward). Checkpointed: each block keeps its input, and one block's activations are rebuilt
    at a time in the backward pass."""
    act = s.precision.param_bytes
    tokens = v.tokens(s.image)
    one_block = block_saved_bytes(v, tokens, act, attack=False)
    kept = tokens * v.width * act if s.checkpointed else one_block  # per block
    blocks = v.depth * kept + (one_block if s.checkpointed else 0)
    return s.batch * (blocks + root_saved_bytes(v, s.image, act))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, by part."""

    master: float  # the fp32 parameter shard (the optimizer's master weights)
    grads: float  # the gradient shard (reduce dtype)
    optimizer: float
    buffers: float  # units gathered at once: two blocks (prefetch), the root, one block's grads
    held: float  # the whole model gathered (hold-* strategies)
    activations: float

    @property
    def total(self) -> float:
        return (
            self.master + self.grads + self.optimizer + self.buffers + self.held + self.activations
        )


def fsdp_memory(v: ViT, s: Setup, shards: int) -> Memory:
    """Peak memory per GPU of FSDP2 training with one unit per block (allocator fragmentation,
    the CUDA context and library workspaces not included)."""
    params = parameter_count(v)
    root, block = unit_numels(v, s, shards)
    p = s.precision
    buffers = (2 * block + root) * p.param_bytes + block * (p.param_bytes + p.reduce_bytes)
    return Memory(
        params / shards * p.master_bytes,
        params / shards * p.reduce_bytes,
        params / shards * OPTIMIZER_STATE_BYTES[s.optimizer],
        buffers,
        0 if s.strategy == "reshard" else params * p.param_bytes,
        activation_bytes(v, s),
    )


def ddp_state_bytes(v: ViT, optimizer: str) -> float:
    """DDP's per-GPU weights, gradients, gradient buckets (a second copy: DistributedDataParallel
    without gradient_as_bucket_view, as iat.train.builders builds it) and optimizer state, fp32."""
    return parameter_count(v) * (4 + 4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])


# --- time -------------------------------------------------------------------------------------
LAYOUTS = {
    "ring": "FSDP over all GPUs, one ring (across nodes every step waits on InfiniBand)",
    "hierarchical": "FSDP over all GPUs: a ring across nodes per local rank, then NVLink",
    "hsdp": "HSDP: sharded within a node (NVLink), replicated across nodes (gradient all-reduce)",
}


@dataclass(frozen=True)
class Cluster:
    """GPUs of `per_node` to a node joined by NVLink, nodes joined by InfiniBand (one NIC per
    GPU); bandwidths per GPU and direction, latencies per ring step."""

    per_node: int
    nvlink_bw: float  # bytes/s
    nvlink_alpha: float  # s
    ib_bw: float
    ib_alpha: float
    flops: float  # sustained FLOP/s per GPU (dense peak x utilisation)


def ring_seconds(size: float, ranks: int, alpha: float, bandwidth: float) -> float:
    """A ring all-gather (or reduce-scatter) of a `size`-byte tensor: P - 1 steps of size / P."""
    return (ranks - 1) * alpha + ring_share(ranks) * size / bandwidth if ranks > 1 else 0.0


def shard_group(gpus: int, c: Cluster, layout: str) -> int:
    return min(gpus, c.per_node) if layout == "hsdp" else gpus


def gather_seconds(size: float, gpus: int, c: Cluster, layout: str) -> float:
    """An all-gather (or reduce-scatter) of `size` bytes (the gathered size) in `layout`."""
    nodes = max(1, gpus // c.per_node)
    within = min(gpus, c.per_node)
    if layout == "ring":
        link = (c.nvlink_alpha, c.nvlink_bw) if nodes == 1 else (c.ib_alpha, c.ib_bw)
        return ring_seconds(size, gpus, *link)
    nvlink = ring_seconds(size, within, c.nvlink_alpha, c.nvlink_bw)
    if layout == "hsdp":
        return nvlink
    if layout == "hierarchical":
        return ring_seconds(size / within, nodes, c.ib_alpha, c.ib_bw) + nvlink
    raise ValueError(f"unknown layout {layout!r}; one of {sorted(LAYOUTS)}")


def scatter_seconds(size: float, gpus: int, c: Cluster, layout: str) -> float:
    """A gradient reduce-scatter; under HSDP also the shard's ring all-reduce across nodes."""
    seconds = gather_seconds(size, gpus, c, layout)
    if layout == "hsdp":
        nodes = max(1, gpus // c.per_node)
        seconds += 2 * ring_seconds(size / min(gpus, c.per_node), nodes, c.ib_alpha, c.ib_bw)
    return seconds


@dataclass(frozen=True)
class Pass:
    """One pass over the model: FLOPs per block, and which collectives it runs."""

    block_flops: float
    gathers: bool  # each block's all-gather
    root_gathers: bool
    scatters: bool  # each unit's gradient reduce-scatter


def passes(v: ViT, s: Setup) -> list[Pass]:
    """The step's passes in order: k attack iterations (forward, input gradient), then the
    training forward and backward. The root unit is gathered for a forward and kept for its
    backward."""
    f = forward_flops(v, s.image)
    forward = s.batch * (f.linear + f.attention) / v.depth
    recompute = forward if s.checkpointed else 0.0
    attack = s.batch * (f.linear + 2 * f.attention) / v.depth + recompute
    train = 2 * forward + recompute
    reshard = s.strategy == "reshard"
    out = []
    for i in range(s.k):
        first = reshard or i == 0
        out += [Pass(forward, first, first, False), Pass(attack, reshard, False, False)]
    first = reshard or s.k == 0
    out += [Pass(forward, first, first, False)]
    return out + [Pass(train, s.strategy != "hold-step", False, True)]


@dataclass(frozen=True)
class StepTime:
    compute: float  # s, the blocks' FLOPs at the sustained rate, no communication
    overlapped: float  # s, each block's collectives hidden behind its neighbour's compute
    serial: float  # s, no overlap


def step_time(v: ViT, s: Setup, gpus: int, c: Cluster, layout: str) -> StepTime:
    """One step on `gpus` GPUs with `s.batch` images each (weak scaling). Overlapped: per pass
    the root unit's collectives and one block's are exposed, and each block takes the longer
    of its compute and its collectives (FSDP2 prefetches the next block's gather and
    reduce-scatters the previous block's gradient while a block computes). The patch projection,
    the head and the optimizer step are not timed."""
    root, block = unit_numels(v, s, shard_group(gpus, c, layout))
    p = s.precision
    gather = gather_seconds(block * p.param_bytes, gpus, c, layout)
    scatter = scatter_seconds(block * p.reduce_bytes, gpus, c, layout)
    root_gather = gather_seconds(root * p.param_bytes, gpus, c, layout)
    root_scatter = scatter_seconds(root * p.reduce_bytes, gpus, c, layout)
    compute = overlapped = serial = 0.0
    for step in passes(v, s):
        work = step.block_flops / c.flops
        comm = (gather if step.gathers else 0.0) + (scatter if step.scatters else 0.0)
        exposed = (root_gather if step.root_gathers else 0.0) + (
            root_scatter if step.scatters else 0.0
        )
        compute += v.depth * work
        serial += v.depth * (work + comm) + exposed
        overlapped += comm + v.depth * max(work, comm) + exposed
    return StepTime(compute, overlapped, serial)
