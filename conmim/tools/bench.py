"""``conmim bench``: throughput of the training step, the fast path beside a plain eager fp32 one.

Both variants run the same optimizer step as ``conmim pretrain`` (:mod:`conmim.train.step`) on the same
initial weights, in the same process:

- ``fast``: the configuration as given (``precision``, ``train.compile``, ``data.gpu_aug``),
  SDPA attention, fused AdamW, foreach clipping and EMA;
- ``plain``: fp32, eager, explicit softmax attention, per-parameter AdamW / clipping / EMA loops,
  and the CPU data path: what a straightforward implementation does;
- or, with ``bench.baseline`` set, ``baseline``: the fast path with those overrides (the cost of one
  setting, e.g. ``bench.baseline=[train.grad_checkpointing=false]`` beside ``train.grad_checkpointing=true``).

Data (``bench.data``): ``synthetic`` keeps a few random batches on the device (the model step
alone; the two variants then alternate chunk by chunk, so a shared machine's load hits both);
``jpeg`` writes ImageNet-sized JPEG files to a temporary folder and ``PATH`` uses a folder of
images, or tar shards (a folder of ``.tar`` files or a shard pattern: ``data.source=webdataset``):
all run the complete data path from files, one variant after the other, each with its
loader's prefetch queue drained after warm-up so the figure is the steady state.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import itertools
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from ..config import BenchRunConfig, Config, ModelConfig
from ..data.gpu_views import device_batches, device_views
from ..data.masking import MaskGenerator
from ..data.shards import is_shard_location
from ..models.conmim import ARCH_DIMS, ConMIM, set_fused_attention
from ..runtime import distributed
from ..runtime.device import resolve_device, resolve_precision
from ..train.optim import build_adamw
from ..train.setup import build_loader
from ..train.step import compile_step, forward_backward, optimizer_step

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, no sparsity); the first
# substring found in the device name wins. bench.peak_tflops overrides.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def flops_per_image(m: ModelConfig) -> float:
    """Analytic training FLOPs per image (2 per multiply-add): student forward + backward (3x its
    forward), teacher forward (1x), each encoder + BN projector over all tokens, and the loss."""
    dim, preset_depth, _heads = ARCH_DIMS[m.arch]
    depth = m.depth or preset_depth
    n = (m.img_size // m.patch_size) ** 2
    t = n + 1
    patch = 2 * n * m.in_chans * m.patch_size**2 * dim
    blocks = depth * (2 * t * 12 * dim * dim + 4 * t * t * dim)  # qkv, proj, 4x MLP; QK^T and AV
    projector = 2 * t * (dim * m.proj_hidden_dim + m.proj_hidden_dim**2 + m.proj_hidden_dim * m.proj_out_dim)
    forward = patch + blocks + projector
    loss = 3 * 2 * n * n * m.proj_out_dim
    return 4 * forward + loss


def peak_tflops(device: torch.device, override: float) -> tuple[float | None, str]:
    """(peak, where it comes from) for MFU; None on CPU or an unknown GPU without an override."""
    if override > 0:
        return override, "bench.peak_tflops"
    if device.type != "cuda":
        return None, "no MFU on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16_TFLOPS:
        if key in name:
            return value, f"datasheet dense bf16 ({key})"
    return None, f"unknown peak for {name}; set bench.peak_tflops"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "CPU",
        )
        if Path("/proc/cpuinfo").exists()
        else "CPU"
    )
    return f"{model} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"


def write_jpeg_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` RGB JPEGs of ImageNet-like sizes (333-640 px sides, ~100 KB at quality 90): smooth
    random colour fields with grain, so they compress and decode like photographs, not like noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in tqdm(range(count), desc="writing JPEGs", leave=False):
        w = int(rng.choice([500, 500, 500, 375, 333, 400, 640]))
        h = int(round(w * rng.choice([0.75, 0.75, 1.333, 0.667, 1.0])))
        low = rng.integers(0, 256, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0.0, 14.0, img.shape)
        paths.append(folder / f"{k:05d}.jpg")
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(paths[-1], "JPEG", quality=90)
    return paths


class MemoryMeter:
    """Peak memory of a region above a baseline: CUDA allocator statistics on GPU; on CPU the
    process RSS, sampled every 2 ms (approximate: freed memory the allocator keeps still counts)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self._now()

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextlib.contextmanager
    def peak(self, out: list[float]):
        """Append the peak above the baseline, in GB, to ``out`` when the region ends."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            out.append((torch.cuda.max_memory_allocated(self.device) - self.baseline) / 1e9)
            return
        samples, stop = [self._now()], threading.Event()

        def sample() -> None:
            while not stop.wait(0.002):
                samples.append(self._now())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        out.append((max(samples) - self.baseline) / 1e9)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap so the next RSS baseline is honest


def variant_config(cfg: BenchRunConfig, variant: str, folder: Path | None) -> BenchRunConfig:
    """The configuration one variant runs; ``plain`` turns every speed-up off, ``baseline`` applies
    ``bench.baseline``'s overrides."""
    cfg = copy.deepcopy(cfg)
    if folder is not None:  # the images, unsplit
        source = "webdataset" if is_shard_location(str(folder)) else "folder"
        cfg.data.source, cfg.data.path, cfg.data.split = source, str(folder), "."
    if variant == "plain":
        cfg.precision, cfg.train.compile, cfg.data.gpu_aug = "fp32", False, False
    if variant == "baseline":
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(cfg.bench.baseline)))
        cfg = OmegaConf.to_object(merged)
    return cfg


@dataclass
class Variant:
    """One variant's model, optimizer and batch stream, ready to step."""

    name: str
    cfg: BenchRunConfig
    device: torch.device
    memory: MemoryMeter
    step: Callable[[], None] = field(init=False)
    _stop_loader: Callable[[], None] = field(init=False)
    warmup_s: float = 0.0
    peak_mem: list[float] = field(default_factory=list)
    chunks: list[float] = field(default_factory=list)  # seconds per step, per timed chunk
    cpu_chunks: list[float] = field(default_factory=list)  # process CPU seconds per step (CPU devices)
    host_syncs: int | None = None

    def __post_init__(self) -> None:
        cfg, device, fast = self.cfg, self.device, self.name != "plain"
        t = cfg.train
        torch.manual_seed(cfg.seed)  # both variants start from the same weights
        model = ConMIM.from_config(cfg.model).to(device).train()
        model.student.set_grad_checkpointing(t.grad_checkpointing)
        set_fused_attention(model, fast)
        optimizer = build_adamw(
            model.student,
            t.base_lr * t.batch_size / 256,
            t.weight_decay,
            tuple(t.betas),
            t.decay_mask_token,
            t.decay_rel_pos,
            fused=fast,
            foreach=fast,
        )
        amp_dtype = resolve_precision(cfg.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        student = compile_step(model, model.student) if t.compile else model.student
        params = [p for p in model.student.parameters() if p.requires_grad]
        batches, self._stop_loader = self._batches()

        def step() -> None:
            weak, strong, mask = next(batches)
            forward_backward(model, student, weak, strong, mask, amp_dtype, scaler)
            optimizer_step(model, optimizer, scaler, params, t.clip_grad, t.momentum, foreach=fast)

        self.step = step

    def _batches(self) -> tuple[Iterator, Callable[[], None]]:
        cfg, device = self.cfg, self.device
        if self.cfg.bench.data == "synthetic":
            return _synthetic_batches(cfg, device), lambda: None
        loader, _sampler, dataset = build_loader(cfg, distributed.DistInfo(), 0)
        raw = iter(loader)
        queued = loader.num_workers * (loader.prefetch_factor or 0)  # what the workers can have ready
        self._drain = lambda: [next(raw) for _ in range(queued)]
        batches = device_batches(raw, device_views(cfg, device, dataset), device)
        return batches, lambda: raw._shutdown_workers() if hasattr(raw, "_shutdown_workers") else None

    def close(self) -> None:
        """Stop the loader's workers and drop model, optimizer and batches, so their memory goes back."""
        self._stop_loader()
        del self.step

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in tqdm(range(steps), desc=f"{self.name} warm-up", leave=False):
            self.step()
        self.sync()
        self.warmup_s = time.perf_counter() - start
        with self.memory.peak(self.peak_mem):
            self.step()
        if self.cfg.bench.data != "synthetic":
            self._drain()  # prefetched batches would be free steps; drop them for the steady state

    def time_chunk(self, steps: int) -> None:
        self.sync()
        with _count_host_syncs(self.device) as syncs:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                self.step()
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")  # the closing synchronize is ours
            self.sync()
            self.chunks.append((time.perf_counter() - start) / steps)
            self.cpu_chunks.append((time.process_time() - cpu_start) / steps)
        if syncs is not None:
            self.host_syncs = (self.host_syncs or 0) + len(syncs)


@contextlib.contextmanager
def _count_host_syncs(device: torch.device):
    """On GPU, record every implicit host synchronisation (``.item()``, boolean indexing, ...)."""
    if device.type != "cuda":
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _synthetic_batches(cfg: Config, device: torch.device, sets: int = 2) -> Iterator:
    """A few random (weak, strong, mask) batches on the device, cycled (random data, never zeros)."""
    m, b = cfg.model, cfg.train.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    masks = MaskGenerator.from_config(cfg.mask, m.img_size, m.patch_size)
    batches = []
    for _ in range(sets):
        weak, strong = (torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=gen).to(device) for _ in "ws")
        batches.append((weak, strong, torch.stack([masks(gen) for _ in range(b)]).to(device)))
    return itertools.cycle(batches)


def _chunk_sizes(steps: int, repeats: int) -> list[int]:
    return [steps // repeats + (1 if k < steps % repeats else 0) for k in range(repeats)]


def report(v: Variant, cfg: BenchRunConfig, device: torch.device, data: str) -> dict[str, Any]:
    """One JSON-ready line: figures first, then what produced them."""
    t = v.cfg.train
    step_s = statistics.median(v.chunks)
    img_s = t.batch_size / step_s
    flops = flops_per_image(v.cfg.model)
    peak, peak_source = peak_tflops(device, cfg.bench.peak_tflops)
    amp = resolve_precision(v.cfg.precision, device)
    fast = v.name != "plain"
    return {
        "variant": v.name,
        "img_per_s": round(img_s, 2),
        "step_ms": round(step_s * 1e3, 2),
        "img_per_s_chunks": [round(t.batch_size / c, 2) for c in v.chunks],
        "peak_mem_gb": round(max(v.peak_mem), 3),
        "mfu": round(flops * img_s / (peak * 1e12), 4) if peak else None,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "gflop_per_img": round(flops / 1e9, 2),
        # On a CPU shared with other jobs, wall time includes waiting for a core; the process's CPU
        # time per step does not, so it gives the steadier ratio there.
        "cpu_ms_per_step": round(statistics.median(v.cpu_chunks) * 1e3, 1) if device.type == "cpu" else None,
        "warmup_s": round(v.warmup_s, 1),
        "host_syncs": v.host_syncs,
        "device": device_name(device),
        "arch": v.cfg.model.arch,
        "img_size": v.cfg.model.img_size,
        "batch_size": t.batch_size,
        "data": data,
        "data_path": "synthetic" if data == "synthetic" else ("device" if v.cfg.data.gpu_aug else "cpu"),
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp],
        "compile": t.compile,
        "grad_checkpointing": t.grad_checkpointing,
        "attention": "sdpa" if fast else "math",
        "optimizer": "fused" if fast else "for-loop",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": OmegaConf.to_container(OmegaConf.structured(v.cfg)),
    }


def run_bench(cfg: BenchRunConfig) -> list[dict[str, Any]]:
    """Measure both variants; returns the two report lines (fast first, with its speed-up)."""
    device = resolve_device(cfg.device)
    b = cfg.bench
    names = ("fast", "baseline" if b.baseline else "plain")
    chunks = _chunk_sizes(b.steps, b.repeats)
    with contextlib.ExitStack() as stack:
        folder = None
        if b.data == "jpeg":
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conmim-bench-")))
            write_jpeg_folder(folder, b.jpeg_images, cfg.seed)
        elif b.data != "synthetic":
            folder = Path(b.data)
        variants: list[Variant] = []
        if b.data == "synthetic":  # alternate chunk by chunk: load changes on a shared machine hit both
            for name in names:
                variants.append(Variant(name, variant_config(cfg, name, folder), device, MemoryMeter(device)))
                variants[-1].warmup(b.warmup)
            for n in tqdm(chunks, desc="timing", leave=False):
                for v in variants:
                    v.time_chunk(n)
        else:  # one after the other: each data path needs its own steady state
            for name in names:
                _release_memory(device)
                v = Variant(name, variant_config(cfg, name, folder), device, MemoryMeter(device))
                v.warmup(b.warmup)
                for n in tqdm(chunks, desc=f"timing {name}", leave=False):
                    v.time_chunk(n)
                v.close()
                variants.append(v)
                del v
        data = b.data if b.data in ("synthetic", "jpeg") else variants[0].cfg.data.source  # folder | webdataset
        lines = [report(v, cfg, device, data) for v in variants]
    lines[0][f"speedup_vs_{names[1]}"] = round(lines[0]["img_per_s"] / lines[1]["img_per_s"], 3)
    if device.type == "cpu":
        lines[0][f"speedup_vs_{names[1]}_cpu_time"] = round(
            lines[1]["cpu_ms_per_step"] / lines[0]["cpu_ms_per_step"], 3
        )
    return lines
