"""The CUDA paths on a GPU: every test here is marked ``cuda`` and skipped where CUDA is absent.

Run them with ``pytest -m cuda tests/test_cuda.py`` (``bench/gpu_proof.sh`` does, with the GPU
benchmark). Each compares the CUDA path with its CPU twin or with an independent figure:
architectures against the CPU in fp32 (TF32 off), the original's ``.npz`` logits, the PGD
invariants under eager fp32 and under the fast attack (fp16 autocast with the loss scaled by
128, compiled with CUDA graphs), the fast attack's success against fp32, mixed-precision
training (--amp: bf16 and fp16 against fp32, fp16's scaler resumed), ``main.py`` training
and evaluation, one NCCL process group with DDP, and the data server's batches through pinned
memory.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, write_imagenet
from digits_model import assert_unchanged, digits_tensors, snapshot, train_digits_model

import nets
from adv_model import PGDAttacker, attack_success
from iat.config import Config
from iat.data.sources import TrainSourceSpec, server_batches, to_model_input
from iat.train import builders as train_builders
from iat.train import trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda", 0)
REFERENCE_DIR = REPO / "tests" / "data" / "reference"
TINY = {"num_blocks": [1, 1, 1, 1], "num_classes": 10}
TINY_WIDTH = {"ResNeXtDenoiseAll": 8}  # 4 x width must divide into its 32 groups


@pytest.fixture()
def exact_fp32() -> Iterator[None]:
    """Plain fp32 convolutions and matrix products (no TF32), so CUDA can equal the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.cpu() - expected).norm() / expected.norm().clamp_min(1e-30))


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = nets.build_model(arch, width=TINY_WIDTH.get(arch, 8), **TINY)
    for module in model.modules():  # non-trivial residual branches (zero-gamma starts at 0)
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


# --- architectures and the original's checkpoint ---------------------------------------------
@pytest.mark.parametrize("arch", nets.available_architectures())
def test_forward_backward_on_cuda_equals_cpu(arch, exact_fp32):
    cpu = tiny_model(arch).train()
    gpu = copy.deepcopy(cpu).to(CUDA, memory_format=torch.channels_last)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    y = torch.arange(4)
    results = []
    for model, device in ((cpu, torch.device("cpu")), (gpu, CUDA)):
        inputs = to_model_input(x.permute(0, 2, 3, 1).round().to(torch.uint8), device)
        inputs.requires_grad_(True)
        logits = model(inputs)
        F.cross_entropy(logits, y.to(device)).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((logits.detach(), inputs.grad, grads))
    (cpu_logits, cpu_input_grad, cpu_grads), (gpu_logits, gpu_input_grad, gpu_grads) = results
    assert relative_error(gpu_logits, cpu_logits) < 1e-4
    assert relative_error(gpu_input_grad, cpu_input_grad) < 1e-3
    # All parameter gradients as one vector: some are ~1e-8 by construction (a BatchNorm bias
    # before a normalisation), where a per-tensor relative error would only measure rounding.
    names = list(cpu_grads)
    flat_cpu = torch.cat([cpu_grads[n].flatten() for n in names])
    flat_gpu = torch.cat([gpu_grads[n].flatten().cpu() for n in names])
    assert relative_error(flat_gpu, flat_cpu) < 1e-4
    worst = max((gpu_grads[n].cpu() - cpu_grads[n]).norm() for n in names)
    assert worst < 1e-4 * flat_cpu.norm()
    for name, buffer in cpu.named_buffers():  # BatchNorm statistics updated alike
        assert relative_error(dict(gpu.named_buffers())[name].float(), buffer.float()) < 1e-4


def test_original_npz_logits_on_cuda(exact_fp32):
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1]).eval()
    nets.load_weights(model, REFERENCE_DIR / "ResNet-blocks1111.npz")
    model = model.to(CUDA, memory_format=torch.channels_last)
    with np.load(REFERENCE_DIR / "ResNet-blocks1111.io.npz") as io:
        images, reference = torch.from_numpy(io["images_bgr_uint8"]), io["logits"]
    with torch.no_grad():
        logits = model(to_model_input(images, CUDA))
    assert relative_error(logits, torch.from_numpy(reference)) <= 1e-4


# --- the attack on CUDA ------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "fp16-compiled-cudagraphs"])
def test_pgd_iterates_on_cuda_keep_every_invariant(fast):
    model = tiny_model("ResNetDenoise").to(CUDA, memory_format=torch.channels_last).train()
    before = snapshot(model)
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    x[:2], x[2:4] = 0.0, 255.0  # corners of the box: the clip must hold there too
    x = x.to(CUDA)
    y = torch.arange(8, device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(3)
    attacker = PGDAttacker(
        5, 16.0, 4.0, num_classes=10, autocast=fast, compiled=fast, generator=gen
    )
    for _ in range(2):  # the second call replays the captured graphs
        adv, targets = attacker.attack(model, x, y)
        assert adv.device == x.device and adv.dtype == torch.float32
        assert (adv - x).abs().max() <= 16.0 + 1e-3
        assert adv.min() >= 0.0 and adv.max() <= 255.0
        assert not adv.requires_grad and (adv != x).any()
        assert ((targets != y) & (targets >= 0) & (targets < 10)).all()
        assert_unchanged(model, before)  # BN in train mode and its statistics untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fast_attack_success_within_one_point_of_fp32_on_cuda(dtype):
    trained = train_digits_model()["model"]
    images, labels = digits_tensors()  # all 1797 digits: 1 point is 18 images
    x, y = images.to(CUDA), labels.to(CUDA)
    model = trained.to(CUDA).eval()
    rates = []
    for fast in (False, True):
        # As tests/test_fast_attack.py: epsilon 48 (3 of the digits' grey levels), 10 steps.
        gen = torch.Generator(device=CUDA).manual_seed(6)
        attacker = PGDAttacker(
            10, 48.0, 1.0, autocast=fast, compiled=fast, generator=gen, autocast_dtype=dtype
        )
        adv, targets = attacker.attack(model, x, y)
        with torch.no_grad():
            rates.append(attack_success(model(adv), y, targets).float().mean().item())
    fp32, fast = rates
    print(f"PGD-10 success on CUDA: fp32 {fp32:.4f}, {dtype} compiled {fast:.4f}")
    assert 0.3 < fp32 < 0.95, rates
    assert abs(fast - fp32) <= 0.01, rates


# --- training step with NCCL + DDP -------------------------------------------------------------
def test_one_process_nccl_group_trains_through_ddp(tmp_path):
    torch.distributed.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, device_id=CUDA
    )
    try:
        total = torch.ones(3, device=CUDA) * 2
        torch.distributed.all_reduce(total)
        assert total.tolist() == [2.0, 2.0, 2.0]
        model = tiny_model("ResNet").to(CUDA, memory_format=torch.channels_last)
        cfg = Config(fake=True, sync_bn=True)
        ddp = train_builders.wrap_model(model, cfg, CUDA, world_size=2)  # multi-process
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        optimizer = train_builders.build_optimizer(model, cfg)
        images = torch.randint(0, 256, (8, 32, 32, 3), generator=torch.Generator().manual_seed(4))
        x = to_model_input(images.to(torch.uint8).pin_memory(), CUDA)
        y = torch.arange(8, device=CUDA) % 10
        attack = PGDAttacker(2, 8.0, 4.0, num_classes=10, autocast=True, compiled=False)
        start = [p.detach().clone() for p in model.parameters()]
        stats = trainer.train_step(
            ddp, model, attack, optimizer, [(x, y)], trainer.LossSettings(0.1)
        )
        assert stats is not None
        assert all(p.isfinite().all() for p in model.parameters())
        assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    finally:
        torch.distributed.destroy_process_group()


# --- mixed-precision training (--amp) ------------------------------------------------------------
def amp_losses(dtype: str | None, steps: int = 40) -> tuple[list[float], torch.nn.Module]:
    """A tiny channels-last ResNet trained on CUDA under --amp `dtype` (None: fp32)."""
    torch.manual_seed(0)
    model = tiny_model("ResNet").to(CUDA, memory_format=torch.channels_last)
    cfg = Config(fake=True, amp=dtype is not None, amp_dtype=dtype)
    precision = train_builders.training_precision(cfg.amp, cfg.amp_dtype, CUDA)
    scaler = torch.amp.GradScaler("cuda") if precision.scaled else None
    optimizer = train_builders.build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(5)
    colours = torch.rand(10, 3, 1, 1, generator=g) * 255
    losses = []
    for _ in range(steps):
        y = torch.randint(10, (16,), generator=g)
        x = (colours[y] + torch.randn(16, 3, 32, 32, generator=g) * 40).clamp(0, 255)
        x = x.to(CUDA).contiguous(memory_format=torch.channels_last)
        attack = PGDAttacker(1, 8.0, 8.0, num_classes=10)
        result = trainer.train_step(
            model, model, attack, optimizer, [(x, y.to(CUDA))], trainer.LossSettings(0.1),
            precision, scaler,
        )  # fmt: skip
        losses.append(result.loss.item())
    return losses, model


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_on_cuda_tracks_fp32_with_fp32_weights_channels_last(dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    reference, _ = amp_losses(None)
    losses, model = amp_losses(dtype)
    assert np.isfinite(losses).all()
    final, final_fp32 = np.mean(losses[-10:]), np.mean(reference[-10:])
    assert abs(final - final_fp32) < 0.15 + 0.15 * final_fp32, (final, final_fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_main_amp_fp16_run_saves_and_resumes_its_scaler_on_cuda(tmp_path):
    amp = ["--fake", *MAIN_TINY, "--num-classes", "3", "--steps-per-epoch", "3",
           "--train-eval", "none", "--workers", "0", "--amp", "--amp-dtype", "float16"]  # fmt: skip
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    out = run_main(*amp, "--epochs", "2", "--logdir", str(whole))
    assert "training step: fp16 autocast, loss scaled" in out.stderr
    run_main(*amp, "--epochs", "1", "--logdir", str(halves))
    run_main(*amp, "--epochs", "2", "--logdir", str(halves))
    states = [
        torch.load(run / "checkpoint-epoch0002.pt", weights_only=True) for run in (whole, halves)
    ]
    assert states[0]["grad_scaler"] == states[1]["grad_scaler"]
    # steps since the last overflow: a scaler not restored on resume would count fewer
    assert states[0]["grad_scaler"]["_growth_tracker"] > 3
    saved = json.loads((halves / "config.json").read_text())
    assert saved["run"]["training_precision"].startswith("fp16 autocast")


# --- main.py on CUDA ---------------------------------------------------------------------------
MAIN_TINY = [
    "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8",
    "--image-size", "32", "--batch", "8", "--attack-iter", "2", "--attack-epsilon", "8",
]  # fmt: skip


def run_main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "use-fp16xla"])
def test_main_fake_training_then_eval_on_cuda(tmp_path, fast):
    extra = ["--use-fp16xla"] if fast else []
    run = tmp_path / "run"
    run_main(
        "--fake", *MAIN_TINY, "--num-classes", "3", "--epochs", "1", "--steps-per-epoch", "3",
        "--train-eval", "none", "--workers", "0", "--log-every", "1", "--logdir", str(run), *extra,
    )  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert saved["run"]["device"] == "cuda:0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if r.get("phase") == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses)), records
    data = write_imagenet(tmp_path / "imagenet", classes=3, val_images=12)
    result = tmp_path / "eval.json"
    out = run_main(
        "--eval", "--data", str(data), "--load", str(run / "checkpoint-epoch0001.pt"),
        *MAIN_TINY, "--eval-output", str(result), *extra,
    )  # fmt: skip
    assert "robust accuracy" in out.stdout
    record = json.loads(result.read_text())
    assert record["images"] == 12 and record["device"] == "cuda:0", record


# --- the data server feeding CUDA through pinned memory ----------------------------------------
def test_data_server_batches_reach_cuda_through_pinned_memory(tmp_path):
    address = f"ipc://@cuda-test-{os.getpid()}"
    server = subprocess.Popen(
        [sys.executable, str(REPO / "third_party" / "serve-data.py"), "--fake", "--batch", "4",
         "--image-size", "32", "--bind", address, "--max-batches", "6"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        spec = TrainSourceSpec(
            samples=None, batch=4, image_size=32, augment="none", num_classes=1000, workers=0,
            seed=0, rank=0, world_size=1, first_batch=0, address=address, timeout_s=60,
            pin_memory=True,
        )  # fmt: skip
        batches = server_batches(spec)
        for _ in range(3):
            images, labels = next(batches)
            assert images.is_pinned() and images.shape == (4, 32, 32, 3)
            x = to_model_input(images, CUDA)
            torch.cuda.synchronize()
            assert x.device == CUDA and x.is_contiguous(memory_format=torch.channels_last)
            expected = images.permute(0, 3, 1, 2).float()
            assert torch.equal(x.cpu(), expected)
            assert labels.min() >= 0 and labels.max() < 1000
        batches.close()
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
